"""The model card: front matter the Hub understands plus plain words on how the model was made.

Everything comes from one record shaped like `weightx.json` (recipe as run, inputs with revisions and
hashes, output format, validation results), so the card can be rebuilt from a finished output folder
alone: `render_record(json.load(open("out/weightx.json")))`. `render_card(plan)` builds the same record
from a plan, for `weightx.pipeline.run.execute`, which writes the card before `weightx.json` exists.

A card written by weightx starts its body with `MARKER`; `refresh_card(folder)` (used by `weightx
push`) rewrites only such cards, so a README.md the user wrote or edited (marker removed) is kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from weightx.combine import COMBINES
from weightx.edits import COMPRESSING, EDITS
from weightx.recipe.model import validate_recipe
from weightx.version import __version__

if TYPE_CHECKING:
    from weightx.pipeline.plan import Plan

# The values the Hub accepts for base_model_relation (model-card spec, "Specifying a base model":
# https://huggingface.co/docs/hub/model-cards#specifying-a-base-model). "adapter": a format: lora output.
RELATIONS = ("adapter", "merge", "quantized", "finetune")
MARKER = "<!-- weightx:card - generated from weightx.json; `weightx push` regenerates it. Delete this line to keep your own edits. -->"
WEIGHTX_URL = "https://github.com/weightx/weightx"

def paper_of(op: str) -> str | None:
    """The paper an edit or combine declares (`paper`), for the card's method list."""
    cls = EDITS.get(op) or COMBINES.get(op)
    return cls.paper if cls is not None else None


# ----------------------------------------------------------------------------------- the record


def record_from_plan(plan: "Plan") -> dict:
    """The parts of a weightx.json record that a plan already knows (no hashes, no validation)."""
    r = plan.recipe
    form = r.recipe_form()
    form.setdefault("output", {})["path"] = str(plan.out_path)
    inputs = {
        alias: {"source": s.spec, "kind": s.kind, "repo_id": s.repo_id, "revision": s.revision, "files": {}}
        for alias, s in plan.sources.items()
    }
    output = {"format": r.output.format, "parameter_count": plan.parameter_count,
              "shards": [{"file": s.filename} for s in plan.shards]}
    return {"recipe": form, "inputs": inputs, "output": output}


def _edit_ops(recipe: dict) -> list[tuple[str, dict]]:
    """[(op, params)] for every edit of every delta, in recipe order."""
    out = []
    for d in recipe.get("deltas") or []:
        for e in d.get("edits") or []:
            if isinstance(e, dict) and len(e) == 1:
                (op, params), = e.items()
                out.append((op, params if isinstance(params, dict) else {}))
            elif isinstance(e, str):
                out.append((e, {}))
    return out


def _combine(recipe: dict) -> tuple[str, dict]:
    c = recipe.get("combine", "sum")
    if isinstance(c, dict) and len(c) == 1:
        (op, params), = c.items()
        return op, params if isinstance(params, dict) else {}
    return str(c), {}


def methods(record: dict) -> list[str]:
    """Method names in recipe order: every edit op, then the combine op if it does anything."""
    recipe = record.get("recipe") or {}
    ops = [op for op, _ in _edit_ops(recipe)]
    comb, _ = _combine(recipe)
    if comb != "sum" or len(recipe.get("deltas") or []) > 1:
        ops.append(comb)
    return list(dict.fromkeys(ops))


def used_aliases(record: dict) -> list[str]:
    """The aliases whose weights went into the output: the base, then each delta's model."""
    recipe = record.get("recipe") or {}
    aliases = [recipe.get("base")] + [d.get("model") for d in recipe.get("deltas") or []]
    return [a for a in dict.fromkeys(aliases) if isinstance(a, str)]


def hub_ids(record: dict) -> list[str]:
    """Hub ids of the inputs that went into the output; local folders and files are left out."""
    inputs = record.get("inputs") or {}
    ids = [inputs.get(a, {}).get("repo_id") for a in used_aliases(record) if inputs.get(a, {}).get("kind") == "hub"]
    return list(dict.fromkeys(i for i in ids if i))


def is_delta(record: dict) -> bool:
    return (record.get("output") or {}).get("format") == "delta"


def relation(record: dict) -> str | None:
    bases = hub_ids(record)
    if not bases:
        return None
    compressed = bool(((record.get("delta") or {}).get("tensors"))) or bool(
        COMPRESSING & {op for op, _ in _edit_ops(record.get("recipe") or {})})
    if ((record.get("output") or {}).get("format")) == "lora":
        return "adapter"
    if is_delta(record) and compressed:
        return "quantized"
    return "merge" if len(bases) > 1 else "finetune"


def title_of(record: dict, repo_id: str | None = None) -> str:
    recipe = record.get("recipe") or {}
    if recipe.get("name"):
        return str(recipe["name"])
    if repo_id:
        return repo_id.split("/")[-1]
    path = (recipe.get("output") or {}).get("path")
    return Path(path).name if path else "weightx model"


def _label(record: dict, alias: str) -> str:
    src = (record.get("inputs") or {}).get(alias) or {}
    if src.get("kind") == "hub" and src.get("repo_id"):
        return src["repo_id"].split("/")[-1]
    return alias


def _describe_edits(recipe: dict) -> list[list[str]]:
    """Per delta, the plain-words description of each edit (the method's own `describe()`)."""
    def recorded(e: Any) -> str:
        op, params = next(iter(e.items())) if isinstance(e, dict) and e else (str(e), {})
        inner = ", ".join(f"{k}={v}" for k, v in (params or {}).items() if k not in ("include", "exclude"))
        return f"{op}({inner})"

    try:
        r = validate_recipe(recipe, "weightx.json")
        # An edit whose parameters vary by tensor is described by its recorded settings (the
        # gradient or filters): its own describe() would print one value as if it were the only one.
        varying = {tuple(int(x) for x in p.label.split(".")[1:4:2]) for p in r.varying if p.label.startswith("deltas.") and ".edits." in p.label}
        raw = recipe.get("deltas") or []
        return [[recorded(raw[i]["edits"][j]) if (i, j) in varying else e.describe() for j, e in enumerate(d.edits)]
                for i, d in enumerate(r.deltas)]
    except Exception:  # an op this weightx version no longer knows: fall back to the recorded params
        return [[recorded(e) for e in d.get("edits") or []] for d in recipe.get("deltas") or []]


def summary(record: dict) -> str:
    """One sentence, e.g. "ExPO extrapolation α=0.3 from mistral-7b-sft-beta through zephyr-7b-beta."."""
    recipe = record.get("recipe") or {}
    deltas = recipe.get("deltas") or []
    parts = []
    for d, edits in zip(deltas, _describe_edits(recipe)):
        what = ", then ".join(edits) or "the unedited delta"
        w = d.get("weight", 1.0)
        weight = (f" with weight {w:g}" if isinstance(w, (int, float)) and w != 1.0 else
                  f" with weight {w}" if not isinstance(w, (int, float)) else "")  # a gradient or filters, as written
        own = d.get("base")
        onto = f", added to {_label(record, recipe.get('base', '?'))}" if own and own != recipe.get("base") else ""
        parts.append(f"{what} from {_label(record, own or recipe.get('base', '?'))} through {_label(record, d.get('model', '?'))}{weight}{onto}")
    text = "; ".join(parts) or "No edits"
    comb, params = _combine(recipe)
    if len(deltas) > 1 or comb != "sum":
        inner = ", ".join(f"{k}={v}" for k, v in params.items())
        text += f", combined by {comb}({inner})" if inner else f", combined by {comb}"
    # Method descriptions keep their own case ("ExPO ...", "dare(drop=0.9)"); only prose is capitalised.
    return (text[0].upper() + text[1:] if text.startswith("the ") else text) + "."


# ----------------------------------------------------------------------------------- validation


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _metric_id(metric: str) -> str:
    return metric.removesuffix(",none")  # lm-eval's "acc,none" = acc with the default filter


def _validation(record: dict) -> dict:
    v = record.get("validation")
    return v if isinstance(v, dict) else {}


def _settings(record: dict) -> dict:
    """Evaluation settings as run (validation.settings), else as asked (the recipe's validate block)."""
    s = _validation(record).get("settings")
    return s if isinstance(s, dict) else (record.get("recipe") or {}).get("validate") or {}


def eval_results(record: dict) -> list:
    """The output's validation results as huggingface_hub EvalResults (the card's model-index)."""
    from huggingface_hub import EvalResult

    results = (_validation(record).get("results") or {}).get("output") or {}
    settings = _settings(record)
    # A limited run scores a subset of each task: say so next to every number.
    args = {k: settings[k] for k in ("limit", "num_fewshot") if settings.get(k) is not None} or None
    out = []
    for task, metrics in sorted(results.items()):
        for metric, cell in sorted((metrics or {}).items()):
            value = _number(cell.get("value") if isinstance(cell, dict) else cell)
            if value is None:
                continue
            out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                  dataset_args=args, metric_type=_metric_id(metric), metric_name=_metric_id(metric),
                                  metric_value=value))
    return out


def _cell(cell: Any) -> str:
    if isinstance(cell, dict):
        v, se = _number(cell.get("value")), _number(cell.get("stderr"))
    else:
        v, se = _number(cell), None
    if v is None:
        return "n/a"
    return f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"


def validation_section(record: dict) -> list[str]:
    v = _validation(record)
    results = v.get("results") or {}
    if not results:
        return []
    labels = ["output"] + sorted(k for k in results if k != "output")
    rows = sorted({(t, m) for lab in labels for t, ms in (results.get(lab) or {}).items() for m in (ms or {})})
    vspec = (record.get("recipe") or {}).get("validate") or {}
    settings = _settings(record)
    passed = v.get("passed")
    status = {True: "**passed**", False: "**FAILED**"}.get(passed, "recorded")
    how = "lm-eval" + (f" {v['lm_eval_version']}" if v.get("lm_eval_version") else "")
    how += f", limit {settings['limit']} per task" if settings.get("limit") is not None else ""
    how += f", {settings['num_fewshot']}-shot" if settings.get("num_fewshot") is not None else ""
    lines = ["## Validation", "", f"Validation {status} ({how})."]
    gates = [g for g in v.get("gates") or [] if isinstance(g, dict)]
    if gates:
        lines.append("")
        for g in gates:
            verdict = "passed" if g.get("passed") else "failed"
            val = _number(g.get("value"))
            detail = f": {val:.4g} vs {_number(g.get('threshold')):.4g}" if val is not None and _number(g.get("threshold")) is not None else ""
            lines.append(f"- `{g.get('gate', '?')} {g.get('condition', '')}` {verdict}{detail}" + (f" ({g['problem']})" if g.get("problem") else ""))
    elif vspec.get("require"):
        lines += ["", "Requirements: " + "; ".join(f"`{k} {c}`" for k, c in vspec["require"].items())]
    lines += ["", "| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for task, metric in rows:
        cells = [_cell(((results.get(lab) or {}).get(task) or {}).get(metric)) for lab in labels]
        lines.append(f"| {task} | {_metric_id(metric)} | " + " | ".join(cells) + " |")
    return lines + [""]


def sweep_section(record: dict) -> list[str]:
    """The sweep that chose this output's parameters (weightx.json's `sweep`), one row per candidate."""
    sw = record.get("sweep")
    if not isinstance(sw, dict) or not sw.get("candidates"):
        return []
    params = list(sw.get("parameters") or {})
    select = sw.get("select", "?")
    lines = ["## Sweep", "", f"The parameters were chosen by evaluating each candidate in memory and keeping the "
             f"{'highest' if sw.get('direction') == 'max' else 'lowest'} `{select}`; only the winner was written.", "",
             "| " + " | ".join([*(f"`{p}`" for p in params), select, "choice"]) + " |", "|" + "---|" * (len(params) + 2)]
    close = sw.get("within_stderr") if isinstance(sw.get("within_stderr"), list) else []
    for i, c in enumerate(sw["candidates"]):
        vals = [str((c.get("values") or {}).get(p, "")) for p in params]
        cell = _cell({"value": c.get("score"), "stderr": c.get("stderr")})
        mark = "**winner**" if i == sw.get("winner") else ("within stderr" if i in close else "")
        lines.append("| " + " | ".join([*vals, cell, mark]) + " |")
    if close:
        lines += ["", f"{len(close)} other candidate(s) scored within a standard error of the winner: the evaluation"
                      " could not tell them apart."]
    return lines + [""]


# ----------------------------------------------------------------------------------- rendering


def card_data(record: dict, *, repo_id: str | None = None):
    from huggingface_hub import ModelCardData

    bases = hub_ids(record)
    results = eval_results(record)
    extra: dict[str, Any] = {}
    if bases:
        extra["base_model_relation"] = relation(record)
    return ModelCardData(
        base_model=bases or None,
        # A delta artifact is not loadable by transformers on its own, so it does not claim the library.
        library_name=None if is_delta(record) else "peft" if (record.get("output") or {}).get("format") == "lora" else "transformers",
        tags=["weightx", *methods(record)] + (["weightx-delta"] if is_delta(record) else []),
        model_name=title_of(record, repo_id) if results else None,
        eval_results=results or None,
        **extra,
    )


def _source_cell(src: dict) -> tuple[str, str]:
    hashed = any(isinstance(i, dict) and i.get("sha256") for i in (src.get("files") or {}).values())
    if src.get("kind") == "hub" and src.get("repo_id"):
        rid = src["repo_id"]
        rev = src.get("revision")
        return f"[{rid}](https://huggingface.co/{rid})", f"`{rev}`" if rev else "(not recorded)"
    name = Path(str(src.get("source", "?"))).name
    what = "local file" if src.get("kind") == "file" else "local folder"
    return f"{what} `{name}`", "local files (sha256 below)" if hashed else "local files"


def _inputs_section(record: dict) -> list[str]:
    recipe = record.get("recipe") or {}
    inputs = record.get("inputs") or {}
    roles: dict[str, str] = {}
    if recipe.get("base"):
        roles[recipe["base"]] = "base"
    for i, d in enumerate(recipe.get("deltas") or []):
        roles.setdefault(d.get("model"), f"delta {i + 1}")
        if d.get("base"):
            roles.setdefault(d["base"], f"base of delta {i + 1}")
    lines = ["## Inputs", "", "| alias | role | source | revision |", "|---|---|---|---|"]
    for alias, src in inputs.items():
        source, rev = _source_cell(src)
        lines.append(f"| `{alias}` | {roles.get(alias, 'other')} | {source} | {rev} |")
    hashed = [(a, f, info) for a, s in inputs.items() for f, info in (s.get("files") or {}).items()
              if isinstance(info, dict) and info.get("sha256")]
    if hashed:
        lines += ["", "<details><summary>Input files (sha256)</summary>", "", "| alias | file | bytes | sha256 |",
                  "|---|---|---|---|"]
        lines += [f"| `{a}` | {f} | {info.get('size', '')} | `{info['sha256']}` |" for a, f, info in hashed]
        lines += ["", "</details>"]
    return lines + [""]


def _output_line(record: dict) -> str:
    out = record.get("output") or {}
    kind = "a delta artifact" if is_delta(record) else "a dense checkpoint"
    bits = [kind]
    dtype = out.get("dtype")
    if isinstance(dtype, str):
        bits.append(f"in {dtype}")
    if out.get("parameter_count"):
        bits.append(f"{out['parameter_count']:,} parameters")
    if out.get("shards"):
        bits.append(f"{len(out['shards'])} safetensors shard(s)")
    return "Output: " + ", ".join(bits) + "."


def _delta_section(record: dict, repo_id: str | None) -> list[str]:
    recipe = record.get("recipe") or {}
    base_alias = recipe.get("base", "base")
    src = (record.get("inputs") or {}).get(base_alias) or {}
    if src.get("kind") == "hub" and src.get("repo_id"):
        base = f"{src['repo_id']}@{src['revision']}" if src.get("revision") else src["repo_id"]
        base_note = "the exact base revision this delta was taken against"
    else:
        base = "path/to/your/copy/of/the/base"
        base_note = "a local copy of the base; its sha256 must match the one listed under Inputs"
    here = repo_id or (recipe.get("push") or {}).get("repo") or "path/to/this/artifact"
    name = title_of(record, repo_id)
    doc = {"name": f"{name}-reconstructed", "models": {"base": base, "delta": here}, "base": "base",
           "deltas": [{"model": "delta"}], "output": {"path": f"out/{name}"}}
    return ["## Reconstructing the full model", "",
            "This repository holds a **delta artifact** (the edited difference to its base), not a full model; "
            "transformers cannot load it directly. Rebuild the model with "
            f"[weightx]({WEIGHTX_URL}) from this recipe (`base` is {base_note}):", "",
            "```yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).strip(), "```", "",
            "```bash", "pip install weightx", "weightx apply reconstruct.yaml", "```", "",
            "weightx checks the base against the revision and sha256 recorded in `weightx.json` and refuses "
            "a different one.", ""]


def render_record(record: dict, *, repo_id: str | None = None) -> str:
    """The full README.md for a weightx.json-shaped record."""
    from huggingface_hub import ModelCard

    recipe = record.get("recipe") or {}
    body = [MARKER, "", f"# {title_of(record, repo_id)}", "", summary(record), "", _output_line(record), ""]
    ops = methods(record)
    if ops:
        body += ["## Methods", ""]
        for op in ops:
            url = paper_of(op)
            body.append(f"- `{op}`: [paper]({url})" if url else f"- `{op}`")
        body.append("")
    body += _inputs_section(record)
    body += validation_section(record)
    body += sweep_section(record)
    if is_delta(record):
        body += _delta_section(record, repo_id)
    body += ["## Recipe", "", "The recipe as run (defaults filled in):", "",
             "```yaml", yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).strip(), "```", "",
             f"Made with [weightx]({WEIGHTX_URL}) {record.get('weightx_version') or __version__}; "
             "`weightx.json` records the input hashes, per-tensor statistics and validation results.", ""]
    meta = card_data(record, repo_id=repo_id).to_yaml()
    return str(ModelCard(f"---\n{meta}\n---\n\n" + "\n".join(body)))


def render_card(plan: "Plan", record: dict | None = None) -> str:
    """The card for a plan; `record` (the weightx.json being written) adds hashes when given."""
    return render_record(record if record is not None else record_from_plan(plan))


def refresh_card(folder: str | Path, *, repo_id: str | None = None, write: bool = True) -> tuple[str, bool]:
    """Re-render README.md from the folder's weightx.json; returns (card text, whether it changed).

    A README.md without MARKER is the user's and is returned unchanged. With `write=False` nothing is
    written (dry runs)."""
    folder = Path(folder)
    readme = folder / "README.md"
    current = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if current is not None and MARKER not in current:
        return current, False
    record = json.loads((folder / "weightx.json").read_text(encoding="utf-8"))
    text = render_record(record, repo_id=repo_id)
    if text == current:
        return text, False
    if write:
        tmp = readme.with_name(".README.md.weightx-tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(readme)
    return text, True
