"""Box geometry in pixels.

Every box in objcrop-plugin is a float ``xyxy`` box ``(x1, y1, x2, y2)`` in pixels of one image,
whose ``(width, height)`` travels beside it. ``x2``/``y2`` are exclusive edges, so a box covering
the whole of a ``W x H`` image is ``(0, 0, W, H)``. Functions take arrays of shape ``(K, 4)``
(or a single box of shape ``(4,)``) and return new float64 arrays; they never modify their input.

Example:
    >>> import numpy as np
    >>> from objcrop_plugin import boxes
    >>> b = np.array([[10.0, 10.0, 30.0, 50.0]])
    >>> boxes.dilate(b, (100, 200), 0.1).tolist()
    [[0.0, -10.0, 40.0, 70.0]]
    >>> boxes.clip(boxes.dilate(b, (100, 200), 0.1), (100, 200)).tolist()
    [[0.0, 0.0, 40.0, 70.0]]
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "MIN_WINDOW",
    "ImageSize",
    "ViewSize",
    "as_boxes",
    "clip",
    "dilate",
    "ensure_min_size",
    "rescale",
    "size_mismatch",
    "valid_mask",
    "area",
    "iou",
]

#: Smallest window side (pixels) a policy draws: :func:`~objcrop_plugin.policies.fit_window`
#: and the GPU engine's resampling grow thinner windows to it (about their centre, inside the
#: image), so no view is interpolated from a single row or column of pixels.
MIN_WINDOW = 2.0


class ImageSize(NamedTuple):
    """The size of an image, ``(width, height)`` in pixels: PIL's order, and the order of every
    ``image_size`` in this package (proposal stores, policies, boxes)."""

    width: int
    height: int


class ViewSize(NamedTuple):
    """The size of a view or canvas, ``(height, width)`` in pixels: torch's order, and the
    order of every view ``size`` and ``canvas`` in this package."""

    height: int
    width: int


Size = ImageSize | tuple[int, int]  # an image's (width, height)


def as_boxes(boxes: object) -> np.ndarray:
    """Return ``boxes`` as a float64 array of shape ``(K, 4)``.

    Accepts anything array-like with 4 values per box (a single box becomes ``(1, 4)``).

    Raises:
        ValueError: when the last dimension is not 4.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None, :]
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (K, 4) in xyxy order, got {arr.shape}")
    return arr


def _check_size(size: Size) -> tuple[float, float]:
    w, h = size
    if not (w > 0 and h > 0):
        raise ValueError(f"image size must be positive (width, height), got {size!r}")
    return float(w), float(h)


def area(boxes: object) -> np.ndarray:
    """Area of each box, ``(K,)``; inverted boxes have area 0."""
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def clip(boxes: object, size: Size) -> np.ndarray:
    """Clip boxes to the image ``(0, 0, width, height)``. NaN stays NaN; inf is clipped."""
    w, h = _check_size(size)
    b = as_boxes(boxes).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0.0, w)
    b[:, 1::2] = np.clip(b[:, 1::2], 0.0, h)
    return b


def valid_mask(boxes: object, size: Size | None = None, min_side: float = MIN_WINDOW) -> np.ndarray:
    """Which boxes are usable, ``(K,)`` bool.

    A box is usable when all four coordinates are finite, it is not inverted, and (after clipping
    to the image, when ``size`` is given) both sides are at least ``min_side`` pixels. A box that
    lies wholly outside the image clips to zero area and is therefore not usable.
    """
    b = as_boxes(boxes)
    finite = np.isfinite(b).all(axis=1)
    if size is not None:
        b = clip(np.where(finite[:, None], b, 0.0), size)
    with np.errstate(invalid="ignore"):
        ok = (b[:, 2] - b[:, 0] >= min_side) & (b[:, 3] - b[:, 1] >= min_side)
    return finite & ok


def dilate(
    boxes: object,
    size: Size,
    dilation: float = 0.1,
    mode: Literal["image", "coordinate"] = "image",
) -> np.ndarray:
    """Grow boxes, unclipped (clip afterwards if needed).

    Args:
        boxes: ``(K, 4)`` xyxy pixels.
        size: ``(width, height)`` of the image the boxes refer to.
        dilation: how much to grow.
        mode: ``"image"`` (default, the paper's text): each side moves out by ``dilation`` times
            the image side (``x`` by ``dilation * width``, ``y`` by ``dilation * height``).
            ``"coordinate"`` (the paper's released code, for exact reproduction): every
            coordinate grows by ``dilation`` times its own value, ``x1 -= x1 * d; x2 += x2 * d``,
            so boxes near the top-left corner grow less.

    Returns:
        ``(K, 4)`` float64.
    """
    w, h = _check_size(size)
    if not np.isfinite(dilation) or dilation < 0:
        raise ValueError(f"dilation must be a finite number >= 0, got {dilation!r}")
    b = as_boxes(boxes).copy()
    if mode == "image":
        b[:, 0] -= dilation * w
        b[:, 2] += dilation * w
        b[:, 1] -= dilation * h
        b[:, 3] += dilation * h
    elif mode == "coordinate":
        b[:, :2] -= b[:, :2] * dilation
        b[:, 2:] += b[:, 2:] * dilation
    else:
        raise ValueError(f"dilation mode must be 'image' or 'coordinate', got {mode!r}")
    return b


def ensure_min_size(
    boxes: object,
    min_size: float,
    grow: float | None = None,
) -> np.ndarray:
    """Make boxes at least ``min_size`` pixels wide and high (unclipped).

    Args:
        boxes: ``(K, 4)`` xyxy pixels.
        min_size: target minimum side in pixels.
        grow: ``None`` (default): a side shorter than ``min_size`` is widened symmetrically about
            its centre to exactly ``min_size``. A number: the released code's rule, a box whose
            width (height) is below ``min_size`` grows by ``grow`` pixels on each side
            horizontally (vertically), e.g. ``min_size=224, grow=112``.
    """
    b = as_boxes(boxes).copy()
    for lo, hi in ((0, 2), (1, 3)):
        side = b[:, hi] - b[:, lo]
        small = side < min_size
        if grow is None:
            pad = np.where(small, (min_size - side) / 2.0, 0.0)
        else:
            pad = np.where(small, float(grow), 0.0)
        b[:, lo] -= pad
        b[:, hi] += pad
    return b


def rescale(boxes: object, from_size: Size, to_size: Size) -> np.ndarray:
    """Map boxes from an image of ``from_size`` to the same image resized to ``to_size``."""
    fw, fh = _check_size(from_size)
    tw, th = _check_size(to_size)
    b = as_boxes(boxes).copy()
    b[:, 0::2] *= tw / fw
    b[:, 1::2] *= th / fh
    return b


def size_mismatch(from_size: Size, to_size: Size, rtol: float = 0.01) -> str | None:
    """Why boxes of an image of ``from_size`` cannot be rescaled to ``to_size``.

    Rescaling is right for the same image at another resolution: the same aspect ratio, up to
    ``rtol`` and the half pixel each side was rounded to. For another aspect ratio the boxes
    would land on other objects.

    Returns:
        ``None`` when the aspect ratios agree; ``"transposed"`` when ``from_size`` is
        ``to_size``'s transpose (width and height swapped: the boxes were computed on the image
        turned by 90 degrees, as a mismatch in applying the EXIF orientation gives);
        ``"aspect"`` for any other aspect ratio.

    Example:
        >>> size_mismatch((640, 480), (320, 240)), size_mismatch((640, 480), (480, 640))
        (None, 'transposed')
        >>> size_mismatch((640, 480), (640, 360))
        'aspect'
    """
    fw, fh = _check_size(from_size)
    tw, th = _check_size(to_size)

    def same(aw: float, ah: float, bw: float, bh: float) -> bool:
        tol = rtol + 0.5 / aw + 0.5 / ah + 0.5 / bw + 0.5 / bh
        return abs(np.log((aw / ah) / (bw / bh))) <= tol

    if same(fw, fh, tw, th):
        return None
    return "transposed" if same(fw, fh, th, tw) else "aspect"


def iou(a: object, b: object) -> np.ndarray:
    """Pairwise intersection over union, ``(Ka, Kb)``."""
    a, b = as_boxes(a), as_boxes(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)
