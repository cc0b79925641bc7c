"""``backbone.name: timm`` for solo-learn, and timm's model registry repaired after ``import solo``.

The model itself is built by :func:`objcrop_plugin.backbones.create_backbone`, the builder
``objcrop train`` and ``objcrop eval`` use, so a ``checkpoint`` means the same file everywhere.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...backbones import BackboneError, create_backbone
from .config import as_plain, select
from .errors import SoloConfigError

__all__ = ["check_backbone", "check_timm_name", "restore_timm_registry", "timm_backbone"]

_NEEDS_NAME = (
    "backbone.kwargs.model_name: backbone.name timm needs a timm model name. Fix: "
    "backbone.kwargs.model_name=resnet50 (any name in timm.list_models())"
)


def timm_backbone(
    method: str,
    model_name: str | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """solo-learn backbone factory for any timm model: ``backbone.name: timm``.

    Recipe:

    .. code-block:: yaml

        backbone:
          name: timm
          kwargs:
            model_name: resnet50        # any name in timm.list_models()
            checkpoint: null            # a local weights file
            drop_path_rate: 0.1         # anything else goes to timm.create_model

    Returns ``timm.create_model(model_name, num_classes=0, **kwargs)``
    (:func:`objcrop_plugin.backbones.create_backbone`): pooled features ``(B,
    model.num_features)`` (solo-learn's ``features_dim``). Weights are random unless
    ``checkpoint`` names a local file: a timm state dict (a classifier head in it is ignored) or
    a solo-learn/Lightning checkpoint, whose backbone prefix is detected. Nothing is
    downloaded. ViTs take small multi-crop views with ``dynamic_img_size: true``.

    Raises:
        SoloConfigError: no or an unknown ``model_name`` (close matches are named),
            ``pretrained`` without a ``checkpoint``, a ``checkpoint`` that does not exist or
            does not fit the model.

    Example:
        >>> net = timm_backbone("simclr", model_name="resnet18")  # doctest: +SKIP
        >>> net(torch.zeros(2, 3, 64, 64)).shape  # doctest: +SKIP
        torch.Size([2, 512])
    """
    del method  # solo-learn passes the method name to its own backbones; timm needs none
    if not model_name:
        raise SoloConfigError(_NEEDS_NAME)
    check_timm_name(str(model_name))
    if checkpoint:
        path = Path(os.fspath(checkpoint))
        if not path.is_file():
            raise SoloConfigError(f"backbone.kwargs.checkpoint: {path} does not exist")
    elif pretrained:
        raise SoloConfigError(
            "backbone.kwargs.pretrained: weights are only loaded from a local file. Fix: "
            "backbone.kwargs.checkpoint=PATH (a timm state dict or a solo-learn checkpoint), or "
            "drop pretrained"
        )
    try:
        return create_backbone(str(model_name), checkpoint or None, **kwargs)
    except BackboneError as exc:
        raise SoloConfigError(f"backbone.kwargs.checkpoint: {exc}") from None


def check_timm_name(name: str) -> None:
    """Raise :class:`SoloConfigError` naming close matches unless ``name`` is a timm model."""
    import timm

    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise SoloConfigError(
        f"backbone.kwargs.model_name: '{name}' is not a timm model.{hint} See "
        "timm.list_models()"
    )


def check_backbone(cfg: Any, backbones: Mapping[str, Any]) -> None:
    """Check the recipe's ``backbone`` node before solo-learn builds it.

    Raises:
        SoloConfigError: ``backbone.name`` not in ``backbones`` (solo-learn's
            ``BaseMethod._BACKBONES``), or ``timm`` with no or an unknown ``model_name`` or a
            missing ``checkpoint``.
    """
    name = select(as_plain(cfg), "backbone.name")
    if name is None or name in backbones:
        if name == "timm":
            kwargs = dict(select(as_plain(cfg), "backbone.kwargs", {}) or {})
            if not kwargs.get("model_name"):
                raise SoloConfigError(_NEEDS_NAME)
            check_timm_name(str(kwargs["model_name"]))
            checkpoint = kwargs.get("checkpoint")
            if checkpoint and not Path(os.fspath(checkpoint)).is_file():
                raise SoloConfigError(f"backbone.kwargs.checkpoint: {checkpoint} does not exist")
            if checkpoint or kwargs.get("pretrained"):
                # build it once here: a checkpoint of another model (or pretrained without
                # one) stops the run with its one line, not a traceback from inside solo-learn
                timm_backbone("check", **kwargs)
        return
    raise SoloConfigError(
        f"backbone.name: '{name}' is not a solo-learn backbone ({', '.join(sorted(backbones))}). "
        "Fix: one of those, or backbone.name=timm with backbone.kwargs.model_name=<timm model>"
    )


def restore_timm_registry() -> list[str]:
    """Give timm back the model names solo-learn's import registered over timm's own.

    solo-learn's ``convnext`` and ``poolformer`` modules decorate their factories with timm's
    ``register_model``, which replaces timm's ``convnext_tiny`` and friends (and drops their
    pretrained configs) in the whole process. Re-registering timm's own factories restores
    them; solo-learn's backbones call their factories directly and keep working.

    Returns:
        the names restored.
    """
    from timm.models import _registry as registry

    restored = []
    for name, fn in list(registry._model_entrypoints.items()):
        if not getattr(fn, "__module__", "").startswith("solo."):
            continue
        original = None
        for modname, module in list(sys.modules.items()):
            if not modname.startswith("timm.models.") or module is None:
                continue
            candidate = getattr(module, name, None)
            if callable(candidate) and getattr(candidate, "__module__", None) == modname:
                original = candidate
                break
        if original is None:
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*in registry.*")
            registry.register_model(original)
        restored.append(name)
    return restored
