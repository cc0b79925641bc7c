"""The CPU view engine: image file + proposals -> object-aware view tensors, in DataLoader workers.

Per sample: read the header (size, EXIF orientation), plan the crop windows with the view recipe,
decode once (JPEGs at 1/2, 1/4 or 1/8 resolution when every view allows it), resample each
window straight to its output size (crop and antialiased resize in one PIL call, so each view
is resampled from the image exactly once), then the method's photometric augmentations and
normalisation.

Example:
    >>> from objcrop_plugin.engine import ViewEngine
    >>> engine = ViewEngine("obj_obj_dilate", photometrics="mocov2")  # doctest: +SKIP
    >>> views = engine.from_path("img.jpg", proposals=store.get("img.jpg"), rng=rng)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..images import OpenedImage, decode_planned
from ..policies import CropWindow, ViewRecipe, make_recipe
from ..proposals.store import Proposals
from .photometric import PhotometricSet, make_photometrics

__all__ = ["ViewEngine"]

#: An image's proposals: given, looked up from its displayed size, or none (scene crops).
ProposalSource = Proposals | Callable[[tuple[int, int]], Proposals | None] | None


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

    Input: an image path (or an :class:`~objcrop_plugin.images.OpenedImage`), its proposals
    (boxes in any resolution, with the image size they refer to), a
    ``numpy.random.Generator``.

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
        self.photometrics = make_photometrics(photometrics)
        self.draft = draft
        self.resample = resample

    def windows(
        self,
        image_size: tuple[int, int],
        proposals: ProposalSource,
        rng: np.random.Generator,
        key: str | None = None,
    ) -> list[CropWindow]:
        """Draw the crop windows of an image of ``image_size`` ``(width, height)``.

        ``proposals``: the image's :class:`Proposals` as stored, a function
        ``image_size -> Proposals | None`` (e.g. ``lambda size: store.get(key)``), or ``None``
        (scene crops). Proposals of the same image at another resolution are rescaled; of
        another aspect ratio (an EXIF orientation mismatch swaps width and height) they are
        not used: scene crops instead, counted in ``recipe.fallbacks`` as ``mismatched``.
        """
        props = proposals(image_size) if callable(proposals) else proposals
        if props is None:
            return self.recipe(image_size, None, None, rng=rng, key=key)
        return self.recipe(image_size, props.boxes, props.scores, rng=rng, key=key,
                           boxes_size=props.image_size)

    def render(
        self, image: Image.Image, windows: Sequence[CropWindow], rng: np.random.Generator,
        from_size: tuple[int, int] | None = None,
    ) -> list[torch.Tensor]:
        """Resample each window of ``image`` and apply photometrics.

        ``from_size`` is the size the windows refer to when ``image`` was decoded smaller.
        An image of another mode (L, P, RGBA, I;16, CMYK) is converted as the loaders do.
        """
        image = _rgb(image)
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
        image = _rgb(image)
        return [image.resize((w.size[1], w.size[0]), self.resample, box=w.box) for w in windows]

    def from_path(
        self,
        path: str | os.PathLike[str] | OpenedImage,
        proposals: ProposalSource,
        rng: np.random.Generator,
        key: str | None = None,
    ) -> list[torch.Tensor]:
        """Views of the image file at ``path`` (decoded once, possibly at reduced size)."""
        where = key or (path.path if isinstance(path, OpenedImage) else os.fspath(path))

        def plan(size: tuple[int, int]) -> tuple[list[CropWindow], list[Any], list[Any]]:
            windows = self.windows(size, proposals, rng, where)
            return windows, [w.box for w in windows], [w.size for w in windows]

        image, size, windows = decode_planned(path, plan, self.draft)
        return self.render(image, windows, rng, from_size=size)


def _rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB (as :func:`~objcrop_plugin.images.to_rgb` makes it), as it is when it is."""
    if image.mode == "RGB":
        return image
    from ..images import to_rgb

    return to_rgb(image)
