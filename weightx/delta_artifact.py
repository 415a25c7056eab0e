"""Delta artifacts (`output.format: delta`): plan them, write them, read them back.

An artifact is sharded safetensors plus `weightx.json`. Per compressed tensor `W`: `W.packed`
(uint8 bit-planes, LSB first along the last dimension), `W.scale` (float32), `W.mask` (ternary
positions); every other tensor is stored whole, as the value the dense output would have (the
fine-tuned tensor when no other edit touches it). `weightx.json["delta"]` records the encoding and
its version, each compressed tensor's codec parameters, shape and dtype, and the base (alias,
source, revision, shard sizes and sha256).

Reading: `sources.resolve` sees the record and attaches an `ArtifactReader`; the source then lists
the logical tensors (W with its real shape and dtype, not its parts). The engine takes a compressed
tensor's delta straight from `decoded()`, never as (base + δ̂) − base, so a reconstruction equals
the `format: dense` output of the compressing recipe bit for bit. Whole tensors go the usual way
(stored − base, then + base), which returns the stored value exactly for bf16/fp16 outputs.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from weightx.edits.base import EditConfig, TensorContext
from weightx.errors import InputError
from weightx.safetensors_io import DTYPES, MappedFile, OutTensor, TensorInfo, itemsize

if TYPE_CHECKING:
    from pathlib import Path

    from weightx.engine import TensorComputer, TensorStats
    from weightx.plan import Plan, TensorPlan
    from weightx.recipe import Recipe
    from weightx.sources import Source

ENCODING = "weightx-delta"
VERSION = 1
SUFFIXES = ("packed", "mask", "scale")
CACHED_TENSORS = 3  # decoded tensors an artifact reader keeps while the engine's blocks are in flight
BF16_BYTES = 2


def is_compressing(edit: EditConfig) -> bool:
    return bool(getattr(edit, "compresses", False))


def _decoders() -> dict[str, Callable[..., torch.Tensor]]:
    from weightx.edits import bitdelta, ternary

    return {"bitdelta": bitdelta.decode_parts, "ternary": ternary.decode_parts}


# ---------------------------------------------------------------------------------- planning


def _base_record_of(src: Source) -> str:
    if src.repo_id:
        return f"{src.repo_id}@{src.revision}" if src.revision else src.repo_id
    return src.spec


def base_mismatch(artifact_alias: str, artifact: ArtifactReader, base_alias: str, base: Source,
                  hashes: dict[str, str] | None = None) -> str | None:
    """Why `base` is not the model the artifact was made against, in one line; None if it may be.

    Compares shard names and sizes, then sha256 where known: Hub blob names, the local hash cache,
    or `hashes` ({path: sha256}, from the run's hasher).
    """
    rec = artifact.base
    made = rec.get("repo_id") or rec.get("source") or "?"
    if rec.get("revision"):
        made += f"@{str(rec['revision'])[:12]}"
    head = (f"base '{base_alias}' ({base.describe()}) is not the model delta artifact '{artifact_alias}' was made"
            f" against ({made})")
    fix = f"; set models.{base_alias} to that exact base"
    files = rec.get("files") or {}
    if sorted(files) != sorted(base.headers):
        return f"{head}: its shards are {', '.join(sorted(base.headers))[:200]}, the artifact records {', '.join(sorted(files))[:200]}{fix}"
    for shard, info in sorted(files.items()):
        path = base.headers[shard].path
        size = path.stat().st_size
        if info.get("size") is not None and int(info["size"]) != size:
            return f"{head}: {shard} is {size:,} bytes, the artifact records {int(info['size']):,}{fix}"
        want = info.get("sha256")
        have = base.sha256.get(shard) or (hashes or {}).get(str(path)) or _cached_sha256(path)
        if want and have and want != have:
            return f"{head}: {shard} has sha256 {have[:12]}…, the artifact records {want[:12]}…{fix}"
    return None


def _cached_sha256(path: Path) -> str | None:
    # The run's hasher caches by (path, size, mtime); a base hashed before costs nothing to check.
    try:
        from weightx.provenance import _key, _load_cache

        return _load_cache().get(_key(path))
    except (ImportError, OSError):
        return None


def plan_compression(recipe: Recipe, sources: dict[str, Source], tensors: list[TensorPlan],
                     recipe_dir: Path | None) -> tuple[list[str], list[str]]:
    """Check compressing edits, artifact inputs and `format: delta`; give compressed tensors their parts.

    Returns (problems, notes). A base that is certainly not an artifact's base raises InputError at
    once (one line). Mutates `tensors` (codec and parts) when the output format is delta.
    """
    problems: list[str] = []
    notes: list[str] = []
    delta_aliases = [d.model for d in recipe.deltas]
    for alias, src in sources.items():
        art = src.artifact
        if art is None:
            continue
        if alias == recipe.base:
            problems.append(f"'{alias}' is a weightx delta artifact, which cannot be a base; use the model it was made"
                            f" against as base and list '{alias}' under deltas to reconstruct it")
        elif alias in delta_aliases:
            why = base_mismatch(alias, art, recipe.base, sources[recipe.base])
            if why:
                raise InputError(why)
            counts: dict[str, int] = {}
            for e in art.codecs.values():
                counts[e["codec"]] = counts.get(e["codec"], 0) + 1
            what = ", ".join(f"{op} on {n} tensors" for op, n in counts.items()) or "no compressed tensors"
            notes.append(f"'{alias}' is a weightx delta artifact ({what}); base '{recipe.base}' must be the model it"
                         " was made against: shard names and sizes match, sha256 is compared as the run hashes it")

    edits = [e for d in recipe.deltas for e in d.edits]
    compressing = [e for e in edits if is_compressing(e)]
    if any(getattr(e, "scope", None) == "global" for e in compressing):
        from weightx.global_ternary import plan_problems

        problems += plan_problems(recipe, tensors)
        notes.append("ternary scope: global sizes are estimates until its statistics pass (two extra reads"
                     " of the selected tensors) has run; the total compressed size changes little")
    distilled = [e for e in compressing if getattr(e, "distill", None) is not None]
    if distilled:
        from weightx.distill import plan_distill

        problems += plan_distill(recipe, sources, tensors, distilled, recipe_dir)

    if recipe.output.format != "delta":
        return problems, notes
    if not compressing:
        return problems + ["output.format: delta needs a compressing edit (bitdelta or ternary) in deltas.0.edits;"
                           " or use format: dense"], notes
    if len(recipe.deltas) != 1:
        problems.append(f"output.format: delta stores one compressed delta, but the recipe has {len(recipe.deltas)};"
                        " merge with format: dense, or compress each model in its own recipe")
    elif recipe.deltas[0].weight != 1.0:
        problems.append(f"output.format: delta stores the delta itself; deltas.0.weight is {recipe.deltas[0].weight:g}:"
                        f" use weight 1 and put `- scale: {{factor: {recipe.deltas[0].weight:g}}}` before the compressing edit")
    if recipe.combine.op not in ("sum", "mean"):
        problems.append(f"output.format: delta stores one delta; combine '{recipe.combine.op}' does not apply (use sum)")
    if problems:
        return problems, notes

    names = {t.name for t in tensors}
    misplaced: dict[str, list[str]] = {}
    for t in tensors:
        if not t.edit:
            continue
        applied = t.edits[0]
        where = [i for i, e in enumerate(applied) if is_compressing(e)]
        if not where:
            continue
        if where != [len(applied) - 1]:
            misplaced.setdefault(applied[where[0]].op, []).append(t.name)
            continue
        codec = applied[-1]
        t.codec = codec
        t.parts = [OutTensor(f"{t.name}.{sfx}", dt, shape) for sfx, (dt, shape) in codec.part_specs(t.shape, t.name).items()]
        clash = [p.name for p in t.parts if p.name in names]
        if clash:
            problems.append(f"tensor {clash[0]!r} exists in the model and would collide with a part of compressed {t.name!r}")
    for op, where in misplaced.items():
        problems.append(f"{op} must be the last edit applied to a tensor (it quantises the delta), but not for"
                        f" {len(where)} tensor(s), e.g. {where[0]}; move it to the end of deltas.0.edits")
    if not problems and not any(t.codec is not None for t in tensors):
        ops = ", ".join(sorted({e.op for e in compressing}))
        problems.append(f"{ops} matches no tensor of the model, so nothing would be compressed; check its include patterns")
    return problems, notes


def _human(n: float) -> str:
    from weightx.plan import human_bytes

    return human_bytes(n)


def compression_summary(plan: Plan) -> dict:
    """Sizes from the plan alone: compressed tensors against their bf16 delta, and the whole artifact."""
    comp = [t for t in plan.tensors if t.codec is not None]
    comp_params = sum(t.numel for t in comp)
    comp_bytes = sum(o.nbytes for t in comp for o in t.parts)
    whole_bytes = sum(o.nbytes for t in plan.tensors if t.codec is None for o in t.outs)
    dense_bf16 = plan.parameter_count * BF16_BYTES
    by_op: dict[str, int] = {}
    for t in comp:
        by_op[t.codec.op] = by_op.get(t.codec.op, 0) + 1
    return {
        "compressed_tensors": len(comp),
        "compressed_parameters": comp_params,
        "compressed_bytes": comp_bytes,
        "compressed_bf16_delta_bytes": comp_params * BF16_BYTES,
        "compressed_ratio": (comp_params * BF16_BYTES / comp_bytes) if comp_bytes else None,
        "whole_tensors": len(plan.tensors) - len(comp),
        "whole_bytes": whole_bytes,
        "artifact_bytes": comp_bytes + whole_bytes,
        "dense_bf16_delta_bytes": dense_bf16,
        "ratio": dense_bf16 / (comp_bytes + whole_bytes) if comp_bytes + whole_bytes else None,
        "ops": by_op,
    }


def render_compression(plan: Plan) -> list[str]:
    if plan.recipe.output.format != "delta":
        return []
    s = compression_summary(plan)
    ops = ", ".join(f"{op} on {n}" for op, n in s["ops"].items())
    return [
        f"compressed: {ops} tensor(s), {s['compressed_parameters']:,} parameters -> {_human(s['compressed_bytes'])}"
        f" = 1/{s['compressed_ratio']:.2f} of their bf16 delta ({_human(s['compressed_bf16_delta_bytes'])})",
        f"stored whole: {s['whole_tensors']} tensor(s), {_human(s['whole_bytes'])}"
        f" (the fine-tuned values: embeddings, lm_head, norms unless included)",
        f"artifact: {_human(s['artifact_bytes'])} = 1/{s['ratio']:.2f} of the model's dense bf16 delta"
        f" ({_human(s['dense_bf16_delta_bytes'])})",
    ]


# ---------------------------------------------------------------------------------- writing


def compressed_parts(computer: TensorComputer, t: TensorPlan, stats: TensorStats | None) -> Iterator[torch.Tensor]:
    """The parts of one compressed tensor, in `t.parts` order, on the CPU (for the shard writer)."""
    plan = computer.plan
    (spec, src), = plan.deltas
    n = t.numel
    ctx = TensorContext(t.name, t.shape, 0)
    base = computer._load(plan.base, t, 0, n)
    d = computer._delta(src, t, 0, n, base).view(t.shape)
    del base
    before = float(torch.linalg.vector_norm(d)) if stats is not None else 0.0
    for e in t.edits[0][:-1]:
        d = e.apply(d, ctx)
    parts = t.codec.encode(d, ctx)
    if stats is not None:
        target = float(torch.linalg.vector_norm(d))
        if "_dot" in parts and "_sq" in parts:  # the codec's closed form: no decode needed
            dot, sq = float(parts["_dot"]), float(parts["_sq"])
        else:
            approx = t.codec.decode(parts, t.shape, t.name).to(d.device)
            dot, sq = float(torch.dot(approx.reshape(-1), d.reshape(-1))), float(torch.dot(approx.reshape(-1), approx.reshape(-1)))
            del approx
        err = max(target * target - 2 * dot + sq, 0.0) ** 0.5
        stats.delta_norm = {spec.model: before}
        stats.edited_norm = {spec.model: target}
        stats.combined_norm = sq ** 0.5
        info: dict[str, Any] = {"relative_error": err / target if target else 0.0}
        scale = parts["scale"]
        if scale.numel() <= 16:
            info["scale"] = [float(x) for x in scale.reshape(-1)]
        stats.extra.update(info)
    del d
    for out in t.parts:
        x = parts[out.name.rsplit(".", 1)[1]]
        if x.dtype != DTYPES[out.dtype] or tuple(x.shape) != tuple(out.shape):
            raise RuntimeError(f"{t.codec.op} produced {out.name} as {x.dtype}{list(x.shape)}, planned {out.dtype}{list(out.shape)}")
        yield x.contiguous().cpu()


def delta_record(plan: Plan, inputs: dict, stats: dict[str, TensorStats]) -> dict:
    """`weightx.json["delta"]`: what a reader needs to decode, and the base it must be applied to."""
    r = plan.recipe
    base = dict(inputs.get(r.base) or {})
    base["alias"] = r.base
    tensors = {}
    for t in plan.tensors:
        if t.codec is None:
            continue
        entry = {**t.codec.codec_params(t.shape, t.name), "shape": list(t.shape), "dtype": t.out_dtype}
        st = stats.get(t.name)
        if st is not None:
            entry.update(st.extra)
        tensors[t.name] = entry
    return {"encoding": ENCODING, "version": VERSION, "model": r.deltas[0].model, "base": base,
            "sizes": compression_summary(plan), "tensors": tensors}


# ---------------------------------------------------------------------------------- reading


class ArtifactReader:
    """Decodes the compressed tensors of a delta artifact folder (parts are mmap'd, zero-copy)."""

    def __init__(self, src: Source, meta: dict):
        delta = meta.get("delta")
        where = src.root / "weightx.json"
        if not isinstance(delta, dict) or delta.get("encoding") != ENCODING:
            raise InputError(f"{where}: output.format is delta but there is no '{ENCODING}' record; the artifact is damaged or from another tool")
        if not isinstance(delta.get("version"), int) or delta["version"] > VERSION:
            raise InputError(f"{where}: delta encoding version {delta.get('version')!r} is newer than this weightx reads ({VERSION}); upgrade weightx")
        self.root = src.root
        self.base: dict = delta.get("base") or {}
        self.model: str | None = delta.get("model")
        self.codecs: dict[str, dict] = {}
        self.raw_map = dict(src.weight_map)
        self.headers = src.headers
        decoders = _decoders()
        for name, entry in (delta.get("tensors") or {}).items():
            if not isinstance(entry, dict) or entry.get("codec") not in decoders:
                raise InputError(f"{where}: tensor {name!r} has unknown codec {entry.get('codec') if isinstance(entry, dict) else entry!r}; upgrade weightx")
            if entry.get("dtype") not in DTYPES or not isinstance(entry.get("shape"), list):
                raise InputError(f"{where}: tensor {name!r} has no valid shape/dtype record; the artifact is damaged")
            for sfx in ("packed", "scale"):
                if f"{name}.{sfx}" not in self.raw_map:
                    raise InputError(f"{src.root}: compressed tensor {name!r} lacks its {sfx} part; the artifact is incomplete, re-download it")
            self.codecs[name] = entry
        self.virtual = {
            name: TensorInfo(name, e["dtype"], tuple(e["shape"]), 0, math.prod(e["shape"]) * itemsize(e["dtype"]))
            for name, e in self.codecs.items()
        }
        self._maps: dict[str, MappedFile] = {}
        self._lock = threading.Lock()
        self._maps_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def is_compressed(self, name: str) -> bool:
        return name in self.codecs

    def logical_weight_map(self) -> dict[str, str]:
        parts = {f"{n}.{s}" for n in self.codecs for s in SUFFIXES}
        wm = {n: s for n, s in self.raw_map.items() if n not in parts}
        wm.update({n: self.raw_map[f"{n}.packed"] for n in self.codecs})
        return wm

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        with self._maps_lock:
            return self._parts(name)

    def _parts(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for sfx in SUFFIXES:
            key = f"{name}.{sfx}"
            shard = self.raw_map.get(key)
            if shard is None:
                continue
            mf = self._maps.get(shard)
            if mf is None:
                mf = self._maps[shard] = MappedFile(self.headers[shard])
            out[sfx] = mf.tensor(key).view(self.headers[shard].tensors[key].shape)
        return out

    def decode(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense float32 delta of one compressed tensor."""
        entry = self.codecs[name]
        params = {k: v for k, v in entry.items() if k not in ("codec", "shape", "dtype")}
        parts = {k: v.to(device) for k, v in self.parts(name).items()}
        return _decoders()[entry["codec"]](parts, tuple(entry["shape"]), **params)

    def decoded(self, name: str, start: int, count: int, device: torch.device) -> torch.Tensor:
        """Elements [start, start+count) of the flat decoded delta: a fresh float32 tensor on `device`.

        The engine computes blocks of a few tensors at once on a thread pool: each tensor is decoded
        once (under a lock) and the last few stay cached while their blocks are taken.
        """
        key = (name, str(device))
        with self._lock:
            full = self._cache.get(key)
            if full is None:
                full = self._cache[key] = self.decode(name, device).reshape(-1)
                while len(self._cache) > CACHED_TENSORS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return full[start:start + count].clone()

    def release(self) -> None:
        with self._lock:
            self._cache.clear()


def attach_artifact(src: Source) -> None:
    """Make a delta artifact folder's Source list logical tensors and carry its reader."""
    reader = ArtifactReader(src, src.weightx_meta or {})
    src.weight_map = reader.logical_weight_map()
    src.artifact = reader


def is_artifact_meta(meta: dict | None) -> bool:
    return isinstance(meta, dict) and (meta.get("output") or {}).get("format") == "delta"


def finish_record(plan: Plan, doc: dict, stats: dict[str, TensorStats], hashes: dict[str, str]) -> None:
    """Complete an output's weightx.json record: refuse a wrong artifact base now that hashes are
    known, add the delta encoding record (format: delta) and the distillation record."""
    verify_bases(plan, hashes)
    if plan.recipe.output.format == "delta":
        doc["delta"] = delta_record(plan, doc["inputs"], stats)
    runs = [e._distill_record for d in plan.recipe.deltas for e in d.edits if getattr(e, "_distill_record", None)]
    if runs:
        doc["distill"] = runs[0] if len(runs) == 1 else runs
    stats_runs = [e._global_record for d in plan.recipe.deltas for e in d.edits if getattr(e, "_global_record", None)]
    if stats_runs:
        doc["ternary_global"] = stats_runs[0] if len(stats_runs) == 1 else stats_runs


def verify_bases(plan: Plan, hashes: dict[str, str]) -> None:
    """After the run's hashing: refuse (InputError, one line) a base that differs from an artifact's."""
    base = plan.sources[plan.recipe.base]
    for d in plan.recipe.deltas:
        art = plan.sources[d.model].artifact
        if art is not None:
            why = base_mismatch(d.model, art, plan.recipe.base, base, hashes)
            if why:
                raise InputError(why)


# ---------------------------------------------------------------------------------- inspecting


def describe_artifact(src: Source) -> dict:
    """What `weightx inspect` shows for an artifact: encoding, base, sizes against bf16, scales."""
    art: ArtifactReader = src.artifact
    parts = {f"{n}.{s}" for n in art.codecs for s in SUFFIXES}
    part_bytes = sum(src.headers[art.raw_map[p]].tensors[p].nbytes for p in parts if p in art.raw_map)
    whole_bytes = sum(src.headers[s].tensors[n].nbytes for n, s in art.raw_map.items() if n not in parts)
    comp_params = sum(math.prod(e["shape"]) for e in art.codecs.values())
    params = sum(src.info(n).numel for n in src.weight_map)
    codecs: dict[str, int] = {}
    scales: dict[str, dict] = {}
    for name, entry in sorted(art.codecs.items()):
        codecs[entry["codec"]] = codecs.get(entry["codec"], 0) + 1
        s = art.parts(name)["scale"].to(torch.float32)
        flat = s.reshape(-1)
        row: dict = {"codec": entry["codec"], "shape": entry["shape"]}
        row.update({k: v for k, v in entry.items() if k in ("bits", "group", "k", "relative_error")})
        if flat.numel() <= 8:
            row["scale"] = [float(x) for x in flat]
        else:  # per-row scales: a summary per bit-plane
            row["scale_summary"] = [{"mean": float(p.mean()), "min": float(p.min()), "max": float(p.max()), "count": p.numel()}
                                    for p in s.reshape(s.shape[0], -1)]
        scales[name] = row
    base = art.base
    return {
        "encoding": ENCODING, "version": (src.weightx_meta or {}).get("delta", {}).get("version"),
        "model": art.model,
        "base": {k: base.get(k) for k in ("alias", "source", "kind", "repo_id", "revision")}
        | {"sha256": {f: (i or {}).get("sha256") for f, i in (base.get("files") or {}).items()}},
        "codecs": codecs,
        "compressed_tensors": len(art.codecs),
        "compressed_parameters": comp_params,
        "compressed_bytes": part_bytes,
        "compressed_bf16_delta_bytes": comp_params * BF16_BYTES,
        "compressed_ratio": comp_params * BF16_BYTES / part_bytes if part_bytes else None,
        "whole_bytes": whole_bytes,
        "artifact_bytes": part_bytes + whole_bytes,
        "dense_bf16_delta_bytes": params * BF16_BYTES,
        "ratio": params * BF16_BYTES / (part_bytes + whole_bytes) if part_bytes + whole_bytes else None,
        "distill": {k: (src.weightx_meta or {}).get("distill", {}).get(k) for k in ("loss_before", "loss_after", "steps")}
        if (src.weightx_meta or {}).get("distill") else None,
        "tensors": scales,
    }


def render_artifact(d: dict) -> list[str]:
    base = d["base"]
    where = base.get("repo_id") or base.get("source") or "?"
    if base.get("revision"):
        where += f"@{str(base['revision'])[:12]}"
    shas = ", ".join(f"{(h or '?')[:12]}" for h in (base.get("sha256") or {}).values())
    codecs = ", ".join(f"{op} ×{n}" for op, n in d["codecs"].items())
    lines = [
        f"  delta       {d['encoding']} v{d['version']}: {codecs}; base {where} (sha256 {shas})",
        f"  compressed  {d['compressed_tensors']} tensor(s), {d['compressed_parameters']:,} parameters in"
        f" {_human(d['compressed_bytes'])} = 1/{d['compressed_ratio']:.2f} of their dense bf16 delta"
        f" ({_human(d['compressed_bf16_delta_bytes'])})",
        f"  ratio       artifact tensors {_human(d['artifact_bytes'])} = 1/{d['ratio']:.2f} of the model's dense bf16"
        f" delta ({_human(d['dense_bf16_delta_bytes'])}); {_human(d['whole_bytes'])} of it stored whole",
    ]
    if d.get("distill"):
        x = d["distill"]
        lines.append(f"  distilled   {x['steps']} steps, logit MSE {x['loss_before']:.6g} -> {x['loss_after']:.6g}")
    lines.append("  scales:")
    width = max((len(n) for n in d["tensors"]), default=0)
    for name, row in d["tensors"].items():
        if "scale" in row:
            val = ", ".join(f"{v:.6g}" for v in row["scale"])
        else:
            val = "; ".join(f"rows mean {p['mean']:.6g} [{p['min']:.4g}, {p['max']:.4g}]" for p in row["scale_summary"])
        extra = f"  k={row['k']:,}" if "k" in row else (f"  {row.get('bits', 1)} bit(s)" if row.get("bits", 1) != 1 else "")
        err = f"  rel. error {row['relative_error']:.3f}" if row.get("relative_error") is not None else ""
        lines.append(f"    {name:<{width}}  {row['codec']:<8} {val}{extra}{err}")
    return lines
