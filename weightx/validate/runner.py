"""Run lm-eval on one model and reduce its results to weightx's schema.

Every model (a folder on disk, or a model object whose weights a sweep rewrites in place) goes
through the same path: a transformers model object wrapped in lm-eval's `HFLM`, then
`lm_eval.simple_evaluate` with tasks that were built once per run. So an in-memory candidate and
the same weights read back from disk are evaluated identically.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from weightx.io.files import read_regular
from weightx.io.sources import resolve
from weightx.errors import InputError
from weightx.pipeline.compute import pick_device
from weightx.recipe.model import ValidateSpec
from weightx.validate.tasks import LoadedTasks

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EvalSettings:
    limit: int | float | None = None
    batch_size: int | str = 1
    num_fewshot: int | None = None
    device: str | None = None  # None/"auto": CUDA when available
    dtype: str = "auto"  # "auto": float32 on CPU, the checkpoint's dtype on GPU

    def as_dict(self) -> dict:
        return {"limit": self.limit, "batch_size": self.batch_size, "num_fewshot": self.num_fewshot,
                "device": self.device, "dtype": self.dtype}


def settings_for(spec: ValidateSpec, device: str | None = None) -> EvalSettings:
    """EvalSettings from a recipe's ValidateSpec; `device` (apply's --device) applies when the spec has none."""
    return EvalSettings(limit=spec.limit, batch_size=spec.batch_size, num_fewshot=spec.num_fewshot,
                        device=spec.device or (device if device not in (None, "auto") else None), dtype=spec.dtype)


def torch_device(settings: EvalSettings) -> Any:
    return pick_device(settings.device or "auto")


def torch_dtype(settings: EvalSettings, stored: Any) -> Any:
    """The dtype models are evaluated in. CPUs are slow and lossy in half precision, so "auto" is
    float32 there; on a GPU it is the dtype the weights are stored in."""
    import torch

    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    if torch_device(settings).type == "cpu":
        return torch.float32
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def stored_dtype(path: Path) -> Any:
    import json

    import torch

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def is_delta_artifact(path: Path) -> bool:
    """A folder whose weightx.json says it holds a compressed delta (`output.format: delta`)."""
    try:
        doc = json.loads(read_regular(path / "weightx.json", 1 << 24).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("output"), dict) and doc["output"].get("format") == "delta"


def load_model(path: str | Path, settings: EvalSettings) -> tuple[Any, Any]:
    """A model folder as (model, tokenizer) on the evaluation device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return load_adapter(path, settings)
    if not (path / "config.json").is_file():
        raise InputError(f"cannot evaluate {path}: it has no config.json (set output.config_from to a model that has its config and tokenizer)")
    if is_delta_artifact(path):
        raise InputError(f"cannot evaluate {path}: it is a weightx delta artifact, not a model; rebuild it on its base"
                         " first (a recipe with the artifact under deltas, e.g. recipes/materialize.yaml) and evaluate that")
    try:
        with quiet_stderr():  # transformers' per-model "Loading weights" bar
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot evaluate {path}: no usable tokenizer there ({' '.join(str(e).split())[:160]})") from None
    dtype = torch_dtype(settings, stored_dtype(path))
    try:
        with quiet_stderr():
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot evaluate {path}: transformers cannot load it as a causal LM ({' '.join(str(e).split())[:200]})") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:  # transformers would fill them with random values: no score for such a model
        raise InputError(f"cannot evaluate {path}: {len(missing)} weight(s) the model needs are not in its files (e.g."
                         f" {missing[0]}), so they would be random; evaluate a complete checkpoint")
    return model.to(torch_device(settings)).eval(), tokenizer


def load_adapter(path: Path, settings: EvalSettings) -> tuple[Any, Any]:
    """A PEFT LoRA folder (`output.format: lora`): its base with the adapter merged in, and the base's tokenizer."""
    try:
        doc = json.loads(read_regular(path / "adapter_config.json", 1 << 20).decode("utf-8"))
        base = doc["base_model_name_or_path"]
        if not isinstance(base, str):
            raise ValueError("base_model_name_or_path is not text")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise InputError(f"cannot evaluate {path}: adapter_config.json has no readable base_model_name_or_path ({e});"
                         " fix it to name the base model") from None
    try:
        from peft import PeftModel
    except ImportError:
        raise InputError(f"cannot evaluate {path}: it is a LoRA adapter and peft is not installed; pip install peft") from None
    if not Path(base).expanduser().is_dir():  # a Hub id (org/name): its snapshot in the local cache
        base = str(resolve("base", base).root)
    model, tokenizer = load_model(base, settings)
    try:
        with quiet_stderr():
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"cannot evaluate {path}: peft cannot apply the adapter to {base} ({' '.join(str(e).split())[:200]})") from None
    return model.eval(), tokenizer


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """lm-eval's progress bars and the `git` it runs for its version write to stderr dozens of times
    per model; weightx prints one line per model instead. `weightx --verbose` (WEIGHTX_VERBOSE=1)
    keeps them. Errors still surface: they are raised, not printed."""
    if os.environ.get("WEIGHTX_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # also silences subprocesses (git) and C-level writes
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def evaluate(model: Any, tokenizer: Any, tasks: LoadedTasks, settings: EvalSettings) -> dict:
    """lm-eval's own results dict for one model object."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    with torch.no_grad(), quiet_stderr():
        raw = simple_evaluate(
            model=lm,
            tasks=list(tasks.items),
            task_manager=tasks.manager,
            limit=settings.limit,
            num_fewshot=settings.num_fewshot,
            batch_size=settings.batch_size,
            log_samples=False,
        )
    if raw is None:  # pragma: no cover - only on non-zero ranks
        raise RuntimeError("lm-eval returned no results")
    return raw


def _number(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def summarize(raw: dict) -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, bool]]]:
    """lm-eval results → `{task: {metric: {"value", "stderr"[, "filter"]}}}` and higher-is-better flags.

    lm-eval keys metrics as "metric,filter". The filter name is dropped from the key when the task
    has a single filter for that metric (e.g. "acc,none" → "acc", "exact_match,first_word" →
    "exact_match") and kept in the entry, so gates read `task/metric`.
    """
    out: dict[str, dict[str, dict]] = {}
    for task, res in raw.get("results", {}).items():
        keys = [k for k in res if "," in k and "_stderr," not in k]
        per_metric: dict[str, list[str]] = {}
        for k in keys:
            per_metric.setdefault(k.split(",", 1)[0], []).append(k)
        metrics: dict[str, dict] = {}
        for k in keys:
            metric, filt = k.split(",", 1)
            value = _number(res[k])
            if value is None:
                continue
            entry: dict[str, Any] = {"value": value, "stderr": _number(res.get(f"{metric}_stderr,{filt}"))}
            if filt != "none":
                entry["filter"] = filt
            metrics[metric if len(per_metric[metric]) == 1 else k] = entry
        out[task] = metrics
    hib = {t: {m: bool(v) for m, v in d.items()} for t, d in raw.get("higher_is_better", {}).items()}
    return out, hib


def task_order(tasks: LoadedTasks) -> list[str]:
    """Table row order: each top-level item as asked for, a group followed by its tasks."""
    order: list[str] = []
    for item in tasks.items:
        if hasattr(item, "get_all_tasks"):
            order.append(item.name)
            order += [t.task_name for t in item.get_all_tasks()]
        else:
            order.append(item.task_name)
    return order
