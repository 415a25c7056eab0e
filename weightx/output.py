"""The output folder: built in a temporary sibling, completed by weightx.json, renamed into place.

A folder at output.path therefore always holds a finished run. Leftovers of killed runs are
temporary siblings named `.<name>.weightx-tmp-<pid>-<n>` and are swept by the next run.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

from weightx.errors import UsageError

CONFIG_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "vocab.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)
TMP_TAG = ".weightx-tmp-"
_counter = itertools.count()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(out_path: Path) -> None:
    """Remove temporary siblings left by runs that are no longer alive."""
    prefix = f".{out_path.name}{TMP_TAG}"
    if not out_path.parent.is_dir():
        return
    for p in out_path.parent.iterdir():
        if p.name.startswith(prefix):
            pid = p.name[len(prefix):].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def make_temp(out_path: Path, overwrite: bool) -> Path:
    if out_path.exists() and not overwrite:
        raise UsageError(f"{out_path} already exists; pass --overwrite to replace it, or choose another output path")
    if out_path.exists() and not out_path.is_dir():
        raise UsageError(f"{out_path} exists and is not a folder; remove it or choose another output path")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_path)
    tmp = out_path.parent / f".{out_path.name}{TMP_TAG}{os.getpid()}-{next(_counter)}"
    tmp.mkdir()
    return tmp


def copy_config(src_root: Path, dst: Path, out_dtype: str | None) -> list[str]:
    copied = []
    for name in CONFIG_FILES:
        p = src_root / name
        if p.is_file():
            shutil.copyfile(p, dst / name)
            copied.append(name)
    cfg = dst / "config.json"
    if cfg.is_file() and out_dtype:
        try:
            doc = json.loads(cfg.read_text(encoding="utf-8"))
        except ValueError:
            return copied
        # transformers 5 writes "dtype", 4.x "torch_dtype"; keep whichever is there truthful.
        keys = [k for k in ("dtype", "torch_dtype") if k in doc] or ["torch_dtype"]
        for k in keys:
            doc[k] = out_dtype
        cfg.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return copied


def write_json(path: Path, doc: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finalize(tmp: Path, out_path: Path) -> None:
    """Move a complete temp folder into place; an old output is replaced only after that succeeds."""
    _fsync_dir(tmp)
    if out_path.exists():
        old = out_path.parent / f".{out_path.name}{TMP_TAG}{os.getpid()}-old-{next(_counter)}"
        os.rename(out_path, old)
        try:
            os.rename(tmp, out_path)
        except OSError:
            os.rename(old, out_path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_path)
    _fsync_dir(out_path.parent)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
