"""Every bundled recipe writes the same bytes as before the layered-package move.

The golden sha256 in `data/bundled_sha256.json` were produced by the code before the move (commit
98b1d6a) with `python tests/test_bundled_outputs.py --write`; recipes naming Hub models run on the
bundled tiny models instead (`--set models.X=...`), everything else as shipped. Shards, index and
config are compared; weightx.json and the card hold times and paths.

The distilled cases (BitDelta's scales are trained with a float32 forward pass whose matrix products
round differently on other CPUs and BLAS paths, and the cases built from them) are machine-dependent:
`data/bundled_sha256_distilled.json` holds their digests as the pre-move code wrote them on other
machines, and the current code must match the golden record or one of those variants in all four.

One naming change came later, on purpose: a single-shard output is now `model.safetensors`, as
transformers names it, where the golden record says `model-00001-of-00001.safetensors`; its bytes are
the golden ones (`_renamed` maps the name, never a hash).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "data" / "bundled_sha256.json"
DISTILLED_VARIANTS = Path(__file__).parent / "data" / "bundled_sha256_distilled.json"
DISTILLED = ("bitdelta", "bitdelta-dense", "bitdelta-vicuna", "materialize")
SFT, DPO = str(ROOT / "examples/tiny/sft"), str(ROOT / "examples/tiny/dpo")

# case -> (recipe, overrides); materialize reads the bitdelta case's output.
CASES: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("quickstart.yaml", []),
    "bitdelta": ("bitdelta.yaml", []),
    "materialize": ("materialize.yaml", ["models.delta={out}/bitdelta"]),
    "ternary": ("ternary.yaml", []),
    "ternary-global": ("ternary.yaml", ["deltas.0.edits.0.ternary.scope=global"]),
    "ternary-global-dense": ("ternary.yaml", ["deltas.0.edits.0.ternary.scope=global", "output.format=dense"]),
    "bitdelta-dense": ("bitdelta.yaml", ["output.format=dense"]),
    "expo-sweep": ("expo-sweep.yaml", ["deltas.0.edits.0.expo.alpha=0.3"]),  # one candidate, no evaluation
    "expo-zephyr": ("expo-zephyr.yaml", [f"models.sft={SFT}", f"models.dpo={DPO}"]),
    "dare-expo": ("dare-expo.yaml", [f"models.sft={SFT}", f"models.dpo={DPO}"]),
    "dare-ties": ("dare-ties.yaml", [f"models.llama2={SFT}", f"models.lm={DPO}", f"models.math={DPO}"]),
    "bitdelta-vicuna": ("bitdelta-vicuna.yaml", [f"models.llama={SFT}", f"models.vicuna={DPO}",
                                                 "deltas.0.edits.0.bitdelta.distill.steps=5"]),
}


def _renamed(golden: dict[str, str]) -> dict[str, str]:
    shards = [n for n in golden if n.endswith(".safetensors")]
    if shards == ["model-00001-of-00001.safetensors"]:
        return {("model.safetensors" if n == shards[0] else n): h for n, h in golden.items()}
    return golden


def _digests(folder: Path) -> dict[str, str]:
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors") + ["model.safetensors.index.json", "config.json"]
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names if (folder / n).is_file()}


def run_all(out: Path) -> dict[str, dict[str, str]]:
    import weightx.api as api

    result = {}
    for case, (recipe, sets) in CASES.items():
        overrides = [s.replace("{out}", str(out)) for s in sets]
        api.apply(str(ROOT / "recipes" / recipe), output=out / case, overrides=overrides, device="cpu",
                  validate=False, push=False, overwrite=True)
        result[case] = _digests(out / case)
    return result


@pytest.mark.slow
def test_bundled_recipes_write_the_bytes_they_wrote_before_the_move(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # bundled recipes name examples/ relative to the repository
    golden = json.loads(GOLDEN.read_text())
    got = run_all(tmp_path)
    assert sorted(got) == sorted(golden)
    index = "model.safetensors.index.json"
    for case in golden:
        if "model.safetensors" in _renamed(golden[case]):  # the index names the shard, so only its name changed
            assert json.loads((tmp_path / case / index).read_text())["weight_map"] and got[case].pop(index)

    def expected(record: dict[str, str]) -> dict[str, str]:
        want = _renamed(record)
        if "model.safetensors" in want:
            want.pop(index)
        return want

    for case in golden:
        if case not in DISTILLED:
            assert got[case] == expected(golden[case]), case
    # The distilled four: all from the golden machine, or all from one recorded variant.
    records = [golden] + [v["cases"] for v in json.loads(DISTILLED_VARIANTS.read_text())["variants"]]
    matches = [all(got[c] == expected(r[c]) for c in DISTILLED) for r in records]
    assert any(matches), {c: got[c] for c in DISTILLED}


if __name__ == "__main__":
    import os
    import tempfile

    assert sys.argv[1:] == ["--write"], "usage: python tests/test_bundled_outputs.py --write"
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_text(json.dumps(run_all(Path(d)), indent=1, sort_keys=True) + "\n")
