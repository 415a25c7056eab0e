"""Pushing through the real huggingface_hub client to a local server that speaks the Hub's upload
protocol (tests/hub_server.py; non-Xet: preupload, LFS batch + PUT / multipart, commit)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, constants

from hub_server import HubServer
from weightx.errors import UsageError
from weightx.errors import PushError
from weightx.publish import push, render_dry_run
from weightx.testing import make_hf_cache

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny"
TOKEN = "hf_plantedTOKEN0123456789abcdefXYZ"  # planted: must never show up in output or files
OTHER = "hf_readonlyTOKEN0123456789abcdef"
SFT_ID, DPO_ID = "tiny-org/tiny-sft", "tiny-org/tiny-dpo"
FAST = {"retries": 2, "backoff": 0.01}


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The bundled tiny sft/dpo pair installed as Hub repos in a fake cache, so inputs are Hub ids."""
    cache = tmp_path_factory.mktemp("hf-cache")
    return cache, {"sft": make_hf_cache(cache, SFT_ID, EXAMPLE / "sft"), "dpo": make_hf_cache(cache, DPO_ID, EXAMPLE / "dpo")}


def expo_recipe(alpha: float = 0.3, shard_size: str = "200KB", **extra) -> dict:
    return {"name": "tiny-expo", "models": {"sft": SFT_ID, "dpo": DPO_ID}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": [{"expo": {"alpha": alpha}}]}],
            "output": {"dtype": "bfloat16", "shard_size": shard_size}, **extra}


def make_output(hub_cache, out: Path, **kw) -> Path:
    import weightx

    with pytest.MonkeyPatch.context() as mp:  # resolve the Hub ids from the fake cache, offline
        mp.setattr(constants, "HF_HUB_CACHE", str(hub_cache[0]))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        return weightx.apply(expo_recipe(**kw), output=out, push=False).path


@pytest.fixture(scope="module")
def output(hub_cache, tmp_path_factory) -> Path:
    return make_output(hub_cache, tmp_path_factory.mktemp("out") / "tiny-expo")


@pytest.fixture
def out(output, tmp_path) -> Path:
    """A private copy of the tiny output (a push may rewrite its README.md)."""
    dst = tmp_path / "tiny-expo"
    shutil.copytree(output, dst)
    return dst


@pytest.fixture(autouse=True)
def online(monkeypatch, tmp_path):
    """The suite runs with HF_HUB_OFFLINE=1; pushes need it off. No Xet: the server speaks LFS only."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def hub():
    with HubServer({TOKEN: {"user": "alice", "orgs": ["team"]}, OTHER: {"user": "bob"}}) as server:
        yield server


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------ a push arrives intact


def test_push_arrives_byte_identical_in_one_commit(hub, out):
    r = push(out, repo="alice/tiny-expo", endpoint=hub.url)
    files = local_files(out)
    assert hub.commit_paths("alice/tiny-expo") == set(files) | {".gitattributes"}
    for path, data in files.items():
        assert hub.file_bytes("alice/tiny-expo", path) == data, path
    # LFS holds exactly the weight shards, and they are the large files.
    lfs = hub.lfs_paths("alice/tiny-expo")
    assert lfs == {p for p in files if p.endswith(".safetensors")} and len(lfs) == 2
    assert min(len(files[p]) for p in lfs) > max(len(d) for p, d in files.items() if p not in lfs)
    # One commit on top of the repo's initial one, with a message describing the recipe.
    head = hub.head("alice/tiny-expo")
    assert hub.state.repos["alice/tiny-expo"].commits[head.parent].parent is None
    assert head.summary.startswith("weightx 0.1.0: ExPO extrapolation α=0.3 from tiny-sft through tiny-dpo")
    assert r.commit_oid == head.oid and r.repo_id == "alice/tiny-expo" and not r.deleted
    assert len(hub.requests("POST", r"/commit/")) == 1
    # API calls carry the token; object-storage PUTs (like S3's presigned URLs) get none.
    assert {q["authorization"] for q in hub.requests() if q["method"] != "PUT"} == {f"Bearer {TOKEN}"}
    assert {q["authorization"] for q in hub.requests("PUT")} == {None}
    assert not hub.state.repos["alice/tiny-expo"].private


def test_pushed_card_metadata_parses_back(hub, out):
    push(out, repo="alice/tiny-expo", endpoint=hub.url)
    card = ModelCard(hub.file_bytes("alice/tiny-expo", "README.md").decode())
    meta = card.data.to_dict()
    assert meta["base_model"] == [SFT_ID, DPO_ID] and meta["base_model_relation"] == "merge"
    assert meta["tags"] == ["weightx", "expo"] and meta["library_name"] == "transformers"
    assert "ExPO extrapolation α=0.3 from tiny-sft through tiny-dpo." in card.text
    assert hub.requests("POST", r"^/api/validate-yaml$")  # the client had the server check the front matter


@pytest.mark.slow
def test_multipart_upload_of_large_files(hub, out):
    hub.state.multipart_threshold, hub.state.chunk_size = 50_000, 32_768
    hub.fail("PUT", r"^/lfs/parts/.*/2$", 503, times=1)  # one part fails once: only that part is re-sent
    push(out, repo="alice/tiny-expo", endpoint=hub.url)
    for p in hub.lfs_paths("alice/tiny-expo"):
        assert hub.file_bytes("alice/tiny-expo", p) == (out / p).read_bytes()
    parts = [q["path"] for q in hub.requests("PUT", r"^/lfs/parts/")]
    assert len(parts) == len(set(parts)) + 1  # exactly one part went twice
    assert not hub.requests("PUT", r"^/lfs/objects/")


@pytest.mark.slow
def test_failed_push_resumes_without_resending_uploaded_files(hub, out):
    hub.fail("POST", r"/commit/", 500)  # uploads succeed, the commit never does
    with pytest.raises(PushError, match=r"kept failing \(500\) after 3 attempt"):
        push(out, repo="alice/tiny-expo", endpoint=hub.url, **FAST)
    assert len(hub.requests("POST", r"/commit/")) == 3  # bounded: 1 + 2 retries
    puts_before = len(hub.requests("PUT"))
    assert puts_before == 2  # each shard uploaded once, not once per attempt
    hub.clear_faults()
    push(out, repo="alice/tiny-expo", endpoint=hub.url, **FAST)
    assert len(hub.requests("PUT")) == puts_before  # nothing re-sent: the Hub already has both objects
    assert hub.commit_paths("alice/tiny-expo") >= set(local_files(out))


@pytest.mark.slow
def test_second_push_to_the_same_repo(hub, hub_cache, out, tmp_path):
    push(out, repo="alice/tiny-expo", endpoint=hub.url)
    first = hub.head("alice/tiny-expo").oid
    again = push(out, repo="alice/tiny-expo", endpoint=hub.url)  # exist_ok; nothing changed: no new commit
    assert again.commit_oid == first == hub.head("alice/tiny-expo").oid
    # A new output with another alpha and shard layout replaces the weights; old shards are removed.
    other = make_output(hub_cache, tmp_path / "other", alpha=0.5, shard_size="100KB")
    r = push(other, repo="alice/tiny-expo", endpoint=hub.url)
    assert hub.head("alice/tiny-expo").parent == first
    assert hub.commit_paths("alice/tiny-expo") == set(local_files(other)) | {".gitattributes"}
    assert r.deleted == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for path, data in local_files(other).items():
        assert hub.file_bytes("alice/tiny-expo", path) == data
    assert len(hub.requests("POST", r"^/api/repos/create$")) == 3


@pytest.mark.slow
def test_revision_branch_is_created(hub, out):
    push(out, repo="team/tiny-expo", revision="dev", commit_message="try dev", endpoint=hub.url)
    assert hub.commit_paths("team/tiny-expo", "main") == {".gitattributes"}
    assert hub.commit_paths("team/tiny-expo", "dev") >= set(local_files(out))
    assert hub.head("team/tiny-expo", "dev").summary == "try dev"
    push(out, repo="team/tiny-expo", revision="dev", endpoint=hub.url)  # branch exists now: fine


@pytest.mark.slow
def test_private_repo(hub, out):
    push(out, repo="alice/secret", private=True, endpoint=hub.url)
    assert hub.state.repos["alice/secret"].private
    push(out, repo="alice/public", endpoint=hub.url)
    with pytest.raises(PushError, match="already exists and is public"):
        push(out, repo="alice/public", private=True, endpoint=hub.url)


@pytest.mark.slow
def test_recorded_push_block_supplies_the_defaults(hub, hub_cache, tmp_path):
    import weightx

    folder = tmp_path / "o"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", str(hub_cache[0]))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        weightx.apply(expo_recipe(push={"repo": "alice/from-recipe", "private": True, "revision": "rc"}),
                      output=folder, push=False)
    r = push(folder, endpoint=hub.url)
    assert (r.repo_id, r.revision) == ("alice/from-recipe", "rc") and hub.state.repos["alice/from-recipe"].private


# ------------------------------------------------------------------------ dry run


@pytest.mark.slow
def test_dry_run_lists_files_and_makes_no_network_call(hub, out, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    r = push(out, repo="alice/tiny-expo", dry_run=True, endpoint=hub.url)
    assert hub.state.log == [] and hub.state.repos == {}
    text = render_dry_run(r)
    assert "alice/tiny-expo" in text and "no network call" in text and "a real push would refuse" in text
    for path, data in local_files(out).items():
        line = next(line for line in text.splitlines() if line.endswith(f"  {path}"))
        assert hashlib.sha256(data).hexdigest() in line
    assert {f.path: (f.size, f.sha256) for f in r.files} == {
        p: (len(d), hashlib.sha256(d).hexdigest()) for p, d in local_files(out).items()}


# ------------------------------------------------------------------------ refusals


@pytest.mark.slow
def test_refuses_an_incomplete_output(hub, out):
    (out / "weightx.json").unlink()
    with pytest.raises(PushError, match="not a finished weightx output"):
        push(out, repo="alice/x", endpoint=hub.url)
    assert hub.state.log == []


def test_refuses_a_failed_validation_unless_forced(hub, out):
    record = json.loads((out / "weightx.json").read_text())
    record["validation"] = {"passed": False, "results": {"output": {"weightx_smoke": {"acc": {"value": 0.1, "stderr": 0.01}}}}}
    (out / "weightx.json").write_text(json.dumps(record))
    with pytest.raises(PushError, match="failed its validation.*--force"):
        push(out, repo="alice/x", endpoint=hub.url)
    assert hub.state.log == []
    push(out, repo="alice/x", force=True, endpoint=hub.url)
    card = hub.file_bytes("alice/x", "README.md").decode()
    assert "Validation **FAILED**" in card  # the card regenerated from weightx.json says so
    assert ModelCard(card).data.eval_results[0].metric_value == 0.1
    assert (out / "README.md").read_text() == card  # and the folder keeps the card that was pushed


@pytest.mark.slow
def test_refuses_without_a_token(hub, out, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PushError, match="no Hugging Face token"):
        push(out, repo="alice/x", endpoint=hub.url)
    assert hub.state.log == []


@pytest.mark.slow
def test_refuses_offline_mode_and_bad_repo_ids(hub, out, monkeypatch):
    with pytest.raises(UsageError, match="namespace/name"):
        push(out, repo="just-a-name", endpoint=hub.url)
    with pytest.raises(UsageError, match="not a branch"):
        push(out, repo="alice/x", revision="a" * 40, endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="unset HF_HUB_OFFLINE"):
        push(out, repo="alice/x", endpoint=hub.url)
    assert hub.state.log == []


@pytest.mark.slow
def test_refuses_files_that_contain_the_token(hub, out):
    (out / "notes.txt").write_text(f"token={TOKEN}\n")
    with pytest.raises(PushError, match="notes.txt contains your Hub token") as err:
        push(out, repo="alice/x", endpoint=hub.url)
    assert TOKEN not in str(err.value) and hub.state.log == []


# ------------------------------------------------------------------------ Hub errors


@pytest.mark.slow
@pytest.mark.parametrize("case, expect", [
    ("401", r"rejected your token \(401 Unauthorized\).*hf auth login"),
    ("403", r"may not write to bob/x \(403 Forbidden\).*write access to the 'bob' namespace"),
    ("404", r"alice/x \(branch main\) was not found .*\(404\).*check the repo id"),
    ("409", r"conflict on alice/x \(409\).*run the push again"),
    ("5xx", r"kept failing \(503\) after 3 attempt\(s\).*try again later"),
    ("refused", r"cannot reach the Hub at http://127\.0\.0\.1:\d+ \(ConnectError\) after 3 attempt.*network"),
])
def test_hub_errors_are_one_line_saying_what_to_do(hub, out, monkeypatch, case, expect):
    repo, endpoint = "alice/x", hub.url
    if case == "401":
        monkeypatch.setenv("HF_TOKEN", "hf_notAValidToken000000")
    elif case == "403":
        repo = "bob/x"
    elif case == "404":
        hub.fail("POST", r"/preupload/", 404)
    elif case == "409":
        hub.fail("POST", r"/commit/", 409)
    elif case == "5xx":
        hub.fail("POST", r"^/api/repos/create$", 503)
    else:
        endpoint = closed_port_url()
    with pytest.raises(PushError, match=expect) as err:
        push(out, repo=repo, endpoint=endpoint, **FAST)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    if case in ("401", "403", "404", "409"):  # not transient: no retries
        assert len(hub.requests("POST", r"^/api/repos/create$")) == 1
        assert len(hub.requests("POST", r"/preupload/")) <= 1 and len(hub.requests("POST", r"/commit/")) <= 1


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when this returns: connection refused


@pytest.mark.slow
def test_transient_errors_are_retried_then_succeed(hub, out):
    hub.fail("POST", r"^/api/repos/create$", 503, times=2)
    hub.fail("POST", r"/commit/", 502, times=2)
    logs: list[str] = []
    r = push(out, repo="alice/x", endpoint=hub.url, log=logs.append, **FAST)
    assert r.commit_oid == hub.head("alice/x").oid
    assert len(hub.requests("POST", r"^/api/repos/create$")) == 3 and len(hub.requests("POST", r"/commit/")) == 3
    assert sum("retrying" in m for m in logs) == 4
    assert hub.commit_paths("alice/x") >= set(local_files(out))


@pytest.mark.slow
def test_lfs_upload_retries_inside_huggingface_hub(hub, out):
    hub.fail("PUT", r"^/lfs/objects/", 500, times=2)  # retried by the client's own backoff (~3 s)
    push(out, repo="alice/x", endpoint=hub.url, **FAST)
    for p in hub.lfs_paths("alice/x"):
        assert hub.file_bytes("alice/x", p) == (out / p).read_bytes()


# ------------------------------------------------------------------------ CLI, recipe push block, planted token


def cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weightx", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_cli_push_recipe_block_and_the_planted_token_leaks_nowhere(hub, hub_cache, tmp_path):
    home = tmp_path / "hf-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update({"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                "HF_HUB_CACHE": str(hub_cache[0]), "WEIGHTX_PUSH_BACKOFF": "0.01", "WEIGHTX_CACHE": str(tmp_path / "wx")})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(expo_recipe(output={"path": "out", "dtype": "bfloat16", "shard_size": "200KB"},
                                                 push={"repo": "alice/tiny", "private": True})))
    runs = []

    # Hub ids resolve offline from the fake cache; the push itself needs the network, so apply runs
    # --no-push offline and then a push-only apply runs online against the same output.
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    runs.append(cli("apply", str(recipe), "--no-push", env=offline, cwd=tmp_path))
    assert runs[-1].returncode == 0, runs[-1].stderr
    assert hub.state.log == []  # --no-push: the Hub was not contacted
    runs.append(cli("push", "out", "--dry-run", env=env, cwd=tmp_path))
    assert runs[-1].returncode == 0 and "alice/tiny" in runs[-1].stdout and hub.state.log == []
    runs.append(cli("push", "out", env=env, cwd=tmp_path))  # repo and private from the recorded push block
    assert runs[-1].returncode == 0, runs[-1].stderr
    assert "pushed 11 file(s)" in runs[-1].stdout and hub.state.repos["alice/tiny"].private
    # A server that echoes the Authorization header in its errors: the message is scrubbed.
    hub.fail("POST", r"/commit/", 503, message="upstream said {auth}")
    runs.append(cli("push", "out", "--repo", "alice/tiny3", env=env, cwd=tmp_path))
    assert runs[-1].returncode == 1 and runs[-1].stderr.strip().splitlines()[-1].startswith("error: the Hub kept failing (503)")
    assert "Bearer ***" in runs[-1].stderr
    hub.clear_faults()
    runs.append(cli("push", "out", "--repo", "alice/tiny4", env={**env, "HF_TOKEN": ""}, cwd=tmp_path))
    assert runs[-1].returncode == 1 and runs[-1].stderr.strip() == (
        "error: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN to a token with write access")

    # The recipe's push block runs right after apply (online from here: the inputs are local copies).
    local_recipe = tmp_path / "r2.yaml"
    doc = expo_recipe(output={"path": "out2", "shard_size": "200KB"}, push={"repo": "alice/applied"})
    doc["models"] = {"sft": str(EXAMPLE / "sft"), "dpo": str(EXAMPLE / "dpo")}
    local_recipe.write_text(yaml.safe_dump(doc))
    runs.append(cli("apply", str(local_recipe), env=env, cwd=tmp_path))
    assert runs[-1].returncode == 0, runs[-1].stderr
    assert "wrote" in runs[-1].stdout and "pushed 11 file(s)" in runs[-1].stdout
    assert hub.file_bytes("alice/applied", "weightx.json") == (tmp_path / "out2" / "weightx.json").read_bytes()

    captured = "".join(r.stdout + r.stderr for r in runs)
    assert TOKEN not in captured
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if TOKEN.encode() in p.read_bytes()]
    pushed = [e.data or hub.state.lfs[e.lfs] for repo in hub.state.repos.values()
              for c in repo.commits.values() for e in c.files.values()]
    assert not [d for d in pushed if TOKEN.encode() in d]


def test_only_rank_zero_pushes_under_torchrun(hub, out, monkeypatch):
    from weightx.publish import push_spec, render_push
    from weightx.recipe.model import PushSpec

    monkeypatch.setenv("RANK", "1")
    r = push_spec(out, PushSpec(repo="alice/x"), endpoint=hub.url)
    assert render_push(r) == "rank 1: the push is left to rank 0" and hub.state.log == []
    monkeypatch.setenv("RANK", "0")
    assert push_spec(out, PushSpec(repo="alice/x"), endpoint=hub.url).commit_oid == hub.head("alice/x").oid


def test_a_token_in_the_recipe_push_block_is_rejected_without_echoing_it():
    from weightx.errors import RecipeError
    from weightx.recipe.model import load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(expo_recipe(push={"repo": "alice/x", "token": TOKEN}))
    assert "push: unknown key 'token'" in str(err.value) and TOKEN not in str(err.value)
