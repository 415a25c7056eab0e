"""Tiny, deterministic LLaMA checkpoints for tests and the bundled example.

Everything here writes real Hugging Face layouts (config, tokenizer, safetensors shards + index,
the Hub cache tree) so tests exercise the same code paths as a 7B model, in milliseconds.
transformers / tokenizers / huggingface_hub are imported inside functions: `import weightx.testing`
stays cheap for code that only needs the paths or the hashing helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from weightx.io.provenance import sha256_file  # noqa: F401 - re-exported for tests

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
# A checkout has examples/corpus.txt; an installed package may ship a copy as package data.
CORPUS_CANDIDATES = (
    REPO_ROOT / "examples" / "corpus.txt",
    Path(__file__).resolve().parent / "data" / "corpus.txt",
)

# Ids are fixed so LlamaConfig's bos/eos defaults (1, 2) match the trained tokenizer.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
)
# Files the Hub stores through LFS (default .gitattributes) and hence names by sha256 in the cache.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024
NORM_NOISE_FLOOR = 1e-3


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(
    out_dir: str | os.PathLike, corpus_path: str | os.PathLike | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus_path` (default: `default_corpus()`) and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(corpus_path) if corpus_path is not None else default_corpus()
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus {corpus} not found; pass corpus_path= explicitly")
    text = corpus.read_text(encoding="utf-8")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # Train from in-memory lines (not a file list) so the result does not depend on file chunking.
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    # Llama-style: prepend <s>, no </s>; the chat template adds </s> after each turn.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    for expected, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == expected, (token, tok.token_to_id(token))

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)
    _make_portable(out, hf_tok)
    return hf_tok


def default_corpus() -> Path:
    """The bundled English corpus (tokenizer training, calibration, perplexity smoke tests)."""
    return next((p for p in CORPUS_CANDIDATES if p.is_file()), CORPUS_CANDIDATES[0])


def _make_portable(out: Path, tok: PreTrainedTokenizerFast) -> None:
    # transformers 5 records its internal class name "TokenizersBackend", which 4.x cannot resolve;
    # "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # transformers 5 no longer writes special_tokens_map.json; older loaders and tools still read it.
    path = out / "special_tokens_map.json"
    if not path.exists():
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        data = {n: getattr(tok, n) for n in names if getattr(tok, n) is not None}
        path.write_text(json.dumps(data, indent=2) + "\n")


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer files present in `src` into `dst`."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


# ----------------------------------------------------------------------------- models


def make_tiny_llama(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 512,
    tie_embeddings: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    init_from: str | os.PathLike | None = None,
    noise: float = 0.0,
) -> Path:
    """Write a tiny LlamaForCausalLM checkpoint in the standard HF layout and return its folder.

    Random init from `seed`, or, with `init_from`, that folder's weights plus Gaussian noise of std
    `noise` x (tensor std for matrices, mean |w| for 1-D norms): a "fine-tuned" relative. With
    `init_from` the architecture arguments are ignored (the parent's config is reused) and the
    tokenizer is inherited unless `tokenizer_dir` is given.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if init_from is not None:
        config = LlamaConfig.from_pretrained(init_from)
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=tie_embeddings,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if init_from is not None:
        state = add_noise(load_state_dict(init_from), noise, seed=seed)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"{init_from} does not match its config: missing={missing}, unexpected={unexpected}")
    model = model.to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)

    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(out, **kwargs)
    tok_src = tokenizer_dir if tokenizer_dir is not None else init_from
    if tok_src is not None:
        copy_tokenizer(tok_src, out)
    return out


def make_related_pair(
    root: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str | None = None,
    tie_embeddings: bool = False,
    noise: float = 0.05,
    seed: int = 0,
    with_base: bool = False,
    extra: Iterable[str] = (),
    corpus_path: str | os.PathLike | None = None,
    **arch: int,
) -> dict[str, Path]:
    """Write a family of related tiny models under `root`; returns {name: folder}.

    Default: sft (random init) and dpo = sft + noise. With `with_base`: base (random), sft = base +
    noise, dpo = sft + noise. Each name in `extra` (e.g. "math", "code") is another base + noise
    child (the base is then implied), for merge tests. `arch` goes to `make_tiny_llama` (hidden=...).
    """
    root = Path(root)
    extra = tuple(extra)
    with_base = with_base or bool(extra)
    paths: dict[str, Path] = {}
    common = {"dtype": dtype, "max_shard_size": max_shard_size}
    with tempfile.TemporaryDirectory() as tok_dir:
        build_tokenizer(tok_dir, corpus_path=corpus_path, vocab_size=arch.get("vocab", 512))
        first = "base" if with_base else "sft"
        paths[first] = make_tiny_llama(
            root / first, seed=seed, tie_embeddings=tie_embeddings, tokenizer_dir=tok_dir, **common, **arch
        )
    children = ([("sft", "base")] if with_base else []) + [("dpo", "sft")] + [(name, "base") for name in extra]
    for name, parent in children:
        paths[name] = make_tiny_llama(
            root / name, seed=_derive_seed(seed, name), init_from=paths[parent], noise=noise, **common
        )
    return paths


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def add_noise(state: dict[str, torch.Tensor], noise: float, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return `state` + N(0, (noise * scale)^2), drawn per tensor from a generator seeded by (seed, name).

    Seeding by name keeps the result independent of tensor order; scale is the tensor's std for
    matrices and mean |w| for 1-D tensors (norms are all ones at init, so their std is zero).
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t32 = t.float()
        if noise == 0.0:
            out[name] = t32
            continue
        scale = t32.std() if t32.ndim >= 2 else t32.abs().mean()
        gen = torch.Generator().manual_seed(_derive_seed(seed, name))
        eps = torch.randn(t32.shape, generator=gen, dtype=torch.float32)
        out[name] = t32 + eps * (noise * max(float(scale), NORM_NOISE_FLOOR))
    return out


def _derive_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------- Hub cache


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (what the Hub uses as etag / cache blob name for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs_file(path: str | os.PathLike) -> bool:
    return str(path).endswith(LFS_SUFFIXES) or os.path.getsize(path) >= LFS_MIN_SIZE


def make_hf_cache(
    cache_dir: str | os.PathLike, repo_id: str, src_folder: str | os.PathLike, revision: str = "main"
) -> str:
    """Install `src_folder` into `cache_dir` exactly as `snapshot_download(repo_id)` would have; return the commit.

    Layout: models--org--name/{blobs/<id>, snapshots/<commit>/<file> -> ../../blobs/<id>,
    refs/<revision>, trees/<commit>.json}. LFS files (weights) are named by their sha256 like real
    LFS blobs, other files by their git blob sha1. The commit hash is derived from the file list and
    contents, so the same folder always gets the same commit. If `revision` is itself a 40-hex
    commit, it is used as the commit and no ref is written.
    """
    src = Path(src_folder)
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and not _hidden(p, src))
    if not files:
        raise ValueError(f"{src} contains no files")

    tree: dict[str, dict] = {}
    for rel in files:
        data = (src / rel).read_bytes()
        if is_lfs_file(src / rel):
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
            # On the Hub the git blob of an LFS file is its pointer file.
            entry = {"size": len(data), "blob_id": git_blob_sha1(pointer.encode()), "lfs_sha256": sha,
                     "lfs_size": len(data)}
            blob_name = sha
        else:
            entry = {"size": len(data), "blob_id": git_blob_sha1(data)}
            blob_name = entry["blob_id"]
        tree[rel] = entry
        blob = repo_dir / "blobs" / blob_name
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)

    is_commit = re.fullmatch(r"[0-9a-f]{40}", revision) is not None
    commit = revision if is_commit else hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for rel, entry in tree.items():
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        blob = repo_dir / "blobs" / entry.get("lfs_sha256", entry["blob_id"])
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    if not is_commit:
        ref = repo_dir / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)  # no trailing newline, as huggingface_hub writes it
    # Recent huggingface_hub also caches the tree listing (trees/<commit>.json); offline
    # snapshot_download checks the snapshot's completeness against it.
    listing = {"format_version": 1, "files": tree}
    (repo_dir / "trees").mkdir(exist_ok=True)
    (repo_dir / "trees" / f"{commit}.json").write_text(json.dumps(listing, indent=1, sort_keys=True))
    return commit


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)
