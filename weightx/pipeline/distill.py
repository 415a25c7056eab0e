"""BitDelta scale distillation: train only the scales so base + compressed delta mimics the fine-tune.

BitDelta §3.2 (arXiv 2402.10193): with the sign planes frozen, minimise
E_x ‖Z_teacher(x) − Z_student(x; α)‖², the MSE between logits, over the scales α. The teacher is
the model the compression approximates (the fine-tune; generally base + the delta after the edits
before `bitdelta`); the student is base + α·S on the compressed tensors and the very values the
output will hold everywhere else. The reference's AdamW (default betas/eps, weight decay 0.01) with
cosine annealing over `steps`; paper defaults 200 steps × batch 4 × 128 tokens, lr 1e-4.

Differences from the reference, on purpose:
- Only the scales train. The reference hands *all* remaining parameters to AdamW (embeddings,
  lm_head, norms), although the paper says the model is frozen.
- The data is a text file the user names (the reference streams C4): tokenised once, cut into
  consecutive windows of `max_length` tokens (BOS first when the tokenizer has one), used in file
  order and cycled; no padding, so no padded positions enter the loss.
- On CUDA the models run in bf16, and each compressed weight is (base + α·S) rounded to bf16 per
  forward: exactly the weight a bf16 reconstruction will hold. On CPU everything is float32.

Memory: two copies of the model (teacher and student) plus the packed signs; the whole model is
needed, unlike the streaming engine, which is why this is a separate phase before writing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from weightx.edits.bitdelta import BitDelta
from weightx.errors import InputError
from weightx.formats.bitdelta import binarize, debinarize
from weightx.formats.packing import unpack_bits
from weightx.io.sources import Source
from weightx.pipeline.compute import Inputs, TensorComputer
from weightx.pipeline.plan import Plan
from weightx.pipeline.state import RunState

if TYPE_CHECKING:
    from weightx.recipe.model import Recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# ---------------------------------------------------------------------------------- planning


def plan_distill(recipe: Recipe, sources: dict[str, Source], edits: list[BitDelta],
                 recipe_dir: Path | None) -> tuple[list[str], Path | None]:
    """Cheap checks before anything runs; returns the problems and the resolved calibration file."""
    problems = []
    data_path = None
    if len(recipe.deltas) != 1:
        problems.append("bitdelta distill matches one fine-tuned model's logits; the recipe has"
                        f" {len(recipe.deltas)} deltas (compress each model in its own recipe)")
    if len(edits) > 1:
        problems.append("only one bitdelta edit per recipe may have a distill block")
    if any(s.fp8 for s in sources.values()):
        problems.append("bitdelta distill runs the models through transformers, which cannot load an FP8 checkpoint"
                        " here; remove distill, or start from the model's bf16 release")
    if any(d.base and d.base != recipe.base for d in recipe.deltas):
        problems.append("bitdelta distill matches the fine-tune from the base it was trained on; a delta with its own"
                        " `base:` (a transplant) has no such model to match: remove distill or the delta's base")
    cfg = sources[recipe.config_from]
    if not cfg.has_config:
        problems.append(f"bitdelta distill runs the model, so it needs config.json, which '{recipe.config_from}'"
                        " lacks; set output.config_from to a model folder")
    elif not any((cfg.root / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"bitdelta distill tokenises its calibration text with the tokenizer of"
                        f" '{recipe.config_from}', which has none; set output.config_from to a folder with one")
    for e in edits:
        path = Path(e.distill.data).expanduser()
        if not path.is_absolute() and recipe_dir is not None:
            path = recipe_dir / path  # as model paths: relative to the recipe's folder
        if not path.is_file():
            problems.append(f"bitdelta distill.data: {e.distill.data} is not a file (looked for {path.absolute()};"
                            " relative paths are taken from the recipe's folder)")
        else:
            data_path = path.resolve()
    if not problems and cfg.has_config:
        why = memory_names_problem(recipe.config_from, cfg, [n for n in sources[recipe.base].weight_map])
        if why:
            problems.append(why)
    return problems, data_path


def meta_model(cfg: Source) -> tuple[torch.nn.Module | None, str | None]:
    """transformers' model for a config (causal LM, else image-text-to-text), built on the meta device
    (no memory): (model, None), or (None, why it cannot be built)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText  # heavy: only when needed

    try:
        config = AutoConfig.from_pretrained(cfg.root)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, " ".join(str(e).split())[:120]
    why = ""
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            with torch.device("meta"):
                return auto.from_config(config), None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            why = " ".join(str(e).split())[:120]
    return None, why


def memory_names_problem(alias: str, cfg: Source, names: list[str]) -> str | None:
    """Distillation loads the checkpoint's tensors into transformers' model by name: one line when the
    model class (built on the meta device, no memory) cannot be built or names some tensors otherwise
    (transformers 5 fuses MoE experts in memory; vision-language models move their language model)."""
    model, why = meta_model(cfg)
    if model is None:
        return f"bitdelta distill runs '{alias}' with transformers, which cannot build it ({why}); remove distill"
    known = set(model.state_dict())
    unknown = [n for n in names if n not in known]
    if unknown:
        return (f"bitdelta distill loads the checkpoint into transformers' {type(model).__name__}, which names {len(unknown)}"
                f" of its tensors otherwise in memory (e.g. {unknown[0]}: fused MoE experts or a moved language model);"
                " distillation is not supported for this architecture yet: remove distill")
    return None


# ---------------------------------------------------------------------------------- models


class _SignSum(torch.autograd.Function):
    """δ̂ = Σ_j α_j·S_j from packed signs; the backward recomputes S_j instead of keeping float copies."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(packed)
        ctx.shape = shape
        ctx.rows = scale.dim() > 1
        return debinarize(packed, scale, shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        grads = []
        for j in range(packed.shape[0]):
            s = unpack_bits(packed[j], ctx.shape[-1]).to(grad.device).reshape(ctx.shape)
            g = torch.where(s, grad, -grad)
            grads.append(g.sum(-1) if ctx.rows else g.sum())
        return torch.stack(grads), None, None


@dataclass
class Student:
    """The base model with compressed weights replaced by base + Σ α·S; only `scales` train."""

    model: torch.nn.Module
    packed: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    scales: dict[str, torch.nn.Parameter]
    initial: dict[str, torch.Tensor] = field(default_factory=dict)

    def weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, scale in self.scales.items():
            w = self.model.get_parameter(name)
            delta = _SignSum.apply(scale, self.packed[name], self.shapes[name])
            out[name] = (w.float() + delta).to(w.dtype)
        return out

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(self.model, self.weights(), (ids,), {"use_cache": False})
        return out.logits.float()


def _empty_model(plan: Plan, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(plan.config_source.root)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def _fill(model: torch.nn.Module, values: dict[str, torch.Tensor], what: str) -> None:
    state = model.state_dict()  # shares storage with the parameters: copy_ writes into the model
    unknown = sorted(set(values) - set(state))
    if unknown:
        raise InputError(f"distill: the {what} checkpoint has tensors the model class does not know (e.g. {unknown[0]}); is config.json right?")
    filled = set(values)
    ptrs = {state[n].data_ptr() for n in filled}
    missing = [n for n, t in state.items() if n not in filled and t.data_ptr() not in ptrs and "rotary" not in n and "inv_freq" not in n]
    if missing:
        raise InputError(f"distill: the {what} checkpoint lacks {missing[0]} (and {len(missing) - 1} more) that the model needs")
    with torch.no_grad():
        for name, v in values.items():
            state[name].copy_(v)


def build_models(plan: Plan, edit: BitDelta, device: torch.device) -> tuple[torch.nn.Module, Student]:
    """Teacher (the uncompressed target) and student (base + α·S) for the tensors `edit` compresses."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = Inputs()
    comp = TensorComputer(plan, inputs, device)
    teacher_vals: dict[str, torch.Tensor] = {}
    student_vals: dict[str, torch.Tensor] = {}
    packed, shapes, scales = {}, {}, {}
    try:
        for t in plan.tensors:
            if t.edit and t.edits[0] and t.edits[0][-1] is edit:
                d = comp.edited_delta(t, 0, len(t.edits[0]) - 1)
                base = comp.load(plan.base, t, 0, t.numel).view(t.shape)
                packed[t.name], scales[t.name] = binarize(d, edit.bits, edit.group, edit.scale_multiplier)
                shapes[t.name] = tuple(t.shape)
                teacher_vals[t.name] = (base + d).to(dtype)
                student_vals[t.name] = base.to(dtype)
            else:
                value = torch.cat([b.to(device) for b in comp.blocks(t)]).view(t.shape) if t.numel else torch.empty(t.shape)
                teacher_vals[t.name] = student_vals[t.name] = value.to(dtype) if value.is_floating_point() else value
    finally:
        inputs.close()
    teacher = _empty_model(plan, device, dtype)
    _fill(teacher, teacher_vals, "teacher")
    del teacher_vals
    model = _empty_model(plan, device, dtype)
    _fill(model, student_vals, "student")
    del student_vals
    params = {n: torch.nn.Parameter(s.to(device)) for n, s in scales.items()}
    student = Student(model, {n: p.to(device) for n, p in packed.items()}, shapes, params,
                      {n: s.detach().clone().cpu() for n, s in scales.items()})
    return teacher, student


# ---------------------------------------------------------------------------------- data


def calibration_windows(text: str, tokenizer, max_length: int) -> list[list[int]]:
    """Consecutive windows of `max_length` token ids (BOS first if the tokenizer has one)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = max_length - len(bos)
    if len(ids) < 1:
        raise InputError("distill.data has no text to calibrate on")
    if len(ids) <= body:
        return [bos + ids]
    return [bos + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]


def batches(windows: list[list[int]], batch_size: int, steps: int, device: torch.device) -> list[torch.Tensor]:
    n = len(windows)
    return [torch.tensor([windows[(s * batch_size + j) % n] for j in range(batch_size)], device=device)
            for s in range(steps)]


# ---------------------------------------------------------------------------------- training


@dataclass
class DistillResult:
    scales: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float  # with the learned scales
    train_loss: list[float]
    kept: str = "learned"  # "initial" when the learned scales did not lower the loss


def _eval_loss(teacher_logits: list[torch.Tensor], student: Student, eval_batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        losses = [float(torch.nn.functional.mse_loss(student.logits(b), t)) for b, t in zip(eval_batches, teacher_logits)]
    return sum(losses) / len(losses)


def train_scales(teacher: torch.nn.Module, student: Student, train: list[torch.Tensor],
                 evaluate: list[torch.Tensor], *, lr: float, log: Callable[[str], None] = lambda m: None) -> DistillResult:
    """AdamW + cosine over len(train) steps on logit MSE; only `student.scales` are optimised.
    `log` gets a line about every tenth of the steps (step, loss, elapsed time)."""
    with torch.no_grad():
        teacher_eval = [teacher(b, use_cache=False).logits.float() for b in evaluate]
    loss_before = _eval_loss(teacher_eval, student, evaluate)
    initial = {n: p.detach().to("cpu", torch.float32).clone() for n, p in student.scales.items()}
    log(f"distill: {len(student.scales)} scale tensor(s), {len(train)} steps; logit MSE before {loss_before:.6g}")
    every, t0 = max(1, len(train) // 10), time.perf_counter()
    params = list(student.scales.values())
    opt = torch.optim.AdamW(params, lr=lr)  # weight_decay 0.01 (torch default), as the reference
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(train))
    curve = []
    for ids in train:
        with torch.no_grad():
            target = teacher(ids, use_cache=False).logits.float()
        loss = torch.nn.functional.mse_loss(student.logits(ids), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if len(curve) % every == 0 or len(curve) == len(train):
            log(f"distill: step {len(curve)}/{len(train)}, loss {curve[-1]:.6g} ({time.perf_counter() - t0:.0f} s)")
    loss_after = _eval_loss(teacher_eval, student, evaluate)
    if not loss_after < loss_before:  # worse (or NaN): training did not help, the initial scales stay
        log(f"distill: the learned scales raised the logit MSE ({loss_before:.6g} -> {loss_after:.6g}); keeping the"
            " initial scales (lower distill.lr or give more calibration text)")
        return DistillResult(initial, loss_before, loss_after, curve, kept="initial")
    log(f"distill: logit MSE {loss_before:.6g} -> {loss_after:.6g}")
    scales = {n: p.detach().to("cpu", torch.float32).clone() for n, p in student.scales.items()}
    return DistillResult(scales, loss_before, loss_after, curve)


def distill_plan(plan: Plan, device: torch.device, state: RunState, log: Callable[[str], None] = lambda m: None) -> dict:
    """Run the distillation phase of a plan; put the learned scales in `state`; return the record."""
    from transformers import AutoTokenizer  # heavy: loaded only when a recipe distills

    t0 = time.perf_counter()
    edit = next(e for d in plan.recipe.deltas for e in d.edits if e.prepass() == "distill")
    cfg = edit.distill
    path = plan.distill_data or Path(cfg.data)
    text = path.read_text(encoding="utf-8", errors="replace")
    tokenizer = AutoTokenizer.from_pretrained(plan.config_source.root)
    windows = calibration_windows(text, tokenizer, cfg.max_length)
    teacher, student = build_models(plan, edit, device)
    rows = teacher.get_input_embeddings().weight.shape[0]
    top = max(max(w) for w in windows)
    if top >= rows:  # the embedding lookup would fail deep inside the model
        raise InputError(f"bitdelta distill: the tokenizer of '{plan.recipe.config_from}' gives token id {top}, but the model has"
                         f" {rows} embedding rows; set output.config_from to the model whose tokenizer matches")
    if not student.scales:
        raise InputError("bitdelta distill: the edit compresses no tensor, so there is nothing to distill")
    train = batches(windows, cfg.batch_size, cfg.steps, device)
    evaluate = batches(windows, cfg.batch_size, min(2, -(-len(windows) // cfg.batch_size)), device)
    with torch.enable_grad():
        result = train_scales(teacher, student, train, evaluate, lr=cfg.lr, log=log)
    del teacher, student
    if device.type == "cuda":
        torch.cuda.empty_cache()
    curve = result.train_loss
    record = {
        "edit": "bitdelta",
        "data": str(path),
        "data_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "windows": len(windows),
        "steps": cfg.steps, "batch_size": cfg.batch_size, "max_length": cfg.max_length, "lr": cfg.lr,
        "optimizer": "AdamW(weight_decay=0.01) + cosine", "trained": "scales only",
        "tensors": len(result.scales),
        "loss_before": result.loss_before,
        "loss_after": result.loss_after,
        "scales_kept": result.kept,  # "initial": the learned scales raised the loss and were not used
        "loss_eval": f"mean logit MSE on the first {len(evaluate)} calibration batch(es), initial vs learned scales",
        "train_loss_first": curve[0], "train_loss_last": curve[-1],
        "device": str(device),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    state.learn(edit, result.scales, "distill", record)
    return record
