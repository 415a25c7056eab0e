"""The plan as data: every output tensor, its inputs, edits and shard, computed from headers alone.

`weightx.pipeline.planner` builds it; nothing changes a plan afterwards (the dataclasses are
frozen). What a run learns before writing lives in `weightx.pipeline.state.RunState`; a phase that
changes the layout (global ternary's kept counts) derives a new plan with `Plan.with_tensors`.
"""

from __future__ import annotations

import math
import re
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from weightx.combine.base import CombineConfig
from weightx.edits.base import CodecEdit, EditConfig
from weightx.io.safetensors import OutTensor
from weightx.io.sources import Source
from weightx.recipe.model import DeltaSpec, Recipe

# Architectures whose linear layers are transformers' Conv1D: weights stored [in, out].
CONV1D_MODELS = ("gpt2", "gpt_bigcode", "openai-gpt", "imagegpt")
# Models with matrices stored [in, out] (Conv1D, GPT-OSS's stacked experts): per-row scales would be per input.
COLUMN_MODELS = CONV1D_MODELS + ("gpt_oss",)
STACKED_COLUMNS = re.compile(r"experts\.(gate_up_proj|down_proj)$")  # GPT-OSS: [experts, in, out]


def outputs_are_columns(model_type: str | None, name: str, shape: tuple[int, ...]) -> bool:
    """Whether a weight stores its outputs along the last axis: a Conv1D layer of a GPT-2-style model
    (every 2-D weight but the embeddings), or GPT-OSS's stacked experts."""
    if model_type in CONV1D_MODELS:
        return len(shape) == 2 and name.endswith(".weight") and not VOCAB_NAMES.search(name) and "wpe" not in name
    return model_type == "gpt_oss" and len(shape) == 3 and bool(STACKED_COLUMNS.search(name))
VOCAB_NAMES = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|output\.weight$)")


def natural_key(name: str) -> list:
    """layers.2 sorts before layers.10, so shards follow the model's structure."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors code
    edit: bool  # False: copied unchanged from config_from (non-float tensors)
    edits: tuple[tuple[EditConfig, ...], ...] = ()  # per delta, the edits that apply
    elementwise: bool = True  # every edit and the combine work per element: safe to stream in blocks
    # format: delta only: the compressing edit that encodes this tensor, and the parts it writes
    codec: CodecEdit | None = None
    parts: tuple[OutTensor, ...] | None = None
    # Where the recipe's parameters vary by tensor (gradients, filters): this tensor's delta weights
    # and combine; None: the recipe's own.
    weights: tuple[float, ...] | None = None
    combine: CombineConfig | None = None
    # Vocabulary alignment (`weightx.pipeline.vocab`): per input alias, output row → its row of the
    # same token, or −1; None: every input has the output's rows.
    rows: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    # Outputs along the last axis (Conv1D, GPT-OSS stacked experts; see TensorContext.columns).
    columns: bool = False

    @property
    def transposed(self) -> bool:
        """Stored transposed: a per-row codec on a matrix whose outputs are its columns."""
        return self.columns and self.codec is not None and self.codec.per_row()
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out(self) -> OutTensor:
        return OutTensor(self.name, self.out_dtype, self.shape)

    @property
    def outs(self) -> list[OutTensor]:
        """What is written for this tensor: itself, or its compressed parts."""
        return list(self.parts) if self.parts is not None else [self.out]


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for t in self.tensors for o in t.outs)


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    sources: dict[str, Source]
    out_path: Path
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardPlan, ...]
    notes: tuple[str, ...] = ()
    distill_data: Path | None = None  # BitDelta distillation's calibration file, resolved
    recipe_dir: Path | None = None  # the recipe file's folder: relative paths are taken (and recorded) from it
    vocab: object = None  # the aligned vocabulary (`weightx.pipeline.vocab.VocabPlan`) of a `tokenizer:` block

    def with_tensors(self, tensors: list[TensorPlan]) -> Plan:
        """A new plan with these tensor entries and the shard layout they give."""
        return dataclasses.replace(self, tensors=tuple(tensors), shards=tuple(split_shards(tensors, self.recipe.output.shard_bytes)))

    @property
    def base(self) -> Source:
        return self.sources[self.recipe.base]

    @property
    def config_source(self) -> Source:
        return self.sources[self.recipe.config_from]

    @property
    def deltas(self) -> list[tuple[DeltaSpec, Source]]:
        return [(d, self.sources[d.model]) for d in self.recipe.deltas]

    @property
    def delta_bases(self) -> list[Source]:
        """What each delta is taken against: its own `base:` (a transplant), else the recipe's base."""
        return [self.sources[self.recipe.delta_base(i)] for i in range(len(self.recipe.deltas))]

    def reads(self, t: TensorPlan) -> list[Source]:
        """The sources tensor t is computed from (each once)."""
        if not t.edit:
            return [self.config_source]
        srcs = [self.base] + [s for _, s in self.deltas] + self.delta_bases
        return list({id(s): s for s in srcs}.values())

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    def edit_counts(self) -> list[dict[str, int]]:
        """Per delta: how many tensors each edit touches."""
        counts: list[dict[str, int]] = [dict.fromkeys((e.op for e in d.edits), 0) for d in self.recipe.deltas]
        for t in self.tensors:
            for i, edits in enumerate(t.edits):
                for e in edits:
                    counts[i][e.op] += 1
        return counts


def shard_names(n: int) -> list[str]:
    """Shard file names as transformers writes them: `model.safetensors` alone, else numbered.
    (The index is written either way: DESIGN.md's output layout has it in every output.)"""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def split_shards(tensors: list[TensorPlan], shard_bytes: int) -> list[ShardPlan]:
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        nbytes = sum(o.nbytes for o in t.outs)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    return [ShardPlan(name, tuple(g)) for name, g in zip(shard_names(len(groups)), groups)]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


__all__ = ["Plan", "TensorPlan", "ShardPlan", "split_shards", "shard_names", "natural_key", "human_bytes", "VOCAB_NAMES", "CONV1D_MODELS", "COLUMN_MODELS", "outputs_are_columns"]
