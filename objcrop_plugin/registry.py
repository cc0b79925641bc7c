"""Crop policies and proposal sources by name: the built-in table plus package entry points.

Two kinds of names:

- crop policies and view recipes (entry-point group ``objcrop_plugin.policies``): a name -> a
  :class:`~objcrop_plugin.policies.CropPolicy` subclass or a view-recipe factory;
- proposal sources (group ``objcrop_plugin.proposals``): a name -> a
  :class:`~objcrop_plugin.proposals.generators.ProposalGenerator` subclass (``kind =
  "generator"``, used by ``objcrop proposals build --method NAME``) or a
  :class:`~objcrop_plugin.proposals.importer_base.ProposalImporter` subclass (``kind =
  "importer"``, used by ``objcrop proposals import --source NAME``).

objcrop-plugin's own names are the tables :data:`BUILTIN_POLICIES` and
:data:`BUILTIN_PROPOSAL_SOURCES` below: always available, also from a source tree that was never
installed (as timm's ``@register_model`` works at import). ``pyproject.toml`` declares the same
names as entry points, so ``importlib.metadata`` users see them too. Third-party packages add
names through the entry-point groups; they are merged on top of the built-ins::

    [project.entry-points."objcrop_plugin.policies"]
    center_object = "my_package.policies:CenterObjectPolicy"

Name clashes: a built-in name always means the built-in thing (a recipe that says
``obj_obj_dilate`` crops the same way on every machine); a distribution that registers a
built-in name for something else is ignored with a :class:`RegistryWarning` naming it. Two
third-party distributions that register one name for different objects are an error
(:class:`RegistryError`) when that name is used.

Example:
    >>> from objcrop_plugin import registry
    >>> "obj_obj_dilate" in registry.list_policies()
    True
    >>> "coco" in registry.list_proposal_sources(kind="importer")
    True
"""

from __future__ import annotations

import functools
import importlib
import warnings
from importlib import metadata
from typing import Any

__all__ = [
    "BUILTIN_POLICIES",
    "BUILTIN_PROPOSAL_SOURCES",
    "POLICY_GROUP",
    "PROPOSAL_GROUP",
    "RegistryError",
    "RegistryWarning",
    "list_policies",
    "list_proposal_sources",
    "load_policy",
    "load_proposal_source",
    "refresh",
]

POLICY_GROUP = "objcrop_plugin.policies"
PROPOSAL_GROUP = "objcrop_plugin.proposals"

#: objcrop-plugin's crop policies and view recipes: name -> ``"module:attribute"``.
BUILTIN_POLICIES: dict[str, str] = {
    "scene": "objcrop_plugin.policies:ScenePolicy",
    "object": "objcrop_plugin.policies:ObjectPolicy",
    "object_dilated": "objcrop_plugin.policies:ObjectDilatedPolicy",
    "scene_scene": "objcrop_plugin.policies:scene_scene",
    "obj_scene": "objcrop_plugin.policies:obj_scene",
    "obj_obj": "objcrop_plugin.policies:obj_obj",
    "obj_obj_dilate": "objcrop_plugin.policies:obj_obj_dilate",
    "multi_crop": "objcrop_plugin.policies:multi_crop",
}

#: objcrop-plugin's proposal generators and importers: name -> ``"module:attribute"``.
BUILTIN_PROPOSAL_SOURCES: dict[str, str] = {
    "jsonl": "objcrop_plugin.proposals.jsonl:JsonLinesImporter",
    "coco": "objcrop_plugin.proposals.importers:CocoImporter",
    "openimages": "objcrop_plugin.proposals.importers:OpenImagesImporter",
    "bing": "objcrop_plugin.proposals.bing:BingGenerator",
    "bing_opencv": "objcrop_plugin.proposals.bing:OpenCVBingGenerator",
    "graph_segments": "objcrop_plugin.proposals.segments:GraphSegmentsGenerator",
    "heatmap": "objcrop_plugin.proposals.heatmap:HeatmapGenerator",
    "selective_search": "objcrop_plugin.proposals.segments:SelectiveSearchGenerator",
    "token_cut": "objcrop_plugin.proposals.token_cut:TokenCutGenerator",
}

#: the ``kind`` of each built-in proposal source, known without importing it (listing the
#: generators and the importers need not load torch, OpenCV and every model; a test checks
#: these against the classes)
_BUILTIN_SOURCE_KINDS: dict[str, str] = {
    "jsonl": "importer", "coco": "importer", "openimages": "importer",
    "bing": "generator", "bing_opencv": "generator", "graph_segments": "generator",
    "heatmap": "generator", "selective_search": "generator", "token_cut": "generator",
}

_BUILTINS = {POLICY_GROUP: BUILTIN_POLICIES, PROPOSAL_GROUP: BUILTIN_PROPOSAL_SOURCES}
_BUILTIN_OWNER = "objcrop-plugin (built-in)"


class RegistryError(LookupError):
    """A name that nothing registers, that two distributions claim, or that fails to load."""


class RegistryWarning(UserWarning):
    """An installed distribution registers a built-in name; the built-in is used."""


@functools.cache
def _entry_points(group: str) -> dict[str, list[metadata.EntryPoint]]:
    """Installed entry points of ``group`` by name, minus those that repeat a built-in."""
    builtins = _BUILTINS[group]
    found: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=group):
        if builtins.get(ep.name) == ep.value:  # objcrop-plugin's own metadata (or a copy)
            continue
        found.setdefault(ep.name, []).append(ep)
    return found


def refresh() -> None:
    """Forget cached entry points (call after installing a plugin into a running process)."""
    _entry_points.cache_clear()
    importlib.invalidate_caches()  # also clears importlib.metadata's path cache


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown distribution>"


def _names(group: str) -> list[str]:
    return sorted(set(_BUILTINS[group]) | set(_entry_points(group)))


def _load(group: str, kind: str, name: str) -> Any:
    builtin = _BUILTINS[group].get(name)
    candidates = _entry_points(group).get(name, [])
    if builtin is not None:
        if candidates:
            owners = ", ".join(f"{_dist_name(ep)} ({ep.value})" for ep in candidates)
            warnings.warn(
                f"{kind} '{name}' is built into objcrop-plugin ({builtin}); the entry point(s) "
                f"of {owners} for the same name are ignored. Fix: register the plugin under "
                "another name.",
                RegistryWarning,
                stacklevel=3,
            )
        ep, owner = metadata.EntryPoint(name=name, value=builtin, group=group), _BUILTIN_OWNER
    else:
        if not candidates:
            raise RegistryError(
                f"unknown {kind} '{name}'.{did_you_mean(name, _names(group))} Known: "
                f"{', '.join(_names(group))}. A third-party {kind} is found when its "
                f"distribution declares it in the entry-point group '{group}'."
            )
        if len({ep.value for ep in candidates}) > 1:
            owners = ", ".join(f"{_dist_name(ep)} ({ep.value})" for ep in candidates)
            raise RegistryError(
                f"{kind} '{name}' is registered by more than one distribution: {owners}. "
                "Fix: uninstall one of them."
            )
        ep = candidates[0]
        owner = f"distribution {_dist_name(ep)}"
    try:
        return ep.load()
    except Exception as exc:  # a broken plugin must name itself
        raise RegistryError(
            f"{kind} '{name}' from {owner} ({ep.value}) failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def did_you_mean(name: str, known: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``known`` to a mistyped ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" Did you mean '{close[0]}'?" if close else ""


def list_policies() -> list[str]:
    """Names of all crop policies and view recipes (built-in and installed), sorted."""
    return _names(POLICY_GROUP)


def list_proposal_sources(kind: str | None = None) -> list[str]:
    """Names of proposal sources (built-in and installed), sorted.

    Args:
        kind: ``None``: every name, loaded or not. ``"generator"`` or ``"importer"``: only the
            sources of that kind (a plugin's is loaded to read its ``kind``; those that fail
            to load are left out, :func:`load_proposal_source` says why; the built-ins' kinds
            are known without loading them).
    """
    names = _names(PROPOSAL_GROUP)
    if kind is None:
        return names
    out = []
    for name in names:
        if name in _BUILTIN_SOURCE_KINDS and not _entry_points(PROPOSAL_GROUP).get(name):
            if _BUILTIN_SOURCE_KINDS[name] == kind:
                out.append(name)
            continue
        try:
            source = load_proposal_source(name)
        except RegistryError:
            continue
        if getattr(source, "kind", None) == kind:
            out.append(name)
    return out


def load_policy(name: str) -> Any:
    """The class or factory registered as crop policy / view recipe ``name``."""
    return _load(POLICY_GROUP, "crop policy", name)


def load_proposal_source(name: str) -> Any:
    """The class registered as proposal source ``name`` (a generator or an importer)."""
    return _load(PROPOSAL_GROUP, "proposal source", name)
