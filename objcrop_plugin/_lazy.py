"""Exports of a package imported on first use (PEP 562), so that importing the package (and
the ``objcrop`` command's help and light commands) does not wait for torch."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose names in ``exports`` (relative
    module -> names) are imported from their module when first looked up, then kept in
    ``namespace`` (the package's ``globals()``), so later lookups are plain attributes. Any
    other name is a submodule's, imported when first looked up, or an AttributeError."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            # a submodule, as an attribute (``objcrop_plugin.proposals.store``), as it was
            # when the package imported its exports eagerly
            if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}"):
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *module_of})

    return __getattr__, __dir__
