"""`weightx diff BASE A [B ...]`: what the deltas A − BASE, B − BASE … look like, before editing them.

Streams every floating tensor the inputs share in blocks (memory: a few blocks, whatever the model
size) and reports, per tensor, per layer and for the whole model: ‖δ‖, ‖δ‖/‖θ_base‖, max |δ|, the
share of exact zeros, the share with |δ| > 0.005 (DARE's rule of thumb: deltas below it survive
drop-and-rescale), and for each pair of deltas their cosine and sign agreement (of the entries where
both are non-zero). `--rank` adds each matrix's effective rank at 90 % of Σ s² (an SVD per
matrix). A delta artifact is read as its decoded delta. No output is written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightx.errors import InputError, UsageError
from weightx.io.sources import Source, resolve
from weightx.io.names import matched_names
from weightx.io.quantized import dequantized_sources
from weightx.pipeline.compute import Inputs
from weightx.pipeline.plan import human_bytes, natural_key

DARE_SAFE = 0.005  # the DARE paper's observation: SFT deltas are mostly within ±0.005
BLOCK = 1 << 20
LAYER = re.compile(r"\.(?:layers|h|blocks|layer|block)\.(\d+)\.")


def layer_of(name: str) -> str:
    m = LAYER.search(name)
    return m.group(1) if m else "other"


@dataclass
class Sums:
    """Additive statistics of one tensor, layer or model (per delta, and per pair of deltas)."""

    n: int = 0
    base_sq: float = 0.0
    sq: list[float] = field(default_factory=list)
    max_abs: list[float] = field(default_factory=list)
    zeros: list[int] = field(default_factory=list)
    large: list[int] = field(default_factory=list)
    dot: dict[tuple[int, int], float] = field(default_factory=dict)
    agree: dict[tuple[int, int], int] = field(default_factory=dict)
    both: dict[tuple[int, int], int] = field(default_factory=dict)

    @classmethod
    def empty(cls, m: int) -> Sums:
        pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
        return cls(0, 0.0, [0.0] * m, [0.0] * m, [0] * m, [0] * m, dict.fromkeys(pairs, 0.0), dict.fromkeys(pairs, 0), dict.fromkeys(pairs, 0))

    def add(self, other: Sums) -> None:
        self.n += other.n
        self.base_sq += other.base_sq
        for i in range(len(self.sq)):
            self.sq[i] += other.sq[i]
            self.max_abs[i] = max(self.max_abs[i], other.max_abs[i])
            self.zeros[i] += other.zeros[i]
            self.large[i] += other.large[i]
        for k in self.dot:
            self.dot[k] += other.dot[k]
            self.agree[k] += other.agree[k]
            self.both[k] += other.both[k]

    def report(self, labels: list[str]) -> dict:
        base = math.sqrt(self.base_sq)
        out: dict = {"elements": self.n, "base_norm": base, "deltas": {}}
        for i, a in enumerate(labels):
            norm = math.sqrt(self.sq[i])
            out["deltas"][a] = {"norm": norm, "relative_norm": norm / base if base else None, "max_abs": self.max_abs[i],
                                "zero_share": self.zeros[i] / self.n if self.n else None,
                                "above_0.005_share": self.large[i] / self.n if self.n else None}
        if self.dot:
            out["pairs"] = {}
            for (i, j), dot in self.dot.items():
                den = math.sqrt(self.sq[i] * self.sq[j])
                out["pairs"][f"{labels[i]}|{labels[j]}"] = {
                    "cosine": dot / den if den else None,
                    "sign_agreement": self.agree[(i, j)] / self.both[(i, j)] if self.both[(i, j)] else None}
        return out


def block_sums(base: torch.Tensor, deltas: list[torch.Tensor]) -> Sums:
    s = Sums.empty(len(deltas))
    s.n = base.numel()
    s.base_sq = float(torch.dot(base, base))
    signs = []
    for i, d in enumerate(deltas):
        s.sq[i] = float(torch.dot(d, d))
        a = d.abs()
        s.max_abs[i] = float(a.max()) if d.numel() else 0.0
        s.zeros[i] = int((d == 0).sum())
        s.large[i] = int((a > DARE_SAFE).sum())
        signs.append(torch.sign(d))
    for (i, j) in s.dot:
        s.dot[(i, j)] = float(torch.dot(deltas[i], deltas[j]))
        prod = signs[i] * signs[j]
        s.agree[(i, j)] = int((prod > 0).sum())
        s.both[(i, j)] = int((prod != 0).sum())
    return s


def effective_rank(d: torch.Tensor, energy: float = 0.9) -> int:
    s2 = torch.linalg.svdvals(d).to(torch.float64) ** 2
    total = float(s2.sum())
    if total == 0.0:
        return 0
    return int(torch.searchsorted(torch.cumsum(s2, 0) / total, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1


def _load(inputs: Inputs, src: Source, name: str, start: int, count: int) -> torch.Tensor:
    return inputs.read(src, name, start, count, torch.device("cpu"))


def diff(paths: list[str], *, rank: bool = False, progress=None) -> dict:
    """Statistics of the deltas paths[1:] − paths[0] (see the module docstring), as data."""
    if len(paths) < 2:
        raise UsageError("weightx diff needs a base and at least one model: weightx diff BASE MODEL [MODEL ...]")
    resolved = {f"input{i}": resolve(f"input{i}", p) for i, p in enumerate(paths)}
    problems = dequantized_sources(resolved, [])  # FP8 / MXFP4 read dequantized, other quantizations refused
    if problems:
        raise InputError(problems[0])
    base = resolved["input0"]
    if base.artifact is not None:
        raise InputError(f"{paths[0]} is a weightx delta artifact; give the model it was made against as the base")
    for alias, src in list(resolved.items())[1:]:  # the same tensors under another prefix: read under the base's names
        found = matched_names(src, set(base.weight_map)) if src.artifact is None else None
        if found is not None:
            resolved[alias] = found[0]
    sources = list(resolved.values())
    models = sources[1:]
    labels = [Path(p).name or p for p in paths[1:]]
    labels = [f"{lab}#{i + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    names, skipped = [], []
    for name in sorted(base.weight_map, key=natural_key):
        info = base.info(name)
        if not info.is_float:
            continue
        if all(name in m.weight_map and m.info(name).shape == info.shape for m in models):
            names.append(name)
        else:
            skipped.append(name)
    if not names:
        raise InputError(f"{paths[0]} and the models share no floating tensor of the same name and shape; are these related checkpoints?")
    inputs = Inputs()
    tensors, layers, total = {}, {}, Sums.empty(len(models))
    try:
        for k, name in enumerate(names):
            n = base.info(name).numel
            sums = Sums.empty(len(models))
            for start in range(0, n, BLOCK):
                count = min(BLOCK, n - start)
                b = _load(inputs, base, name, start, count)
                ds = []
                for m in models:
                    if m.artifact is not None and m.artifact.is_sparse(name):
                        ds.append(m.artifact.sparse_delta(name, start, count, b))
                    elif m.artifact is not None and m.artifact.is_compressed(name):
                        ds.append(m.artifact.decoded(name, start, count, torch.device("cpu")))
                    else:
                        ds.append(_load(inputs, m, name, start, count).sub_(b))
                sums.add(block_sums(b, ds))
            entry = sums.report(labels)
            shape = base.info(name).shape
            if rank and len(shape) == 2:
                for i, m in enumerate(models):
                    d = (m.artifact.decode(name, base=_load(inputs, base, name, 0, n)) if m.artifact is not None and m.artifact.is_compressed(name)
                         else _load(inputs, m, name, 0, n).sub_(_load(inputs, base, name, 0, n)))
                    entry["deltas"][labels[i]]["effective_rank_90"] = effective_rank(d.view(shape))
                    entry["deltas"][labels[i]]["full_rank"] = min(shape)
            tensors[name] = entry
            layers.setdefault(layer_of(name), Sums.empty(len(models))).add(sums)
            total.add(sums)
            if progress is not None:
                progress(k + 1, len(names))
    finally:
        inputs.close()
    order = sorted(layers, key=lambda x: (x == "other", int(x) if x.isdigit() else 0))
    return {"base": paths[0], "models": dict(zip(labels, paths[1:])), "dare_safe_threshold": DARE_SAFE,
            "total": total.report(labels), "layers": {k: layers[k].report(labels) for k in order}, "tensors": tensors,
            "skipped": skipped, "bytes_read": sum(s.total_bytes for s in sources)}


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def render(doc: dict, per_tensor: bool = False) -> str:
    labels = list(doc["models"])
    pairs = list(doc["total"].get("pairs", {}))
    head = ["", "delta", "‖δ‖", "‖δ‖/‖θ‖", "max|δ|", "zeros", ">0.005"]
    rows = []

    def add(key: str, rep: dict) -> None:
        for i, lab in enumerate(labels):
            d = rep["deltas"][lab]
            row = [key if i == 0 else "", lab, _fmt(d["norm"]), _fmt(d["relative_norm"]), _fmt(d["max_abs"]),
                   _fmt(d["zero_share"], True), _fmt(d["above_0.005_share"], True)]
            if "effective_rank_90" in d:
                row.append(f"rank90 {d['effective_rank_90']}/{d['full_rank']}")
            rows.append(row)
        for p in pairs:
            q = rep["pairs"][p]
            rows.append(["", p.replace("|", " ~ "), f"cos {_fmt(q['cosine'])}", f"signs {_fmt(q['sign_agreement'], True)}", "", "", ""])

    for key, rep in (doc["tensors"] if per_tensor else doc["layers"]).items():
        add(key if per_tensor else f"layer {key}", rep)
    add("model", doc["total"])
    widths = [max(len(str(r[c])) for r in rows + [head]) for c in range(len(head))]
    lines = [f"deltas against {doc['base']} ({human_bytes(doc['bytes_read'])} read)"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + ("  " + "  ".join(r[len(head):]) if len(r) > len(head) else ""))
    if doc["skipped"]:
        lines.append(f"note: {len(doc['skipped'])} tensor(s) of the base are missing or shaped differently in a model and were"
                     f" skipped (e.g. {doc['skipped'][0]})")
    return "\n".join(r.rstrip() for r in lines)


def plot(doc: dict, path: Path) -> None:
    """Per-layer bars of ‖δ‖/‖θ‖ for each delta (and the pairs' cosine, when there are pairs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (or pip install weightx[plot])") from None
    keys = list(doc["layers"])
    labels = list(doc["models"])
    pairs = list(doc["total"].get("pairs", {}))
    fig, axes = plt.subplots(2 if pairs else 1, 1, figsize=(max(6, 0.35 * len(keys) + 2), 6 if pairs else 3.5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(labels), 1)
    for i, lab in enumerate(labels):
        ys = [doc["layers"][k]["deltas"][lab]["relative_norm"] or 0.0 for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], ys, width, label=lab)
    ax.set_ylabel("‖δ‖ / ‖θ_base‖")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], keys, fontsize=7)
    ax.legend(fontsize=7)
    ax.set_title(f"deltas against {Path(doc['base']).name}")
    if pairs:
        ax2 = axes[1][0]
        width = 0.8 / len(pairs)
        for i, p in enumerate(pairs):
            ys = [doc["layers"][k]["pairs"][p]["cosine"] or 0.0 for k in keys]
            ax2.bar([x + i * width for x in range(len(keys))], ys, width, label=p.replace("|", " ~ "))
        ax2.set_ylabel("cosine")
        ax2.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], keys, fontsize=7)
        ax2.legend(fontsize=7)
    ax.set_xlabel("layer")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise UsageError(f"--plot {path}: cannot write it ({e.strerror or e}); choose a writable path") from None
    finally:
        plt.close(fig)


__all__ = ["diff", "render", "plot", "effective_rank", "block_sums", "DARE_SAFE"]
