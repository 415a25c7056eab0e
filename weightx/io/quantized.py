"""Quantized inputs: FP8 block-scaled checkpoints are read dequantized; every other quantization is refused.

DeepSeek-V3 and Qwen3-FP8 ship each quantized weight `W` as float8_e4m3 plus `W_scale_inv` (float32,
one per `weight_block_size` block, [⌈rows/bh⌉, ⌈cols/bw⌉]): the real weight is W · scale_inv,
blockwise. `fp8_scales` finds those pairs (config.json's `quantization_config` says `quant_method:
fp8`, or the pairs speak for themselves); the source then lists W as one logical tensor and hides the
scales, and `dequantize` turns any flat range of W into float32. MXFP4 (GPT-OSS experts: `W_blocks` +
`W_scales`) is read the same way, one expert at a time (`dequantize_mxfp4`, transformers' layout).
GPTQ, AWQ, bitsandbytes and the rest store weights no arithmetic on their bytes can edit, so they are
refused in one line naming the method (their config, or their tell-tale tensor names for a bare file).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from weightx.errors import InputError
from weightx.io.files import read_regular
from weightx.io.safetensors import TensorInfo
from weightx.io.sources import Source

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
# Tensor-name endings that give a quantization method away when there is no config to say it.
TELLTALES = {".qweight": "GPTQ/AWQ", ".qzeros": "GPTQ/AWQ", ".g_idx": "GPTQ", ".absmax": "bitsandbytes",
             ".quant_map": "bitsandbytes", ".quant_state.bitsandbytes__nf4": "bitsandbytes"}


def quantization_config(src: Source) -> dict | None:
    if not src.has_config:
        return None
    try:
        doc = json.loads(read_regular(src.root / "config.json", 16 << 20).decode("utf-8"))
    except (InputError, OSError, ValueError, RecursionError):
        return None  # the planner reports an unreadable config on its own
    q = doc.get("quantization_config") if isinstance(doc, dict) else None
    return q if isinstance(q, dict) else None


MXFP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Mxfp4:
    """One MXFP4 tensor (GPT-OSS experts): `W_blocks` uint8 [E, R, G, 16] (two FP4 values per byte, low
    nibble first) and `W_scales` uint8 [E, R, G] (a power of two per 32 values, biased by 127). The weight
    it stands for, as transformers dequantizes it, is [E, G·32, R] (the last two axes transposed)."""

    blocks: tuple[str, TensorInfo]  # (shard, info)
    scales: tuple[str, TensorInfo]
    info: TensorInfo  # the logical weight: BF16 [E, G·32, R]


def mxfp4_tensors(src: Source) -> tuple[dict[str, Mxfp4], list[str]]:
    """({weight name: its MXFP4 parts}, problems) of a source with `_blocks`/`_scales` pairs."""
    found, problems = {}, []
    for name in src.weight_map:
        if not name.endswith("_blocks") or name[:-7] + "_scales" not in src.weight_map:
            continue
        base, scale = name[:-7], name[:-7] + "_scales"
        b, s = src.info(name), src.info(scale)
        if b.dtype != "U8" or s.dtype != "U8" or len(b.shape) != 4 or b.shape[-1] != 16 or tuple(s.shape) != tuple(b.shape[:-1]):
            problems.append(f"'{src.alias}': {name} {b.dtype}{list(b.shape)} and {scale} {s.dtype}{list(s.shape)} are not MXFP4"
                            " blocks [E, R, G, 16] and scales [E, R, G] (uint8); the checkpoint is damaged")
            continue
        e, r, g, _ = b.shape
        found[base] = Mxfp4((src.weight_map[name], b), (src.weight_map[scale], s), TensorInfo(base, "BF16", (e, g * 32, r), 0, e * g * 32 * r * 2))
    return found, problems


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One expert's [R, G, 16] blocks and [R, G] scales → its float32 weight [G·32, R]."""
    lut = torch.tensor(MXFP4_VALUES, dtype=torch.float32, device=blocks.device)
    r, g, _ = blocks.shape
    out = torch.empty(r, g, 32, dtype=torch.float32, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out.mul_(torch.exp2(scales.to(torch.float32) - 127).unsqueeze(-1))
    return out.reshape(r, g * 32).T


def quantization_problem(alias: str, src: Source) -> str | None:
    """Why this input cannot be edited as it is (one line), or None (plain, or FP8 block-scaled)."""
    q = quantization_config(src)
    method = str(q.get("quant_method", "unknown")).lower() if q is not None else None
    if method is None:
        hit = next((m for n in src.weight_map for end, m in TELLTALES.items() if n.endswith(end)), None)
        if hit is not None:
            method = hit
    if method is None or method in ("fp8", "mxfp4"):
        return None
    return (f"'{alias}' ({src.describe()}) is quantized with {method}: weightx edits the real weights, which"
            f" {method} does not store; use the model's unquantized (bf16/fp16) release")


def fp8_scales(src: Source) -> tuple[dict[str, str], tuple[int, int]]:
    """({FP8 weight name: its scale tensor name}, block size) of an FP8 block-scaled source."""
    q = quantization_config(src) or {}
    block = q.get("weight_block_size") or DEFAULT_BLOCK
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise InputError(f"'{src.alias}': quantization_config.weight_block_size {block!r} is not two positive integers;"
                         " fix config.json")
    pairs = {}
    for name in src.weight_map:
        scale = name + SCALE_SUFFIX
        if scale in src.weight_map and src.info(name).dtype in ("F8_E4M3", "F8_E5M2"):
            pairs[name] = scale
    return pairs, (int(block[0]), int(block[1]))


def scale_problem(name: str, shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int]) -> str | None:
    if len(shape) != 2:
        return f"FP8 tensor {name!r} is {len(shape)}-D; block scales are defined for matrices"
    want = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    if tuple(scale_shape) != want:
        return (f"{name}{SCALE_SUFFIX} is {list(scale_shape)} but {list(shape)} in blocks of {list(block)} needs {list(want)};"
                " the checkpoint or its weight_block_size is wrong")
    return None


def dequantize(x: torch.Tensor, start: int, shape: tuple[int, ...], scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Elements [start, start + x.numel()) of the flat FP8 tensor `x` (already float32) times their block's scale."""
    cols = shape[1]
    idx = torch.arange(start, start + x.numel(), device=x.device)
    s = scales[(idx // cols) // block[0], (idx % cols) // block[1]]
    return x.mul_(s)


def dequantized_sources(sources: dict[str, Source], notes: list[str]) -> list[str]:
    """Refusals for quantized inputs weightx cannot edit; FP8 block-scaled ones are switched (in
    `sources`) to read dequantized, their scale tensors hidden, with a note."""
    problems = []
    for alias, src in list(sources.items()):
        why = quantization_problem(alias, src)
        if why:
            problems.append(why)
            continue
        if src.artifact is not None:
            continue
        packed, more = mxfp4_tensors(src)
        problems += more
        if packed:
            parts = {n for q in packed.values() for n in (q.blocks[1].name, q.scales[1].name)}
            wm = {n: s for n, s in src.weight_map.items() if n not in parts} | {n: q.blocks[0] for n, q in packed.items()}
            src = sources[alias] = dataclasses.replace(src, weight_map=wm, mxfp4=packed)
            notes.append(f"'{alias}' holds {len(packed)} MXFP4 tensor(s) (e.g. {next(iter(packed))}): read dequantized to float32"
                         " one expert at a time; outputs default to bfloat16 where the base is MXFP4 (set output.dtype to choose)")
        pairs, block = fp8_scales(src)
        if not pairs:
            continue
        scales = {}
        for name, scale in pairs.items():
            info, sinfo = src.info(name), src.info(scale)
            bad = scale_problem(name, info.shape, sinfo.shape, block)
            if bad:
                problems.append(f"'{alias}': {bad}")
            scales[name] = (src.weight_map[scale], sinfo)
        hidden = set(pairs.values())
        sources[alias] = dataclasses.replace(src, weight_map={n: s for n, s in src.weight_map.items() if n not in hidden},
                                             fp8=scales, fp8_block=block)
        notes.append(f"'{alias}' is FP8 block-scaled ({len(pairs)} tensors, blocks of {list(block)}): read dequantized to"
                     " float32; outputs default to bfloat16 where the base is FP8 (set output.dtype to choose)")
    return problems


__all__ = ["dequantized_sources", "SCALE_SUFFIX", "Mxfp4", "dequantize", "dequantize_mxfp4", "fp8_scales", "mxfp4_tensors", "quantization_problem", "scale_problem"]
