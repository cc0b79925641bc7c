"""solo-learn's training dataset as module-level classes that hand each image and its key on.

solo-learn makes its dataset classes inside a factory function, so DataLoader workers started
with ``spawn`` (macOS, Windows, or ``multiprocessing_context="spawn"``) cannot pickle them;
these classes can: their items keep solo-learn's format ``(index, [views], target)``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ...files import normalize_key
from ...images import load_rgb, open_image
from ...proposals.store import ProposalStore
from ...stats import BadImages
from .errors import SoloConfigError
from .transform import ObjectAwareTransform

__all__ = ["IndexedDataset", "ObjectAwareSoloDataset", "SoloBadImages", "check_keys",
           "unwrap_solo_dataset"]

log = logging.getLogger("objcrop_plugin")


class SoloBadImages(BadImages):
    """:class:`~objcrop_plugin.stats.BadImages` whose error names the solo-learn recipe key,
    ``data.max_failure_rate``. Shared with DataLoader workers as its base class is."""

    FIX = ("`objcrop check DATA.TRAIN_PATH` lists them all), or raise data.max_failure_rate "
           "(++data.max_failure_rate=0.05 if the recipe lacks the key)")

    def rate_said(self) -> str:
        return f"data.max_failure_rate={self.max_failure_rate:g} ({self.max_failure_rate:.2%})"


class IndexedDataset(torch.utils.data.Dataset):
    """solo-learn's ``dataset_with_index`` as a module-level class: items ``(index, *item)``.

    solo-learn makes its dataset classes inside a factory function, so DataLoader workers
    started with ``spawn`` (macOS, Windows, or ``multiprocessing_context="spawn"``) cannot
    pickle them; this wrapper can. Attributes (``samples``, ``classes``, ...) are the wrapped
    dataset's.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return (index, *self.dataset[index])

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ObjectAwareSoloDataset(IndexedDataset):
    """solo-learn's training dataset with object-aware views: items ``(index, [views], target)``.

    Input to this dataset:
        the dataset solo-learn's ``prepare_datasets`` built (an ImageFolder for ``custom`` with
        labels, ``imagenet`` and ``imagenet100``; solo-learn's ``CustomDatasetWithoutLabels``
        for ``no_labels``), with its listing, ``data.fraction`` subset and targets.

    Output of this dataset:
        ``(index, views, target)`` exactly as solo-learn's: ``views`` a list of float tensors
        ``(3, crop_size, crop_size)`` (see :class:`ObjectAwareTransform`), ``target`` the
        class index (``-1`` without labels).

    Each image is decoded upright (EXIF orientation applied), since proposal boxes refer to
    the displayed image, and passed with its key (path relative to ``key_root``).

    An unreadable image (corrupt, truncated, gone) is skipped as in objcrop's own datasets
    (:func:`~objcrop_plugin.engine.datasets.first_readable`): item ``index`` is made from the
    next readable image with item ``index``'s random stream (and keeps ``index``), logged with
    its file and counted in ``dataset.bad`` across workers; above ``max_failure_rate`` of the
    images (``data.max_failure_rate``) :class:`~objcrop_plugin.stats.TooManyBadImagesError`
    stops the run.

    Per-box sampling (``sampling="per_box"``, the recipe's ``data.sampling``): item ``index``
    is one stored box of one image (:class:`~objcrop_plugin.engine.datasets.BoxIndex`: images
    in solo-learn's order, boxes best first, at most ``max_boxes_per_image`` each), its
    object-aware views cut from that box, its target its image's; ``len(dataset)`` is the
    number of boxes and images without boxes give no item. An unreadable image's items are
    replaced by the next readable item.

    Args:
        dataset: solo-learn's dataset (unwrapped from its index factory).
        transform: the object-aware transform.
        key_root: the folder store keys are relative to (``data.train_path`` by default).
        max_failure_rate: the fraction of unreadable images tolerated (default 1%; the
            recipe's ``data.max_failure_rate``).
        sampling: ``"per_image"`` (solo-learn's items) or ``"per_box"``.
        max_boxes_per_image: per-box sampling: at most this many boxes of each image.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        transform: ObjectAwareTransform,
        key_root: str | os.PathLike[str],
        max_failure_rate: float = 0.01,
        sampling: str = "per_image",
        max_boxes_per_image: int | None = None,
    ) -> None:
        super().__init__(dataset)
        drop_non_images(dataset)
        self.transform = transform
        self.planner = transform.planner
        self.key_root = os.path.abspath(os.fspath(key_root))
        self.bad = SoloBadImages(len(dataset), max_failure_rate)
        self.boxes = self._box_index(transform.store, sampling, max_boxes_per_image)

    def _box_index(self, store: ProposalStore | None, sampling: str, max_boxes: int | None) -> Any:
        """The :class:`~objcrop_plugin.engine.datasets.BoxIndex` of per-box sampling, or
        ``None`` (per-image sampling)."""
        if sampling == "per_image":
            if max_boxes is not None:
                raise SoloConfigError("data.max_boxes_per_image applies to data.sampling: "
                                      "per_box only. Fix: data.max_boxes_per_image=null")
            return None
        if sampling != "per_box":
            raise SoloConfigError(f"data.sampling: expected per_image or per_box, got {sampling!r}")
        if store is None:
            raise SoloConfigError(
                "data.proposals: data.sampling per_box makes one sample per stored box but there "
                "is no proposal store. Fix: ++data.proposals=STORE (`objcrop proposals build`)"
            )
        from ...engine.datasets import BoxIndex

        keys = [self.key(j) for j in range(len(self.dataset))]
        index = BoxIndex(store, keys, max_boxes, self.planner.recipe.choice)
        if not len(index):
            raise SoloConfigError(
                f"data.proposals: none of the {len(keys)} images (e.g. '{keys[0] if keys else ''}'"
                f", relative to {self.key_root}) has a box in {store.path}, so data.sampling "
                "per_box has nothing to sample. Fix: use the store built over data.train_path "
                "(or set data.proposals_root), or data.sampling=per_image"
            )
        if index.n_without:
            log.warning("objcrop: %d images have no proposals and are not sampled with per_box "
                        "sampling", index.n_without)
        return index

    def __len__(self) -> int:
        return len(self.boxes) if self.boxes is not None else len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch being trained, for online proposals (``crop.proposals``): the planner
        opens that epoch's store, in the DataLoader workers too."""
        self.planner.set_epoch(epoch)

    def image(self, index: int) -> int:
        """The image (index into solo-learn's listing) item ``index`` is made from."""
        return self.boxes.locate(index)[0] if self.boxes is not None else index

    def box(self, index: int) -> int | None:
        """Per-box sampling: the rank of item ``index``'s box among its image's (0: the best);
        else ``None``."""
        return self.boxes.locate(index)[1] if self.boxes is not None else None

    def item(self, index: int) -> tuple[str, int]:
        """``(path, target)`` of image ``index`` (see :meth:`image`), from solo-learn's
        listing."""
        ds = self.dataset
        samples = getattr(ds, "samples", None)
        if samples is not None:
            path, target = samples[index]
            target_transform = getattr(ds, "target_transform", None)
            if target_transform is not None:
                target = target_transform(target)
            return os.fspath(path), target
        images = getattr(ds, "images", None)
        if images is not None:
            return os.path.join(os.fspath(ds.root), images[index]), -1
        raise TypeError(
            f"{type(ds).__name__}: expected solo-learn's ImageFolder (samples) or "
            "CustomDatasetWithoutLabels (images) listing"
        )

    def key(self, index: int) -> str:
        """The store key of image ``index``."""
        return normalize_key(self.item(index)[0], self.key_root)

    def readable(self, index: int, make: Any) -> Any:
        """``make(path, key, target, stream, box)`` for item ``index``'s image (``box``: see
        :meth:`box`), or where it cannot be read the next item that can be made (see
        :func:`~objcrop_plugin.engine.datasets.first_readable`)."""
        from ...engine.datasets import first_readable

        def attempt(j: int, stream: int) -> Any:
            path, target = self.item(self.image(j))
            return make(path, normalize_key(path, self.key_root), target, stream, self.box(j))

        return first_readable(index, len(self), attempt, self.bad,
                              lambda j: self.item(self.image(j))[0], self.image)[0]

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], int]:
        def make(path: str, key: str, target: int, stream: int,
                 box: int | None) -> tuple[list[torch.Tensor], int]:
            image = load_rgb(open_image(path))
            return self.transform(image, key=key, index=stream, box=box), target

        views, target = self.readable(index, make)
        return index, views, target


def drop_non_images(dataset: Any) -> None:
    """solo-learn's listing without labels (``data.no_labels``) is ``os.listdir`` of the
    folder: its subfolders, hidden files (``.DS_Store``) and other files would each be read
    as an image, fail, and count against ``data.max_failure_rate``. They are left out of the
    listing (solo-learn itself would stop at the first), with a warning naming them: the
    images in the subfolders are not trained.

    Raises:
        SoloConfigError: nothing is left (class subfolders read without labels).
    """
    from ...images import IMAGE_EXTENSIONS

    images = getattr(dataset, "images", None)
    if not isinstance(images, list) or getattr(dataset, "samples", None) is not None:
        return
    root = os.fspath(dataset.root)
    folders, others, kept = [], [], []
    for name in images:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            folders.append(name)
        elif name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
            others.append(name)
        else:
            kept.append(name)
    if not folders and not others:
        return

    def named(names: list[str]) -> str:
        return ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")

    if not kept:
        raise SoloConfigError(
            f"data.no_labels: solo-learn lists only the files directly in {root}, and none of "
            f"them is an image (subfolders: {named(folders) or 'none'}; other files: "
            f"{named(others) or 'none'}). Fix: data.no_labels=False to read the subfolders as "
            "classes (solo-learn's ImageFolder), or point data.train_path at a folder of images"
        )
    dataset.images = kept
    if folders:
        log.warning(
            "objcrop: data.no_labels: solo-learn lists only the files directly in %s; the "
            "images in its subfolder(s) %s are not trained. Fix: move them into %s, or use the "
            "subfolders as classes (data.no_labels=False)", root, named(folders), root)
    if others:
        log.warning("objcrop: data.no_labels: %d file(s) in %s that are no images left out "
                    "(%s)", len(others), root, named(others))


def unwrap_solo_dataset(dataset: Any) -> Any:
    """solo-learn's ``DatasetWithIndex`` instance turned back into its (picklable) base class."""
    cls = type(dataset)
    if cls.__name__ == "DatasetWithIndex" and len(cls.__bases__) == 1:
        dataset.__class__ = cls.__bases__[0]
        return dataset
    return None


def _check_sizes(dataset: ObjectAwareSoloDataset, store: ProposalStore, probe: list[int]) -> None:
    """Refuse a store whose stored image sizes fit none of the images checked; warn when the
    images its build recorded changed (:func:`~objcrop_plugin.proposals.store.file_sample`)."""
    from ...proposals.store import sizes_fit_none, warn_if_files_changed

    warn_if_files_changed(store, dataset.key_root)
    none = sizes_fit_none(store, ((dataset.key(i), dataset.item(i)[0]) for i in probe))
    if none is not None:
        raise SoloConfigError(
            f"data.proposals: {store.path} was built for other images: the stored image size "
            f"has another aspect ratio than the image for {none}, so every sample would take "
            "scene crops. Fix: rebuild the store from data.train_path (`objcrop proposals "
            "build DATA.TRAIN_PATH --out STORE`)")


def check_keys(dataset: ObjectAwareSoloDataset, store: ProposalStore, strict: bool, n: int = 2000) -> float:
    """The fraction of (up to ``n`` evenly spaced) dataset images the store has proposals for.

    Raises:
        SoloConfigError: none of them has proposals (the store was built over another folder),
            or some have none in strict mode.
    """
    total = len(dataset.dataset)  # the images (per-box sampling has more items)
    if total == 0:
        return 1.0
    step = max(1, total // n)
    probe = list(range(0, total, step))[:n]
    keys = [dataset.key(i) for i in probe]
    missing = [k for k in keys if k not in store]
    _check_sizes(dataset, store, probe)
    if not missing:
        return 1.0
    found = 1.0 - len(missing) / len(keys)
    example_store = next(iter(store.keys()), "<empty store>")
    if found == 0.0:
        raise SoloConfigError(
            f"data.proposals: none of the {len(keys)} images checked has proposals in "
            f"{store.path}: the dataset's key '{missing[0]}' (path relative to "
            f"{dataset.key_root}) is not in the store, whose keys look like '{example_store}'. "
            "Fix: point data.train_path at the folder the store was built over, set "
            "++data.proposals_root=FOLDER (the folder its keys are relative to), or rebuild the store "
            "with `objcrop proposals build DATA.TRAIN_PATH --out STORE`"
        )
    if strict:
        raise SoloConfigError(
            f"data.proposals: {len(missing)} of {len(keys)} images checked have no proposals in "
            f"{store.path} (e.g. '{missing[0]}') and crop.strict is true. Fix: build proposals "
            "for every image, or set crop.strict=false to fall back to scene crops"
        )
    log.warning(
        "objcrop: %.1f%% of the images checked have no proposals in %s (e.g. '%s'); they get "
        "scene crops",
        100 * (1 - found), store.path, missing[0],
    )
    return found
