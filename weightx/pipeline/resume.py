"""Resuming a killed run from the shards it finished.

While a run writes, each shard that is complete (closed and fsynced) is recorded with its size and
the sha256 computed as it was written, in `.weightx-resume-<rank>.json` inside the temporary folder.
The record carries a fingerprint of everything that decides the shard bytes: the recipe as run, the
shard layout, the identity of every input file (path, size, mtime, or Hub sha256), the device type
and the versions of weightx and torch. A rerun with the same fingerprint re-hashes each recorded
shard and moves the ones that still match into its own temporary folder instead of recomputing them,
so its output is byte-identical to an uninterrupted run. Anything that does not match is recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from weightx.version import __version__
from weightx.io.lock import output_lock
from weightx.io.output import RESUME_PREFIX, make_temp, stale_temps, write_failed
from weightx.io.provenance import sha256_file
from weightx.io.safetensors import ShardWriter
from weightx.pipeline.plan import Plan
from weightx.pipeline.compute import TensorStats


def fingerprint(plan: Plan, device_type: str) -> str:
    import torch

    recipe = plan.recipe.recipe_form()
    recipe.setdefault("output", {})["path"] = str(plan.out_path)
    inputs = {}
    for alias, src in plan.sources.items():
        files = {}
        for shard, header in src.headers.items():
            st = header.path.stat()
            # ctime and inode change on any rewrite, even one that puts size and mtime back
            files[shard] = src.sha256.get(shard) or [str(header.path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        inputs[alias] = files
    layout = [[s.filename, [[o.name, o.dtype, list(o.shape)] for t in s.tensors for o in t.outs]] for s in plan.shards]
    doc = {"weightx": __version__, "torch": torch.__version__, "device": device_type,
           "recipe": recipe, "inputs": inputs, "layout": layout}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def start_output(out_path: Path, overwrite: bool, held: contextlib.ExitStack, fp: str, wanted: set[str]) -> tuple[str, dict]:
    """Take the output lock (kept in `held`), make the temporary folder, adopt finished shards."""
    try:
        held.enter_context(output_lock(out_path))
        tmp = make_temp(out_path, overwrite)
        try:
            return str(tmp), adopt(out_path, tmp, fp, wanted)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_failed(out_path, e) from None
    except BaseException:
        held.close()
        raise


class ResumeLog:
    """The record of finished shards in a temporary folder; written atomically after each shard.

    `add` is the engine's on_shard callback (it runs on the writer thread once a shard is fsynced)."""

    def __init__(self, plan: Plan, folder: Path, fp: str, rank: int = 0, adopted: dict[str, dict] | None = None):
        self.path = folder / f"{RESUME_PREFIX}-{rank}.json"
        self.fp = fp
        self.by_file = {s.filename: s for s in plan.shards}
        self.shards: dict[str, dict] = dict(adopted or {})
        if adopted and rank == 0:
            try:
                self._save()  # so a second kill keeps them too
            except OSError:
                pass  # best effort: a disk that cannot take this small file fails the run at the first shard

    def add(self, writer: ShardWriter, stats: dict) -> None:
        shard = self.by_file[writer.path.name]
        self.shards[writer.path.name] = {
            "sha256": writer.sha256, "size": writer.total,
            "stats": {t.name: stats[t.name].as_dict() for t in shard.tensors if stats.get(t.name) is not None},
        }
        self._save()

    def stats(self, names: set[str]) -> dict:
        """TensorStats of the tensors in the adopted shards named, as their first run computed them."""
        keys = ("delta_norm", "edited_norm", "combined_norm")
        out = {}
        for name in names:
            for tname, d in self.shards.get(name, {}).get("stats", {}).items():
                out[tname] = TensorStats(*(d[k] for k in keys), extra={k: v for k, v in d.items() if k not in keys})
        return out

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": self.fp, "shards": self.shards}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def clear(folder: Path) -> None:
    """Remove every rank's record: the folder is about to become the output."""
    for p in folder.glob(f"{RESUME_PREFIX}-*"):
        p.unlink(missing_ok=True)


def _records(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob(f"{RESUME_PREFIX}-*.json")):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("shards"), dict):
            out.append(doc)
    return out


def adopt(out_path: Path, tmp: Path, fp: str, wanted: set[str]) -> dict[str, dict]:
    """Move verified finished shards of killed runs into `tmp`; remove the killed runs' folders.

    Returns {shard file name: its record entry} for the shards taken. Call with the output lock held."""
    taken: dict[str, dict] = {}
    for folder in stale_temps(out_path):
        if folder == tmp or not folder.is_dir():
            continue
        for doc in _records(folder):
            if doc.get("fingerprint") != fp:
                continue
            for name, entry in doc["shards"].items():
                if name in taken or name not in wanted or not isinstance(entry, dict):
                    continue
                f = folder / name
                try:
                    ok = f.stat().st_size == entry.get("size") and sha256_file(f) == entry.get("sha256")
                except OSError:
                    ok = False
                if ok:
                    os.rename(f, tmp / name)
                    taken[name] = entry
        shutil.rmtree(folder, ignore_errors=True)
    return taken
