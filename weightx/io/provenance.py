"""Input hashes for weightx.json without a second pass over the inputs.

Hub shards are named by their sha256 in the cache. Local shards are hashed on background threads
that follow the engine's reads file by file (`Pacer`), so each byte is read from the disk once and
hashed while its page is in the cache, and cached by (path, size, mtime) so reruns are free. The
CLI starts hashing (`prehash`) before it imports torch, on the core the imports leave idle; the
run's paced threads go on from where that got.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from weightx.io.files import is_regular, open_regular

MAX_CACHED = 4096


def hashing_enabled() -> bool:
    """False only under WEIGHTX_BENCH_NO_HASH=1: the benchmark's comparison-only contender that
    prices provenance (benchmarks/run.py `weightx-nohash`). Its outputs record no sha256 at all, so
    `weightx verify` refuses them; the product always hashes."""
    return os.environ.get("WEIGHTX_BENCH_NO_HASH", "") != "1"


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
        # Entries of files that are gone (temporary checkpoints, old downloads) are dropped, and
        # only the newest MAX_CACHED are kept: the cache is read at the start of every run.
        data = {k: v for k, v in data.items() if os.path.exists(k.rsplit("|", 2)[0])}
        data = dict(list(data.items())[-MAX_CACHED:])
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
    """The sha256 of a whole file, read on this thread."""
    run = _Running(path)
    run.advance(None)
    return run.digest


class _Running:
    """One file's hash in progress, so a paced thread can stop anywhere and another can go on from
    there. It is read with pread into a BUFFER-sized (1 MB) buffer that stays in the core's
    L2 and hashed from there: hashing the page-cache pages in place through a mapping ran at 0.99 GB
    per CPU-second on an AVX-512 VM against 1.32 through the buffer (sha256 stalls on every load
    from DRAM; the kernel's copy streams), and pread holds no GIL and cannot SIGBUS on a file that
    shrinks under it."""

    BUFFER = 1 << 20

    def __init__(self, path: Path):
        self.path = path
        self.key = _key(path)
        self.size = path.stat().st_size
        self.pos = 0
        self.digest: str | None = None
        self._h = hashlib.sha256()
        self._lock = threading.Lock()  # one thread hashes a file at a time (early thread, then its paced one)

    def advance(self, limit: int | None, stop: threading.Event | None = None) -> bool:
        """Hash on, up to byte `limit` (None: the end) or until `stop` is set; True once finished."""
        with self._lock:
            self._advance(self.size if limit is None else min(limit, self.size), stop)
            return self._check_done()

    def feed(self, at: int, data: memoryview) -> None:
        """Hash on with file bytes [at, at + len(data)) that a reader already has (`io.stream`): a gap
        before them is read here; bytes already hashed are skipped."""
        with self._lock:
            if self.digest is not None:
                return
            if self.pos < at:
                self._advance(min(at, self.size))
            end = min(at + data.nbytes, self.size)
            if at <= self.pos < end:
                # Fresh from the disk, so staged through L2 (`io.sha256`); imported here because this
                # module loads before torch and numpy, to start hashing during the start-up.
                from weightx.io.sha256 import update_staged

                update_staged(self._h, data[self.pos - at:end - at])
                self.pos = end
            self._check_done()

    def _advance(self, end: int, stop: threading.Event | None = None) -> None:
        if self.pos >= end:
            return
        fd = open_regular(self.path)
        try:
            if os.fstat(fd).st_size != self.size:
                raise OSError(f"{self.path} changed size while weightx hashed it; rerun once it is complete")
            buf = memoryview(bytearray(self.BUFFER))
            while self.pos < end and not (stop is not None and stop.is_set()):
                n = os.preadv(fd, [buf[:min(len(buf), end - self.pos)]], self.pos)  # releases the GIL
                if n == 0:
                    raise OSError(f"{self.path} was truncated while weightx hashed it; rerun once it is complete")
                self._h.update(buf[:n])  # releases the GIL
                self.pos += n
        finally:
            os.close(fd)

    def _check_done(self) -> bool:
        if self.digest is None and self.pos >= self.size:
            self.digest = self._h.hexdigest()
        return self.digest is not None


class Pacer:
    """Keeps the input hashes next to the engine's reads, file by file, so every input byte comes off
    the disk once and is hashed while it is in memory. A 7B merge reads 27 GB, more than the
    page cache holds: a hash that ran ahead (or fell behind) on its own read much of it twice.

    A file the engine reads front to back itself (`io.stream`) is `claim`ed: the stream feeds the
    file's hash from its own buffers, and the file's hash thread waits until the stream is done
    (`unclaim`), then hashes whatever is left at once.

    For the other files the engine calls `reading(path, end)` when it asks the kernel for a
    tensor's bytes (the prefetch of the next tensor); a paced `Hasher` hashes each file up to
    LOOKAHEAD past the furthest such end, and `reading` waits while the engine is more than LAG
    ahead of a file's hash, so that the cores go to the hash instead of to reads that would fall
    out of the cache before the hash reaches them. LOOKAHEAD is 0: a hash that ran ahead of the
    prefetch read its pages with page faults, one small read at a time, which measured slower than
    the kernel's readahead (7B ExPO: 37-41 s against 27-30 s). Pacing only orders work:
    `release()` (the engine is done, or failed) lets every hash finish on its own."""

    LOOKAHEAD = 0
    LAG = 1 << 30

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._front: dict[str, int] = {}  # file → the furthest byte the engine asked for
        self._hashed: dict[str, int] = {}  # file → bytes hashed, for the files a hash still owes
        self._runs: dict[str, _Running] = {}  # file → its hash in progress
        self._claimed: set[str] = set()  # files a stream feeds now
        self._fed: set[str] = set()  # files a stream has fed: their hash finishes on its own
        self._released = False

    def reading(self, path: Path, end: int) -> None:
        key = str(path)
        with self._cond:
            if end > self._front.get(key, 0):
                self._front[key] = end
                self._cond.notify_all()
            while (not self._released and key in self._hashed and key not in self._claimed and key not in self._fed
                   and end - self._hashed[key] > self.LAG):
                self._cond.wait()

    def claim(self, path: Path) -> _Running | None:
        """The hash a stream of `path` should feed, or None (no hash owed: cached, another rank's,
        hashing off, or already claimed)."""
        key = str(path)
        with self._cond:
            r = self._runs.get(key)
            if r is None or key in self._claimed or key in self._fed or key not in self._hashed:
                return None
            self._claimed.add(key)
            return r

    def unclaim(self, path: Path) -> None:
        """The stream of `path` is done feeding its hash (or stopped): the hash thread takes over."""
        key = str(path)
        with self._cond:
            if key in self._claimed:
                self._claimed.discard(key)
                self._fed.add(key)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def _start(self, r: _Running) -> None:
        with self._cond:
            self._runs[str(r.path)] = r
            self._hashed[str(r.path)] = r.pos

    def _allowed(self, key: str) -> int | None:
        """Wait until the engine has started on this file; then how far its hash may go (None: all)."""
        with self._cond:
            while not self._released and key not in self._fed and (
                    key in self._claimed or self._front.get(key, 0) == 0
                    or self._hashed.get(key, 0) >= self._front[key] + self.LOOKAHEAD):
                self._cond.wait()
            return None if self._released or key in self._fed else self._front[key] + self.LOOKAHEAD

    def _progress(self, key: str, pos: int | None) -> None:
        """A file's hash moved on (None: finished, or failed: nothing waits on it any more)."""
        with self._cond:
            if pos is None:
                self._hashed.pop(key, None)
            else:
                self._hashed[key] = pos
            self._cond.notify_all()


_inflight: dict[str, _Running] = {}  # realpath → a file `prehash` started
_inflight_lock = threading.Lock()
_early_stop = threading.Event()
_early: list[threading.Thread] = []


def prehash(paths: list[Path]) -> None:
    """Start hashing files now, in order, on a daemon thread, while the start-up leaves a core idle.
    A later Hasher of the same file stops that thread and goes on from where it got (paced)."""
    with _inflight_lock:
        todo = []
        for p in paths:
            real = os.path.realpath(p)
            if real not in _inflight:
                try:
                    _inflight[real] = _Running(p)
                except OSError:
                    continue
                todo.append(_inflight[real])
        if not todo:
            return

    def run() -> None:
        for r in todo:
            try:
                if not r.advance(None, _early_stop):
                    return
            except Exception:
                continue  # the real Hasher meets the same error and reports it

    t = threading.Thread(target=run, name="weightx-prehash", daemon=True)
    _early.append(t)
    t.start()


def _adopt(path: Path) -> _Running:
    """The early thread's state for this file version, or a fresh one."""
    with _inflight_lock:
        early = _inflight.pop(os.path.realpath(path), None)
    run = _Running(path)
    if early is not None and early.key == run.key:
        return early
    return run


def prehash_recipe(recipe: str | Path) -> None:
    """`prehash` the local safetensors a recipe file names under `models`, best effort: this runs
    before the recipe is validated (whose errors are reported later, properly), so anything
    unexpected just means no early start. YAML is only composed (aliases are not expanded)."""
    import yaml

    if not hashing_enabled():
        return
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
    """Hashes files in the background; `result()` waits and returns {str(path): sha256}.

    Cached digests (by path, size and mtime) are not recomputed. Without a `pacer`, one thread hashes
    the files in turn; with one, each file gets its own thread that follows the engine's reads
    (`Pacer`), so files read side by side are hashed side by side, on as many cores as that takes."""

    def __init__(self, paths: list[Path], pacer: Pacer | None = None):
        self._pacer = pacer
        self._out: dict[str, str] = {}
        self._new: dict[str, str] = {}
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        _early_stop.set()  # the start-up is over: what the early thread began continues here
        for t in _early:
            t.join()
        _early.clear()
        _early_stop.clear()
        cache = _load_cache()
        hashing = hashing_enabled()
        todo: list[_Running] = []
        try:
            for p in paths:
                key = _key(p)
                if key in cache:
                    self._out[str(p)] = cache[key]
                elif hashing:
                    todo.append(_adopt(p))
        except OSError as e:  # surfaced by result()
            self._error = e
            todo = []
        if pacer is None:
            self._threads = [threading.Thread(target=self._run, args=(todo,), name="weightx-hash", daemon=True)]
        else:
            for r in todo:
                pacer._start(r)
            self._threads = [threading.Thread(target=self._run_paced, args=(r,), name="weightx-hash", daemon=True) for r in todo]
        for t in self._threads:
            t.start()

    def _finished(self, r: _Running) -> None:
        with self._lock:
            self._out[str(r.path)] = r.digest
            self._new[r.key] = r.digest

    def _run(self, todo: list[_Running]) -> None:
        try:
            for r in todo:
                r.advance(None)
                self._finished(r)
        except BaseException as e:  # surfaced by result()
            self._error = e

    def _run_paced(self, r: _Running) -> None:
        key = str(r.path)
        try:
            while not r.advance(self._pacer._allowed(key)):
                self._pacer._progress(key, r.pos)
            self._finished(r)
        except BaseException as e:
            self._error = e
        finally:
            self._pacer._progress(key, None)

    def result(self) -> dict[str, str]:
        for t in self._threads:
            t.join()
        if self._error is not None:
            raise self._error
        _store_cache(self._new)
        return self._out
