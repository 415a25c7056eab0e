"""Vocabulary alignment (the recipe's `tokenizer:` block): embedding and lm_head rows matched by token string.

The output vocabulary is the base's (`source: base`), a model's (`source: <alias>`), or the base's
followed by every token a delta's model adds (`union`). Each vocabulary tensor (embed_tokens, lm_head)
gets, per input, a row map: output row → that input's row of the same token, or −1. A delta is taken
only on rows whose token the model has (elsewhere it is 0); a token the base lacks takes as its base
row the mean of the rows of the models that have it; rows past a vocabulary (padding, as Qwen ships
152064 rows for 151665 tokens) keep their index and are never truncated. Models whose tokenizers
differ beyond added tokens (another base vocabulary) are refused in one line.

Planning is headers and tokenizer.json only; the maps are frozen data in the plan (`TensorPlan.rows`);
`TensorComputer.load` gathers through them; `write_tokenizer` writes the output's tokenizer files and
sets config.json's `vocab_size` to the rows written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from weightx.errors import InputError
from weightx.io.files import copyable, read_regular
from weightx.io.sources import Source
from weightx.io.vocab import Vocab, read_vocab
from weightx.recipe.model import Recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass(frozen=True)
class VocabPlan:
    source: str
    tokens: tuple[str, ...]  # the output vocabulary, by id
    added: tuple[str, ...]  # tokens of the output the base lacks
    special: frozenset[str]  # tokens special in the model(s) that have them
    vocabs: dict  # input alias → Vocab (the base and each delta's model)


def plan_vocab(recipe: Recipe, sources: dict[str, Source]) -> tuple[list[str], list[str], VocabPlan | None]:
    spec = recipe.tokenizer
    if spec is None:
        return [], [], None
    problems: list[str] = []
    if any(d.base for d in recipe.deltas):
        problems.append("tokenizer: a delta with its own base (a transplant) cannot be aligned by token yet; remove the tokenizer block")
    aliases = list(dict.fromkeys([recipe.base] + [d.model for d in recipe.deltas]))
    if any(sources[a].artifact is not None for a in aliases):
        problems.append("tokenizer: a delta artifact already holds its base's rows; align the models before compressing")
    if spec.source not in ("base", "union") and spec.source not in aliases:
        problems.append(f"tokenizer.source '{spec.source}' is neither base, union nor the base or a delta's model ({', '.join(aliases)})")
    if problems:
        return problems, [], None
    # The output's tokenizer is written from these folders' files: none may lead out of its folder (a
    # symlinked tokenizer_config.json could carry another file's content into a published output).
    owner = recipe.base if spec.source in ("base", "union") else spec.source
    for alias in dict.fromkeys([owner, recipe.config_from]):
        root = sources[alias].root
        for name in TOKENIZER_FILES:
            try:
                copyable(root / name, root)
            except InputError as e:
                problems.append(f"tokenizer: {e}")
    vocabs: dict[str, Vocab] = {}
    for a in aliases:
        try:
            vocabs[a] = read_vocab(a, sources[a])
        except InputError as e:
            problems.append(str(e))
    if problems:
        return problems, [], None
    core = vocabs[recipe.base].core
    for a in aliases[1:]:
        if vocabs[a].core != core:
            only = len(set(vocabs[a].core) ^ set(core))
            moved = sum(1 for t, i in vocabs[a].core.items() if core.get(t, i) != i)
            problems.append(f"tokenizer: '{a}' and the base '{recipe.base}' have different base vocabularies ({only} tokens in one"
                            f" only, {moved} at other ids), not just added tokens: these models cannot be merged row by row")
    if problems:
        return problems, [], None
    base_tokens = vocabs[recipe.base].tokens
    if spec.source == "base":
        tokens = base_tokens
    elif spec.source == "union":
        seen = set(base_tokens)
        extra = []
        for a in aliases[1:]:
            for t in vocabs[a].tokens:
                if t not in seen:
                    seen.add(t)
                    extra.append(t)
        tokens = base_tokens + tuple(extra)
    else:
        tokens = vocabs[spec.source].tokens
    in_base = set(base_tokens)
    added = tuple(t for t in tokens if t not in in_base)
    special = frozenset(t for v in vocabs.values() for t in v.special)
    dropped = {a: sum(1 for t in vocabs[a].tokens if t not in set(tokens)) for a in aliases}
    notes = [f"tokenizer: {spec.source} vocabulary, {len(tokens)} tokens ({len(added)} the base lacks"
             + (f", e.g. {added[0]!r}" if added else "") + "); embedding and lm_head rows are matched by token string"]
    notes += [f"tokenizer: {n} token(s) of '{a}' are not in the output vocabulary; their rows are left out" for a, n in dropped.items() if n]
    return [], notes, VocabPlan(spec.source, tokens, added, special, vocabs)


def row_maps(vp: VocabPlan, aliases: list[str], rows: list[int]) -> tuple[int, tuple[torch.Tensor, ...]]:
    """(output rows, per input alias the map output row → its row or −1) for one vocabulary tensor
    whose inputs have `rows` rows each (base first)."""
    n_out = len(vp.tokens)
    if vp.source == "union":
        total = max([n_out] + rows)
    else:
        owner = aliases.index(vp.source) if vp.source in aliases else 0
        total = max(n_out, rows[owner])
    maps = []
    for a, n in zip(aliases, rows):
        ids = vp.vocabs[a].ids()
        m = torch.full((total,), -1, dtype=torch.int64)
        own = torch.tensor([ids.get(t, -1) for t in vp.tokens], dtype=torch.int64)
        m[:n_out] = torch.where(own < n, own, torch.full_like(own, -1))
        size = len(vp.vocabs[a].tokens)
        pad = torch.arange(n_out, total)
        keep = (pad >= size) & (pad < n)  # padding rows of this input: past its vocabulary, within its rows
        m[n_out:] = torch.where(keep, pad, torch.full_like(pad, -1))
        maps.append(m)
    return total, tuple(maps)


def write_tokenizer(vp: VocabPlan, sources: dict[str, Source], recipe: Recipe, folder: Path, rows: int) -> None:
    """The output's tokenizer files for the planned vocabulary, and config.json's vocab_size = rows."""
    from transformers import AutoTokenizer  # heavy: only for recipes with a tokenizer block
    from tokenizers import AddedToken

    cfg_root = sources[recipe.config_from].root
    template = _chat_template(cfg_root)
    owner = recipe.base if vp.source in ("base", "union") else vp.source
    tok = AutoTokenizer.from_pretrained(sources[owner].root)
    for t in vp.added if vp.source == "union" else ():
        tok.add_tokens([AddedToken(t, special=t in vp.special, normalized=t not in vp.special)])
    got = tok.convert_tokens_to_ids(list(vp.tokens[-len(vp.added):])) if vp.added and vp.source == "union" else []
    want = list(range(len(vp.tokens) - len(vp.added), len(vp.tokens))) if got else []
    if got != want:
        raise InputError("tokenizer: the union tokenizer did not give the added tokens the planned ids; report this with the models' tokenizers")
    if template is not None:
        tok.chat_template = template
    for name in TOKENIZER_FILES:  # the config model's tokenizer files describe another vocabulary
        (folder / name).unlink(missing_ok=True)
    tok.save_pretrained(folder)
    path = folder / "config.json"
    if path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(doc, dict):
            doc["vocab_size"] = rows
            path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _chat_template(root: Path) -> str | None:
    for name in ("chat_template.jinja",):
        if (root / name).is_file():
            return read_regular(root / name, 1 << 20).decode("utf-8")
    try:
        doc = json.loads(read_regular(root / "tokenizer_config.json", 16 << 20).decode("utf-8"))
    except (InputError, OSError, ValueError, RecursionError):
        return None
    t = doc.get("chat_template") if isinstance(doc, dict) else None
    return t if isinstance(t, str) else None


__all__ = ["VocabPlan", "plan_vocab", "row_maps", "write_tokenizer"]
