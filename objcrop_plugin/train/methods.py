"""SSL methods as Lightning modules, built from lightly's own heads, losses and utilities.

Each module takes a backbone (a timm model with ``num_classes=0``: pooled features of
``backbone.num_features``) and trains on lightly-format batches ``(views, targets, keys)``
with ``views`` a list of ``(B, C, H, W)`` tensors, global views first. Views of the same size
go through the backbone in one call (one BatchNorm batch, as lightly's examples do).

=========  ==================================================  ==================================
method     parts (lightly)                                     multi-crop (local views)
=========  ==================================================  ==================================
simclr     SimCLRProjectionHead, NTXentLoss                    NT-Xent of every (global, other
                                                               view) pair, averaged
mocov2     MoCoProjectionHead, momentum encoder                queries from every view against
           (``update_momentum``), NTXentLoss with memory bank  keys of the other globals
byol       BYOLProjectionHead + BYOLPredictionHead, momentum   predictions of every view against
           encoder, NegativeCosineSimilarity                   momentum targets of other globals
vicreg     VICRegProjectionHead, VICRegLoss                    every (global, other view) pair
=========  ==================================================  ==================================

References:
    - Chen et al., SimCLR, ICML 2020. He et al., MoCo, CVPR 2020; Chen et al., MoCo v2, 2020.
    - Grill et al., BYOL, NeurIPS 2020. Bardes et al., VICReg, ICLR 2022.
    - Caron et al., SwAV (multi-crop), NeurIPS 2020.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

try:
    import pytorch_lightning as pl
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss, VICRegLoss
    from lightly.models.modules import (
        BYOLPredictionHead,
        BYOLProjectionHead,
        MoCoProjectionHead,
        SimCLRProjectionHead,
    )
    from lightly.models.modules.heads import VICRegProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "objcrop train needs lightly and pytorch_lightning, which could not be imported "
        f"({type(_exc).__name__}: {_exc}). Fix: pip install \"objcrop-plugin[lightly]\""
    ) from _exc

from .config import METHOD_DEFAULTS, OptimizerConfig, ScheduleConfig

__all__ = ["BYOL", "METHODS", "MoCoV2", "SSLMethod", "SimCLR", "VICReg", "make_method"]


def _size_groups(views: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of views grouped by spatial size, in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[-2:]), []).append(i)
    return list(groups.values())


class SSLMethod(pl.LightningModule):
    """Common parts: view batching, optimiser, warm-up + cosine learning rate, logging.

    Args:
        backbone: pooled-feature network (``num_features`` attribute, or ``feature_dim``).
        n_global: how many of a batch's views are global (the rest are local).
        optimizer, schedule: see :mod:`objcrop_plugin.train.config`.
        batch_size: per-device batch size (for the linear scaling rule).
        channels_last: feed the backbone channels-last tensors (faster convolutions).
        params: the method's own parameters (see each subclass's ``defaults``).
    """

    defaults: dict[str, Any] = {}
    name = "ssl"

    def __init__(
        self,
        backbone: nn.Module,
        n_global: int = 2,
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        batch_size: int = 256,
        channels_last: bool = True,
        **params: Any,
    ) -> None:
        super().__init__()
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise TypeError(
                f"method.params: unknown parameter(s) {sorted(unknown)} for {self.name}; "
                f"known: {sorted(self.defaults)}"
            )
        self.hp = {**self.defaults, **params}
        if n_global < 2:
            raise ValueError(
                f"{self.name} needs at least 2 global views per image, the view recipe gives "
                f"{n_global}"
            )
        self.backbone = backbone
        self.n_global = int(n_global)
        self.opt_cfg = optimizer or OptimizerConfig()
        self.sched_cfg = schedule or ScheduleConfig()
        self.batch_size = int(batch_size)
        self.channels_last = channels_last
        #: applied to each batch after it reached the device (e.g. the GPU view engine)
        self.batch_transform: Callable[[Any], Any] | None = None
        self.feature_dim = int(getattr(backbone, "num_features", 0) or getattr(backbone, "feature_dim", 0))
        if self.feature_dim <= 0:
            raise ValueError(
                "the backbone has no num_features attribute: pass a timm model created with "
                "num_classes=0, or set backbone.feature_dim"
            )

    # ---------------------------------------------------------------------------- helpers

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def encode(
        self, views: Sequence[torch.Tensor], net: Callable[[torch.Tensor], torch.Tensor]
    ) -> list[torch.Tensor]:
        """``net`` applied to every view; views of one size share one forward pass."""
        out: list[torch.Tensor | None] = [None] * len(views)
        for group in _size_groups(views):
            x = self._prep(torch.cat([views[i] for i in group]))
            for i, z in zip(group, net(x).chunk(len(group))):
                out[i] = z
        return out  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._prep(x))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        views = batch[0]
        if len(views) < self.n_global:
            raise ValueError(f"batch has {len(views)} views, the recipe {self.n_global} globals")
        loss = self.ssl_loss(list(views))
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=views[0].shape[0], sync_dist=True)
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if optimizers:  # the schedule's learning rate, in the run's CSV log
            self.log("lr", float(optimizers[0].param_groups[0]["lr"]), on_step=True,
                     on_epoch=False, batch_size=views[0].shape[0])
        return loss

    def ssl_loss(self, views: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def pairs(self, n_views: int) -> list[tuple[int, int]]:
        """(global i, other view j) pairs: each global against every other view."""
        return [(i, j) for i in range(self.n_global) for j in range(n_views) if j != i]

    def target_pairs(self, n_views: int) -> list[tuple[int, int]]:
        """(view i, global j) pairs, i != j: every view predicts the targets of the globals."""
        return [(i, j) for j in range(self.n_global) for i in range(n_views) if i != j]

    # ---------------------------------------------------------------------- optimisation

    def _world(self) -> int:
        t = self._trainer
        return int(t.world_size) if t is not None else 1

    def lr(self) -> float:
        lr = self.opt_cfg.lr
        if self.opt_cfg.scale_lr_with_batch:
            lr = lr * self.batch_size * self._world() / 256
        return lr

    def configure_optimizers(self) -> Any:
        o = self.opt_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        lr = self.lr()
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        elif o.name == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        elif o.name == "lars":
            from lightly.utils.lars import LARS

            opt = LARS(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:  # pragma: no cover - validated by the config
            raise ValueError(f"unknown optimizer {o.name!r}")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        s = self.sched_cfg
        # optimizer steps per epoch from the epoch's batches (set by estimated_stepping_batches):
        # total / max_epochs would be wrong where max_steps ends the run (epochs: -1, or
        # max_steps before the last epoch)
        def finite(n: Any) -> bool:
            return isinstance(n, (int, float)) and math.isfinite(n) and n > 0

        batches = getattr(self.trainer, "num_training_batches", float("inf"))
        if not finite(batches):  # epochs: -1 leaves the data unset: set it up as Lightning does
            try:
                self.trainer.fit_loop.setup_data()
                batches = self.trainer.num_training_batches
            except Exception:  # noqa: BLE001 - the estimate below stands in
                batches = float("inf")
        if finite(batches):
            steps_per_epoch = math.ceil(batches / max(1, self.trainer.accumulate_grad_batches))
        else:  # an iterable dataset of unknown length
            steps_per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = int(max(s.warmup_epochs * steps_per_epoch, s.warmup_fraction * total))
        floor = s.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if s.scheduler == "constant":
                return 1.0
            t = (step - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def progress(self) -> tuple[int, int]:
        """(global step, total steps) for momentum schedules."""
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
        return int(self.global_step), total


class SimCLR(SSLMethod):
    """SimCLR: NT-Xent between two views of each image, in-batch negatives."""

    name = "simclr"
    defaults = METHOD_DEFAULTS[name]

    def __init__(self, backbone: nn.Module, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        hid = self.hp["proj_hidden_dim"] or self.feature_dim
        self.projection_head = SimCLRProjectionHead(self.feature_dim, hid, self.hp["proj_dim"])
        self.criterion = NTXentLoss(
            temperature=self.hp["temperature"], gather_distributed=True
        )

    def ssl_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        z = self.encode(views, lambda x: self.projection_head(self.backbone(x)))
        pairs = self.pairs(len(views)) if len(views) > 2 else [(0, 1)]
        return sum(self.criterion(z[i], z[j]) for i, j in pairs) / len(pairs)


class _Momentum(SSLMethod):
    """A momentum (EMA) copy of backbone + projection head, updated before each step."""

    def _init_momentum(self, head: nn.Module) -> None:
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def momentum_value(self) -> float:
        m0, m1 = self.hp["momentum"], self.hp["momentum_end"]
        if m1 is None:
            return float(m0)
        step, total = self.progress()
        return float(cosine_schedule(step, total, m0, m1))

    def update_momentum_nets(self, head: nn.Module) -> None:
        m = self.momentum_value()
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(head, self.projection_head_momentum, m=m)

    @torch.no_grad()
    def momentum_targets(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.encode(
            views, lambda x: self.projection_head_momentum(self.backbone_momentum(x))
        )


class MoCoV2(_Momentum):
    """MoCo v2: queries from the online encoder, keys from its momentum copy, a memory bank of
    past keys as negatives (lightly's ``NTXentLoss(memory_bank_size=...)``)."""

    name = "mocov2"
    defaults = METHOD_DEFAULTS[name]

    def __init__(self, backbone: nn.Module, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        hp = self.hp
        self.projection_head = MoCoProjectionHead(self.feature_dim, hp["proj_hidden_dim"], hp["proj_dim"])
        self._init_momentum(self.projection_head)
        bank = int(hp["memory_bank_size"])
        self.criterion = NTXentLoss(
            temperature=hp["temperature"],
            memory_bank_size=(bank, hp["proj_dim"]) if bank > 0 else 0,
        )

    # lightly keeps the memory bank in non-persistent buffers; carry it in the checkpoint so a
    # resumed run continues with the same negatives
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["objcrop_memory_bank"] = {
            n: b.detach().cpu().clone() for n, b in self.criterion.named_buffers()
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("objcrop_memory_bank") or {}
        for n, b in self.criterion.named_buffers():
            if n in saved and saved[n].shape == b.shape:
                b.copy_(saved[n])

    def ssl_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        self.update_momentum_nets(self.projection_head)
        q = self.encode(views, lambda x: self.projection_head(self.backbone(x)))
        k = self.momentum_targets(views[: self.n_global])
        if len(views) == 2 and not self.hp["symmetric"]:
            pairs = [(0, 1)]  # query view 0, key view 1 (MoCo's original direction)
        else:
            pairs = self.target_pairs(len(views))
        return sum(self.criterion(q[i], k[j]) for i, j in pairs) / len(pairs)


class BYOL(_Momentum):
    """BYOL: online projection + prediction regresses the momentum network's projection."""

    name = "byol"
    defaults = METHOD_DEFAULTS[name]

    def __init__(self, backbone: nn.Module, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        hp = self.hp
        self.projection_head = BYOLProjectionHead(self.feature_dim, hp["proj_hidden_dim"], hp["proj_dim"])
        self.prediction_head = BYOLPredictionHead(hp["proj_dim"], hp["pred_hidden_dim"], hp["proj_dim"])
        self._init_momentum(self.projection_head)
        self.criterion = NegativeCosineSimilarity()

    def ssl_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        self.update_momentum_nets(self.projection_head)
        p = self.encode(
            views, lambda x: self.prediction_head(self.projection_head(self.backbone(x)))
        )
        z = self.momentum_targets(views[: self.n_global])
        pairs = self.target_pairs(len(views))
        return sum(self.criterion(p[i], z[j]) for i, j in pairs) / len(pairs)


class VICReg(SSLMethod):
    """VICReg: invariance + variance + covariance terms between two views' embeddings."""

    name = "vicreg"
    defaults = METHOD_DEFAULTS[name]

    def __init__(self, backbone: nn.Module, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        hp = self.hp
        self.projection_head = VICRegProjectionHead(
            self.feature_dim, hp["proj_hidden_dim"], hp["proj_dim"], num_layers=hp["proj_layers"]
        )
        self.criterion = VICRegLoss(
            lambda_param=hp["lambda_param"], mu_param=hp["mu_param"], nu_param=hp["nu_param"],
            gather_distributed=True,
        )

    def ssl_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        z = self.encode(views, lambda x: self.projection_head(self.backbone(x)))
        pairs = self.pairs(len(views)) if len(views) > 2 else [(0, 1)]
        return sum(self.criterion(z[i], z[j]) for i, j in pairs) / len(pairs)


#: the Lightning module of each name of :data:`objcrop_plugin.train.config.METHOD_DEFAULTS`
METHODS: dict[str, type[SSLMethod]] = {cls.name: cls for cls in (SimCLR, MoCoV2, BYOL, VICReg)}
if set(METHODS) != set(METHOD_DEFAULTS):  # pragma: no cover - a programming error
    raise RuntimeError(f"methods {sorted(METHODS)} != config names {sorted(METHOD_DEFAULTS)}")


def make_method(name: str, backbone: nn.Module, params: Mapping[str, Any] | None = None, **kwargs: Any) -> SSLMethod:
    """The Lightning module for method ``name`` (a key of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](backbone, **kwargs, **dict(params or {}))
