"""Combine registry: YAML key = registry key = module name."""

from __future__ import annotations

from weightx.combine.base import CombineConfig
from weightx.combine.mean import Mean
from weightx.combine.sum import Sum

COMBINES: dict[str, type[CombineConfig]] = {cls.model_fields["op"].default: cls for cls in (Sum, Mean)}

__all__ = ["COMBINES", "CombineConfig", "Sum", "Mean"]
