"""Online proposals, host-agnostic: boxes from the network being trained, refreshed as it
learns, for ``objcrop train`` (:mod:`objcrop_plugin.train.online`, where the recipe is described)
and ``objcrop-solo`` (:mod:`objcrop_plugin.integrations.solo`).

- :func:`online_settings`: a recipe's ``crop.proposals`` value (``online``, ``initial`` or a
  mapping ``{method, warmup_epochs, every_epochs, params}``) checked into :class:`OnlineSettings`;
- :class:`OnlineSchedule`: which store serves which epoch (DataLoader workers follow it);
- :func:`refresh_proposals`: one refresh, sharded over DDP ranks, written atomically;
- :func:`online_callback`: the Lightning callback that makes the refreshes before their epochs,
  records them (epoch and SHA-256) in the checkpoint and checks them on resume.

Lightning is imported only by :func:`online_callback`, from the package the host's trainer uses
(``pytorch_lightning`` or ``lightning.pytorch``: their callback classes differ).
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

__all__ = ["MODES", "ONLINE_METHODS", "OnlineKeys", "OnlineRefreshError", "OnlineSchedule",
           "OnlineSettings", "check_network", "data_epoch", "file_sha256",
           "lightning_ckpt_path", "network_of", "online_callback", "online_settings",
           "refresh_proposals", "resume_position", "steps_reached"]

#: generators that can run on the network being trained (they accept ``module=``)
ONLINE_METHODS = ("heatmap", "token_cut")

#: ``None``: derived from the recipe (:func:`online_settings`): ``every_epochs`` a tenth of the
#: run's epochs, at least 1 (ContrastiveCrop's 20 of 200); ``warmup_epochs`` 0, or a tenth
#: when the recipe names a store (that store is trained on first)
_DEFAULTS = {"method": "heatmap", "warmup_epochs": None, "every_epochs": None, "params": {}}


@dataclass(frozen=True)
class OnlineSettings:
    """``crop.proposals`` of a recipe, validated."""

    method: str = "heatmap"
    warmup_epochs: int = 0
    every_epochs: int = 20
    params: dict[str, Any] = field(default_factory=dict)


#: ``crop.proposals`` as a string: the mapping it stands for.
#: ``initial``: one store from the initial weights, before the first epoch, for the whole run
MODES: dict[str, dict[str, Any]] = {
    "online": {},
    "initial": {"warmup_epochs": 0, "every_epochs": 0},
}


@dataclass(frozen=True)
class OnlineKeys:
    """How a host's recipe spells what online proposals read, for its error messages."""

    proposals: str = "crop.proposals"
    epochs: str = "trainer.epochs"
    store: str = "data.proposals"
    backbone: str = "backbone.name"
    accelerator: str = "trainer.accelerator"
    #: how to start a run afresh instead of resuming it
    afresh: str = "start afresh (trainer.resume=never)"
    #: another way out when the run's folder holds other runs' stores
    elsewhere: str = "or set trainer.out_dir to a new folder"


def online_settings(value: Any, epochs: int, has_store: bool, view_top_k: Any = None,
                    error: type[Exception] = ValueError,
                    keys: OnlineKeys = OnlineKeys()) -> OnlineSettings | None:
    """A recipe's ``crop.proposals`` value checked (``None``: a fixed store).

    Args:
        value: ``None``, ``"online"``, ``"initial"`` or a mapping.
        epochs: the run's epochs (the defaults are a tenth of them).
        has_store: the recipe names a store (``data.proposals``): the default warm-up trains
            on it first.
        view_top_k: the views' ``top_k``; each store keeps as many boxes unless
            ``params.top_k`` says otherwise.
        error: the host's recipe error class; ``keys``: its key names.

    Raises:
        error: naming the key that is wrong and the fix.
    """
    p = keys.proposals
    if value is None:
        return None
    if isinstance(value, str):
        if value not in MODES:
            raise error(
                f"{p}: {value!r} is not a mode; use 'online' (boxes from the model "
                "being trained, refreshed), 'initial' (boxes from its initial weights, kept) "
                f"or a mapping {{method, warmup_epochs, every_epochs, params}}; a fixed store "
                f"goes in {keys.store}"
            )
        value = MODES[value]
    if not isinstance(value, Mapping):
        raise error(f"{p}: expected 'online', 'initial' or a mapping {{method, warmup_epochs, "
                    f"every_epochs, params}}, got {value!r}")
    unknown = sorted(set(value) - set(_DEFAULTS))
    if unknown:
        raise error(f"{p}: unknown key(s) {unknown}; known: {', '.join(_DEFAULTS)}")
    merged = {**_DEFAULTS, **value}
    tenth = max(1, round(int(epochs) / 10))
    derived = merged["warmup_epochs"] is None
    if derived:  # a given store is trained on first; else the initial weights' boxes
        merged["warmup_epochs"] = tenth if has_store else 0
    if merged["every_epochs"] is None:
        merged["every_epochs"] = tenth
    if merged["method"] not in ONLINE_METHODS:
        raise error(f"{p}.method: {merged['method']!r} cannot run on the "
                    f"model being trained; use one of {', '.join(ONLINE_METHODS)}")
    for key in ("warmup_epochs", "every_epochs"):
        v = merged[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise error(f"{p}.{key} must be an integer >= 0, got {v!r}"
                        + (" (0: no refresh after the first)" if key == "every_epochs"
                           else " (0: the first store from the initial weights)"))
    if merged["warmup_epochs"] >= int(epochs) >= 1:
        why = (f" (its default with {keys.store}: a tenth of {keys.epochs}, at least 1)"
               if derived else "")
        raise error(
            f"{p}.warmup_epochs ({merged['warmup_epochs']}{why}) must be below "
            f"{keys.epochs} ({epochs}): the first refresh comes after the "
            f"warm-up. Fix: {p}=initial or {p}.warmup_epochs=0 (boxes "
            f"from the initial weights), or more {keys.epochs}"
        )
    if not isinstance(merged["params"], Mapping):
        raise error(f"{p}.params must be a mapping of generator parameters")
    params = dict(merged["params"])
    for bad in ("module", "checkpoint", "model", "prefix", "model_kwargs"):
        if bad in params:
            raise error(f"{p}.params.{bad}: online proposals use the backbone "
                        f"being trained ({keys.backbone}); remove it")
    if "device" in params:
        raise error(f"{p}.params.device: online proposals run where the "
                    f"backbone trains ({keys.accelerator}); remove it")
    # the store keeps the boxes that the views may draw from (the view recipe checks the value)
    if "top_k" not in params and isinstance(view_top_k, int) and not isinstance(view_top_k, bool):
        params["top_k"] = view_top_k
    settings = OnlineSettings(merged["method"], merged["warmup_epochs"],
                              merged["every_epochs"], params)
    try:
        from .build import make_generator

        make_generator(settings.method, module=_Probe(), **params)
    except (TypeError, ValueError) as exc:
        if "_Probe" not in str(exc) and "feature levels" not in str(exc) and "ViT" not in str(exc):
            raise error(f"{p}.params: {exc}") from None
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
        """The epoch of the newest refresh at or before ``epoch`` (``None``: warm-up;
        ``every_epochs`` 0: the first refresh serves every epoch after it)."""
        if epoch < self.warmup_epochs:
            return None
        if self.every_epochs == 0:
            return self.warmup_epochs
        return self.warmup_epochs + (epoch - self.warmup_epochs) // self.every_epochs * self.every_epochs

    def store_path(self, refresh: int) -> str:
        return os.path.join(self.directory, f"epoch-{refresh:04d}.objcrop")

    def path_for(self, epoch: int) -> str | None:
        r = self.refresh_epoch(epoch)
        return self.initial if r is None else self.store_path(r)

    def open(self, epoch: int, current: Any = None, verify: bool = True) -> Any:
        """The :class:`~objcrop_plugin.proposals.store.ProposalStore` that serves ``epoch``
        (``current`` when it is that file already; ``None`` in a warm-up without a store).

        Raises:
            FileNotFoundError: the store is not there (it is written before its epoch starts).
        """
        from .store import ProposalStore

        path = self.path_for(epoch)
        path = None if path is None else str(Path(path))
        if path == (None if current is None else str(current.path)):
            return current
        if path is None:
            return None
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: the proposal store for epoch {epoch} is missing (online "
                "proposals are written before the epoch starts; was it moved or deleted?). "
                "Fix: put it back and rerun the same command (the run resumes; a refresh "
                "made after its last checkpoint is computed again)"
            )
        return ProposalStore(path, verify=verify)


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

    Images the generator cannot read get no entry (training takes scene crops for them, or
    skips them when it cannot read them either); with any, rank 0 lists them with the reason
    in ``<out>.failures.tsv`` (removed when a refresh has none).

    Returns:
        ``{"images", "boxes", "empty", "failures", "seconds", "failed"}``, over all ranks
        (``failed``: ``(key, reason)`` of the first few failures).

    Raises:
        OnlineRefreshError: a decode worker died (killed, e.g. out of memory).
    """
    from ..files import remove_temporaries
    from ..images import write_bad_list
    from .build import (
        failures_path,
        make_generator,
        merge_stores,
        propose_keys,
        shard_path,
    )
    from .store import ProposalStore, remove_stale_failures

    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    generator = make_generator(settings.method, module=network, **settings.params)
    mine = keys[rank::world_size]
    target = shard_path(out, rank, world_size)
    remove_temporaries(target)  # what a refresh killed while writing left behind
    if rank == 0:
        remove_temporaries(failures_path(out))
        remove_stale_failures(out)  # before the store: never beside another refresh's store
    stats = {"images": len(mine), "boxes": 0, "empty": 0, "failures": 0}
    failed: list[tuple[str, str]] = []

    def records() -> Any:
        for chunk in propose_keys(generator, root, mine, workers=workers, chunk_size=256):
            for key, rec, error in chunk:
                if rec is None:  # unreadable now: no entry
                    stats["failures"] += 1
                    failed.append((key, error or "unknown error"))
                    continue
                stats["boxes"] += len(rec.boxes)
                stats["empty"] += len(rec.boxes) == 0
                yield rec

    # the refresh must not move the training's random streams (DataLoader seeds draw from
    # torch's global generator)
    error: Exception | None = None
    with torch.random.fork_rng(devices=[]):
        try:
            ProposalStore.write(target, records(), {"method": settings.method, "online": True,
                                                    "params": settings.params})
        except Exception as exc:
            error = exc
            if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
                error = OnlineRefreshError(
                    f"the online refresh writing {out} lost a decode worker "
                    f"({str(exc).strip().rstrip('.')}). Fix: rerun "
                    "the same command (the run resumes from its last checkpoint and computes "
                    "the refresh again); if the machine ran out of memory, lower "
                    "data.num_workers")
            if world_size <= 1:
                raise error from None
    if world_size > 1:
        # every rank learns of a rank's failure here, where they all meet, and raises: the
        # others would otherwise wait for it at the barrier until the collective's timeout
        stats, failed, errors = _gathered(stats, failed, _failure(rank, error))
        _raise_any(error, errors)
        if barrier is not None:
            barrier()
        merge_error = None
        if rank == 0:
            try:
                shards = [shard_path(out, r, world_size) for r in range(world_size)]
                merge_stores(out, shards)
                for s in shards:
                    with contextlib.suppress(FileNotFoundError):
                        s.unlink()
            except Exception as exc:
                merge_error = exc
        # the second meeting: rank 0's merge, done or failed (every rank raises alike)
        _raise_any(merge_error, _gathered({}, [], _failure(rank, merge_error))[2])
        if barrier is not None:
            barrier()
    if rank == 0 and failed:
        write_bad_list(failures_path(out), sorted(failed), ("key", "reason"))
    stats["seconds"] = time.perf_counter() - t0
    stats["failed"] = sorted(failed)[:3]
    return stats


class OnlineRefreshError(OSError):
    """An online refresh could not finish (a decode worker died)."""


def _failure(rank: int, error: BaseException | None) -> str | None:
    return None if error is None else f"rank {rank}: {type(error).__name__}: {error}"


def _raise_any(mine: Exception | None, errors: list[str]) -> None:
    """Raise this rank's own error, else one naming the first rank that failed."""
    if mine is not None:
        raise mine
    if errors:
        raise OnlineRefreshError(
            f"the online refresh failed on another rank ({errors[0]}); this rank stops too. "
            "Fix: see that rank's error, then rerun the same command (the run resumes from "
            "its last checkpoint)")


def _gathered(stats: dict[str, int], failed: list[tuple[str, str]], error: str | None = None
              ) -> tuple[dict[str, int], list[tuple[str, str]], list[str]]:
    """Every rank's counts summed, failures joined and errors (``"rank R: ..."``) listed
    (DDP; as is without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stats, failed, [] if error is None else [error]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (stats, failed, error))
    total = {k: sum(p[0][k] for p in parts) for k in stats}
    return total, [f for p in parts for f in p[1]], [p[2] for p in parts if p[2] is not None]



def check_network(settings: OnlineSettings, network: torch.nn.Module, backbone: str,
                  error: type[Exception] = ValueError, keys: OnlineKeys = OnlineKeys()) -> None:
    """Refuse, before training, generator settings that cannot run on the backbone being
    trained (a ViT-only generator on a CNN, a feature level it lacks, a network that is not a
    timm model).

    Raises:
        error: naming ``crop.proposals`` and the backbone key.
    """
    from .build import make_generator

    try:
        make_generator(settings.method, module=network, **settings.params)
    except (TypeError, ValueError) as exc:
        why = str(exc).split(" Fix:")[0].rstrip(". ")
        other = f", or {keys.proposals}.method=heatmap" if settings.method != "heatmap" else ""
        raise error(
            f"{keys.proposals}: the {settings.method} generator cannot run on the backbone being "
            f"trained ({backbone}): {why}. Fix: change {keys.proposals}.params or "
            f"{keys.backbone}{other}"
        ) from None


def data_epoch(trainer: Any) -> int:
    """The epoch Lightning hands the sampler next: ``epoch_progress.current.processed``, which
    can run ahead of ``current_epoch`` in a run resumed with ``max_steps``. At an epoch's start
    it is that epoch; at its end (counted as processed before the end hooks) the next one."""
    try:
        return int(trainer.fit_loop.epoch_progress.current.processed)
    except AttributeError:
        return int(trainer.current_epoch)


def network_of(module: Any) -> torch.nn.Module:
    """The network the boxes come from: the momentum encoder where the method has one
    (``backbone_momentum`` in ``objcrop train``, ``momentum_backbone`` in solo-learn), else
    ``module.backbone``."""
    for name in ("backbone_momentum", "momentum_backbone"):
        net = getattr(module, name, None)
        if isinstance(net, torch.nn.Module):
            return net
    return module.backbone


def resume_position(ckpt: dict[str, Any]) -> tuple[int, int]:
    """Where Lightning resumes a checkpoint: ``(epoch, batches)``, the epoch it passes to
    ``set_epoch`` and how many of that epoch's batches a step checkpoint
    (``checkpoint_every_n_steps``) has trained, which the sampler must leave out (0 at an
    epoch's end). A step checkpoint taken on an epoch's last batch (before the epoch's end
    hooks) resumes at the next epoch's start, as Lightning's fit loop counts it; a batch
    saved at its end (before its completion) counts as done."""
    try:
        loop = ckpt["loops"]["fit_loop"]
        epochs = loop["epoch_progress"]
        epoch = int(epochs["current"]["processed"])
        batches = loop.get("epoch_loop.batch_progress") or {}
        total, done = epochs["total"], batches.get("total") or {}
        mid_epoch = (total["started"] == total["ready"]
                     and total["processed"] == total["started"] - 1
                     and total["completed"] == total["processed"])
        if not mid_epoch or not done:
            return epoch, 0
        on_batch_end = (done["started"] == done["ready"]
                        and done["processed"] == done["started"]
                        and done["completed"] == done["processed"] - 1)
        if on_batch_end and batches.get("is_last_batch"):
            return epoch + 1, 0
        cur = batches["current"]
        return epoch, int(cur["processed"] if on_batch_end else cur["completed"])
    except (KeyError, TypeError, ValueError):
        return int(ckpt.get("epoch", 0) or 0), 0



def steps_reached(ckpt: dict[str, Any], max_steps: int | None) -> bool:
    """Whether a Lightning checkpoint's run already made ``max_steps`` optimizer steps
    (resumed, it trains nothing)."""
    return 0 < (max_steps or -1) <= int(ckpt.get("global_step") or 0)


def lightning_ckpt_path(trainer: Any, ckpt_path: Any) -> Any:
    """The checkpoint ``trainer.fit(ckpt_path=ckpt_path)`` would load, resolved as Lightning
    resolves it: ``"last"``, ``"best"``, ``"hpc"`` and ``"registry"`` to a file (``None`` where
    Lightning starts afresh: ``"last"`` before any checkpoint), ``None`` to the HPC or
    on-exception checkpoint that Lightning picks by itself. A path or URL is returned as given.

    Raises:
        ValueError: a special value on a Lightning whose resolution is not reachable (its
            message asks for the checkpoint's file).
    """
    special = isinstance(ckpt_path, str) and ckpt_path in ("last", "best", "hpc", "registry")
    parse = getattr(getattr(trainer, "_checkpoint_connector", None), "_parse_ckpt_path", None)
    try:
        import importlib

        fitting = importlib.import_module(type(trainer.state).__module__).TrainerFn.FITTING
    except (ImportError, AttributeError):
        parse = None
    if parse is None:
        if special:
            raise ValueError(f"online proposals: ckpt_path={ckpt_path!r} cannot be resolved on "
                             "this Lightning version. Fix: pass the checkpoint's file path")
        return ckpt_path
    trainer.state.fn = fitting  # as Trainer.fit sets it first: Lightning's choice depends on it
    return parse(fitting, ckpt_path, model_provided=True,
                 model_connected=trainer.lightning_module is not None)


def online_callback(
    settings: OnlineSettings,
    schedule: OnlineSchedule,
    root: str | os.PathLike[str],
    keys: list[str],
    workers: int = 0,
    echo: Callable[[str], None] = print,
    base: type | None = None,
    error: type[Exception] = ValueError,
    names: OnlineKeys = OnlineKeys(),
    network: Callable[[Any], torch.nn.Module] = network_of,
    on_epoch_start: Callable[[int], None] | None = None,
) -> Any:
    """The Lightning callback that refreshes the store before each refresh epoch (see
    :mod:`objcrop_plugin.train.online`); it must run before the datasets' ``set_epoch`` and
    before the callback that saves the epoch-end checkpoint. Call its ``start`` before
    ``Trainer.fit``.

    Args:
        settings, schedule: what to compute, and when and where.
        root, keys: the training images (keys relative to ``root``) the stores cover.
        workers: decode workers of a refresh.
        base: the host trainer's ``Callback`` class (default ``pytorch_lightning.Callback``;
            solo-learn's trainer is ``lightning.pytorch``'s).
        error, names: the host's recipe error and key names, for its messages.
        network: the network of the LightningModule the boxes come from.
        on_epoch_start: called with each epoch (Lightning's :func:`data_epoch`) as it starts:
            the datasets' ``set_epoch`` where no other callback calls it.
    """
    if base is None:
        import pytorch_lightning as pl

        base = pl.Callback

    class OnlineProposals(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.made: dict[int, str] = {}  # refresh epoch -> the store's SHA-256
            self.saved_schedule: tuple[int, int] | None = None  # (warm-up, every) of the run
            self.due: int | None = None  # a refresh to make before training (re)starts
            self.weights: dict[str, Any] | None = None  # ... from these (a checkpoint's)
            self.epoch_started = 0.0
            self.epoch_seconds: float | None = None
            self.refreshes: list[dict[str, Any]] = []
            self.started = False  # start (or resume_from, or fit) ran

        def state_dict(self) -> dict[str, Any]:
            return {"made": {str(k): v for k, v in self.made.items()},
                    "schedule": [schedule.warmup_epochs, schedule.every_epochs]}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            # Lightning restores the state after the setup hook, where a refresh due at the
            # start may have been made: keep it
            self.made = {**{int(k): v for k, v in state.get("made", {}).items()}, **self.made}
            saved = state.get("schedule")
            self.saved_schedule = None if saved is None else (int(saved[0]), int(saved[1]))

        def start(self, epoch: int, max_epochs: int,
                  weights: dict[str, Any] | None = None, finished: bool = False) -> None:
            """Before ``fit``: check a resumed run (:meth:`check_resume`) and note the refresh
            due before ``epoch`` that was never made (``warmup_epochs: 0``'s first store, or
            the refresh after the last epoch of a run that is now extended), to be computed
            from ``weights`` (the checkpoint's ``state_dict``; ``None``: the initial ones).
            A run with nothing left to train (``epoch`` at ``max_epochs``, or ``finished``:
            its ``max_steps`` reached) needs no store: none is checked or made."""
            self.started = True
            self.due, self.weights = None, None
            if finished or 0 <= max_epochs <= epoch:
                return
            self.check_resume(epoch)
            r = schedule.refresh_epoch(epoch)
            self.due = r if r == epoch and r not in self.made else None
            self.weights = weights if self.due is not None else None

        def resume_from(self, ckpt_path: str | os.PathLike[str] | None,
                        max_epochs: int | None,
                        load: Callable[[Any], dict[str, Any]] | None = None,
                        max_steps: int | None = -1) -> int:
            """Before ``Trainer.fit(..., ckpt_path=ckpt_path)``: this callback's state from the
            Lightning checkpoint (``None``: a fresh run; read with ``load``, default
            ``torch.load``), then :meth:`start` at the epoch the run resumes at, which it
            returns and hands to ``on_epoch_start``: Lightning starts the DataLoader's workers
            before its epoch hooks, and skips them when it resumes mid-epoch."""
            epoch, weights, finished = 0, None, False
            if ckpt_path:
                ckpt = (load(ckpt_path) if load is not None else
                        torch.load(os.fspath(ckpt_path), map_location="cpu", weights_only=False))
                saved = [v for k, v in (ckpt.get("callbacks") or {}).items()
                         if "OnlineProposals" in str(k)]
                self.load_state_dict(saved[0] if saved else {})
                epoch, weights = resume_position(ckpt)[0], ckpt.get("state_dict")
                finished = steps_reached(ckpt, max_steps)
            self.start(epoch, -1 if max_epochs is None else int(max_epochs), weights, finished)
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            return epoch

        def fit(self, trainer: Any, *args: Any, ckpt_path: Any = None, **kwargs: Any) -> Any:
            """``trainer.fit(*args, ckpt_path=ckpt_path, **kwargs)`` with this callback first
            among the trainer's callbacks (before any that saves checkpoints) and started from
            the checkpoint Lightning resumes (:meth:`resume_from`; ``"last"``, ``"best"``,
            ``"hpc"``, URLs: :func:`lightning_ckpt_path`)."""
            if self not in trainer.callbacks:
                trainer.callbacks.insert(0, self)
            try:
                ckpt_path = lightning_ckpt_path(trainer, ckpt_path)
            except ValueError as exc:
                raise error(str(exc)) from None
            io = getattr(trainer.strategy, "checkpoint_io", None)
            load = None if io is None else (
                lambda path: io.load_checkpoint(path, map_location="cpu", weights_only=False))
            self.resume_from(ckpt_path, trainer.max_epochs, load, trainer.max_steps)
            return trainer.fit(*args, ckpt_path=ckpt_path, **kwargs)

        def setup(self, trainer: Any, module: Any, stage: str) -> None:
            # before the DataLoader workers start (Lightning starts them in its strategy's
            # setup, for the optimizer's step count) and before it restores a checkpoint's
            # weights: a refresh due now loads them itself (Lightning loads the same again)
            if stage == "fit" and not self.started:
                raise error(
                    "online proposals: the callback was not started, so it cannot tell a fresh "
                    "run from a resumed one. Fix: callback.fit(trainer, model, ..., "
                    "ckpt_path=...) instead of trainer.fit(...), or callback.resume_from("
                    "ckpt_path, trainer.max_epochs) before it")
            if stage != "fit" or self.due is None:
                return
            if self.weights is not None:
                module.load_state_dict(self.weights)
            network(module).to(trainer.strategy.root_device)  # Lightning moves the rest
            self._refresh(trainer, module, self.due, schedule.store_path(self.due))
            self.due, self.weights = None, None

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            if on_epoch_start is not None:
                on_epoch_start(data_epoch(trainer))
            self.epoch_started = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            # the next epoch's store is written here, before the epoch-end checkpoint (Lightning
            # runs checkpoint callbacks last): a run killed during a refresh resumes from the
            # checkpoint before it and computes the refresh again from the same weights
            self.epoch_seconds = time.perf_counter() - self.epoch_started
            nxt = data_epoch(trainer)  # Lightning counted this epoch as processed already
            if schedule.refresh_epoch(nxt) != nxt or self._have(nxt):
                return
            max_epochs = -1 if trainer.max_epochs is None else trainer.max_epochs
            ends = (0 <= max_epochs <= nxt) or (0 < trainer.max_steps <= trainer.global_step)
            if not ends:  # a refresh at a run's end is made if the run is extended
                self._refresh(trainer, module, nxt, schedule.store_path(nxt))

        def _have(self, r: int) -> bool:
            """The store of refresh ``r`` is recorded and on disk, unchanged."""
            path = schedule.store_path(r)
            return r in self.made and os.path.isfile(path) and file_sha256(path) == self.made[r]

        def check_resume(self, epoch: int) -> None:
            """A run resumed at ``epoch`` needs the schedule it trained with (for the epochs
            trained) and the store its checkpoint names (unchanged)."""
            old = self.saved_schedule
            now = (schedule.warmup_epochs, schedule.every_epochs)
            if old is not None and old != now:
                before = OnlineSchedule(schedule.directory, *old)
                if any(before.refresh_epoch(e) != schedule.refresh_epoch(e) for e in range(epoch)):
                    raise error(
                        f"{names.proposals}: this run trained its first {epoch} epochs with a "
                        f"warm-up of {old[0]} and a refresh every {old[1]} epochs; the recipe now "
                        f"gives {now[0]} and {now[1]} (the defaults follow {names.epochs}). "
                        f"Fix: {names.proposals}.warmup_epochs={old[0]} "
                        f"{names.proposals}.every_epochs={old[1]} keeps the run's schedule, or "
                        f"{names.afresh}"
                    )
            r = schedule.refresh_epoch(epoch)
            if r is None or (r == epoch and r not in self.made):
                return  # warm-up, or a refresh still to make (start)
            path = schedule.store_path(r)
            if r not in self.made:
                raise error(
                    f"resuming at epoch {epoch + 1} needs the online proposals made before "
                    f"epoch {r + 1} ({path}), which this run's checkpoint does not record. Fix: "
                    + " ".join(filter(None, (names.afresh, names.elsewhere)))
                )
            if not self._have(r):
                raise error(
                    f"resuming at epoch {epoch + 1} needs the online proposals {path} that the "
                    "checkpoint was saved with, and the file is missing or changed. Fix: put "
                    f"it back, or {names.afresh}"
                )

        def before_epoch(self, epoch: int, net: torch.nn.Module, rank: int = 0,
                         world_size: int = 1, barrier: Callable[[], None] | None = None) -> None:
            """A plain training loop's call before each epoch (no Lightning): the refresh due
            before ``epoch`` from ``net`` (the network the boxes come from) when this run has
            not made it, then the datasets' epoch. A resumed loop first restores
            :meth:`state_dict` from its checkpoint with :meth:`load_state_dict`; its first
            call checks the run's stores (see :meth:`check_resume`). With DDP pass the rank,
            world size and a barrier (``torch.distributed.barrier``)."""
            now = time.perf_counter()
            if self.epoch_started:
                self.epoch_seconds = now - self.epoch_started
            if not self.started:
                self.check_resume(epoch)
                self.started = True
            r = schedule.refresh_epoch(epoch)
            if r == epoch and not self._have(r):
                self._make(net, r, schedule.store_path(r), rank, world_size, barrier)
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            self.epoch_started = time.perf_counter()

        def _refresh(self, trainer: Any, module: Any, r: int, path: str) -> None:
            self._make(network(module), r, path, trainer.global_rank, trainer.world_size,
                       trainer.strategy.barrier)

        def _make(self, net: torch.nn.Module, r: int, path: str, rank: int, world_size: int,
                  barrier: Callable[[], None] | None) -> None:
            stats = refresh_proposals(net, settings, root, list(keys), path, workers=workers,
                                      rank=rank, world_size=world_size, barrier=barrier)
            self.made[r] = file_sha256(path)
            frac = (f" = {stats['seconds'] / self.epoch_seconds:.1%} of an epoch"
                    if self.epoch_seconds else "")
            failed = stats.pop("failed")
            bad = ""
            if stats["failures"]:
                first = "; ".join(f"{k}: {why}" for k, why in failed)
                bad = (f", {stats['failures']} not proposed (no entry: training takes scene "
                       f"crops for them, or skips them if it cannot read them either; "
                       f"{first}{'; ...' if stats['failures'] > len(failed) else ''}; listed "
                       f"in {path}.failures.tsv)")
            echo(f"  online proposals ({settings.method}) before epoch {r + 1}: "
                 f"{stats['images']} images, {stats['boxes']} boxes, {stats['empty']} without "
                 f"any{bad}, in {stats['seconds']:.1f}s{frac} -> {path}")
            self.refreshes.append({"epoch": r, **{k: round(v, 3) if isinstance(v, float) else v
                                                  for k, v in stats.items()},
                                   "epoch_seconds": None if self.epoch_seconds is None
                                   else round(self.epoch_seconds, 3)})

    return OnlineProposals()
