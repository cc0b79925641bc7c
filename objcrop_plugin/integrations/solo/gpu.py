"""``crop.engine: gpu``: workers decode onto canvases and plan windows; the device cuts the views.

The DataLoader workers (:class:`ObjectAwareCanvasDataset`) only decode each image onto a fixed
canvas and plan one crop window per solo-learn view; after the batch reaches the device, the
method's ``on_after_batch_transfer`` (a subclass of the solo-learn method class,
:func:`gpu_method`) cuts, resizes and augments every view there with objcrop-plugin's GPU
engine, and hands solo-learn its usual ``[index, views, targets]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..._random import sample_rng
from ...policies import ScenePolicy
from .config import ObjectAwareConfig, as_plain
from .datasets import IndexedDataset, ObjectAwareSoloDataset, SoloBadImages, drop_non_images
from .errors import SoloConfigError
from .transform import SlotPlanner

__all__ = [
    "GPUViews",
    "ObjectAwareCanvasDataset",
    "entry_photometric",
    "gpu_method",
    "gpu_views",
]


def entry_photometric(entry: Mapping[str, Any], dataset: str, where: str) -> Any:
    """The :class:`~objcrop_plugin.engine.photometric.Photometric` equal to the rest of a
    solo-learn entry's pipeline (after its crop): the same probabilities, ranges and order."""
    from ...engine.photometric import IMAGENET_MEAN, IMAGENET_STD, Photometric

    def node(name: str) -> Mapping[str, Any]:
        value = entry.get(name)
        return value if isinstance(value, Mapping) else {}

    def prob(name: str) -> float:
        return float(node(name).get("prob") or 0.0)

    if prob("equalization") > 0:
        raise SoloConfigError(
            f"{where}.equalization: crop.engine gpu has no histogram equalisation. Fix: "
            "equalization.prob=0, or crop.engine=cpu"
        )
    if dataset in ("imagenet", "imagenet100"):  # solo-learn's build_transform_pipeline rule
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = entry.get("mean", IMAGENET_MEAN), entry.get("std", IMAGENET_STD)
    jitter = node("color_jitter")
    return Photometric(
        hflip=prob("horizontal_flip"),
        jitter=prob("color_jitter"),
        brightness=float(jitter.get("brightness") or 0.0),
        contrast=float(jitter.get("contrast") or 0.0),
        saturation=float(jitter.get("saturation") or 0.0),
        hue=float(jitter.get("hue") or 0.0),
        grayscale=prob("grayscale"),
        blur=prob("gaussian_blur"),  # solo-learn's GaussianBlur: sigma uniform in (0.1, 2)
        solarize=prob("solarization"),  # solo-learn solarises after the blur, threshold 128
        solarize_before_blur=False,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(v) for v in std),
    )


@dataclass
class GPUViews:
    """``crop.engine: gpu``: what the workers plan and what the device renders.

    The workers (:class:`ObjectAwareCanvasDataset`) decode each image, shrink it onto a
    ``canvas``, and plan one window per solo-learn view: the object-aware ones with the
    :class:`SlotPlanner`, solo-learn's own RandomResizedCrops with a scene policy of the entry's
    ``rrc`` scale (torchvision's RandomResizedCrop distribution). After the transfer, the method's
    ``on_after_batch_transfer`` (see :func:`gpu_method`) has ``engine`` cut, resize and augment
    every view on the device, with each entry's photometrics.

    Attributes:
        planner: the object-aware slots' planner.
        scenes: entry index -> scene policy, for the entries without ``crop``.
        canvas: ``(height, width)`` of the canvases.
        engine: the :class:`~objcrop_plugin.engine.gpu.GPUViewEngine`, one view per slot.
    """

    planner: SlotPlanner
    scenes: dict[int, ScenePolicy]
    canvas: tuple[int, int]
    engine: Any


def gpu_views(cfg: Any, config: ObjectAwareConfig) -> GPUViews:
    """The GPU mode of a recipe (``crop.engine: gpu``).

    Raises:
        SoloConfigError: small entries before large ones,
            small entries with different photometrics, an entry without ``crop`` whose ``rrc``
            is disabled, or equalisation (which the GPU engine lacks).
    """
    from ...engine.gpu import GPUViewEngine
    from ...engine.photometric import PhotometricSet

    entries = as_plain(cfg)["augmentations"]
    globals_, locals_ = [], []
    sizes: list[tuple[int, int]] = []
    local: list[bool] = []
    scenes: dict[int, ScenePolicy] = {}
    seen_small = False
    for entry, raw in zip(config.entries, entries):
        where = f"augmentations[{entry.index}]"
        if entry.local:
            seen_small = True
        elif seen_small:
            raise SoloConfigError(
                f"{where}: crop.engine gpu needs the large entries before the small ones (as "
                "solo-learn's own crop counting does). Fix: reorder the augmentations list"
            )
        photometric = entry_photometric(raw, config.dataset, where)
        if not entry.object_aware:
            rrc = raw.get("rrc") if isinstance(raw.get("rrc"), Mapping) else {}
            if not rrc.get("enabled", False):
                raise SoloConfigError(
                    f"{where}.rrc.enabled: crop.engine gpu crops every view on the device and "
                    "needs a RandomResizedCrop for entries without 'crop'. Fix: rrc.enabled=True, "
                    "or crop.engine=cpu"
                )
            scale = (float(rrc.get("crop_min_scale", 0.08)), float(rrc.get("crop_max_scale", 1.0)))
            scenes[entry.index] = ScenePolicy(scale=scale)
        size = (entry.crop_size, entry.crop_size)
        for _ in range(entry.num_crops):
            sizes.append(size)
            local.append(entry.local)
            (locals_ if entry.local else globals_).append(photometric)
    if len(set(locals_)) > 1:
        raise SoloConfigError(
            "augmentations: crop.engine gpu gives every small view the same photometrics, but "
            "the small entries differ. Fix: the same color_jitter/grayscale/blur/solarization/"
            "flip on every small entry, or crop.engine=cpu"
        )
    photometrics = PhotometricSet(
        "solo-learn", tuple(globals_), locals_[0] if locals_ else globals_[0]
    )
    side = config.canvas or 2 * max(e.crop_size for e in config.entries)
    engine = GPUViewEngine(sizes, local=local, photometrics=photometrics)
    return GPUViews(SlotPlanner(config), scenes, (side, side), engine)


class ObjectAwareCanvasDataset(ObjectAwareSoloDataset):
    """solo-learn's training dataset for ``crop.engine: gpu``: canvases and crop windows.

    Input to this dataset: as :class:`ObjectAwareSoloDataset`.

    Per-box sampling (``sampling``, ``max_boxes_per_image``) as for
    :class:`ObjectAwareSoloDataset`.

    Output of this dataset: one dict per item, the GPU engine's canvas item
    (:data:`objcrop_plugin.engine.datasets.CANVAS_KEYS`) plus the dataset ``index`` that
    solo-learn's methods need: ``canvas`` ``uint8 (3, H, W)``, ``windows`` ``float32 (V, 4)``
    (one per solo-learn view, in solo-learn's order, canvas pixels), ``valid``, ``seed``,
    ``target``, ``key``, ``index``. The default collate function stacks them; the method's
    ``on_after_batch_transfer`` turns the batch into solo-learn's ``[index, views, target]``.
    Unreadable images are skipped as in :class:`ObjectAwareSoloDataset`.
    """

    def __init__(
        self, dataset: torch.utils.data.Dataset, gpu: GPUViews, key_root: str | os.PathLike[str],
        max_failure_rate: float = 0.01, sampling: str = "per_image",
        max_boxes_per_image: int | None = None,
    ) -> None:
        IndexedDataset.__init__(self, dataset)
        drop_non_images(dataset)
        self.planner = gpu.planner
        self.scenes = gpu.scenes
        self.canvas = gpu.canvas
        self.key_root = os.path.abspath(os.fspath(key_root))
        self.bad = SoloBadImages(len(dataset), max_failure_rate)
        self.boxes = self._box_index(self.planner.store, sampling, max_boxes_per_image)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        from ...engine.datasets import load_canvas_item

        def make(path: str, key: str, target: int, stream: int, box: int | None) -> dict[str, Any]:
            rng = sample_rng(None, stream)

            def plan(size: tuple[int, int]) -> list[Any]:
                planned = self.planner.windows(size, key, rng, box)
                return [
                    w.box if w is not None else self.scenes[k].sample(size, None, rng)
                    for (k, _), w in zip(self.planner.slots, planned)
                ]

            return load_canvas_item(path, plan, self.canvas, rng, target, key)

        item = self.readable(index, make)
        item["index"] = index
        return item


def gpu_method(base: type, engine: Any) -> type:
    """A subclass of the solo-learn method class ``base`` that cuts its views on the device.

    Only ``on_after_batch_transfer`` is overridden: a canvas batch (see
    :class:`ObjectAwareCanvasDataset`) becomes solo-learn's ``[index, views, targets]`` via
    ``engine`` (:class:`~objcrop_plugin.engine.gpu.GPUViewEngine`); every other batch
    (validation) passes through. The method's own code (losses, training step) is untouched.
    """
    from ...engine.datasets import is_canvas_batch

    class ObjectAwareGPUMethod(base):  # type: ignore[misc, valid-type]
        objcrop_engine = engine

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            batch = super().on_after_batch_transfer(batch, dataloader_idx)
            if not is_canvas_batch(batch):
                return batch
            views, targets, _keys = self.objcrop_engine.transform_batch(batch)
            return [batch["index"], views, targets]

    ObjectAwareGPUMethod.__name__ = ObjectAwareGPUMethod.__qualname__ = f"ObjectAwareGPU{base.__name__}"
    return ObjectAwareGPUMethod
