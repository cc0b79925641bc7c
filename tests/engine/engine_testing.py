"""Images and references shared by the engine tests (imported by name: this folder has no
``__init__``, so pytest puts it on ``sys.path``)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from objcrop_plugin.engine.photometric import to_tensor

#: the GPU tests' demo images (write_dataset) and smooth images
IMG_W, IMG_H = 128, 96
#: one 8-bit step of an image in [0, 1]
EPS = 1.0 / 255.0

#: the CPU tests' scene: a red square on blue
W, H = 160, 120
SQUARE = (100, 20, 140, 60)  # xyxy on the displayed image
RED = (255, 0, 0)

# raw = INVERSE[o](displayed) so that applying EXIF orientation o to raw shows `displayed`
INVERSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def displayed_scene() -> Image.Image:
    img = Image.new("RGB", (W, H), (0, 0, 255))
    img.paste(Image.new("RGB", (SQUARE[2] - SQUARE[0], SQUARE[3] - SQUARE[1]), RED), SQUARE[:2])
    return img


def save_oriented(path, orientation: int, fmt: str = "JPEG"):
    shown = displayed_scene()
    raw = shown if INVERSE[orientation] is None else shown.transpose(INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw.save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    # the fixture itself must mean what we think it means
    assert np.array_equal(
        np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[30, 120] > 200,
        np.array([True, False, False]),
    )
    return path


def smooth_image(seed: int = 0, size: tuple[int, int] = (IMG_W, IMG_H)) -> Image.Image:
    """A textured, colourful test image (random walk in both axes)."""
    rng = np.random.default_rng(seed)
    field = np.cumsum(np.cumsum(rng.normal(size=(size[1], size[0], 3)), 0), 1)
    field = (field - field.mean((0, 1))) / field.std((0, 1))
    return Image.fromarray(np.clip(field * 50 + 128, 0, 255).astype(np.uint8))


def pil_view(image: Image.Image, box, size) -> torch.Tensor:
    """The CPU engine's kernel: PIL's bilinear crop-and-resize, as a tensor in [0, 1]."""
    return to_tensor(image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box), None)
