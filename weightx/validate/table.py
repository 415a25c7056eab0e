"""Plain-text tables: validation results side by side, and a sweep's candidates."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weightx.validate.report import Validation
    from weightx.validate.sweep import SweepOutcome


def fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    digits = 4 if abs(value) < 100 else 2
    text = f"{value:.{digits}f}"
    return f"{text} ± {stderr:.{digits}f}" if stderr is not None else text


def _grid(header: list[str], rows: list[list[str]], right_from: int) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render_validation(v: "Validation") -> str:
    """Rows = task and metric (↑/↓ = higher/lower is better), columns = compared inputs then the output."""
    rows = []
    for task in v.order:
        metrics: list[str] = []
        for label in v.labels:
            metrics += [m for m in v.results.get(label, {}).get(task, {}) if m not in metrics]
        for m in metrics:
            hib = v.higher_is_better.get(task, {}).get(m.split(",")[0])
            arrow = {True: "↑", False: "↓"}.get(hib, " ")
            cells = []
            for label in v.labels:
                e = v.results.get(label, {}).get(task, {}).get(m)
                cells.append(fmt(e["value"], e.get("stderr")) if e else "-")
            rows.append([task, f"{m} {arrow}", *cells])
    s = v.settings
    head = f"validation (lm-eval {v.lm_eval_version}; " + ", ".join(
        x for x in (f"limit {s.limit}" if s.limit is not None else "all examples",
                    f"{s.num_fewshot}-shot" if s.num_fewshot is not None else None,
                    f"{v.device} {v.dtype}") if x) + ")"
    lines = [head, *_grid(["task", "metric", *v.labels], rows, 2)]
    if v.reused:
        lines.append(f"({v.output_label}: measured on the sweep's winning candidate in memory, the same weights as written)")
    for g in v.gates:
        lines.append(g.message(v.output_label))
    if v.gates:
        lines.append("validation passed" if v.passed else "validation FAILED")
    return "\n".join(lines)


def render_sweep(outcome: "SweepOutcome") -> str:
    names = [p.short for p in outcome.sweep.params]
    rows = []
    close = outcome.within_noise()
    for i, c in enumerate(outcome.candidates):
        mark = "← winner" if i == outcome.winner else ("within stderr" if i in close else "")
        rows.append([*(f"{c.values[p.label]:g}" if isinstance(c.values[p.label], (int, float)) else str(c.values[p.label])
                       for p in outcome.sweep.params), fmt(c.score, c.stderr), mark])
    title = f"sweep: {len(rows)} candidates evaluated in memory, {outcome.direction} {outcome.select}"
    lines = [title, *_grid([*names, outcome.select, "choice"], rows, len(names))]
    if close:
        lines.append(f"note: {len(close)} other candidate(s) score within a standard error of the winner, so the evaluation"
                     " cannot tell them apart; the winner is the best measured, not clearly the best (raise validate.limit)")
    return "\n".join(lines)
