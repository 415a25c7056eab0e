"""`weightx diff`: delta statistics against float64 numpy, the CLI's table/JSON/plot, and the
`--direction` hint checked by finite differences (no autograd) and by the loss of a real ExPO output."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import weightx
from weightx.diff import diff, render
from weightx.testing import default_corpus, load_state_dict
from conftest import run_cli


def f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy().reshape(-1)


def layer(name: str) -> str:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return m.group(1) if m else "other"


@pytest.fixture(scope="module")
def stats(family):
    return diff([str(family["base"]), str(family["sft"]), str(family["dpo"])], rank=True)


def test_diff_matches_numpy(family, stats):
    base, a, b = (load_state_dict(family[k]) for k in ("base", "sft", "dpo"))
    la, lb = family["sft"].name, family["dpo"].name
    per_layer: dict[str, list[float]] = {}
    for name in base:
        x, da, db = f64(base[name]), f64(a[name]) - f64(base[name]), f64(b[name]) - f64(base[name])
        got = stats["tensors"][name]
        for lab, d in ((la, da), (lb, db)):
            g = got["deltas"][lab]
            assert g["norm"] == pytest.approx(np.linalg.norm(d), rel=1e-5), name
            assert g["relative_norm"] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(x), rel=1e-5)
            assert g["max_abs"] == pytest.approx(np.abs(d).max(), rel=1e-6)
            assert g["zero_share"] == pytest.approx(np.mean(d == 0))
            assert g["above_0.005_share"] == pytest.approx(np.mean(np.abs(d) > 0.005))
        pair = got["pairs"][f"{la}|{lb}"]
        assert pair["cosine"] == pytest.approx(da @ db / (np.linalg.norm(da) * np.linalg.norm(db)), rel=1e-4, abs=1e-6)
        both = (da != 0) & (db != 0)
        assert pair["sign_agreement"] == pytest.approx(np.mean(np.sign(da[both]) == np.sign(db[both])))
        if base[name].dim() == 2:
            s2 = np.linalg.svd(da.reshape(base[name].shape), compute_uv=False) ** 2
            want = int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.9)) + 1
            assert got["deltas"][la]["effective_rank_90"] == want, name
        acc = per_layer.setdefault(layer(name), [0.0, 0.0, 0.0])
        acc[0] += da @ da
        acc[1] += x @ x
        acc[2] += da @ db
    for key, (sq, bsq, dot) in per_layer.items():
        rep = stats["layers"][key]
        assert rep["deltas"][la]["norm"] == pytest.approx(np.sqrt(sq), rel=1e-5)
        assert rep["deltas"][la]["relative_norm"] == pytest.approx(np.sqrt(sq / bsq), rel=1e-5)
    assert set(stats["layers"]) == {"0", "1", "other"}
    assert list(stats["layers"]) == ["0", "1", "other"]
    tot = sum(v[0] for v in per_layer.values())
    assert stats["total"]["deltas"][la]["norm"] == pytest.approx(np.sqrt(tot), rel=1e-5)


def test_diff_table_json_plot_cli(family, tmp_path):
    proc = run_cli("diff", str(family["base"]), str(family["sft"]), str(family["dpo"]), "--plot", str(tmp_path / "d.png"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "layer 0" in proc.stdout and "‖δ‖/‖θ‖" in proc.stdout and "cos " in proc.stdout
    png = (tmp_path / "d.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]  # nothing else written
    proc = run_cli("diff", str(family["base"]), str(family["dpo"]), "--json")
    doc = json.loads(proc.stdout)
    assert set(doc) >= {"total", "layers", "tensors"} and "pairs" not in doc["total"]


def test_diff_refusals_are_one_line(family, tmp_path):
    for args, msg in [((str(family["base"]),), "needs a base and at least one model"),
                      ((str(family["base"]), str(tmp_path / "nope")), "nope"),
                      ((str(family["base"]), str(family["dpo"]), "--plot", str(tmp_path / "missing" / "x.png")), "--plot")]:
        proc = run_cli("diff", *args)
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
        assert msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_diff_reads_a_delta_artifact(family, tmp_path):
    art = weightx.apply({"models": {"sft": str(family["sft"]), "dpo": str(family["dpo"])}, "base": "sft",
                         "deltas": [{"model": "dpo", "edits": [{"ternary": {"density": 0.25}}]}],
                         "output": {"path": str(tmp_path / "art"), "format": "delta"}}).path
    doc = diff([str(family["sft"]), str(art)])
    name = "model.layers.0.mlp.gate_proj.weight"
    d = doc["tensors"][name]["deltas"]["art"]
    assert d["zero_share"] == pytest.approx(0.75, abs=1e-3)  # the decoded ternary delta, not stored parts
    assert "layer 0" in render(doc)


def _loss(model_dir, state_override, chunks):
    """Mean next-token cross-entropy in float64 end to end (transformers' own loss casts logits to
    float32, too coarse for a finite difference)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    m.load_state_dict(state_override, strict=False)
    with torch.no_grad():
        losses = []
        for c in chunks:
            logits = m(input_ids=c).logits[0, :-1]
            losses.append(torch.nn.functional.cross_entropy(logits, c[0, 1:]))
        return float(torch.stack(losses).mean())


def test_direction_is_the_directional_derivative(family, tmp_path):
    """Σ g·δ equals (L(θ + εδ) − L(θ − εδ)) / 2ε, computed in float64 without autograd; the
    suggested sign of α is the one that lowers the loss to first order."""
    from transformers import AutoTokenizer

    from weightx.direction import direction_hint, text_chunks

    text = default_corpus().read_text()[:6000]
    (tmp_path / "t.txt").write_text(text)
    sft, dpo = (str(family[k]) for k in ("sft", "dpo"))
    (res,) = direction_hint(sft, [dpo], tmp_path / "t.txt", device="cpu")
    chunks = text_chunks(AutoTokenizer.from_pretrained(dpo), text)
    a, b = load_state_dict(family["sft"]), load_state_dict(family["dpo"])
    eps = 1e-2

    def moved(sign: float) -> dict:
        return {k: b[k].double() + sign * eps * (b[k].double() - a[k].double()) for k in b}

    fd = (_loss(dpo, moved(+1), chunks) - _loss(dpo, moved(-1), chunks)) / (2 * eps)
    assert abs(fd) > 1e-7  # a measurable slope, so the comparison means something
    assert res["g_dot_delta"] == pytest.approx(fd, rel=1e-3)
    assert sum(res["layers"].values()) == pytest.approx(res["g_dot_delta"], rel=1e-9)
    assert res["parameters_unmatched"] == []
    assert res["suggested_alpha_sign"] == ("+" if fd < 0 else "-")


def test_direction_cli(family, tmp_path):
    (tmp_path / "t.txt").write_text(default_corpus().read_text()[:3000])
    proc = run_cli("diff", str(family["sft"]), str(family["dpo"]), "--direction", str(tmp_path / "t.txt"))
    assert proc.returncode == 0, proc.stderr
    assert "Σ g·δ" in proc.stdout and "layer 0" in proc.stdout
    (tmp_path / "empty.txt").write_text("")
    proc = run_cli("diff", str(family["sft"]), str(family["dpo"]), "--direction", str(tmp_path / "empty.txt"))
    assert proc.returncode == 2 and "too little text" in proc.stderr and "Traceback" not in proc.stderr


def test_direction_reads_a_large_text_cut_mid_character(family, tmp_path):
    """Only the first MiB is read; a multi-byte character cut by that limit is not 'not UTF-8'."""
    from weightx.direction import MAX_TEXT_BYTES, direction_hint

    text = ("é" * (MAX_TEXT_BYTES // 2 + 1)).encode("utf-8")  # the limit falls inside a 2-byte character
    (tmp_path / "big.txt").write_bytes(b"a" + text)
    (res,) = direction_hint(str(family["sft"]), [str(family["dpo"])], tmp_path / "big.txt", device="cpu")
    assert res["tokens"] > 0
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    proc = run_cli("diff", str(family["sft"]), str(family["dpo"]), "--direction", str(tmp_path / "bin.txt"))
    assert proc.returncode == 2 and "not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr


def test_diff_reads_other_prefixes_and_quantized_models(family, tmp_path):
    """A PEFT-prefixed fine-tune is compared under the base's names; an FP8 fine-tune by its dequantized
    weights (its scales are not deltas)."""
    import shutil

    from safetensors.torch import save_file

    from test_quantized_inputs import fp8_copy

    (tmp_path / "peft").mkdir()
    save_file({"base_model.model." + k: v for k, v in load_state_dict(family["dpo"]).items()}, str(tmp_path / "peft" / "model.safetensors"))
    shutil.copy(family["dpo"] / "config.json", tmp_path / "peft" / "config.json")
    plain = diff([str(family["sft"]), str(family["dpo"])])
    doc = diff([str(family["sft"]), str(tmp_path / "peft")])
    assert doc["skipped"] == [] and doc["total"]["deltas"]["peft"]["norm"] == pytest.approx(plain["total"]["deltas"]["dpo"]["norm"])
    meant = fp8_copy(family["dpo"], tmp_path / "fp8")
    q = diff([str(family["sft"]), str(tmp_path / "fp8")])
    name = "model.layers.0.mlp.up_proj.weight"
    d = meant[name] - load_state_dict(family["sft"])[name].double().numpy()
    assert q["tensors"][name]["deltas"]["fp8"]["norm"] == pytest.approx(float(np.linalg.norm(d)), rel=1e-5)
    assert not any(k.endswith("_scale_inv") for k in q["tensors"])
