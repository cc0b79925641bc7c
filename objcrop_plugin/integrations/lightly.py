"""lightly adapter: object-aware views in lightly's batch format.

Two ways in, each a one-line change to a lightly training script:

- :class:`ObjectAwareCollate`: keep ``LightlyDataset(input_dir)`` (with ``transform=None``)
  and pass ``collate_fn=ObjectAwareCollate(proposals)`` to the DataLoader instead of the
  transform. Works with any dataset yielding ``(PIL image, target, filename)``.
- :class:`ObjectAwareDataset`: replace ``LightlyDataset(input_dir, transform=...)`` by
  ``ObjectAwareDataset(input_dir, proposals)``. Faster for folders of JPEGs: the image is
  decoded once, at 1/2, 1/4 or 1/8 resolution when every view allows it.

Either way the batches are exactly those of lightly's ``MultiViewCollate`` (or of the default
collate with a ``MultiViewTransform``): ``(views, targets, filenames)`` with ``views`` a list
of ``(B, C, H, W)`` tensors, global views first, so every lightly method trains unchanged.

Per-box sampling (one sample per stored box, as the paper's released code trains) is a matter
of what a dataset item is, so it is :class:`ObjectAwareDataset`'s:
``ObjectAwareDataset(input_dir, proposals, sampling="per_box")``; a collate function only sees
the items ``LightlyDataset`` gives it, one per image.

Example:
    >>> from lightly.data import LightlyDataset  # doctest: +SKIP
    >>> from torch.utils.data import DataLoader
    >>> from objcrop_plugin.lightly import ObjectAwareCollate
    >>> dataset = LightlyDataset("data/train")  # doctest: +SKIP
    >>> collate_fn = ObjectAwareCollate("data/train.objcrop", size=224)  # doctest: +SKIP
    >>> loader = DataLoader(dataset, batch_size=256, collate_fn=collate_fn)  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     x0, x1 = batch[0]

Reference:
    Mishra et al., "Object-aware Cropping for Self-Supervised Learning", TMLR 2022,
    https://arxiv.org/abs/2112.00319
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

try:
    from lightly.data import LightlyDataset, MultiViewCollate
except ImportError as _exc:  # lightly absent, or installed but broken
    raise ImportError(
        "objcrop_plugin.lightly needs the lightly package, which could not be imported "
        f"({type(_exc).__name__}: {_exc}). Fix: pip install \"objcrop-plugin[lightly]\""
    ) from _exc

from .._random import process_rng
from ..engine.cpu import ViewEngine
from ..engine.datasets import ObjectCropDataset, foreign_store
from ..engine.photometric import PhotometricSet
from ..files import normalize_key
from ..images import ImageDecodeError, opened_from
from ..policies import ViewRecipe
from ..proposals.online import OnlineKeys
from ..proposals.store import ProposalStore
from ..stats import BadImages

__all__ = ["ObjectAwareCollate", "ObjectAwareDataset", "online_proposals"]

log = logging.getLogger(__name__)


def _open_store(proposals: ProposalStore | str | os.PathLike[str] | None) -> ProposalStore | None:
    if proposals is None or isinstance(proposals, ProposalStore):
        return proposals
    return ProposalStore(proposals)


def _require_store(store: ProposalStore | None, recipe: ViewRecipe) -> None:
    if store is None and recipe.needs_proposals:
        raise ValueError(
            f"view recipe '{recipe.name}' crops from object proposals but no proposal store was "
            "given. Fix: pass proposals=PATH (see `objcrop proposals build`), or use "
            "views='scene_scene'."
        )


class ObjectAwareCollate:
    """Collate function that turns a batch of PIL images into object-aware views.

    A drop-in for lightly's ``MultiViewCollate`` + ``MultiViewTransform``: the dataset yields
    undecorated images (``LightlyDataset(input_dir, transform=None)``), and this function cuts
    each image's views from its object proposals (Obj-Obj+Dilate by default), then applies the
    method's photometric augmentations and ImageNet normalisation.

    Input to this collate function:
        A list of ``(image, target, filename)`` tuples, as ``LightlyDataset`` yields them:
        ``image`` a PIL image (loaded, or lazily opened: then JPEGs are decoded at reduced
        size when ``draft``), ``target`` an int, ``filename`` the path relative to the
        dataset root (the proposal store's key convention).

    Output of this collate function:
        ``(views, targets, filenames)``, exactly as ``MultiViewCollate`` returns them:
        ``views`` a list with one float tensor ``(B, 3, H_i, W_i)`` per view, global views
        first, then local ones; ``targets`` a ``torch.long`` tensor ``(B,)``; ``filenames``
        a list of ``B`` strings.

    Applies the following by default:
        - Obj-Obj+Dilate crops: both views from one proposal drawn among the image's 10 best,
          one inside the box, one inside the box dilated by 10% of the image side, each a
          RandomResizedCrop (scale 0.2-1, ratio 3/4-4/3) resized to 224 px, in random order
        - MoCo-v2 photometrics: colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
          Gaussian blur (sigma 0.1-2) p=0.5, horizontal flip p=0.5
        - ImageNet normalisation

    Images without a usable proposal (no entry in the store, or only unusable boxes) get scene
    crops instead, counted in ``collate_fn.recipe.fallbacks`` across all DataLoader workers.
    A store with an entry for none of the first 64 images a process sees (one built over
    another folder, or keys that need ``root`` or ``key_fn``) is refused with a ``ValueError``
    naming a key of each side: every view would be a scene crop, a baseline run.

    An image that cannot be decoded here (a lazily opened, corrupt or truncated file) is
    skipped: its place in the batch takes a copy of the next readable item of the batch
    (cyclically), so the batch keeps its shape; it is logged with its filename and counted in
    ``collate_fn.bad`` across workers, and above ``max_failure_rate`` of the items seen (judged
    from ``1 / max_failure_rate`` items on) :class:`~objcrop_plugin.stats.TooManyBadImagesError`
    stops the loop. ``LightlyDataset`` decodes each image in its own ``__getitem__``, so a file
    it cannot read fails there, before this function: use :class:`ObjectAwareDataset` (which
    skips it) or check the folder first with ``objcrop check``.
    Boxes refer to the displayed image: an image whose EXIF orientation tag is still set (as
    lightly's loader leaves it) is turned upright before cropping.

    Randomness comes from a stream per process (see
    :func:`objcrop_plugin._random.process_rng`): keyed by the DataLoader worker's torch seed
    and the DDP rank, so workers, epochs and ranks draw different crops, reproducibly once
    ``torch.manual_seed`` is set.

    Args:
        proposals: a :class:`~objcrop_plugin.proposals.ProposalStore` or the path to one
            (``None`` only for recipes without object views, e.g. ``"scene_scene"``).
        views: a view recipe name (``"obj_obj_dilate"``, ``"obj_scene"``, ``"obj_obj"``,
            ``"scene_scene"``, ``"multi_crop"``), a list of views, or a
            :class:`~objcrop_plugin.policies.ViewRecipe`.
        photometrics: ``"mocov2"``, ``"simclr"``, ``"byol"``, ``"vicreg"``, ``"none"`` or a
            :class:`~objcrop_plugin.engine.photometric.PhotometricSet`.
        root: folder the store's keys are relative to; absolute filenames are made relative
            to it. Not needed for ``LightlyDataset``, whose filenames already are.
        seed: an integer mixed into every stream (``None``: the torch seed alone).
        draft: decode lazily opened JPEGs at reduced resolution when no view needs more.
        key_fn: maps a filename to its store key, for datasets whose filenames are not the
            store's keys (e.g. ``lambda f: "train/" + f``; with the ``spawn`` start method it
            must be picklable, so a module-level function).
        max_failure_rate: the fraction of unreadable items tolerated (default 1%).
        recipe_kwargs: the recipe's parameters, e.g. ``size=224``, ``dilation=0.2``,
            ``top_k=10``, ``strict=True``; for ``multi_crop`` ``global_size``,
            ``local_size``, ``n_local``.

    Raises:
        ValueError: an object recipe without a proposal store, or a negative seed.
        FileNotFoundError, StoreFormatError: the store cannot be opened.

    - [0]: Object-aware Cropping for Self-Supervised Learning, TMLR 2022,
      https://arxiv.org/abs/2112.00319

    Examples:
        >>> from lightly.data import LightlyDataset  # doctest: +SKIP
        >>> dataset = LightlyDataset("data/train")  # doctest: +SKIP
        >>> collate_fn = ObjectAwareCollate("data/train.objcrop", size=224)  # doctest: +SKIP
        >>> views, targets, filenames = collate_fn([dataset[0], dataset[1]])  # doctest: +SKIP
        >>> [v.shape for v in views]  # doctest: +SKIP
        [torch.Size([2, 3, 224, 224]), torch.Size([2, 3, 224, 224])]
    """

    def __init__(
        self,
        proposals: ProposalStore | str | os.PathLike[str] | None,
        views: Any = "obj_obj_dilate",
        photometrics: str | PhotometricSet = "mocov2",
        root: str | os.PathLike[str] | None = None,
        seed: int | None = None,
        draft: bool = True,
        key_fn: Callable[[str], str] | None = None,
        max_failure_rate: float = 0.01,
        **recipe_kwargs: Any,
    ) -> None:
        if seed is not None and int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        per_dataset = sorted({"sampling", "max_boxes_per_image", "epoch_length"} & set(recipe_kwargs))
        if per_dataset:
            raise TypeError(
                f"ObjectAwareCollate got {', '.join(per_dataset)}: what a sample is belongs to "
                "the dataset, and LightlyDataset yields one item per image. Fix: "
                "ObjectAwareDataset(input_dir, proposals, sampling='per_box') (one item per "
                "stored box) with lightly's default collate"
            )
        self.engine = ViewEngine(views, photometrics, draft, **recipe_kwargs)
        self.store = _open_store(proposals)
        _require_store(self.store, self.engine.recipe)
        self.root = None if root is None else os.path.abspath(os.fspath(root))
        self.seed = None if seed is None else int(seed)
        self.key_fn = key_fn
        self.bad = BadImages(None, max_failure_rate)
        self._collate = MultiViewCollate()
        # keys looked up, none in the store so far (None once one was: see _check_key)
        self._unmatched: list[str] | None = []

    @property
    def recipe(self) -> ViewRecipe:
        """The view recipe; ``recipe.fallbacks`` counts scene-crop fallbacks of all workers."""
        return self.engine.recipe

    def key(self, filename: str | os.PathLike[str]) -> str:
        """The proposal store key of a dataset filename."""
        if self.key_fn is not None:
            return normalize_key(self.key_fn(os.fspath(filename)))
        name = os.fspath(filename)
        if self.root is not None and os.path.isabs(name):
            return normalize_key(name, self.root)
        return normalize_key(name)

    def views(self, image: Image.Image, key: str, rng: Any) -> list[torch.Tensor]:
        """The views of one image: ``(3, h_i, w_i)`` float tensors, globals first."""
        # lightly's loader opens the file lazily and keeps the EXIF tag without applying it:
        # plan in displayed pixels, decode (draft mode if still lazy), resample each window once
        store = self.store
        proposals = (lambda _size: store.get(key)) if store is not None else None
        return self.engine.from_path(opened_from(image, key), proposals, rng, key)

    def __call__(
        self, batch: Sequence[tuple[Image.Image, int, str]]
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
        """Turns ``[(image, target, filename), ...]`` into ``(views, targets, filenames)``."""
        rng = process_rng(self.seed)
        items: list[Any] = []
        self.bad.seen(len(batch))
        for item in batch:
            try:
                image, target, filename = item
            except (TypeError, ValueError):
                raise TypeError(
                    "ObjectAwareCollate expects (image, target, filename) items as "
                    f"LightlyDataset yields them, got {type(item).__name__}. Fix: use "
                    "lightly.data.LightlyDataset(input_dir), or a dataset with that item format."
                ) from None
            if not isinstance(image, Image.Image):
                raise TypeError(
                    f"{filename}: ObjectAwareCollate needs a PIL image, got "
                    f"{type(image).__name__}. Fix: create the dataset with transform=None "
                    "(this collate function crops and augments the views itself)."
                )
            key = self.key(filename)
            self._check_key(key)
            try:
                items.append((self.views(image, key, rng), target, filename))
            except ImageDecodeError as exc:
                items.append(None)
                self.bad.record(None, str(filename), str(exc).split(": ", 1)[-1])
        readable = [k for k, it in enumerate(items) if it is not None]
        if not readable:
            raise ImageDecodeError(
                f"none of the {len(items)} images of the batch can be read (e.g. "
                f"{batch[0][2]}). Fix: `objcrop check DATA` lists unreadable images"
            )
        # an unreadable item's place: the next readable one, cyclically
        items = [it if it is not None else items[next((j for j in readable if j > k), readable[0])]
                 for k, it in enumerate(items)]
        return self._collate(items)

    #: images looked up, none in the store, after which the store is refused
    KEY_PROBE = 64

    def _check_key(self, key: str) -> None:
        """Refuse a store built over another folder: once :attr:`KEY_PROBE` images in a row
        (in this process) have no entry, every view would be a scene crop (a baseline run)."""
        unmatched = self._unmatched
        if unmatched is None or self.store is None or len(self.store) == 0:
            return
        if key in self.store:
            self._unmatched = None
            return
        unmatched.append(key)
        if len(unmatched) >= self.KEY_PROBE:
            root = self.root or "the dataset's folder"
            raise foreign_store(self.store, len(unmatched), unmatched[0], "in the batches so far",
                                 str(root))

    def __repr__(self) -> str:
        store = None if self.store is None else str(self.store.path)
        return (
            f"{type(self).__name__}(proposals={store!r}, views={self.recipe.name!r}, "
            f"n_views={len(self.recipe.views)}, seed={self.seed!r})"
        )


def _warn_left_out(root: str | os.PathLike[str], listed: int) -> None:
    """Warn when lightly's class-folder listing leaves out the images directly in ``root``."""
    from ..images import IMAGE_EXTENSIONS

    try:
        top = [e.name for e in os.scandir(root) if e.is_file()
               and e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")]
    except OSError:
        return
    if top:
        top.sort()
        shown = ", ".join(top[:3]) + (", ..." if len(top) > 3 else "")
        log.warning(
            "%s has subfolders, so LightlyDataset (and ObjectAwareDataset, which lists as it "
            "does) reads it as class folders: its %d image(s) directly in the folder (%s) are "
            "not in the dataset (%d images in the subfolders are). Fix: move them into a "
            "subfolder, pass filenames=[...], or use ObjectCropDataset / objcrop train, which "
            "list every image under the folder", root, len(top), shown, listed)


class ObjectAwareDataset(ObjectCropDataset):
    """A folder of images with object-aware views, item for item like ``LightlyDataset``.

    A drop-in for ``LightlyDataset(input_dir, transform=MultiViewTransform(...))``: the same
    images in the same order with the same targets and filenames (lightly's own folder listing
    is used), but each item's views are cut from the image's object proposals. The image is
    decoded once per item, JPEGs at reduced resolution when no view needs the full one, so
    this is faster than :class:`ObjectAwareCollate` on folders of files.

    Input to this dataset:
        An image folder as ``LightlyDataset`` reads it: images directly in ``root`` (target
        0), or in class subfolders (ImageFolder targets); a proposal store whose keys are the
        images' paths relative to ``root``.

    Output of this dataset:
        ``(views, target, filename)`` per item: ``views`` a list of float tensors
        ``(3, H_i, W_i)``, global views first; ``target`` an int; ``filename`` the path
        relative to ``root``. Lightly's default collate or ``MultiViewCollate`` batch it.

    Applies the following by default:
        - Obj-Obj+Dilate crops (see :class:`ObjectAwareCollate`)
        - MoCo-v2 photometrics and ImageNet normalisation

    Randomness: with ``seed=None`` each DataLoader worker's torch seed drives the crops (so
    they change every epoch); with an integer seed they depend only on ``(seed, epoch, index,
    DDP rank)``: then call ``dataset.set_epoch(epoch)`` before each epoch. Fallbacks to scene
    crops are counted in ``dataset.recipe.fallbacks`` across workers.

    Unreadable images (corrupt, truncated, gone) are skipped: the item is made from the next
    readable image, logged and counted in ``dataset.bad`` across workers, up to
    ``max_failure_rate`` (see :class:`~objcrop_plugin.engine.datasets.ObjectCropDataset`).

    Per-box sampling (``sampling="per_box"``), as the paper's released code trains: one item
    per stored box (at most ``max_boxes_per_image`` per image, the best first), the item's
    object views cut from its box, its target and filename its image's; images without boxes
    give no item. ``len(dataset)`` is then the number of boxes, so an epoch takes ~boxes per
    image times the steps. ``epoch_length="boxes"`` gives a scene-crop dataset
    (``views="scene_scene"``) as many samples, from the same store: matched compute.

    Args:
        root: the image folder (lightly's ``input_dir``).
        proposals: a :class:`~objcrop_plugin.proposals.ProposalStore` or a path to one
            (``None`` only for recipes without object views), or ``"online"``: the boxes
            come from :func:`online_proposals` (scene crops until its first store).
        views, photometrics, recipe_kwargs: as for :class:`ObjectAwareCollate`.
        seed: see above.
        draft: decode JPEGs at reduced resolution when no view needs more.
        filenames: only these files (paths relative to ``root``), as ``LightlyDataset``'s
            ``filenames`` argument.
        max_failure_rate: the fraction of unreadable images tolerated (default 1%).
        sampling: ``"per_image"`` (default: items are ``LightlyDataset``'s) or ``"per_box"``.
        max_boxes_per_image: per-box sampling: at most this many boxes of each image.
        epoch_length: ``"images"`` (default), ``"boxes"`` or an int: samples per epoch (see
            :class:`~objcrop_plugin.engine.datasets.FolderSource`).

    Raises:
        ValueError: ``root`` holds videos (lightly reads them frame by frame; use
            :class:`ObjectAwareCollate` with ``LightlyDataset``), no images, or an object
            recipe without a proposal store.

    - [0]: Object-aware Cropping for Self-Supervised Learning, TMLR 2022,
      https://arxiv.org/abs/2112.00319

    Examples:
        >>> from torch.utils.data import DataLoader
        >>> dataset = ObjectAwareDataset("data/train", "train.objcrop", size=224)  # doctest: +SKIP
        >>> views, target, filename = dataset[0]  # doctest: +SKIP
        >>> loader = DataLoader(dataset, batch_size=256, num_workers=8)  # doctest: +SKIP
        >>> for batch in loader:  # doctest: +SKIP
        ...     x0, x1 = batch[0]
        >>> per_box = ObjectAwareDataset("data/train", "train.objcrop", sampling="per_box",
        ...                              released_code=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        proposals: ProposalStore | str | os.PathLike[str] | None,
        views: Any = "obj_obj_dilate",
        photometrics: str | PhotometricSet = "mocov2",
        seed: int | None = None,
        draft: bool = True,
        filenames: Sequence[str] | None = None,
        max_failure_rate: float = 0.01,
        sampling: str = "per_image",
        max_boxes_per_image: int | None = None,
        epoch_length: str | int = "images",
        **recipe_kwargs: Any,
    ) -> None:
        # lightly's own listing, so order, targets and filenames are LightlyDataset's exactly
        # (its subfolder walk order and extensions differ from objcrop's list_images)
        listing = LightlyDataset(
            os.fspath(root), filenames=None if filenames is None else list(filenames)
        ).dataset
        samples = getattr(listing, "samples", None)
        if samples is None:
            raise ValueError(
                f"{root}: lightly reads this folder as {type(listing).__name__} (videos), not as "
                "a folder of images. Fix: use ObjectAwareCollate with "
                "lightly.data.LightlyDataset(input_dir)."
            )
        self.filenames = [os.path.relpath(path, listing.root) for path, _ in samples]
        self._targets = [int(target) for _, target in samples]
        if filenames is None and getattr(listing, "classes", None):
            _warn_left_out(root, len(self.filenames))
        if isinstance(proposals, str) and proposals == "online":
            # boxes from online_proposals(); until its first store, scene crops (no fallbacks)
            from ..policies import make_recipe

            views, recipe_kwargs = make_recipe(views, **recipe_kwargs), {}
            views.scene_only, proposals = True, None
        store = _open_store(proposals)
        keys = [normalize_key(f) for f in self.filenames]
        super().__init__(
            root,
            store,
            views,
            photometrics,
            draft,
            seed,
            keys=keys,
            max_failure_rate=max_failure_rate,
            sampling=sampling,
            max_boxes_per_image=max_boxes_per_image,
            epoch_length=epoch_length,
            **recipe_kwargs,
        )
        self.classes = list(getattr(listing, "classes", []))

    def target(self, index: int) -> int:
        return self._targets[self.source.image(index)]

    def item_name(self, index: int) -> str:
        return self.filenames[self.source.image(index)]

    def get_filenames(self) -> list[str]:
        """All filenames, as ``LightlyDataset.get_filenames``."""
        return list(self.filenames)


#: how online proposals' messages name :func:`online_proposals`' arguments
_ONLINE_KEYS = OnlineKeys(proposals="proposals", epochs="epochs", store="the dataset's proposals",
                          backbone="the LightningModule's backbone (network=...)",
                          accelerator="the Trainer's accelerator",
                          afresh="start afresh with another directory", elsewhere="")


def online_proposals(
    dataset: ObjectAwareDataset,
    directory: str | os.PathLike[str],
    epochs: int,
    proposals: Any = "online",
    network: Callable[[Any], torch.nn.Module] | None = None,
    workers: int = 0,
    echo: Callable[[str], None] = print,
) -> Any:
    """Online proposals for a lightly run trained with a Lightning ``Trainer``: heat-map boxes
    from the backbone being trained, refreshed as it learns (as ``objcrop train``'s
    ``crop.proposals``), for ``dataset``'s object-aware views.

    Returns a ``pytorch_lightning`` callback; train with ``callback.fit(trainer, model,
    loader, ckpt_path=None)`` in place of ``trainer.fit(model, loader, ckpt_path=None)``: it
    puts itself first among the trainer's callbacks (before the checkpoint callbacks), reads
    a resumed run's state from ``ckpt_path`` (a file, a URL, or Lightning's ``"last"``,
    ``"best"``, ``"hpc"``) and sets the dataset's epoch before Lightning starts. Before each refresh epoch
    the network (``network(module)``; default the module's ``backbone_momentum`` or
    ``momentum_backbone`` where it has one, else its ``backbone``: a timm model), in eval mode,
    computes boxes for every image of ``dataset`` and writes ``directory/epoch-NNNN.objcrop``
    atomically; the dataset (its DataLoader workers too) switches to it as the epoch starts.
    The checkpoints record the stores (SHA-256); a resumed run makes only the refreshes still
    due and refuses a store that is missing or changed. With DDP each rank computes its share
    and rank 0 merges them.

    A plain PyTorch loop (lightly's other examples) calls ``callback.before_epoch(epoch,
    model.backbone)`` before each epoch instead (the refresh due, then the dataset's epoch),
    keeps ``callback.state_dict()`` in its own checkpoint and, when it resumes, restores it
    with ``callback.load_state_dict(...)`` before the first ``before_epoch``.

    Args:
        dataset: an :class:`ObjectAwareDataset` (per-image sampling), made with
            ``proposals="online"`` (the warm-up's object views are scene crops) or with a
            store (it serves the warm-up).
        directory: where the stores go (one folder per run).
        epochs: the run's epochs (``Trainer(max_epochs=...)``): the default schedule is a
            tenth of them.
        proposals: ``"online"``, ``"initial"`` (one store from the initial weights, kept) or
            a mapping ``{method, warmup_epochs, every_epochs, params}`` (see
            :mod:`objcrop_plugin.train.online`).
        network: the LightningModule's network the boxes come from.
        workers: decode workers of a refresh.
        echo: where each refresh's line goes (its counts and time as a fraction of an epoch).

    Raises:
        ValueError: a bad ``proposals`` value, or a per-box dataset.

    Example:
        >>> dataset = ObjectAwareDataset("data/train", "online", size=224)  # doctest: +SKIP
        >>> online = online_proposals(dataset, "runs/simclr/proposals", epochs=100)  # doctest: +SKIP
        >>> trainer = pl.Trainer(max_epochs=100)  # doctest: +SKIP
        >>> online.fit(trainer, model, DataLoader(dataset, batch_size=256))  # doctest: +SKIP
        >>> for epoch in range(100):  # or a plain loop  # doctest: +SKIP
        ...     online.before_epoch(epoch, model.backbone)
        ...     for (x0, x1), _, _ in loader: ...
    """
    import pytorch_lightning as pl

    from ..proposals.online import OnlineSchedule, network_of, online_callback, online_settings

    keys = _ONLINE_KEYS
    store = dataset.store
    settings = online_settings(proposals, int(epochs), store is not None,
                               dataset.recipe.choice.top_k, ValueError, keys)
    if settings is None:
        raise ValueError("proposals: None is not online proposals; use 'online', 'initial' or "
                         "a mapping {method, warmup_epochs, every_epochs, params}")
    schedule = OnlineSchedule(os.fspath(directory), settings.warmup_epochs,
                              settings.every_epochs, None if store is None else str(store.path))
    dataset.source.schedule = schedule  # refuses per-box datasets
    return online_callback(settings, schedule, dataset.root, list(dataset.keys), workers=workers,
                           echo=echo, base=pl.Callback, error=ValueError, names=keys,
                           network=network or network_of, on_epoch_start=dataset.set_epoch)
