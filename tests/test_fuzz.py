"""Fuzzing the two doors strangers' bytes come through: the checkpoint reader and the recipe loader.

Hypothesis drives each target with a fixed seed (derandomize) and a bounded number of examples, and
seeded random loops add cheap byte-level mutations. The only outcome allowed is a WeightxError with
a message: any other exception fails the test, and pytest-timeout turns a hang into a failure.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_helpers import make_pair, tiny_tensors, write_model
from weightx.errors import WeightxError

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS: dict[str, int] = {}


def _count(target: str) -> None:
    COUNTS[target] = COUNTS.get(target, 0) + 1


@pytest.fixture(scope="module")
def seed_shard(tmp_path_factory) -> bytes:
    folder = write_model(tmp_path_factory.mktemp("seed"), tiny_tensors(0))
    return (folder / "model.safetensors").read_bytes()


def read_all(path: Path) -> None:
    """What a run does with a file: validate the header, then view every tensor through the mapping."""
    from weightx.io.safetensors import MappedFile, read_header

    header = read_header(path)
    mf = MappedFile(header)
    try:
        for name in header.tensors:
            t = mf.tensor(name)
            assert t.numel() == header.tensors[name].numel
    finally:
        mf.close()


def only_weightx_errors(fn, *args) -> None:
    try:
        fn(*args)
    except WeightxError as e:
        assert str(e).strip(), "a weightx error must carry a message"


# ---- checkpoint reader ------------------------------------------------------------------------


def mutate(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.45 and data:  # flip bits, biased towards the header where the structure is
            i = rng.randrange(min(len(data), 8 + 400)) if rng.random() < 0.8 else rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif kind < 0.6:  # truncate
            del data[rng.randrange(len(data) + 1):]
        elif kind < 0.75 and data:  # overwrite a byte with a JSON-significant one
            data[rng.randrange(min(len(data), 400))] = rng.choice(b'{}[]",:-0123456789e.\\ \x00\xff')
        elif kind < 0.9:  # rewrite the header length
            n = rng.choice([0, 1, 7, len(data), max(len(data) - 8, 0), 2**32, 2**63, 2**64 - 1, rng.randrange(2**16)])
            data[:8] = struct.pack("<Q", n)
        else:  # insert junk
            i = rng.randrange(len(data) + 1)
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(data)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_shard_bytes_seeded(seed_shard, tmp_path):
    rng = random.Random(9)
    p = tmp_path / "x.safetensors"
    for _ in range(3000):
        p.write_bytes(mutate(seed_shard, rng))
        only_weightx_errors(read_all, p)
        _count("shard byte mutations")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_shard_bytes_hypothesis(seed_shard, tmp_path):
    p = tmp_path / "h.safetensors"

    @FUZZ
    @given(st.randoms(use_true_random=False))
    def run(rng):
        p.write_bytes(mutate(seed_shard, rng))
        only_weightx_errors(read_all, p)
        _count("shard byte mutations (hypothesis)")

    run()


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=12)
dtypes = st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "F128", "f32", "", "C64"])
entries = st.fixed_dictionaries({
    "dtype": st.one_of(dtypes, json_values),
    "shape": st.one_of(st.lists(st.integers(min_value=-2, max_value=2**40), max_size=4), json_values),
    "data_offsets": st.one_of(st.lists(st.integers(min_value=-5, max_value=2**40), min_size=0, max_size=3), json_values),
})
names = st.one_of(st.text(max_size=20), st.sampled_from(["../x", "/etc/passwd", "a\\b", "__metadata__", ".."]))
headers = st.dictionaries(names, st.one_of(entries, json_values), max_size=5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_structured_headers(tmp_path):
    p = tmp_path / "s.safetensors"

    @FUZZ
    @given(headers, st.integers(min_value=0, max_value=256), st.sampled_from([None, 0, 1, 2**20, 2**63]))
    def run(header, data_len, declared):
        body = json.dumps(header).encode()
        n = len(body) if declared is None else declared
        p.write_bytes(struct.pack("<Q", n) + body + bytes(data_len))
        only_weightx_errors(read_all, p)
        _count("structured headers")

    run()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_index_json(tmp_path):
    from weightx.io.sources import resolve

    base, model = make_pair(tmp_path, shards=2)
    index = model / "model.safetensors.index.json"
    good = json.loads(index.read_text())

    @FUZZ
    @given(st.one_of(
        st.dictionaries(st.one_of(names, st.sampled_from(list(good["weight_map"]))),
                        st.one_of(st.sampled_from(sorted(set(good["weight_map"].values())) + ["../model.safetensors", "/", ""]), json_values),
                        max_size=6).map(lambda m: {"weight_map": m}),
        json_values))
    def run(doc):
        index.write_text(json.dumps(doc))
        only_weightx_errors(resolve, "model", str(model))
        _count("index.json documents")

    run()


# ---- delta artifacts and config.json ----------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, Path, bytes, dict]:
    """A ternary + bitdelta-shaped delta artifact of a tiny pair: (base, artifact, shard bytes, record)."""
    import weightx

    root = tmp_path_factory.mktemp("artifact")
    base, model = make_pair(root)
    out = root / "art"
    weightx.apply({"models": {"base": str(base), "model": str(model)}, "base": "base",
                   "deltas": [{"model": "model", "edits": [{"ternary": {"density": 0.3, "include": ["*up_proj*"]}}]}],
                   "output": {"path": str(out), "format": "delta"}})
    shard = next(out.glob("model*.safetensors"))
    return base, out, shard.read_bytes(), json.loads((out / "weightx.json").read_text())


def rebuild(base: Path, art: Path) -> None:
    """What a reconstruction does with an artifact: resolve it, check its base, decode every tensor."""
    from weightx.io.sources import resolve
    from weightx.pipeline.planner import build_plan
    from weightx.recipe.model import load_recipe

    src = resolve("art", str(art))
    for name in sorted(src.artifact.codecs if src.artifact is not None else []):  # damage may make it a plain folder
        src.artifact.decode(name)
    build_plan(load_recipe({"models": {"base": str(base), "art": str(art)}, "base": "base", "deltas": [{"model": "art"}],
                            "output": {"path": str(art.parent / "never-written")}}))


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_artifact_record(artifact, tmp_path):
    """weightx.json of a delta artifact with one subtree replaced by arbitrary JSON."""
    base, art, _, good = artifact
    work = tmp_path / "art"
    shutil.copytree(art, work)
    spots = [p for p in _paths(good) if p[:1] in (("delta",), ("output",))]

    @FUZZ
    @given(st.sampled_from(spots), json_values)
    def run(where, value):
        doc = json.loads(json.dumps(good))
        if where:
            node = doc
            for key in where[:-1]:
                node = node[key]
            node[where[-1]] = value
        (work / "weightx.json").write_text(json.dumps(doc))
        only_weightx_errors(rebuild, base, work)
        _count("artifact weightx.json")

    run()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_artifact_parts(artifact, tmp_path):
    """Byte-level damage to the artifact's shard: headers, packed signs, positions, scales."""
    base, art, raw, _ = artifact
    work = tmp_path / "art"
    shutil.copytree(art, work)
    shard = next(work.glob("model*.safetensors"))
    rng = random.Random(7)
    head = 8 + struct.unpack("<Q", raw[:8])[0]
    for i in range(300):
        if i % 2:  # the tensor data: positions, signs and scales, header intact
            data = bytearray(raw)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(head, len(data))] = rng.randrange(256)
            shard.write_bytes(bytes(data))
        else:
            shard.write_bytes(mutate(raw, rng))
        only_weightx_errors(rebuild, base, work)
        _count("artifact parts")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_config_json(tmp_path):
    """config.json of the config_from model: any JSON value or damaged text is one line at planning."""
    import weightx

    base, model = make_pair(tmp_path)
    doc = {"models": {"base": str(base), "model": str(model)}, "base": "base", "deltas": [{"model": "model"}],
           "output": {"path": str(tmp_path / "never-written")}}
    cfg = model / "config.json"

    @FUZZ
    @given(st.one_of(json_values.map(json.dumps), st.text(max_size=40), st.integers(1, 5000).map(lambda n: "[" * n + "]" * n)))
    def run(text):
        cfg.write_text(text)
        only_weightx_errors(weightx.plan, doc)
        _count("config.json")

    run()


# ---- recipe loader ----------------------------------------------------------------------------


GOOD_YAML = """\
name: fuzz
models:
  base: ./a
  model: ./b
base: base
deltas:
  - model: model
    weight: 1.0
    edits:
      - expo: {alpha: 0.3}
      - dare: {drop: 0.5, seed: 1, include: ["*.weight"]}
combine: {ties: {density: 0.2}}
output:
  path: out
  dtype: bfloat16
  shard_size: 5GB
  on_nonfinite: error
validate:
  tasks: [weightx_smoke]
  compare: [model]
  require: {weightx_smoke/acc: ">= model - 0.01"}
"""
YAML_SPECIAL = ["&a ", "*a", "!!python/object:os.system", "!!binary", "{", "}", "[", "]", ":", "- ", "? ", "|", ">",
                "'", '"', "#", "%YAML 1.1\n", "---\n", "...", "\t", "\n  ", "0x1F", ".nan", ".inf", "-.inf", "1e309",
                "2001-13-45", "9" * 5000, "~", "<<: *a", "\x00", "\ufeff", "\u202e", "yes", "null"]


SCALARS = ["2001-13-45", "2001-02-03", "9" * 5000, "9" * 400, "-" + "9" * 400 + ".5", ".nan", "-.inf", "1e309",
           "1.0e+400", "yes", "no", "~", "null", "[]", "{}", "[1, [2]]", "{a: 1}", "0x7FFFFFFFFFFFFFFFFF", "0o777",
           "'\u200b'", '"\ud800"', '"\x00"', "!!binary AAAA", "!!python/name:os.system", "!!set {a}", "12 parsecs",
           "1e3ZB", "-5", "0", "0GB", "true", "*a", "&a 1", "\"mod\u0301el\""]
KEYS = ["1", "null", "true", "[1]", "? [1]", "'a\u200bb'", "<<", "__class__", "models", "op"]


def swap_scalar(text: str, rng: random.Random) -> str:
    """Replace one value (or one key) of the valid recipe: parses, then hits validation with odd types."""
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    key, sep, _ = lines[i].partition(": ")
    if sep and rng.random() < 0.8:
        lines[i] = f"{key}: {rng.choice(SCALARS)}"
    elif sep:
        indent = key[: len(key) - len(key.lstrip(" -"))]
        lines[i] = f"{indent}{rng.choice(KEYS)}: {lines[i].partition(': ')[2]}"
    return "\n".join(lines) + "\n"


def mutate_text(text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            text = swap_scalar(text, rng)
        return text
    s = list(text)
    for _ in range(rng.randint(1, 5)):
        i = rng.randrange(len(s) + 1)
        r = rng.random()
        if r < 0.5:
            s[i:i] = list(rng.choice(YAML_SPECIAL))
        elif r < 0.8 and s:
            del s[i:i + rng.randint(1, 8)]
        else:
            s[i:i] = [chr(rng.randrange(0x20, 0x2FF))]
    return "".join(s)


def load_path(p: Path) -> None:
    from weightx.recipe.model import load_recipe

    load_recipe(p)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_recipe_yaml_seeded(tmp_path):
    rng = random.Random(5)
    p = tmp_path / "r.yaml"
    for _ in range(1500):
        p.write_text(mutate_text(GOOD_YAML, rng), encoding="utf-8", errors="surrogatepass")
        only_weightx_errors(load_path, p)
        _count("recipe YAML mutations")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_recipe_yaml_hypothesis(tmp_path):
    p = tmp_path / "h.yaml"

    @FUZZ
    @given(st.one_of(st.randoms(use_true_random=False).map(lambda r: mutate_text(GOOD_YAML, r)),
                     st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
    def run(text):
        p.write_bytes(text.encode("utf-8", "surrogatepass"))
        only_weightx_errors(load_path, p)
        _count("recipe YAML texts (hypothesis)")

    run()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_recipe_dicts_and_overrides():
    from weightx.recipe.model import load_recipe

    good = yaml.safe_load(GOOD_YAML)
    paths = ["name", "models", "models.base", "base", "deltas", "deltas.0", "deltas.0.weight", "deltas.0.model",
             "deltas.0.edits", "deltas.0.edits.0", "deltas.0.edits.0.expo", "deltas.0.edits.0.expo.alpha",
             "deltas.0.edits.1.dare.drop", "combine", "combine.ties.density", "output", "output.path",
             "output.shard_size", "output.on_nonfinite", "validate.require", "validate.compare", "allow_pickle", "push"]

    odd_keys = st.one_of(st.text(max_size=6), st.integers(), st.none(), st.booleans(), st.floats())
    values = st.one_of(json_values, st.dictionaries(odd_keys, json_scalars, max_size=3),
                       st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**400, True, b"x", (1, 2)]))

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(paths), values), max_size=3),
           st.lists(st.text(max_size=30), max_size=2))
    def run(changes, overrides):
        doc = json.loads(json.dumps(good))
        for path, value in changes:
            node = doc
            keys = path.split(".")
            try:
                for k in keys[:-1]:
                    node = node[int(k)] if isinstance(node, list) else node[k]
                if isinstance(node, list):
                    node[int(keys[-1])] = value
                elif isinstance(node, dict):
                    node[keys[-1]] = value
            except (KeyError, IndexError, TypeError, ValueError):
                continue
        only_weightx_errors(load_recipe, doc, overrides)
        _count("recipe dicts and --set overrides")

    run()


def test_fuzz_report():
    """Not a check: prints the iteration counts of this module's targets (pytest -s shows them)."""
    total = sum(COUNTS.values())
    print("\nfuzz iterations:", ", ".join(f"{k}: {v}" for k, v in sorted(COUNTS.items())), f"(total {total})")
