"""Online proposals: boxes from the model being trained, refreshed as it learns.

Recipe::

    crop:
      type: object_aware
      proposals: online          # or a mapping:
      # proposals: {method: heatmap, warmup_epochs: 0, every_epochs: 20,
      #             params: {scale: 2, max_side: 256}}
      # (every_epochs defaults to a tenth of trainer.epochs, at least 1; 0 keeps the first
      # store for the rest of the run. warmup_epochs defaults to 0, the first store from
      # the initial weights; with data.proposals set, to a tenth of trainer.epochs)
      # proposals: initial       # {warmup_epochs: 0, every_epochs: 0}: one store from the
      #                          # initial weights, kept for the whole run

(also as the override ``crop.proposals=online`` or ``crop.proposals=initial``; a dotted override
such as ``crop.proposals.warmup_epochs=0`` applies to the mapping a mode stands for). Each store keeps
as many boxes per image as the views draw from: ``params.top_k`` defaults to the view recipe's
``crop.params.top_k`` when that is set. During the warm-up the views come from
``data.proposals`` when it is set, else from scene crops (each object view becomes its policy's
scene crop; not counted as a fallback). At the end of epoch ``warmup_epochs`` (counted from 1;
``0``, the default without ``data.proposals``: before the first epoch, from the initial
weights, with no warm-up; on the benchmark's photo domain that kept more of the oracle boxes'
gain than two epochs of scene crops, +0.37 ± 0.17 mAP paired over twelve seeds, -0.49 ± 0.50
on the demo's, all of it from one seed), and every
``every_epochs`` epochs after it, the current backbone (the momentum encoder where the method
has one), in eval mode, computes proposals (``method``, a batched generator: ``heatmap`` or
``token_cut``) for every training image at the generator's working resolution, and writes
``OUT_DIR/proposals/epoch-NNNN.objcrop`` (NNNN: the 0-based epoch it serves first) atomically,
before the epoch-end checkpoint; the datasets open it from the next epoch on (each DataLoader
worker maps the file named for the epoch of the item it makes; nothing is pickled).

Exact resume: the stores made so far and the schedule are in the checkpoint (their epochs and
SHA-256); a run killed during a refresh resumes from the checkpoint before it, trains that epoch
again and computes the refresh again from the same weights, and ends with the same weights as an
uninterrupted run. A refresh that is due when a run resumes and was never made (the run ended
there, and is now extended) is computed from the checkpoint's weights before training goes on.
A resumed run refuses a store that is missing or changed, and a schedule (``trainer.epochs``
changes the default one) that would have served the epochs already trained differently. With
DDP, each rank computes every ``world_size``-th image, rank 0 merges the shards, and all ranks
wait for it; the counts printed are the whole refresh's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..proposals.online import (
    MODES,
    ONLINE_METHODS,
    OnlineKeys,
    OnlineRefreshError,
    OnlineSchedule,
    OnlineSettings,
    data_epoch,
    file_sha256,
    network_of,
    online_settings,
    refresh_proposals,
)
from ..proposals.online import check_network as _check_network
from ..proposals.online import online_callback as _online_callback

__all__ = ["MODES", "ONLINE_METHODS", "OnlineRefreshError", "OnlineSchedule", "OnlineSettings",
           "data_epoch", "file_sha256", "parse_online", "refresh_proposals"]

#: ``objcrop train``'s recipe keys, as its messages name them
KEYS = OnlineKeys()


def parse_online(cfg: Any) -> OnlineSettings | None:
    """The online settings of a recipe (``None``: a fixed store).

    Raises:
        RecipeError: naming the ``crop.proposals`` key that is wrong.
    """
    from .config import RecipeError

    settings = online_settings(cfg.crop.proposals, int(cfg.trainer.epochs),
                               bool(cfg.data.proposals), (cfg.crop.params or {}).get("top_k"),
                               RecipeError, KEYS)
    if settings is not None and cfg.crop.type != "object_aware":
        raise RecipeError("crop.proposals: online proposals need crop.type: object_aware")
    return settings


def check_network(settings: OnlineSettings, network: torch.nn.Module, backbone: str) -> None:
    """Refuse, before training, generator settings that cannot run on the backbone being
    trained (a ViT-only generator on a CNN, a feature level it lacks).

    Raises:
        RecipeError: naming ``crop.proposals`` and ``backbone.name``.
    """
    from .config import RecipeError

    _check_network(settings, network, backbone, RecipeError, KEYS)


def _network(module: Any) -> torch.nn.Module:
    """The network the boxes come from: the momentum encoder where the method has one."""
    return network_of(module)


def online_callback(cfg: Any, settings: OnlineSettings, schedule: OnlineSchedule, dataset: Any,
                    echo: Callable[[str], None] = print) -> Any:
    """``objcrop train``'s online callback (:func:`objcrop_plugin.proposals.online.
    online_callback`) over ``dataset``'s images; it must run before the dataset's
    ``set_epoch``. Call its ``start`` before ``Trainer.fit``."""
    from .config import RecipeError

    return _online_callback(settings, schedule, dataset.root, list(dataset.keys),
                            workers=cfg.data.num_workers, echo=echo, error=RecipeError,
                            names=KEYS, network=lambda module: _network(module))
