"""The CPU view engine: image file + proposals -> object-aware view tensors, in DataLoader workers.

Per sample: read the header (size, EXIF orientation), plan the crop windows with the view recipe,
decode once (JPEGs at 1/2, 1/4 or 1/8 resolution when every view allows it), resample each
window straight to its output size (crop and antialiased resize in one PIL call, so each view
is resampled from the image exactly once), then the method's photometric augmentations and
normalisation.

Example:
    >>> from objcrop_plugin.engine import ViewEngine
    >>> engine = ViewEngine("obj_obj_dilate", photometrics="mocov2")  # doctest: +SKIP
    >>> views = engine.from_path("img.jpg", proposals=store.lookup("img.jpg"), rng=rng)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .._random import sample_rng
from ..policies import CropWindow, ViewRecipe, make_recipe
from ..proposals.store import Proposals, ProposalStore, normalize_key
from .decode import OpenedImage, draft_factor, load_rgb, open_image
from .photometric import PhotometricSet
from .photometric import photometrics as photometrics_set

__all__ = ["IMAGE_EXTENSIONS", "ObjectCropDataset", "ViewEngine", "list_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")


@dataclass
class Planned:
    """A sample planned but not yet decoded: what ``ViewEngine.plan`` returns."""

    opened: OpenedImage
    windows: list[CropWindow]
    proposals: Proposals | None


class ViewEngine:
    """Turns an image and its proposals into the views of a recipe, on the CPU.

    Args:
        views: a view recipe, or anything :func:`~objcrop_plugin.policies.make_recipe` takes
            (a registered name such as ``"obj_obj_dilate"``, or a list of views).
        photometrics: preset name (``mocov2``, ``simclr``, ``byol``, ``vicreg``, ``none``) or a
            :class:`~objcrop_plugin.engine.photometric.PhotometricSet`.
        draft: decode JPEGs at reduced resolution when no view needs the full one.
        resample: PIL filter for the crop-and-resize (antialiased when downscaling).
        recipe_kwargs: parameters for ``views`` when it is a name.

    Input: an image path or PIL image, its proposals (boxes in any resolution, with the
    image size they refer to), a ``numpy.random.Generator``.

    Output: a list of float tensors ``(3, h_i, w_i)``, one per view, globals first.
    """

    def __init__(
        self,
        views: Any = "obj_obj_dilate",
        photometrics: str | PhotometricSet = "mocov2",
        draft: bool = True,
        resample: Image.Resampling = Image.Resampling.BILINEAR,
        **recipe_kwargs: Any,
    ) -> None:
        self.recipe: ViewRecipe = make_recipe(views, **recipe_kwargs)
        self.photometrics = photometrics_set(photometrics)
        self.draft = draft
        self.resample = resample

    def plan(
        self,
        opened: OpenedImage,
        proposals: Proposals | Callable[[tuple[int, int]], Proposals | None] | None,
        rng: np.random.Generator,
        key: str | None = None,
    ) -> Planned:
        """Draw the crop windows for an opened (not yet decoded) image."""
        props = proposals(opened.size) if callable(proposals) else proposals
        if props is not None and props.image_size != opened.size:
            props = props.rescaled(opened.size)
        if props is None:
            windows = self.recipe(opened.size, None, None, rng=rng, key=key or opened.path)
        else:
            windows = self.recipe(
                opened.size, props.boxes, props.scores, rng=rng, key=key or opened.path
            )
        return Planned(opened, windows, props)

    def render(
        self, image: Image.Image, windows: Sequence[CropWindow], rng: np.random.Generator,
        from_size: tuple[int, int] | None = None,
    ) -> list[torch.Tensor]:
        """Resample each window of ``image`` and apply photometrics.

        ``from_size`` is the size the windows refer to when ``image`` was decoded smaller.
        """
        sx = sy = 1.0
        if from_size is not None and from_size != image.size:
            sx, sy = image.size[0] / from_size[0], image.size[1] / from_size[1]
        out = []
        g = 0
        for w in windows:
            x1, y1, x2, y2 = w.box
            box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
            oh, ow = w.size
            view = image.resize((ow, oh), self.resample, box=box)
            phot = self.photometrics.for_view(g, w.local)
            if not w.local:
                g += 1
            out.append(phot(view, rng))
        return out

    def crops(self, image: Image.Image, windows: Sequence[CropWindow]) -> list[Image.Image]:
        """The resampled windows as PIL images, before photometrics (for pictures, tests)."""
        return [image.resize((w.size[1], w.size[0]), self.resample, box=w.box) for w in windows]

    def decode(self, planned: Planned) -> Image.Image:
        reduce = 1
        if self.draft and planned.opened.is_jpeg:
            reduce = draft_factor([w.box for w in planned.windows], [w.size for w in planned.windows])
        return load_rgb(planned.opened, reduce)

    def from_path(
        self,
        path: str | os.PathLike[str],
        proposals: Proposals | Callable[[tuple[int, int]], Proposals | None] | None,
        rng: np.random.Generator,
        key: str | None = None,
    ) -> list[torch.Tensor]:
        """Views of the image file at ``path`` (decoded once, possibly at reduced size)."""
        opened = open_image(path)
        try:
            planned = self.plan(opened, proposals, rng, key)
            image = self.decode(planned)  # PIL closes the file once the pixels are loaded
        except BaseException:
            opened.image.close()
            raise
        return self.render(image, planned.windows, rng, from_size=opened.size)

    def from_image(
        self,
        image: Image.Image,
        proposals: Proposals | None,
        rng: np.random.Generator,
        key: str | None = None,
    ) -> list[torch.Tensor]:
        """Views of an already decoded, upright PIL image (any mode)."""
        from .decode import to_rgb

        image = to_rgb(image)
        opened = OpenedImage(image, 1, image.size, key or "<image>")
        planned = self.plan(opened, proposals, rng, key)
        return self.render(image, planned.windows, rng)


def list_images(root: str | os.PathLike[str]) -> list[str]:
    """All image files under ``root``, as sorted keys (paths relative to ``root``, ``/``-separated)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    keys = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                keys.append(normalize_key(os.path.join(dirpath, name), root))
    keys.sort()
    return keys


class ObjectCropDataset(torch.utils.data.Dataset):
    """A folder of images with object-aware views, host-library neutral.

    Each item is ``(views, target, key)``: ``views`` a list of tensors (globals first),
    ``target`` the index of the image's top-level subfolder when the images are in class
    subfolders (as torchvision's ImageFolder and lightly's LightlyDataset do), else 0, and
    ``key`` the path relative to ``root`` (the proposal store key).

    Args:
        root: dataset root; proposal keys are paths relative to it.
        proposals: a :class:`ProposalStore` or a path to one; ``None`` for scene-only recipes.
        views, photometrics, draft: see :class:`ViewEngine`.
        seed: ``None``: each worker's torch seed drives the crops (different every epoch);
            an int: crops depend only on ``(seed, epoch, index, rank)``, reproducibly.
        keys: the images to use (default: every image under ``root``).
        recipe_kwargs: parameters of the view recipe.
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
        **recipe_kwargs: Any,
    ) -> None:
        self.root = Path(root)
        self.engine = ViewEngine(views, photometrics, draft, **recipe_kwargs)
        if proposals is not None and not isinstance(proposals, ProposalStore):
            proposals = ProposalStore(proposals)
        if proposals is None and self.engine.recipe.needs_proposals:
            raise ValueError(
                f"view recipe '{self.engine.recipe.name}' crops from object proposals but no "
                "proposal store was given. Fix: pass proposals=PATH (see `objcrop proposals "
                "build`), or use views='scene_scene'."
            )
        self.store = proposals
        self.keys = list(keys) if keys is not None else list_images(self.root)
        if not self.keys:
            raise ValueError(f"no images found under {self.root} (extensions {IMAGE_EXTENSIONS})")
        tops = sorted({k.split("/", 1)[0] for k in self.keys if "/" in k})
        flat = any("/" not in k for k in self.keys)
        self.classes = [] if flat or not tops else tops
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self.seed = seed
        self.epoch = 0

    @property
    def recipe(self) -> ViewRecipe:
        return self.engine.recipe

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch when ``seed`` is set, so epochs get different crops."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.keys)

    def target(self, index: int) -> int:
        key = self.keys[index]
        return self._class_index.get(key.split("/", 1)[0], 0) if self.classes else 0

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int, str]:
        key = self.keys[index]
        rng = sample_rng(self.seed, index, self.epoch)
        store = self.store
        proposals = (lambda size: store.lookup(key, size)) if store is not None else None
        views = self.engine.from_path(self.root / key, proposals, rng, key=key)
        return views, self.target(index), key
