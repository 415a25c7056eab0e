"""Safetensors files without the safetensors library: validated headers, mmap'd tensors, and a
streaming writer that lays out a shard's header before any tensor is computed.

Headers from strangers are checked before anything is trusted: length bounds, JSON shape, known
dtypes, offsets inside the file, and no overlaps. A tensor is a zero-copy view of a private
(copy-on-write) mapping, so reading costs page cache, not private memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from weightx.errors import InputError
from weightx.io.direct import SequentialFile
from weightx.io.files import open_regular
from weightx.io.sha256 import Sha256

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_ITEMSIZE = {code: dt.itemsize for code, dt in DTYPES.items()}


def itemsize(code: str) -> int:
    return _ITEMSIZE[code]  # called per block and per tensor: a dict lookup, not a tensor


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int  # 8 + header length
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | Path) -> Header:
    """Parse and validate a .safetensors header; raise InputError naming the file and the problem."""
    path = Path(path)
    try:
        with os.fdopen(open_regular(path), "rb") as f:  # never blocks on a FIFO named *.safetensors
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise InputError(
                    f"{path}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file);"
                    " the file is truncated or not safetensors, re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        doc = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # also: duplicate keys, deep nesting, 4300+-digit ints
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"{path}: corrupt safetensors header (invalid JSON: {why}); re-download it") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    data_size = size - 8 - n
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    for k, v in metadata.items():
        if (why := text_problem(k, False)) or (isinstance(v, str) and (why := text_problem(v, False))):
            raise InputError(f"{path}: corrupt safetensors header (__metadata__ entry {k!r} has {why})")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if why := name_problem(name):
            raise InputError(f"{path}: refusing tensor name {name!r}: {why}")
        tensors[name] = _tensor_info(path, name, entry, data_size)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise InputError(f"{path}: corrupt safetensors header (tensors {n0!r} and {n1!r} overlap)")
    return Header(path, 8 + n, tensors, {str(k): str(v) for k, v in metadata.items()})


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):  # json.loads would silently keep the last of two same-named tensors
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
    return doc


_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}  # controls, format (zero-width, bidi), surrogates, private use


def text_problem(s: str, invisible: bool = True) -> str | None:
    """Why a name from a file or recipe is unsafe to print or write: invisible characters (unless
    `invisible=False`) or lone surrogates, which cannot even be encoded as UTF-8."""
    if s.isascii() and (s.isprintable() or not invisible):
        return None
    for ch in s:
        cat = unicodedata.category(ch)
        if cat == "Cs" or (invisible and cat in _INVISIBLE):
            return f"an invisible or control character (U+{ord(ch):04X})"
    return None


def name_problem(name: str) -> str | None:
    """Why a tensor name is refused. Names are never used as paths, but one that looks like a path
    (`../x`, `/etc/x`, `a\\b`) is a sign of a crafted file, and invisible characters make two names look equal."""
    if not name:
        return "tensor names must not be empty"
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".."):
        return "tensor names must not look like file paths"
    why = text_problem(name)
    return f"it contains {why}" if why else None


def _tensor_info(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    def bad(why: str) -> InputError:
        return InputError(f"{path}: corrupt safetensors header for tensor {name!r} ({why})")

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise bad(f"bad shape {shape!r}")
    if len(shape) > MAX_RANK or any(s >= MAX_DIM for s in shape) or math.prod(max(s, 1) for s in shape) >= MAX_DIM:
        # A zero dimension beside a huge one has no bytes but a shape nothing can load or write back.
        raise bad(f"shape {shape[:MAX_RANK + 1]}{'…' if len(shape) > MAX_RANK else ''} is beyond what any reader can hold")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets {offsets} fall outside the {data_size}-byte data section; the file is truncated")
    if end - begin != math.prod(shape) * itemsize(dtype):
        raise bad(f"{end - begin} bytes for shape {shape} of {dtype}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


MAX_DIM = 1 << 53  # every dimension, and the product of the non-zero ones, below this
MAX_RANK = 64


class MappedFile:
    """A private read-only-in-practice mapping of one safetensors file."""

    def __init__(self, header: Header):
        self.header = header
        self._fd = open_regular(header.path)  # kept open: each read first checks the file was not cut short
        self._size = os.fstat(self._fd).st_size
        # ACCESS_COPY gives a writable buffer (so torch.frombuffer doesn't warn) whose pages
        # stay shared with the page cache as long as nobody writes to them; we never do.
        self._mm = mmap.mmap(self._fd, self._size, access=mmap.ACCESS_COPY) if self._size else None

    def check(self) -> None:
        """Refuse (one line) a file truncated since it was mapped: reading its lost pages would kill
        the process with SIGBUS. One fstat per block; a cut between it and the read stays possible."""
        now = os.fstat(self._fd).st_size
        if now < self._size:
            raise InputError(f"{self.header.path} was truncated while weightx read it ({self._size:,} -> {now:,} bytes);"
                             " nothing was written: rerun once the file is complete")

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header.tensors[name]
        return self.view(info, 0, info.numel)

    def view(self, info: TensorInfo, start: int, count: int) -> torch.Tensor:
        """Elements [start, start+count) of a tensor, flat, zero-copy."""
        dtype = DTYPES[info.dtype]
        if count == 0 or self._mm is None:
            return torch.empty(count, dtype=dtype)
        offset = self.header.data_start + info.begin + start * itemsize(info.dtype)
        self.check()
        return torch.frombuffer(self._mm, dtype=dtype, count=count, offset=offset)

    def prefetch(self, info: TensorInfo, start: int, count: int) -> None:
        """Queue the reads of these elements (posix_fadvise WILLNEED on the file: the same readahead
        as madvise on the mapping, without holding the process's mmap lock while it queues them)."""
        if self._mm is None or count == 0 or self._fd < 0:
            return
        size = itemsize(info.dtype)
        lo = self.header.data_start + info.begin + start * size
        try:
            os.posix_fadvise(self._fd, lo, count * size, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):  # no posix_fadvise (macOS), or the filesystem refuses it
            self._advise(mmap.MADV_WILLNEED, lo, count * size)

    def done(self, info: TensorInfo) -> None:
        """Unmap a tensor the run has finished with (MADV_DONTNEED: a later read faults it back in from
        the page cache). The kernel then reclaims those pages without walking this process's page
        tables and interrupting its cores to flush their TLBs."""
        if self._mm is not None and info.end > info.begin:
            self._advise(mmap.MADV_DONTNEED, self.header.data_start + info.begin, info.end - info.begin)

    def _advise(self, advice: int, lo: int, n: int) -> None:
        """madvise the file bytes [lo, lo + n) of the mapping (from the page they start in); a hint,
        so a refusal changes nothing."""
        aligned = lo - lo % mmap.PAGESIZE
        try:
            self._mm.madvise(advice, aligned, lo + n - aligned)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a tensor still views the mapping; it is released with the last view
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # readers that keep mappings for their lifetime (serving, artifacts)
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


# ---- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def layout_header(tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """The full header bytes for tensors written in the given order, and each tensor's data offset."""
    doc: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offsets, pos = [], 0
    for t in tensors:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets.append(pos)
        pos += t.nbytes
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(body)) + body, offsets


class ShardWriter:
    """Writes one shard front to back: header first, then each tensor's bytes as they arrive."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None, hash_on_close: bool = True):
        self.path = path
        self.tensors = tensors
        header, _ = layout_header(tensors, metadata)
        self.total = len(header) + sum(t.nbytes for t in tensors)
        self.sha256: str | None = None  # set by close(): the file's hash, computed as it is written
        self._hash = Sha256(header)
        self._hash_on_close = hash_on_close  # False: another thread hashes and calls finish_hash
        self._f = SequentialFile(path)
        self._f.write(header)
        self._written = len(header)

    def write(self, data: torch.Tensor) -> int:
        """Write and hash a block (the engine splits the two across threads: `write_raw`, `hash_raw`)."""
        raw = self.raw(data)
        self.write_raw(raw)
        self.hash_raw(raw)
        return raw.nbytes

    @staticmethod
    def raw(data: torch.Tensor) -> memoryview:
        return memoryview(data.contiguous().view(-1).view(torch.uint8).numpy())

    def write_raw(self, raw: memoryview) -> None:
        self._f.write(raw)
        self._written += raw.nbytes

    def hash_raw(self, raw: memoryview) -> None:
        self._hash.update(raw)  # staged through L2, no GIL held while hashing

    def close(self) -> None:
        """Flush and fsync; then `finish_hash` (after the last `hash_raw`) sets sha256."""
        if self._written != self.total:
            self._f.abort()
            raise RuntimeError(f"{self.path}: wrote {self._written} of {self.total} bytes")
        self._f.close()  # fsyncs
        if self._hash_on_close:
            self.finish_hash()

    def finish_hash(self) -> None:
        self.sha256 = self._hash.hexdigest()

    def abort(self) -> None:
        self._f.abort()


SPOOL_CHUNK = 16 << 20


def write_spooled(path: Path, tensors: list[OutTensor], spool: BinaryIO, offsets: dict[str, int]) -> ShardWriter:
    """Write a shard whose tensors' bytes were put beforehand in the scratch file `spool` (`offsets`:
    tensor name → where its bytes start), copied in 16 MB pieces; closed, fsynced and hashed. For outputs
    whose sizes are known only once computed (LoRA ranks by energy, sparse parts)."""
    writer = ShardWriter(path, tensors, hash_on_close=True)
    buf = memoryview(bytearray(SPOOL_CHUNK))
    try:
        for t in tensors:
            spool.seek(offsets[t.name])
            left = t.nbytes
            while left:
                piece = buf[:min(left, SPOOL_CHUNK)]
                if spool.readinto(piece) != len(piece):
                    raise RuntimeError(f"{path}: the scratch file ended inside {t.name}")
                writer.write_raw(piece)
                writer.hash_raw(piece)
                left -= len(piece)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer

