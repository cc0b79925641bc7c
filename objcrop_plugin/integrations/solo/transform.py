"""The object-aware transform: solo-learn's per-entry pipelines with crops cut from proposals.

``build_transform_pipeline`` needs no wrapper: ``prepare_datasets`` receives its per-entry
pipelines, and :class:`ObjectAwareTransform` keeps each one minus its first step (solo-learn's
RandomResizedCrop), so colour jitter, blur, solarisation, flip and normalisation stay
solo-learn's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from ..._random import process_rng, sample_rng
from ...policies import CropWindow, ViewRecipe
from ...proposals.store import ProposalStore
from ...stats import FallbackCounter, SharedEpoch
from .config import ObjectAwareConfig
from .errors import SoloConfigError

__all__ = ["ObjectAwareTransform", "SlotPlanner"]


def _split_crop(pipeline: Any, where: str) -> tuple[Callable, Callable]:
    """solo-learn's entry pipeline as ``(its crop, everything after it)``."""
    steps = getattr(pipeline, "transforms", None)
    if not steps or not isinstance(steps[0], (T.RandomResizedCrop, T.Resize)):
        raise SoloConfigError(
            f"{where}: expected solo-learn's pipeline to start with RandomResizedCrop or Resize, "
            f"got {pipeline!r}. This solo-learn version builds its augmentations differently; "
            "please report it with the solo-learn commit"
        )
    return steps[0], T.Compose(list(steps[1:]))


class SlotPlanner:
    """Where each of solo-learn's views of a sample is cut from, in solo-learn's view order.

    solo-learn's views are its ``augmentations`` entries in order, ``num_crops`` each (its
    "slots"). The object-aware slots are the views of one :class:`ViewRecipe` (so they share
    the sample's proposal, fall back and count fallbacks together, and its large ones may be
    shuffled); the other slots are left to solo-learn's own RandomResizedCrop (``None``).

    With online proposals (``crop.proposals``) ``schedule`` names the store of each epoch: the
    planner opens it as the epoch (:meth:`set_epoch`, shared with DataLoader workers) changes,
    and plans scene crops during a warm-up without a store.

    Args:
        config: the parsed recipe.
        store: the proposal store (default: ``config.proposals``, opened by path; pickles by
            path, so DataLoader workers map the file instead of copying it).
    """

    def __init__(self, config: ObjectAwareConfig, store: ProposalStore | None = None) -> None:
        self.config = config
        self.recipe = config.recipe()
        if store is None and config.proposals is not None:
            store = ProposalStore(config.proposals, verify=False)
        self.store = store
        #: an :class:`~objcrop_plugin.proposals.online.OnlineSchedule` (online proposals)
        self.schedule: Any = None
        self._epoch = SharedEpoch(0)  # set in the main process, seen by the workers
        self._synced: int | None = None
        #: samples planned in a warm-up without a store (scene crops, not fallbacks), counted
        #: across workers in its ``samples``
        self.warmup = FallbackCounter()
        # slot -> (entry, position in the recipe's windows or None); the recipe orders its
        # views large first then small, each in entry order
        n_large = sum(e.num_crops for e in config.entries if e.object_aware and not e.local)
        large = small = 0
        self.slots: list[tuple[int, int | None]] = []
        for k, entry in enumerate(config.entries):
            for _ in range(entry.num_crops):
                if not entry.object_aware:
                    self.slots.append((k, None))
                elif entry.local:
                    self.slots.append((k, n_large + small))
                    small += 1
                else:
                    self.slots.append((k, large))
                    large += 1

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    def follow_schedule(self) -> None:
        """Open the store ``schedule`` names for the current epoch (where a sample is planned,
        in whichever process plans it)."""
        if self.schedule is None or self._synced == self.epoch:
            return
        epoch = self.epoch
        self.store = self.schedule.open(epoch, self.store, verify=False)
        self.recipe.scene_only = self.store is None
        self._synced = epoch

    def windows(
        self,
        image_size: tuple[int, int],
        key: str | None,
        rng: np.random.Generator,
        box: int | None = None,
    ) -> list[CropWindow | None]:
        """One window per slot (``None`` for solo-learn's own crops), for an image of
        ``image_size`` (width, height) whose proposals are stored under ``key``; ``box``: cut
        the object-aware views from the image's ``box``-th best box only (per-box sampling)."""
        self.follow_schedule()
        if self.schedule is not None and self.recipe.scene_only:
            self.warmup.add("samples")
        boxes = scores = size = None
        if self.store is not None and key is not None:
            props = self.store.get(key)  # the recipe rescales, or refuses another aspect ratio
            if props is not None:
                if box is not None:
                    from ...engine.datasets import ranked_box

                    props = ranked_box(props, box, self.recipe.choice)
                boxes, scores, size = props.boxes, props.scores, props.image_size
        planned = self.recipe(image_size, boxes, scores, rng=rng, key=key, boxes_size=size)
        return [None if pos is None else planned[pos] for _, pos in self.slots]


class ObjectAwareTransform:
    """solo-learn's ``FullTransformPipeline`` with object-aware crops.

    Input to this transform:
        one PIL image (upright RGB), its key (path relative to the proposal root), its
        dataset index and, with per-box sampling, the rank of the sample's box.

    Output of this transform:
        a list of ``sum(num_crops)`` float tensors ``(3, crop_size, crop_size)``, in solo-learn's
        order: entry by entry, ``num_crops`` views each, exactly as ``FullTransformPipeline``
        returns them, so solo-learn's large/small crop counting holds.

    Applies the following:
        - once per sample: the proposal, drawn among the image's ``top_k`` best usable boxes
          (shared by every object-aware view, unless ``proposal_per_view``)
        - per object-aware entry and crop: the entry's policy draws a window (inside the box,
          the dilated box, or the scene), resampled once to ``crop_size`` (bicubic, as
          solo-learn's RandomResizedCrop); the object-aware large views are shuffled among
          their entries when ``shuffle_views``
        - per entry without ``crop``: solo-learn's own RandomResizedCrop
        - then the rest of the entry's solo-learn pipeline: colour jitter, grayscale, blur,
          solarisation, equalisation, flip, normalisation

    Images without a usable proposal get a scene crop instead, counted in
    ``transform.recipe.fallbacks`` across DataLoader workers.

    Args:
        config: the parsed recipe (:func:`parse_object_aware`).
        pipelines: solo-learn's per-entry pipelines (``build_transform_pipeline``'s output,
            one per ``augmentations`` entry).
        store: the proposal store (default: ``config.proposals``).
    """

    def __init__(
        self,
        config: ObjectAwareConfig,
        pipelines: Sequence[Callable],
        store: ProposalStore | None = None,
    ) -> None:
        if len(pipelines) != len(config.entries):
            raise SoloConfigError(
                f"augmentations: {len(config.entries)} entries but solo-learn built "
                f"{len(pipelines)} pipelines"
            )
        self.config = config
        self.planner = SlotPlanner(config, store)
        self.full: list[Callable] = list(pipelines)
        self.rest: list[Callable | None] = []
        for entry, pipeline in zip(config.entries, pipelines):
            if entry.object_aware:
                self.rest.append(_split_crop(pipeline, f"augmentations[{entry.index}]")[1])
            else:
                self.rest.append(None)

    @property
    def recipe(self) -> ViewRecipe:
        """The object-aware views' recipe; ``recipe.fallbacks`` counts across workers."""
        return self.planner.recipe

    @property
    def store(self) -> ProposalStore | None:
        return self.planner.store

    def __call__(
        self, image: Image.Image, key: str | None = None, index: int | None = None,
        box: int | None = None,
    ) -> list[torch.Tensor]:
        rng = process_rng() if index is None else sample_rng(None, index)
        windows = self.planner.windows(image.size, key, rng, box)
        out = []
        for (k, _), w in zip(self.planner.slots, windows):
            if w is None:
                out.append(self.full[k](image))
                continue
            view = image.resize((w.size[1], w.size[0]), Image.Resampling.BICUBIC, box=w.box)
            out.append(self.rest[k](view))
        return out

    def __repr__(self) -> str:
        lines = []
        for entry, full, rest in zip(self.config.entries, self.full, self.rest):
            if entry.object_aware:
                lines.append(f"{entry.num_crops} x [{entry.policy!r} -> {entry.crop_size} px, {rest}]")
            else:
                lines.append(f"{entry.num_crops} x [{full}]")
        return "\n".join(lines)
