"""Publishing: push a finished output folder, with its model card, to the Hugging Face Hub.

One push = `create_repo(exist_ok=True)`, the branch if it is missing, then ONE commit (`create_commit`
with explicit operations) holding every file of the folder and deleting weight files a previous push
left that this output no longer has (a stale `model.safetensors` would otherwise shadow a new sharded
index). Uploads resume: LFS objects the Hub already holds are skipped (the batch API answers no upload
action for them), so a push that failed half-way re-sends only what is missing; large files go up in
parts, each retried on its own by huggingface_hub (and Xet, when installed, deduplicates chunks).

Transient Hub errors (429, 5xx, dropped connections) are retried a bounded number of times with
exponential backoff around each step; everything else becomes one `PushError` line saying what to do.
The token is never printed, logged or written: messages are scrubbed of it, and a push refuses files
that contain it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from weightx.errors import PushError, UsageError, WeightxError
from weightx.io.files import is_regular, read_regular
from weightx.io.lock import output_lock
from weightx.io.provenance import Hasher
from weightx.pipeline.card import MARKER, refresh_card, render_record, summary
from weightx.pipeline.plan import human_bytes
from weightx.pipeline.record import portable
from weightx.recipe.model import branch_problem, repo_id_problem
from weightx.version import __version__

if TYPE_CHECKING:
    from weightx.recipe.model import PushSpec

RETRIES = 3  # extra attempts per step after the first
BACKOFF_S = 2.0  # first wait; doubles each attempt (WEIGHTX_PUSH_BACKOFF overrides it, e.g. in tests)
MAX_BACKOFF_S = 30.0
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Remote files a push replaces wholesale: left-over ones would be loaded instead of (or beside) the new weights.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
                   "*.ckpt", "*.gguf", "*.h5", "*.msgpack")
SCAN_LIMIT = 10 << 20  # the first bytes of each file checked for tokens
SAFETENSORS_HEAD = 1 << 20  # of a shard, the header region (names, metadata) is checked
TOKEN_SHAPE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
TIMEOUT_S = 120.0  # a Hub read that takes longer fails the step (WEIGHTX_PUSH_TIMEOUT overrides it)
MIN_TOKEN_LEN = 8  # shorter "tokens" are not real ones, and would match everywhere


@dataclass
class FileEntry:
    path: str  # path in the repo
    size: int
    sha256: str
    local: Path | None = None
    data: bytes | None = None  # content held in memory (a regenerated README.md)
    note: str = ""


@dataclass
class PushResult:
    repo_id: str
    revision: str
    private: bool
    files: list[FileEntry]
    dry_run: bool = False
    url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    deleted: list[str] = field(default_factory=list)
    card_updated: bool = False
    token_source: str | None = None
    skipped: str | None = None  # why nothing was pushed (another torchrun rank publishes)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "url": self.url, "commit_url": self.commit_url,
                "commit_oid": self.commit_oid, "files": [f.path for f in self.files], "deleted": self.deleted}


# ----------------------------------------------------------------------------------- checks


def read_record(folder: Path) -> dict:
    """weightx.json of a finished output, or a one-line refusal."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; pass the output folder of `weightx apply`")
    path = folder / "weightx.json"
    if not path.is_file():
        raise PushError(f"{folder} is not a finished weightx output (no weightx.json); "
                        "run `weightx apply` to completion before pushing")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PushError(f"{path} is unreadable ({e}); re-run `weightx apply` to rebuild the output") from None
    if not isinstance(record, dict) or record.get("status", "complete") != "complete":
        raise PushError(f"{path} does not mark a complete output; re-run `weightx apply`")
    return record


def check_validation(record: dict, force: bool) -> None:
    v = record.get("validation")
    if isinstance(v, dict) and v.get("passed") is False and not force:
        raise PushError("this output failed its validation (see weightx.json and README.md); "
                        "fix the recipe and re-run, or pass --force to push it anyway")


def check_repo_id(repo: str | None) -> str:
    if not repo:
        raise UsageError("no target repo: pass --repo namespace/name, or add `push: {repo: ...}` to the recipe")
    if why := repo_id_problem(repo):
        raise UsageError(why)
    return repo


def check_revision(revision: str | None) -> str:
    rev = revision or "main"
    if why := branch_problem(rev):
        raise UsageError(why)
    return rev


def find_token(token: str | None) -> tuple[str | None, str | None]:
    """(token, where it came from); never raises."""
    if token:
        return token, "--token"
    try:
        from huggingface_hub import get_token

        found = get_token()
    except Exception:  # a broken OIDC setup or token file: treated as no token
        found = None
    if not found:
        return None, None
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return found, "HF_TOKEN" if env and env.strip() == found else "saved login"


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token and len(token) >= MIN_TOKEN_LEN else text


# ----------------------------------------------------------------------------------- manifest


def manifest(folder: Path, card: str | None, replace: dict[str, bytes] | None = None) -> list[FileEntry]:
    """Every file of the output (hidden ones skipped), with size and sha256; README.md from `card`,
    and the files named in `replace` with those bytes (the public weightx.json). A symlink or a special file in the folder is refused: only what weightx wrote is published."""
    paths = []
    for p in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.is_symlink():
            raise PushError(f"{p} is a symbolic link; a weightx output holds only the files it wrote, so it is not"
                            " pushed (a link could publish a file from outside the folder): remove it")
        if p.is_dir():
            continue
        if not is_regular(p):
            raise PushError(f"{p} is not a regular file; remove it from the output folder before pushing")
        paths.append(p)
    given = dict(replace or {})
    if card is not None:
        given["README.md"] = card.encode("utf-8")
    local = [p for p in paths if p.relative_to(folder).as_posix() not in given]
    hashes = Hasher(local).result()
    files = [FileEntry(p.relative_to(folder).as_posix(), p.stat().st_size, hashes[str(p)], local=p) for p in local]
    files += [FileEntry(name, len(data), hashlib.sha256(data).hexdigest(), data=data) for name, data in given.items()]
    return sorted(files, key=lambda f: f.path)


def known_tokens(token: str | None) -> list[str]:
    """Every Hub token this machine holds: the pushing one, the environment's, the saved logins."""
    found = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import constants  # heavy: loaded only when pushing

        found.append(Path(constants.HF_TOKEN_PATH).read_text(encoding="utf-8"))
        stored = Path(constants.HF_STORED_TOKENS_PATH).read_text(encoding="utf-8")
        found += [line.partition("=")[2] for line in stored.splitlines()]
    except (OSError, UnicodeDecodeError, AttributeError):
        pass
    return sorted({t.strip() for t in found if t and len(t.strip()) >= MIN_TOKEN_LEN})


def refuse_secrets(files: list[FileEntry], token: str | None) -> None:
    """Refuse a push whose files hold a Hub token this machine knows, or anything shaped like one
    (`hf_` + 30 or more letters and digits), in any file but the shards' tensor data."""
    tokens = [t.encode() for t in known_tokens(token)]
    for f in files:
        if f.data is not None:
            data = f.data
        elif fnmatch.fnmatch(f.path, "*.safetensors"):
            data = read_regular(f.local, SAFETENSORS_HEAD)  # type: ignore[arg-type]  # the header: names and metadata
        else:
            data = read_regular(f.local, SCAN_LIMIT)  # type: ignore[arg-type]
        if any(t in data for t in tokens):
            raise PushError(f"{f.path} contains your Hub token; remove it from that file (and rotate the token) before pushing")
        if TOKEN_SHAPE.search(data):
            raise PushError(f"{f.path} contains something shaped like a Hub token (hf_…); remove it from that file"
                            " (and rotate the token if it is one) before pushing")


def check_against_record(files: list[FileEntry], record: dict, folder: Path) -> None:
    """Every shard weightx.json records is there with its size and sha256, and no other weights are:
    a missing, truncated or swapped shard is never published."""
    shards = (record.get("output") or {}).get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards):
        raise PushError(f"{folder / 'weightx.json'} lists no shards; re-run `weightx apply` to rebuild the output")
    have = {f.path: f for f in files}
    for s in shards:
        f = have.get(s["file"])
        if f is None:
            raise PushError(f"{folder / s['file']} is missing; the output is incomplete: re-run `weightx apply` (`weightx verify` checks it)")
        if s.get("size") is not None and f.size != s.get("size") or s.get("sha256") and f.sha256 != s.get("sha256"):
            raise PushError(f"{folder / s['file']} does not match the sha256/size weightx.json records (truncated or"
                            " replaced); re-run `weightx apply` (`weightx verify` checks it)")
    listed = {s["file"] for s in shards}
    extra = [p for p in have if fnmatch.fnmatch(p, "*.safetensors") and p not in listed]
    if extra:
        raise PushError(f"{folder / extra[0]} is not a shard weightx.json records; remove it before pushing")


def _set_timeouts() -> None:
    """huggingface_hub waits forever on a server that accepts and never answers: bound each read."""
    from huggingface_hub import get_session  # heavy: loaded only when pushing

    session = get_session()
    seconds = float(os.environ.get("WEIGHTX_PUSH_TIMEOUT") or TIMEOUT_S)
    session.timeout = type(session.timeout)(seconds, connect=min(seconds, 30.0))


def default_commit_message(record: dict) -> str:
    text = f"weightx {record.get('weightx_version') or __version__}: {summary(record).rstrip('.')}"
    return text if len(text) <= 120 else text[:119] + "…"


# ----------------------------------------------------------------------------------- Hub errors


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _status(e: BaseException) -> int | None:
    for x in _chain(e):
        resp = getattr(x, "response", None)
        code = getattr(resp, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _network(e: BaseException) -> BaseException | None:
    import httpx2

    for x in _chain(e):
        if isinstance(x, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return x
    return None


def _transient(e: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if any(isinstance(x, OfflineModeIsEnabled) for x in _chain(e)):
        return False
    status = _status(e)
    return status in TRANSIENT_STATUS if status is not None else _network(e) is not None


def explain(e: BaseException, *, repo: str, revision: str, endpoint: str, attempts: int = 1) -> str | None:
    """One line saying what went wrong and what to do, or None when it is not a Hub problem (a bug)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if any(isinstance(x, OfflineModeIsEnabled) for x in _chain(e)):
        return "HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to push"
    status = _status(e)
    server = next((getattr(x, "server_message", None) for x in _chain(e) if getattr(x, "server_message", None)), None)
    said = f" (the Hub said: {' '.join(str(server).split())[:200]})" if server else ""
    ns = repo.split("/")[0]
    if status == 401:
        return (f"the Hub rejected your token (401 Unauthorized) for {repo}; log in again with `hf auth login` "
                "or set HF_TOKEN to a valid token")
    if status == 403:
        return (f"your token may not write to {repo} (403 Forbidden){said}; use a token with write access to "
                f"the '{ns}' namespace (fine-grained tokens need it granted explicitly)")
    if status == 404:
        return (f"{repo} (branch {revision}) was not found at {endpoint} (404){said}; check the repo id and "
                "that your token can see it")
    if status == 409:
        return (f"the Hub reported a conflict on {repo} (409){said}: another commit or operation is under way; "
                "run the push again")
    if status in TRANSIENT_STATUS:
        return (f"the Hub kept failing ({status}) after {attempts} attempt(s){said}; try again later: "
                "files already uploaded are not sent again")
    if status is not None and 400 <= status < 500:
        return f"the Hub refused the push ({status}){said}; check the repo id, branch and files"
    if status is not None:
        return f"the Hub answered {status}{said} after {attempts} attempt(s); try again later"
    net = _network(e)
    if net is not None:
        return (f"cannot reach the Hub at {endpoint} ({type(net).__name__}) after {attempts} attempt(s); "
                "check your network connection (or HF_ENDPOINT)")
    msg = str(e)
    if isinstance(e, ValueError) and ("metadata in README.md" in msg or "LFS batch API returned errors" in msg):
        return f"the Hub refused the upload: {' '.join(msg.split())[:300]}"
    return None


def _retrying(what: str, fn: Callable[[], Any], *, retries: int, backoff: float, log: Callable[[str], None],
              token: str | None) -> Any:
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            e.weightx_attempts = attempt + 1  # type: ignore[attr-defined]
            if attempt >= retries or not _transient(e):
                raise
            wait = min(MAX_BACKOFF_S, backoff * 2**attempt)
            status = _status(e)
            why = f"the Hub answered {status}" if status else f"connection failed ({type(_network(e)).__name__})"
            log(_scrub(f"{what}: {why}; retrying in {wait:g} s (attempt {attempt + 2} of {retries + 1})", token))
            time.sleep(wait)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------- push


def push(
    path: str | Path,
    *,
    repo: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    endpoint: str | None = None,
    retries: int = RETRIES,
    backoff: float | None = None,
    log: Callable[[str], None] | None = None,
) -> PushResult:
    """Push a finished output folder to `repo` in one commit; see the module docstring.

    Without `repo`, the `push:` block recorded in the folder's weightx.json supplies repo, private,
    revision and commit message. `dry_run` lists what would be pushed and makes no network call.
    """
    log = log or (lambda _msg: None)
    if backoff is None:
        backoff = float(os.environ.get("WEIGHTX_PUSH_BACKOFF") or BACKOFF_S)
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; pass the output folder of `weightx apply`")
    with output_lock(folder):  # a concurrent `apply --overwrite` cannot swap the folder mid-push
        return _push_locked(folder, repo, private, revision, commit_message, token, dry_run, force, endpoint,
                            retries, backoff, log)


def _push_locked(folder: Path, repo: str | None, private: bool, revision: str | None, commit_message: str | None,
                 token: str | None, dry_run: bool, force: bool, endpoint: str | None, retries: int, backoff: float,
                 log: Callable[[str], None]) -> PushResult:
    record = read_record(folder)
    spec = (record.get("recipe") or {}).get("push") or {}
    if repo is None and spec:
        repo = spec.get("repo")
        private = private or bool(spec.get("private"))
        revision = revision or spec.get("revision")
        commit_message = commit_message or spec.get("commit_message")
    repo = check_repo_id(repo)
    rev = check_revision(revision)
    check_validation(record, force)
    token, token_source = find_token(token)
    from huggingface_hub import HfApi, constants  # heavy: loaded only when pushing

    if not dry_run:  # refuse before hashing gigabytes of shards
        if token is None:
            raise PushError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN to a token with write access")
        if constants.is_offline_mode():
            raise PushError("HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to push")

    card, card_changed = refresh_card(folder, repo_id=repo, write=False)
    public = portable(record)  # outputs of older versions recorded absolute local paths
    replace = {}
    if public != record:
        replace["weightx.json"] = (json.dumps(public, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        if MARKER in card:  # ours: the published card is rendered from the public record
            card = render_record(public, repo_id=repo)
    files = manifest(folder, card, replace)
    check_against_record(files, record, folder)
    result = PushResult(repo, rev, private, files, dry_run=dry_run, card_updated=card_changed, token_source=token_source)
    if dry_run:
        return result
    assert token is not None
    refuse_secrets(files, token)
    if card_changed:
        refresh_card(folder, repo_id=repo, write=True)  # the local card, from the local record
        log("README.md: model card regenerated from weightx.json")
    _set_timeouts()

    api = HfApi(endpoint=endpoint, token=token, library_name="weightx")
    message = commit_message or default_commit_message(record)
    steps = {"retries": retries, "backoff": backoff, "log": log, "token": token}
    try:
        url = _retrying("create repo", lambda: api.create_repo(repo, private=True if private else None, exist_ok=True), **steps)
        result.url = str(url)
        if private and not _retrying("repo info", lambda: api.repo_info(repo), **steps).private:
            raise PushError(f"{repo} already exists and is public, but the push asks for a private repo; make it "
                            "private in its settings on the Hub, or push without private")
        if rev != "main":
            _retrying("create branch", lambda: api.create_branch(repo, branch=rev, exist_ok=True), **steps)
        remote = _retrying("list files", lambda: api.list_repo_files(repo, revision=rev), **steps)
        local = {f.path for f in files}
        result.deleted = sorted(p for p in remote if p not in local and any(fnmatch.fnmatch(p, w) for w in WEIGHT_PATTERNS))
        info = _retrying("commit", lambda: api.create_commit(
            repo, _operations(files, result.deleted), commit_message=message, revision=rev,
            commit_description=_description(record)), **steps)
    except PushError:
        raise
    except Exception as e:
        line = explain(e, repo=repo, revision=rev, endpoint=api.endpoint, attempts=getattr(e, "weightx_attempts", 1))
        if line is None:
            raise
        raise PushError(_scrub(line, token)) from None
    result.commit_url, result.commit_oid = info.commit_url, info.oid
    return result


def _operations(files: list[FileEntry], deleted: list[str]) -> list:
    """Fresh operations for each attempt (huggingface_hub mutates them), with the sha256 already known."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list = []
    for f in files:
        op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.data if f.data is not None else str(f.local))
        op.upload_info.sha256 = bytes.fromhex(f.sha256)  # no second hashing pass over big shards
        ops.append(op)
    ops += [CommitOperationDelete(path_in_repo=p) for p in deleted]
    return ops


def _description(record: dict) -> str:
    return f"{summary(record)}\n\nMade with weightx; the recipe as run, input hashes and validation are in weightx.json."


def push_spec(path: str | Path, spec: "PushSpec", *, log: Callable[[str], None] | None = None, **kwargs: Any) -> PushResult:
    """The recipe's `push:` block, run after a successful apply (and validation)."""
    rank = os.environ.get("RANK", "0")
    if rank != "0":  # under torchrun every rank finishes apply; rank 0 alone publishes
        return PushResult(spec.repo, spec.revision or "main", spec.private, [], skipped=f"rank {rank}: the push is left to rank 0")
    try:
        return push(path, repo=spec.repo, private=spec.private, revision=spec.revision,
                    commit_message=spec.commit_message, log=log, **kwargs)
    except WeightxError as e:
        # The output itself is fine; say how to retry the push alone.
        e.args = (f"{e} (the output at {path} is complete; push it later with `weightx push {path}`)",)
        raise


# ----------------------------------------------------------------------------------- text


def human(n: int) -> str:
    return human_bytes(n)


def render_dry_run(r: PushResult) -> str:
    vis = "private" if r.private else "public"
    lines = [f"dry run: would push {len(r.files)} file(s), {human(r.total_size)}, to {r.repo_id} "
             f"(branch {r.revision}, {vis}) in one commit; no network call made", ""]
    width = max(len(human(f.size)) for f in r.files)
    for f in r.files:
        note = " (model card regenerated from weightx.json)" if f.path == "README.md" and r.card_updated else ""
        lines.append(f"  {human(f.size):>{width}}  {f.sha256}  {f.path}{note}")
    lines += ["", f"token: {'found (' + r.token_source + ')' if r.token_source else 'none; a real push would refuse'}"]
    return "\n".join(lines)


def render_push(r: PushResult) -> str:
    if r.skipped:
        return r.skipped
    lines = [f"pushed {len(r.files)} file(s), {human(r.total_size)}, to {r.url or r.repo_id} (branch {r.revision})"]
    if r.deleted:
        lines.append(f"removed stale weight files: {', '.join(r.deleted)}")
    if r.commit_url:
        lines.append(f"commit: {r.commit_url}")
    return "\n".join(lines)
