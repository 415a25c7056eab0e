"""Input hashes for weightx.json without a second pass over the inputs.

Hub shards are named by their sha256 in the cache. Local shards are hashed on a background thread
while the engine streams (the pages are hot), and cached by (path, size, mtime) so reruns are free.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

CHUNK = 8 << 20


def cache_path() -> Path:
    root = os.environ.get("WEIGHTX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "weightx"
    )
    return Path(root) / "sha256.json"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(new: dict[str, str]) -> None:
    if not new:
        return
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_cache()
        data.update(new)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk must not leave litter in the user's cache
            raise
    except OSError:
        pass  # the cache is an optimisation only


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Hasher:
    """Hashes files in the background; `result()` waits and returns {str(path): sha256}."""

    def __init__(self, paths: list[Path]):
        self._paths = paths
        self._out: dict[str, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weightx-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            cache, new = _load_cache(), {}
            for p in self._paths:
                key = _key(p)
                digest = cache.get(key) or sha256_file(p)
                if key not in cache:
                    new[key] = digest
                self._out[str(p)] = digest
            _store_cache(new)
        except BaseException as e:  # surfaced by result()
            self._error = e

    def result(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out
