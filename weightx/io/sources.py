"""Model sources: a local HF folder, one .safetensors file, or a Hub id `org/name[@revision]`.

Resolution reads only headers. Hub ids go through huggingface_hub's cache (so HF_HUB_OFFLINE and
HF_HOME are honoured) and their shard hashes come free from the LFS blob names.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightx.errors import InputError, InputNotFoundError
from weightx.io.artifact import attach_artifact, is_artifact_meta
from weightx.io.files import read_regular
from weightx.io.safetensors import Header, TensorInfo, name_problem, read_header
from weightx.io.staging import PICKLE_INDEX, refusal, stage, weight_pickles

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Source:
    alias: str
    spec: str
    kind: str  # "local" | "file" | "hub"
    root: Path  # the folder holding config/tokenizer files (a file's parent for "file")
    headers: dict[str, Header]  # shard file name -> header
    weight_map: dict[str, str]  # tensor name -> shard file name
    repo_id: str | None = None
    revision: str | None = None  # resolved commit for hub sources
    sha256: dict[str, str] = field(default_factory=dict)  # known shard hashes (hub blobs)
    weightx_meta: dict | None = None  # the weightx.json of a weightx output, if it is one
    # A weightx delta artifact's reader (weightx.io.artifact.ArtifactReader): the source then lists
    # logical tensors, and compressed ones are decoded rather than read.
    artifact: Any = None
    # Prefix rules (A, B) under which this input is read: the config model's name A + s is this input's
    # B + s (`weightx.io.names`); () when the names match.
    renames: tuple[tuple[str, str], ...] = ()
    # FP8 block-scaled weights (`weightx.io.quantized`): weight name → (shard, TensorInfo) of its
    # `_scale_inv` tensor, which the weight map then no longer lists; and the block size.
    fp8: dict[str, tuple[str, Any]] = field(default_factory=dict)
    fp8_block: tuple[int, int] = (128, 128)
    # MXFP4 weights (`weightx.io.quantized.Mxfp4`) by their logical name, listed in the weight map
    # instead of their `_blocks`/`_scales` parts.
    mxfp4: dict[str, Any] = field(default_factory=dict)

    def info(self, name: str) -> TensorInfo:
        if self.artifact is not None and name in self.artifact.virtual:
            return self.artifact.virtual[name]
        if name in self.mxfp4:
            return self.mxfp4[name].info
        return self.headers[self.weight_map[name]].tensors[name]

    def path_of(self, shard: str) -> Path:
        return self.headers[shard].path

    @property
    def has_config(self) -> bool:
        return self.kind != "file" and (self.root / "config.json").exists()

    @property
    def total_bytes(self) -> int:
        return sum(h.path.stat().st_size for h in self.headers.values())

    def describe(self) -> str:
        if self.kind == "hub":
            return f"{self.repo_id}@{(self.revision or '')[:12]}"
        return str(self.root if self.kind == "local" else self.root / next(iter(self.headers)))


def _safe_shard_name(name: object, where: Path) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise InputError(f"{where}: refusing shard name {name!r}: shard names must be plain file names in the same folder")
    return name


MAX_JSON_BYTES = 64 << 20  # an index of a 1T-parameter model is a few MB


def _read_index(index: Path) -> dict:
    try:
        if index.stat().st_size > MAX_JSON_BYTES:
            raise ValueError
        doc = json.loads(read_regular(index).decode("utf-8"))
        weight_map_raw = doc["weight_map"]
        if not isinstance(weight_map_raw, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise InputError(f"{index}: not a valid safetensors index (needs a weight_map object); re-download it") from None
    for name in weight_map_raw:
        if why := name_problem(name):
            raise InputError(f"{index}: refusing tensor name {name!r}: {why}")
    return weight_map_raw


def _from_folder(alias: str, spec: str, root: Path, allow_pickle: bool = False) -> Source:
    index = root / INDEX_NAME
    if not index.is_file() and not (root / SINGLE_NAME).is_file() and not any(root.glob("*.safetensors")):
        if (root / PICKLE_INDEX).is_file() or weight_pickles(root):
            if not allow_pickle:
                raise InputError(refusal(root, [PICKLE_INDEX] if (root / PICKLE_INDEX).is_file() else weight_pickles(root)))
            return _from_pickles(alias, spec, root)
    if index.is_file():
        weight_map_raw = _read_index(index)
        shards = {_safe_shard_name(f, index) for f in weight_map_raw.values()}
        headers = {}
        for shard in sorted(shards):
            p = root / shard
            if not p.exists():
                raise InputError(f"{index}: names shard {shard!r}, which is missing from {root}; re-download the model")
            headers[shard] = read_header(p)
        weight_map = {}
        for name, shard in weight_map_raw.items():
            if name not in headers[shard].tensors:
                raise InputError(f"{index}: lists tensor {name!r} in {shard}, but that shard does not contain it")
            weight_map[name] = shard
        for shard, h in headers.items():  # tensors a shard holds but the index forgot still exist
            for name in h.tensors:
                weight_map.setdefault(name, shard)
    elif (root / SINGLE_NAME).is_file():
        headers = {SINGLE_NAME: read_header(root / SINGLE_NAME)}
        weight_map = {n: SINGLE_NAME for n in headers[SINGLE_NAME].tensors}
    else:
        others = sorted(p.name for p in root.glob("*.safetensors"))
        if len(others) == 1:
            headers = {others[0]: read_header(root / others[0])}
            weight_map = {n: others[0] for n in headers[others[0]].tensors}
        else:
            raise InputError(f"{root}: no {INDEX_NAME} or {SINGLE_NAME} here; is this a Hugging Face model folder?")
    meta = None
    wx = root / "weightx.json"
    if wx.is_file():
        try:
            if wx.stat().st_size > MAX_JSON_BYTES:
                raise ValueError
            meta = json.loads(read_regular(wx).decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            raise InputError(f"{wx}: unreadable weightx.json; the folder may be from an interrupted run") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("output", {}), dict):
            raise InputError(f"{wx}: weightx.json is not a weightx record (not an object, or its output field is not);"
                             " the folder is damaged, re-download it")
    src = Source(alias, spec, "local", root, headers, weight_map, weightx_meta=meta)

    if is_artifact_meta(meta):
        attach_artifact(src)
    return src


def _from_pickles(alias: str, spec: str, root: Path) -> Source:
    """A folder of pickle weights, staged as safetensors (allow_pickle: true; see weightx.io.staging)."""
    index = root / PICKLE_INDEX
    if index.is_file():
        listed = _read_index(index)
        files = sorted({_safe_shard_name(f, index) for f in listed.values()})
    else:
        listed, files = {}, weight_pickles(root)
        if len(files) > 1:
            raise InputError(f"{root}: several pickle files ({', '.join(files[:4])}) and no {PICKLE_INDEX}; point models.{alias} at the weights file")
    headers = {}
    for f in files:
        if not (root / f).exists():
            raise InputError(f"{index}: names shard {f!r}, which is missing from {root}; re-download the model")
        headers[f] = stage(root / f)
    weight_map = {}
    for name, f in listed.items():
        if name not in headers[f].tensors:
            raise InputError(f"{index}: lists tensor {name!r} in {f}, but that file does not contain it")
        weight_map[name] = f
    for f, h in headers.items():
        for name in h.tensors:
            weight_map.setdefault(name, f)
    return Source(alias, spec, "local", root, headers, weight_map)


def _from_file(alias: str, spec: str, path: Path) -> Source:
    header = read_header(path)
    return Source(alias, spec, "file", path.parent, {path.name: header}, {n: path.name for n in header.tensors})


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.fullmatch(spec)) and not spec.startswith((".", "/", "~"))


def _from_hub(alias: str, spec: str, allow_pickle: bool = False) -> Source:
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a hard dependency
        raise InputError(f"huggingface_hub is needed for Hub id {spec!r}: {e}") from None
    try:
        patterns = HUB_PATTERNS + (["*.bin", "*.pt", "*.pth"] if allow_pickle else [])
        folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
    except GatedRepoError:
        raise InputError(f"{repo_id} is gated: accept its terms on huggingface.co and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise InputNotFoundError(f"{repo_id} not found on the Hub (or private: log in with `hf auth login`); check the id") from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id} has no revision {revision!r}; check the branch, tag or commit") from None
    except LocalEntryNotFoundError:
        raise InputError(
            f"{spec} is not in the local Hugging Face cache and the Hub is unreachable or HF_HUB_OFFLINE=1;"
            f" download it first (`hf download {repo_id}`) or point models.{alias} at a local folder"
        ) from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot fetch {spec} from the Hub: {' '.join(str(e).split())[:300]}") from None
    src = _from_folder(alias, spec, folder, allow_pickle)
    src.kind, src.repo_id = "hub", repo_id
    src.revision = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else (revision or None)
    for shard, header in src.headers.items():
        try:  # a cached LFS file is a symlink to blobs/<sha256>
            blob = os.path.basename(os.readlink(header.path))
        except OSError:
            continue
        if SHA256.match(blob):
            src.sha256[shard] = blob
    return src


def resolve(alias: str, spec: str, base_dir: Path | None = None, allow_pickle: bool = False) -> Source:
    """Resolve one `models:` entry to a Source, reading headers only (pickles: see weightx.io.staging)."""
    path = Path(os.path.expanduser(spec))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path  # relative paths are the recipe's: never silently the working directory's
    if path.is_dir():
        return _from_folder(alias, spec, path.resolve(), allow_pickle)
    if path.is_file():
        if path.suffix != ".safetensors":
            if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                if not allow_pickle:
                    raise InputError(f"models.{alias}: " + refusal(path, []))
                header = stage(path)
                return Source(alias, spec, "file", path.resolve().parent, {path.name: header}, {n: path.name for n in header.tensors})
            raise InputError(f"models.{alias}: {spec} is not a .safetensors file or a model folder")
        return _from_file(alias, spec, path.resolve())
    if looks_like_hub_id(spec):
        try:
            return _from_hub(alias, spec, allow_pickle)
        except InputError as e:  # a local folder meant but missing reads like a Hub id: say both
            if base_dir is None or Path(os.path.expanduser(spec)).is_absolute():
                raise
            raise type(e)(f"{e} (there is no folder at {path.absolute()} either: relative paths are taken from the recipe's folder)") from None
    where = f" (looked for {path.absolute()}: relative paths are taken from the recipe's folder)" if not Path(os.path.expanduser(spec)).is_absolute() else ""
    raise InputNotFoundError(f"models.{alias}: {spec!r} does not exist{where}; give a local folder, a .safetensors file or a Hub id org/name[@revision]")


def model_type(src: Source) -> str | None:
    """config.json's model_type of a source, or None (no config, or not readable)."""
    if not src.has_config:
        return None
    try:
        doc = json.loads(read_regular(src.root / "config.json").decode("utf-8"))
    except (InputError, OSError, ValueError, RecursionError):
        return None
    return doc["model_type"] if isinstance(doc, dict) and isinstance(doc.get("model_type"), str) else None
