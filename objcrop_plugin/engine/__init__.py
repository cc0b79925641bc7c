"""View engines: crop windows -> view tensors.

- CPU (:mod:`.cpu`): PIL crop-and-resize and photometrics (:mod:`.photometric`) per sample, in
  the DataLoader workers; dataset :class:`ObjectCropDataset`.
- GPU (:mod:`.gpu`): the workers decode onto canvases and plan the windows
  (:class:`CanvasDataset`); on the device, batched crop-and-resize as matrix products
  (:mod:`.resample`; Kornia's ``crop_by_transform_mat`` for ``antialias=False``, imported
  only then, so ``import objcrop_plugin`` never imports kornia) and batched photometrics
  (:mod:`.device_photometric`).

:mod:`.datasets` holds both datasets, the canvas collate function and the device loader.
"""

from .cpu import ViewEngine
from .datasets import CanvasDataset, DeviceViewLoader, ObjectCropDataset, collate_canvas
from .gpu import GPUViewEngine, GPUViewsMixin, apply_gpu_views
from .photometric import (
    Photometric,
    PhotometricParams,
    PhotometricSet,
    make_photometrics,
    to_tensor,
)

__all__ = [
    "CanvasDataset",
    "DeviceViewLoader",
    "GPUViewEngine",
    "GPUViewsMixin",
    "ObjectCropDataset",
    "Photometric",
    "PhotometricParams",
    "PhotometricSet",
    "ViewEngine",
    "apply_gpu_views",
    "collate_canvas",
    "make_photometrics",
    "to_tensor",
]
