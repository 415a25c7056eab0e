"""Reading delta artifacts (`output.format: delta`); planning and writing them is `weightx.pipeline`.

An artifact is sharded safetensors plus `weightx.json`. Per compressed tensor `W`: `W.packed`
(uint8 bit-planes, LSB first along the last dimension), `W.scale` (float32), `W.mask` (ternary
positions); every other tensor is stored whole, as the value the dense output would have (the
fine-tuned tensor when no other edit touches it). `weightx.json["delta"]` records the encoding and
its version, each compressed tensor's codec parameters, shape and dtype, and the base (alias,
source, revision, shard sizes and sha256).

Reading: `sources.resolve` sees the record and attaches an `ArtifactReader`; the source then lists
the logical tensors (W with its real shape and dtype, not its parts). The engine takes a compressed
tensor's delta straight from `decoded()`, never as (base + δ̂) − base, so a reconstruction equals
the `format: dense` output of the compressing recipe bit for bit. Whole tensors go the usual way
(stored − base, then + base), which returns the stored value exactly for bf16/fp16 outputs.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from weightx.errors import InputError
from weightx.formats import CODEC_PARAMS, DECODERS, ENCODING, SUFFIXES, VERSION, sparse
from weightx.formats.bitdelta import part_specs as bitdelta_parts
from weightx.formats.ternary import part_specs as ternary_parts
from weightx.io.provenance import cached_sha256
from weightx.io.safetensors import DTYPES, MappedFile, TensorInfo, itemsize

if TYPE_CHECKING:
    from pathlib import Path

    from weightx.io.sources import Source

CACHED_TENSORS = 3  # decoded tensors an artifact reader keeps while the engine's blocks are in flight


def base_mismatch(artifact_alias: str, artifact: ArtifactReader, base_alias: str, base: Source,
                  hashes: dict[str, str] | None = None) -> str | None:
    """Why `base` is not the model the artifact was made against, in one line; None if it may be.

    Compares shard names and sizes, then sha256 where known: Hub blob names, the local hash cache,
    or `hashes` ({path: sha256}, from the run's hasher).
    """
    rec = artifact.base
    made = rec.get("repo_id") or rec.get("source") or "?"
    if rec.get("revision"):
        made += f"@{str(rec['revision'])[:12]}"
    head = (f"base '{base_alias}' ({base.describe()}) is not the model delta artifact '{artifact_alias}' was made"
            f" against ({made})")
    fix = f"; set models.{base_alias} to that exact base"
    files = rec.get("files") or {}
    if sorted(files) != sorted(base.headers):
        return f"{head}: its shards are {', '.join(sorted(base.headers))[:200]}, the artifact records {', '.join(sorted(files))[:200]}{fix}"
    for shard, info in sorted(files.items()):
        path = base.headers[shard].path
        size = path.stat().st_size
        if info.get("size") is not None and int(info["size"]) != size:
            return f"{head}: {shard} is {size:,} bytes, the artifact records {int(info['size']):,}{fix}"
        want = info.get("sha256")
        have = base.sha256.get(shard) or (hashes or {}).get(str(path)) or cached_sha256(path)
        if want and have and want != have:
            return f"{head}: {shard} has sha256 {have[:12]}…, the artifact records {want[:12]}…{fix}"
    return None


def stored_shape(entry: dict) -> tuple[int, ...]:
    """The shape a compressed tensor's parts encode: its own, or with the last two axes swapped when the
    record says `transposed` (a per-row codec on a matrix whose outputs are columns)."""
    shape = tuple(entry["shape"])
    return shape[:-2] + (shape[-1], shape[-2]) if entry.get("transposed") else shape


def _base_ok(base: object) -> bool:
    """The recorded base: optional text fields, and per shard an optional size (int) and sha256 (text)."""
    if not isinstance(base, dict) or not all(isinstance(base.get(k), (str, type(None))) for k in ("alias", "source", "repo_id", "revision", "kind")):
        return False
    files = base.get("files", {})
    return isinstance(files, dict) and all(
        isinstance(f, dict) and (f.get("size") is None or (isinstance(f["size"], int) and not isinstance(f["size"], bool)))
        and isinstance(f.get("sha256"), (str, type(None))) for f in files.values())


class ArtifactReader:
    """Decodes the compressed tensors of a delta artifact folder (parts are mmap'd, zero-copy)."""

    def __init__(self, src: Source, meta: dict):
        delta = meta.get("delta")
        where = src.root / "weightx.json"
        if not isinstance(delta, dict) or delta.get("encoding") != ENCODING:
            raise InputError(f"{where}: output.format is delta but there is no '{ENCODING}' record; the artifact is damaged or from another tool")
        if not isinstance(delta.get("version"), int) or delta["version"] > VERSION:
            raise InputError(f"{where}: delta encoding version {delta.get('version')!r} is newer than this weightx reads ({VERSION}); upgrade weightx")
        self.root = src.root
        base, tensors = delta.get("base", {}), delta.get("tensors", {})
        if not isinstance(tensors, dict) or not isinstance(delta.get("model"), (str, type(None))) or not _base_ok(base):
            raise InputError(f"{where}: the delta record's base, model or tensors field has the wrong type; the artifact is damaged, re-download it")
        self.base: dict = base
        self.model: str | None = delta.get("model")
        self.codecs: dict[str, dict] = {}
        self.raw_map = dict(src.weight_map)
        self.headers = src.headers
        for name, entry in tensors.items():
            self.codecs[name] = self._checked(where, name, entry)
        self.virtual = {
            name: TensorInfo(name, e["dtype"], tuple(e["shape"]), 0, math.prod(e["shape"]) * itemsize(e["dtype"]))
            for name, e in self.codecs.items()
        }
        self._maps: dict[str, MappedFile] = {}
        self._lock = threading.Lock()
        self._maps_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def _checked(self, where: Path, name: str, entry: object) -> dict:
        """One compressed tensor's record, checked against the codec and the part headers before use."""
        if not isinstance(entry, dict) or not isinstance(entry.get("codec"), str) or entry["codec"] not in CODEC_PARAMS:
            raise InputError(f"{where}: tensor {name!r} has unknown codec {entry.get('codec') if isinstance(entry, dict) else entry!r}; upgrade weightx")
        shape = entry.get("shape")
        if (not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPES or not isinstance(shape, list) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)
                or math.prod(shape) >= 1 << 62):
            raise InputError(f"{where}: tensor {name!r} has no valid shape/dtype record; the artifact is damaged, re-download it")
        codec, n = entry["codec"], math.prod(shape)
        params = {k: v for k, v in entry.items() if k in CODEC_PARAMS[codec]}
        if entry.get("transposed", False) not in (True, False) or (entry.get("transposed") and len(shape) < 2):
            raise InputError(f"{where}: tensor {name!r} has an invalid transposed flag {entry.get('transposed')!r}; the artifact is damaged, re-download it")
        stored = stored_shape(entry)
        if codec == "bitdelta":
            ok = params.get("bits") in range(1, 9) and params.get("group") in ("tensor", "row") and not isinstance(params.get("bits"), bool)
            specs = bitdelta_parts(stored, params["bits"], params["group"]) if ok else {}
        elif codec == "sparse":
            k = params.get("k")
            ok = (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= n and params.get("positions") in ("index", "mask")
                  and entry["dtype"] in ("F32", "F16", "BF16", "F64"))
            specs = sparse.part_specs(tuple(shape), entry["dtype"], k, params["positions"]) if ok else {}
        else:
            k = params.get("k")
            ok = isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= n
            specs = ternary_parts(tuple(shape), k) if ok else {}
        if not ok:
            raise InputError(f"{where}: tensor {name!r} has invalid {codec} parameters {params}; the artifact is damaged, re-download it")
        for sfx, (dtype, part_shape) in specs.items():
            key = f"{name}.{sfx}"
            shard = self.raw_map.get(key)
            if shard is None:
                raise InputError(f"{self.root}: compressed tensor {name!r} lacks its {sfx} part; the artifact is incomplete, re-download it")
            info = self.headers[shard].tensors[key]
            if info.dtype != dtype or tuple(info.shape) != tuple(part_shape):
                raise InputError(f"{self.root / shard}: part {key} is {info.dtype}{list(info.shape)} where {codec} with"
                                 f" {params} stores {dtype}{list(part_shape)}; the artifact is damaged, re-download it")
        return entry

    def is_compressed(self, name: str) -> bool:
        return name in self.codecs

    def logical_weight_map(self) -> dict[str, str]:
        parts = {f"{n}.{s}" for n in self.codecs for s in SUFFIXES}
        wm = {n: s for n, s in self.raw_map.items() if n not in parts}
        wm.update({n: self.raw_map[f"{n}.values" if e["codec"] == "sparse" else f"{n}.packed"] for n, e in self.codecs.items()})
        return wm

    def is_sparse(self, name: str) -> bool:
        """A tensor stored as the output's differing values: decoding it needs the base's values."""
        e = self.codecs.get(name)
        return e is not None and e["codec"] == "sparse"

    def _sparse(self, name: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted positions, values) of a sparse tensor, decoded once and cached."""
        key = ("sparse", name, str(device))
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                entry = self.codecs[name]
                parts = self.parts(name)
                kind = entry["positions"]
                try:
                    pos = sparse.decode_positions(parts[kind], math.prod(entry["shape"]), entry["k"], kind).to(device)
                except ValueError as e:
                    raise InputError(f"{self.root}: sparse tensor {name!r} cannot be decoded ({e}); the artifact is damaged, re-download it") from None
                hit = self._cache[key] = (pos, parts["values"].to(device))
                while len(self._cache) > CACHED_TENSORS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return hit

    def sparse_delta(self, name: str, start: int, count: int, base: torch.Tensor) -> torch.Tensor:
        """Elements [start, start+count) of a sparse tensor's delta against `base` (that block of the
        base, float32): the stored output rebuilt on the base, minus the base. A new float32 tensor."""
        pos, values = self._sparse(name, base.device)
        lo, hi = (int(x) for x in torch.searchsorted(pos, torch.tensor([start, start + count], device=pos.device)))
        dtype = DTYPES[self.codecs[name]["dtype"]]
        out = sparse.rebuild(base.to(dtype), pos[lo:hi] - start, values[lo:hi])
        return out.to(torch.float32).sub_(base.reshape(-1))

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        with self._maps_lock:
            return self._parts(name)

    def _parts(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for sfx in SUFFIXES:
            key = f"{name}.{sfx}"
            shard = self.raw_map.get(key)
            if shard is None:
                continue
            mf = self._maps.get(shard)
            if mf is None:
                mf = self._maps[shard] = MappedFile(self.headers[shard])
            out[sfx] = mf.tensor(key).view(self.headers[shard].tensors[key].shape)
        return out

    def decode(self, name: str, device: torch.device | str = "cpu", base: torch.Tensor | None = None) -> torch.Tensor:
        """The dense float32 delta of one compressed tensor (a sparse one needs its `base`, float32)."""
        entry = self.codecs[name]
        if entry["codec"] == "sparse":
            if base is None:
                raise ValueError(f"sparse tensor {name!r} decodes against its base; pass base=")
            return self.sparse_delta(name, 0, math.prod(entry["shape"]), base.to(device).reshape(-1)).view(tuple(entry["shape"]))
        params = {k: v for k, v in entry.items() if k in CODEC_PARAMS[entry["codec"]]}
        parts = {k: v.to(device) for k, v in self.parts(name).items()}
        try:
            out = DECODERS[entry["codec"]](parts, stored_shape(entry), **params)
            return out.transpose(-1, -2).contiguous() if entry.get("transposed") else out
        except ValueError as e:  # a part whose content is not a valid code (e.g. a corrupt mask)
            raise InputError(f"{self.root}: compressed tensor {name!r} cannot be decoded ({e}); the artifact is damaged, re-download it") from None

    def decoded(self, name: str, start: int, count: int, device: torch.device) -> torch.Tensor:
        """Elements [start, start+count) of the flat decoded delta: a fresh float32 tensor on `device`.

        The engine computes blocks of a few tensors at once on a thread pool: each tensor is decoded
        once (under a lock) and the last few stay cached while their blocks are taken.
        """
        key = (name, str(device))
        with self._lock:
            full = self._cache.get(key)
            if full is None:
                full = self._cache[key] = self.decode(name, device).reshape(-1)
                while len(self._cache) > CACHED_TENSORS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return full[start:start + count].clone()

    def release(self) -> None:
        with self._lock:
            self._cache.clear()


def attach_artifact(src: Source) -> None:
    """Make a delta artifact folder's Source list logical tensors and carry its reader."""
    reader = ArtifactReader(src, src.weightx_meta or {})
    src.weight_map = reader.logical_weight_map()
    src.artifact = reader


def is_artifact_meta(meta: dict | None) -> bool:
    return isinstance(meta, dict) and (meta.get("output") or {}).get("format") == "delta"


