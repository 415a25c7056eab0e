"""BitDelta scale distillation on a tiny model: the loss goes down, only the scales change, the
learned scales reach the artifact and the dense output alike, and the loss is recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import weightx.api as api
from weightx.pipeline.distill import batches, build_models, calibration_windows, train_scales
from weightx.errors import PlanError
from weightx.testing import default_corpus, load_state_dict

SHORT = {"steps": 12, "batch_size": 2, "max_length": 32, "lr": 1e-4}
# A few windows only: training cycles over them, so the recorded loss (first two batches) is measured
# on what was trained on. On a tiny random model the logit error is mostly the signs' and gains on
# held-out text are within noise; on a 7B model they are not (BitDelta Table: 0.41 -> 0.052).
CALIBRATION = 400  # characters of the bundled corpus: 6 windows of 32 tokens


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "calibration.txt"
    path.write_text(default_corpus().read_text()[:CALIBRATION])
    return path


def recipe(base: Path, ft: Path, out: Path, distill: dict | None, fmt: str = "delta", **bitdelta) -> dict:
    edit = {**bitdelta, **({"distill": distill} if distill else {})}
    return {"models": {"sft": str(base), "dpo": str(ft)}, "base": "sft",
            "deltas": [{"model": "dpo", "edits": [{"bitdelta": edit}]}],
            "output": {"path": str(out), "format": fmt}}


def _digest(module: torch.nn.Module) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()}


def _setup(plan):
    from transformers import AutoTokenizer

    edit = plan.recipe.deltas[0].edits[0]
    tok = AutoTokenizer.from_pretrained(plan.config_source.root)
    windows = calibration_windows(Path(edit.distill.data).read_text(), tok, SHORT["max_length"])
    teacher, student = build_models(plan, edit, torch.device("cpu"))
    return edit, windows, teacher, student


@pytest.mark.slow
def test_only_the_scales_change_and_the_loss_decreases(family, tmp_path, calibration):
    plan = api.plan(recipe(family["sft"], family["dpo"], tmp_path / "x", {"data": str(calibration), **SHORT}))
    edit, windows, teacher, student = _setup(plan)
    assert len(student.scales) == 14  # 7 projections × 2 layers
    before_student, before_teacher = _digest(student.model), _digest(teacher)
    initial = {k: v.detach().clone() for k, v in student.scales.items()}
    train = batches(windows, SHORT["batch_size"], 40, torch.device("cpu"))
    result = train_scales(teacher, student, train, batches(windows, 2, 2, torch.device("cpu")), lr=SHORT["lr"])
    assert result.loss_after < result.loss_before
    assert _digest(student.model) == before_student  # base weights, embeddings, norms, lm_head: untouched
    assert _digest(teacher) == before_teacher
    assert all(not p.requires_grad for p in student.model.parameters())
    changed = [k for k in initial if not torch.equal(initial[k], result.scales[k])]
    assert len(changed) == len(initial)
    # the initial scales are BitDelta's mean|δ|
    base, ft = load_state_dict(family["sft"]), load_state_dict(family["dpo"])
    for k, v in initial.items():
        assert float(v[0]) == pytest.approx(float((ft[k].double() - base[k].double()).abs().mean()), rel=1e-6)


def test_exact_binary_delta_starts_at_its_scale_with_zero_loss(tmp_path):
    """METHODS §8 BitDelta 6: W_ft = W_base + α*·S exactly → α₀ = α* and the loss is 0."""
    from safetensors.torch import save_file

    from weightx.testing import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", dtype=torch.float32, seed=3, tokenizer_dir=None)
    from weightx.testing import build_tokenizer

    build_tokenizer(base)
    state = load_state_dict(base)
    ft_state, alphas = {}, {}
    gen = torch.Generator().manual_seed(0)
    for i, (k, v) in enumerate(sorted(state.items())):
        if k.endswith("proj.weight"):
            alphas[k] = 2.0 ** -(8 + i % 4)  # ft − base is then α·S up to float32 rounding
            s = torch.where(torch.rand(v.shape, generator=gen) < 0.5, 1.0, -1.0)
            ft_state[k] = v + alphas[k] * s
        else:
            ft_state[k] = v.clone()
    ft = tmp_path / "ft"
    ft.mkdir()
    for f in base.iterdir():
        if not f.name.endswith(".safetensors"):
            (ft / f.name).write_bytes(f.read_bytes())
    save_file(ft_state, ft / "model.safetensors", metadata={"format": "pt"})
    plan = api.plan(recipe(base, ft, tmp_path / "x", {"data": str(default_corpus()), **SHORT}))
    edit, windows, teacher, student = _setup(plan)
    for k, a in alphas.items():
        assert float(student.initial[k][0]) == pytest.approx(a, rel=1e-6)
    ev = batches(windows, 2, 1, torch.device("cpu"))
    result = train_scales(teacher, student, ev, ev, lr=1e-4)
    assert result.loss_before < 1e-12


@pytest.mark.slow
def test_apply_with_distill_writes_learned_scales_and_records_losses(family, tmp_path, calibration):
    distill = {"data": str(calibration), **SHORT}
    plain = api.apply(recipe(family["sft"], family["dpo"], tmp_path / "plain", None))
    tuned = api.apply(recipe(family["sft"], family["dpo"], tmp_path / "tuned", distill))
    a, b = load_state_dict(plain.path), load_state_dict(tuned.path)
    differing = {k for k in a if not torch.equal(a[k], b[k])}
    assert differing and all(k.endswith(".scale") for k in differing)  # signs and whole tensors identical
    meta = json.loads((tuned.path / "weightx.json").read_text())
    d = meta["distill"]
    assert d["loss_after"] < d["loss_before"] and d["trained"] == "scales only"
    assert d["steps"] == 12 and d["batch_size"] == 2 and d["max_length"] == 32 and d["lr"] == 1e-4
    assert d["data_sha256"] == hashlib.sha256(calibration.read_bytes()).hexdigest() and d["windows"] == 6
    for name, rec in meta["delta"]["tensors"].items():
        assert rec["scale"] == [pytest.approx(float(b[f"{name}.scale"][0]))]
    # The dense output with the same distillation is base + the distilled artifact, bit for bit.
    dense = api.apply(recipe(family["sft"], family["dpo"], tmp_path / "dense", distill, fmt="dense"))
    rec = {"models": {"sft": str(family["sft"]), "art": str(tuned.path)}, "base": "sft",
           "deltas": [{"model": "art"}], "output": {"path": str(tmp_path / "rec")}}
    rebuilt = api.apply(rec)
    x, y = load_state_dict(dense.path), load_state_dict(rebuilt.path)
    assert all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x)


def test_row_scales_and_multi_bit_distill(family, tmp_path, calibration):
    plan = api.plan(recipe(family["sft"], family["dpo"], tmp_path / "x", {"data": str(calibration), **SHORT},
                           bits=2, group="row"))
    edit, windows, teacher, student = _setup(plan)
    name = "model.layers.0.mlp.up_proj.weight"
    assert student.scales[name].shape == (2, 128)
    train = batches(windows, 2, 12, torch.device("cpu"))
    result = train_scales(teacher, student, train, batches(windows, 2, 2, torch.device("cpu")), lr=1e-4)
    assert result.loss_after < result.loss_before


def test_distill_plan_problems(family, tmp_path):
    with pytest.raises(PlanError, match="distill.data: nope.txt is not a file"):
        api.plan(recipe(family["sft"], family["dpo"], tmp_path / "x", {"data": "nope.txt"}))
    two = recipe(family["sft"], family["dpo"], tmp_path / "x", {"data": str(default_corpus())}, fmt="dense")
    two["models"]["other"] = str(family["base"])
    two["deltas"].append({"model": "other"})
    with pytest.raises(PlanError, match="has 2 deltas"):
        api.plan(two)
    # relative paths are taken from the recipe's folder
    (tmp_path / "cal.txt").write_text(default_corpus().read_text())
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(family["sft"], family["dpo"], tmp_path / "x", {"data": "cal.txt"})))
    plan = api.plan(path)
    assert plan.distill_data == (tmp_path / "cal.txt").resolve()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distill_on_gpu(family, tmp_path, calibration):
    distill = {"data": str(calibration), **SHORT}
    out = api.apply(recipe(family["sft"], family["dpo"], tmp_path / "gpu", distill), device="cuda")
    d = json.loads((out.path / "weightx.json").read_text())["distill"]
    assert d["device"].startswith("cuda") and d["loss_after"] < d["loss_before"]


def test_a_distillation_that_raises_the_loss_keeps_the_initial_scales(family, tmp_path, calibration):
    """lr 50 overshoots: the learned scales raise the logit MSE, so the artifact keeps the initial
    (mean |δ|) scales, byte for byte as without distillation, and weightx.json says so."""
    distill = {"data": str(calibration), **SHORT, "lr": 50.0}
    plain = api.apply(recipe(family["sft"], family["dpo"], tmp_path / "plain", None))
    lines: list[str] = []
    tuned = api.apply(recipe(family["sft"], family["dpo"], tmp_path / "tuned", distill), report=lambda e, v: lines.append(str(v)) if e == "log" else None)
    d = json.loads((tuned.path / "weightx.json").read_text())["distill"]
    assert d["scales_kept"] == "initial" and not d["loss_after"] < d["loss_before"]
    a, b = load_state_dict(plain.path), load_state_dict(tuned.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any("keeping the initial scales" in line for line in lines), lines


def test_distill_on_an_moe_model_is_refused_at_plan_time(tmp_path, calibration):
    """transformers 5 keeps Mixtral's experts fused in memory under other names than on disk:
    distillation would load nothing into them, so plan refuses it in one line."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from weightx.testing import build_tokenizer

    build_tokenizer(tmp_path / "tok", vocab_size=128)
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
        MixtralForCausalLM(cfg).save_pretrained(tmp_path / name)
        for f in (tmp_path / "tok").iterdir():
            (tmp_path / name / f.name).write_bytes(f.read_bytes())
    r = recipe(tmp_path / "a", tmp_path / "b", tmp_path / "o", {"data": str(calibration), **SHORT})
    with pytest.raises(PlanError) as e:
        api.plan(r)
    assert len(e.value.problems) == 1 and "names" in e.value.problems[0] and "remove distill" in e.value.problems[0]


def test_a_tokenizer_larger_than_the_model_is_one_line(family, tmp_path, calibration):
    """A config source whose tokenizer gives ids past the model's embedding rows: one line, not an IndexError."""
    from weightx.errors import InputError
    from weightx.testing import build_tokenizer, make_tiny_llama

    build_tokenizer(tmp_path / "tok", vocab_size=512)
    small = make_tiny_llama(tmp_path / "small", vocab=300, tokenizer_dir=tmp_path / "tok")
    tuned = make_tiny_llama(tmp_path / "small-ft", init_from=small, noise=0.05, seed=2)
    with pytest.raises(InputError, match="embedding rows; set output.config_from"):
        api.apply(recipe(small, tuned, tmp_path / "o", {"data": str(calibration), **SHORT}))
