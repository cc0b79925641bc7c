"""View engines: crop windows -> view tensors (CPU in DataLoader workers)."""

from .cpu import IMAGE_EXTENSIONS, ObjectCropDataset, ViewEngine, list_images
from .decode import ImageDecodeError, load_rgb, open_image, to_rgb
from .photometric import Photometric, PhotometricParams, PhotometricSet, photometrics, to_tensor

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
]
