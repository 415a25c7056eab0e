"""Serve fine-tunes as deltas on one shared base model held in memory.

    import weightx
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf", dtype="bfloat16")
    chat = weightx.load_delta("deltas/vicuna-bitdelta")      # ~1.3 GB instead of 13.5 GB
    applied = weightx.apply_delta(base, chat)                # base is now Vicuna (as reconstructed)
    ...
    weightx.remove_delta(base, applied)                      # base is the base again, bit for bit

Applying writes round(base + δ̂) into each compressed weight, exactly what a reconstruction with
`weightx apply` holds (same float32 formula, one rounding), and copies the stored tensors
(embeddings, lm_head, norms) over theirs. Removing subtracts δ̂ again; where rounding made that
land an ulp off (a few percent of bf16 weights), apply recorded the correction (`Fixup`: coded
positions plus an int8 step, ~1.5 bytes each), so the base comes back bit for bit. The stored tensors' base values are
kept while a delta is applied (they are the delta's own size). So switching between fine-tunes
costs the deltas' bytes, not a model copy each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightx.errors import InputError
from weightx.formats import CODEC_PARAMS, DECODERS
from weightx.io.artifact import ArtifactReader, stored_shape
from weightx.io.safetensors import MappedFile
from weightx.io.sources import resolve
from weightx.formats.packing import ef_decode, ef_encode


@dataclass
class DeltaArtifact:
    """A delta artifact loaded into memory: compressed parts plus the tensors stored whole."""

    path: Path
    meta: dict
    codecs: dict[str, dict]  # compressed tensor -> codec record (codec, params, shape, dtype)
    parts: dict[str, dict[str, torch.Tensor]]
    whole: dict[str, torch.Tensor]

    @property
    def base(self) -> dict:
        """The base this delta was made against (alias, source, repo_id, revision, files with sha256)."""
        return self.meta.get("delta", {}).get("base", {})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.parts.values() for t in p.values()) + sum(
            t.numel() * t.element_size() for t in self.whole.values())

    def names(self) -> list[str]:
        return sorted([*self.codecs, *self.whole])

    def decode(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense float32 delta δ̂ of one compressed tensor."""
        entry = self.codecs[name]
        params = {k: v for k, v in entry.items() if k in CODEC_PARAMS[entry["codec"]]}
        parts = {k: v.to(device) if device is not None else v for k, v in self.parts[name].items()}
        out = DECODERS[entry["codec"]](parts, stored_shape(entry), **params)
        return out.transpose(-1, -2).contiguous() if entry.get("transposed") else out

    def to(self, device: torch.device | str) -> DeltaArtifact:
        """Move everything to `device` (e.g. the GPU holding the base), in place; returns self."""
        self.parts = {n: {k: v.to(device) for k, v in p.items()} for n, p in self.parts.items()}
        self.whole = {n: v.to(device) for n, v in self.whole.items()}
        return self


def load_delta(path: str | Path) -> DeltaArtifact:
    """Read a delta artifact folder (local or a Hub id) into memory."""
    src = resolve("delta", str(path))
    reader: ArtifactReader | None = src.artifact
    if reader is None:
        raise InputError(f"{path} is not a weightx delta artifact (no weightx.json with output.format: delta)")
    sparse = [n for n in reader.codecs if reader.is_sparse(n)]
    if sparse:
        raise InputError(f"{path} stores sparse edits (e.g. {sparse[0]}), which serving in memory does not apply yet;"
                         " rebuild it on its base with `weightx apply` (recipes/materialize.yaml) and load that")
    parts = {n: {k: v.clone() for k, v in reader.parts(n).items()} for n in reader.codecs}
    whole = {}
    maps: dict[str, MappedFile] = {}
    for name, shard in src.weight_map.items():
        if reader.is_compressed(name):
            continue
        mf = maps.get(shard) or maps.setdefault(shard, MappedFile(src.headers[shard]))
        info = src.headers[shard].tensors[name]
        whole[name] = mf.tensor(name).view(info.shape).clone()
    for mf in maps.values():
        mf.close()
    return DeltaArtifact(src.root, src.weightx_meta or {}, dict(reader.codecs), parts, whole)


@dataclass
class Fixup:
    """Where round(round(base + δ̂) − δ̂) misses the base, and by how many steps of the bit pattern.

    Misses are a few ulps at most (one, nearly always), and a few percent of the weights, so they are
    kept as Elias–Fano positions plus an int8 step each (~1.5 bytes per miss instead of 10); the rare
    larger misses keep their index and value.
    """

    n: int
    positions: torch.Tensor  # uint8, Elias–Fano coded
    steps: torch.Tensor  # int8: base bits − restored bits at each position
    far_index: torch.Tensor
    far_value: torch.Tensor

    @classmethod
    def between(cls, base: torch.Tensor, restored: torch.Tensor) -> Fixup:
        want, got = _bits(base).reshape(-1), _bits(restored).reshape(-1)
        off = torch.nonzero(want != got).reshape(-1)
        step = want[off].to(torch.int64) - got[off].to(torch.int64)
        near = step.abs() <= 127
        far = off[~near]
        return cls(want.numel(), ef_encode(off[near].cpu(), want.numel()), step[near].to(torch.int8).cpu(),
                   far, base.reshape(-1)[far].clone())

    def restore(self, x: torch.Tensor) -> None:
        """Correct `x` (the round trip of the base) in place."""
        bits = _bits(x).reshape(-1)
        pos = ef_decode(self.positions, self.n, self.steps.numel()).to(x.device)
        bits[pos] = (bits[pos].to(torch.int64) + self.steps.to(x.device, torch.int64)).to(bits.dtype)
        x.reshape(-1)[self.far_index] = self.far_value

    @property
    def count(self) -> int:
        return self.steps.numel() + self.far_index.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.positions, self.steps, self.far_index, self.far_value))


@dataclass
class AppliedDelta:
    """What `remove_delta` needs to restore the base exactly."""

    delta: DeltaArtifact
    fixups: dict[str, Fixup] = field(default_factory=dict)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # base values of the tensors stored whole

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.fixups.values()) + sum(t.numel() * t.element_size() for t in self.saved.values())


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _params(model: torch.nn.Module, delta: DeltaArtifact) -> dict[str, torch.Tensor]:
    state = model.state_dict(keep_vars=True)
    problems = []
    for name in delta.names():
        want = tuple(delta.codecs[name]["shape"]) if name in delta.codecs else tuple(delta.whole[name].shape)
        if name not in state:
            problems.append(f"{name} is not a tensor of the model")
        elif tuple(state[name].shape) != want:
            problems.append(f"{name} is {list(state[name].shape)} in the model but {list(want)} in the delta")
    if problems:
        raise InputError(f"the delta at {delta.path} does not fit this model ({len(problems)} problem(s), e.g."
                         f" {problems[0]}); load the base it was made against")
    return {n: state[n] for n in delta.names()}


def apply_delta(model: torch.nn.Module, delta: DeltaArtifact | str | Path) -> AppliedDelta:
    """Turn the loaded base `model` into the fine-tune, in place; returns the handle to undo it."""
    if not isinstance(delta, DeltaArtifact):
        delta = load_delta(delta)
    params = _params(model, delta)
    applied = AppliedDelta(delta)
    stack = model.__dict__.setdefault("_weightx_deltas", [])
    with torch.no_grad():
        for name in delta.codecs:
            p = params[name]
            d = delta.decode(name, p.device)
            new = (p.float() + d).to(p.dtype)  # the reconstruction's formula: float32 sum, one rounding
            applied.fixups[name] = Fixup.between(p.data, (new.float() - d).to(p.dtype))
            p.data.copy_(new)
        for name, value in delta.whole.items():
            p = params[name]
            applied.saved[name] = p.data.clone()
            p.data.copy_(value.to(device=p.device, dtype=p.dtype))
    stack.append(applied)
    return applied


def remove_delta(model: torch.nn.Module, applied: AppliedDelta | None = None) -> None:
    """Undo `apply_delta` (default: the last one applied); deltas come off in reverse order."""
    stack = model.__dict__.get("_weightx_deltas") or []
    if not stack:
        raise InputError("no weightx delta is applied to this model")
    if applied is None:
        applied = stack[-1]
    if applied is not stack[-1]:
        raise InputError("remove deltas in the reverse order they were applied (the last one first)")
    params = _params(model, applied.delta)
    with torch.no_grad():
        for name in applied.delta.codecs:
            p = params[name]
            d = applied.delta.decode(name, p.device)
            p.data.copy_((p.float() - d).to(p.dtype))
            applied.fixups[name].restore(p.data)
        for name, value in applied.saved.items():
            params[name].data.copy_(value)
    stack.pop()
