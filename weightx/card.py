"""The model card: front matter the Hub understands plus plain words on how the model was made."""

from __future__ import annotations

import importlib

import yaml

from weightx.plan import Plan

PAPERS = {}  # op -> paper URL, filled lazily from each method module's PAPER constant


def paper_of(op: str) -> str | None:
    if op not in PAPERS:
        for pkg in ("weightx.edits", "weightx.combine"):
            try:
                PAPERS[op] = getattr(importlib.import_module(f"{pkg}.{op}"), "PAPER", None)
                break
            except ImportError:
                PAPERS[op] = None
    return PAPERS[op]


def hub_ids(plan: Plan) -> list[str]:
    return [s.repo_id for s in plan.sources.values() if s.kind == "hub" and s.repo_id]


def summary(plan: Plan) -> str:
    """One sentence per delta, e.g. "ExPO extrapolation α=0.3 from sft (org/x) through dpo (org/y)"."""
    r = plan.recipe

    def label(alias: str) -> str:
        s = plan.sources[alias]
        return f"{alias} ({s.repo_id})" if s.kind == "hub" else alias

    parts = []
    for d in r.deltas:
        edits = ", then ".join(e.describe() for e in d.edits) or "the unedited delta"
        w = f" with weight {d.weight:g}" if d.weight != 1.0 else ""
        parts.append(f"{edits} from {label(r.base)} through {label(d.model)}{w}")
    text = "; ".join(parts)
    if len(r.deltas) > 1 or r.combine.op != "sum":
        text += f", combined by {r.combine.describe()}"
    return text[0].upper() + text[1:] + "."


def render_card(plan: Plan) -> str:
    r = plan.recipe
    ops = sorted({e.op for d in r.deltas for e in d.edits} | ({r.combine.op} if r.combine.op != "sum" or len(r.deltas) > 1 else set()))
    meta = {"library_name": "transformers", "tags": ["weightx", *ops]}
    bases = hub_ids(plan)
    if bases:
        meta["base_model"] = bases
        meta["base_model_relation"] = "merge" if len(bases) > 1 else "finetune"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {r.name or plan.out_path.name}", "", summary(plan), ""]
    links = [(op, paper_of(op)) for op in ops]
    if any(url for _, url in links):
        lines += ["## Methods", ""] + [f"- `{op}`: {url}" for op, url in links if url] + [""]
    lines += ["## Inputs", ""]
    for alias, s in plan.sources.items():
        lines.append(f"- `{alias}`: {s.describe()}")
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(r.recipe_form(), sort_keys=False).strip(), "```", "",
              "Made with [weightx](https://github.com/weightx/weightx); `weightx.json` records input hashes and per-tensor statistics.", ""]
    return "\n".join(lines)
