"""``objcrop train RECIPE.yaml [dotted.key=value ...]``: a full pretraining run from a recipe.

What a run does, in ``trainer.out_dir``:

- ``config.yaml``: the resolved recipe (defaults filled in, overrides applied), written first;
- ``checkpoints/last.ckpt``: Lightning checkpoint, written atomically at the end of each epoch
  (and every ``trainer.checkpoint_every_n_steps``); a rerun of the same command resumes from
  it after a kill (``trainer.resume: never`` starts afresh);
- ``backbone.pth``: the backbone's weights as a timm state dict, loadable with
  ``timm.create_model(NAME, pretrained=False, num_classes=0, checkpoint_path="backbone.pth")``
  (or ``objcrop eval --checkpoint``);
- ``results.json``: training time, images/s, final loss, proposal fallbacks and, when
  ``data.labels`` is set, linear-probe and kNN mAP on frozen features;
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
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import PHOTOMETRICS, RecipeConfig, RecipeError, recipe_params, save_recipe, to_dict

__all__ = ["build_backbone", "build_dataset", "export_backbone", "train"]

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
    store = None
    recipe = make_recipe(cfg.views, **recipe_params(cfg))
    if cfg.crop.type == "object_aware":
        from ..proposals.store import ProposalStore

        if not Path(cfg.data.proposals).is_file():
            raise FileNotFoundError(
                f"data.proposals: proposal store not found: {cfg.data.proposals}. Fix: "
                f"`objcrop proposals build {root} -o {cfg.data.proposals}`"
            )
        store = ProposalStore(cfg.data.proposals)
    photometrics = cfg.crop.photometrics or PHOTOMETRICS[cfg.method.name]
    seed = cfg.trainer.seed if cfg.crop.seed is None else cfg.crop.seed
    keys = _keys(cfg, keys)
    if store is not None and not any(k in store for k in keys[:200]):
        raise RecipeError(
            f"data.proposals: none of the first {min(200, len(keys))} images of "
            f"{root} (e.g. '{keys[0]}') has an entry in {cfg.data.proposals}. Store keys "
            "must be paths relative to data.train_path; rebuild the store from that folder"
        )
    if cfg.crop.engine == "gpu":
        from ..engine.gpu import CanvasDataset

        return CanvasDataset(
            root, store, views=recipe, canvas=cfg.crop.canvas, seed=seed, keys=keys,
        )
    from ..engine.datasets import ObjectCropDataset

    return ObjectCropDataset(
        root, store, views=recipe, photometrics=photometrics, draft=cfg.crop.draft, seed=seed,
        keys=keys,
    )


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


def _checkpoint_io() -> Any:
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Checkpoints written to a temporary file and renamed: a kill never leaves a torn
        ``last.ckpt`` behind."""

        def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            _atomic_torch_save(checkpoint, path)

    return AtomicCheckpointIO()


#: keys that may change between a run and its resumption
_RESUMABLE_CHANGES = {
    ("trainer", "epochs"), ("trainer", "max_steps"), ("trainer", "resume"),
    ("trainer", "progress_bar"), ("trainer", "log_every_n_steps"), ("data", "num_workers"),
    ("data", "labels"), ("eval",), ("name",),
}


def _check_same_run(cfg: RecipeConfig, saved: Path) -> None:
    """Refuse to resume a checkpoint that was trained with a different recipe."""
    import yaml

    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = to_dict(cfg)
    diffs = []
    for section, values in new.items():
        if (section,) in _RESUMABLE_CHANGES:
            continue
        if not isinstance(values, dict):
            if old.get(section) != values:
                diffs.append(section)
            continue
        for key, value in values.items():
            if (section, key) not in _RESUMABLE_CHANGES and (old.get(section) or {}).get(key) != value:
                diffs.append(f"{section}.{key}")
    if diffs:
        raise RecipeError(
            f"{saved.parent} holds a run of a different recipe (differs in {', '.join(diffs)}), "
            "so it cannot be resumed. Fix: set trainer.out_dir to a new folder, or "
            "trainer.resume=never to start afresh there"
        )


def _callbacks(
    cfg: RecipeConfig, ckpt_dir: Path, dataset: Any, echo: Callable[[str], None] = print
) -> list[Any]:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    class EpochLog(pl.Callback):
        """One line per epoch (loss, time) where no progress bar is shown."""

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            loss = trainer.callback_metrics.get("train_loss_epoch")
            echo(f"  [{cfg.name or cfg.method.name}] epoch {trainer.current_epoch + 1}/"
                 f"{trainer.max_epochs} loss {float('nan') if loss is None else float(loss):.3f} "
                 f"({time.perf_counter() - self.t0:.0f}s)")

    class SetEpoch(pl.Callback):
        """New crops every epoch, reproducibly: the dataset draws from (seed, epoch, index)."""

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(trainer.current_epoch)

    every = cfg.trainer.checkpoint_every_n_steps
    ckpt = ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", save_last=False, save_top_k=1, monitor=None,
        every_n_train_steps=every if every > 0 else None,
        save_on_train_epoch_end=True, enable_version_counter=False,
    )
    return [SetEpoch(), ckpt] + ([] if cfg.trainer.progress_bar else [EpochLog()])


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random order per epoch that depends only on ``(seed, epoch)``, so a run resumed from an
    epoch-end checkpoint sees exactly the batches of an uninterrupted one. Lightning calls
    :meth:`set_epoch` before each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


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

    if distributed_rank() != 0 or int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        echo = _silent  # DDP: one voice (rank 0)
    out = Path(cfg.trainer.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if cfg.trainer.resume == "auto" and last.is_file():
        _check_same_run(cfg, out / "config.yaml")
    save_recipe(cfg, out / "config.yaml")
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)

    dataset = build_dataset(cfg, keys)
    recipe = dataset.recipe
    sizes = {v.size for v in recipe.views}
    net = backbone if backbone is not None else build_backbone(cfg, multi_size=len(sizes) > 1)
    t = cfg.trainer
    if len(dataset) < t.batch_size:
        raise RecipeError(
            f"trainer.batch_size {t.batch_size} exceeds the {len(dataset)} training images; "
            "lower it"
        )
    torch.manual_seed(t.seed)  # heads initialised from the seed too
    module = make_method(
        cfg.method.name, net, cfg.method.params, n_global=recipe.n_global,
        optimizer=cfg.optimizer, schedule=cfg.schedule, batch_size=t.batch_size,
        channels_last=cfg.backbone.channels_last,
    )
    if cfg.crop.engine == "gpu":
        from ..engine.gpu import GPUViewEngine, apply_gpu_views

        engine = GPUViewEngine.from_recipe(
            recipe, photometrics=cfg.crop.photometrics or PHOTOMETRICS[cfg.method.name],
            seed=cfg.trainer.seed,
        )
        module.batch_transform = lambda batch: apply_gpu_views(engine, batch)

    devices: Any = t.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    workers = cfg.data.num_workers
    with _quiet_lightning(not t.progress_bar):
        trainer = pl.Trainer(
            max_epochs=t.epochs, max_steps=t.max_steps, accelerator=t.accelerator,
            devices=devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
            default_root_dir=out, callbacks=_callbacks(cfg, ckpt_dir, dataset, echo),
            plugins=[_checkpoint_io()], logger=CSVLogger(out, name="logs"),
            enable_progress_bar=t.progress_bar, log_every_n_steps=t.log_every_n_steps,
            deterministic=t.deterministic, limit_train_batches=t.limit_train_batches,
            gradient_clip_val=t.gradient_clip_val,
            accumulate_grad_batches=t.accumulate_grad_batches, enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        # one process: a per-epoch order from (seed, epoch) (exact resume); DDP: Lightning
        # puts its DistributedSampler (seeded, set_epoch each epoch) in place of shuffle=True
        sampler = EpochShuffleSampler(len(dataset), t.seed) if trainer.world_size == 1 else None
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=t.batch_size, shuffle=sampler is None, sampler=sampler,
            drop_last=True, num_workers=workers, collate_fn=_collate(cfg),
            pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
        )
        resume = str(last) if t.resume == "auto" and last.is_file() else None
        if resume:
            echo(f"resuming from {resume}")
        echo(
            f"objcrop train: {cfg.method.name} on {len(dataset)} images from "
            f"{cfg.data.train_path}, views {recipe.name} ({recipe.n_global} global + "
            f"{recipe.n_local} local, crop {cfg.crop.type}, engine {cfg.crop.engine}), "
            f"backbone {cfg.backbone.name}, {t.epochs} epochs; output in {out}"
        )
        t0 = time.perf_counter()
        trainer.fit(module, loader, ckpt_path=resume)
    secs = time.perf_counter() - t0
    result: dict[str, Any] = {"name": cfg.name, "out_dir": str(out)}
    if trainer.global_rank != 0:
        return result
    export_backbone(module.backbone, out / "backbone.pth")
    fb = recipe.fallbacks.as_dict()
    loss = trainer.callback_metrics.get("train_loss_epoch")
    steps = int(trainer.global_step)
    result.update(
        method=cfg.method.name, views=recipe.name, crop=cfg.crop.type,
        backbone=cfg.backbone.name, epochs=int(trainer.current_epoch), steps=steps,
        train_seconds=round(secs, 1),
        images_per_s=round(steps * t.batch_size * trainer.world_size / max(secs, 1e-9), 1),
        final_loss=None if loss is None else round(float(loss), 4),
        fallbacks=fb, resumed_from=resume, backbone_weights=str(out / "backbone.pth"),
        config=to_dict(cfg),
    )
    if cfg.data.labels and cfg.eval.enabled:
        result["eval"] = evaluate_recipe(cfg, module.backbone, echo)
    from ..files import atomic_write

    atomic_write(out / "results.json", json.dumps(result, indent=2).encode() + b"\n")
    echo(f"done in {secs:.0f}s; backbone weights in {out / 'backbone.pth'}")
    return result


def load_eval_labels(path: str | os.PathLike[str]) -> tuple[list[str], Any]:
    """``(keys, multi_hot)`` from a demo ``labels.json`` or a COCO instances JSON."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data.labels: file not found: {p}")
    with open(p if p.is_file() else p / "labels.json", encoding="utf-8") as f:
        head = json.load(f)
    if isinstance(head, dict) and "annotations" in head and "images" in head:
        from ..proposals.importers import coco_labels

        keys, y, _ = coco_labels(p)
    else:
        from ..data.synthetic import load_labels

        keys, y, _ = load_labels(p)
    return list(keys), y


def evaluate_recipe(cfg: RecipeConfig, backbone: torch.nn.Module, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Linear probe + kNN mAP (percent) of ``backbone`` on the labelled images of a recipe."""
    from ..eval import evaluate_backbone

    keys, y = load_eval_labels(cfg.data.labels)
    e = cfg.eval
    size = tuple(e.image_size) if isinstance(e.image_size, list) else e.image_size
    device = next(backbone.parameters()).device
    res = evaluate_backbone(
        backbone.eval(), cfg.data.train_path, keys, y, train_fraction=e.train_fraction,
        seed=cfg.trainer.seed, image_size=size, batch_size=e.batch_size, device=device,
        probe=e.probe, knn_kwargs=e.knn,
    )
    out = {k: round(float(res[k]), 2) for k in ("probe_map", "knn_map", "prevalence_map")}
    out.update(n_train=int(res["n_train"]), n_test=int(res["n_test"]))
    echo(f"eval: linear probe mAP {out['probe_map']:.2f}, kNN mAP {out['knn_map']:.2f} "
         f"(chance {out['prevalence_map']:.2f})")
    return out
