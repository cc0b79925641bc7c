"""The recipe runner: ``objcrop train RECIPE.yaml`` (config, Lightning methods, training)."""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "RecipeConfig", "RecipeError", "load_recipe", "make_method", "parse_recipe", "train"]

_LAZY = {
    "RecipeConfig": ".config",
    "RecipeError": ".config",
    "load_recipe": ".config",
    "parse_recipe": ".config",
    "METHODS": ".methods",
    "make_method": ".methods",
    "train": ".runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
