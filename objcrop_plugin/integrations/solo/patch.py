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
- ``solo.utils.auto_resumer.AutoResumer.SHOULD_MATCH`` gains ``objcrop_identity``, a hash of
  the crop setup that the ``parse_cfg`` wrapper adds to the recipe (:func:`run_identity`), so
  auto-resume never continues a run with other crops, proposals or sampling.
- ``lightning.pytorch.Trainer.fit``: in ``objcrop-solo``, too many unreadable images end the
  run with one line naming ``data.max_failure_rate``, not a traceback; with online proposals
  (``crop.proposals``) it adds their callback (:func:`attach_online`) first in the trainer's
  callbacks, before solo-learn's checkpointer.
- with ``crop.engine: gpu`` only, ``solo.methods.METHODS[method]``: a subclass of the method
  whose ``on_after_batch_transfer`` cuts and augments the views on the device
  (:func:`~.gpu.gpu_method`); the dataset then yields canvases.

Importing ``solo`` re-registers timm's ``convnext_*`` and ``poolformer_*`` names with
solo-learn's versions; :func:`import_solo` puts timm's own back.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...proposals.online import OnlineSchedule, OnlineSettings
from ...proposals.store import MAGIC as STORE_MAGIC
from ...stats import TooManyBadImagesError
from .backbone import check_backbone, restore_timm_registry, timm_backbone
from .config import ONLINE_KEYS, ObjectAwareConfig, as_plain, parse_object_aware
from .datasets import IndexedDataset, ObjectAwareSoloDataset, check_keys, unwrap_solo_dataset
from .errors import INSTALL_HINT, INSTALL_STEPS, SoloConfigError, SoloNotFoundError
from .gpu import GPUViews, ObjectAwareCanvasDataset, gpu_method, gpu_views
from .transform import ObjectAwareTransform, SlotPlanner

__all__ = ["IDENTITY_KEY", "STATE", "fix_solo_quirks", "import_solo", "install", "lightning_devices",
           "run_identity", "uninstall"]


@dataclass
class OnlineRun:
    """Online proposals in a solo-learn run: the schedule, and what the callback needs."""

    settings: OnlineSettings
    schedule: OnlineSchedule
    backbone: str  # as the recipe names it, for messages
    workers: int  # decode workers of a refresh (data.num_workers)
    checkpoints: str | None = None  # where solo-learn's checkpoints go (None: checkpoint off)
    callback: Any = None  # the callback, once attached (its ``refreshes``)


@dataclass
class RunState:
    """What the wrapped solo-learn functions share within one run."""

    config: ObjectAwareConfig | None = None
    planner: SlotPlanner | None = None
    gpu: GPUViews | None = None
    dataset: ObjectAwareSoloDataset | None = None  # its ``bad`` images, for the end-of-run line
    online: OnlineRun | None = None  # crop.proposals: what the refreshes need
    undo: list[Callable[[], None]] = field(default_factory=list)
    cli: bool = False  # report recipe errors as one line and exit 2, not a hydra traceback
    error: str | None = None  # why the run stopped (printed last by ``objcrop-solo``)


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

    Called before solo-learn's ``parse_cfg``; :func:`lightning_devices` after it.

    - ``devices``: solo-learn scales the learning rate by ``len(cfg.devices)``, so an integer
      fails and a string such as ``"2"`` counts as one device. Every form Lightning takes (an
      int, ``"2"``, ``"0,1"``, a list, ``-1`` or ``"auto"`` for all GPUs) becomes the list of
      the devices it names, so the scaling counts them all.
    - ``strategy``: solo-learn defaults it to ``None``, which Lightning 2 refuses; ``auto``.

    ``accelerator: auto`` (or none) is what Lightning will pick: a GPU where CUDA (or Apple's
    MPS) is available, else the CPU.
    """
    devices = as_plain(cfg.get("devices"))
    listed = _device_list(devices, on_cpu=_accelerator(cfg) == "cpu")
    if listed is not None:
        cfg["devices"] = listed
    if "strategy" in cfg and cfg.get("strategy") is None:
        cfg["strategy"] = "auto"


def lightning_devices(cfg: Any) -> None:
    """After solo-learn's ``parse_cfg``: Lightning's CPU accelerator refuses a list of devices,
    so on a CPU the list :func:`fix_solo_quirks` made becomes its count as a string (``"2"``)."""
    devices = as_plain(cfg.get("devices"))
    if _accelerator(cfg) == "cpu" and isinstance(devices, (list, tuple)):
        cfg["devices"] = str(max(1, len(devices)))


def _accelerator(cfg: Any) -> str:
    accelerator = str(cfg.get("accelerator") or "auto").lower()
    if accelerator == "auto":
        accelerator = "gpu" if _has_gpu() else "cpu"
    return accelerator


def _device_list(devices: Any, *, on_cpu: bool) -> list[int] | None:
    """The devices Lightning's ``devices`` value names, as a list; ``None`` where unknown."""
    if devices is None:
        return [0] if on_cpu else None
    if isinstance(devices, bool):
        return None
    if isinstance(devices, (list, tuple)):
        return list(devices) or None
    text = str(devices).strip()
    if text in ("-1", "auto"):
        if on_cpu:
            return [0]
        import torch

        return list(range(torch.cuda.device_count())) or None
    try:
        if "," in text:  # Lightning's "0,1" or "1,": the GPUs listed, by index
            return [int(part) for part in text.split(",") if part.strip()] or None
        count = int(text)
    except ValueError:
        return None
    return list(range(count)) if count > 0 else None


def _has_gpu() -> bool:
    """Whether Lightning's ``accelerator: auto`` would pick a GPU (CUDA or MPS)."""
    import torch

    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


#: the recipe key holding the run's crop-setup hash; solo-learn's auto-resume must match it
IDENTITY_KEY = "objcrop_identity"
_LOGGER = "objcrop_plugin"


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (as :data:`logging.lastResort` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _handled(logger: logging.Logger, level: int) -> bool:
    """Whether a record of ``level`` from ``logger`` reaches a handler."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(h.level <= level for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent  # type: ignore[assignment]
    return False


def enable_objcrop_warnings() -> Callable[[], None]:
    """Let objcrop's warnings through the logging hydra configured for the run.

    solo-learn's recipes (and ours) say ``override hydra/job_logging: disabled``: the root
    logger at ERROR, and every logger that existed (``objcrop_plugin``'s among them) disabled.
    objcrop's warnings (images without proposals, unreadable images skipped, fallbacks) are the
    only place some of this is reported, so the ``objcrop_plugin`` loggers are re-enabled at
    WARNING and, where no handler would take their records, given one that writes to stderr.

    Returns:
        a function that puts the loggers back as they were.
    """
    loggers = [logging.getLogger(_LOGGER)] + [
        logger for name, logger in list(logging.root.manager.loggerDict.items())
        if name.startswith(_LOGGER + ".") and isinstance(logger, logging.Logger)
    ]
    saved = [(lg, lg.disabled, lg.level, lg.propagate) for lg in loggers]
    root = loggers[0]
    for lg in loggers:
        lg.disabled = False
    if root.getEffectiveLevel() > logging.WARNING:
        root.setLevel(logging.WARNING)
    handler = None
    if not _handled(root, logging.WARNING):
        handler = _StderrHandler()
        root.addHandler(handler)
        root.propagate = False

    def undo() -> None:
        if handler is not None:
            root.removeHandler(handler)
        for lg, disabled, level, propagate in saved:
            lg.disabled, lg.propagate = disabled, propagate
            lg.setLevel(level)

    return undo


def _store_fingerprint(path: str) -> str:
    """``SIZE:CRC`` of a proposal store: its size and its header's CRC-32 (the header holds
    every section's CRC-32, so it changes with any box); ``SIZE:MTIME`` for another file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(24)
            if len(head) == 24 and head[:8] == STORE_MAGIC:
                return f"{size}:{int.from_bytes(head[16:20], 'little'):08x}"
            return f"{size}:{os.fstat(f.fileno()).st_mtime_ns}"
    except OSError:
        return "unreadable"


def run_identity(cfg: Any) -> tuple[str, str]:
    """``(hash, what it covers)``: the run's crop setup, for solo-learn's auto-resume.

    solo-learn's ``AutoResumer`` resumes the newest checkpoint whose ``name``, backbone,
    method, dataset, epochs and optimizer match: a scene baseline and an object-aware run of
    the same recipe, or two runs on different proposal stores, would resume each other (and
    the second would train nothing). The hash covers what it does not compare: every
    ``augmentations`` entry (``crop`` included), the top-level ``crop`` node,
    ``data.train_path``, ``data.proposals`` (its absolute path and the store's size and header
    CRC-32, which changes when the store is rebuilt with other boxes), ``data.proposals_root``,
    ``data.sampling`` and ``data.max_boxes_per_image``.
    """
    plain = {k: as_plain(cfg.get(k)) for k in ("augmentations", "crop", "data")}
    data = plain["data"] if isinstance(plain["data"], Mapping) else {}

    def absolute(value: Any) -> str | None:
        return os.path.abspath(os.path.expanduser(os.fspath(value))) if value else None

    proposals = absolute(data.get("proposals"))
    setup = {
        "augmentations": plain["augmentations"],
        "crop": plain["crop"],
        "train_path": absolute(data.get("train_path")),
        "proposals": proposals,
        "store": _store_fingerprint(proposals) if proposals else None,
        "proposals_root": absolute(data.get("proposals_root")),
        "sampling": data.get("sampling") or "per_image",
        "max_boxes_per_image": data.get("max_boxes_per_image"),
    }
    blob = json.dumps(setup, sort_keys=True, default=str).encode()
    digest = hashlib.sha256(blob).hexdigest()[:12]
    crops = [("solo" if not isinstance(e, Mapping) or not e.get("crop") else "object-aware")
             for e in plain["augmentations"] or []]
    store = (f"{os.path.basename(proposals)} [{setup['store']}]" if proposals else "none")
    what = (f"augmentations ({', '.join(crops)} crops), crop, data.train_path, "
            f"data.proposals {store}, data.sampling {setup['sampling']}")
    return digest, what


def _resumer_matches(key: str) -> bool:
    try:
        from solo.utils.auto_resumer import AutoResumer
    except ImportError:
        return False
    return key in getattr(AutoResumer, "SHOULD_MATCH", ())


def _set_identity(cfg: Any) -> None:
    """Record the run's crop setup in the recipe, where solo-learn's auto-resume compares it."""
    digest, what = run_identity(cfg)
    cfg[IDENTITY_KEY] = digest
    auto = cfg.get("auto_resume")
    enabled = bool(auto.get("enabled", False)) if auto is not None else False
    if not enabled or cfg.get("resume_from_checkpoint") is not None:
        return
    if _resumer_matches(IDENTITY_KEY):
        how = f"{IDENTITY_KEY}={digest}"
    else:  # a solo-learn whose AutoResumer compares other keys: the name it always compares
        cfg["name"] = f"{cfg.get('name')}-oc{digest[:8]}"
        how = f"name={cfg['name']}"
    print(f"objcrop-solo: auto_resume resumes only a run with the same crop setup: {how} "
          f"({what})", file=sys.stderr)


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
        STATE.undo.append(enable_objcrop_warnings())  # hydra has configured logging by now
        fix_solo_quirks(cfg)
        plan = parse_object_aware(cfg)
        check_backbone(cfg, backbones)
        views = gpu_views(cfg, plan) if plan.enabled and plan.engine == "gpu" else None
        cfg = original(cfg)
        lightning_devices(cfg)
        if cfg.get("strategy") is None:
            cfg.strategy = "auto"
        _set_identity(cfg)
        STATE.config, STATE.gpu = plan, views
        STATE.online = _online_run(cfg, plan)
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
        sampling = {"sampling": plan.sampling, "max_boxes_per_image": plan.max_boxes_per_image,
                    "max_failure_rate": plan.max_failure_rate}
        if STATE.gpu is not None:
            out = ObjectAwareCanvasDataset(base, STATE.gpu, plan.key_root, **sampling)
            planner = STATE.gpu.planner
        else:
            out = ObjectAwareSoloDataset(base, ObjectAwareTransform(plan, pipelines),
                                         plan.key_root, **sampling)
            planner = out.transform.planner
        if STATE.online is not None:
            planner.schedule = STATE.online.schedule
        if planner.store is not None and plan.needs_proposals:
            check_keys(out, planner.store, plan.strict)
        STATE.planner, STATE.dataset = planner, out
        return out

    prepare_datasets.__doc__ = f"objcrop-plugin: {original.__name__} with object-aware views."
    wrapped = _reported(prepare_datasets)
    wrapped.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapped


def _online_run(cfg: Any, plan: ObjectAwareConfig) -> OnlineRun | None:
    """The online proposals of a parsed recipe: where their stores go (``crop.proposals_dir``,
    else ``<checkpoint.dir>/<method>/objcrop-proposals/<name>-<crop setup hash>``: the same in
    every DDP rank and in a resumed run) and their schedule."""
    settings = plan.online
    if settings is None:
        return None
    checkpoint = cfg.get("checkpoint") or {}
    # solo-learn's Checkpointer writes <checkpoint.dir>/<method>/<run>/*.ckpt
    checkpoints = os.path.join(os.path.abspath(os.fspath(checkpoint.get("dir") or
                                                         "trained_models")), str(cfg.get("method")))
    folder = plan.proposals_dir
    if folder is None:
        folder = os.path.join(checkpoints, "objcrop-proposals",
                              f"{cfg.get('name')}-{cfg.get(IDENTITY_KEY)}")
    schedule = OnlineSchedule(os.fspath(folder), settings.warmup_epochs, settings.every_epochs,
                              None if plan.proposals is None else os.fspath(plan.proposals))
    backbone = cfg.get("backbone") or {}
    name = str(backbone.get("name"))
    if name == "timm":
        name = f"timm {(backbone.get('kwargs') or {}).get('model_name')}"
    workers = int((cfg.get("data") or {}).get("num_workers") or 0)
    return OnlineRun(settings, schedule, name, workers,
                     checkpoints if checkpoint.get("enabled") else None)


def _earlier_run(run: OnlineRun) -> tuple[list[str], list[str]]:
    """The stores in ``run``'s folder (names, shards left out) and the solo-learn checkpoints
    saved since the first of them was written: a checkpoint that may record them, so a fresh
    run must not replace them. Stores that no checkpoint can record (a run stopped before its
    first checkpoint, or run with ``checkpoint.enabled=False``) cannot be resumed and are
    replaced, as their refreshes come round."""
    found = list(Path(run.schedule.directory).glob("epoch-*.objcrop"))
    if not found or run.checkpoints is None:
        return [p.name for p in found], []
    since = min(p.stat().st_mtime for p in found)
    later = sorted(os.fspath(p) for p in Path(run.checkpoints).glob("*/*.ckpt")
                   if p.stat().st_mtime >= since)
    return sorted(p.name for p in found if ".shard-" not in p.name), later


def _launcher() -> bool:
    """This process starts the run (not a DDP rank that Lightning started)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def attach_online(trainer: Any, model: Any, ckpt_path: Any = None) -> Any:
    """Before ``Trainer.fit``: put the online proposals' callback first among ``trainer``'s
    callbacks (its refresh runs before solo-learn's checkpointer saves the epoch), resumed
    from ``ckpt_path``'s state, with the refresh due before training (the initial weights'
    store, ``warmup_epochs: 0``) noted. ``None`` without online proposals.

    Raises:
        SoloConfigError: the generator cannot run on the backbone; a fresh run whose stores
            folder holds another run's stores; a resumed run whose stores are missing or changed.
    """
    from lightning.pytorch import Callback

    from ...proposals.online import check_network, network_of, online_callback

    run, dataset = STATE.online, STATE.dataset
    if run is None or dataset is None or model is None:
        return None
    settings, schedule = run.settings, run.schedule
    check_network(settings, network_of(model), run.backbone, SoloConfigError, ONLINE_KEYS)
    keys = [dataset.key(j) for j in range(len(dataset.dataset))]

    def echo(line: str) -> None:
        if trainer.global_rank == 0:
            print(f"objcrop-solo: {line.strip()}", file=sys.stderr, flush=True)

    callback = online_callback(settings, schedule, dataset.key_root, keys, workers=run.workers,
                               echo=echo, base=Callback, error=SoloConfigError, names=ONLINE_KEYS,
                               on_epoch_start=dataset.set_epoch)
    if not ckpt_path and _launcher():
        made, later = _earlier_run(run)
        if later:
            raise SoloConfigError(
                f"crop.proposals_dir: {schedule.directory} holds the online proposals of an "
                f"earlier run with this crop setup ({', '.join(made[:3])}"
                f"{', ...' if len(made) > 3 else ''}), which checkpoints saved since then may "
                f"record ({later[-1]}{' and more' if len(later) > 1 else ''}); this run starts "
                "afresh and would replace them. Fix: resume that run (auto_resume.enabled=True, "
                "or resume_from_checkpoint=ITS_CHECKPOINT), or give this one its own folder "
                "(++crop.proposals_dir=A_NEW_FOLDER), or remove that folder"
            )
        if made:
            echo(f"{schedule.directory} holds online proposals that no checkpoint records "
                 f"({', '.join(made[:3])}{', ...' if len(made) > 3 else ''}: an earlier run "
                 "stopped before its first checkpoint); this run replaces them")
    # and the dataset's epoch
    callback.resume_from(ckpt_path, trainer.max_epochs, max_steps=trainer.max_steps)
    trainer.callbacks.insert(0, callback)
    run.callback = callback
    return callback


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
    _install_resumer_key()
    _install_fit_report()
    return uninstall


def _install_resumer_key() -> None:
    """Add :data:`IDENTITY_KEY` to what solo-learn's auto-resume compares (undone by
    :func:`uninstall`; a checkpoint without the key, older or made without objcrop-solo, is
    not resumed)."""
    try:
        from solo.utils.auto_resumer import AutoResumer
    except ImportError:  # pragma: no cover - solo-learn without auto-resume
        return
    original = getattr(AutoResumer, "SHOULD_MATCH", None)
    if not isinstance(original, (list, tuple)) or IDENTITY_KEY in original:
        return
    AutoResumer.SHOULD_MATCH = [*original, IDENTITY_KEY]

    def undo() -> None:
        AutoResumer.SHOULD_MATCH = original

    STATE.undo.append(undo)


def bad_images_message(exc: BaseException) -> str:
    """The one-line reason of a :class:`TooManyBadImagesError`, also when a DataLoader worker
    raised it (torch re-raises it with the worker's traceback in the message)."""
    text = str(exc)
    marker = f"{TooManyBadImagesError.__name__}: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _install_fit_report() -> None:
    """In ``objcrop-solo``, ``Trainer.fit`` stopped by too many unreadable images ends the run
    with one line (exit status 1) instead of hydra's traceback."""
    try:
        from lightning.pytorch import Trainer
    except ImportError:  # pragma: no cover - solo-learn needs lightning
        return
    original = Trainer.fit
    signature = inspect.signature(original)  # to find its model and ckpt_path

    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            if STATE.online is not None and STATE.online.callback is None:
                bound = signature.bind(self, *args, **kwargs).arguments
                attach_online(self, bound.get("model"), bound.get("ckpt_path"))
            return original(self, *args, **kwargs)
        except TooManyBadImagesError as exc:
            if not STATE.cli:
                raise
            STATE.error = bad_images_message(exc)
            raise SystemExit(1) from None
        except SoloConfigError as exc:
            if not STATE.cli:
                raise
            STATE.error = str(exc)
            raise SystemExit(2) from None

    fit.__wrapped__ = original  # type: ignore[attr-defined]
    fit.__doc__ = original.__doc__
    Trainer.fit = fit

    def undo() -> None:
        Trainer.fit = original

    STATE.undo.append(undo)


def uninstall() -> None:
    """Undo :func:`install`."""
    while STATE.undo:
        STATE.undo.pop()()
    STATE.config = None
    STATE.planner = None
    STATE.gpu = None
    STATE.dataset = None
    STATE.online = None
    STATE.error = None
