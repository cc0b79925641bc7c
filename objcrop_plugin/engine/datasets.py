"""Datasets for both engines: a folder of images with proposals, as views or as canvases.

Both datasets compose one :class:`FolderSource`: the images under a root (keys relative to it,
targets from class subfolders), the proposal store, and each index's random stream
``sample_rng(seed, index, epoch)``. They differ in what an item is:

- :class:`ObjectCropDataset` (the CPU engine): the views themselves, cut, resized and augmented
  in the DataLoader worker by :class:`~objcrop_plugin.engine.cpu.ViewEngine`;
- :class:`CanvasDataset` (the GPU engine's worker side): the image decoded (EXIF upright, JPEG
  draft mode when the canvas is much smaller than the image), shrunk to fit a fixed canvas
  keeping its aspect ratio (never enlarged) and padded with zeros, plus the crop windows the
  CPU engine would cut (the same stream, so the same windows) in canvas pixels and a
  per-sample photometric seed. :func:`collate_canvas` just stacks them, and
  :class:`DeviceViewLoader` hands the batches to a
  :class:`~objcrop_plugin.engine.gpu.GPUViewEngine` on the device (example in
  :mod:`objcrop_plugin.engine.gpu`).

What a sample is (both datasets, ``sampling`` and ``epoch_length``):

- ``sampling="per_image"`` (default): item ``i`` is image ``i``; its object views share one
  proposal drawn among the image's best (:class:`~objcrop_plugin.policies.ProposalChoice`).
- ``sampling="per_box"``: item ``i`` is one stored box of one image (:class:`BoxIndex`), as
  the paper's released code samples: an epoch visits every box once (~12 per OpenImages
  image), and the item's object views are cut from *its* box.
- ``epoch_length``: ``"images"`` / ``"boxes"`` / an int: an epoch of that many samples, the
  images (or boxes) cycled in a per-epoch random order. ``"boxes"`` gives a scene-crop run
  the steps of a per-box run on the same store: matched compute.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image

from .._random import SEED_HIGH, sample_rng
from ..boxes import valid_mask
from ..images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    OpenedImage,
    decode_planned,
    list_images,
    read_image,
    write_bad_list,
)
from ..policies import ProposalChoice, ViewRecipe
from ..proposals.store import Proposals, ProposalStore
from ..stats import BadImages, SharedEpoch, counts_held
from .cpu import ViewEngine
from .photometric import PhotometricSet

if TYPE_CHECKING:
    from .gpu import GPUViewEngine

__all__ = [
    "CANVAS_KEYS",
    "EPOCH_LENGTHS",
    "SAMPLINGS",
    "BoxIndex",
    "CanvasDataset",
    "DeviceViewLoader",
    "FolderSource",
    "ObjectCropDataset",
    "Sample",
    "canvas_item",
    "collate_canvas",
    "first_readable",
    "fit_to_canvas",
    "is_canvas_batch",
    "load_canvas_item",
    "ranked_box",
]

log = logging.getLogger("objcrop_plugin")

#: the fields of a canvas item and of a collated canvas batch
CANVAS_KEYS = ("canvas", "windows", "valid", "seed", "target", "key")

Box = Sequence[float]

#: what one item of a dataset is: an image, or one stored box of an image
SAMPLINGS = ("per_image", "per_box")
#: the named epoch lengths (an int is a length too)
EPOCH_LENGTHS = ("images", "boxes")


# ---------------------------------------------------------------------- per-box sampling

def _rank(scores: np.ndarray) -> np.ndarray:
    """Box order best first: by score, ties and NaN scores in stored order (NaN last), as
    :class:`~objcrop_plugin.policies.ProposalChoice` ranks."""
    s = np.asarray(scores, dtype=np.float64)
    return np.argsort(-np.where(np.isfinite(s), s, -np.inf), kind="stable")


def _usable_ranked(proposals: Proposals, choice: ProposalChoice | None = None) -> np.ndarray:
    """Indices of the usable boxes (:func:`~objcrop_plugin.boxes.valid_mask` in the stored
    image: finite, at least 2 px a side once clipped; and within ``choice``'s ``min_area`` /
    ``max_area`` when given, as the recipe would take them), best first."""
    order = _rank(proposals.scores)
    ok = (valid_mask(proposals.boxes, proposals.image_size) if choice is None
          else choice.usable(proposals.image_size, proposals.boxes))
    return order[ok[order]]


def ranked_box(proposals: Proposals, rank: int, choice: ProposalChoice | None = None) -> Proposals:
    """The image's ``rank``-th best usable box (0: the best) as proposals of one box.

    Input: an image's stored :class:`~objcrop_plugin.proposals.store.Proposals` (``K`` boxes);
    ``choice``: the recipe's box choice, whose area bounds decide which boxes are usable.
    Output: ``Proposals`` with boxes ``(1, 4)``, scores ``(1,)`` and the same image size, so a
    view recipe given it cuts every object view from that box.
    """
    b = int(_usable_ranked(proposals, choice)[rank])
    return Proposals(proposals.boxes[b : b + 1], proposals.scores[b : b + 1], proposals.image_size)


class BoxIndex:
    """The items of per-box sampling: every usable stored box of every image, one item each
    (a NaN box, one under 2 px a side or outside the image makes none, nor one outside the
    recipe's ``min_area`` / ``max_area`` when ``choice`` is given: the recipe could not cut
    its views from it).

    Items are in image order (the order of ``keys``), then box order: best first (by score,
    stored order where scores tie or are missing; a store ranked at build time keeps its
    order). Images without an entry or without boxes contribute no item.

    Args:
        store: the proposal store (fixed: the index is built once).
        keys: the images, as store keys.
        max_boxes_per_image: take at most the ``m`` best boxes of each image (``None``: all;
            per-box sampling's counterpart of the recipe's ``top_k``, which it does not read).
        choice: the recipe's :class:`~objcrop_plugin.policies.ProposalChoice` (its area
            bounds); ``None``: every valid box.

    Attributes:
        counts: ``int64 (N,)`` the number of items of each image.
        n_without: how many images have no box (and so no item).

    Example:
        >>> index = BoxIndex(store, ["a.jpg", "b.jpg"], max_boxes_per_image=2)  # doctest: +SKIP
        >>> len(index), index.locate(1)  # doctest: +SKIP
        (3, (0, 1))
    """

    def __init__(
        self, store: ProposalStore, keys: Sequence[str], max_boxes_per_image: int | None = None,
        choice: ProposalChoice | None = None,
    ) -> None:
        if max_boxes_per_image is not None and int(max_boxes_per_image) < 1:
            raise ValueError(
                f"max_boxes_per_image must be >= 1 or None, got {max_boxes_per_image!r}"
            )
        counts = np.zeros(len(keys), dtype=np.int64)
        for j, key in enumerate(keys):
            props = store.get(key)
            if props is not None:  # a box no view can be cut from makes no item
                counts[j] = len(_usable_ranked(props, choice))
        if max_boxes_per_image is not None:
            counts = np.minimum(counts, int(max_boxes_per_image))
        self.counts = counts
        self._ends = np.cumsum(counts)
        self.n_without = int((counts == 0).sum())

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def locate(self, index: int) -> tuple[int, int]:
        """``(image, rank)`` of item ``index``: the image's position in ``keys`` and the rank of
        the item's box among that image's boxes (0: the best)."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} boxes")
        j = int(np.searchsorted(self._ends, index, side="right"))
        return j, int(index - (self._ends[j] - self.counts[j]))


def check_store_keys(store: ProposalStore | None, keys: Sequence[str], root: Any,
                      n: int = 200) -> None:
    """Refuse a store that has none of (up to ``n`` evenly spaced) images of the folder: one
    built over another folder, whose views would all be scene crops (a baseline run)."""
    if store is None or not keys or len(store) == 0:
        return
    probe = keys[:: max(1, len(keys) // n)][:n]
    if not any(k in store for k in probe):
        raise foreign_store(store, len(probe), probe[0], f"under {root}", str(root))


def foreign_store(store: ProposalStore, n: int, key: str, where: str, root: str) -> ValueError:
    example = next(iter(store.keys()), "")
    return ValueError(
        f"proposals: none of the {n} images checked {where} has an entry in "
        f"{store.path}: the image key '{key}' (its path relative to the folder) is not "
        f"in the store, whose keys look like '{example}', so every view would be a scene "
        "crop. Fix: pass the folder the store was built over, or rebuild the store from "
        f"this one (`objcrop proposals build {root} --out STORE`)"
    )


# ---------------------------------------------------------------------- the shared folder

class Sample(NamedTuple):
    """What a dataset needs to make item ``index``: see :meth:`FolderSource.sample`."""

    key: str
    path: Path
    rng: np.random.Generator
    proposals: Callable[[tuple[int, int]], Proposals | None] | None


class FolderSource:
    """A folder of images as samples: keys, targets, proposals and per-sample random streams.

    Args:
        root: dataset root; keys (and proposal store keys) are paths relative to it.
        proposals: a :class:`ProposalStore` or a path to one; ``None`` for scene-only recipes.
        keys: the images to use (default: every image under ``root``).
        seed: ``None``: each worker's torch seed drives the streams (different every epoch);
            an int: they depend only on ``(seed, epoch, index, rank)``, reproducibly.
        recipe: the view recipe the samples are for; an object recipe without ``proposals``
            is refused here, before any worker starts.
        sampling: ``"per_image"`` (item ``i``: image ``i``) or ``"per_box"`` (item ``i``: one
            stored box, :class:`BoxIndex`; its object views are cut from that box). Per-box
            needs a fixed store: not with online proposals (``schedule``).
        max_boxes_per_image: per-box sampling (and ``epoch_length="boxes"``): at most the
            ``m`` best boxes of each image (``None``: all).
        epoch_length: samples per epoch: ``"images"`` (default: one per item, i.e. per image,
            or per box with per-box sampling), ``"boxes"`` (the number of boxes in
            ``proposals``, capped by ``max_boxes_per_image``: a scene run with the steps of
            a per-box run) or an int. Another length than the items' cycles them: sample
            ``k`` is item ``perm[k mod n]``, ``perm`` a random order per epoch from ``(seed,
            epoch)``, with sample ``k``'s own random stream (repeated visits crop anew). Call
            ``set_epoch`` every epoch: with persistent workers (or none) it is what changes
            the order, also with ``seed=None``.

    Attributes:
        root, store, keys, seed, epoch, sampling; ``classes``: the top-level subfolders when
        every image is in one (ImageFolder's and LightlyDataset's targets), else ``[]``;
        ``boxes``: the :class:`BoxIndex` of per-box sampling (else ``None``); ``n_boxes``: the
        number of boxes (capped) when a store was given, else ``None``.

    ``len(source)`` is the number of samples per epoch; :meth:`image` maps a sample to its
    image (index into ``keys``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        proposals: ProposalStore | str | os.PathLike[str] | None = None,
        keys: Sequence[str] | None = None,
        seed: int | None = None,
        recipe: ViewRecipe | None = None,
        sampling: str = "per_image",
        max_boxes_per_image: int | None = None,
        epoch_length: str | int = "images",
    ) -> None:
        self.root = Path(root)
        if proposals is not None and not isinstance(proposals, ProposalStore):
            proposals = ProposalStore(proposals)
        if (proposals is None and recipe is not None and recipe.needs_proposals
                and not recipe.scene_only):
            raise ValueError(
                f"view recipe '{recipe.name}' crops from object proposals but no "
                "proposal store was given. Fix: pass proposals=PATH (see `objcrop proposals "
                "build`), or use views='scene_scene'."
            )
        self.store = proposals
        self.keys = list(keys) if keys is not None else list_images(self.root)
        if not self.keys:
            raise ValueError(f"no images found under {self.root} (extensions {IMAGE_EXTENSIONS})")
        check_store_keys(proposals, self.keys, self.root)
        tops = sorted({k.split("/", 1)[0] for k in self.keys if "/" in k})
        flat = any("/" not in k for k in self.keys)
        self.classes: list[str] = [] if flat or not tops else tops
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self.seed = seed
        self._epoch = SharedEpoch(0)  # set_epoch reaches persistent workers too
        self.recipe = recipe
        self._schedule: Any = None
        self._synced: int | None = None
        self._plan_samples(sampling, max_boxes_per_image, epoch_length)

    def _plan_samples(self, sampling: str, max_boxes: int | None, epoch_length: str | int) -> None:
        """Per-box items and the epoch length (see the class docstring)."""
        if sampling not in SAMPLINGS:
            raise ValueError(
                f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}"
            )
        is_int = isinstance(epoch_length, (int, np.integer)) and not isinstance(epoch_length, bool)
        if not (is_int and int(epoch_length) >= 1) and epoch_length not in EPOCH_LENGTHS:
            raise ValueError(
                f"epoch_length must be 'images', 'boxes' or an integer >= 1, got {epoch_length!r}"
            )
        if (sampling == "per_box" and self.recipe is not None
                and self.recipe.choice.weighting != "uniform"):
            raise ValueError(
                f"weighting={self.recipe.choice.weighting!r} chooses among an image's boxes, but "
                "with sampling='per_box' each item is one box already. Fix: "
                "sampling='per_image', or weighting='uniform'"
            )
        self.sampling = sampling
        self.max_boxes_per_image = max_boxes
        self.epoch_length = epoch_length
        counted = sampling == "per_box" or epoch_length == "boxes"
        if counted and self.store is None:
            what = "sampling='per_box'" if sampling == "per_box" else "epoch_length='boxes'"
            raise ValueError(
                f"{what} needs a proposal store (its boxes are the samples, or are counted). "
                "Fix: pass proposals=PATH (see `objcrop proposals build`)"
            )
        self.boxes: BoxIndex | None = None
        self.n_boxes: int | None = None
        if counted:
            assert self.store is not None
            index = BoxIndex(self.store, self.keys, max_boxes,
                             None if self.recipe is None else self.recipe.choice)
            self.n_boxes = len(index)
            if not self.n_boxes:
                raise ValueError(
                    f"none of the {len(self.keys)} images under {self.root} (e.g. "
                    f"'{self.keys[0]}') has a box in {self.store.path}, so there is nothing to "
                    "sample per box. Fix: use the store built over this folder (keys are paths "
                    "relative to it), or sampling='per_image'"
                )
            if sampling == "per_box":
                self.boxes = index
                if index.n_without:
                    log.warning("objcrop: %d images have no proposals and are not sampled with "
                                "per_box sampling", index.n_without)
        self._n_items = len(self.boxes) if self.boxes is not None else len(self.keys)
        if epoch_length == "images":
            self._length = self._n_items
        elif epoch_length == "boxes":
            assert self.n_boxes is not None
            self._length = self.n_boxes
        else:
            self._length = int(epoch_length)
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def schedule(self) -> Any:
        """An :class:`~objcrop_plugin.train.online.OnlineSchedule`: the store follows the
        epoch (``None``: a fixed store). Refused with per-box sampling or
        ``epoch_length='boxes'``, whose samples are the fixed store's boxes."""
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Any) -> None:
        if schedule is not None and self.n_boxes is not None:
            what = "sampling='per_box'" if self.boxes is not None else "epoch_length='boxes'"
            raise ValueError(
                f"{what} needs a fixed proposal store, but online proposals change the store "
                "during training. Fix: sampling='per_image' and epoch_length='images' with "
                "online proposals, or a fixed store without them"
            )
        self._schedule = schedule

    def __len__(self) -> int:
        return self._length

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _item(self, index: int) -> int:
        """The item (image, or box with per-box sampling) sample ``index`` visits."""
        if self._length == self._n_items:
            return index
        if not 0 <= index < self._length:
            raise IndexError(f"sample {index} out of range for an epoch of {self._length}")
        base = self._order_seed()
        if self._order is None or self._order[0] != (base, self.epoch):
            # the same order in every worker and DDP rank: from (seed, epoch) only
            g = np.random.default_rng(np.random.SeedSequence([base, self.epoch, 0x65706F6368]))
            self._order = ((base, self.epoch), g.permutation(self._n_items))
        return int(self._order[1][index % self._n_items])

    def _order_seed(self) -> int:
        """What an epoch's order of items is drawn from besides the epoch: the seed, or with
        ``seed=None`` the DataLoader's base seed, which its workers share and which changes
        every epoch and run. Persistent workers keep theirs, and the main process has torch's
        seed: there only ``set_epoch`` (shared with the workers) changes the order, so call it
        every epoch (``objcrop train`` and the lightly callbacks do)."""
        if self.seed is not None:
            return int(self.seed)
        info = torch.utils.data.get_worker_info()
        base = info.seed - info.id if info is not None else torch.initial_seed()
        return int(base) & 0xFFFF_FFFF_FFFF_FFFF

    def image(self, index: int) -> int:
        """The image (index into ``keys``) sample ``index`` is made from."""
        item = self._item(index)
        return self.boxes.locate(item)[0] if self.boxes is not None else item

    def key(self, index: int) -> str:
        """The key of sample ``index``'s image."""
        return self.keys[self.image(index)]

    def follow_schedule(self) -> None:
        """Open the store that ``schedule`` names for the current epoch (online proposals: a
        new store after each refresh; before the first, the initial store or none, with
        scene crops). Runs when an item is made, in whichever process makes it: workers map
        the new file; the store is written before the epoch's first item is asked for."""
        if self.schedule is None or self._synced == self.epoch:
            return
        self.store = self.schedule.open(self.epoch, self.store)
        if self.recipe is not None:
            self.recipe.scene_only = self.store is None
        self._synced = self.epoch

    def target(self, index: int) -> int:
        """The index of sample ``index``'s image's class subfolder in ``classes`` (0 without
        classes)."""
        key = self.key(index)
        return self._class_index.get(key.split("/", 1)[0], 0) if self.classes else 0

    def sample(self, index: int, stream: int | None = None) -> Sample:
        """Sample ``index``'s key, file, random stream and proposal lookup (``None`` without a
        store): a function ``image_size -> Proposals | None`` giving the stored proposals (with
        per-box sampling: the sample's box alone), as :meth:`ViewEngine.windows
        <objcrop_plugin.engine.cpu.ViewEngine.windows>` takes it. ``stream``: draw from
        sample ``stream``'s stream instead (a replacement)."""
        item = self._item(index)
        self.follow_schedule()
        store = self.store
        j, rank = self.boxes.locate(item) if self.boxes is not None else (item, None)
        key = self.keys[j]

        def lookup(_size: tuple[int, int]) -> Proposals | None:
            props = store.get(key) if store is not None else None
            if props is None or rank is None:
                return props
            return ranked_box(props, rank, None if self.recipe is None else self.recipe.choice)

        rng = sample_rng(self.seed, index if stream is None else stream, self.epoch)
        return Sample(key, self.root / key, rng, lookup if store is not None else None)


def _from_source(name: str) -> property:
    """A dataset attribute that is its :class:`FolderSource`'s."""

    def get(self: Any) -> Any:
        return getattr(self.source, name)

    def set_(self: Any, value: Any) -> None:
        setattr(self.source, name, value)

    return property(get, set_, doc=f"``source.{name}`` (see :class:`FolderSource`)")


# ------------------------------------------------------------------------ the CPU engine

T = TypeVar("T")


def first_readable(
    index: int,
    n: int,
    make: Callable[[int, int], T],
    bad: BadImages,
    where: Callable[[int], str],
    image: Callable[[int], int] | None = None,
) -> tuple[T, int]:
    """``make(index, index)``, or where item ``index``'s image cannot be read, the next item
    that can be made.

    The rule every training dataset of the package follows for an unreadable image (corrupt,
    truncated, gone, not a regular file): count it in ``bad`` (which logs it with its file
    ``where(j)`` and raises :class:`~objcrop_plugin.stats.TooManyBadImagesError` above the
    failure rate) and serve ``make(j, index)`` for the first ``j`` of ``index + 1, index + 2,
    ...`` (mod ``n``) that reads, the second argument being the index whose random stream to
    draw from. The replacement depends only on which files read, so batch shapes hold and a
    resumed run sees the same samples.

    What making an item counts in a :class:`~objcrop_plugin.stats.FallbackCounter` (samples,
    scene-crop fallbacks) stands only for the item served: an attempt whose pixels fail to
    decode, after its crops were planned from the header, counts nothing
    (:func:`~objcrop_plugin.stats.counts_held`).

    ``image(j)``: the image item ``j`` is made from, when items are not images (per-box
    sampling: several items per image); an image counts once in ``bad`` under that index,
    and the other items of an image that failed are skipped without reading it again.

    Returns:
        ``(item, j)``: the item and the index of the item it was made from.

    Raises:
        IndexError: ``index`` outside ``[-n, n)`` (negative indices count from the end).
    """
    if not -n <= index < n:  # plain iteration (`for item in dataset`) ends here
        raise IndexError(f"index {index} out of range for a dataset of {n}")
    index %= n  # ds[-1]: the last item, with the last item's random stream
    failed: set[int] = set()
    for step in range(n):
        j = (index + step) % n
        img = j if image is None else image(j)
        if img in failed:
            continue
        try:
            with counts_held():  # a sample whose pixels fail to decode is not served
                return make(j, index), j
        except ImageDecodeError as exc:
            failed.add(img)
            bad.record(img, where(j), _reason(exc))
    raise ImageDecodeError(f"none of the {n} images can be read (e.g. {where(index)})")


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text


class _FolderDataset(torch.utils.data.Dataset):
    """What both datasets take from their :class:`FolderSource` (``self.source``): its
    attributes, length, targets and epoch; and the unreadable-image rule (:func:`first_readable`,
    counted in ``self.bad``)."""

    source: FolderSource
    bad: BadImages

    root = _from_source("root")
    store = _from_source("store")
    keys = _from_source("keys")
    classes = _from_source("classes")
    seed = _from_source("seed")
    epoch = _from_source("epoch")

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch when ``seed`` is set, so epochs get different crops."""
        self.source.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    sampling = _from_source("sampling")

    def target(self, index: int) -> int:
        return self.source.target(index)

    def _readable(self, index: int, make: Callable[[Sample, int], T]) -> tuple[T, int]:
        """``make(sample, j)`` for item ``index`` or its replacement ``j`` (unreadable images
        are counted per image in ``self.bad``)."""
        source = self.source
        return first_readable(
            index, len(source), lambda j, stream: make(source.sample(j, stream), j), self.bad,
            lambda j: str(self.root / source.key(j)), source.image,
        )

    def bad_images(self, indices: Sequence[int] | None = None) -> list[tuple[str, str, str]]:
        """``(key, path, reason)`` of every image found unreadable so far (in any worker;
        ``indices``: of these images instead); ``self.bad`` counts images (indices into
        ``keys``), whatever the sampling."""
        rows = []
        for i in self.bad.indices() if indices is None else indices:
            path = self.root / self.keys[i]
            try:
                read_image(path)
                reason = "could not be read during training (reads now)"
            except ImageDecodeError as exc:
                reason = _reason(exc)
            rows.append((self.keys[i], str(path), reason))
        return rows

    def write_bad_images(self, path: str | os.PathLike[str],
                         indices: Sequence[int] | None = None) -> int:
        """Write :meth:`bad_images` as a tab-separated list (``key, path, reason``) atomically
        when there are any, else remove an earlier list at ``path`` (it would contradict the
        run's counts); returns how many."""
        rows = self.bad_images(indices)
        if rows:
            write_bad_list(path, rows, ("key", "path", "reason"))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return len(rows)


class ObjectCropDataset(_FolderDataset):
    """A folder of images with object-aware views, host-library neutral.

    Each item is ``(views, target, key)``: ``views`` a list of tensors (globals first),
    ``target`` the index of the image's top-level subfolder when the images are in class
    subfolders (as torchvision's ImageFolder and lightly's LightlyDataset do), else 0, and
    ``key`` the path relative to ``root`` (the proposal store key).

    Args:
        root: dataset root; proposal keys are paths relative to it.
        proposals: a :class:`ProposalStore` or a path to one; ``None`` for scene-only recipes.
        views, photometrics, draft: see :class:`~objcrop_plugin.engine.cpu.ViewEngine`.
        seed: ``None``: each worker's torch seed drives the crops (different every epoch);
            an int: crops depend only on ``(seed, epoch, index, rank)``, reproducibly.
        keys: the images to use (default: every image under ``root``).
        max_failure_rate: unreadable images (corrupt, truncated, gone) are skipped: item ``i``
            is then made from the next image that reads (``i + 1``, ``i + 2``, ... mod ``N``)
            with item ``i``'s random stream, so batch shapes hold and runs stay reproducible;
            each is logged with its file and counted in ``dataset.bad`` across workers
            (:meth:`bad_images` lists them). Above this fraction of the images
            :class:`~objcrop_plugin.stats.TooManyBadImagesError` stops the run. With per-box
            sampling the next *item* that reads takes the place (the unreadable image's other
            boxes are skipped: the first box of the next readable image).
        sampling, max_boxes_per_image, epoch_length: what an item is and how many there are
            per epoch (see :class:`FolderSource`): ``sampling="per_box"`` makes one item per
            stored box, its object views cut from that box (the paper's released code).
        recipe_kwargs: parameters of the view recipe.

    With per-box sampling an item's ``target`` and ``key`` are its image's, and
    ``len(dataset)`` is the number of boxes.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        proposals: ProposalStore | str | os.PathLike[str] | None = None,
        views: Any = "obj_obj_dilate",
        photometrics: str | PhotometricSet = "mocov2",
        draft: bool = True,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
        max_failure_rate: float = 0.01,
        sampling: str = "per_image",
        max_boxes_per_image: int | None = None,
        epoch_length: str | int = "images",
        **recipe_kwargs: Any,
    ) -> None:
        self.engine = ViewEngine(views, photometrics, draft, **recipe_kwargs)
        self.source = FolderSource(root, proposals, keys, seed, self.engine.recipe, sampling,
                                   max_boxes_per_image, epoch_length)
        self.bad = BadImages(len(self.source.keys), max_failure_rate)

    @property
    def recipe(self) -> ViewRecipe:
        return self.engine.recipe

    def item_name(self, index: int) -> str:
        """The name item ``index`` carries: its image's key."""
        return self.source.key(index)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int, str]:
        def make(s: Sample, j: int) -> list[torch.Tensor]:
            return self.engine.from_path(s.path, s.proposals, s.rng, key=s.key)

        views, j = self._readable(index, make)
        return views, self.target(j), self.item_name(j)


# ------------------------------------------------------------------------ the GPU engine

def _canvas_size(canvas: int | Sequence[int] | None, recipe: ViewRecipe) -> tuple[int, int]:
    if canvas is None:
        return (2 * max(v.size[0] for v in recipe.views), 2 * max(v.size[1] for v in recipe.views))
    if isinstance(canvas, (int, np.integer)):
        h = w = int(canvas)
    else:
        try:
            h, w = (int(c) for c in canvas)
        except Exception as exc:
            raise ValueError(
                f"canvas must be an int or (height, width), got {canvas!r}"
            ) from exc
    if h < 2 or w < 2:
        raise ValueError(f"canvas must be at least 2 x 2 pixels, got {canvas!r}")
    return h, w


def _fitted_size(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """Size ``(w, h)`` of an image of ``size`` shrunk (never enlarged) to fit ``canvas (H, W)``."""
    w, h = size
    s = min(1.0, canvas[1] / w, canvas[0] / h)
    return max(1, min(canvas[1], round(w * s))), max(1, min(canvas[0], round(h * s)))


def fit_to_canvas(image: Image.Image, canvas: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Shrink an RGB image to fit ``canvas`` (height, width), keeping its aspect ratio; pad.

    Input: a PIL RGB image. Images that already fit are not resized.

    Output: a ``uint8`` tensor ``(3, H, W)``, the image at the top left, zeros elsewhere, and
    the valid region's ``(width, height)``.
    """
    nw, nh = _fitted_size(image.size, canvas)
    if (nw, nh) != image.size:
        # reducing_gap: a box pre-reduction for large factors, visually identical and faster
        image = image.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    out = torch.zeros((3, canvas[0], canvas[1]), dtype=torch.uint8)
    arr = np.array(image.convert("RGB"), dtype=np.uint8)  # writable: torch shares it
    out[:, :nh, :nw] = torch.from_numpy(arr).permute(2, 0, 1)
    return out, (nw, nh)


def canvas_item(
    image: Image.Image,
    image_size: tuple[int, int],
    boxes: Sequence[Box],
    canvas_size: tuple[int, int],
    rng: np.random.Generator,
    target: int,
    key: str,
) -> dict[str, Any]:
    """One worker-side item: ``image`` (possibly decoded smaller than ``image_size``) fitted
    into the canvas, ``boxes`` (xyxy in pixels of ``image_size``) mapped to canvas pixels, and
    a photometric seed drawn from ``rng``. The fields are :data:`CANVAS_KEYS`."""
    canvas, (nw, nh) = fit_to_canvas(image, canvas_size)
    sx, sy = nw / image_size[0], nh / image_size[1]
    windows = torch.tensor(
        [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes], dtype=torch.float32
    )
    return {
        "canvas": canvas,
        "windows": windows,
        "valid": torch.tensor([nw, nh], dtype=torch.int64),
        "seed": torch.tensor(int(rng.integers(0, SEED_HIGH)), dtype=torch.int64),
        "target": target,
        "key": key,
    }


def load_canvas_item(
    source: str | os.PathLike[str] | OpenedImage,
    plan: Callable[[tuple[int, int]], Sequence[Box]],
    canvas_size: tuple[int, int],
    rng: np.random.Generator,
    target: int,
    key: str,
    draft: bool = True,
) -> dict[str, Any]:
    """The canvas item of an image file: open, plan, decode as small as the canvas allows.

    ``plan(image_size)`` returns the crop windows (xyxy in pixels of the displayed image of
    ``image_size`` ``(width, height)``), drawn from ``rng`` before the photometric seed is, so
    the windows are those the CPU engine draws from the same stream. The decode walk is
    :func:`~objcrop_plugin.images.decode_planned`; the item is :func:`canvas_item`'s.
    """

    def plan_canvas(size: tuple[int, int]) -> tuple[Sequence[Box], list[Box], list[tuple[int, int]]]:
        fitted_w, fitted_h = _fitted_size(size, canvas_size)
        return plan(size), [(0, 0, *size)], [(fitted_h, fitted_w)]

    image, size, boxes = decode_planned(source, plan_canvas, draft)
    return canvas_item(image, size, boxes, canvas_size, rng, target, key)


class CanvasDataset(_FolderDataset):
    """A folder of images as fixed-size canvases plus planned crop windows, for the GPU engine.

    Input to this dataset:
        An image folder (targets from class subfolders as for :class:`ObjectCropDataset`) and
        a proposal store whose keys are paths relative to ``root``.

    Output of this dataset (one dict per item, see :data:`CANVAS_KEYS`):
        - ``canvas``: ``uint8 (3, H, W)``, the upright image shrunk to fit (never enlarged),
          at the top left, zero padding elsewhere;
        - ``windows``: ``float32 (V, 4)`` xyxy crop windows in canvas pixels, globals first:
          the CPU engine's windows for the same ``(seed, epoch, index)``, scaled to the canvas;
        - ``valid``: ``int64 (2,)`` width and height of the image inside the canvas;
        - ``seed``: ``int64 ()`` the sample's photometric seed (from the same generator);
        - ``target``: int; ``key``: the path relative to ``root``.

    Args:
        root, proposals, views, seed, keys, recipe_kwargs: as for :class:`ObjectCropDataset`.
        sampling, max_boxes_per_image, epoch_length: as for :class:`ObjectCropDataset`
            (per-box sampling: one item per stored box).
        canvas: ``(height, width)`` or one int; default twice the largest view side (448 for
            224-pixel views): large enough that global views rarely need more detail.
        draft: decode JPEGs at 1/2, 1/4 or 1/8 resolution when the canvas allows.
        max_failure_rate: unreadable images are skipped as in :class:`ObjectCropDataset`.

    Photometrics are applied on the device (:class:`~objcrop_plugin.engine.gpu.GPUViewEngine`,
    built with ``GPUViewEngine.from_recipe(dataset.recipe, ...)``), so there is no
    ``photometrics`` argument. Batch with :func:`collate_canvas`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        proposals: ProposalStore | str | os.PathLike[str] | None = None,
        views: Any = "obj_obj_dilate",
        canvas: int | Sequence[int] | None = None,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
        draft: bool = True,
        max_failure_rate: float = 0.01,
        sampling: str = "per_image",
        max_boxes_per_image: int | None = None,
        epoch_length: str | int = "images",
        **recipe_kwargs: Any,
    ) -> None:
        # plans the windows (ViewEngine.windows) exactly as the CPU engine; renders nothing
        self.planner = ViewEngine(views, "none", draft, **recipe_kwargs)
        self.source = FolderSource(root, proposals, keys, seed, self.planner.recipe, sampling,
                                   max_boxes_per_image, epoch_length)
        self.bad = BadImages(len(self.source.keys), max_failure_rate)
        self.canvas = _canvas_size(canvas, self.recipe)
        self.draft = draft

    @property
    def recipe(self) -> ViewRecipe:
        return self.planner.recipe

    def __getitem__(self, index: int) -> dict[str, Any]:
        def make(s: Sample, j: int) -> dict[str, Any]:
            def plan(size: tuple[int, int]) -> list[Box]:
                return [w.box for w in self.planner.windows(size, s.proposals, s.rng, s.key)]

            return load_canvas_item(s.path, plan, self.canvas, s.rng, self.target(j), s.key,
                                    self.draft)

        return self._readable(index, make)[0]


def is_canvas_batch(batch: Any) -> bool:
    """Whether ``batch`` is a collated canvas batch (a mapping with ``canvas`` and ``windows``)."""
    return isinstance(batch, Mapping) and "canvas" in batch and "windows" in batch


def collate_canvas(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack canvas items: a plain stack, cheap enough for the main process.

    Output: ``{"canvas": uint8 (B, 3, H, W), "windows": float32 (B, V, 4), "valid": int64
    (B, 2), "seed": int64 (B,), "target": int64 (B,), "key": list[str]}``.
    """
    if not items:
        raise ValueError("collate_canvas got an empty batch")
    first = items[0]
    if not is_canvas_batch(first):
        raise TypeError(
            f"collate_canvas expects CanvasDataset items (dicts with {CANVAS_KEYS}), got "
            f"{type(first).__name__}. Fix: use it only with objcrop_plugin.engine.gpu.CanvasDataset"
        )
    shapes = {tuple(it["canvas"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"canvases of different sizes in one batch: {sorted(shapes)}")
    # default_collate stacks straight into shared memory inside DataLoader workers
    return torch.utils.data.default_collate(list(items))


def _to_device(batch: Mapping[str, Any], device: torch.device, non_blocking: bool) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class DeviceViewLoader:
    """Wraps a DataLoader of canvas batches; yields ``(views, targets, filenames)`` on the device.

    A drop-in for the DataLoader in a plain PyTorch or lightly training loop: the loop body
    stays as it is, the views arrive as lightly's ``MultiViewCollate`` would give them, but
    cut and augmented on ``device``.

    Args:
        loader: a DataLoader over a :class:`CanvasDataset` with ``collate_fn=collate_canvas``
            (``pin_memory=True`` lets the copy to a GPU overlap with compute).
        engine: the :class:`~objcrop_plugin.engine.gpu.GPUViewEngine` (same recipe as the
            dataset).
        device: where the views are made (default: ``cuda`` when available, else ``cpu``).
        non_blocking: asynchronous host-to-device copies (effective with pinned memory).

    Example:
        >>> loader = DataLoader(CanvasDataset(root, store), batch_size=256, num_workers=8,
        ...                     collate_fn=collate_canvas, pin_memory=True)  # doctest: +SKIP
        >>> for views, targets, filenames in DeviceViewLoader(loader, engine):  # doctest: +SKIP
        ...     loss = model.training_step((views, targets, filenames), 0)
    """

    def __init__(
        self,
        loader: Any,
        engine: GPUViewEngine,
        device: torch.device | str | None = None,
        non_blocking: bool = True,
    ) -> None:
        self.loader = loader
        self.engine = engine
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.non_blocking = bool(non_blocking)

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch to the dataset and sampler that take one (seeded crops, DDP order)."""
        for obj in (self.dataset, getattr(self.loader, "sampler", None),
                    getattr(self.loader, "batch_sampler", None)):
            if obj is not None and callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list[str]]]:
        for batch in self.loader:
            if not is_canvas_batch(batch):
                raise TypeError(
                    f"DeviceViewLoader got a {type(batch).__name__} batch, not a canvas batch. "
                    "Fix: DataLoader(CanvasDataset(...), collate_fn=collate_canvas)"
                )
            yield self.engine.transform_batch(_to_device(batch, self.device, self.non_blocking))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self.engine!r}, device='{self.device}')"
