"""Opening files from folders weightx does not control, safely.

A stranger's model folder can hold symlinks to files outside it (`vocab.txt -> ~/.cache/huggingface/token`,
`tokenizer.json -> /proc/self/environ`) and special files (a FIFO named `model.safetensors` blocks
any `open` forever). Every input weightx reads goes through `open_regular`, which never blocks on a
special file; every file weightx copies into an output goes through `copyable`, which allows only
regular files that live inside the model folder (or in the Hugging Face cache's blobs, where a
snapshot's symlinks point).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from weightx.errors import InputError


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of the regular file at `path` (symlinks followed). A special file is
    an InputError; a missing or unreadable one raises the OSError, as `open` would.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the type is then
    checked on the descriptor itself, so a file swapped in after a `stat` cannot slip through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"{path} is {_kind(mode)}, not a file; weightx reads only regular files (remove it or point at the real file)")
    os.set_blocking(fd, True)
    return fd


def read_regular(path: str | Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file (at most `limit`), never blocking on a special file."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read() if limit is None else f.read(limit)


def is_regular(path: Path) -> bool:
    """A regular file (symlinks followed) — what `Path.is_file` says, without opening anything."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _hub_blobs(root: Path) -> Path | None:
    """The blobs folder of a Hugging Face cache snapshot `<repo>/snapshots/<rev>`, else None."""
    return root.parent.parent / "blobs" if root.parent.name == "snapshots" else None


def copyable(path: Path, root: Path) -> bool:
    """Whether `path` (an entry of the model folder `root`) may be copied into an output: False when
    it does not exist; InputError (one line naming it) when it is a symlink leading out of the
    folder or anything but a regular file."""
    if not path.is_symlink() and not path.exists():
        return False
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InputError(f"{path} is a broken or looping symlink; remove it from the model folder") from None
    inside = [root.resolve()] + ([b.resolve()] if (b := _hub_blobs(root)) is not None and b.is_dir() else [])
    if not any(target == r or r in target.parents for r in inside):
        raise InputError(f"{path} is a symlink to {target}, outside the model folder; weightx copies only files"
                         " that live in the folder (replace the link with the file itself)")
    mode = target.stat().st_mode
    if not stat.S_ISREG(mode):
        raise InputError(f"{path} is {_kind(mode)}, not a file; remove it from the model folder")
    return True
