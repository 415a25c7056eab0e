"""Pickle checkpoints (`.bin`, `.pt`), read only when a recipe sets `allow_pickle: true`.

Unpickling an arbitrary file can run code, so weightx refuses pickles by default. With the opt-in,
each file is read with `torch.load(weights_only=True)` (tensors and plain containers only; any other
object in the file is an error, never a call) and staged once as a safetensors file in the weightx
cache (`$WEIGHTX_CACHE/staged`, default ~/.cache/weightx/staged), keyed by path, size and mtime; the
stream then reads the staged copy like any other input. Staging costs disk space equal to the
pickles, and memory up to one pickle file when the file is in torch's legacy (non-zip) format; zip
files are memory-mapped.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from weightx.errors import InputError
from weightx.io.provenance import cache_path
from weightx.io.safetensors import DTYPE_NAMES, Header, OutTensor, ShardWriter, name_problem, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# pickles in model folders that are not weights (trainer state)
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


def staged_dir() -> Path:
    return cache_path().parent / "staged"


def refusal(what: Path, files: list[str]) -> str:
    shown = f" ({', '.join(files[:3])})" if files else ""
    return (
        f"{what}: pickle weights{shown} are refused because unpickling can run code. Convert them where you trust"
        " the file (python -c \"from transformers import AutoModelForCausalLM as M;"
        f" M.from_pretrained('{what}').save_pretrained('{what}-safetensors')\"), or set `allow_pickle: true` in the"
        " recipe to read them with torch.load(weights_only=True)"
    )


def weight_pickles(root: Path) -> list[str]:
    """The pickle weight files of a folder without safetensors, in the order transformers uses."""
    if (root / PICKLE_SINGLE).is_file():
        return [PICKLE_SINGLE]
    return sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name not in NOT_WEIGHTS and p.is_file())


def _why_refused(e: BaseException) -> str:
    text = " ".join(str(e).split())
    wanted = re.search(r"GLOBAL ([\w.]+[\w])", text)
    if wanted:
        return f"it asks to call {wanted.group(1)}, which is not a tensor type (refused, never called)"
    if "Weights only load failed" in text:
        op = re.search(r"Unsupported operand \d+", text)
        return "it holds objects other than tensors" + (f" ({op.group(0)})" if op else "")
    return text[:200] or type(e).__name__


def _load(path: Path) -> dict:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are noise next to our one line
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad or hostile pickle
        raise InputError(f"{path}: not loaded with torch.load(weights_only=True): {_why_refused(e)}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise InputError(f"{path}: state dict key {k!r} is not a string")
        if why := name_problem(k):
            raise InputError(f"{path}: refusing tensor name {k!r}: {why}")
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or v.dtype not in DTYPE_NAMES:
            kind = type(v).__name__ if not isinstance(v, torch.Tensor) else f"{v.dtype} {v.layout} tensor"
            raise InputError(f"{path}: entry {k!r} is a {kind}; only dense tensors of standard dtypes can be read")
    return obj


def stage(path: Path) -> Header:
    """The safetensors copy of one pickle file, made on first use."""
    path = path.resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    folder = staged_dir()
    dst = folder / f"{key}.safetensors"
    if dst.is_file():
        try:
            return read_header(dst)
        except InputError:
            pass  # a damaged cache entry: stage again
    state = _load(path)
    names = sorted(state)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        writer = ShardWriter(tmp, [OutTensor(n, DTYPE_NAMES[state[n].dtype], tuple(state[n].shape)) for n in names])
        try:
            for n in names:
                if state[n].numel():
                    writer.write(state[n])
            writer.close()
        except BaseException:
            writer.abort()
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dst)
    except OSError as e:
        raise InputError(f"{path}: cannot stage it as safetensors in {folder}: {e.strerror or e}") from None
    return read_header(dst)
