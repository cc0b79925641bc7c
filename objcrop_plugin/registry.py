"""Pluggable crop policies and proposal sources, found through package entry points.

Two entry-point groups:

- ``objcrop_plugin.policies``: a name -> a crop policy class or a view-recipe factory.
- ``objcrop_plugin.proposals``: a name -> a proposal source (generator or importer) factory.

objcrop-plugin registers its own policies and sources in these groups in its ``pyproject.toml``,
exactly as a third-party package would::

    [project.entry-points."objcrop_plugin.policies"]
    center_object = "my_package.policies:CenterObjectPolicy"

Example:
    >>> from objcrop_plugin import registry
    >>> "obj_obj_dilate" in registry.list_policies()
    True
"""

from __future__ import annotations

import functools
import importlib
from importlib import metadata
from typing import Any

__all__ = [
    "POLICY_GROUP",
    "PROPOSAL_GROUP",
    "RegistryError",
    "list_policies",
    "list_proposal_sources",
    "load_policy",
    "load_proposal_source",
    "refresh",
]

POLICY_GROUP = "objcrop_plugin.policies"
PROPOSAL_GROUP = "objcrop_plugin.proposals"


class RegistryError(LookupError):
    """A name that no installed distribution registers, or one that fails to load."""


@functools.cache
def _entry_points(group: str) -> dict[str, list[metadata.EntryPoint]]:
    found: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=group):
        found.setdefault(ep.name, []).append(ep)
    return found


def refresh() -> None:
    """Forget cached entry points (call after installing a plugin into a running process)."""
    _entry_points.cache_clear()
    importlib.invalidate_caches()  # also clears importlib.metadata's path cache


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown distribution>"


def _load(group: str, kind: str, name: str) -> Any:
    eps = _entry_points(group)
    if not eps:
        raise RegistryError(
            f"no {kind} is registered under the entry-point group '{group}': objcrop-plugin's own "
            "entry points are missing, which happens when the package is imported from a source "
            "tree without being installed. Fix: `pip install -e .` in the checkout."
        )
    if name not in eps:
        raise RegistryError(
            f"unknown {kind} '{name}'. Installed: {', '.join(sorted(eps))}. A third-party {kind} "
            f"is found when its distribution declares it in the entry-point group '{group}'."
        )
    candidates = eps[name]
    if len({ep.value for ep in candidates}) > 1:
        owners = ", ".join(f"{_dist_name(ep)} ({ep.value})" for ep in candidates)
        raise RegistryError(
            f"{kind} '{name}' is registered by more than one distribution: {owners}. "
            "Fix: uninstall one of them."
        )
    ep = candidates[0]
    try:
        return ep.load()
    except Exception as exc:  # a broken plugin must name itself
        raise RegistryError(
            f"{kind} '{name}' from distribution {_dist_name(ep)} ({ep.value}) failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def list_policies() -> list[str]:
    """Names of all installed crop policies and view recipes, sorted."""
    return sorted(_entry_points(POLICY_GROUP))


def list_proposal_sources() -> list[str]:
    """Names of all installed proposal sources (generators and importers), sorted."""
    return sorted(_entry_points(PROPOSAL_GROUP))


def load_policy(name: str) -> Any:
    """The class or factory registered as crop policy / view recipe ``name``."""
    return _load(POLICY_GROUP, "crop policy", name)


def load_proposal_source(name: str) -> Any:
    """The factory registered as proposal source ``name``."""
    return _load(PROPOSAL_GROUP, "proposal source", name)
