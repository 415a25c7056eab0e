"""The output folder: built in a temporary sibling, completed by weightx.json, renamed into place.

A folder at output.path therefore always holds a finished run. Leftovers of killed runs are
temporary siblings named `.<name>.weightx-tmp-<pid>-<n>` and are swept by the next run (after it
took the shards they finished, see weightx.pipeline.resume). Replacing an existing output is one atomic
exchange of the two folders where the kernel offers it (renameat2), else two renames whose
in-between state the next run repairs.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import shutil
from pathlib import Path

from weightx.errors import OutputError, UsageError
from weightx.io.files import copyable, is_regular, open_regular
from weightx.io.safetensors import text_problem

CONFIG_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "vocab.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)
TMP_TAG = ".weightx-tmp-"
RESUME_PREFIX = ".weightx-resume"  # a temp folder holding one of these is kept for the next run to resume from
_counter = itertools.count()


def write_failed(out_path: Path, e: OSError) -> OutputError:
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "a file grew past the size limit (ulimit -f)", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(e.errno or 0, e.strerror or str(e))
    keep = "the previous output is unchanged" if out_path.exists() else "nothing was written there"
    return OutputError(f"cannot write {out_path}: {what}; the temporary files were removed and {keep}")


def check_path(out_path: Path) -> None:
    """Output paths end up in weightx.json, the card and messages: they must be printable UTF-8."""
    why = text_problem(str(out_path))
    if why:
        raise UsageError(f"output path {str(out_path)!r} contains {why}; choose a plain name")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(out_path: Path) -> list[Path]:
    """Temporary siblings of out_path left by runs that are no longer alive (oldest name first)."""
    prefix = f".{out_path.name}{TMP_TAG}"
    if not out_path.parent.is_dir():
        return []
    found = []
    for p in sorted(out_path.parent.iterdir()):
        if p.name.startswith(prefix):
            pid = p.name[len(prefix):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                found.append(p)
    return found


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / "weightx.json").read_text(encoding="utf-8")).get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        return False


def sweep_stale(out_path: Path, keep_resumable: bool = False) -> None:
    """Remove temporary siblings left by runs that are no longer alive.

    A run killed between the two renames of a non-atomic replace left out_path missing and the
    previous output in a `-old-` sibling: that one is put back, never deleted."""
    stale = stale_temps(out_path)
    if not out_path.exists():
        for p in stale:
            if "-old-" in p.name and _is_complete(p):
                os.rename(p, out_path)
                stale.remove(p)
                break
    for p in stale:
        if keep_resumable and p.is_dir() and any(q.name.startswith(RESUME_PREFIX) for q in p.iterdir()):
            continue
        shutil.rmtree(p, ignore_errors=True)


def check_replaceable(out_path: Path, overwrite: bool) -> None:
    """What may stand at the output path: nothing, an empty folder, or (with --overwrite) a previous
    weightx output. A symlink is never followed into another folder's contents, and nothing that
    holds the working directory or isn't ours is ever replaced."""
    if out_path.is_symlink():
        raise UsageError(f"{out_path} is a symbolic link; weightx writes a folder there and never replaces what a link"
                         " points to: give the real path, or remove the link")
    if not out_path.exists():
        return
    if not out_path.is_dir():
        raise UsageError(f"{out_path} exists and is not a folder; remove it or choose another output path")
    try:
        empty = not any(out_path.iterdir())
    except OSError as e:
        raise UsageError(f"{out_path} cannot be listed ({e.strerror or e}); choose another output path") from None
    if empty:
        return
    if not overwrite:
        raise UsageError(f"{out_path} already exists; pass --overwrite to replace it, or choose another output path")
    cwd = Path.cwd().resolve()
    if cwd == out_path.resolve() or out_path.resolve() in cwd.parents:
        raise UsageError(f"{out_path} holds the current directory; --overwrite never replaces it: choose another output path")
    marker = out_path / "weightx.json"
    if marker.is_symlink() or not is_regular(marker):
        raise UsageError(f"{out_path} is not a weightx output (it has no weightx.json) and is not empty; --overwrite"
                         " replaces only a previous weightx output or an empty folder: choose another output path")


def make_temp(out_path: Path, overwrite: bool) -> Path:
    check_path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out_path, keep_resumable=True)  # first: it may put back an output a killed run had moved aside
    except OSError as e:
        raise write_failed(out_path, e) from None
    check_replaceable(out_path, overwrite)
    tmp = out_path.parent / f".{out_path.name}{TMP_TAG}{os.getpid()}-{next(_counter)}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise write_failed(out_path, e) from None
    return tmp


def copy_config(src_root: Path, dst: Path, out_dtype: str | None, drop: tuple[str, ...] = ()) -> list[str]:
    """Copy config, tokenizer and generation files; only regular files that live in the model folder
    (a symlink out of it, a FIFO or a device is refused in one line, before anything is copied).
    `drop`: config.json keys that no longer describe the output (a dequantized input's quantization_config)."""
    names = [name for name in CONFIG_FILES if copyable(src_root / name, src_root)]
    copied = []
    for name in names:
        with os.fdopen(open_regular(src_root / name), "rb") as src, open(dst / name, "wb") as out:
            shutil.copyfileobj(src, out)
        copied.append(name)
    cfg = dst / "config.json"
    if cfg.is_file() and (out_dtype or drop):
        try:
            doc = json.loads(cfg.read_text(encoding="utf-8"))
        except ValueError:
            return copied
        if not isinstance(doc, dict):
            return copied
        # transformers 5 writes "dtype", 4.x "torch_dtype"; keep whichever is there truthful.
        keys = [k for k in ("dtype", "torch_dtype") if k in doc] or ["torch_dtype"]
        for k in keys if out_dtype else []:
            doc[k] = out_dtype
        for k in drop:
            doc.pop(k, None)
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


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the kernel or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def finalize(tmp: Path, out_path: Path) -> None:
    """Move a complete temp folder into place; an old output is replaced only after that succeeds."""
    _fsync_dir(tmp)
    if out_path.exists() and _exchange(tmp, out_path):
        _fsync_dir(out_path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output; a kill here leaves a stale temp, swept later
        return
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


def keep_beside(tmp: Path, out_path: Path) -> Path:
    """Keep a complete but rejected candidate next to the output it must not replace; its new path."""
    for n in itertools.count(1):
        beside = out_path.parent / f"{out_path.name}.rejected{'' if n == 1 else f'-{n}'}"
        if not beside.exists() and not beside.is_symlink():
            os.rename(tmp, beside)
            _fsync_dir(out_path.parent)
            return beside
    raise AssertionError("unreachable")


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
