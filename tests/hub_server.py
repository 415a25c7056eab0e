"""A small local HTTP server that speaks the Hub's non-Xet upload protocol, for push tests.

It implements what huggingface_hub 2.4 sends for `create_repo`, `create_branch`, `repo_info`,
`list_repo_tree` and `create_commit` with `HF_HUB_DISABLE_XET=1` (read from the client's source:
hf_api.py, _commit_api.py, lfs.py):

    POST /api/repos/create                               {"name", "organization", "visibility"?}
    GET  /api/models/{repo}/revision/{rev}               repo_info / model_info
    POST /api/models/{repo}/branch/{branch}              create_branch (409 if it exists)
    GET  /api/models/{repo}/tree/{rev}                   list_repo_tree (one page)
    POST /api/models/{repo}/preupload/{rev}              {"files": [{path, sample, size}]} -> uploadMode
    POST /{repo}.git/info/lfs/objects/batch              git-lfs batch API; no "actions" = already stored
    PUT  /lfs/objects/{oid}                              basic transfer (single PUT)
    PUT  /lfs/parts/{oid}/{n}  POST /lfs/complete/{oid}  multipart transfer (parts answer an ETag)
    POST /lfs/verify/{oid}                               verify action
    POST /api/models/{repo}/commit/{rev}                 ndjson: header, file (base64), lfsFile, deleted*
    POST /api/validate-yaml                              README front matter check

State lives in memory; tests read it back (`file_bytes`, `commit_paths`, `lfs_paths`, `log`) and
inject failures with `fail(method, path_regex, status, times)`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
RELATIONS = {"adapter", "merge", "quantized", "finetune"}  # what the Hub's model-card spec allows


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    size: int
    data: bytes | None = None  # regular file content
    lfs: str | None = None  # sha256 of an LFS object

    @property
    def oid(self) -> str:  # what preupload reports: sha256 for LFS, git sha1 for regular files
        return self.lfs if self.lfs else git_blob_sha1(self.data or b"")


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int
    times: int | None  # None = always
    message: str | None = None  # "{auth}" becomes the request's Authorization header (a server echoing it)


class HubState:
    def __init__(self, tokens: dict[str, dict]):
        # token -> {"user": name, "write": bool, "orgs": [...]}
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.parts: dict[tuple[str, int], bytes] = {}
        self.log: list[dict] = []  # every request: method, path, status, authorization header
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self.multipart_threshold: int | None = None
        self.chunk_size = 64 * 1024
        self.verify = True  # offer a verify action in the batch answer


class _Reply(Exception):
    def __init__(self, status: int, body: object = None, headers: dict | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


def _err(status: int, message: str, code: str | None = None) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: object = None, headers: dict | None = None) -> None:
        if isinstance(body, (bytes, bytearray)):
            data, ctype = bytes(body), "application/octet-stream"
        else:
            data, ctype = json.dumps(body if body is not None else {}).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        st = self.server.state
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        body = self._body()
        entry = {"method": method, "path": path, "authorization": self.headers.get("Authorization"), "size": len(body)}
        try:
            with st.lock:
                for f in st.faults:
                    if f.method == method and f.pattern.search(path) and (f.times is None or f.times > 0):
                        if f.times is not None:
                            f.times -= 1
                        msg = (f.message or f"injected failure {f.status}").replace("{auth}", entry["authorization"] or "")
                        raise _err(f.status, msg)
            self._route(method, path, query, body)
            entry["status"] = 200
        except _Reply as r:
            entry["status"] = r.status
            self._send(r.status, r.body, r.headers)
        finally:
            with st.lock:
                st.log.append(entry)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # -- auth -------------------------------------------------------------------------------

    def _user(self) -> dict | None:
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        info = self.server.state.tokens.get(auth.removeprefix("Bearer ").strip())
        if info is None:
            raise _err(401, "Invalid credentials in Authorization header")
        return info

    def _require_write(self, namespace: str) -> None:
        user = self._user()
        if user is None:
            raise _err(401, "Unauthorized: no token")
        if not user.get("write", True) or namespace not in {user["user"], *user.get("orgs", [])}:
            raise _err(403, f"You don't have the rights to write to {namespace}")

    def _repo(self, repo_id: str, *, write: bool) -> Repo:
        if write:
            self._require_write(repo_id.split("/")[0])
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and not write and self._user() is None):
            raise _err(404, "Repository not found", "RepoNotFound")
        return repo

    def _head(self, repo: Repo, rev: str) -> Commit:
        oid = repo.branches.get(rev) or (rev if rev in repo.commits else None)
        if oid is None:
            raise _err(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[oid]

    # -- routes -----------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        st = self.server.state
        base = self.server.url
        doc = lambda: json.loads(body or b"{}")  # noqa: E731

        if method == "POST" and path == "/api/repos/create":
            d = doc()
            if d.get("type", "model") != "model":
                raise _err(400, "only model repos here")
            namespace = d.get("organization") or (self._user() or {}).get("user")
            if not namespace:
                raise _err(401, "Unauthorized: no token")
            self._require_write(namespace)
            repo_id = f"{namespace}/{d['name']}"
            with st.lock:
                if repo_id in st.repos:
                    raise _Reply(409, {"error": "You already created this model repo", "url": f"{base}/{repo_id}"})
                repo = Repo(repo_id, private=d.get("visibility") == "private" or bool(d.get("private")))
                first = Commit(_oid(repo_id, "initial"), None, "initial commit", "",
                               {".gitattributes": Entry(len(GITATTRIBUTES), data=GITATTRIBUTES)})
                repo.commits[first.oid] = first
                repo.branches["main"] = first.oid
                st.repos[repo_id] = repo
            self._send(200, {"url": f"{base}/{repo_id}", "name": repo_id})
            return

        if method == "POST" and path == "/api/validate-yaml":
            errors = _validate_card(doc().get("content", ""))
            if errors:
                raise _Reply(400, {"errors": [{"message": e} for e in errors], "warnings": []})
            self._send(200, {"errors": [], "warnings": []})
            return

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)", path)
        if m and method == "GET":  # repo_info without a revision
            self._revision(m.group(1), "main", query, body)
            return

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|branch|tree|preupload|commit)/([^/]+)(/.*)?", path)
        if m:
            repo_id, verb, rev = m.group(1), m.group(2), unquote(m.group(3))
            getattr(self, f"_{verb}")(repo_id, rev, query, body)
            return

        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            self._batch(m.group(1), doc())
            return

        m = re.fullmatch(r"/lfs/(objects|parts|complete|verify)/([0-9a-f]{64})(?:/(\d+))?", path)
        if m:
            self._lfs(method, m.group(1), m.group(2), int(m.group(3) or 0), body)
            return
        raise _err(404, f"no route for {method} {path}")

    def _revision(self, repo_id: str, rev: str, query: dict, body: bytes) -> None:
        repo = self._repo(repo_id, write=False)
        head = self._head(repo, rev)
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": head.oid, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(head.files)]})

    def _branch(self, repo_id: str, branch: str, query: dict, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        with self.server.state.lock:
            if branch in repo.branches:
                raise _err(409, f"Reference already exists: {branch}")
            repo.branches[branch] = self._head(repo, start).oid
        self._send(200, {})

    def _tree(self, repo_id: str, rev: str, query: dict, body: bytes) -> None:
        repo = self._repo(repo_id, write=False)
        head = self._head(repo, rev)
        out = []
        for p, e in sorted(head.files.items()):
            item = {"type": "file", "path": p, "size": e.size, "oid": e.oid}
            if e.lfs:
                item["lfs"] = {"oid": e.lfs, "size": e.size, "pointerSize": 134}
            out.append(item)
        self._send(200, out)

    def _preupload(self, repo_id: str, rev: str, query: dict, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        head = self._head(repo, rev)
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            known = head.files.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": known.oid if known else None})
        self._send(200, {"files": files, "commitOid": head.oid})

    def _batch(self, repo_id: str, d: dict) -> None:
        st = self.server.state
        self._repo(repo_id, write=True)
        base = self.server.url
        objects = []
        for o in d["objects"]:
            oid, size = o["oid"], o["size"]
            item: dict = {"oid": oid, "size": size, "authenticated": True}
            if oid not in st.lfs:  # no "actions": the client skips objects the server already has
                if st.multipart_threshold is not None and size > st.multipart_threshold:
                    n = -(-size // st.chunk_size)
                    header = {"chunk_size": str(st.chunk_size)}
                    header.update({f"{i:05d}": f"{base}/lfs/parts/{oid}/{i}" for i in range(1, n + 1)})
                    upload = {"href": f"{base}/lfs/complete/{oid}", "header": header}
                else:
                    upload = {"href": f"{base}/lfs/objects/{oid}"}
                item["actions"] = {"upload": upload}
                if st.verify:
                    item["actions"]["verify"] = {"href": f"{base}/lfs/verify/{oid}"}
            objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs(self, method: str, kind: str, oid: str, part: int, body: bytes) -> None:
        st = self.server.state
        if kind == "objects" and method == "PUT":
            if hashlib.sha256(body).hexdigest() != oid:
                raise _err(400, "content does not match its sha256")
            with st.lock:
                st.lfs[oid] = body
            self._send(200, {})
        elif kind == "parts" and method == "PUT":
            with st.lock:
                st.parts[(oid, part)] = body
            self._send(200, {}, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        elif kind == "complete" and method == "POST":
            d = json.loads(body)
            with st.lock:
                data = b"".join(st.parts[(oid, p["partNumber"])] for p in sorted(d["parts"], key=lambda p: p["partNumber"]))
                if hashlib.sha256(data).hexdigest() != oid:
                    raise _err(400, "assembled parts do not match the sha256")
                st.lfs[oid] = data
            self._send(200, {})
        elif kind == "verify" and method == "POST":
            d = json.loads(body)
            if oid not in st.lfs or len(st.lfs[oid]) != d.get("size"):
                raise _err(404, "object not found")
            self._send(200, {})
        else:
            raise _err(405, "method not allowed")

    def _commit(self, repo_id: str, rev: str, query: dict, body: bytes) -> None:
        st = self.server.state
        repo = self._repo(repo_id, write=True)
        if self.headers.get("Content-Type") != "application/x-ndjson":
            raise _err(400, "commit payload must be ndjson")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise _err(400, "first ndjson line must be the header")
        header = lines[0]["value"]
        with st.lock:
            head = self._head(repo, rev)
            if header.get("parentCommit") and not head.oid.startswith(header["parentCommit"]):
                raise _err(409, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for item in lines[1:]:
                key, v = item["key"], item["value"]
                if key == "file":
                    data = base64.b64decode(v["content"])
                    files[v["path"]] = Entry(len(data), data=data)
                elif key == "lfsFile":
                    if v["oid"] not in st.lfs:
                        raise _err(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                    files[v["path"]] = Entry(len(st.lfs[v["oid"]]), lfs=v["oid"])
                elif key == "deletedFile":
                    files.pop(v["path"], None)
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(v["path"].rstrip("/") + "/")}
                else:
                    raise _err(400, f"unknown commit operation {key}")
            commit = Commit(_oid(repo_id, str(time.time_ns()), head.oid), head.oid, header["summary"],
                            header.get("description", ""), files)
            repo.commits[commit.oid] = commit
            repo.branches[rev] = commit.oid
        self._send(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{commit.oid}",
                         "commitOid": commit.oid, "success": True})


def _oid(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


def _validate_card(content: str) -> list[str]:
    """The checks the Hub makes that matter here: parseable front matter and known relation values."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if not m:
        return []
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        return [f"YAML parse error: {e}"]
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    errors = []
    rel = meta.get("base_model_relation")
    if rel is not None and rel not in RELATIONS:
        errors.append(f'"base_model_relation" must be one of {sorted(RELATIONS)}')
    if rel is not None and not meta.get("base_model"):
        errors.append('"base_model_relation" needs "base_model"')
    bm = meta.get("base_model")
    if bm is not None and not (isinstance(bm, str) or (isinstance(bm, list) and all(isinstance(x, str) for x in bm))):
        errors.append('"base_model" must be a string or a list of strings')
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append('"tags" must be a list of strings')
    return errors


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tokens: dict[str, dict] | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(tokens or {})
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, name="hub-server", daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    # -- test helpers -----------------------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int, times: int | None = None, message: str | None = None) -> None:
        """Answer `status` to matching requests, `times` times (None: always)."""
        with self.state.lock:
            self.state.faults.append(Fault(method, re.compile(path_regex), status, times, message))

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        repo = self.state.repos[repo_id]
        return repo.commits[repo.branches[revision]]

    def commit_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        return set(self.head(repo_id, revision).files)

    def lfs_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        return {p for p, e in self.head(repo_id, revision).files.items() if e.lfs}

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        e = self.head(repo_id, revision).files[path]
        return self.state.lfs[e.lfs] if e.lfs else e.data  # type: ignore[return-value]

    def requests(self, method: str | None = None, path_regex: str | None = None) -> list[dict]:
        with self.state.lock:
            return [r for r in self.state.log
                    if (method is None or r["method"] == method) and (path_regex is None or re.search(path_regex, r["path"]))]
