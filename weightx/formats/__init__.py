"""Compressed delta formats: pure encode/decode of each codec's stored parts.

`DECODERS` maps the codec name recorded in an artifact (= the edit's YAML key) to the function that
turns its parts back into a dense float32 delta; the readers in `weightx.io` use it, the edits in
`weightx.edits` encode with the same modules.
"""

from __future__ import annotations

from typing import Callable

import torch

from weightx.formats import bitdelta, ternary

ENCODING = "weightx-delta"
VERSION = 1
SUFFIXES = ("packed", "mask", "scale", "values", "index")  # every part name a codec may store, as `W.<suffix>`

DECODERS: dict[str, Callable[..., torch.Tensor]] = {"bitdelta": bitdelta.decode_parts, "ternary": ternary.decode_parts}
# The parameters each codec records per tensor in weightx.json (besides codec, shape, dtype, stats).
# "sparse" (`weightx.formats.sparse`) stores output values, so decoding it needs the base: it is not
# in DECODERS, and readers rebuild it with the base's block.
CODEC_PARAMS: dict[str, tuple[str, ...]] = {"bitdelta": ("bits", "group"), "ternary": ("k",), "sparse": ("k", "positions")}

__all__ = ["CODEC_PARAMS", "DECODERS", "ENCODING", "VERSION", "SUFFIXES"]
