"""Object-aware views from an image and the boxes beside it, in torchvision transforms v2 style.

For data that already carries boxes (torchvision's ``CocoDetection`` wrapped with
``torchvision.datasets.wrap_dataset_for_transforms_v2``, your own detection dataset, lightly's
DetCon examples): no proposal store, the boxes travel with the image, as in lightly's
``MultiViewTransformV2``. Needs only torch and torchvision.

Example:
    >>> from torchvision import tv_tensors
    >>> from PIL import Image
    >>> image = Image.new("RGB", (96, 72))
    >>> boxes = tv_tensors.BoundingBoxes([[10, 10, 40, 50]], format="XYXY", canvas_size=(72, 96))
    >>> transform = ObjectAwareViews("obj_obj_dilate", size=32)
    >>> [tuple(v.shape) for v in transform(image, {"boxes": boxes})]
    [(3, 32, 32), (3, 32, 32)]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from . import boxes as box_ops
from ._random import process_rng
from .engine.cpu import ViewEngine
from .engine.photometric import PhotometricSet, make_photometrics
from .policies import CropWindow, NoProposalError, ViewRecipe
from .proposals.store import Proposals

__all__ = ["ObjectAwareViews"]

class ObjectAwareViews:
    """Object-aware views of an image from the boxes that come with it: ``transform(image, target)``.

    The transforms-v2 counterpart of the proposal-store paths (``ObjectCropDataset``, the
    lightly collate): the same view recipes, photometric presets and per-worker random
    streams, with the boxes taken from the sample instead of a store. Called like lightly's
    ``MultiViewTransformV2`` (``transform(*inputs) -> list of views``), so it goes where that
    goes: a dataset's ``transforms=`` argument (``wrap_dataset_for_transforms_v2`` calls
    ``transforms(image, target)``), or your own ``__getitem__``. The difference: each of
    lightly's views is the transformed input structure (image, boxes and masks), ours is a
    view tensor; the boxes are consumed (they choose where the views are cut) and not returned.

    Input to this transform:
        Positional inputs in any nesting of tuples, lists and dicts, as transforms v2 takes
        them, e.g. ``(image, target)`` or ``(image, boxes)``:

        - one image: a PIL image, or a tensor ``(C, H, W)`` (``tv_tensors.Image`` or a plain
          tensor; uint8 in [0, 255] or float in [0, 1], rounded to uint8; C = 1, 3 or 4,
          alpha dropped). A plain tensor counts as the image only when there is no PIL image
          or ``tv_tensors.Image``, and only the first one (as in transforms v2).
        - one ``tv_tensors.BoundingBoxes`` ``(K, 4)`` in any format (converted to xyxy;
          rotated boxes become their axis-aligned hull), usually ``target["boxes"]``. Boxes
          refer to their ``canvas_size``: an image of another size but the same aspect ratio
          gets them rescaled. A plain ``(K, 4)`` tensor under the key ``"boxes"`` is taken
          when ``box_format`` says its format. Masks, labels and anything else are ignored.

    Output of this transform:
        A list of float tensors ``(3, h_i, w_i)``, one per view, global views first, then
        local ones (``multi_crop``). A DataLoader's default collate turns a batch of them into
        a list of ``(B, 3, h_i, w_i)`` tensors, the format lightly's methods train on.

    Applies the following augmentations by default:
        - Obj-Obj+Dilate crops: both views from one box drawn among the first ``top_k`` = 10
          usable ones (in the order given: put the best first), one inside the box, one inside
          the box dilated by 10% of the image side, each a RandomResizedCrop (scale 0.2-1,
          ratio 3/4-4/3) resized to 224 px, in random order
        - MoCo-v2 photometrics: colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
          Gaussian blur (sigma 0.1-2) p=0.5, horizontal flip p=0.5
        - ImageNet normalisation

    An image without boxes (no ``BoundingBoxes``, an empty one, a COCO image without
    annotations, or only boxes under 2 px inside the image) raises
    :class:`~objcrop_plugin.policies.NoProposalError`, unless ``allow_scene_fallback=True``:
    then its object views become scene crops, counted in ``transform.recipe.fallbacks`` (as
    ``unusable``), across DataLoader workers.

    Randomness: one stream per process (:func:`objcrop_plugin._random.process_rng`), keyed by
    the DataLoader worker's torch seed and the DDP rank, so workers, epochs and ranks draw
    different views, reproducibly once ``torch.manual_seed`` is set. ``rng=`` (a
    ``numpy.random.Generator``, keyword only) replaces it for one call.

    Args:
        views: a view recipe name (``"obj_obj_dilate"``, ``"obj_obj"``, ``"obj_scene"``,
            ``"scene_scene"``, ``"multi_crop"``), a list of views, or a
            :class:`~objcrop_plugin.policies.ViewRecipe`.
        photometrics: ``"mocov2"``, ``"simclr"``, ``"byol"``, ``"vicreg"``, ``"none"`` or a
            :class:`~objcrop_plugin.engine.photometric.PhotometricSet`.
        normalize: ImageNet normalisation after the photometrics (for a preset name).
        allow_scene_fallback: scene crops (counted) instead of an error for images without
            usable boxes.
        seed: an integer mixed into every stream (``None``: the torch seed alone).
        box_format: the format (``"XYXY"``, ``"XYWH"``, ``"CXCYWH"``) of plain tensors under
            ``"boxes"``; ``None`` refuses them (wrap them in ``tv_tensors.BoundingBoxes``).
        resample: PIL filter for the crop-and-resize.
        recipe_kwargs: the recipe's parameters, e.g. ``size=224``, ``dilation=0.2``,
            ``top_k=10``; for ``multi_crop`` ``global_size``, ``local_size``, ``n_local``.

    Raises:
        NoProposalError: (on call) no usable box and no ``allow_scene_fallback``.
        TypeError: (on call) no image, several images or several ``BoundingBoxes``.
        ValueError: (on call) boxes for a canvas of another aspect ratio than the image.

    - [0]: Mishra et al., Object-aware Cropping for Self-Supervised Learning, TMLR 2022,
      https://arxiv.org/abs/2112.00319
    - [1]: torchvision, Getting started with transforms v2,
      https://pytorch.org/vision/main/auto_examples/transforms/plot_transforms_getting_started.html

    Examples:
        >>> from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
        >>> coco = CocoDetection("train2017", "instances_train2017.json")  # doctest: +SKIP
        >>> dataset = wrap_dataset_for_transforms_v2(coco, target_keys=("boxes",))  # doctest: +SKIP
        >>> dataset.transforms = ObjectAwareViews(photometrics="simclr")  # doctest: +SKIP
        >>> x0, x1 = dataset[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        views: Any = "obj_obj_dilate",
        photometrics: str | PhotometricSet = "mocov2",
        normalize: bool = True,
        allow_scene_fallback: bool = False,
        seed: int | None = None,
        box_format: str | tv_tensors.BoundingBoxFormat | None = None,
        resample: Image.Resampling = Image.Resampling.BILINEAR,
        **recipe_kwargs: Any,
    ) -> None:
        if seed is not None and int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        phot = photometrics if isinstance(photometrics, PhotometricSet) else make_photometrics(
            photometrics, normalize=normalize)
        self.engine = ViewEngine(views, phot, draft=False, resample=resample, **recipe_kwargs)
        self.allow_scene_fallback = bool(allow_scene_fallback)
        self.seed = None if seed is None else int(seed)
        self.box_format = None if box_format is None else _format(box_format)

    @property
    def recipe(self) -> ViewRecipe:
        """The view recipe; ``recipe.fallbacks`` counts scene-crop fallbacks of all workers."""
        return self.engine.recipe

    def __call__(self, *inputs: Any, rng: np.random.Generator | None = None) -> list[torch.Tensor]:
        """The views of the image in ``inputs``: ``(3, h_i, w_i)`` float tensors, globals first."""
        rng = process_rng(self.seed) if rng is None else rng
        image, windows = self._plan(inputs, rng)
        return self.engine.render(image, windows, rng)

    def windows(self, *inputs: Any, rng: np.random.Generator | None = None) -> list[CropWindow]:
        """The crop windows a call would cut, in pixels of the input image (no pixels touched)."""
        rng = process_rng(self.seed) if rng is None else rng
        return self._plan(inputs, rng)[1]

    def _plan(self, inputs: tuple[Any, ...], rng: np.random.Generator) -> tuple[Image.Image, list[CropWindow]]:
        found = _Found()
        self._walk(inputs, found)
        if found.image is None:
            found.image = found.plain
        if found.image is None:
            raise TypeError(
                "ObjectAwareViews found no image in its inputs (a PIL image or a (C, H, W) "
                "tensor). Fix: call it as transform(image, target) or transform(image, boxes)."
            )
        image = _to_pil(found.image)
        size = box_ops.ImageSize(*image.size)
        key = found.key
        proposals = None
        if self.recipe.needs_proposals:
            proposals = self._proposals(found.boxes, size, key)
        return image, self.engine.windows(size, proposals, rng, key)

    def _proposals(self, bboxes: Any, size: box_ops.ImageSize, key: str | None) -> Proposals:
        if bboxes is None:
            boxes, boxes_size, what = np.zeros((0, 4)), size, "no BoundingBoxes in its inputs"
        else:
            boxes, boxes_size = _xyxy(bboxes)
            mismatch = box_ops.size_mismatch(boxes_size, size)
            if mismatch is not None:
                raise ValueError(
                    f"{key or 'sample'}: its boxes refer to a {boxes_size[0]}x{boxes_size[1]} "
                    f"canvas but the image is {size[0]}x{size[1]}. Fix: resize or crop the image "
                    "and its boxes together (transforms v2 do), or set the boxes' canvas_size."
                )
            if boxes_size != size:
                boxes = box_ops.rescale(boxes, boxes_size, size)
            what = (f"none of its {len(boxes)} boxes is usable (at least 2 px inside the image)"
                    if len(boxes) else "its BoundingBoxes is empty")
        if not self.allow_scene_fallback and len(self.recipe.choice.candidates(size, boxes, None)) == 0:
            raise NoProposalError(
                f"{key or 'sample'}: {what}; recipe '{self.recipe.name}' cuts its views from "
                "boxes. Fix: pass its boxes as tv_tensors.BoundingBoxes (e.g. target['boxes'], "
                "which wrap_dataset_for_transforms_v2(dataset, target_keys=('boxes', ...)) "
                "adds), drop images without boxes, or pass allow_scene_fallback=True to cut "
                "scene crops for them (counted in transform.recipe.fallbacks)."
            )
        return Proposals(boxes, np.full(len(boxes), np.nan), size)

    def _walk(self, item: Any, found: _Found) -> None:
        if isinstance(item, tv_tensors.BoundingBoxes):
            found.add_boxes(item)
        elif isinstance(item, (Image.Image, tv_tensors.Image)):
            if found.image is not None:
                raise TypeError(
                    "ObjectAwareViews got more than one image in its inputs. Fix: pass one "
                    "image per call (transform(image, target))."
                )
            found.image = item
        elif isinstance(item, tv_tensors.TVTensor):
            pass  # masks, videos, keypoints: not used for cropping
        elif isinstance(item, torch.Tensor):
            if found.plain is None:
                found.plain = item
        elif isinstance(item, Mapping):
            if "image_id" in item and found.key is None:
                found.key = f"image_id={_scalar(item['image_id'])}"
            for k, value in item.items():
                if k == "boxes" and not isinstance(value, tv_tensors.BoundingBoxes):
                    found.add_boxes(self._wrap_plain(value, found))
                else:
                    self._walk(value, found)
        elif isinstance(item, (tuple, list)):
            for value in item:
                self._walk(value, found)

    def _wrap_plain(self, value: Any, found: _Found) -> tv_tensors.BoundingBoxes:
        if self.box_format is None:
            raise TypeError(
                f"target['boxes'] is a {type(value).__name__}, not tv_tensors.BoundingBoxes, so "
                "its format and canvas are unknown. Fix: wrap it, tv_tensors.BoundingBoxes(boxes, "
                "format='XYXY', canvas_size=(H, W)), or pass box_format='XYXY' (boxes in pixels "
                "of the image)."
            )
        image = found.image if found.image is not None else found.plain
        if image is None:
            raise TypeError("target['boxes'] came before the image. Fix: transform(image, target).")
        return tv_tensors.BoundingBoxes(
            torch.as_tensor(np.asarray(value, dtype=np.float64)).reshape(-1, 4),
            format=self.box_format, canvas_size=_canvas(image),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(views={self.recipe.name!r}, n_views={len(self.recipe.views)}, "
            f"photometrics={self.engine.photometrics.name!r}, "
            f"allow_scene_fallback={self.allow_scene_fallback}, seed={self.seed!r})"
        )


class _Found:
    """What :meth:`ObjectAwareViews._walk` collects from the inputs."""

    def __init__(self) -> None:
        self.image: Any = None
        self.plain: torch.Tensor | None = None
        self.boxes: tv_tensors.BoundingBoxes | None = None
        self.key: str | None = None

    def add_boxes(self, boxes: tv_tensors.BoundingBoxes) -> None:
        if self.boxes is not None:
            raise TypeError(
                "ObjectAwareViews got more than one BoundingBoxes in its inputs. Fix: pass the "
                "boxes of the image once (transform(image, {'boxes': boxes}))."
            )
        self.boxes = boxes


def _format(fmt: str | tv_tensors.BoundingBoxFormat) -> tv_tensors.BoundingBoxFormat:
    return fmt if isinstance(fmt, tv_tensors.BoundingBoxFormat) else tv_tensors.BoundingBoxFormat[
        str(fmt).upper()]


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _canvas(image: Any) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def _xyxy(bboxes: tv_tensors.BoundingBoxes) -> tuple[np.ndarray, box_ops.ImageSize]:
    """``(K, 4)`` float64 xyxy pixels and the ``(width, height)`` they refer to."""
    from torchvision.transforms.v2 import functional as F  # only when boxes need converting

    h, w = bboxes.canvas_size
    fmt = bboxes.format
    b = bboxes.to(torch.float64) if not torch.is_floating_point(bboxes) else bboxes
    if fmt.name.endswith("R") or fmt.name == "XYXYXYXY":  # rotated: the axis-aligned hull
        corners = F.convert_bounding_box_format(b, new_format=tv_tensors.BoundingBoxFormat.XYXYXYXY)
        c = corners.as_subclass(torch.Tensor).reshape(-1, 4, 2)
        xyxy = torch.cat([c.amin(dim=1), c.amax(dim=1)], dim=1)
    elif fmt != tv_tensors.BoundingBoxFormat.XYXY:
        xyxy = F.convert_bounding_box_format(b, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    else:
        xyxy = b
    arr = xyxy.as_subclass(torch.Tensor).detach().cpu().to(torch.float64).numpy().reshape(-1, 4)
    return arr, box_ops.ImageSize(int(w), int(h))


def _to_pil(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image or a ``(C, H, W)`` uint8 / float [0, 1] tensor."""
    if isinstance(image, Image.Image):
        from .images import to_rgb  # 16-bit and float modes scaled, not clipped

        return to_rgb(image)
    t = image.as_subclass(torch.Tensor).detach().cpu()
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise TypeError(
            f"ObjectAwareViews takes one image tensor (C, H, W) with C = 1, 3 or 4, got shape "
            f"{tuple(t.shape)}. Fix: apply it per sample (in the dataset), not to a batch."
        )
    if torch.is_floating_point(t):
        t = (t.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise TypeError(
            f"image tensors must be uint8 in [0, 255] or float in [0, 1], got {t.dtype}. Fix: "
            "torchvision.transforms.v2.ToDtype(torch.float32, scale=True) before this transform."
        )
    t = t[:3] if t.shape[0] == 4 else t.expand(3, -1, -1) if t.shape[0] == 1 else t
    return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy())
