"""The embedded demo dataset: deterministic scene-centric images with ground-truth boxes.

Each image is a miniature of COCO/OpenImages: several *small* objects (2-6 by default, each
box covering about 1-8% of the image) of :data:`CLASSES` on a cluttered, low-contrast
background, so that a random scene crop mostly sees background and an object crop sees an
object. Classes differ by **shape and texture**, not by colour alone: every object gets a
random colour (hue drawn near a class hue with a wide spread, random saturation and value),
rotation, aspect ratio and size, and a class-specific pattern:

========================  ============  ====================================================
class                     shape         texture
========================  ============  ====================================================
``disc``                  disc          shaded like a lit sphere
``ring``                  annulus       flat, background shows through the hole
``framed_square``         square        flat with a dark or light frame
``triangle``              triangle      linear gradient from apex to base
``cross``                 plus sign     flat, the centre square in a second tone
``star``                  5-point star  flat with a bright core
``striped_square``        square        two-tone stripes
``checker_disc``          disc          two-tone checkerboard
========================  ============  ====================================================

A second domain, ``domain="photo"`` (needs scikit-image), draws the same classes as flat
silhouettes (the pattern classes become cut-outs: a square frame, three bars, two opposite
quarter discs) in a random colour over the whole hue circle, sometimes outlined, with box
areas log-uniform over 0.3-15% of the image (COCO's small and medium objects), on random
crops of scikit-image's sample photos (:data:`PHOTO_IMAGES`): real, cluttered backgrounds,
and the class is the shape alone. The default ``"demo"`` domain is unchanged.

Conventions: sizes are ``(width, height)``; boxes are float32 ``xyxy`` pixels with exclusive
``x2``/``y2`` (the box of a 1-pixel object at column 3 is ``x1=3, x2=4``), tight around the
object's drawn pixels (anti-aliased edges included); labels are int64 ids into
:data:`CLASSES`. Every image is a pure function of ``(index, size, seed)`` (and the keyword
options): its random stream is ``SeedSequence([seed, index])``, so images do not depend on
the order or the process that renders them. The layout is drawn in relative units, so one
``(index, seed)`` shows the same scene at any resolution.

Example:
    >>> from objcrop_plugin.data.synthetic import CLASSES, render_scene, multi_hot
    >>> s = render_scene(3, size=(256, 192), seed=0)
    >>> s.image.size, s.boxes.shape[1], s.boxes.dtype.name, s.labels.dtype.name
    ((256, 192), 4, 'float32', 'int64')
    >>> multi_hot(s.labels).shape == (len(CLASSES),)
    True
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import math
import multiprocessing
import os
import re
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_write

__all__ = [
    "CLASSES",
    "DOMAINS",
    "GENERATOR_VERSION",
    "PHOTO_IMAGES",
    "SyntheticDataset",
    "SyntheticImage",
    "load_labels",
    "multi_hot",
    "render_scene",
    "write_dataset",
]

#: Class names; the index is the label id.
CLASSES: tuple[str, ...] = (
    "disc",
    "ring",
    "framed_square",
    "triangle",
    "cross",
    "star",
    "striped_square",
    "checker_disc",
)

#: Bumped whenever the rendering changes, so a dataset written by another version is not
#: mistaken for a complete one by :func:`write_dataset`.
GENERATOR_VERSION = 1

_MANIFEST = "synthetic.json"
_PARTIAL = ".synthetic.partial.json"
_LABELS = "labels.json"
_STORE = "proposals_gt.objcrop"
_IMAGE_NAME = re.compile(r"^\d{6}\.jpg$")
# temporary files of an interrupted write (ours, and the proposal store's)
_TEMP_NAME = re.compile(
    r"^\.(\d{6}\.jpg|labels\.json|synthetic\.json|\.synthetic\.partial\.json"
    r"|proposals_gt\.objcrop)\..+\.tmp$"
)

# Hue (fraction of the colour circle) around which each class draws its colour; with the
# default spread of 0.4 every hue is shared by about three classes, so colour is a weak cue.
_CLASS_HUES = np.arange(len(CLASSES)) / len(CLASSES)
_SUPERSAMPLE = 2  # anti-aliasing: objects are rasterised at 2x and box-filtered down


@dataclass(frozen=True)
class SyntheticImage:
    """One rendered scene.

    Attributes:
        key: path relative to the dataset root, e.g. ``"images/000012.jpg"``.
        image: RGB image of the requested ``(width, height)``.
        boxes: ``(K, 4)`` float32 ``xyxy`` pixels (exclusive ``x2``/``y2``), tight around the
            drawn pixels of each object, in drawing order (later objects may overlap earlier).
        labels: ``(K,)`` int64 class ids into :data:`CLASSES`.
    """

    key: str
    image: Image.Image
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class SyntheticDataset:
    """A dataset written by :func:`write_dataset`.

    Attributes:
        root: dataset root; ``keys`` are relative to it.
        image_dir: ``root / "images"``.
        labels_path: ``root / "labels.json"``.
        proposals_path: ``root / "proposals_gt.objcrop"``, the ground-truth boxes as a
            :class:`~objcrop_plugin.proposals.ProposalStore` (scores 1.0).
        keys: store keys, e.g. ``"images/000000.jpg"``, in index order.
        classes: class names, the index is the label id.
    """

    root: Path
    image_dir: Path
    labels_path: Path
    proposals_path: Path
    keys: list[str]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)


def image_key(index: int) -> str:
    """The store key of image ``index``: ``"images/{index:06d}.jpg"``."""
    return f"images/{index:06d}.jpg"


def multi_hot(labels: np.ndarray, num_classes: int = len(CLASSES)) -> np.ndarray:
    """Multi-hot vector of the class ids in ``labels``.

    Args:
        labels: ``(K,)`` integer class ids (repeats allowed, may be empty).
        num_classes: length of the output.

    Returns:
        ``(num_classes,)`` float32 with 1.0 where a class is present, else 0.0.

    Raises:
        ValueError: a label outside ``[0, num_classes)``.
    """
    ids = np.asarray(labels, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"class ids must lie in [0, {num_classes}), got {ids.tolist()}")
    out = np.zeros(num_classes, dtype=np.float32)
    out[ids] = 1.0
    return out


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _smooth_noise(
    rng: np.random.Generator, grid: tuple[int, int], size: tuple[int, int], resample: int
) -> np.ndarray:
    """``(H, W, 3)`` float32 noise in about [-1, 1], smooth at the scale of ``grid`` cells."""
    gw, gh = grid
    cells = rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8)
    up = Image.fromarray(cells, "RGB").resize(size, resample)
    return np.asarray(up, dtype=np.float32) * (2.0 / 255.0) - 1.0


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Cluttered, muted background: ``(H, W, 3)`` float32 in [0, 255].

    Everything in it is smooth at the pixel scale, so it is built at half resolution and
    upsampled once (the grain is added over the whole scene at the end).
    """
    w, h = size
    hw, hh = max(1, (w + 1) // 2), max(1, (h + 1) // 2)
    hs = math.sqrt(hw * hh)
    # muted two-colour linear gradient
    h0 = rng.random()
    c0 = _hsv(h0, rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.75))
    c1 = _hsv(h0 + rng.uniform(-0.25, 0.25), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.75))
    ang = rng.uniform(0, 2 * np.pi)
    xs = (np.arange(hw, dtype=np.float32) - hw / 2) / hs
    ys = (np.arange(hh, dtype=np.float32) - hh / 2) / hs
    t = np.clip(0.5 + math.cos(ang) * xs[None, :] + math.sin(ang) * ys[:, None], 0.0, 1.0)
    bg = c0 + (c1 - c0) * t[..., None]
    # large colour blotches and mid-scale mottling
    bg += rng.uniform(10, 22) * _smooth_noise(rng, (5, 4), (hw, hh), Image.BICUBIC)
    mid = (max(2, w // 24), max(2, h // 24))
    bg += rng.uniform(4, 9) * _smooth_noise(rng, mid, (hw, hh), Image.BILINEAR)
    mean = bg.reshape(-1, 3).mean(axis=0)
    base = Image.fromarray(np.clip(bg + 0.5, 0, 255).astype(np.uint8), "RGB")

    # low-contrast clutter (blobs, strokes, polygons, arcs), blended in so that it never
    # competes with the objects
    layer = base.copy()
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(30, 60))):
        fill = tuple(int(v) for v in np.clip(mean + rng.normal(0, 45, 3), 0, 255))
        kind = rng.integers(0, 4)
        cx, cy = rng.uniform(-0.05, 1.05) * hw, rng.uniform(-0.05, 1.05) * hh
        r = hs * math.exp(rng.uniform(math.log(0.01), math.log(0.12)))
        if kind == 0:  # blob
            a = rng.uniform(0.4, 1.0)
            draw.ellipse([cx - r, cy - r * a, cx + r, cy + r * a], fill=fill)
        elif kind == 1:  # stroke
            pts = [(cx, cy)]
            for _ in range(int(rng.integers(1, 4))):
                d = rng.uniform(0, 2 * np.pi)
                pts.append((pts[-1][0] + 2 * r * math.cos(d), pts[-1][1] + 2 * r * math.sin(d)))
            draw.line(pts, fill=fill, width=int(rng.integers(1, max(2, int(hs / 60)) + 1)))
        elif kind == 2:  # irregular polygon
            n = int(rng.integers(3, 7))
            angs = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = r * rng.uniform(0.5, 1.0, n)
            pts = [(cx + q * math.cos(p), cy + q * math.sin(p)) for p, q in zip(angs, rad)]
            draw.polygon(pts, fill=fill)
        else:  # arc
            a0 = rng.uniform(0, 360)
            draw.arc([cx - r, cy - r, cx + r, cy + r], a0, a0 + rng.uniform(60, 270),
                     fill=fill, width=int(rng.integers(1, max(2, int(hs / 50)) + 1)))
    mixed = Image.blend(base, layer, float(rng.uniform(0.3, 0.45)))
    return np.asarray(mixed.resize((w, h), Image.BILINEAR), dtype=np.float32)


def _shape_inside(cls: int, u: np.ndarray, v: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Boolean inside-mask of class ``cls`` at normalised coordinates (object radius 1)."""
    if cls in (0, 7):  # disc, checker disc
        return u * u + v * v <= 1.0
    if cls == 1:  # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= p["inner"] ** 2)
    if cls in (2, 6):  # squares
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if cls == 3:  # triangle, apex up, centroid at the origin, circumradius 1
        inside = v <= 0.5
        for ang in (np.deg2rad(210.0), np.deg2rad(330.0)):
            inside &= u * math.cos(ang) + v * math.sin(ang) <= 0.5
        return inside
    if cls == 4:  # plus sign
        au, av = np.abs(u), np.abs(v)
        arm = p["arm"]
        return ((au <= arm) & (av <= 0.95)) | ((av <= arm) & (au <= 0.95))
    if cls == 5:  # 5-point star, outer radius 1, a point straight up
        inner = p["inner"]
        sector = 2 * np.pi / 5
        phi = np.mod(np.arctan2(v, u) + np.pi / 2, sector)
        phi = np.minimum(phi, sector - phi)  # fold to [0, 36 deg]: 0 = a point
        r = np.sqrt(u * u + v * v)
        px, py = r * np.cos(phi), r * np.sin(phi)
        bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
        return (bx - 1.0) * py - by * (px - 1.0) >= 0.0
    raise ValueError(f"unknown class id {cls}")


def _second_tone(cls: int, u: np.ndarray, v: np.ndarray, p: dict[str, Any]) -> np.ndarray | None:
    """Boolean mask of the pattern's second tone (frame, centre, stripes, checks), or None."""
    if cls == 2:  # frame
        return np.maximum(np.abs(u), np.abs(v)) >= p["frame"]
    if cls == 4:  # centre square of the plus
        return (np.abs(u) <= p["arm"]) & (np.abs(v) <= p["arm"])
    if cls == 6:  # stripes
        return np.sin(np.pi * p["freq"] * (u + p["phase"])) < 0.0
    if cls == 7:  # checkerboard
        cell = p["cell"]
        return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
    return None


def _first_tone(
    cls: int, u: np.ndarray, v: np.ndarray, c1: np.ndarray, p: dict[str, Any]
) -> np.ndarray:
    """Colour of the first tone: ``(3,)`` when flat, else ``(S, S, 3)`` shading of ``c1``."""
    if cls == 0:  # lit sphere with a highlight
        z = np.sqrt(np.clip(1.0 - u * u - v * v, 0.0, 1.0))
        lx, ly, lz = p["light"]
        shade = np.clip(lx * u + ly * v + lz * z, 0.0, 1.0)
        return c1 * (0.3 + 0.75 * shade)[..., None] + (90.0 * shade**12)[..., None]
    if cls == 3:  # apex-to-base gradient
        t = np.clip((v + 1.0) / 1.5, 0.0, 1.0)
        t = 0.45 + 0.7 * t if p["flip"] else 1.15 - 0.7 * t
        return c1 * t[..., None]
    if cls == 5:  # bright core
        core = np.clip(1.0 - np.sqrt(u * u + v * v) / 0.45, 0.0, 1.0)
        return c1 + (255.0 - c1) * (0.7 * core)[..., None]
    return c1


def _down(mask: np.ndarray) -> np.ndarray:
    """Mean over 2x2 blocks of a ``(2S, 2S)`` boolean mask: ``(S, S)`` float32 coverage."""
    m = mask.view(np.uint8)
    s = m[0::2, 0::2] + m[1::2, 0::2] + m[0::2, 1::2] + m[1::2, 1::2]
    return s.astype(np.float32) * 0.25


def _object_patch(
    rng: np.random.Generator, cls: int, radius: float, aspect: float, angle: float,
    hue_spread: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise one object on its own square patch, centred.

    Edges (the outline and the two-tone patterns) are anti-aliased by 2x2 supersampling;
    smooth shading is evaluated at pixel centres.

    Returns:
        ``premult`` ``(S, S, 3)`` float32 colour premultiplied by coverage, and ``alpha``
        ``(S, S)`` float32 coverage in [0, 1].
    """
    assert _SUPERSAMPLE == 2
    rx, ry = radius * aspect, radius / aspect
    side = 2 * math.ceil(1.12 * max(rx, ry) + 1.0)
    ca, sa = math.cos(angle), math.sin(angle)

    def grid(ss: int) -> tuple[np.ndarray, np.ndarray]:
        c = (np.arange(side * ss, dtype=np.float32) + 0.5) / ss - side / 2
        dx, dy = c[None, :], c[:, None]
        return (ca * dx + sa * dy) * (1.0 / rx), (ca * dy - sa * dx) * (1.0 / ry)

    hue = _CLASS_HUES[cls] + hue_spread * rng.uniform(-0.5, 0.5)
    c1 = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    # the second tone: near-white, near-black, or the complementary hue
    pick = rng.integers(0, 3)
    if pick == 0:
        c2 = _hsv(hue, rng.uniform(0.0, 0.15), rng.uniform(0.88, 1.0))
    elif pick == 1:
        c2 = _hsv(hue, rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.22))
    else:
        c2 = _hsv(hue + 0.5, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    light = rng.normal(size=3) * (1.0, 1.0, 0.3) + (0.0, 0.0, 1.2)
    params: dict[str, Any] = {
        "inner": rng.uniform(0.45, 0.62) if cls == 1 else rng.uniform(0.38, 0.5),
        "arm": rng.uniform(0.27, 0.36),
        "frame": rng.uniform(0.5, 0.58),
        "flip": bool(rng.integers(0, 2)),
        "freq": rng.uniform(2.6, 3.6) / 0.75,
        "phase": rng.uniform(0, 1),
        "cell": rng.uniform(0.45, 0.55),
        "light": light / np.linalg.norm(light),
    }
    gain = rng.normal(0.0, 0.12, 2)

    us, vs = grid(2)
    inside = _shape_inside(cls, us, vs, params)
    alpha = _down(inside)
    u, v = grid(1)
    tone1 = _first_tone(cls, u, v, c1, params)
    tone2 = _second_tone(cls, us, vs, params)
    if tone2 is None:
        pm = alpha[..., None] * tone1
    else:
        w2 = _down(inside & tone2)
        pm = (alpha - w2)[..., None] * tone1 + w2[..., None] * c2
    # illumination gradient across the object, and grain
    light_field = 1.0 + gain[0] * u + gain[1] * v
    light_field += rng.normal(0.0, 0.02, light_field.shape).astype(np.float32)
    pm *= light_field[..., None]
    return pm, alpha


def _iou_one(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(others) - inter)


# --------------------------------------------------------------------------------------------
# the "photo" domain: flat shapes on crops of real photographs
# --------------------------------------------------------------------------------------------

#: Domains of :func:`render_scene`: ``"demo"`` (textured objects on a synthetic background)
#: and ``"photo"`` (flat, randomly coloured shapes on crops of scikit-image's sample photos).
DOMAINS: tuple[str, ...] = ("demo", "photo")

#: scikit-image sample images (bundled in its wheel, no download) used as photo backgrounds.
PHOTO_IMAGES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
    "camera", "coins", "brick", "grass", "gravel", "moon",
)
_PHOTO_AREA_RANGE = (0.003, 0.15)
_PHOTO_CACHE: dict[str, Image.Image] = {}


def _require_skimage() -> Any:
    try:
        import skimage.data
    except ImportError:
        raise ImportError(
            "domain='photo' needs scikit-image's sample images: pip install scikit-image"
        ) from None
    return skimage.data


def _photo(name: str) -> Image.Image:
    """scikit-image sample ``name`` as an RGB image (cached per process)."""
    if name not in _PHOTO_CACHE:
        arr = np.asarray(getattr(_require_skimage(), name)())
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) * (255.0 / max(1.0, float(arr.max())))).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        _PHOTO_CACHE[name] = Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")
    return _PHOTO_CACHE[name]


def _photo_background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A random crop (position, scale, horizontal flip) of a sample photo, resized to ``size``.

    Returns ``(H, W, 3)`` float32 in [0, 255].
    """
    w, h = size
    photo = _photo(PHOTO_IMAGES[int(rng.integers(0, len(PHOTO_IMAGES)))])
    pw, ph = photo.size
    # the largest crop of the scene's aspect ratio, scaled by 35-100% per side
    cw0 = min(pw, ph * w / h)
    scale = rng.uniform(0.35, 1.0)
    cw, ch = cw0 * scale, cw0 * scale * h / w
    x0 = rng.uniform(0.0, pw - cw)
    y0 = rng.uniform(0.0, ph - ch)
    img = photo.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.float32)


def _flat_shape(cls: int, u: np.ndarray, v: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Inside-mask of class ``cls``'s *shape* in the photo domain (object radius 1).

    Every class is a distinct silhouette: the pattern classes of the demo domain become cut-outs
    (the background shows through), so a flat colour still tells them apart.
    """
    if cls == 2:  # framed square: a square frame
        m = np.maximum(np.abs(u), np.abs(v))
        return (m <= 0.75) & (m >= p["frame"])
    if cls == 6:  # striped square: three parallel bars
        band = np.floor((u + 0.75) / 0.3)
        return (np.maximum(np.abs(u), np.abs(v)) <= 0.75) & (band % 2 == 0)
    if cls == 7:  # checker disc: two opposite quarter discs
        return (u * u + v * v <= 1.0) & ((u >= 0) == (v >= 0))
    return _shape_inside(cls, u, v, p)


def _flat_patch(
    rng: np.random.Generator, cls: int, radius: float, aspect: float, angle: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One flat shape in a random colour (maybe outlined): ``(premult, alpha)`` as
    :func:`_object_patch`."""
    rx, ry = radius * aspect, radius / aspect
    side = 2 * math.ceil(1.12 * max(rx, ry) + 1.0)
    ca, sa = math.cos(angle), math.sin(angle)
    c = (np.arange(side * 2, dtype=np.float32) + 0.5) / 2 - side / 2
    dx, dy = c[None, :], c[:, None]
    u, v = (ca * dx + sa * dy) * (1.0 / rx), (ca * dy - sa * dx) * (1.0 / ry)
    fill = _hsv(rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0))
    params = {"inner": rng.uniform(0.45, 0.62) if cls == 1 else rng.uniform(0.38, 0.5),
              "arm": rng.uniform(0.27, 0.36), "frame": rng.uniform(0.4, 0.5)}
    inside = _flat_shape(cls, u, v, params)
    alpha = _down(inside)
    if rng.random() < 0.5:  # a thin (1 px) outline in another random colour
        line = _hsv(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0))
        core = inside.copy()
        core[1:, :] &= inside[:-1, :]
        core[:-1, :] &= inside[1:, :]
        core[:, 1:] &= inside[:, :-1]
        core[:, :-1] &= inside[:, 1:]
        core[0, :] = core[-1, :] = core[:, 0] = core[:, -1] = False
        w_core = _down(core)
        pm = w_core[..., None] * fill + (alpha - w_core)[..., None] * line
    else:
        pm = alpha[..., None] * fill
    return pm, alpha


def _photo_objects(
    rng: np.random.Generator, canvas: np.ndarray, n_target: int, area_range: tuple[float, float],
    max_iou: float, draw_objects: bool,
) -> tuple[list[np.ndarray], list[int]]:
    """Place ``n_target`` flat shapes whose tight boxes cover ``area_range`` of the image
    (log-uniform; each shape is rasterised once at a nominal size, then rescaled so that its
    measured box has the drawn area)."""
    h, w = canvas.shape[:2]
    lo, hi = (math.log(a) for a in area_range)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    attempts = 0
    while len(boxes) < n_target and attempts < 40 * n_target:
        attempts += 1
        cls = int(rng.integers(0, len(CLASSES)))
        frac = math.exp(rng.uniform(lo, hi))
        if attempts > 20 * n_target:  # crowded: try smaller objects
            frac = max(area_range[0], frac * 0.5)
        aspect = math.exp(rng.uniform(-0.18, 0.18))
        angle = rng.uniform(0, 2 * np.pi)
        state = rng.bit_generator.state
        radius = 0.5 * math.sqrt(frac * w * h)
        for _ in range(2):  # measure the box at a nominal radius, then rescale once
            rng.bit_generator.state = state  # the same colours at either radius
            pm, alpha = _flat_patch(rng, cls, radius, aspect, angle)
            ys, xs = np.nonzero(alpha > 0)
            area = float((xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())) if xs.size else 0
            if area <= 0:
                break
            radius *= math.sqrt(frac * w * h / area)
        if not xs.size:
            continue
        local = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.int64)
        bw, bh = local[2] - local[0], local[3] - local[1]
        if bw >= w or bh >= h or not (
            0.7 * area_range[0] <= bw * bh / (w * h) <= 1.15 * area_range[1]
        ):
            continue
        x0 = int(rng.integers(0, w - bw + 1)) - int(local[0])
        y0 = int(rng.integers(0, h - bh + 1)) - int(local[1])
        box = (local + [x0, y0, x0, y0]).astype(np.float64)
        if boxes and _iou_one(box, np.stack(boxes)).max() > max_iou:
            continue
        boxes.append(box)
        labels.append(cls)
        if draw_objects:
            sx0, sy0 = max(0, -x0), max(0, -y0)
            sx1, sy1 = min(pm.shape[1], w - x0), min(pm.shape[0], h - y0)
            a = alpha[sy0:sy1, sx0:sx1, None]
            region = canvas[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1]
            region *= 1.0 - a
            region += pm[sy0:sy1, sx0:sx1]
    return boxes, labels


def render_scene(
    index: int,
    size: tuple[int, int] = (256, 192),
    seed: int = 0,
    min_objects: int = 2,
    max_objects: int = 6,
    *,
    area_range: tuple[float, float] | None = None,
    max_iou: float = 0.1,
    hue_spread: float = 0.4,
    draw_objects: bool = True,
    domain: str = "demo",
) -> SyntheticImage:
    """Render scene ``index``: small objects of :data:`CLASSES` on a cluttered background.

    Args:
        index: image index (the key is ``"images/{index:06d}.jpg"``).
        size: ``(width, height)`` in pixels, each at least 32.
        seed: dataset seed; the image's random stream is ``SeedSequence([seed, index])``.
        min_objects: fewest objects per image (at least 1).
        max_objects: most objects per image; the count is uniform in
            ``[min_objects, max_objects]``.
        area_range: range of the objects' box areas as fractions of the image area
            (log-uniform). ``None``: the domain's default. ``"demo"``: ``(0.012, 0.075)``,
            nominal sizes before the exact rasterised box is measured (no box exceeds 10% of
            the image). ``"photo"``: ``(0.003, 0.15)`` (COCO's small and medium objects: ~6 to
            ~43 pixel sides at 128x96), the measured tight box's area (within pixel rounding:
            between 0.7x the low and 1.15x the high end).
        max_iou: largest IoU allowed between the boxes of two objects.
        hue_spread: width of each class's hue range (fraction of the colour circle); 1.0
            makes colour carry no class information.
        draw_objects: ``False`` renders the background alone (the same background as with
            objects, since objects draw from their own random stream); ``boxes``/``labels``
            still describe where the objects would be.
        domain: ``"demo"`` (the textured classes on a synthetic cluttered background) or
            ``"photo"``: a random crop (position, scale, horizontal flip) of one of
            scikit-image's sample photos (:data:`PHOTO_IMAGES`) as the background, and every
            object a flat silhouette of its class (rotated, random colour over the whole hue
            circle, half of them with a 1-pixel outline of another random colour), so colour
            and texture carry no class information: the class is the shape. ``hue_spread`` is
            unused there.

    Returns:
        a :class:`SyntheticImage`: RGB image, ``(K, 4)`` float32 tight ``xyxy`` boxes and
        ``(K,)`` int64 labels. The same arguments give a pixel-identical image and identical
        boxes, on any platform with the same numpy and Pillow.

    Raises:
        ValueError: invalid size, object counts or domain.
        ImportError: ``domain="photo"`` without scikit-image installed.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    w, h = (int(size[0]), int(size[1]))
    if w < 32 or h < 32:
        raise ValueError(f"size must be (width, height) with both >= 32 pixels, got {size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}"
        )
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    bg_seq, obj_seq, noise_seq = np.random.SeedSequence([int(seed), int(index)]).spawn(3)
    bg_rng, rng = np.random.default_rng(bg_seq), np.random.default_rng(obj_seq)

    if domain == "photo":
        canvas = _photo_background(bg_rng, (w, h))
        n_target = int(rng.integers(min_objects, max_objects + 1))
        boxes_p, labels_p = _photo_objects(
            rng, canvas, n_target, area_range or _PHOTO_AREA_RANGE, max_iou, draw_objects
        )
        img = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
        return SyntheticImage(
            key=image_key(index),
            image=img,
            boxes=np.asarray(boxes_p, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels_p, dtype=np.int64),
        )
    if area_range is None:
        area_range = (0.012, 0.075)
    canvas = _background(bg_rng, (w, h))
    n_target = int(rng.integers(min_objects, max_objects + 1))
    lo, hi = (math.log(a) for a in area_range)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    attempts = 0
    while len(boxes) < n_target and attempts < 40 * n_target:
        attempts += 1
        cls = int(rng.integers(0, len(CLASSES)))
        frac = math.exp(rng.uniform(lo, hi))
        if attempts > 20 * n_target:  # crowded: try smaller objects
            frac *= 0.5
        radius = 0.5 * math.sqrt(frac * w * h)
        aspect = math.exp(rng.uniform(-0.18, 0.18))
        angle = rng.uniform(0, 2 * np.pi)
        pm, alpha = _object_patch(rng, cls, radius, aspect, angle, hue_spread)
        ys, xs = np.nonzero(alpha > 0)
        if xs.size == 0:
            continue
        local = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.int64)
        bw, bh = local[2] - local[0], local[3] - local[1]
        if bw >= w or bh >= h:
            continue
        # place the tight box uniformly inside the image
        x0 = int(rng.integers(0, w - bw + 1)) - int(local[0])
        y0 = int(rng.integers(0, h - bh + 1)) - int(local[1])
        box = (local + [x0, y0, x0, y0]).astype(np.float64)
        if boxes and _iou_one(box, np.stack(boxes)).max() > max_iou:
            continue
        boxes.append(box)
        labels.append(cls)
        if draw_objects:
            # composite the part of the patch that falls in the image
            sx0, sy0 = max(0, -x0), max(0, -y0)
            sx1 = min(pm.shape[1], w - x0)
            sy1 = min(pm.shape[0], h - y0)
            a = alpha[sy0:sy1, sx0:sx1, None]
            region = canvas[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1]
            region *= 1.0 - a
            region += pm[sy0:sy1, sx0:sx1]

    # sensor grain over everything (its own stream: the same with or without objects)
    noise_rng = np.random.default_rng(noise_seq)
    canvas += noise_rng.standard_normal((h, w, 1), dtype=np.float32) * 2.5
    img = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    return SyntheticImage(
        key=image_key(index),
        image=img,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
    )


# --------------------------------------------------------------------------------------------
# writing a dataset
# --------------------------------------------------------------------------------------------


def _atomic_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=None, separators=(",", ":")).encode("utf-8")
    atomic_write(path, data, durable=False)


def _render_and_write(job: tuple[Any, ...]) -> tuple[int, list[list[float]], list[int]]:
    """Worker: render image ``index``, write it unless it exists; return its annotation.

    A top-level function with plain arguments, so it works under any multiprocessing start
    method (fork, spawn, forkserver).
    """
    root, index, size, seed, quality, min_objects, max_objects, skip_existing, domain = job
    scene = render_scene(index, size, seed, min_objects, max_objects, domain=domain)
    path = Path(root) / scene.key
    if not (skip_existing and path.is_file()):
        atomic_write(path, lambda f: scene.image.save(f, format="JPEG", quality=quality),
                     durable=False)
    return index, scene.boxes.tolist(), scene.labels.tolist()


def _params(
    n_images: int, size: tuple[int, int], seed: int, quality: int, min_objects: int,
    max_objects: int, domain: str = "demo",
) -> dict[str, Any]:
    # "domain" is recorded only when not "demo", so demo datasets written before domains
    # existed are still reused, and a folder of one domain never matches another's parameters
    extra = {} if domain == "demo" else {"domain": domain}
    return {
        "format": "objcrop-synthetic",
        "generator_version": GENERATOR_VERSION,
        "n_images": int(n_images),
        "width": int(size[0]),
        "height": int(size[1]),
        "seed": int(seed),
        "quality": int(quality),
        "min_objects": int(min_objects),
        "max_objects": int(max_objects),
        "classes": list(CLASSES),
        **extra,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _dataset(root: Path, n_images: int) -> SyntheticDataset:
    return SyntheticDataset(
        root=root,
        image_dir=root / "images",
        labels_path=root / _LABELS,
        proposals_path=root / _STORE,
        keys=[image_key(i) for i in range(n_images)],
        classes=CLASSES,
    )


def _complete(ds: SyntheticDataset) -> bool:
    return (
        ds.labels_path.is_file()
        and ds.proposals_path.is_file()
        and all((ds.root / k).is_file() for k in ds.keys)
    )


def _remove_ours(root: Path) -> None:
    """Delete the files :func:`write_dataset` writes (the manifest first), nothing else."""
    for name in (_MANIFEST, _PARTIAL, _LABELS, _STORE):
        with contextlib.suppress(FileNotFoundError):
            (root / name).unlink()
    for folder, pattern in ((root / "images", _IMAGE_NAME), (root, _TEMP_NAME)):
        if folder.is_dir():
            for entry in os.scandir(folder):
                if pattern.match(entry.name) and entry.is_file():
                    os.unlink(entry.path)
    if (root / "images").is_dir():
        for entry in os.scandir(root / "images"):
            if _TEMP_NAME.match(entry.name) and entry.is_file():
                os.unlink(entry.path)


def write_dataset(
    root: str | os.PathLike[str],
    n_images: int = 200,
    size: tuple[int, int] = (256, 192),
    seed: int = 0,
    quality: int = 90,
    workers: int = 1,
    overwrite: bool = False,
    *,
    min_objects: int = 2,
    max_objects: int = 6,
    mp_context: str | None = None,
    domain: str = "demo",
) -> SyntheticDataset:
    """Write ``n_images`` scenes as a dataset at ``root``; return it without work if present.

    Layout::

        root/images/000000.jpg ...   JPEG images (keys "images/000000.jpg" ...)
        root/labels.json             {"classes": [...], "images": [{"key", "width", "height",
                                      "labels" (sorted unique ids), "boxes", "box_labels"}]}
        root/proposals_gt.objcrop    the ground-truth boxes as a proposal store (scores 1.0)
        root/synthetic.json          the parameters; written last, marks the dataset complete

    Every file is written to a temporary file and renamed into place. An interrupted run
    resumes: the next call with the same parameters keeps the images already written.

    Args:
        root: dataset folder (created if needed).
        n_images: number of images (>= 1).
        size: ``(width, height)`` of every image.
        seed: dataset seed (see :func:`render_scene`).
        quality: JPEG quality, 1-100 (Pillow advises at most 95).
        workers: processes rendering in parallel; the output is identical for any value.
        overwrite: replace a dataset with other parameters at ``root`` (deletes only the
            files this function writes).
        min_objects, max_objects: objects per image (see :func:`render_scene`).
        mp_context: multiprocessing start method for ``workers > 1`` (default: the
            platform's; ``"spawn"`` works too, at the cost of a slower start).
        domain: ``"demo"`` or ``"photo"`` (see :func:`render_scene`); recorded in
            ``synthetic.json`` (when not ``"demo"``), so a folder of another domain is never
            reused.

    Returns:
        the :class:`SyntheticDataset`.

    Raises:
        ValueError: invalid arguments, or ``root`` holds a dataset written with other
            parameters (or files of unknown origin) and ``overwrite`` is False.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    size = (int(size[0]), int(size[1]))
    render_scene(0, size, seed, min_objects, max_objects, draw_objects=False,
                 domain=domain)  # validate args
    root = Path(root)
    params = _params(n_images, size, seed, quality, min_objects, max_objects, domain)
    ds = _dataset(root, n_images)

    manifest = _read_json(root / _MANIFEST)
    partial = _read_json(root / _PARTIAL)
    existing = manifest if manifest is not None else partial
    if existing is None and (
        (root / _LABELS).exists() or (root / _STORE).exists() or (root / _MANIFEST).exists()
        or (ds.image_dir.is_dir() and any(_IMAGE_NAME.match(n) for n in os.listdir(ds.image_dir)))
    ):
        existing = {"format": "unknown (no readable synthetic.json)"}
    if existing is not None and existing != params:
        if not overwrite:
            differ = sorted(k for k in set(params) | set(existing)
                            if params.get(k) != existing.get(k))
            raise ValueError(
                f"{root} already holds a different dataset (differs in: {', '.join(differ)}). "
                "Fix: pass overwrite=True (the command line's --overwrite) to replace it, or "
                "choose another folder (--data-dir)."
            )
        _remove_ours(root)
        existing = manifest = None
    if manifest == params and _complete(ds):
        return ds

    # (re)generate; images already on disk with these parameters are kept
    resume = existing == params
    ds.image_dir.mkdir(parents=True, exist_ok=True)
    (root / _MANIFEST).unlink(missing_ok=True)  # incomplete until written again
    _atomic_json(root / _PARTIAL, params)
    jobs = [
        (str(root), i, size, seed, quality, min_objects, max_objects, resume, domain)
        for i in range(n_images)
    ]
    if workers == 1 or n_images == 1:
        results: Iterable[tuple[int, list, list]] = map(_render_and_write, jobs)
        annotations = list(results)
    else:
        ctx = multiprocessing.get_context(mp_context)
        with ProcessPoolExecutor(max_workers=min(workers, n_images), mp_context=ctx) as pool:
            chunk = max(1, n_images // (workers * 8))
            annotations = list(pool.map(_render_and_write, jobs, chunksize=chunk))

    entries = []
    for index, boxes, box_labels in annotations:
        entries.append({
            "key": image_key(index),
            "width": size[0],
            "height": size[1],
            "labels": sorted(set(box_labels)),
            "boxes": boxes,
            "box_labels": box_labels,
        })
    _atomic_json(ds.labels_path, {"classes": list(CLASSES), "images": entries})

    from ..proposals import ProposalStore

    ProposalStore.write(
        ds.proposals_path,
        ((e["key"], e["boxes"], [1.0] * len(e["boxes"]), size) for e in entries),
        meta={
            "source": "ground_truth",
            "generator": "objcrop_plugin.data.synthetic",
            "classes": list(CLASSES),
            "seed": int(seed),
            **({} if domain == "demo" else {"domain": domain}),
        },
    )
    _atomic_json(root / _MANIFEST, params)
    with contextlib.suppress(FileNotFoundError):
        (root / _PARTIAL).unlink()
    return ds


def load_labels(
    path: str | os.PathLike[str],
) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Read a ``labels.json`` written by :func:`write_dataset`.

    Args:
        path: the ``labels.json`` file, or the dataset root holding it.

    Returns:
        ``(keys, targets, classes)``: ``keys`` the N image keys in file order, ``targets``
        ``(N, C)`` float32 multi-hot, ``classes`` the C class names.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a labels file (the message says what is wrong).
    """
    path = Path(path)
    if path.is_dir():
        path = path / _LABELS
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or "classes" not in obj or "images" not in obj:
        raise ValueError(f"{path}: expected an object with 'classes' and 'images'")
    classes = tuple(str(c) for c in obj["classes"])
    keys: list[str] = []
    targets = np.zeros((len(obj["images"]), len(classes)), dtype=np.float32)
    for i, entry in enumerate(obj["images"]):
        try:
            keys.append(str(entry["key"]))
            targets[i] = multi_hot(np.asarray(entry["labels"], dtype=np.int64), len(classes))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: image entry {i} is malformed ({exc})") from None
    return keys, targets, classes
