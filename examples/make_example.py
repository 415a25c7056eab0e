"""Write the bundled tiny example: an SFT model and a DPO "fine-tune" of it, in real HF layouts.

    python examples/make_example.py [--out examples/tiny]

sft/ is a single model.safetensors, dpo/ is sharded (model-0000i-of-0000N + index), so both
layouts are exercised by anything run on the example. Output bytes are deterministic.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run as a script from a checkout without installing weightx

import torch  # noqa: E402

from weightx.testing import build_tokenizer, make_tiny_llama  # noqa: E402

DPO_NOISE = 0.05  # relative std of the "DPO update": small next to the weights, far above bf16 rounding
DPO_SHARD_SIZE = "100KB"  # ~280 KB of bf16 weights -> 3 shards


def make_example(out: Path, corpus: Path = REPO_ROOT / "examples" / "corpus.txt") -> dict[str, Path]:
    """Write out/sft and out/dpo (replacing them); returns their paths."""
    for name in ("sft", "dpo"):
        shutil.rmtree(out / name, ignore_errors=True)  # no stale files from an older layout
    with tempfile.TemporaryDirectory() as tok_dir:
        build_tokenizer(tok_dir, corpus_path=corpus, vocab_size=512)
        sft = make_tiny_llama(out / "sft", seed=0, dtype=torch.bfloat16, tokenizer_dir=tok_dir)
    dpo = make_tiny_llama(
        out / "dpo", seed=1, init_from=sft, noise=DPO_NOISE, dtype=torch.bfloat16, max_shard_size=DPO_SHARD_SIZE
    )
    return {"sft": sft, "dpo": dpo}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "examples" / "tiny")
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT / "examples" / "corpus.txt")
    args = parser.parse_args(argv)
    for name, path in make_example(args.out, args.corpus).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
