"""What an output says about itself: config, index, and the `weightx.json` record.

Runs once the shards are written (on rank 0): the recipe as run, the inputs with their sha256, the
output's layout, per-tensor statistics, the delta encoding (`format: delta`) and the records of the
pre-run phases from the run state. A wrong artifact base is refused here, now that hashes are known.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from weightx.version import __version__
from weightx.errors import InputError
from weightx.formats import ENCODING, VERSION
from weightx.io.artifact import base_mismatch
from weightx.pipeline.vocab import write_tokenizer
from weightx.io.output import copy_config, write_json
from weightx.io.safetensors import DTYPES
from weightx.pipeline.compression import compression_summary
from weightx.pipeline.compute import TensorStats
from weightx.pipeline.plan import Plan
from weightx.pipeline.state import RunState


def portable(record: dict, recipe_dir: Path | None = None) -> dict:
    """The record with local paths that say nothing about the user's machine: an absolute path
    becomes relative to the recipe's folder (or the working directory) when inside it, else the
    file or folder name alone; the sha256 beside it still identify every input. Any other mention
    of the home folder becomes `~`. Hub ids and relative paths stay as written."""
    home = os.path.expanduser("~")
    bases = [b.resolve() for b in (recipe_dir, Path.cwd()) if b is not None]

    def short(text: str) -> str:
        p = Path(os.path.expanduser(text))
        for base in bases:
            if p == base or base in p.parents:
                return p.relative_to(base).as_posix() or "."
        return p.name or text

    def clean(x: object) -> object:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, str):
            if x.startswith(("/", "~")) and "\n" not in x:
                return short(x)
            if home not in ("", "/") and home in x:
                return x.replace(home, "~")
        return x

    return clean(record)  # type: ignore[return-value]


def dtype_name(code: str) -> str:
    return str(DTYPES[code]).removeprefix("torch.")


def inputs_record(plan: Plan, hashes: dict[str, str]) -> dict:
    record = {}
    for alias, src in plan.sources.items():
        files = {}
        for shard, header in src.headers.items():
            files[shard] = {"size": header.path.stat().st_size, "sha256": src.sha256.get(shard) or hashes.get(str(header.path))}
        record[alias] = {"source": src.spec, "kind": src.kind, "repo_id": src.repo_id, "revision": src.revision, "files": files}
        if src.renames:  # read under the config model's names: {"from": its prefix, "to": the config model's}
            record[alias]["renamed"] = [{"from": b, "to": a} for a, b in src.renames]
    return record


def write_record(plan: Plan, tmp: Path, stats: dict[str, TensorStats], hashes: dict[str, str], dev: str, seconds: float,
                 state: RunState) -> dict:
    """Everything after the shards: config and index into `tmp`; returns the weightx.json content."""
    r = plan.recipe
    out_dtypes = {t.out_dtype for t in plan.tensors if t.edit}
    cfg_dtype = dtype_name(next(iter(out_dtypes))) if len(out_dtypes) == 1 else None
    lora = r.output.format == "lora"  # a PEFT folder: no model config or index (transformers would take it for a model)
    if plan.config_source.has_config and not lora:
        copy_config(plan.config_source.root, tmp, cfg_dtype, ("quantization_config",) if plan.config_source.fp8 or plan.config_source.mxfp4 else ())
    aligned = [t for t in plan.tensors if t.rows is not None]
    if plan.vocab is not None and plan.config_source.has_config and not lora and aligned:
        write_tokenizer(plan.vocab, plan.sources, r, tmp, aligned[0].shape[0])
    if not lora:
        weight_map = {o.name: s.filename for s in plan.shards for t in s.tensors for o in t.outs}
        write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(weight_map.items()))})
    recipe_form = r.recipe_form()
    recipe_form.setdefault("output", {})["path"] = str(plan.out_path)
    doc = {
        "weightx_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "complete",
        "recipe": recipe_form,
        "inputs": inputs_record(plan, hashes),
        "output": {
            "format": r.output.format,
            "dtype": cfg_dtype or sorted(dtype_name(c) for c in out_dtypes),
            "total_size": plan.total_size if not lora else sum((tmp / s.filename).stat().st_size for s in plan.shards),
            "shards": [{"file": s.filename, "size": (tmp / s.filename).stat().st_size, "tensors": len(s.tensors)} for s in plan.shards],
            "tensor_count": len(plan.tensors),
            "parameter_count": plan.parameter_count,
        },
        "device": dev,
        "seconds": round(seconds, 3),
        "tensors": {k: v.as_dict() for k, v in sorted(stats.items())},
    }
    if plan.vocab is not None:
        v = plan.vocab
        doc["tokenizer"] = {"source": v.source, "tokens": len(v.tokens), "added": list(v.added[:100]),
                            "rows": {t.name: t.shape[0] for t in aligned}}
    verify_bases(plan, hashes)
    if r.output.format == "delta":
        doc["delta"] = delta_record(plan, doc["inputs"], stats, state)
    doc.update(state.record_sections())  # "distill", "ternary_global"
    return portable(doc, plan.recipe_dir)


def delta_record(plan: Plan, inputs: dict, stats: dict[str, TensorStats], state: RunState) -> dict:
    """`weightx.json["delta"]`: what a reader needs to decode, and the base it must be applied to."""
    r = plan.recipe
    base = dict(inputs.get(r.base) or {})
    base["alias"] = r.base
    tensors = {}
    for t in plan.tensors:
        st = stats.get(t.name)
        if t.codec is not None:
            params = t.codec.codec_params(t.shape, state.entry(t.codec, t.name))
            if t.transposed:  # parts encode the transpose: a reader transposes back after decoding
                params["transposed"] = True
        elif t.parts is not None and st is not None and st.extra.get("codec") == "sparse":
            params = {}  # codec, k and positions are in the stats (the run counted them)
        else:
            continue
        entry = {**params, "shape": list(t.shape), "dtype": t.out_dtype}
        if st is not None:
            entry.update(st.extra)
        tensors[t.name] = entry
    return {"encoding": ENCODING, "version": VERSION, "model": r.deltas[0].model if len(r.deltas) == 1 else None, "base": base,
            "sizes": compression_summary(plan), "tensors": tensors}


def verify_bases(plan: Plan, hashes: dict[str, str]) -> None:
    """After the run's hashing: refuse (InputError, one line) a base that differs from an artifact's."""
    for i, d in enumerate(plan.recipe.deltas):
        art = plan.sources[d.model].artifact
        if art is not None:
            against = plan.recipe.delta_base(i)
            why = base_mismatch(d.model, art, against, plan.sources[against], hashes)
            if why:
                raise InputError(why)
