"""Edit registry: YAML key = registry key = module name, and the capabilities each edit declares.

The capability sets answer, for planning and the engine, without probing objects:
`COMPRESSING` (edits that implement the `Codec` protocol: `format: delta` stores their parts),
`STREAMING` (non-elementwise edits that gather their statistics in a pre-pass over blocks) and
`PREPASSES` (edits that may need a run-level phase before writing; which one an edit needs is its
`prepass()`, since it depends on its configuration).
"""

from __future__ import annotations

from weightx.edits.base import Codec, CodecEdit, EditConfig, TensorContext
from weightx.edits.bitdelta import BitDelta
from weightx.edits.breadcrumbs import Breadcrumbs
from weightx.edits.dare import Dare
from weightx.edits.della import Della
from weightx.edits.expo import Expo
from weightx.edits.magnitude import Magnitude
from weightx.edits.scale import Scale
from weightx.edits.ternary import Ternary

EDITS: dict[str, type[EditConfig]] = {cls.model_fields["op"].default: cls for cls in (Expo, Scale, Dare, Magnitude, BitDelta, Ternary, Breadcrumbs, Della)}

COMPRESSING = frozenset(op for op, cls in EDITS.items() if cls.compresses)
STREAMING = frozenset(op for op, cls in EDITS.items() if cls.streams)
PREPASSES = {op: cls.prepasses for op, cls in EDITS.items() if cls.prepasses}

__all__ = ["EDITS", "COMPRESSING", "STREAMING", "PREPASSES", "Codec", "CodecEdit", "EditConfig", "TensorContext",
           "Expo", "Scale", "Dare", "Magnitude", "BitDelta", "Ternary", "Breadcrumbs", "Della"]
