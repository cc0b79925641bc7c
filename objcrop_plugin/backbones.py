"""The one backbone builder: a timm model with pooled features, optionally with local weights.

``objcrop train`` (``backbone.name`` / ``backbone.checkpoint``), ``objcrop eval``
(``--model`` / ``--checkpoint``) and the solo-learn adapter (``backbone.name: timm``) all build
their network here, so a ``checkpoint`` means the same file everywhere:

* a ``backbone.pth`` exported by ``objcrop train`` (a plain timm state dict),
* any ``torch.save(model.state_dict())`` of the same timm model (extra keys such as an
  ImageNet classifier are ignored),
* a Lightning / lightly / solo-learn checkpoint, where the backbone's tensors sit under a key
  prefix (``"backbone."``, ``"model.backbone."``, ``"module."`` ...), often beside a momentum or
  teacher copy and heads. The prefix is detected (see :func:`load_backbone_weights`).

Files are read with ``torch.load(..., weights_only=True)`` (a checkpoint from a stranger runs no
code) and nothing is ever downloaded.

Example:
    >>> from objcrop_plugin.backbones import create_backbone
    >>> net = create_backbone("resnet18")  # doctest: +SKIP
    >>> net(torch.zeros(2, 3, 64, 64)).shape  # doctest: +SKIP
    torch.Size([2, 512])
    >>> net = create_backbone("resnet50", "runs/mocov2/backbone.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "BackboneError",
    "WeightsFileError",
    "create_backbone",
    "load_backbone_weights",
    "read_weights_file",
]

PathLike = str | os.PathLike[str]

#: key prefixes of copies that are not the online network (preferred last on a tie)
_NON_ONLINE = ("momentum", "ema", "target", "teacher", "key_encoder", "encoder_k")


class BackboneError(ValueError):
    """An unknown model name or a checkpoint that does not fit the model (the message names the
    model or file and the fix)."""


class WeightsFileError(BackboneError):
    """A file that ``torch.load(..., weights_only=True)`` refuses or cannot read: truncated, not
    a ``torch.save`` file, or pickled Python objects that a weights-only load does not run.
    ``path`` and ``reason`` are attributes; the message is ``"PATH: not a plain weights file
    (REASON)"``."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"{self.path}: not a plain weights file ({reason})")


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load`` failed, in one phrase."""
    text = str(exc)
    if any(s in text for s in ("Unsupported global", "unrecognized function", "Can only build",
                               "allowlisted", "safe_globals")):
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"it holds pickled Python objects{what} besides tensors and plain containers; "
                "a weights-only load refuses to run them")
    if isinstance(exc, EOFError) or any(
        s in text for s in ("central directory", "PytorchStreamReader", "unexpected EOF",
                            "file read failed", "Ran out of input")
    ):
        return "truncated, or not a torch.save file"
    return "not a torch.save file"


def read_weights_file(path: PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, numbers, strings
    and plain containers only, whatever the installed torch's default; a pickle that would
    run code is refused before it runs.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsFileError: anything else that keeps the file from loading (the message names
            the file and why).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"weights file not found: {p}")
    if os.path.isdir(p):
        raise WeightsFileError(p, "a folder, not a file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # torch raises many types here (UnpicklingError, RuntimeError, KeyError...)
        raise WeightsFileError(p, _load_failure(exc)) from None


def _check_name(name: str) -> None:
    import timm

    arch, _, tag = name.partition(".")  # "resnet50.a1_in1k": the tag names pretrained weights
    if timm.is_model(arch):
        tags = timm.list_pretrained(f"{arch}.*")
        if tag and name not in tags:
            known = f" Its tags: {', '.join(t.split('.', 1)[1] for t in tags[:8])}." if tags else ""
            raise BackboneError(
                f"timm's model '{arch}' has no tag '{tag}'.{known} Fix: name the model "
                f"'{arch}' (a tag only names pretrained weights, and none are downloaded here)"
            )
        return
    by_lower = {n.lower(): n for n in timm.list_models()}  # "ResNet50" is close to "resnet50"
    close = [by_lower[n] for n in difflib.get_close_matches(arch.lower(), list(by_lower), n=5)]
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise BackboneError(f"timm has no model '{name}'.{hint} See timm.list_models().")


def create_backbone(
    name: str,
    checkpoint: PathLike | None = None,
    prefix: str | None = None,
    *,
    seed: int | None = None,
    any_size: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)``, with the
    weights of ``checkpoint`` when given.

    The model maps ``(B, 3, H, W)`` float32 to pooled features ``(B, model.num_features)``.
    Lists in ``timm_kwargs`` become tuples (YAML has no tuples; timm wants e.g.
    ``img_size=(96, 128)``).

    Args:
        name: a timm model name (``timm.list_models()``), optionally with a ``.tag``.
        checkpoint: a local ``torch.save`` file, see the module docstring; ``None``: timm's
            random initialisation (reproducible with ``seed``).
        prefix: the backbone's key prefix inside ``checkpoint``; ``None`` detects it, ``""``
            means none.
        seed: the random initialisation's seed (``None``: torch's global generator as it
            is; with ``checkpoint`` it changes nothing). The model is built under a forked generator seeded with it, so the same
            seed gives the same weights in every process and the caller's random state is
            left as it was.
        any_size: for a network that takes images of any size (a heat map's or an
            evaluation's input, not the training size): ViTs and Swins are built with
            ``dynamic_img_size=True`` (unless ``timm_kwargs`` says otherwise); models whose
            constructor has no such keyword (CNNs) are built without it.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate=0.1``,
            ``dynamic_img_size=True``); ``num_classes`` is ignored (always 0) and
            ``pretrained=True`` is refused (nothing is downloaded, pass ``checkpoint``).

    Returns:
        The module, in timm's default (training) mode.

    Raises:
        BackboneError: ``name`` is not a timm model (close matches are named),
            ``pretrained=True``, the checkpoint is not a plain weights file, or it holds no
            complete set of the model's tensors.
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    import timm

    _check_name(str(name))
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in timm_kwargs.items()}
    kwargs.pop("num_classes", None)
    if kwargs.pop("pretrained", False):
        raise BackboneError(
            f"{name}: pretrained=True would download weights; nothing is downloaded. Fix: "
            "pass checkpoint=PATH (a local timm state dict or training checkpoint)"
        )
    if checkpoint is not None and not os.path.isfile(os.fspath(checkpoint)):
        raise FileNotFoundError(f"backbone checkpoint not found: {os.fspath(checkpoint)}")
    with contextlib.nullcontext() if seed is None else torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            net = timm.create_model(str(name), pretrained=False, num_classes=0,
                                    **({"dynamic_img_size": True} if any_size else {}), **kwargs)
        except TypeError:
            # a CNN's constructor refuses the keyword (before any weights were drawn)
            if not any_size or "dynamic_img_size" in kwargs:
                raise
            if seed is not None:
                torch.manual_seed(int(seed))
            net = timm.create_model(str(name), pretrained=False, num_classes=0, **kwargs)
    if checkpoint is not None:
        load_backbone_weights(net, checkpoint, prefix)
    return net


def load_backbone_weights(
    net: nn.Module, checkpoint: PathLike, prefix: str | None = None
) -> nn.Module:
    """Copy the backbone's tensors of ``checkpoint`` into ``net`` (in place; returns ``net``).

    A ``state_dict`` / ``model`` / ``backbone`` entry of the file is used when present (the
    Lightning and solo-learn layouts). With ``prefix=None`` the prefix is the one under which
    most of ``net``'s tensors are present with the right shape; on a tie the online network
    wins over ``momentum``/``ema``/``target``/``teacher`` copies, then the shortest prefix.

    Raises:
        BackboneError: the file is not a plain weights file (truncated, not a ``torch.save``
            file, or pickled objects a weights-only load refuses), holds no state dict, none
            of its tensors fit ``net``, or some of ``net``'s tensors are missing under the
            prefix (the message names the file, the prefix and some missing keys, and the fix).
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    path = os.fspath(checkpoint)
    try:
        obj = read_weights_file(path)
    except WeightsFileError as exc:
        raise BackboneError(
            f"{exc}. Fix: pass a plain weights file (a state dict of tensors): `objcrop "
            "train` writes one as OUT_DIR/backbone.pth; from your own model, "
            "torch.save(model.state_dict(), PATH)"
        ) from None
    for key in ("state_dict", "model", "backbone"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise BackboneError(f"{path}: no state dict found (got {type(obj).__name__})")
    own = net.state_dict()
    if prefix is None:
        counts: dict[str, int] = {}
        for key, value in obj.items():
            if not isinstance(value, torch.Tensor):
                continue
            for own_key, own_value in own.items():
                p = key[: len(key) - len(own_key)]
                if (key.endswith(own_key) and (not p or p.endswith("."))
                        and own_value.shape == value.shape):
                    counts[p] = counts.get(p, 0) + 1
        if not counts:
            raise BackboneError(
                f"{path}: none of its tensors match the model's. Fix: check the model name, or "
                "pass prefix= explicitly."
            )
        best = max(counts.values())
        prefix = min(
            (p for p, n in counts.items() if n == best),
            key=lambda p: (any(w in p.lower() for w in _NON_ONLINE), len(p), p),
        )
        if 2 * best < len(own):  # a few shapes in common by chance: another architecture
            first = [k for k, v in obj.items() if isinstance(v, torch.Tensor)][:3]
            raise BackboneError(
                f"{path}: holds another model's weights: at best {best} of the model's "
                f"{len(own)} tensors match it by name and shape (its first keys: {first}). "
                "Fix: pass the model name the checkpoint was trained with (and its kwargs)."
            )
    state = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    # BatchNorm's step counters are absent from some older checkpoints; they change nothing
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise BackboneError(
            f"{path}: under prefix {prefix!r} the checkpoint lacks {len(missing)} of the "
            f"model's {len(own)} tensors (e.g. {missing[:3]}). Fix: pass the right model name "
            "or prefix=."
        )
    extra = _extra_tensors(net, own, state)
    if extra:
        raise BackboneError(
            f"{path}: under prefix {prefix!r} the checkpoint holds {len(extra)} tensors of the "
            f"model's parts that the model lacks (e.g. {extra[:3]}): it was trained with a "
            "larger model, and loading it would drop them. Fix: pass the model name the "
            "checkpoint was trained with (and its kwargs)."
        )
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise BackboneError(
            f"{path}: under prefix {prefix!r} {len(wrong)} tensors have other shapes than the "
            f"model's (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} in the file, "
            f"{tuple(own[wrong[0]].shape)} in the model). Fix: pass the model the checkpoint "
            "was trained with (and its kwargs)."
        )
    net.load_state_dict({k: state.get(k, own[k]) for k in own})
    return net


def _extra_tensors(net: nn.Module, own: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    """Tensors of ``state`` that belong under one of ``net``'s top-level parts (``layer3``,
    ``blocks``, ...) but that ``net`` lacks: a deeper or wider network's. A classifier that
    ``num_classes=0`` replaced by ``Identity`` (``fc``, ``head.fc``) is not counted."""
    top = {k.split(".", 1)[0] for k in own}
    extra = []
    for key, value in state.items():
        if key in own or not isinstance(value, torch.Tensor) or key.split(".", 1)[0] not in top:
            continue
        try:
            parent = net.get_submodule(key.rsplit(".", 1)[0]) if "." in key else net
        except AttributeError:
            parent = None
        if not isinstance(parent, nn.Identity):
            extra.append(key)
    return extra
