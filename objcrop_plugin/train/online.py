"""Online proposals: boxes from the model being trained, refreshed as it learns.

Recipe::

    crop:
      type: object_aware
      proposals: online          # or a mapping:
      # proposals: {method: heatmap, warmup_epochs: 20, every_epochs: 20,
      #             params: {scale: 2, max_side: 256}}
      # (warmup_epochs, every_epochs default to a tenth of trainer.epochs, at least 1)
      # proposals: initial       # {warmup_epochs: 0, every_epochs: trainer.epochs}: one
      #                          # store from the initial weights, kept for the whole run

(also as the override ``crop.proposals=online`` or ``crop.proposals=initial``). Each store keeps
as many boxes per image as the views draw from: ``params.top_k`` defaults to the view recipe's
``crop.params.top_k`` when that is set. During the warm-up the views come from
``data.proposals`` when it is set, else from scene crops (each object view becomes its policy's
scene crop; not counted as a fallback). At the end of epoch ``warmup_epochs`` (counted from 1;
``0``: before the first epoch, from the initial weights, with no warm-up), and every
``every_epochs`` epochs after it, the current backbone (the momentum encoder where the method
has one), in eval mode, computes proposals (``method``, a batched generator: ``heatmap`` or
``token_cut``) for every training image at the generator's working resolution, and writes
``OUT_DIR/proposals/epoch-NNNN.objcrop`` (NNNN: the 0-based epoch it serves first) atomically,
before the epoch-end checkpoint; the datasets open it from the next epoch on (each DataLoader
worker maps the file named for the epoch of the item it makes; nothing is pickled).

Exact resume: the stores made so far are in the checkpoint (their epochs and SHA-256); a run
killed during a refresh resumes from the checkpoint before it, trains that epoch again and
computes the refresh again from the same weights, and ends with the same weights as an
uninterrupted run. A resumed run refuses a store that is missing or changed. With DDP, each rank
computes every ``world_size``-th image, rank 0 merges the shards, and all ranks wait for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["OnlineSchedule", "OnlineSettings", "parse_online", "refresh_proposals"]

#: generators that can run on the network being trained (they accept ``module=``)
ONLINE_METHODS = ("heatmap", "token_cut")

#: ``None``: a tenth of ``trainer.epochs``, at least 1 (ContrastiveCrop's 20 of 200)
_DEFAULTS = {"method": "heatmap", "warmup_epochs": None, "every_epochs": None, "params": {}}


@dataclass(frozen=True)
class OnlineSettings:
    """``crop.proposals`` of a recipe, validated."""

    method: str = "heatmap"
    warmup_epochs: int = 20
    every_epochs: int = 20
    params: dict[str, Any] = field(default_factory=dict)


#: ``crop.proposals`` as a string: the mapping it stands for, given ``trainer.epochs``.
#: ``initial``: one store from the initial weights, before the first epoch, for the whole run
MODES: dict[str, Callable[[int], dict[str, Any]]] = {
    "online": lambda epochs: {},
    "initial": lambda epochs: {"warmup_epochs": 0, "every_epochs": max(1, epochs)},
}


def parse_online(cfg: Any) -> OnlineSettings | None:
    """The online settings of a recipe (``None``: a fixed store).

    Raises:
        RecipeError: naming the ``crop.proposals`` key that is wrong.
    """
    from .config import RecipeError

    value = cfg.crop.proposals
    if value is None:
        return None
    if isinstance(value, str):
        if value not in MODES:
            raise RecipeError(
                f"crop.proposals: {value!r} is not a mode; use 'online' (boxes from the model "
                "being trained, refreshed), 'initial' (boxes from its initial weights, kept) "
                "or a mapping {method, warmup_epochs, every_epochs, params}; a fixed store "
                "goes in data.proposals"
            )
        value = MODES[value](int(cfg.trainer.epochs))
    unknown = sorted(set(value) - set(_DEFAULTS))
    if unknown:
        raise RecipeError(f"crop.proposals: unknown key(s) {unknown}; known: "
                          f"{', '.join(_DEFAULTS)}")
    merged = {**_DEFAULTS, **value}
    tenth = max(1, round(int(cfg.trainer.epochs) / 10))
    for key in ("warmup_epochs", "every_epochs"):
        if merged[key] is None:
            merged[key] = tenth
    if merged["method"] not in ONLINE_METHODS:
        raise RecipeError(f"crop.proposals.method: {merged['method']!r} cannot run on the "
                          f"model being trained; use one of {', '.join(ONLINE_METHODS)}")
    for key, low in (("warmup_epochs", 0), ("every_epochs", 1)):
        v = merged[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise RecipeError(f"crop.proposals.{key} must be an integer >= {low}, got {v!r}")
    if merged["warmup_epochs"] >= int(cfg.trainer.epochs) and cfg.trainer.max_steps < 1:
        raise RecipeError(
            f"crop.proposals.warmup_epochs ({merged['warmup_epochs']}) must be below "
            f"trainer.epochs ({cfg.trainer.epochs}): the first refresh comes after the warm-up"
        )
    if not isinstance(merged["params"], Mapping):
        raise RecipeError("crop.proposals.params must be a mapping of generator parameters")
    params = dict(merged["params"])
    for bad in ("module", "checkpoint", "model", "prefix"):
        if bad in params:
            raise RecipeError(f"crop.proposals.params.{bad}: online proposals use the backbone "
                              "being trained; remove it")
    if cfg.crop.type != "object_aware":
        raise RecipeError("crop.proposals: online proposals need crop.type: object_aware")
    # the store keeps the boxes that the views may draw from (the view recipe checks the value)
    choice_k = (cfg.crop.params or {}).get("top_k")
    if "top_k" not in params and isinstance(choice_k, int) and not isinstance(choice_k, bool):
        params["top_k"] = choice_k
    settings = OnlineSettings(merged["method"], merged["warmup_epochs"],
                              merged["every_epochs"], params)
    try:
        from ..proposals.build import make_generator

        make_generator(settings.method, module=_Probe(), **params)
    except (TypeError, ValueError) as exc:
        if "_Probe" not in str(exc) and "feature levels" not in str(exc) and "ViT" not in str(exc):
            raise RecipeError(f"crop.proposals.params: {exc}") from None
    except ImportError:
        pass  # the generator's own import error is raised when the refresh runs
    return settings


class _Probe(torch.nn.Module):
    """A stand-in network for checking generator parameters at config time."""


@dataclass(frozen=True)
class OnlineSchedule:
    """Which store serves which epoch (picklable: DataLoader workers follow it).

    Args:
        directory: where the refreshed stores are (``OUT_DIR/proposals``).
        warmup_epochs, every_epochs: refreshes before epochs ``warmup, warmup + every, ...``.
        initial: the store of the warm-up (``None``: scene crops).
    """

    directory: str
    warmup_epochs: int
    every_epochs: int
    initial: str | None = None

    def refresh_epoch(self, epoch: int) -> int | None:
        """The epoch of the newest refresh at or before ``epoch`` (``None``: warm-up)."""
        if epoch < self.warmup_epochs:
            return None
        return self.warmup_epochs + (epoch - self.warmup_epochs) // self.every_epochs * self.every_epochs

    def store_path(self, refresh: int) -> str:
        return os.path.join(self.directory, f"epoch-{refresh:04d}.objcrop")

    def path_for(self, epoch: int) -> str | None:
        r = self.refresh_epoch(epoch)
        return self.initial if r is None else self.store_path(r)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def refresh_proposals(
    network: torch.nn.Module,
    settings: OnlineSettings,
    root: str | os.PathLike[str],
    keys: list[str],
    out: str | os.PathLike[str],
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Compute proposals for ``keys`` with ``network`` and write the store ``out`` atomically.

    With ``world_size > 1`` each rank computes every ``world_size``-th key into a shard file
    beside ``out``; after ``barrier()`` rank 0 merges them into ``out`` and removes the shards,
    then ``barrier()`` again, so every rank reads the same store afterwards.

    Returns:
        ``{"images", "boxes", "empty", "failures", "seconds"}`` (this rank's share when
        sharded).
    """
    from ..proposals.build import make_generator, merge_stores, propose_keys, shard_path
    from ..proposals.store import ProposalStore

    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    generator = make_generator(settings.method, module=network, **settings.params)
    mine = keys[rank::world_size]
    target = shard_path(out, rank, world_size)
    stats = {"images": len(mine), "boxes": 0, "empty": 0, "failures": 0}

    def records() -> Any:
        for chunk in propose_keys(generator, root, mine, workers=workers, chunk_size=256):
            for _key, rec, _error in chunk:
                if rec is None:  # unreadable now: no entry (the dataset skips such images)
                    stats["failures"] += 1
                    continue
                stats["boxes"] += len(rec.boxes)
                stats["empty"] += len(rec.boxes) == 0
                yield rec

    # the refresh must not move the training's random streams (DataLoader seeds draw from
    # torch's global generator)
    with torch.random.fork_rng(devices=[]):
        ProposalStore.write(target, records(), {"method": settings.method, "online": True,
                                                "params": settings.params})
    if world_size > 1:
        if barrier is not None:
            barrier()
        if rank == 0:
            shards = [shard_path(out, r, world_size) for r in range(world_size)]
            merge_stores(out, shards)
            for s in shards:
                with contextlib.suppress(FileNotFoundError):
                    s.unlink()
        if barrier is not None:
            barrier()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _network(module: Any) -> torch.nn.Module:
    """The network the boxes come from: the momentum encoder where the method has one."""
    net = getattr(module, "backbone_momentum", None)
    return module.backbone if net is None else net


def online_callback(cfg: Any, settings: OnlineSettings, schedule: OnlineSchedule, dataset: Any,
                    echo: Callable[[str], None] = print) -> Any:
    """The Lightning callback that refreshes the store before each refresh epoch (see the
    module docstring); it must run before the dataset's ``set_epoch``."""
    import pytorch_lightning as pl

    class OnlineProposals(pl.Callback):
        def __init__(self) -> None:
            self.made: dict[int, str] = {}  # refresh epoch -> the store's SHA-256
            self.epoch_started = 0.0
            self.epoch_seconds: float | None = None
            self.refreshes: list[dict[str, Any]] = []

        def state_dict(self) -> dict[str, Any]:
            return {"made": {str(k): v for k, v in self.made.items()}}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.made = {int(k): v for k, v in state.get("made", {}).items()}

        def setup(self, trainer: Any, module: Any, stage: str) -> None:
            # warmup_epochs 0: the first store comes from the initial weights, before the
            # DataLoader workers start (Lightning starts them before on_train_start); a resumed
            # run has it in its checkpoint already
            if stage == "fit" and schedule.warmup_epochs == 0 and 0 not in self.made:
                _network(module).to(trainer.strategy.root_device)  # Lightning moves the rest
                self._refresh(trainer, module, 0, schedule.store_path(0))

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.epoch_started = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            # the next epoch's store is written here, before the epoch-end checkpoint (Lightning
            # runs checkpoint callbacks last): a run killed during a refresh resumes from the
            # checkpoint before it and computes the refresh again from the same weights
            self.epoch_seconds = time.perf_counter() - self.epoch_started
            nxt = trainer.current_epoch + 1
            if schedule.refresh_epoch(nxt) == nxt and nxt < (trainer.max_epochs or 0):
                self._refresh(trainer, module, nxt, schedule.store_path(nxt))

        def check_resume(self, epoch: int) -> None:
            """A run resumed at ``epoch`` needs the store its checkpoint names (unchanged)."""
            r = schedule.refresh_epoch(epoch)
            if r is None:
                return
            path = schedule.store_path(r)
            recorded = self.made.get(r)
            if recorded is None or not os.path.isfile(path) or file_sha256(path) != recorded:
                from .config import RecipeError

                raise RecipeError(
                    f"resuming at epoch {epoch + 1} needs the online proposals {path} that the "
                    "checkpoint was saved with, and the file is missing or changed. Fix: put "
                    "it back, or start afresh (trainer.resume=never)"
                )

        def _refresh(self, trainer: Any, module: Any, r: int, path: str) -> None:
            strategy = trainer.strategy
            stats = refresh_proposals(
                _network(module), settings, dataset.root, list(dataset.keys), path,
                workers=cfg.data.num_workers, rank=trainer.global_rank,
                world_size=trainer.world_size, barrier=strategy.barrier,
            )
            self.made[r] = file_sha256(path)
            frac = (f" = {stats['seconds'] / self.epoch_seconds:.1%} of an epoch"
                    if self.epoch_seconds else "")
            bad = (f", {stats['failures']} unreadable (no entry; training skips them too)"
                   if stats["failures"] else "")
            echo(f"  online proposals ({settings.method}) before epoch {r + 1}: "
                 f"{stats['images']} images, {stats['boxes']} boxes, {stats['empty']} without "
                 f"any{bad}, in {stats['seconds']:.1f}s{frac} -> {path}")
            self.refreshes.append({"epoch": r, **{k: round(v, 3) if isinstance(v, float) else v
                                                  for k, v in stats.items()},
                                   "epoch_seconds": None if self.epoch_seconds is None
                                   else round(self.epoch_seconds, 3)})

    return OnlineProposals()
