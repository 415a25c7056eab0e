"""`weightx inspect`: what a checkpoint holds, and how a weightx output was made."""

from __future__ import annotations

import json
from collections import Counter

from weightx.plan import human_bytes, natural_key
from weightx.sources import resolve


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
        from weightx.delta_artifact import describe_artifact

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
        from weightx.delta_artifact import render_artifact

        lines += render_artifact(doc["delta"])
    if show_tensors:
        lines.append("  tensors:")
        lines += [f"    {t['name']}  {t['dtype']}  {t['shape']}" for t in doc["tensors"]]
    return "\n".join(lines)
