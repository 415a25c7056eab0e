"""ExPO's direction hint: the sign of Σ g·δ on the user's text (`weightx diff BASE MODEL --direction FILE`).

For θ(α) = θ_model + α·δ with δ = θ_model − θ_base, the loss moves to first order by α·Σ g·δ, g the
gradient of the language-model loss at θ_model ("A Unified View of Delta Parameter Editing", which
explains when extrapolation helps: when Σ g·δ < 0 on the target data, α > 0 lowers the loss). A few
forward/backward passes over the text give g; δ is read from the two checkpoints' files. Reported
per layer and in total, with the sign of α it suggests. Runs the whole model in float32 (small
models on CPU; on GPU when there is one).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from weightx.diff import layer_of
from weightx.errors import InputError, UsageError
from weightx.io.files import read_regular
from weightx.io.sources import resolve
from weightx.pipeline.compute import Inputs

MAX_CHUNKS = 8
CHUNK_TOKENS = 256
MAX_TEXT_BYTES = 1 << 20  # far more than MAX_CHUNKS × CHUNK_TOKENS tokens of text


def text_chunks(tokenizer, text: str, chunk: int = CHUNK_TOKENS, limit: int = MAX_CHUNKS) -> list[torch.Tensor]:
    """The text's token ids cut into up to `limit` chunks of `chunk` tokens (the last may be shorter, ≥ 2)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = [torch.tensor([ids[i:i + chunk]]) for i in range(0, len(ids), chunk)][:limit]
    return [c for c in out if c.shape[1] >= 2]


def chunk_loss(model, chunks: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean over chunks of the next-token cross-entropy."""
    losses = [model(input_ids=c.to(device), labels=c.to(device)).loss for c in chunks]
    return torch.stack(losses).mean()


def direction_hint(base_path: str, model_paths: list[str], text_file: Path, device: str | None = None) -> list[dict]:
    """Σ g·δ for each model (its delta against the base), per layer and in total."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = read_regular(text_file, MAX_TEXT_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(data) == MAX_TEXT_BYTES and e.start >= len(data) - 3:  # a character cut by the read limit
            text = data[:e.start].decode("utf-8")
        else:
            raise UsageError(f"--direction {text_file}: not UTF-8 text (byte {e.start}); give a plain text file") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = resolve("base", base_path)
    results = []
    for path in model_paths:
        src = resolve("model", path)
        if not src.has_config:
            raise InputError(f"--direction runs {path}, which has no config.json; give a model folder")
        try:
            tok = AutoTokenizer.from_pretrained(src.root)
            model = AutoModelForCausalLM.from_pretrained(src.root, dtype=torch.float32).to(dev)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"--direction: transformers cannot load {path} ({' '.join(str(e).split())[:160]})") from None
        chunks = text_chunks(tok, text)
        if not chunks:
            raise UsageError(f"--direction {text_file}: too little text (needs at least 2 tokens)")
        model.eval()
        model.zero_grad(set_to_none=True)
        loss = chunk_loss(model, chunks, dev)
        loss.backward()
        inputs = Inputs()
        layers: dict[str, float] = {}
        total, matched, unmatched = 0.0, 0, []
        try:
            for name, p in model.named_parameters():
                if p.grad is None:
                    continue
                if name not in src.weight_map or name not in base.weight_map or src.info(name).shape != tuple(p.shape) \
                        or base.info(name).shape != tuple(p.shape):
                    unmatched.append(name)
                    continue
                n = p.numel()
                cpu = torch.device("cpu")
                delta = inputs.read(src, name, 0, n, cpu).sub_(inputs.read(base, name, 0, n, cpu))
                g = p.grad.detach().reshape(-1).to("cpu", torch.float64)
                s = float(torch.dot(g, delta.to(torch.float64)))
                total += s
                key = layer_of(name)
                layers[key] = layers.get(key, 0.0) + s
                matched += 1
        finally:
            inputs.close()
        if not matched:
            raise InputError(f"--direction: none of {path}'s parameters match tensors of both checkpoints by name and shape")
        order = sorted(layers, key=lambda x: (x == "other", int(x) if x.isdigit() else 0))
        results.append({
            "model": path, "loss": float(loss.detach()), "tokens": sum(c.shape[1] for c in chunks), "chunks": len(chunks),
            "g_dot_delta": total, "layers": {k: layers[k] for k in order}, "parameters_matched": matched,
            "parameters_unmatched": unmatched,
            "suggested_alpha_sign": "+" if total < 0 else "-" if total > 0 else "0",
        })
        del model
    return results


def render_direction(results: list[dict]) -> str:
    lines = []
    for r in results:
        sign = r["suggested_alpha_sign"]
        advice = ("extrapolate (ExPO α > 0) should lower the loss on this text" if sign == "+" else
                  "extrapolation should raise the loss on this text; α < 0 (towards the base) lowers it" if sign == "-" else
                  "no first-order effect")
        lines.append(f"direction for {r['model']}: Σ g·δ = {r['g_dot_delta']:.4g} over {r['tokens']} tokens (loss {r['loss']:.4g}): {advice}")
        worst = max((abs(v) for v in r["layers"].values()), default=0.0) or 1.0
        for k, v in r["layers"].items():
            bar = "#" * max(0, int(round(20 * abs(v) / worst))) if math.isfinite(v) else "?"
            lines.append(f"  layer {k:<6} {v:+.4g}  {'-' if v < 0 else '+'}{bar}")
        if r["parameters_unmatched"]:
            lines.append(f"  note: {len(r['parameters_unmatched'])} parameter(s) not matched on disk (e.g. {r['parameters_unmatched'][0]}) are left out")
    return "\n".join(lines)


__all__ = ["direction_hint", "render_direction", "text_chunks", "chunk_loss"]
