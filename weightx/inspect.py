"""`weightx inspect`: what a checkpoint holds, and how a weightx output was made."""

from __future__ import annotations

import json
from collections import Counter

import math

import torch

from weightx.formats import ENCODING, SUFFIXES
from weightx.io.artifact import ArtifactReader
from weightx.io.sources import Source, resolve
from weightx.pipeline.compression import BF16_BYTES
from weightx.pipeline.plan import human_bytes, natural_key


def summarize(path: str) -> dict:
    src = resolve("input", path)
    infos = [src.info(n) for n in sorted(src.weight_map, key=natural_key)]
    dtypes = Counter(i.dtype for i in infos)
    doc = {
        "path": path,
        "kind": src.kind,
        "repo_id": src.repo_id,
        "revision": src.revision,
        "tensor_count": len(infos),
        "parameter_count": sum(i.numel for i in infos),
        "dtypes": dict(sorted(dtypes.items())),
        "size": src.total_bytes,
        "shards": sorted(src.headers),
        "tensors": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in infos],
    }
    meta = src.weightx_meta
    if meta:
        doc["weightx"] = {k: meta.get(k) for k in ("weightx_version", "created", "status", "inputs", "recipe", "output") if k in meta}
    if src.artifact is not None:
        doc["delta"] = describe_artifact(src)
    return doc


def inspect_source(path: str, *, show_tensors: bool = False, as_json: bool = False) -> str:
    doc = summarize(path)
    if as_json:
        if not show_tensors:
            doc.pop("tensors")
        return json.dumps(doc, indent=2)
    lines = [
        f"{path}  ({doc['kind']}{', ' + doc['repo_id'] + '@' + (doc['revision'] or '')[:12] if doc['repo_id'] else ''})",
        f"  tensors     {doc['tensor_count']:,}",
        f"  parameters  {doc['parameter_count']:,}",
        f"  dtypes      {', '.join(f'{k} ×{v}' for k, v in doc['dtypes'].items())}",
        f"  size        {human_bytes(doc['size'])} in {len(doc['shards'])} shard(s)",
    ]
    wx = doc.get("weightx")
    if wx:
        lines.append(f"  made by     weightx {wx.get('weightx_version')} on {wx.get('created')} ({wx.get('status')})")
        for alias, rec in (wx.get("inputs") or {}).items():
            rev = f"@{rec['revision'][:12]}" if rec.get("revision") else ""
            hashes = [f.get("sha256") or "?" for f in rec.get("files", {}).values()]
            lines.append(f"  input       {alias}: {rec.get('source')}{rev}  sha256 {', '.join(h[:12] for h in hashes)}")
        recipe = wx.get("recipe") or {}
        for d in recipe.get("deltas", []):
            edits = ", ".join(
                f"{op}({', '.join(f'{k}={v}' for k, v in (params or {}).items())})"
                for e in d.get("edits", []) for op, params in e.items()
            ) or "no edits"
            lines.append(f"  delta       {d.get('model')} − {recipe.get('base')} (weight {d.get('weight')}): {edits}")
    if doc.get("delta"):
        lines += render_artifact(doc["delta"])
    if show_tensors:
        lines.append("  tensors:")
        lines += [f"    {t['name']}  {t['dtype']}  {t['shape']}" for t in doc["tensors"]]
    return "\n".join(lines)


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
        if entry["codec"] == "sparse":  # changed positions and their values: no scale
            scales[name] = {"codec": "sparse", "shape": entry["shape"], "k": entry.get("k"), "positions": entry.get("positions")}
            continue
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
        f" {human_bytes(d['compressed_bytes'])} = 1/{d['compressed_ratio']:.2f} of their dense bf16 delta"
        f" ({human_bytes(d['compressed_bf16_delta_bytes'])})",
        f"  ratio       artifact tensors {human_bytes(d['artifact_bytes'])} = 1/{d['ratio']:.2f} of the model's dense bf16"
        f" delta ({human_bytes(d['dense_bf16_delta_bytes'])}); {human_bytes(d['whole_bytes'])} of it stored whole",
    ]
    if d.get("distill"):
        x = d["distill"]
        lines.append(f"  distilled   {x['steps']} steps, logit MSE {x['loss_before']:.6g} -> {x['loss_after']:.6g}")
    lines.append("  scales:")
    width = max((len(n) for n in d["tensors"]), default=0)
    for name, row in d["tensors"].items():
        if row["codec"] == "sparse":
            val = f"changed entries stored ({row['positions']} positions)"
        elif "scale" in row:
            val = ", ".join(f"{v:.6g}" for v in row["scale"])
        else:
            val = "; ".join(f"rows mean {p['mean']:.6g} [{p['min']:.4g}, {p['max']:.4g}]" for p in row["scale_summary"])
        extra = f"  k={row['k']:,}" if "k" in row else (f"  {row.get('bits', 1)} bit(s)" if row.get("bits", 1) != 1 else "")
        err = f"  rel. error {row['relative_error']:.3f}" if row.get("relative_error") is not None else ""
        lines.append(f"    {name:<{width}}  {row['codec']:<8} {val}{extra}{err}")
    return lines
