"""Combine registry: YAML key = registry key = module name."""

from __future__ import annotations

from weightx.combine.base import CombineConfig
from weightx.combine.linear import Linear
from weightx.combine.mean import Mean
from weightx.combine.model_stock import ModelStock
from weightx.combine.nuslerp import Nuslerp
from weightx.combine.sce import Sce
from weightx.combine.slerp import Slerp
from weightx.combine.sum import Sum
from weightx.combine.ties import Ties

COMBINES: dict[str, type[CombineConfig]] = {cls.model_fields["op"].default: cls for cls in (Sum, Mean, Ties, Linear, Slerp, ModelStock, Nuslerp, Sce)}

__all__ = ["COMBINES", "CombineConfig", "Sum", "Mean", "Ties", "Linear", "Slerp", "ModelStock", "Nuslerp", "Sce"]
