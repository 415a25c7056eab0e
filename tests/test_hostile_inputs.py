"""Hostile or broken checkpoints and recipes: one line naming the file and the problem, a non-zero
exit, nothing at output.path, and nothing from a file ever executed or followed.

Every case runs the real CLI in its own (forked) process; see reliability_helpers.Zygote.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from reliability_helpers import Zygote, join_file, make_pair, recipe, split_file, tiny_tensors, write_model, write_recipe

@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def assert_refused(run, out: Path, *needles: str, code: int | None = None) -> str:
    """One `error:` line, no traceback, non-zero exit, nothing at (or next to) the output."""
    assert run.code != 0 and (code is None or run.code == code), (run.code, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.weightx-*")), list(out.parent.iterdir())
    return lines[0]


def apply(zygote, tmp_path: Path, base: Path, model: Path, *extra: str, **output):
    out = tmp_path / "out"
    r = write_recipe(tmp_path / "r.yaml", recipe(base, model, out, **output))
    return zygote.run("apply", str(r), *extra), out


# ---- corrupt safetensors ----------------------------------------------------------------------


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-7])


def _header_len_past_eof(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])


def _header_len_absurd(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**63 - 1) + raw[8:])


def _bad_json(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[8] = ord("[") if raw[8] != ord("[") else ord("{")
    raw[9:12] = b"\xff\xfe:"
    p.write_bytes(bytes(raw))


def _offsets_out_of_range(p: Path) -> None:
    header, data = split_file(p)
    name = "model.layers.0.mlp.up_proj.weight"
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 10**6, e + 10**6]
    join_file(p, header, data)


def _offsets_overlap(p: Path) -> None:
    header, data = split_file(p)
    names = [n for n in header if n != "__metadata__"]
    a, b = sorted(names, key=lambda n: header[n]["data_offsets"][0])[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][0]
    header[b]["data_offsets"] = [start, start + size]  # b now reads a's bytes
    join_file(p, header, data)


def _unknown_dtype(p: Path) -> None:
    header, data = split_file(p)
    header["model.layers.0.input_layernorm.weight"]["dtype"] = "F128"
    join_file(p, header, data)


def _duplicate_name(p: Path) -> None:
    header, data = split_file(p)
    body = json.dumps(header)
    entry = json.dumps(header["model.layers.0.input_layernorm.weight"])
    body = body[:-1] + f', "model.layers.0.input_layernorm.weight": {entry}}}'
    join_file(p, body.encode(), data)


def _renamed(new: str):
    def f(p: Path) -> None:
        header, data = split_file(p)
        header[new] = header.pop("model.layers.0.input_layernorm.weight")
        join_file(p, header, data)
    return f


def _deep_json(p: Path) -> None:
    _, data = split_file(p)
    join_file(p, b"[" * 100_000 + b"]" * 100_000, data)


CORRUPT = {
    "truncated": (_truncate, ["model.safetensors", "truncated"]),
    "header-past-eof": (_header_len_past_eof, ["model.safetensors", "corrupt safetensors header", "declares"]),
    "header-absurd": (_header_len_absurd, ["model.safetensors", "declares 9223372036854775807 header bytes"]),
    "invalid-json": (_bad_json, ["model.safetensors", "invalid JSON"]),
    "deep-json": (_deep_json, ["model.safetensors", "invalid JSON"]),
    "offsets-out-of-range": (_offsets_out_of_range, ["model.safetensors", "up_proj", "outside"]),
    "offsets-overlap": (_offsets_overlap, ["model.safetensors", "overlap"]),
    "unknown-dtype": (_unknown_dtype, ["model.safetensors", "unsupported dtype 'F128'"]),
    "duplicate-name": (_duplicate_name, ["model.safetensors", "duplicate key"]),
    "name-dotdot": (_renamed("../escape.weight"), ["model.safetensors", "'../escape.weight'", "look like file paths"]),
    "name-absolute": (_renamed("/etc/passwd"), ["model.safetensors", "'/etc/passwd'", "look like file paths"]),
    "name-separator": (_renamed("model\\layers.0.weight"), ["model.safetensors", "look like file paths"]),
    "name-zero-width": (_renamed("model.layers.0.input_layernorm\u200b.weight"), ["model.safetensors", "U+200B"]),
    "name-newline": (_renamed("model.layers.0.x\nerror: fake"), ["model.safetensors", "U+000A"]),
    "name-surrogate": (_renamed("model.layers.0.\udc80"), ["model.safetensors", "U+DC80"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_shard_refused(zygote, tmp_path, case):
    mutate, needles = CORRUPT[case]
    base, model = make_pair(tmp_path)
    mutate(model / "model.safetensors")
    run, out = apply(zygote, tmp_path, base, model)
    line = assert_refused(run, out, str(model / "model.safetensors"), *needles[1:], code=1)
    assert line.count("model.safetensors") >= 1


def test_absurd_header_length_allocates_nothing(tmp_path):
    """A header claiming 2^63 bytes (or more than the file) is refused before any read of that size."""
    import tracemalloc

    from weightx.errors import InputError
    from weightx.io.safetensors import read_header

    p = tmp_path / "x.safetensors"
    for n in (2**63 - 1, 99 * 1024 * 1024, 50):
        p.write_bytes(struct.pack("<Q", n) + b"{}" + b" " * 40)
        tracemalloc.start()
        with pytest.raises(InputError, match="declares"):
            read_header(p)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20


# ---- index.json -------------------------------------------------------------------------------


def _sharded(tmp_path: Path) -> tuple[Path, Path]:
    return make_pair(tmp_path, shards=2)


def test_index_names_missing_shard(zygote, tmp_path):
    base, model = _sharded(tmp_path)
    (model / "model-00002-of-00002.safetensors").unlink()
    run, out = apply(zygote, tmp_path, base, model)
    assert_refused(run, out, str(model / "model.safetensors.index.json"), "'model-00002-of-00002.safetensors'", "missing", code=1)


def test_index_lists_tensor_its_shard_lacks(zygote, tmp_path):
    base, model = _sharded(tmp_path)
    index = model / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    run, out = apply(zygote, tmp_path, base, model)
    assert_refused(run, out, str(index), "'model.ghost.weight'", "does not contain it", code=1)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/inner.safetensors",
                                   "..\\outside.safetensors", "..", ""])
def test_index_shard_path_refused_never_followed(zygote, tmp_path, shard):
    """A shard name that is a path is refused even when the file it points to exists and is valid."""
    base, model = _sharded(tmp_path)
    index = model / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    victim = next(iter(doc["weight_map"]))
    real = model / doc["weight_map"][victim]
    # plant a perfectly valid copy where the path points, so following it would "work"
    for target in (tmp_path / "outside.safetensors", model / "sub" / "inner.safetensors"):
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(real.read_bytes())
    doc["weight_map"][victim] = shard
    index.write_text(json.dumps(doc))
    run, out = apply(zygote, tmp_path, base, model)
    assert_refused(run, out, str(index), "refusing shard name", "plain file names", code=1)


@pytest.mark.parametrize("name", ["../x", "/abs/weight", "a/b.weight", "a\\b"])
def test_index_weight_name_path_refused(zygote, tmp_path, name):
    base, model = _sharded(tmp_path)
    index = model / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][name] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    run, out = apply(zygote, tmp_path, base, model)
    assert_refused(run, out, str(index), "refusing tensor name", "look like file paths", code=1)


def test_index_not_json_or_too_big(zygote, tmp_path):
    base, model = _sharded(tmp_path)
    index = model / "model.safetensors.index.json"
    index.write_text('{"weight_map": [1, 2]}')
    run, out = apply(zygote, tmp_path, base, model)
    assert_refused(run, out, str(index), "not a valid safetensors index", code=1)


# ---- NaN / Inf --------------------------------------------------------------------------------


def _poison(folder: Path, name: str, value: float, at: int = 5) -> None:
    from safetensors.torch import load_file, save_file

    p = folder / "model.safetensors"
    t = load_file(str(p))
    t[name].view(-1)[at] = value
    save_file(t, str(p), metadata={"format": "pt"})


@pytest.mark.parametrize("where, value", [("model", float("nan")), ("base", float("inf")), ("model", float("-inf"))])
def test_nonfinite_input_is_an_error_naming_the_tensor(zygote, tmp_path, where, value):
    base, model = make_pair(tmp_path)
    victim = {"base": base, "model": model}[where]
    _poison(victim, "model.layers.0.mlp.up_proj.weight", value, at=7)
    run, out = apply(zygote, tmp_path, base, model)
    assert_refused(run, out, str(victim / "model.safetensors"), "'model.layers.0.mlp.up_proj.weight'",
                   f"of '{where}'", "index 7", "on_nonfinite: warn", code=1)


def test_nonfinite_in_large_blocked_tensor_found_in_its_block(tmp_path):
    """Blocked streaming: the culprit is found in the block that failed, with its flat index."""
    import weightx
    from weightx.errors import InputError

    base = tiny_tensors(0, torch.float32)
    base["big.weight"] = torch.randn(3000, 1000)
    model = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    model["big.weight"].view(-1)[2_500_123] = float("nan")
    b, m = write_model(tmp_path / "b", base), write_model(tmp_path / "m", model)
    with pytest.raises(InputError, match=r"'big.weight' of 'model' holds nan at index 2500123"):
        weightx.apply(recipe(b, m, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_nonfinite_warn_writes_and_records(zygote, tmp_path):
    base, model = make_pair(tmp_path)
    _poison(model, "model.embed_tokens.weight", float("nan"), at=3)
    run, out = apply(zygote, tmp_path, base, model, on_nonfinite="warn")
    assert run.code == 0, run.stderr
    warn = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "'model.embed_tokens.weight'" in warn[0] and "written anyway" in warn[0], run.stderr
    doc = json.loads((out / "weightx.json").read_text())
    assert doc["tensors"]["model.embed_tokens.weight"]["nonfinite"] == 1
    assert "nonfinite" not in doc["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert doc["recipe"]["output"]["on_nonfinite"] == "warn"


def test_nonfinite_warn_one_line_per_tensor_counts_all_blocks(tmp_path):
    import re
    import warnings

    import weightx
    from weightx.pipeline.compute import NonFiniteWarning

    base = {"big.weight": torch.randn(3000, 1000)}
    model = {"big.weight": base["big.weight"] + 0.01}
    model["big.weight"].view(-1)[[5, 1_500_000, 2_900_000]] = float("inf")  # three different blocks
    b, m = write_model(tmp_path / "b", base), write_model(tmp_path / "m", model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = weightx.apply(recipe(b, m, tmp_path / "out", on_nonfinite="warn"))
    ours = [w for w in caught if issubclass(w.category, NonFiniteWarning)]
    # blocks may be computed in parallel: the one line names whichever bad block came first
    assert len(ours) == 1 and re.search(r"holds inf at index (5|1500000|2900000)\b", str(ours[0].message))
    assert res.tensors["big.weight"]["nonfinite"] == 3


def test_overflow_from_recipe_numbers_is_named(zygote, tmp_path):
    """Finite inputs, finite but absurd alpha: the output overflows float16; the recipe is blamed (exit 2)."""
    base, model = make_pair(tmp_path)
    run, out = apply(zygote, tmp_path, base, model, dtype="float16")
    assert run.code == 0, run.stderr
    import shutil

    shutil.rmtree(out)
    r = write_recipe(tmp_path / "r2.yaml", recipe(base, model, out, alpha=1e9, dtype="float16"))
    run = zygote.run("apply", str(r))
    assert_refused(run, out, "becomes", "inputs are finite", "overflow float16", code=2)


def test_nan_times_zero_weight_still_caught(tmp_path):
    """weight 0 does not hide a NaN (NaN·0 = NaN): the check on the output still fires."""
    import weightx
    from weightx.errors import InputError

    base, model = make_pair(tmp_path)
    _poison(model, "model.layers.0.mlp.up_proj.weight", float("nan"))
    doc = recipe(base, model, tmp_path / "out")
    doc["deltas"][0]["weight"] = 0.0
    with pytest.raises(InputError, match="holds nan"):
        weightx.apply(doc)


# ---- pickles, remote code ---------------------------------------------------------------------


def _pickle_folder(folder: Path, tensors: dict, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    torch.save({k: v.clone() for k, v in tensors.items()}, folder / "pytorch_model.bin")
    (folder / "training_args.bin").write_bytes(b"not weights")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_pickle_refused_by_default_with_how_to_convert(zygote, tmp_path):
    base, model = make_pair(tmp_path)
    from safetensors.torch import load_file

    pk = _pickle_folder(tmp_path / "pk", load_file(str(model / "model.safetensors")))
    run, out = apply(zygote, tmp_path, base, pk)
    assert_refused(run, out, str(pk), "pytorch_model.bin", "unpickling can run code", "save_pretrained", "allow_pickle: true", code=1)
    run, out = apply(zygote, tmp_path, base, pk / "pytorch_model.bin")
    assert_refused(run, out, "pytorch_model.bin", "allow_pickle: true", code=1)


@pytest.mark.slow
def test_allow_pickle_reads_weights_only_and_matches_safetensors(zygote, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("WEIGHTX_CACHE", str(tmp_path / "cache"))
    base, model = make_pair(tmp_path)
    pk = _pickle_folder(tmp_path / "pk", load_file(str(model / "model.safetensors")))
    ref = write_recipe(tmp_path / "ref.yaml", recipe(base, model, tmp_path / "ref"))
    assert zygote.run("apply", str(ref)).code == 0
    doc = recipe(base, pk, tmp_path / "out")
    doc["allow_pickle"] = True
    r = write_recipe(tmp_path / "r.yaml", doc)
    run = zygote.run("apply", str(r), env={"WEIGHTX_CACHE": str(tmp_path / "cache")})
    assert run.code == 0, run.stderr
    shard = "model.safetensors"  # a single-shard output, named as transformers names it
    assert (tmp_path / "out" / shard).read_bytes() == (tmp_path / "ref" / shard).read_bytes()
    assert list((tmp_path / "cache" / "staged").glob("*.safetensors"))  # staged once, reused by later runs
    assert json.loads((tmp_path / "out" / "weightx.json").read_text())["recipe"]["allow_pickle"] is True


class _Boom:
    """Unpickling this calls os.system: exactly what weights_only=True must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_allow_pickle_never_runs_code_from_the_file(zygote, tmp_path):
    base, model = make_pair(tmp_path)
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil"
    evil.mkdir()
    state = {"model.embed_tokens.weight": torch.zeros(2), "payload": _Boom(marker)}
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"payload": _Boom(marker)}, f, protocol=2)  # a plain (legacy-format) pickle
    torch.save(state, evil / "zip.pt")  # and a zip-format one
    for target in (evil, evil / "zip.pt"):
        doc = recipe(base, target, tmp_path / "out")
        doc["allow_pickle"] = True
        run = zygote.run("apply", str(write_recipe(tmp_path / "r.yaml", doc)), env={"WEIGHTX_CACHE": str(tmp_path / "cache")})
        assert_refused(run, tmp_path / "out", "weights_only=True", code=1)
        assert "system" in run.stderr  # names what it refused to call
    assert not marker.exists()


def test_pickle_with_non_tensor_entries_refused(zygote, tmp_path):
    base, model = make_pair(tmp_path)
    odd = tmp_path / "odd"
    odd.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "step": 3}, odd / "pytorch_model.bin")
    doc = recipe(base, odd, tmp_path / "out")
    doc["allow_pickle"] = True
    run = zygote.run("apply", str(write_recipe(tmp_path / "r.yaml", doc)), env={"WEIGHTX_CACHE": str(tmp_path / "cache")})
    assert_refused(run, tmp_path / "out", "'step' is a int", code=1)


def test_auto_map_and_remote_code_are_ignored(zygote, tmp_path):
    """config.json's auto_map points at code that would leave a marker if imported; nothing imports it."""
    marker = tmp_path / "PWNED"
    config = {"model_type": "llama", "architectures": ["EvilForCausalLM"],
              "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    base, model = make_pair(tmp_path)
    for folder in (base, model):
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    run, out = apply(zygote, tmp_path, base, model)
    assert run.code == 0, run.stderr
    assert zygote.run("plan", str(tmp_path / "r.yaml")).code == 0
    assert zygote.run("inspect", str(model)).code == 0
    assert zygote.run("verify", str(out)).code == 0
    assert not marker.exists()
    assert not list(out.glob("*.py"))  # code files are never copied into an output


def test_trust_remote_code_never_passed():
    """No code path enables remote code: the flag never appears with a true value in the package."""
    import re

    import weightx

    pkg = Path(weightx.__file__).parent
    hits = [(p.name, m.group(0)) for p in pkg.rglob("*.py")
            for m in re.finditer(r"trust_remote_code\s*[=:]\s*(True|[a-z_]+)", p.read_text(encoding="utf-8"))]
    assert hits == [], hits


# ---- recipes ----------------------------------------------------------------------------------


RECIPE_CASES = {
    "nan-alpha": ("deltas:\n  - model: model\n    edits: [{expo: {alpha: .nan}}]", ["deltas.0.edits.0.expo.alpha", "finite"]),
    "inf-weight": ("deltas:\n  - model: model\n    weight: .inf", ["deltas.0.weight", "finite"]),
    "inf-string": ("deltas:\n  - model: model\n    weight: '-inf'", ["deltas.0.weight", "finite"]),
    "huge-int-weight": ("deltas:\n  - model: model\n    weight: " + "9" * 400, ["deltas.0.weight"]),
    "negative-shard": ("deltas: [{model: model}]\noutput: {path: OUT, shard_size: -5}", ["shard_size", "positive"]),
    "zero-shard": ("deltas: [{model: model}]\noutput: {path: OUT, shard_size: 0GB}", ["shard_size", "positive"]),
    "absurd-shard": ("deltas: [{model: model}]\noutput: {path: OUT, shard_size: 12 parsecs}", ["shard_size", "not a size"]),
    "bad-nonfinite-mode": ("deltas: [{model: model}]\noutput: {path: OUT, on_nonfinite: ignore}", ["on_nonfinite"]),
    "pickle-not-bool": ("deltas: [{model: model}]\nallow_pickle: sometimes", ["allow_pickle"]),
    "zero-width-alias": ("deltas: [{model: \"mod\\u200bel\"}]", ["U+200B"]),
    "rtl-path": ("deltas: [{model: model}]\noutput: {path: \"out\\u202egpj.exe\"}", ["output.path", "U+202E"]),
    "control-key": ("deltas: [{model: model}]\n\"na\\u0007me\": x", ["U+0007"]),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_numbers_and_names(zygote, tmp_path, case):
    text, needles = RECIPE_CASES[case]
    base, model = make_pair(tmp_path)
    head = f"models: {{base: {json.dumps(str(base))}, model: {json.dumps(str(model))}}}\nbase: base\n"
    if "output:" not in text:
        text += f"\noutput: {{path: {json.dumps(str(tmp_path / 'out'))}}}"
    text = text.replace("OUT", json.dumps(str(tmp_path / "out")))
    r = tmp_path / "r.yaml"
    r.write_text(head + text, encoding="utf-8")
    run = zygote.run("apply", str(r))
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.startswith("error: ") and run.stderr.count("error:") == 1
    for n in needles:
        assert n in run.stderr, (n, run.stderr)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_alias_differing_only_in_unicode_form():
    from weightx.errors import RecipeError
    from weightx.recipe.model import load_recipe

    doc = {"models": {"base": "a", "mod\u00e9l": "b"}, "base": "base", "deltas": [{"model": "mode\u0301l"}]}
    with pytest.raises(RecipeError, match="only in its Unicode form"):
        load_recipe(doc)


def test_unicode_names_that_are_fine_work_end_to_end(zygote, tmp_path):
    """Non-ASCII (but visible) aliases, tensor names and output paths are ordinary names."""
    base_t = tiny_tensors(0)
    base_t["模型.层.0.weight"] = torch.randn(4, 4).to(torch.bfloat16)
    model_t = {k: v + 0.01 if v.is_floating_point() else v for k, v in base_t.items()}
    b, m = write_model(tmp_path / "bäse", base_t), write_model(tmp_path / "мodel", model_t)
    out = tmp_path / "ausgabe-é" / "出力"
    doc = {"models": {"基础": str(b), "ёжик": str(m)}, "base": "基础",
           "deltas": [{"model": "ёжик", "edits": [{"expo": {"alpha": 0.5}}]}], "output": {"path": str(out)}}
    run = zygote.run("apply", str(write_recipe(tmp_path / "r.yaml", doc)))
    assert run.code == 0, run.stderr
    rec = json.loads((out / "weightx.json").read_text(encoding="utf-8"))
    assert rec["recipe"]["output"]["path"] == out.relative_to(tmp_path).as_posix() and "基础" in rec["recipe"]["models"]
    assert "模型.层.0.weight" in rec["tensors"]
    assert zygote.run("verify", str(out)).code == 0


@pytest.mark.slow
def test_output_path_not_utf8_refused(tmp_path):
    """A path with undecodable bytes (surrogate-escaped by Python) cannot be recorded: refused, one line."""
    import weightx
    from weightx.errors import UsageError

    base, model = make_pair(tmp_path)
    bad = str(tmp_path) + "/out-" + b"\xff".decode("utf-8", "surrogateescape")
    with pytest.raises(UsageError, match="U\\+DCFF"):
        weightx.apply(recipe(base, model, Path(bad)))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out") or p.name.startswith(".out")] == []
