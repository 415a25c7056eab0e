"""A model's vocabulary, read from its `tokenizer.json` (headers-level: no weights, no transformers).

`Vocab.tokens[i]` is the string of token id i (added tokens included), `core` the tokenizer model's own
vocabulary without added tokens (what two fine-tunes of one base must share), `special` the added
tokens marked special.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from weightx.errors import InputError
from weightx.io.files import read_regular
from weightx.io.sources import Source

MAX_TOKENIZER_BYTES = 256 << 20


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    core: dict[str, int]
    special: frozenset[str]

    def ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def read_vocab(alias: str, src: Source) -> Vocab:
    """The vocabulary of a model folder's tokenizer.json; InputError (one line) when it has none."""
    path = src.root / "tokenizer.json"
    if src.kind == "file" or not path.is_file():
        raise InputError(f"tokenizer: '{alias}' ({src.describe()}) has no tokenizer.json to align its embedding rows by;"
                         " give the model's folder with its (fast) tokenizer")
    try:
        from tokenizers import Tokenizer  # ships with transformers

        text = read_regular(path, MAX_TOKENIZER_BYTES).decode("utf-8")
        tok = Tokenizer.from_str(text)
        doc = json.loads(text)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON; json may raise RecursionError
        if isinstance(e, InputError):
            raise
        raise InputError(f"tokenizer: {path} cannot be read ({' '.join(str(e).split())[:120]}); re-download the tokenizer") from None
    full = tok.get_vocab(with_added_tokens=True)
    core = tok.get_vocab(with_added_tokens=False)
    size = len(full)
    tokens: list[str | None] = [None] * size
    for t, i in full.items():
        if 0 <= i < size:
            tokens[i] = t
    if any(t is None for t in tokens):
        raise InputError(f"tokenizer: {path} has gaps in its token ids (ids up to {max(full.values())} for {size} tokens);"
                         " weightx aligns contiguous vocabularies only")
    special = frozenset(a["content"] for a in doc.get("added_tokens", []) if isinstance(a, dict) and a.get("special"))
    return Vocab(tuple(tokens), core, special)  # type: ignore[arg-type]


__all__ = ["Vocab", "read_vocab"]
