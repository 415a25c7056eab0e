"""One writer per output path: an `flock` on `.<name>.weightx-lock` next to the output.

The kernel drops an flock when its holder dies, so a SIGKILLed run never leaves a stale lock behind.
The lock file is removed on release; because another process may have opened it just before the
unlink, a new holder checks that the file it locked is still the one at the path, and retries if not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from weightx.errors import OutputBusyError, OutputError

LOCK_TAG = ".weightx-lock"


def lock_path(out_path: Path) -> Path:
    return out_path.parent / f".{out_path.name}{LOCK_TAG}"


@contextlib.contextmanager
def output_lock(out_path: Path) -> Iterator[Path]:
    """Hold the output's lock for the duration of the block, or raise OutputBusyError at once."""
    path = lock_path(out_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {path.parent} for the output: {e.strerror or e}; choose another output path") from None
    while True:
        try:
            # O_NOFOLLOW: a planted symlink is refused, never followed; O_NONBLOCK: a planted FIFO
            # cannot hang us. Nothing is truncated until the file is known to be our own lock.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"{path} is a symbolic link where weightx keeps the output's lock; remove it") from None
            raise OutputError(f"cannot create the lock file {path}: {e.strerror or e}; check that {path.parent} is writable") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise OutputError(f"{path} is not a weightx lock file (a special file or a hard link to another file); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputBusyError(
                    f"another weightx run is writing {out_path} (it holds {path}); wait for it to finish or choose another output path"
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a file its previous holder had just unlinked: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for humans wondering who holds it
    except OSError:
        pass  # a full disk must not stop us from reporting the real error later
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it, so nobody can lock the file we are removing
        os.close(fd)
