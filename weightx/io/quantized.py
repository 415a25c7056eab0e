"""Quantized inputs: FP8 block-scaled checkpoints are read dequantized; every other quantization is refused.

DeepSeek-V3 and Qwen3-FP8 ship each quantized weight `W` as float8_e4m3 plus `W_scale_inv` (float32,
one per `weight_block_size` block, [⌈rows/bh⌉, ⌈cols/bw⌉]): the real weight is W · scale_inv,
blockwise. `fp8_scales` finds those pairs (config.json's `quantization_config` says `quant_method:
fp8`, or the pairs speak for themselves); the source then lists W as one logical tensor and hides the
scales, and `dequantize` turns any flat range of W into float32. GPTQ, AWQ, bitsandbytes, MXFP4 and the
rest store weights no arithmetic on their bytes can edit, so they are refused in one line naming the
method (their config, or their tell-tale tensor names for a bare file).
"""

from __future__ import annotations

import json

import torch

from weightx.errors import InputError
from weightx.io.files import read_regular
from weightx.io.sources import Source

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
# Tensor-name endings that give a quantization method away when there is no config to say it.
TELLTALES = {".qweight": "GPTQ/AWQ", ".qzeros": "GPTQ/AWQ", ".g_idx": "GPTQ", ".absmax": "bitsandbytes",
             ".quant_map": "bitsandbytes", ".quant_state.bitsandbytes__nf4": "bitsandbytes", "_blocks": "MXFP4"}


def quantization_config(src: Source) -> dict | None:
    if not src.has_config:
        return None
    try:
        doc = json.loads(read_regular(src.root / "config.json", 16 << 20).decode("utf-8"))
    except (InputError, OSError, ValueError):
        return None  # the planner reports an unreadable config on its own
    q = doc.get("quantization_config") if isinstance(doc, dict) else None
    return q if isinstance(q, dict) else None


def quantization_problem(alias: str, src: Source) -> str | None:
    """Why this input cannot be edited as it is (one line), or None (plain, or FP8 block-scaled)."""
    q = quantization_config(src)
    method = str(q.get("quant_method", "unknown")).lower() if q is not None else None
    if method is None:
        hit = next((m for n in src.weight_map for end, m in TELLTALES.items() if n.endswith(end)), None)
        if hit is not None:
            method = hit
    if method is None or method == "fp8":
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


__all__ = ["SCALE_SUFFIX", "dequantize", "fp8_scales", "quantization_problem", "scale_problem"]
