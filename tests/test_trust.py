"""The safety promises (docs/safety.md), tried as a hostile folder, a careless habit and a killed
process would. Every case must end in one line and a non-zero exit (or a WeightxError from the
API), never a traceback or a hang, with nothing leaked, nothing lost and nothing half-written that
looks finished. `HOSTILE` counts the cases this module tries; test_trust_report prints it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import weightx
from conftest import expo_recipe, write_recipe
from weightx.cli import main
from weightx.errors import (InputError, OutputBusyError, OutputError, PlanError, PushError, RecipeError, UsageError,
                            WeightxError)

HOSTILE: dict[str, int] = {}
REPO = Path(__file__).resolve().parent.parent


def _case(kind: str) -> None:
    HOSTILE[kind] = HOSTILE.get(kind, 0) + 1


def one_line(result, code: int | None = None) -> str:
    """The CLI refused in exactly one line, without a traceback; returns that line."""
    text = result.output.strip()
    assert "Traceback" not in text, text
    assert result.exit_code != 0 and (code is None or result.exit_code == code), (result.exit_code, text)
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def tree(folder: Path) -> dict[str, str]:
    """Every file under a folder with its sha256: what "untouched" means."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def no_litter(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if ".weightx-" in p.name] == []


@pytest.fixture
def stranger(family, tmp_path) -> Path:
    """A copy of the fine-tuned model folder that a test may plant things in."""
    dst = tmp_path / "stranger"
    shutil.copytree(family["dpo"], dst)
    return dst


def shard_with(folder: Path, part: str) -> tuple[Path, dict, str]:
    """(shard file, its tensors, the first tensor name containing `part`) of a sharded model folder."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in sorted(weight_map) if part in n)
    path = folder / weight_map[name]
    return path, load_file(str(path)), name


def recipe_for(family, model: Path, out: Path, **output) -> dict:
    return expo_recipe(family["sft"], model, out, **output)


# ---------------------------------------------------------------------------------- leaks


@pytest.mark.parametrize("target", ["token-file", "proc-environ", "outside-dir"])
def test_a_symlink_out_of_the_model_folder_is_never_copied(family, stranger, tmp_path, target):
    _case("leak: symlinked file")
    secret = tmp_path / "home" / ".cache" / "huggingface" / "token"
    secret.parent.mkdir(parents=True)
    secret.write_text("hf_secretSECRETsecretSECRETsecret00")
    where = {"token-file": secret, "proc-environ": Path("/proc/self/environ"), "outside-dir": secret.parent}[target]
    (stranger / "vocab.txt").symlink_to(where)
    out = tmp_path / "out"
    r = cli("apply", str(write_recipe(tmp_path / "r.yaml", recipe_for(family, stranger, out))))
    line = one_line(r, 1)
    assert "vocab.txt" in line and "outside the model folder" in line
    assert not out.exists()
    no_litter(tmp_path)


def test_a_symlink_inside_the_model_folder_is_copied_as_a_file(family, stranger, tmp_path):
    _case("leak: symlink inside the folder (allowed)")
    (stranger / "sub").mkdir()
    (stranger / "tokenizer_config.json").rename(stranger / "sub" / "tokenizer_config.json")
    (stranger / "tokenizer_config.json").symlink_to(Path("sub") / "tokenizer_config.json")
    out = tmp_path / "out"
    weightx.apply(recipe_for(family, stranger, out))
    copied = out / "tokenizer_config.json"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (stranger / "sub" / "tokenizer_config.json").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_a_fifo_never_hangs_apply_plan_or_inspect(family, stranger, tmp_path, name):
    """Each command in its own process with a timeout: a hang fails the test instead of the suite."""
    _case(f"special file: FIFO as {name}")
    if name.endswith("safetensors"):
        name = shard_with(stranger, "layers.0")[0].name
    (stranger / name).unlink()
    os.mkfifo(stranger / name)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for(family, stranger, tmp_path / "out"))
    commands = [["apply", str(recipe)], ["plan", str(recipe)]] + ([["inspect", str(stranger)]] if name.endswith("safetensors") else [])
    for args in commands:
        p = subprocess.run([sys.executable, "-m", "weightx", *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert name in p.stderr and "FIFO" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_records_and_cards_hold_no_absolute_local_paths(family, tmp_path):
    _case("leak: local paths in weightx.json / README.md")
    proj = tmp_path / "project"
    proj.mkdir()
    out = proj / "out"
    r = cli("apply", str(write_recipe(proj / "r.yaml", recipe_for(family, family["dpo"], out))))
    assert r.exit_code == 0, r.output
    for name in ("weightx.json", "README.md"):
        text = (out / name).read_text(encoding="utf-8")
        assert str(tmp_path) not in text and str(family["sft"].parent) not in text, name
    rec = json.loads((out / "weightx.json").read_text())
    assert rec["recipe"]["output"]["path"] == "out"  # relative to the recipe's folder
    assert rec["inputs"]["sft"]["source"] == family["sft"].name and rec["inputs"]["sft"]["files"]  # name + sha256


# ---------------------------------------------------------------------------------- data loss


def test_overwrite_never_replaces_a_folder_that_is_not_ours(family, tmp_path):
    _case("data loss: --overwrite on a documents folder")
    docs = tmp_path / "documents"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    before = tree(docs)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for(family, family["dpo"], docs))
    line = one_line(cli("apply", str(recipe), "--overwrite"), 2)
    assert "not a weightx output" in line and tree(docs) == before
    no_litter(tmp_path)


def test_overwrite_never_follows_a_symlinked_output_path(family, tmp_path):
    _case("data loss: symlinked output path")
    real = tmp_path / "real"
    weightx.apply(recipe_for(family, family["dpo"], real))  # even a weightx output behind the link
    before = tree(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    line = one_line(cli("apply", str(write_recipe(tmp_path / "r.yaml", recipe_for(family, family["dpo"], link))), "--overwrite"), 2)
    assert "symbolic link" in line and tree(real) == before and link.is_symlink()


def test_output_dot_never_replaces_the_working_directory(family, tmp_path, monkeypatch):
    _case("data loss: --output .")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("keep me")
    recipe = write_recipe(work / "r.yaml", recipe_for(family, family["dpo"], tmp_path / "unused"))
    monkeypatch.chdir(work)
    before = tree(work)
    one_line(cli("apply", "r.yaml", "--output", ".", "--overwrite"))
    assert tree(work) == before and recipe.is_file()


def test_output_holding_the_recipe_is_refused(family, tmp_path):
    _case("data loss: output folder holds the recipe")
    prev = tmp_path / "prev"
    weightx.apply(recipe_for(family, family["dpo"], prev))
    recipe = write_recipe(prev / "again.yaml", recipe_for(family, family["dpo"], prev))
    line = one_line(cli("apply", str(recipe), "--overwrite"), 1)
    assert "holds the recipe" in line and recipe.is_file()


def test_an_empty_folder_may_be_the_output(family, tmp_path):
    _case("data loss: empty folder (allowed)")
    out = tmp_path / "empty"
    out.mkdir()
    weightx.apply(recipe_for(family, family["dpo"], out))
    assert (out / "weightx.json").is_file()


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_a_planted_lock_file_truncates_nothing(family, tmp_path, plant):
    _case(f"data loss: planted lock ({plant})")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    lock = tmp_path / ".out.weightx-lock"
    {"symlink": lambda: lock.symlink_to(victim), "hardlink": lambda: os.link(victim, lock),
     "fifo": lambda: os.mkfifo(lock)}[plant]()
    with pytest.raises(OutputError, match="lock"):
        weightx.apply(recipe_for(family, family["dpo"], out))
    assert victim.read_text() == "precious" and not out.exists()


def test_an_interrupt_while_validating_leaves_no_output_and_no_lock(family, tmp_path, monkeypatch):
    """Ctrl-C (and SIGTERM, which the CLI turns into the same exception) during validation."""
    _case("interrupt during validation")
    import weightx.api as api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "validate_output", interrupted)
    doc = recipe_for(family, family["dpo"], tmp_path / "out")
    doc["validate"] = {"tasks": ["weightx_mc"], "limit": 2}
    with pytest.raises(KeyboardInterrupt):
        weightx.apply(doc)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.weightx-lock").exists()
    no_litter(tmp_path)


@pytest.mark.slow
def test_sigterm_is_one_line_and_leaves_nothing(family, tmp_path):
    _case("SIGTERM mid-run")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for(family, family["dpo"], out))
    p = subprocess.Popen([sys.executable, "-m", "weightx", "apply", str(recipe)], stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside the run (the imports take longer than this)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode == 143 and "Traceback" not in err and err.strip().startswith("terminated"), err
    assert not out.exists() and not (tmp_path / ".out.weightx-lock").exists()


@pytest.mark.slow
def test_a_failing_gate_never_replaces_the_previous_output(family, tmp_path):
    _case("data loss: failing gate with --overwrite")
    out = tmp_path / "out"
    weightx.apply(recipe_for(family, family["dpo"], out))
    before = tree(out)
    doc = recipe_for(family, family["dpo"], out)
    doc["deltas"][0]["edits"] = [{"expo": {"alpha": 0.7}}]
    doc["validate"] = {"tasks": ["weightx_mc"], "limit": 4, "compare": ["dpo"], "require": {"weightx_mc/acc": ">= dpo + 2"}}
    r = cli("apply", str(write_recipe(tmp_path / "r.yaml", doc)), "--overwrite")
    line = one_line(r, 1)
    assert tree(out) == before  # the previous output, byte for byte
    rejected = tmp_path / "out.rejected"
    assert str(rejected) in line and "unchanged" in line
    assert json.loads((rejected / "weightx.json").read_text())["validation"]["passed"] is False


# ---------------------------------------------------------------------------------- broken outputs


def test_nan_in_a_compressed_output_is_an_error_naming_the_tensor(family, tmp_path):
    _case("broken output: NaN scale in format: delta")
    bad = tmp_path / "bad"
    shutil.copytree(family["dpo"], bad)
    path, sd, name = shard_with(bad, "mlp.up_proj.weight")
    sd[name][0, 0] = float("nan")
    save_file(sd, str(path), metadata={"format": "pt"})
    doc = recipe_for(family, bad, tmp_path / "art")
    doc["deltas"][0]["edits"] = [{"bitdelta": {}}]
    doc["output"]["format"] = "delta"
    with pytest.raises(InputError, match=name.replace(".", r"\.")):
        weightx.apply(doc)
    assert not (tmp_path / "art").exists()


def test_finite_float32_that_overflows_bfloat16_is_caught(tmp_path):
    _case("broken output: bf16 overflow")
    base = {"w": torch.zeros(4, 4)}
    ft = {"w": torch.full((4, 4), 1.0e38)}
    ft["w"][1, 2] = 3.4e38  # finite in float32, +Inf once rounded to bfloat16
    for name, sd in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    doc = {"models": {"base": str(tmp_path / "base"), "ft": str(tmp_path / "ft")}, "base": "base",
           "deltas": [{"model": "ft"}], "output": {"path": str(tmp_path / "out"), "dtype": "bfloat16"}}
    with pytest.raises(UsageError, match="'w' becomes inf"):
        weightx.apply(doc)
    assert not (tmp_path / "out").exists()


def test_eval_refuses_a_delta_artifact_and_an_incomplete_checkpoint(family, tmp_path):
    _case("broken output: eval of a delta artifact")
    doc = recipe_for(family, family["dpo"], tmp_path / "art")
    doc["deltas"][0]["edits"] = [{"bitdelta": {}}]
    doc["output"]["format"] = "delta"
    weightx.apply(doc)
    line = one_line(cli("eval", str(tmp_path / "art"), "--tasks", "weightx_mc", "--limit", "2"), 1)
    assert "delta artifact" in line and "acc" not in line
    _case("broken output: eval with missing weights")
    partial = tmp_path / "partial"
    shutil.copytree(family["dpo"], partial)
    path, sd, dropped = shard_with(partial, "layers.0.mlp.down_proj")
    del sd[dropped]
    save_file(sd, str(path), metadata={"format": "pt"})
    index = json.loads((partial / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    r = cli("eval", str(partial), "--tasks", "weightx_mc", "--limit", "2")
    assert dropped in one_line(r, 1)


def test_an_input_truncated_after_mapping_is_one_line_not_sigbus(tmp_path):
    _case("broken input: truncated while mapped")
    from weightx.io.safetensors import MappedFile, read_header

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(256, 256)}, str(path), metadata={"format": "pt"})
    mf = MappedFile(read_header(path))
    os.truncate(path, 4096)
    info = mf.header.tensors["w"]
    with pytest.raises(InputError, match="truncated while weightx read it"):
        mf.view(info, 0, info.numel)
    mf.close()


def test_an_input_rewritten_during_the_run_is_refused(family, stranger, tmp_path, monkeypatch):
    _case("broken input: rewritten mid-run")
    import weightx.pipeline.run as run

    real = run.write_shards

    def rewriting(*a, **k):
        out = real(*a, **k)
        shard = shard_with(stranger, "layers.0")[0]
        shard.write_bytes(shard.read_bytes())  # same bytes, but a rewrite: ctime moves
        return out

    monkeypatch.setattr(run, "write_shards", rewriting)
    with pytest.raises(InputError, match="changed while weightx read it"):
        weightx.apply(recipe_for(family, stranger, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_resume_notices_an_input_rewritten_with_its_old_size_and_mtime(family, stranger, tmp_path):
    _case("broken input: resume after a same-size, same-mtime rewrite")
    from weightx.pipeline.resume import fingerprint

    plan = weightx.plan(recipe_for(family, stranger, tmp_path / "out"))
    first = fingerprint(plan, "cpu")
    f = shard_with(stranger, "layers.0")[0]
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime put back
    assert fingerprint(weightx.plan(recipe_for(family, stranger, tmp_path / "out")), "cpu") != first


@pytest.mark.parametrize("shape", [[0, 2**63], [2**53, 0], [0] + [2**20] * 4])
def test_shapes_nothing_could_load_are_refused(tmp_path, shape):
    _case("broken input: element count beyond 64 bits")
    from weightx.io.safetensors import read_header

    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(InputError, match="beyond what any reader can hold"):
        read_header(path)


# ---------------------------------------------------------------------------------- push


@pytest.fixture
def pushed_env(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("HF_TOKEN", "hf_pushingTOKEN0123456789abcdefXYZ")
    monkeypatch.setenv("WEIGHTX_PUSH_BACKOFF", "0.01")


@pytest.fixture
def finished(family, tmp_path) -> Path:
    out = tmp_path / "finished"
    weightx.apply(recipe_for(family, family["dpo"], out))
    return out


def _push(out: Path, **kw):
    from weightx.publish import push

    return push(out, repo="alice/tiny", endpoint=kw.pop("endpoint", "http://127.0.0.1:9"), retries=0, **kw)


@pytest.mark.parametrize("damage", ["missing", "truncated", "extra"])
def test_push_refuses_an_output_that_does_not_match_its_record(finished, pushed_env, damage):
    _case(f"push: {damage} shard")
    shard = next(finished.glob("model*.safetensors"))
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        os.truncate(shard, shard.stat().st_size // 2)
    else:
        shutil.copy(shard, finished / "model-99999-of-99999.safetensors")
    with pytest.raises(PushError):
        _push(finished)


def test_push_refuses_symlinks_and_every_token_it_can_find(finished, pushed_env, monkeypatch, tmp_path):
    _case("push: symlink in the folder")
    (finished / "extra.json").symlink_to(tmp_path / "finished" / "config.json")
    with pytest.raises(PushError, match="symbolic link"):
        _push(finished, dry_run=True)
    (finished / "extra.json").unlink()
    for secret, kind in [("hf_envTOKENenvTOKENenvTOKEN00001", "HF_TOKEN"),
                         ("hf_someoneELSEsomeoneELSEsomeone0001", "token-shaped")]:
        _case(f"push: {kind} in a file")
        monkeypatch.setenv("HF_TOKEN", secret if kind == "HF_TOKEN" else "hf_pushingTOKEN0123456789abcdefXYZ")
        (finished / "notes.txt").write_text(f"debug: {secret}\n")
        with pytest.raises(PushError, match="notes.txt"):
            _push(finished, token="hf_otherPUSHINGtoken0123456789abcd")
    (finished / "notes.txt").unlink()


def test_push_holds_the_output_lock(finished, pushed_env):
    _case("push: concurrent apply --overwrite")
    from weightx.io.lock import output_lock

    with output_lock(finished):  # what a running `apply --overwrite` holds
        with pytest.raises(OutputBusyError):
            _push(finished)


def test_push_to_a_hub_that_never_answers_times_out(finished, pushed_env, monkeypatch):
    _case("push: silent Hub")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections (the kernel does) and never answers
    monkeypatch.setenv("WEIGHTX_PUSH_TIMEOUT", "1")
    t0 = time.monotonic()
    try:
        with pytest.raises(PushError):
            _push(finished, endpoint=f"http://127.0.0.1:{server.getsockname()[1]}")
    finally:
        server.close()
        from huggingface_hub import get_session

        get_session().timeout = type(get_session().timeout)(None)
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("repo,revision", [("alice/tiny\n", None), ("alice/tiny", "dev\n"), ("alice/tiny", "a..b"),
                                           ("alice/tiny", "x.lock"), ("alice/tiny", "-rf")])
def test_repo_ids_and_branch_names_are_checked_when_the_recipe_loads(family, tmp_path, repo, revision):
    _case("bad input: repo id / branch name")
    doc = recipe_for(family, family["dpo"], tmp_path / "out")
    doc["push"] = {"repo": repo, **({"revision": revision} if revision else {})}
    with pytest.raises(RecipeError, match="not a (Hub repo id|branch name)"):
        weightx.plan(doc)


# ---------------------------------------------------------------------------------- damaged metadata


def _artifact(family, tmp_path, edit) -> Path:
    doc = recipe_for(family, family["dpo"], tmp_path / "art")
    doc["deltas"][0]["edits"] = [edit]
    doc["output"]["format"] = "delta"
    return weightx.apply(doc).path


DAMAGES = {
    "tensors as a list": lambda d, n: d["delta"].__setitem__("tensors", []),
    "shape as strings": lambda d, n: d["delta"]["tensors"][n].__setitem__("shape", ["64", "64"]),
    "missing codec": lambda d, n: d["delta"]["tensors"][n].pop("codec"),
    "bits out of range": lambda d, n: d["delta"]["tensors"][n].__setitem__("bits", 9),
    "k larger than the tensor": lambda d, n: d["delta"]["tensors"][n].__setitem__("k", 10**9),
    "shape disagrees with the parts": lambda d, n: d["delta"]["tensors"][n].__setitem__("shape", [8, 8]),
    "base is a string": lambda d, n: d["delta"].__setitem__("base", "x"),
    "record is a list": lambda d, n: d.clear() or d.setdefault("output", ["delta"]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_artifact_record_is_one_line_in_apply_and_inspect(family, tmp_path, damage):
    _case(f"damaged weightx.json: {damage}")
    codec = "ternary" if "k " in damage else "bitdelta"
    art = _artifact(family, tmp_path, {codec: {}})
    rec = json.loads((art / "weightx.json").read_text())
    name = sorted(rec["delta"]["tensors"])[0]
    DAMAGES[damage](rec, name)
    (art / "weightx.json").write_text(json.dumps(rec))
    doc = {"models": {"sft": str(family["sft"]), "art": str(art)}, "base": "sft", "deltas": [{"model": "art"}],
           "output": {"path": str(tmp_path / "rebuilt")}}
    one_line(cli("apply", str(write_recipe(tmp_path / "m.yaml", doc))), 1)
    one_line(cli("inspect", str(art)), 1)
    assert not (tmp_path / "rebuilt").exists()


def test_a_corrupt_position_code_never_writes_wrong_weights(family, tmp_path):
    _case("damaged artifact part: corrupt Elias-Fano mask")
    art = _artifact(family, tmp_path, {"ternary": {"density": 0.3}})
    shard = next(art.glob("model*.safetensors"))
    sd = load_file(str(shard))
    mask = next(n for n in sd if n.endswith(".mask"))
    sd[mask] = torch.full_like(sd[mask], 255)  # every bit set: not a valid code
    save_file(sd, str(shard), metadata={"format": "pt"})
    doc = {"models": {"sft": str(family["sft"]), "art": str(art)}, "base": "sft", "deltas": [{"model": "art"}],
           "output": {"path": str(tmp_path / "rebuilt")}}
    with pytest.raises(WeightxError, match="damaged|sha256|does not match"):
        weightx.apply(doc)
    assert not (tmp_path / "rebuilt").exists()


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"a string"', "[" * 100000 + "]" * 100000, "{not json"])
def test_a_bad_config_json_is_refused_before_any_compute(family, stranger, tmp_path, content):
    _case("damaged config.json")
    (stranger / "config.json").write_text(content)
    t0 = time.perf_counter()
    with pytest.raises(PlanError, match="config.json"):
        weightx.plan(recipe_for(family, stranger, tmp_path / "out"))
    assert time.perf_counter() - t0 < 30


def test_an_output_path_under_a_regular_file_is_one_line(family, tmp_path):
    _case("bad input: output under a regular file")
    (tmp_path / "file.txt").write_text("x")
    r = cli("apply", str(write_recipe(tmp_path / "r.yaml", recipe_for(family, family["dpo"], tmp_path / "file.txt" / "out"))))
    one_line(r)
    assert (tmp_path / "file.txt").read_text() == "x"


# ---------------------------------------------------------------------------------- code from files


def test_task_yamls_that_import_code_need_an_explicit_opt_in(tmp_path):
    _case("code: !function task")
    from weightx.validate.tasks import resolve_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text("import os\nos.system('touch PWNED')\ndef doc_to_text(d):\n    return d['q']\n")
    (tasks / "evil.yaml").write_text("task: evil\ndataset_path: json\ndoc_to_text: !function utils.doc_to_text\n")
    with pytest.raises(UsageError, match="!function.*allow_code_tasks"):
        resolve_tasks([str(tasks / "evil.yaml")])
    with pytest.raises(UsageError, match="!function"):
        resolve_tasks([str(tasks)])
    assert resolve_tasks([str(tasks / "evil.yaml")], allow_code=True).labels == [str(tasks / "evil.yaml")]
    r = cli("eval", str(tmp_path), "--tasks", str(tasks / "evil.yaml"))
    assert "allow-code-tasks" in one_line(r, 2)
    assert not Path("PWNED").exists() and not (tasks / "PWNED").exists()


def test_a_fifo_recipe_is_refused_not_read_forever(tmp_path):
    _case("special file: FIFO as the recipe")
    os.mkfifo(tmp_path / "r.yaml")
    done: list = []
    t = threading.Thread(target=lambda: done.append(cli("plan", str(tmp_path / "r.yaml"))), daemon=True)
    t.start()
    t.join(60)
    assert done, "weightx plan hung on a FIFO recipe"
    assert "not a recipe file" in one_line(done[0], 2)


def test_trust_report():
    """Not a check: the count of hostile cases tried in this module (pytest -s shows it)."""
    print(f"\nhostile cases tried: {sum(HOSTILE.values())} over {len(HOSTILE)} kinds")
