"""weightx: edit LLM weights through their deltas (ExPO, DARE, TIES, BitDelta, ternary...).

    import weightx
    result = weightx.apply("recipes/quickstart.yaml")

Heavy modules (torch, transformers, lm-eval, huggingface_hub) load only when used, so the CLI
starts fast: the names below resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from weightx.version import __version__

if TYPE_CHECKING:
    from weightx.api import ApplyResult, apply, plan
    from weightx.recipe.model import Recipe
    from weightx.serving import apply_delta, load_delta, remove_delta

_LAZY = {"apply": ("weightx.api", "apply"), "plan": ("weightx.api", "plan"), "make_plan": ("weightx.api", "plan"),  # the name before `plan` was free
         "ApplyResult": ("weightx.api", "ApplyResult"), "Recipe": ("weightx.recipe.model", "Recipe"),
         "load_delta": ("weightx.serving", "load_delta"), "apply_delta": ("weightx.serving", "apply_delta"),
         "remove_delta": ("weightx.serving", "remove_delta")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'weightx' has no attribute {name!r}")


__all__ = ["Recipe", "apply", "plan", "make_plan", "ApplyResult", "load_delta", "apply_delta", "remove_delta", "__version__"]
