"""What ``objcrop-solo`` changes in solo-learn, in memory, and how it is undone.

:func:`install` patches these module attributes (nothing is edited or copied; :func:`uninstall`
undoes them):

- ``solo.args.pretrain.parse_cfg``: reads the object-aware settings
  (:func:`~.config.parse_object_aware`) and refuses recipes it cannot run (DALI, h5, CIFAR/STL,
  a missing proposal store, an unknown backbone) with a message naming the key and the fix;
  smooths solo-learn's CPU quirks (:func:`fix_solo_quirks`).
- ``solo.data.pretrain_dataloader.prepare_datasets``: takes the dataset solo-learn built and
  the per-entry pipelines ``build_transform_pipeline`` made, and returns a module-level
  (picklable under ``spawn``) dataset (:mod:`.datasets`) that hands each image *and its key*
  to :class:`~.transform.ObjectAwareTransform`. Items keep solo-learn's format
  ``(index, [views], target)``.
- ``solo.methods.base.BaseMethod._BACKBONES["timm"]``: :func:`~.backbone.timm_backbone`.
- with ``crop.engine: gpu`` only, ``solo.methods.METHODS[method]``: a subclass of the method
  whose ``on_after_batch_transfer`` cuts and augments the views on the device
  (:func:`~.gpu.gpu_method`); the dataset then yields canvases.

Importing ``solo`` re-registers timm's ``convnext_*`` and ``poolformer_*`` names with
solo-learn's versions; :func:`import_solo` puts timm's own back.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .backbone import check_backbone, restore_timm_registry, timm_backbone
from .config import ObjectAwareConfig, as_plain, parse_object_aware
from .datasets import IndexedDataset, ObjectAwareSoloDataset, check_keys, unwrap_solo_dataset
from .errors import INSTALL_HINT, INSTALL_STEPS, SoloConfigError, SoloNotFoundError
from .gpu import GPUViews, ObjectAwareCanvasDataset, gpu_method, gpu_views
from .transform import ObjectAwareTransform, SlotPlanner

__all__ = ["STATE", "fix_solo_quirks", "import_solo", "install", "uninstall"]


@dataclass
class RunState:
    """What the wrapped solo-learn functions share within one run."""

    config: ObjectAwareConfig | None = None
    planner: SlotPlanner | None = None
    gpu: GPUViews | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)
    cli: bool = False  # report recipe errors as one line and exit 2, not a hydra traceback


STATE = RunState()


def _reported(fn: Callable) -> Callable:
    """In ``objcrop-solo``, a recipe error ends the run with its message, not a traceback."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SoloConfigError as exc:
            if not STATE.cli:
                raise
            print(f"objcrop-solo: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return call


def fix_solo_quirks(cfg: Any) -> None:
    """Make a recipe that works on solo-learn's intended setup also work on this one.

    - ``devices``: solo-learn computes ``len(cfg.devices)``, so an integer fails; Lightning's
      CPU accelerator refuses a list. On CPU an int or list becomes a string (``"1"``); on a
      GPU an int ``n`` becomes the list of the first ``n`` devices.
    - ``strategy``: solo-learn defaults it to ``None``, which Lightning 2 refuses; ``auto``.
    """
    accelerator = str(cfg.get("accelerator") or "auto").lower()
    devices = as_plain(cfg.get("devices"))
    if accelerator == "cpu":
        if devices is None or isinstance(devices, int):
            cfg["devices"] = str(devices or 1)
        elif isinstance(devices, (list, tuple)):
            cfg["devices"] = str(max(1, len(devices)))
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        cfg["devices"] = list(range(devices))
    if "strategy" in cfg and cfg.get("strategy") is None:
        cfg["strategy"] = "auto"


def import_solo(root: str | os.PathLike[str] | None = None) -> Any:
    """Import solo-learn (from ``root`` first when given) with timm's registry left intact.

    Raises:
        SoloNotFoundError: solo-learn cannot be imported; the message says how to install it.
    """
    if root is not None and "solo" not in sys.modules:
        root = os.path.abspath(os.fspath(root))
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        import timm.models  # noqa: F401  (timm's own names registered before solo's)

        with warnings.catch_warnings():
            # solo-learn's import of timm's deprecated paths and its registry overrides (undone
            # below) are not the user's to fix
            warnings.filterwarnings("ignore", message="Overwriting .* in registry")
            warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
            solo = importlib.import_module("solo")
            importlib.import_module("solo.args.pretrain")
            importlib.import_module("solo.data.pretrain_dataloader")
            importlib.import_module("solo.methods")
    except ImportError as exc:
        if getattr(exc, "name", None) == "solo" or "solo" not in sys.modules:
            raise SoloNotFoundError(f"{INSTALL_HINT}. {INSTALL_STEPS}") from exc
        raise SoloNotFoundError(
            f"solo-learn is installed but cannot be imported ({type(exc).__name__}: {exc}). "
            'Fix: pip install "objcrop-plugin[solo]" (lightning, hydra-core, omegaconf<2.4, '
            "timm, einops, scipy, scikit-learn, torchmetrics)"
        ) from exc
    restore_timm_registry()
    return solo


def _wrap_parse_cfg(original: Callable, backbones: Mapping[str, Any]) -> Callable:
    def parse_cfg(cfg: Any) -> Any:
        fix_solo_quirks(cfg)
        plan = parse_object_aware(cfg)
        check_backbone(cfg, backbones)
        views = gpu_views(cfg, plan) if plan.enabled and plan.engine == "gpu" else None
        cfg = original(cfg)
        if cfg.get("strategy") is None:
            cfg.strategy = "auto"
        STATE.config, STATE.gpu = plan, views
        if views is not None:
            _install_gpu_method(cfg, views)
        return cfg

    parse_cfg.__doc__ = f"objcrop-plugin: {original.__name__} with object-aware recipe checks."
    wrapped = _reported(parse_cfg)
    wrapped.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapped


def _wrap_prepare_datasets(original: Callable) -> Callable:
    signature = inspect.signature(original)

    def prepare_datasets(*args: Any, **kwargs: Any) -> Any:
        dataset = original(*args, **kwargs)
        plan = STATE.config
        base = unwrap_solo_dataset(dataset)
        if base is None:
            if plan is not None and plan.enabled:
                raise SoloConfigError(
                    f"data: solo-learn built a {type(dataset).__name__} dataset, which the "
                    "object-aware crops do not know; this solo-learn version is not supported"
                )
            return dataset
        if plan is None or not plan.enabled:
            return IndexedDataset(base)
        bound = signature.bind(*args, **kwargs)
        transform = bound.arguments.get("transform")
        pipelines = [getattr(p, "transform", None) for p in getattr(transform, "transforms", [])]
        entries_crops = [getattr(p, "num_crops", None) for p in getattr(transform, "transforms", [])]
        if not pipelines or entries_crops != [e.num_crops for e in plan.entries]:
            raise SoloConfigError(
                "augmentations: solo-learn's transform does not have one NCropAugmentation per "
                f"entry (got {transform!r}); this solo-learn version is not supported"
            )
        sampling = {"sampling": plan.sampling, "max_boxes_per_image": plan.max_boxes_per_image}
        if STATE.gpu is not None:
            out = ObjectAwareCanvasDataset(base, STATE.gpu, plan.key_root, **sampling)
            planner = STATE.gpu.planner
        else:
            out = ObjectAwareSoloDataset(base, ObjectAwareTransform(plan, pipelines),
                                         plan.key_root, **sampling)
            planner = out.transform.planner
        if planner.store is not None and plan.needs_proposals:
            check_keys(out, planner.store, plan.strict)
        STATE.planner = planner
        return out

    prepare_datasets.__doc__ = f"objcrop-plugin: {original.__name__} with object-aware views."
    wrapped = _reported(prepare_datasets)
    wrapped.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapped


def _install_gpu_method(cfg: Any, views: GPUViews) -> None:
    """Swap ``solo.methods.METHODS[cfg.method]`` for its GPU-view subclass (undone by
    :func:`uninstall`)."""
    from solo.methods import METHODS

    name = cfg.get("method")
    if name not in METHODS:
        return  # main_pretrain.py reports an unknown method itself
    original = METHODS[name]
    METHODS[name] = gpu_method(original, views.engine)

    def undo() -> None:
        METHODS[name] = original

    STATE.undo.append(undo)


def install(root: str | os.PathLike[str] | None = None) -> Callable[[], None]:
    """Wrap solo-learn's ``parse_cfg`` and ``prepare_datasets`` and register the timm backbone.

    Patches the module attributes that ``main_pretrain.py`` imports by name, so call it before
    the script runs. Idempotent.

    Returns:
        a function that undoes the patches.
    """
    import_solo(root)
    import solo.args.pretrain as args_pretrain
    import solo.data.pretrain_dataloader as dataloader
    from solo.methods.base import BaseMethod

    if STATE.undo:
        return uninstall
    backbones = BaseMethod._BACKBONES
    original_parse, original_prepare = args_pretrain.parse_cfg, dataloader.prepare_datasets
    args_pretrain.parse_cfg = _wrap_parse_cfg(original_parse, backbones)
    dataloader.prepare_datasets = _wrap_prepare_datasets(original_prepare)
    had_timm = "timm" in backbones
    previous = backbones.get("timm")
    backbones["timm"] = timm_backbone

    def undo() -> None:
        args_pretrain.parse_cfg = original_parse
        dataloader.prepare_datasets = original_prepare
        if had_timm:
            backbones["timm"] = previous
        else:
            backbones.pop("timm", None)

    STATE.undo.append(undo)
    return uninstall


def uninstall() -> None:
    """Undo :func:`install`."""
    while STATE.undo:
        STATE.undo.pop()()
    STATE.config = None
    STATE.planner = None
    STATE.gpu = None
