"""``objcrop train RECIPE.yaml [dotted.key=value ...]``: a full pretraining run from a recipe.

What a run does, in ``trainer.out_dir``:

- ``config.yaml``: the resolved recipe (defaults filled in, overrides applied), written once
  the recipe is checked (paths, proposal store, backbone, batch size): a recipe that fails
  these checks writes nothing;
- ``checkpoints/last.ckpt``: Lightning checkpoint, written atomically at the end of each epoch
  (and every ``trainer.checkpoint_every_n_steps``), the one before it kept as
  ``checkpoints/previous.ckpt``; a rerun of the same command resumes from the newer of the two
  that loads (``trainer.resume: never`` starts afresh, the earlier run's checkpoints moved
  to ``checkpoints/replaced/``, which holds one such run). Checkpoints are read with
  ``weights_only=True``: a planted pickle runs no code, it is refused;
- ``backbone.pth``: the backbone's weights as a timm state dict, loadable with
  ``timm.create_model(NAME, pretrained=False, num_classes=0, checkpoint_path="backbone.pth")``
  (or ``objcrop eval --checkpoint``);
- ``results.json``: training time, images/s, steps and samples per epoch (boxes with
  ``data.sampling: per_box``), final loss, proposal fallbacks and, when ``data.labels`` is set,
  linear-probe and kNN mAP on frozen features;
- ``logs/``: Lightning's CSV logs (loss, learning rate).

Example:
    >>> from objcrop_plugin.train import load_recipe, train
    >>> cfg = load_recipe("recipes/lightly/demo_simclr.yaml", ["trainer.epochs=1"])  # doctest: +SKIP
    >>> result = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..proposals.online import resume_position as _resume_position
from .config import RecipeConfig, RecipeError, recipe_params, save_recipe, to_dict

__all__ = [
    "CheckpointError",
    "EpochShuffleSampler",
    "build_backbone",
    "build_dataset",
    "export_backbone",
    "load_checkpoint",
    "train",
]

#: the newest checkpoint of a run and the one before it, in ``OUT_DIR/checkpoints``
LAST, PREVIOUS = "last.ckpt", "previous.ckpt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (the message names the file, why, and the fix)."""

log = logging.getLogger(__name__)


def build_backbone(cfg: RecipeConfig, multi_size: bool = False) -> torch.nn.Module:
    """The timm backbone of a recipe (:func:`objcrop_plugin.backbones.create_backbone`:
    ``pretrained=False, num_classes=0``), with local weights from ``backbone.checkpoint`` when
    set (an exported ``backbone.pth``, a timm state dict or a training checkpoint)."""
    from ..backbones import BackboneError, create_backbone

    b = cfg.backbone
    kwargs = dict(b.kwargs)
    try:
        net = create_backbone(b.name, b.checkpoint or None, **kwargs)
    except FileNotFoundError:
        raise FileNotFoundError(f"backbone.checkpoint: file not found: {b.checkpoint}") from None
    except BackboneError as exc:
        key = "backbone.checkpoint" if b.checkpoint and str(exc).startswith(str(b.checkpoint)) else "backbone.name"
        raise RecipeError(f"{key}: {exc}") from None
    net.train()
    if multi_size and hasattr(net, "patch_embed") and not getattr(
        getattr(net, "patch_embed", None), "dynamic_img_size", False
    ) and not kwargs.get("dynamic_img_size"):
        raise RecipeError(
            f"backbone '{b.name}' is a vision transformer and the view recipe has views of "
            "several sizes. Fix: set backbone.kwargs.dynamic_img_size: true"
        )
    if b.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def _keys(cfg: RecipeConfig, keys: Sequence[str] | None) -> list[str] | None:
    if keys is None:
        from ..images import list_images

        keys = list_images(cfg.data.train_path)
    keys = list(keys)
    if cfg.data.limit is not None:
        keys = keys[: cfg.data.limit]
    return keys


def build_dataset(cfg: RecipeConfig, keys: Sequence[str] | None = None) -> Any:
    """The training dataset: a CPU view dataset, or the canvas dataset of the GPU engine."""
    from ..policies import make_recipe

    root = Path(cfg.data.train_path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.train_path: folder not found: {root}. Fix: point it at the folder of "
            "training images"
        )
    from .online import OnlineSchedule, parse_online

    store = None
    recipe = make_recipe(cfg.views, **recipe_params(cfg))
    online = parse_online(cfg)
    schedule = None
    if online is not None:
        schedule = OnlineSchedule(
            str(Path(cfg.trainer.out_dir) / "proposals"), online.warmup_epochs,
            online.every_epochs, cfg.data.proposals or None,
        )
        recipe.scene_only = not cfg.data.proposals
    # a scene run with epoch_length: boxes opens the store only to count its boxes
    counted = cfg.data.sampling == "per_box" or cfg.data.epoch_length == "boxes"
    if cfg.data.proposals and (cfg.crop.type == "object_aware" or counted):
        from ..proposals.store import ProposalStore

        if Path(cfg.data.proposals).is_dir():
            raise RecipeError(
                f"data.proposals: {cfg.data.proposals} is a folder, not a proposal store (one "
                f".objcrop file). Fix: `objcrop proposals build {root} -o STORE.objcrop`, then "
                "data.proposals=STORE.objcrop (or data.proposals=null with "
                "crop.proposals=initial or online: boxes from the backbone itself)"
            )
        if not Path(cfg.data.proposals).is_file():
            raise FileNotFoundError(
                f"data.proposals: proposal store not found: {cfg.data.proposals}. Fix: "
                f"`objcrop proposals build {root} -o {cfg.data.proposals}`"
            )
        store = ProposalStore(cfg.data.proposals)
    photometrics = cfg.crop.photometrics or cfg.method.name  # the method's own preset
    if cfg.crop.jitter != "exact" and ":" not in photometrics:
        photometrics = f"{photometrics}:{cfg.crop.jitter}"
    seed = cfg.trainer.seed if cfg.crop.seed is None else cfg.crop.seed
    keys = _keys(cfg, keys)
    if not keys:
        from ..images import IMAGE_EXTENSIONS

        raise RecipeError(
            f"data.train_path: no images found under {root} (extensions {IMAGE_EXTENSIONS}, "
            "hidden files excluded). Fix: point it at the folder of training images"
        )
    if store is not None:  # the datasets' own check, named as the recipe's key
        from ..engine.datasets import check_store_keys

        try:
            check_store_keys(store, keys, root)
        except ValueError as exc:
            raise RecipeError(f"data.{exc}") from None
    if store is not None:
        from ..proposals.store import sizes_fit_none, warn_if_files_changed

        warn_if_files_changed(store, root)
        none = sizes_fit_none(store, ((k, root / k) for k in keys))
        if none is not None:
            raise RecipeError(
                f"data.proposals: {cfg.data.proposals} was built for other images: the stored "
                f"image size has another aspect ratio than the image for {none}, so every "
                "sample would take scene crops. Fix: rebuild the store from data.train_path "
                f"(`objcrop proposals build {root} --out STORE`)")
    sampling = dict(sampling=cfg.data.sampling, max_boxes_per_image=cfg.data.max_boxes_per_image,
                    epoch_length=cfg.data.epoch_length)
    try:
        if cfg.crop.engine == "gpu":
            from ..engine.gpu import CanvasDataset

            dataset = CanvasDataset(
                root, store, views=recipe, canvas=cfg.crop.canvas, seed=seed, keys=keys,
                max_failure_rate=cfg.data.max_failure_rate, **sampling,
            )
        else:
            from ..engine.datasets import ObjectCropDataset

            dataset = ObjectCropDataset(
                root, store, views=recipe, photometrics=photometrics, draft=cfg.crop.draft,
                seed=seed, keys=keys, max_failure_rate=cfg.data.max_failure_rate, **sampling,
            )
    except ValueError as exc:
        if not counted or "has a box in" not in str(exc):
            raise
        raise RecipeError(f"data.proposals ({cfg.data.sampling}, epoch_length "
                          f"{cfg.data.epoch_length}): {exc}") from None
    dataset.source.schedule = schedule
    return dataset


def _samples(dataset: Any) -> str:
    """What an epoch visits, for the start-up line."""
    source = dataset.source
    n, images = len(dataset), len(source.keys)
    if source.boxes is not None:
        text = f"{len(source.boxes)} boxes of {images - source.boxes.n_without} images (per_box)"
        return text if n == len(source.boxes) else f"{n} samples from {text}"
    return f"{images} images" if n == images else f"{n} samples of {images} images"


def _atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file renamed into place: a kill never leaves a torn file."""
    import io

    from ..files import atomic_write

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getbuffer())


def export_backbone(backbone: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the backbone's state dict atomically (a timm checkpoint file)."""
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    _atomic_torch_save(state, path)
    return Path(path)


def _set_aside(ckpt_dir: Path, echo: Callable[[str], None]) -> None:
    """``trainer.resume: never``: move an earlier run's checkpoints to ``replaced/`` before
    anything of the new run is written. Left in place, they would be resumed by the next
    ``resume: auto`` run if this one died before its first checkpoint (its ``config.yaml``
    already written), and the first save would keep the earlier run's as ``previous.ckpt``.
    ``replaced/`` holds one run: the one before is removed."""
    found = [ckpt_dir / n for n in (LAST, PREVIOUS) if (ckpt_dir / n).is_file()]
    if not found:
        return
    aside = ckpt_dir / "replaced"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for path in found:
        os.replace(path, aside / path.name)
    echo(f"trainer.resume=never: the earlier run's checkpoints were moved to {aside}")


def _keep_previous(path: Path) -> None:
    """Before ``last.ckpt`` is replaced, keep its current content as ``previous.ckpt`` (a hard
    link renamed into place, so ``last.ckpt`` exists throughout)."""
    if path.name != LAST or not path.is_file():
        return
    prev = path.with_name(PREVIOUS)
    tmp = path.with_name(f".{PREVIOUS}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A training checkpoint, read with ``torch.load(..., weights_only=True)`` and checked to be
    a Lightning checkpoint (``state_dict`` and ``loops``).

    Raises:
        CheckpointError: the file is truncated, not a ``torch.save`` file, holds pickled objects
            a weights-only load refuses to run, or is not a Lightning training checkpoint.
    """
    from ..backbones import WeightsFileError, read_weights_file

    try:
        ckpt = read_weights_file(path)  # Lightning's checkpoints need no allow-list
    except (WeightsFileError, FileNotFoundError) as exc:
        raise CheckpointError(f"{path}: {getattr(exc, 'reason', exc)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or (
        "loops" not in ckpt
    ):
        raise CheckpointError(f"{path}: not a training checkpoint of `objcrop train` (no "
                              "state_dict and loop state)")
    return ckpt


def _checkpoint_io(preloaded: dict[str, dict[str, Any]] | None = None) -> Any:
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    loaded = preloaded if preloaded is not None else {}

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Checkpoints written to a temporary file and renamed (a kill never leaves a torn
        ``last.ckpt``), the one before kept as ``previous.ckpt``; read weights-only."""

        def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            _keep_previous(Path(path))
            _atomic_torch_save(checkpoint, path)

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> Any:
            # whatever the installed Lightning and torch default to: weights only (the runner
            # read and checked this very file already; that copy is handed over)
            ckpt = loaded.pop(str(path), None)
            return ckpt if ckpt is not None else load_checkpoint(path)

    return AtomicCheckpointIO()


def _pick_checkpoint(
    ckpt_dir: Path, echo: Callable[[str], None]
) -> tuple[Path, dict[str, Any]] | None:
    """The newest of ``last.ckpt`` / ``previous.ckpt`` that loads weights-only, or ``None`` when
    there is neither. An unreadable ``last.ckpt`` is renamed ``last.ckpt.unreadable`` (so the
    next save keeps the good ``previous.ckpt``), saying so.

    Raises:
        CheckpointError: there are checkpoints but none loads.
    """
    candidates = [ckpt_dir / name for name in (LAST, PREVIOUS) if (ckpt_dir / name).is_file()]
    if not candidates:
        return None
    failures = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        if failures:
            bad = ckpt_dir / LAST
            if path.name != LAST:
                with contextlib.suppress(FileNotFoundError):  # another DDP rank moved it
                    os.replace(bad, bad.with_name(LAST + ".unreadable"))
            echo(f"cannot resume from {failures[0]}; kept it as {LAST}.unreadable and resuming "
                 f"from the checkpoint before it, {path}")
        return path, ckpt
    raise CheckpointError(
        f"cannot resume the run in {ckpt_dir.parent}: " + "; ".join(failures) + ". Fix: set "
        "trainer.out_dir to a new folder, or trainer.resume=never to start afresh there "
        "(overwriting these checkpoints); a checkpoint from elsewhere is never unpickled"
    )


#: keys that may change between a run and its resumption (``trainer.out_dir``: the folder the
#: checkpoint was found in, spelled otherwise or moved)
_RESUMABLE_CHANGES = {
    ("trainer", "out_dir"), ("trainer", "epochs"), ("trainer", "max_steps"), ("trainer", "resume"),
    ("trainer", "progress_bar"), ("trainer", "log_every_n_steps"), ("data", "num_workers"),
    ("data", "persistent_workers"), ("data", "max_failure_rate"), ("data", "labels"), ("eval",), ("name",),
}


def _proposals_source(value: Any) -> Any:
    """``crop.proposals`` without its schedule: what the boxes are made with."""
    from .online import MODES

    if isinstance(value, str):
        value = MODES.get(value, value)
    if not isinstance(value, dict):
        return value
    return {"method": value.get("method", "heatmap"), "params": value.get("params") or {}}


def _check_same_run(cfg: RecipeConfig, saved: Path) -> None:
    """Refuse to resume a checkpoint that was trained with a different recipe."""
    import yaml

    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = to_dict(cfg)
    # a key the saved recipe lacks (written before the key existed) had its default
    defaults = to_dict(RecipeConfig())
    diffs = []
    for section, values in new.items():
        if (section,) in _RESUMABLE_CHANGES:
            continue
        if not isinstance(values, dict):
            if old.get(section) != values:
                diffs.append(section)
            continue
        saved_section = old.get(section) or {}
        for key, value in values.items():
            before = saved_section.get(key, defaults[section].get(key))
            if (section, key) == ("crop", "proposals"):
                # the online schedule may change where it serves the trained epochs alike
                # (checked on resume by the online callback)
                before, value = _proposals_source(before), _proposals_source(value)
            if (section, key) not in _RESUMABLE_CHANGES and before != value:
                diffs.append(f"{section}.{key}")
    if diffs:
        raise RecipeError(
            f"{saved.parent} holds a run of a different recipe (differs in {', '.join(diffs)}), "
            "so it cannot be resumed. Fix: set trainer.out_dir to a new folder, or "
            "trainer.resume=never to start afresh there"
        )


def _all_ranks(value: Any) -> list[Any]:
    """``value`` of every DDP rank, in rank order (``[value]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return [value]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def _callbacks(
    cfg: RecipeConfig, ckpt_dir: Path, dataset: Any, echo: Callable[[str], None] = print,
    online: Any = None,
) -> list[Any]:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    class EpochLog(pl.Callback):
        """One line per epoch (loss, time) where no progress bar is shown."""

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            from .online import data_epoch

            loss = trainer.callback_metrics.get("train_loss_epoch")
            echo(f"  [{cfg.name or cfg.method.name}] epoch {data_epoch(trainer)}/"
                 f"{trainer.max_epochs} loss {float('nan') if loss is None else float(loss):.3f} "
                 f"({time.perf_counter() - self.t0:.0f}s)")

    class RunCounts(pl.Callback):
        """results.json's counts (samples, scene-crop fallbacks, failed reads, the unreadable
        images) over the whole run and every DDP rank: saved in the checkpoint, which a
        resumed run's rank 0 starts from. Exact at an epoch-end checkpoint; a step checkpoint
        also holds the samples the workers prepared ahead."""

        start_step = 0  # the global step this session starts from (its checkpoint's)

        def totals(self) -> dict[str, Any]:
            """The counts of every rank together (DDP: every rank calls it at the same point,
            a checkpoint or the run's end)."""
            mine = {"fallbacks": dataset.recipe.fallbacks.as_dict(),
                    "failed_reads": int(dataset.bad.failed_reads),
                    "bad_keys": [dataset.keys[i] for i in dataset.bad.indices()]}
            parts = _all_ranks(mine)
            return {"fallbacks": {k: sum(p["fallbacks"].get(k, 0) for p in parts)
                                  for k in mine["fallbacks"]},
                    "failed_reads": sum(p["failed_reads"] for p in parts),
                    "bad_keys": sorted({k for p in parts for k in p["bad_keys"]})}

        def state_dict(self) -> dict[str, Any]:
            return self.totals()

        def load_state_dict(self, state: dict[str, Any]) -> None:
            from .._random import distributed_rank

            if distributed_rank() != 0:  # rank 0 carries the run's earlier counts
                return
            for field, n in (state.get("fallbacks") or {}).items():
                if n and field in dataset.recipe.fallbacks.FIELDS:
                    dataset.recipe.fallbacks.add(field, int(n))
            dataset.bad.add_failed_reads(int(state.get("failed_reads") or 0))
            index = {k: i for i, k in enumerate(dataset.keys)}
            dataset.bad.restore([index[k] for k in state.get("bad_keys") or () if k in index])

    class SetEpoch(pl.Callback):
        """New crops every epoch, reproducibly: the dataset draws from (seed, epoch, index)."""

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            if hasattr(dataset, "set_epoch"):
                from .online import data_epoch

                dataset.set_epoch(data_epoch(trainer))

    every = cfg.trainer.checkpoint_every_n_steps
    ckpts = [ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", save_last=False, save_top_k=1, monitor=None,
        save_on_train_epoch_end=True, enable_version_counter=False, **trigger,
    ) for trigger in [{"every_n_epochs": 1}] + ([{"every_n_train_steps": every}] if every else [])]
    # the online refresh (at an epoch's end) runs after the epoch's log line and before the
    # epoch-end checkpoint (Lightning runs checkpoint callbacks last); a step checkpoint on an
    # epoch's last batch comes before the refresh, which a run resumed from it makes first
    return [SetEpoch(), RunCounts(), *ckpts] + (
        [] if cfg.trainer.progress_bar else [EpochLog()]) + ([] if online is None else [online])


class EpochShuffleSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """A random order per epoch that depends only on ``(seed, epoch)``, so a run resumed from an
    epoch-end checkpoint sees exactly the batches of an uninterrupted one. Lightning calls
    :meth:`set_epoch` before each epoch.

    It yields ``(epoch, index)`` pairs (read by :class:`EpochItems`): the epoch travels with
    the index into the DataLoader workers, so their crops follow the epoch even where a
    ``set_epoch`` in the main process cannot reach them (persistent workers, or workers
    started before the epoch was known, as on resume).

    With ``world_size > 1`` (DDP) each rank takes every ``world_size``-th item of the epoch's
    order from its rank on, padded to equal lengths as ``DistributedSampler`` does; the rank is
    read from ``torch.distributed`` when the epoch starts.
    """

    def __init__(self, n: int, seed: int, world_size: int = 1) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.world_size = max(int(world_size), 1)
        self.skip: tuple[int, int] = (-1, 0)

    def skip_first(self, epoch: int, items: int) -> None:
        """Leave out this rank's first ``items`` of ``epoch``: those a step checkpoint has
        trained, so that a run resumed from it trains the rest of the epoch's order, as an
        uninterrupted run does (Lightning counts them as done and stops the epoch early)."""
        self.skip = (int(epoch), max(int(items), 0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self):  # type: ignore[no-untyped-def]
        from .._random import distributed_rank

        epoch = self.epoch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.world_size > 1:
            total = len(self) * self.world_size
            order = (order * (total // max(self.n, 1) + 1))[:total]
            order = order[distributed_rank() % self.world_size :: self.world_size]
        if epoch == self.skip[0]:
            order = order[self.skip[1] :]
        return iter([(epoch, i) for i in order])


class EpochItems(torch.utils.data.Dataset):
    """``dataset`` indexed by ``(epoch, index)`` (or a plain index, at the current epoch):
    the dataset's epoch is set from the item before the item is made, in whichever process
    makes it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, tuple):
            epoch, item = item
            if getattr(self.dataset, "epoch", None) != epoch:
                self.dataset.set_epoch(epoch)
        return self.dataset[item]


def build_loader(cfg: RecipeConfig, dataset: Any, world_size: int = 1, epoch: int = 0,
                 done_batches: int = 0) -> Any:
    """The training DataLoader of :func:`run_recipe` over ``dataset`` (:func:`build_dataset`),
    starting at ``epoch`` after its first ``done_batches`` batches (a resumed step checkpoint):
    a per-epoch order from ``(seed, epoch)``, sharded over ``world_size`` DDP ranks, with the
    epoch carried to the workers in each index (exact resume for any number of workers)."""
    from .resources import PREFETCH_FACTOR

    t = cfg.trainer
    workers = cfg.data.num_workers
    sampler = EpochShuffleSampler(len(dataset), t.seed, world_size)
    # Lightning creates the first iterator (and forks the workers) before it sets the resumed
    # epoch: set it now
    sampler.set_epoch(epoch)
    sampler.skip_first(epoch, done_batches * t.batch_size)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        EpochItems(dataset), batch_size=t.batch_size, sampler=sampler,
        drop_last=True, num_workers=workers, collate_fn=_collate(cfg),
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
        persistent_workers=workers > 0 and cfg.data.persistent_workers,
    )


def _collate(cfg: RecipeConfig) -> Any:
    if cfg.crop.engine == "gpu":
        from ..engine.gpu import collate_canvas

        return collate_canvas
    return None


def _silent(line: str) -> None:
    pass


@contextlib.contextmanager
def _quiet_lightning(quiet: bool) -> Any:
    """Lightning's start-up banners and tips off when the caller prints its own progress."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        # the sampler leaves out the batches a step checkpoint has trained (skip_first)
        warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")
        if not quiet:
            yield
            return
        loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def train(
    cfg: RecipeConfig,
    keys: Sequence[str] | None = None,
    backbone: torch.nn.Module | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a recipe: pretrain, export the backbone, evaluate when labels are given.

    Args:
        cfg: a validated recipe (:func:`~objcrop_plugin.train.config.load_recipe`).
        keys: train on these image keys only (default: every image under ``data.train_path``).
        backbone: use this network instead of building ``backbone.name`` (e.g. to start several
            runs from the same initialisation).
        echo: where progress lines go.

    Returns:
        the dictionary written to ``results.json``.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from .._random import distributed_rank
    from .methods import make_method
    from .resources import check_machine

    rank0 = distributed_rank() == 0 and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
    if not rank0:
        echo = _silent  # DDP: one voice (rank 0)
    check_machine(cfg)  # before anything is written or started
    out = Path(cfg.trainer.out_dir)
    ckpt_dir = out / "checkpoints"
    picked = None
    if cfg.trainer.resume == "auto" and any((ckpt_dir / n).is_file() for n in (LAST, PREVIOUS)):
        _check_same_run(cfg, out / "config.yaml")
        picked = _pick_checkpoint(ckpt_dir, echo)
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)

    labels = None
    if cfg.data.labels and cfg.eval.enabled:  # read now: a bad file is found before training
        try:
            labels = load_eval_labels(cfg.data.labels)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecipeError(
                f"data.labels: {cfg.data.labels} cannot be read for the evaluation after "
                f"training ({type(exc).__name__}: {str(exc).strip()}). Fix: a demo "
                "labels.json or a COCO instances JSON, or data.labels=null (or "
                "eval.enabled=false) to train without the evaluation"
            ) from None
        _check_labels_folder(cfg, labels[0], echo)
    dataset = build_dataset(cfg, keys)
    recipe = dataset.recipe
    sizes = {v.size for v in recipe.views}
    net = backbone if backbone is not None else build_backbone(cfg, multi_size=len(sizes) > 1)
    t = cfg.trainer
    if len(dataset) < t.batch_size:
        raise RecipeError(
            f"trainer.batch_size {t.batch_size} exceeds the {_samples(dataset)} of an epoch; "
            "lower it"
        )
    # the recipe checked (paths, store, backbone, batch): the run's folder is written from here
    if cfg.trainer.resume == "never" and rank0:
        _set_aside(ckpt_dir, echo)
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(cfg, out / "config.yaml")
    torch.manual_seed(t.seed)  # heads initialised from the seed too
    module = make_method(
        cfg.method.name, net, cfg.method.params, n_global=recipe.n_global,
        optimizer=cfg.optimizer, schedule=cfg.schedule, batch_size=t.batch_size,
        channels_last=cfg.backbone.channels_last,
    )
    if cfg.crop.engine == "gpu":
        from ..engine.gpu import GPUViewEngine, apply_gpu_views

        engine = GPUViewEngine.from_recipe(
            recipe, photometrics=cfg.crop.photometrics or cfg.method.name,
            seed=cfg.trainer.seed,
        )
        module.batch_transform = lambda batch: apply_gpu_views(engine, batch)

    online_cb = None
    if dataset.source.schedule is not None:
        from ..proposals.online import steps_reached
        from .online import _network, check_network, online_callback, parse_online

        settings = parse_online(cfg)
        check_network(settings, _network(module), cfg.backbone.name)
        online_cb = online_callback(cfg, settings, dataset.source.schedule, dataset, echo)

    devices: Any = t.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    resume, preloaded = None, {}
    if picked is not None:
        resume = str(picked[0])
        preloaded[resume] = picked[1]
    with _quiet_lightning(not t.progress_bar):
        try:
            callbacks = _callbacks(cfg, ckpt_dir, dataset, echo, online_cb)
            (counts,) = [c for c in callbacks if hasattr(c, "totals")]
            trainer = pl.Trainer(
                max_epochs=t.epochs, max_steps=t.max_steps, accelerator=t.accelerator,
                devices=devices, num_nodes=t.num_nodes, strategy=t.strategy,
                precision=t.precision, default_root_dir=out,
                callbacks=callbacks,
                plugins=[_checkpoint_io(preloaded)], logger=CSVLogger(out, name="logs"),
                enable_progress_bar=t.progress_bar, log_every_n_steps=t.log_every_n_steps,
                deterministic=t.deterministic, limit_train_batches=t.limit_train_batches,
                gradient_clip_val=t.gradient_clip_val,
                accumulate_grad_batches=t.accumulate_grad_batches, enable_model_summary=False,
                num_sanity_val_steps=0, use_distributed_sampler=False,
            )
        except Exception as exc:
            from lightning_fabric.utilities.exceptions import MisconfigurationException

            if not isinstance(exc, (MisconfigurationException, ValueError)):
                raise
            raise RecipeError(
                f"trainer (accelerator {t.accelerator!r}, devices {t.devices!r}, strategy "
                f"{t.strategy!r}, precision {t.precision!r}): {exc}"
            ) from None
        per_rank = -(-len(dataset) // max(trainer.world_size, 1))
        if per_rank < t.batch_size:  # DDP: each rank's share of the epoch makes the batches
            raise RecipeError(
                f"trainer.batch_size {t.batch_size} exceeds each of the {trainer.world_size} "
                f"ranks' share ({per_rank}) of the {_samples(dataset)} of an epoch: no batch "
                "would be trained; lower it (it is the batch of one rank)"
            )
        epoch, done = _resume_position(picked[1]) if picked is not None else (0, 0)
        if picked is not None:  # a finished run's fit trains nothing and starts no hooks
            counts.start_step = int(picked[1].get("global_step") or 0)
        loader = build_loader(cfg, dataset, trainer.world_size, epoch, done)
        if online_cb is not None:
            if picked is not None:
                saved = [v for k, v in (picked[1].get("callbacks") or {}).items()
                         if "OnlineProposals" in str(k)]
                online_cb.load_state_dict(saved[0] if saved else {})
            online_cb.start(epoch, t.epochs, None if picked is None else picked[1]["state_dict"],
                            picked is not None and steps_reached(picked[1], t.max_steps))
        if resume:
            echo(f"resuming from {resume}")
        echo(
            f"objcrop train: {cfg.method.name} on {_samples(dataset)} from "
            f"{cfg.data.train_path}, views {recipe.name} ({recipe.n_global} global + "
            f"{recipe.n_local} local, crop {cfg.crop.type}, engine {cfg.crop.engine}), "
            f"backbone {cfg.backbone.name}, {t.epochs} epochs; output in {out}"
        )
        t0 = time.perf_counter()
        from ..stats import TooManyBadImagesError

        try:
            trainer.fit(module, loader, ckpt_path=resume)
        except TooManyBadImagesError:  # raised in a worker: the main process has the counts
            dataset.write_bad_images(out / "bad_images.tsv")
            raise TooManyBadImagesError(
                dataset.bad.message(listed_in=out / "bad_images.tsv")
            ) from None
    secs = time.perf_counter() - t0
    totals = counts.totals()  # every rank's (DDP: all ranks are here)
    result: dict[str, Any] = {"name": cfg.name, "out_dir": str(out)}
    if trainer.global_rank != 0:
        return result
    index = {k: i for i, k in enumerate(dataset.keys)}
    bad = [index[k] for k in totals["bad_keys"]]
    if dataset.write_bad_images(out / "bad_images.tsv", bad):
        echo(f"skipped {len(bad)} unreadable image{'' if len(bad) == 1 else 's'} (each "
             f"replaced by the next readable one), listed in {out / 'bad_images.tsv'}")
    export_backbone(module.backbone, out / "backbone.pth")
    fb = totals["fallbacks"]
    fell_back = {k: v for k, v in fb.items() if k != "samples" and v}
    if fell_back and fb.get("samples"):
        why = ", ".join(f"{v} {k}" for k, v in fell_back.items())
        echo(f"{sum(fell_back.values())} of {fb['samples']} samples "
             f"({sum(fell_back.values()) / fb['samples']:.1%}) took scene crops instead of "
             f"object crops ({why}: missing = no entry in the proposal store, unusable = no "
             "usable box, mismatched = another image size); run with objcrop -v to log "
             "each with its key")
    loss = trainer.callback_metrics.get("train_loss_epoch")
    steps = int(trainer.global_step)
    # this session's optimizer steps (a resumed run trained only the rest)
    session = (steps - counts.start_step) * t.accumulate_grad_batches
    timing = {"train_seconds": round(secs, 1),
              "images_per_s": round(session * t.batch_size * trainer.world_size
                                    / max(secs, 1e-9), 1),
              "final_loss": None if loss is None else round(float(loss), 4),
              "online_proposals": None if online_cb is None else online_cb.refreshes}
    if session == 0 and resume:  # a finished run rerun (e.g. for data.labels): keep its own
        with contextlib.suppress(OSError, ValueError, AttributeError):
            earlier = json.loads((out / "results.json").read_text(encoding="utf-8"))
            timing = {k: earlier.get(k, v) for k, v in timing.items()}
    result.update(
        method=cfg.method.name, views=recipe.name, crop=cfg.crop.type,
        backbone=cfg.backbone.name, epochs=int(trainer.current_epoch), steps=steps,
        samples_per_epoch=len(dataset), **timing,
        fallbacks=fb, bad_images={"bad_images": len(bad),
                                  "failed_reads": int(totals["failed_reads"])},
        resumed_from=resume, backbone_weights=str(out / "backbone.pth"),
        config=to_dict(cfg),
    )
    if labels is not None:
        result["eval"] = evaluate_recipe(cfg, module.backbone, echo, labels)
    from ..files import atomic_write

    atomic_write(out / "results.json", json.dumps(result, indent=2).encode() + b"\n")
    echo(f"done in {secs:.0f}s; backbone weights in {out / 'backbone.pth'}")
    return result


def _check_labels_folder(cfg: RecipeConfig, keys: Sequence[str], echo: Callable[[str], None],
                         sample: int = 1000) -> None:
    """Before training: are the labelled images under ``data.train_path``? Up to ``sample``
    keys, spread over the file, are looked up. None found: the labels belong to another
    folder (a RecipeError, not a failed evaluation after the run); some: said, with the count.
    """
    import numpy as np

    if not keys:
        return
    root = Path(cfg.data.train_path)
    spread = np.linspace(0, len(keys) - 1, min(sample, len(keys))).astype(int)
    picked = list(dict.fromkeys(keys[i] for i in spread))
    missing = [k for k in picked if not (root / k).is_file()]
    if not missing:
        return
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    checked = len(picked)
    if len(missing) == checked:
        raise RecipeError(
            f"data.labels: none of the {checked} labelled images checked is under "
            f"data.train_path {root} ({shown}): {cfg.data.labels} labels another folder. Fix: "
            "the labels of this folder, data.train_path of the labelled images, or "
            "data.labels=null to train without the evaluation"
        )
    echo(f"warning: data.labels: {len(missing)} of {checked} labelled images checked are not "
         f"under {root} ({shown}); the evaluation leaves them out")


def load_eval_labels(path: str | os.PathLike[str]) -> tuple[list[str], Any]:
    """``(keys, multi_hot)`` from a demo ``labels.json`` or a COCO instances JSON."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data.labels: file not found: {p}")
    with open(p if p.is_file() else p / "labels.json", encoding="utf-8") as f:
        head = json.load(f)
    coco = isinstance(head, dict) and "annotations" in head and "images" in head
    del head  # a COCO train split is gigabytes parsed: not held while it is read again
    if coco:
        from ..proposals.importers import coco_labels

        keys, y, _ = coco_labels(p)
    else:
        from ..data.synthetic import load_labels

        keys, y, _ = load_labels(p)
    return list(keys), y


def evaluate_recipe(cfg: RecipeConfig, backbone: torch.nn.Module,
                    echo: Callable[[str], None] = print,
                    labels: tuple[list[str], Any] | None = None) -> dict[str, Any]:
    """Linear probe + kNN mAP (percent) of ``backbone`` on the labelled images of a recipe
    (``labels``: :func:`load_eval_labels` of ``data.labels``, read here when not given)."""
    from ..eval import evaluate_backbone

    keys, y = labels if labels is not None else load_eval_labels(cfg.data.labels)
    e = cfg.eval
    size = tuple(e.image_size) if isinstance(e.image_size, list) else e.image_size
    device = next(backbone.parameters()).device
    res = evaluate_backbone(
        backbone.eval(), cfg.data.train_path, keys, y, train_fraction=e.train_fraction,
        seed=cfg.trainer.seed, image_size=size, batch_size=e.batch_size, device=device,
        probe=e.probe, knn_kwargs=e.knn,
    )
    out = {k: round(float(res[k]), 2) for k in ("probe_map", "knn_map", "prevalence_map")}
    out.update(n_train=int(res["n_train"]), n_test=int(res["n_test"]),
               unreadable=len(res["unreadable"]))
    skipped = (f"; {len(res['unreadable'])} unreadable image(s) left out"
               if res["unreadable"] else "")
    echo(f"eval: linear probe mAP {out['probe_map']:.2f}, kNN mAP {out['knn_map']:.2f} "
         f"(chance {out['prevalence_map']:.2f}){skipped}")
    return out
