"""weightx: edit LLM weights through their deltas (ExPO, DARE, TIES, BitDelta, ternary...).

    import weightx
    result = weightx.apply("recipes/quickstart.yaml")

Heavy modules (torch, transformers, lm-eval, huggingface_hub) load only when used, so the CLI
starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from weightx.api import ApplyResult, apply
    from weightx.api import plan as make_plan
    from weightx.recipe import Recipe
    from weightx.serving import apply_delta, load_delta, remove_delta

# `make_plan`, not `plan`: the submodule weightx.plan would shadow a top-level function of that name.
_LAZY = {"apply": "weightx.api", "make_plan": ("weightx.api", "plan"), "ApplyResult": "weightx.api", "Recipe": "weightx.recipe",
         "load_delta": "weightx.serving", "apply_delta": "weightx.serving", "remove_delta": "weightx.serving"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'weightx' has no attribute {name!r}")


__all__ = ["Recipe", "apply", "make_plan", "ApplyResult", "load_delta", "apply_delta", "remove_delta", "__version__"]
