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
SUFFIXES = ("packed", "mask", "scale")  # every part name a codec may store, as `W.<suffix>`

DECODERS: dict[str, Callable[..., torch.Tensor]] = {"bitdelta": bitdelta.decode_parts, "ternary": ternary.decode_parts}
# The parameters each codec records per tensor in weightx.json (besides codec, shape, dtype, stats).
CODEC_PARAMS: dict[str, tuple[str, ...]] = {"bitdelta": ("bits", "group"), "ternary": ("k",)}

__all__ = ["CODEC_PARAMS", "DECODERS", "ENCODING", "VERSION", "SUFFIXES"]
