"""View engines: crop windows -> view tensors.

CPU (:mod:`.cpu`, PIL in DataLoader workers) and GPU (:mod:`.gpu`, batched on the device after
transfer, Kornia kernels). The GPU engine's names are imported on first use, so ``import
objcrop_plugin`` never imports kornia.
"""

from typing import Any

from .cpu import IMAGE_EXTENSIONS, ObjectCropDataset, ViewEngine, list_images
from .decode import ImageDecodeError, load_rgb, open_image, to_rgb
from .photometric import Photometric, PhotometricParams, PhotometricSet, photometrics, to_tensor

# the GPU engine (objcrop_plugin.engine.gpu), loaded lazily
_GPU_NAMES = (
    "CanvasDataset",
    "DeviceViewLoader",
    "GPUViewEngine",
    "GPUViewsMixin",
    "apply_gpu_views",
    "collate_canvas",
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ObjectCropDataset",
    "Photometric",
    "PhotometricParams",
    "PhotometricSet",
    "ViewEngine",
    "list_images",
    "load_rgb",
    "open_image",
    "photometrics",
    "to_rgb",
    "to_tensor",
    *_GPU_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _GPU_NAMES:
        from . import gpu

        return getattr(gpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
