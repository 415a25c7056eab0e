"""Edit registry: YAML key = registry key = module name."""

from __future__ import annotations

from weightx.edits.base import EditConfig, TensorContext
from weightx.edits.bitdelta import BitDelta
from weightx.edits.dare import Dare
from weightx.edits.expo import Expo
from weightx.edits.magnitude import Magnitude
from weightx.edits.scale import Scale
from weightx.edits.ternary import Ternary

EDITS: dict[str, type[EditConfig]] = {cls.model_fields["op"].default: cls for cls in (Expo, Scale, Dare, Magnitude, BitDelta, Ternary)}

__all__ = ["EDITS", "EditConfig", "TensorContext", "Expo", "Scale", "Dare", "Magnitude", "BitDelta", "Ternary"]
