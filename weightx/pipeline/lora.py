"""`output.format: lora`: the recipe's result as a PEFT LoRA adapter, by truncated SVD of each delta.

Per 2-D weight of a linear layer, the combined delta δ = θ_out − base (float32, before any rounding)
is factored exactly (torch.linalg.svd, on the run's device) and cut to rank r: B = U_r·√S_r,
A = √S_r·V_rᴴ, so B·A is the best rank-r approximation (Eckart–Young) and its relative Frobenius
error is √(Σ_{i>r} s_i²) / √(Σ s_i²) (`svd_tail`); `relative_error` is that of the factors as stored,
rounded to the output dtype, both recorded per tensor. r is `rank`, or the smallest rank that keeps
`energy` of Σ s², capped by `max_rank`. `lora_alpha` equals each module's r, so PEFT's scaling
α/r is 1 and PeftModel adds exactly B·A.

Everything else with a non-zero delta (embeddings, lm_head, norms, other tensors) goes into
`modules_to_save` with its output value. Biases of LoRA-targeted layers have no place in an adapter:
they stay at the base's values; planning says how many there are, weightx.json their delta norms.

Ranks chosen by energy are known only after each SVD, so the factors are spooled to a scratch file
beside the output and the adapter file is written once they are all known: memory is one tensor's
SVD, whatever the model size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from weightx.errors import UsageError
from weightx.io.safetensors import DTYPES, OutTensor, ShardWriter, itemsize, write_spooled
from weightx.kernels.lowrank import randomized_svd, truncated_svd
from weightx.io.sources import Source
from weightx.pipeline.compute import Inputs, TensorComputer, TensorStats
from weightx.pipeline.distill import meta_model
from weightx.pipeline.plan import CONV1D_MODELS, VOCAB_NAMES, Plan, TensorPlan, human_bytes
from weightx.pipeline.state import RunState
from weightx.recipe.model import Recipe

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."  # PEFT's key prefix for a PeftModel's base model


EMBEDDINGS = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$")
RANDOMIZED_FROM = 1024  # svd: auto takes the randomized SVD for a fixed rank from this smaller side on


def is_target(t: TensorPlan, recipe: Recipe) -> bool:
    """A LoRA target: the 2-D weight of a linear layer; embeddings and lm_head with `embeddings: lora`."""
    if not (t.edit and len(t.shape) == 2 and t.name.endswith(".weight") and min(t.shape) > 0):
        return False
    return not VOCAB_NAMES.search(t.name) or recipe.output.embeddings == "lora"


def is_embedding(t: TensorPlan) -> bool:
    """An nn.Embedding weight [vocab, hidden]: PEFT factors its transpose (lora_embedding_A/B)."""
    return bool(EMBEDDINGS.search(t.name))


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def rank_cap(recipe: Recipe, shape: tuple[int, ...]) -> int:
    full = min(shape)
    cap = recipe.output.rank if recipe.output.rank is not None else (recipe.output.max_rank or full)
    return min(cap, full)


def factor_parts(t: TensorPlan, r: int) -> tuple[OutTensor, OutTensor]:
    m = module_of(t.name)
    if is_embedding(t):  # PEFT's Embedding LoRA: Δ = (B·A)ᵀ, A [r, vocab], B [hidden, r]
        vocab, hidden = t.shape
        return (OutTensor(f"{PREFIX}{m}.lora_embedding_A", t.out_dtype, (r, vocab)),
                OutTensor(f"{PREFIX}{m}.lora_embedding_B", t.out_dtype, (hidden, r)))
    out, inp = t.shape
    return OutTensor(f"{PREFIX}{m}.lora_A.weight", t.out_dtype, (r, inp)), OutTensor(f"{PREFIX}{m}.lora_B.weight", t.out_dtype, (out, r))


def plan_lora(recipe: Recipe, config_model_type: str | None, tensors: list[TensorPlan],
              cfg: Source | None = None) -> tuple[list[str], list[str], list[TensorPlan]]:
    """(problems, notes, tensors): each target planned with its factors at the largest rank it may
    take (the size `plan` prints is an upper bound when ranks follow energy). With `cfg` (the config
    model), the targets are checked against the modules transformers builds for it: PEFT attaches
    the adapter to those by name."""
    problems, notes = [], []
    if cfg is not None and cfg.has_config and config_model_type not in CONV1D_MODELS:
        model, why = meta_model(cfg)
        names = {n: type(m).__name__ for n, m in model.named_modules()} if model is not None else {}
        wanted = [module_of(t.name) for t in tensors if is_target(t, recipe)]
        off = [m for m in wanted if names.get(m) not in ("Linear", "Embedding")]
        if model is None:
            problems.append(f"output.format: lora: transformers cannot build '{recipe.config_from}' to check the adapter's"
                            f" modules ({why}); use format: dense or delta")
        elif off:
            problems.append(f"output.format: lora: {len(off)} of the {len(wanted)} matrices are not linear layers of the model"
                            f" transformers builds (e.g. {off[0]}: fused MoE experts or a moved language model), so PEFT could"
                            " not attach them; use format: dense or delta for this architecture")
    if config_model_type in CONV1D_MODELS:
        problems.append(f"output.format: lora: {config_model_type} stores its linear layers as Conv1D ([in, out]), which this"
                        " LoRA writer does not support; use format: dense or delta")
    out = []
    targets = 0
    for t in tensors:
        if is_target(t, recipe):
            targets += 1
            out.append(dataclasses.replace(t, parts=factor_parts(t, rank_cap(recipe, t.shape))))
        else:
            out.append(t)
    if not targets:
        problems.append("output.format: lora found no 2-D linear weight to factor; use format: dense or delta")
    factored = {module_of(u.name) for u in tensors if is_target(u, recipe)}
    biases = [t.name for t in tensors if t.edit and t.name.endswith(".bias") and module_of(t.name) in factored]
    if biases:
        notes.append(f"{len(biases)} bias tensor(s) of LoRA-targeted layers (e.g. {biases[0]}) cannot be carried by a LoRA"
                     " adapter: they stay at the base's values (their delta norms are in weightx.json)")
    how = f"rank {recipe.output.rank}" if recipe.output.rank is not None else (
        f"the rank keeping {recipe.output.energy:g} of each delta's energy" + (f", at most {recipe.output.max_rank}" if recipe.output.max_rank else ""))
    randomized = sum(uses_randomized(t.shape, recipe) for t in tensors if is_target(t, recipe))
    svd = "exact SVD" if not randomized else f"SVD ({randomized} randomized, seeded by tensor name; the rest exact)"
    notes.append(f"format: lora: {targets} linear weight(s) factored by {svd} at {how}; other tensors whose delta is"
                 " not zero are saved whole (modules_to_save); sizes shown are upper bounds")
    return problems, notes, out


def choose_rank(s: torch.Tensor, recipe: Recipe) -> int:
    """The rank to keep for singular values s (descending)."""
    full = s.numel()
    if recipe.output.rank is not None:
        return min(recipe.output.rank, full)
    energy = (s.to(torch.float64) ** 2)
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(energy, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(recipe.output.energy - 1e-12, dtype=torch.float64))) + 1
    return min(r, full, recipe.output.max_rank or full)


def uses_randomized(shape: tuple[int, ...], recipe: Recipe) -> bool:
    svd = recipe.output.svd
    return svd == "randomized" or (svd == "auto" and recipe.output.rank is not None and min(shape) >= RANDOMIZED_FROM
                                   and recipe.output.rank + 8 <= min(shape) // 4)


def seed_of(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"lora\0{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def factor(d: torch.Tensor, recipe: Recipe, name: str) -> tuple[torch.Tensor, torch.Tensor, int, float | None, float]:
    """(A, B, r, SVD tail (None for a randomized SVD: its spectrum is not known past r), energy kept)
    of the float32 matrix d."""
    total = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    if total == 0.0:  # an unchanged matrix: nothing to factor (it gets no LoRA module)
        return d.new_zeros(0, d.shape[1]), d.new_zeros(d.shape[0], 0), 0, 0.0, 1.0
    if uses_randomized(tuple(d.shape), recipe):
        r = min(recipe.output.rank, min(d.shape))
        u, s, vh = randomized_svd(d, r, seed_of(name))
        tail = None
    else:
        u, s, vh = truncated_svd(d)
        r = choose_rank(s, recipe)
        tail = math.sqrt(float((s.to(torch.float64)[r:] ** 2).sum()) / total) if total else 0.0
    root = torch.sqrt(s[:r])
    a = root[:, None] * vh[:r]
    b = u[:, :r] * root[None, :]
    kept = float((s.to(torch.float64)[:r] ** 2).sum()) / total if total else 1.0
    return a, b, r, tail, min(kept, 1.0)


def write_lora(plan: Plan, folder: Path, device: torch.device, run: RunState) -> tuple[dict[str, TensorStats], dict]:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `folder`; return the stats
    and the adapter's facts for weightx.json (ranks, target modules, modules saved)."""
    recipe = plan.recipe
    inputs = Inputs()
    computer = TensorComputer(plan, inputs, device, run=run)
    stats: dict[str, TensorStats] = {}
    outs: list[OutTensor] = []
    ranks: dict[str, int] = {}
    saved: list[str] = []
    offsets: dict[str, int] = {}  # output tensor → where its bytes start in the spool
    factored = {module_of(u.name) for u in plan.tensors if is_target(u, recipe)}
    spool = folder / ".adapter.spool"
    try:
        with open(spool, "wb") as f:
            for t in plan.tensors:
                if not t.edit:
                    continue
                st = stats[t.name] = TensorStats()
                d = computer.combined_delta(t, st)
                if is_target(t, recipe):
                    m = d.T if is_embedding(t) else d
                    a, b, r, tail, kept = factor(m, recipe, t.name)
                    a, b = a.to(DTYPES[t.out_dtype]), b.to(DTYPES[t.out_dtype])
                    # The error of the factors as stored (rounded to the output dtype), and the SVD's own tail.
                    norm = float(torch.linalg.vector_norm(m))
                    err = float(torch.linalg.vector_norm(m - b.float() @ a.float())) / norm if norm and r else (tail or 0.0)
                    st.extra.update({"rank": r, "relative_error": err, "svd_tail": tail, "energy_kept": kept,
                                     "svd": "randomized" if uses_randomized(tuple(m.shape), recipe) else "exact"})
                    if r == 0:
                        continue
                    ranks[module_of(t.name)] = r
                    pa, pb = factor_parts(t, r)
                    for part, x in ((pa, a), (pb, b)):
                        outs.append(part)
                        offsets[part.name] = f.tell()
                        f.write(ShardWriter.raw(x.cpu()))
                elif t.name.endswith(".bias") and module_of(t.name) in factored:
                    st.extra["not_in_adapter"] = True
                elif bool(d.any()):
                    x = computer.load(plan.base, t, 0, t.numel).add_(d.reshape(-1)).to(DTYPES[t.out_dtype]).cpu()
                    outs.append(OutTensor(f"{PREFIX}{t.name}", t.out_dtype, t.shape))
                    saved.append(module_of(t.name))
                    offsets[outs[-1].name] = f.tell()
                    f.write(ShardWriter.raw(x))
                del d
        if not ranks:
            raise UsageError("format: lora: the delta is zero on every linear weight, so there is nothing to factor;"
                             " check that the models differ (weightx diff BASE MODEL)")
        with open(spool, "rb") as f:
            writer = write_spooled(folder / ADAPTER_FILE, outs, f, offsets)
    finally:
        inputs.close()
        spool.unlink(missing_ok=True)
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {m: r for m, r in sorted(ranks.items()) if r != common}
    base_src = plan.base
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_src.repo_id or str(base_src.root),
        "revision": base_src.revision,
        "r": common,
        "lora_alpha": common,  # α/r = 1: the adapter adds exactly B·A
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(set(saved)) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    facts = {"sha256": writer.sha256, "size": writer.total, "ranks": dict(sorted(ranks.items())), "modules_to_save": sorted(set(saved)),
             "adapter_bytes": writer.total}
    return stats, facts


def render_lora(plan: Plan) -> list[str]:
    if plan.recipe.output.format != "lora":
        return []
    targets = [t for t in plan.tensors if t.parts is not None]  # the factored matrices
    factors = sum(o.nbytes for t in targets for o in t.parts)
    dense = sum(t.numel for t in targets) * itemsize(targets[0].out_dtype) if targets else 0
    return [f"lora: {len(targets)} matrices, factors ≤ {human_bytes(factors)} (their dense delta: {human_bytes(dense)}),"
            " plus the modules saved whole"]


__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILE", "choose_rank", "factor", "is_embedding", "is_target", "plan_lora", "render_lora", "write_lora"]
