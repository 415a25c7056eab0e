"""Input hashes for weightx.json without a second pass over the inputs.

Hub shards are named by their sha256 in the cache. Local shards are hashed on a background thread
while the engine streams (the pages are hot), and cached by (path, size, mtime) so reruns are free.
The CLI starts that thread (`prehash`) before it imports torch, which keeps one core busy for a
second while the other only imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from weightx.io.files import is_regular, open_regular

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


def cached_sha256(path: Path) -> str | None:
    """The sha256 an earlier run recorded for this file (by path, size and mtime), or None."""
    try:
        return _load_cache().get(_key(path))
    except OSError:
        return None


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
    # One reused buffer: a fresh 8 MB bytes per read leaves freed heap behind in the thread's
    # malloc arena, which counts against the run's peak private memory.
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with os.fdopen(open_regular(path), "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


_inflight: dict[str, "Hasher"] = {}  # str(path) → the prehash thread hashing it
_inflight_lock = threading.Lock()


def prehash(paths: list[Path]) -> None:
    """Start hashing files now (on a daemon thread); a later Hasher of the same file waits for it."""
    with _inflight_lock:
        todo = [p for p in paths if os.path.realpath(p) not in _inflight]
        if not todo:
            return
        h = Hasher(todo, early=True)
        for p in todo:
            _inflight[os.path.realpath(p)] = h


def prehash_recipe(recipe: str | Path) -> None:
    """`prehash` the local safetensors a recipe file names under `models`, best effort: this runs
    before the recipe is validated (whose errors are reported later, properly), so anything
    unexpected just means no early start. YAML is only composed (aliases are not expanded)."""
    import yaml

    try:
        path = Path(recipe)
        if not is_regular(path) or path.stat().st_size > 1 << 20:
            return  # a pipe (`<(cat recipe.yaml)`) can be read once only: by the recipe loader
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        if not isinstance(root, yaml.MappingNode):
            return
        models = next((v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "models"), None)
        if not isinstance(models, yaml.MappingNode):
            return
        files: list[Path] = []
        for _, v in models.value:
            if isinstance(v, yaml.ScalarNode) and v.value:
                where = path.parent / os.path.expanduser(v.value)
                if where.is_dir():
                    files += sorted(p for p in where.glob("*.safetensors") if is_regular(p))
                elif where.suffix == ".safetensors" and is_regular(where):
                    files.append(where)
        prehash(files)
    except Exception:
        return


class Hasher:
    """Hashes files in the background; `result()` waits and returns {str(path): sha256}."""

    def __init__(self, paths: list[Path], early: bool = False):
        self._early = early
        self._paths = paths
        self._out: dict[str, str] = {}
        self._keys: dict[str, str] = {}  # str(path) → the (path, size, mtime) key it was hashed under
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="weightx-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            cache, new = _load_cache(), {}
            for p in self._paths:
                key = _key(p)
                early = None if self._early else _inflight.get(os.path.realpath(p))
                digest = cache.get(key) or (early is not None and early.digest(p, key)) or sha256_file(p)
                if key not in cache:
                    new[key] = digest
                self._out[str(p)] = digest
                self._keys[str(p)] = key
            _store_cache(new)
        except BaseException as e:  # surfaced by result()
            self._error = e

    def digest(self, path: Path, key: str) -> str | None:
        """This (early) hasher's digest of path, if it hashed the same file version."""
        self._thread.join()
        d = self._out.get(str(path))
        return d if d is not None and self._keys.get(str(path)) == key else None

    def result(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out
