"""Proposals from a heat map of a backbone's features (``heatmap``): any timm model, local weights.

Three heat maps (``heat``):

- ``"whitened"`` (the default): each location's Mahalanobis distance from the image's median
  feature vector under the covariance of the image's features (the RX anomaly detector of Reed
  and Yu, 1990, on network features; :func:`whiten`). Most of a scene is background, so the
  median and the covariance are the background's: a feature lights up when it differs in a
  direction in which the background does not vary. Texture, which varies a lot along a few
  directions, counts for little; a dull object on a busy photo counts.
- ``"contrast"``: the plain (L2) distance from the median feature vector, which a strong
  texture can outshine.
- ``"activation"``: ContrastiveCrop's recipe (Peng et al., CVPR 2022), the channel sum for
  non-negative CNN features or the L2 norm for features that can be negative (ViT patch
  tokens, ConvNeXt stages). It marks where the network responds strongly, which on textured
  backgrounds is the texture.

Either map is min-max normalised per image and upsampled to the working image. Then, for each
threshold ``t`` in ``thresholds``:

- every connected component of ``heat >= t`` (8-connectivity) gives a box: a scene with five
  separate objects gives five boxes;
- the box of the whole thresholded map gives one more (ContrastiveCrop's single box).

With ``segments`` (Felzenszwalb ``k`` values, e.g. ``[100, 300]``), the boxes of the
image's colour segments at each scale join them (:func:`segment_boxes`; the image's own edges,
which the network's grid blurs). The map finds where the objects are but not always their
extent: on the photo domain of ``bench/quality.py`` most missed objects are lit on the map, but
their blob is a fragment of them or merged with a neighbour (median best IoU 0.26). With the
segments' boxes, 0.91 of the objects have a candidate at IoU 0.5 (0.63 with the blobs alone).

Each box is scored against a ring around it (the box grown by ``ring`` of its size on each
side). With ``score="feature"`` (the default) and the whitened map, by
:func:`whitened_contrast`: how unusual the box's mean whitened feature is, times how unrelated
the ring's is (a piece of a larger region or of a texture scores low); with the other maps by
``1 - cos`` of the mean feature vector inside and in the ring (:func:`feature_contrast`). With
``score="heat"``, by the mean heat inside minus the mean heat in the ring; with
``score="feature*heat"`` by the product of the feature score and the square root of the
(positive) heat score, so that a box must differ from its surround in features and be hot. The
shared post-processing (NMS, top-k) keeps the best.

Measured on seed 0's 3000 scenes of ``bench/quality.py``'s two domains (recall@10 at IoU 0.5,
boxes from a ``scene_scene`` backbone; the README's heat-map recall table): the whitened map
finds 0.86 of the demo's objects and 0.41 of the photo domain's, the contrast map 0.77 and
0.23, ContrastiveCrop's activation map 0.60 and 0.07; ``graph_segments`` finds 0.80 and 0.32.
These kept boxes down to 4 px a side (``min_side``; no ``min_side_fraction`` then). Specks of
a few cells are as unusual as objects to the whitened map and their tight boxes score high:
``min_side=8`` (the demo's setting) raises the whitened map's recall to 0.89 and 0.48, and
makes the best box an object in 0.86 of the demo's scenes (0.68 with 4 px).

The specks do not shrink with the image: at the default working size of 512 px a cell of the
chosen level is 8 px, and a floor of 4 px keeps the blobs of single cells and the corners of
objects. So the generator also drops boxes under ``min_side_fraction`` of the working image's
short side (0.08 by default, about the demo's 8 px of 96). On 300 scenes of 512x384 per domain,
the networks' initial weights and otherwise the generator's defaults, recall@10 (IoU 0.5)
with ``resnet18`` on seed 7 (where 0.08 was chosen), by floor 4 / 12 / 23 / 31 / 46 px (1 / 3
/ 6 / 8 / 12% of the short side): photo domain 0.001 / 0.230 / 0.553 / 0.634 / 0.507, demo
0.002 / 0.430 / 0.824 / 0.870 / 0.872. With ``resnet50`` (the default model) on seed 8, by
fraction 0 (4 px) / 0.08 / 0.12: photo 0.000 / 0.505 / 0.442, demo 0.000 / 0.813 / 0.862;
``graph_segments`` 0.406 and 0.885. At the demo's 128x96 the fraction (7.7 px) is under its
``min_side`` of 8 and changes nothing.

Recall@10 (IoU 0.5) of seed 0's first 400 scenes of each domain, boxes from the same seed's
``scene_scene`` backbone at the demo's settings: heat-map blobs alone 0.909 (demo) and 0.533
(photo); with ``segments=[50, 100, 200, 400]`` 0.905 and 0.602; with ``score="feature*heat"``
as well 0.939 and 0.631; with two scales, ``segments=[100, 300]``, and ``feature*heat`` (the
demo's ``HEATMAP_PARAMS``) 0.945 and 0.627 (photo seed 1: 0.555 blobs alone, 0.656). The
segments cost about 9 ms per 128x96 image and scale on one core (OpenCV's graph segmentation),
more than the network's share; they run in threads while the network runs.

Feature level. A CNN's last stage has stride 32: at the demo's 128x96 images it is a 4x3 grid,
far too coarse for objects of 10-30 px. ``level="auto"`` picks the deepest level whose grid
has at least ``min_cells`` cells along the input's short side; ``scale`` upsamples the image
before the network (as the linear probe does), which makes every level's grid finer.
``level`` may also name a level index of ``model.feature_info`` (``-1``: the last). ViTs have
one stride (the patch size): the last block's patch tokens are used.

Batched: per group of equal-sized images one forward, and the whitening and the box scores
(:func:`box_contrast`) on the same device; only the heat maps travel to the host, for their
connected components (:func:`candidate_boxes`).

Weights come from a local file (``checkpoint``: ``backbone.pth`` from ``objcrop train``, a
solo-learn / Lightning checkpoint, a timm state dict); nothing is downloaded. ``module``
passes a network that is already built (``objcrop train``'s online refresh uses the backbone
being trained).

Example:
    >>> gen = HeatmapGenerator("resnet18", checkpoint="run/backbone.pth")  # doctest: +SKIP
    >>> boxes, scores = gen(image)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .generators import BatchedProposalGenerator, input_dtype, resolve_device
from .segments import _ximgproc, graph_segment_regions

__all__ = [
    "SEGMENT_CACHE",
    "HeatmapGenerator",
    "SegmentCache",
    "box_contrast",
    "cached_segment_boxes",
    "candidate_boxes",
    "choose_level",
    "device_candidate_boxes",
    "feature_contrast",
    "heat_boxes",
    "heat_contrast",
    "segment_boxes",
    "whiten",
    "whitened_contrast",
]

log = logging.getLogger("objcrop_plugin")

#: box scores: the box's features against its ring's, the mean heat inside minus around, or
#: the first times the square root of the second (where it is positive)
_SCORES = ("feature", "heat", "feature*heat")

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise ImportError(
            "the heatmap proposal generator needs OpenCV for connected components. Fix: pip "
            "install 'objcrop-plugin[proposals]' (opencv-contrib-python-headless)"
        ) from None
    return cv2


def choose_level(reductions: Sequence[int], short_side: int, min_cells: int) -> int:
    """The deepest level (index into ``reductions``, the levels' strides) whose grid has at
    least ``min_cells`` cells along ``short_side``; the shallowest level when none has."""
    ok = [i for i, r in enumerate(reductions) if short_side / r >= min_cells]
    return max(ok) if ok else int(np.argmin(reductions))


def _median_feature(feats: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` per-channel median over the locations of ``(B, C, h, w)`` features: the
    lower of the two middle values, as ``torch.median``. On the CPU by ``numpy.partition``
    (selection, about 5x faster than ``torch.median``'s; the same values)."""
    flat = feats.flatten(2)
    if flat.device.type != "cpu":
        return flat.median(dim=2).values
    k = (flat.shape[2] - 1) // 2  # contiguous: selection along a strided axis is 3x slower
    rows = flat.contiguous().numpy().reshape(-1, flat.shape[2])
    out = np.empty(len(rows), rows.dtype)

    def select(part: slice) -> None:
        out[part] = np.partition(rows[part], k, axis=1)[:, k]

    # numpy releases the GIL while it selects: torch's threads share the rows (the same values;
    # on 2 cores 2.3x faster, a sixth of a refresh at the paper's setting)
    n = max(1, min(torch.get_num_threads(), len(rows) // 64))
    if n == 1:
        select(slice(None))
    else:
        bounds = np.linspace(0, len(rows), n + 1).astype(int)
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(select, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]))
    return torch.from_numpy(out.reshape(flat.shape[:2]))


def whiten(feats: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Each image's features in its own whitened coordinates: ``(B, r, h, w)`` float32,
    ``r = min(C, h * w)``.

    Centred on the image's median feature and transformed so that the image's feature
    covariance (regularised by ``eps`` times the mean variance per channel, so that directions
    without variance are not blown up) becomes the identity. The norm of a location's vector is
    its Mahalanobis distance from the median (the RX anomaly detector of Reed and Yu, 1990).
    Any two whitening transforms differ by a rotation, which changes neither norms nor
    cosines: with at most as many channels as locations this one is the covariance's Cholesky
    factor (``L^-1 x``); with more channels than locations (a deep stage's small grid) the
    coordinates along the principal axes, from the locations' Gram matrix. Float32, with
    float64 for an image whose factorisation fails in float32.
    """
    b, c, h, w = feats.shape
    n = h * w
    x = feats.flatten(2).float() - _median_feature(feats).float()[..., None]  # (B, C, n)
    if c <= n:
        z = _whiten_cholesky(x, eps)
    else:
        gram = x.transpose(1, 2) @ x / n  # (B, n, n): the covariance's nonzero spectrum
        reg = float(eps) * gram.diagonal(dim1=1, dim2=2).sum(1) / c
        var, u = torch.linalg.eigh(gram)  # (B, n), (B, n, n)
        var = var.clamp_min(0)
        z = u.transpose(1, 2) * (n * var / (var + reg[:, None]).clamp_min(1e-30)).sqrt()[..., None]
    return z.reshape(b, -1, h, w)


def _regularised_cov(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The ``(B, C, C)`` covariance of ``(B, C, n)`` centred features, its diagonal raised by
    ``eps`` times the mean variance."""
    cov = x @ x.transpose(1, 2) / x.shape[2]
    diag = cov.diagonal(dim1=1, dim2=2)
    floor = 1e-30 if x.dtype == torch.float32 else 1e-300
    diag.add_((float(eps) * diag.mean(1)).clamp_min(floor)[:, None])
    return cov


def _whiten_cholesky(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``L^-1 x`` for ``(B, C, n)`` centred features, ``L L^T`` their regularised covariance."""
    chol, info = torch.linalg.cholesky_ex(_regularised_cov(x, eps))
    z = torch.linalg.solve_triangular(chol, x, upper=False)
    bad = (info != 0).nonzero().flatten().tolist()
    if bad:  # rounding made the matrix indefinite in float32: redo those images in float64
        xd = x[bad].double()
        chol = torch.linalg.cholesky(_regularised_cov(xd, eps))
        z[bad] = torch.linalg.solve_triangular(chol, xd, upper=False).float()
    return z


def _at_least(boxes: np.ndarray, min_side: float) -> np.ndarray:
    """The boxes ``(N, 4)`` (inside the image) with both sides at least ``min_side``."""
    if min_side <= 0 or not len(boxes):
        return boxes
    return boxes[(boxes[:, 2] - boxes[:, 0] >= min_side) & (boxes[:, 3] - boxes[:, 1] >= min_side)]


def heat_boxes(
    heat: np.ndarray,
    thresholds: Sequence[float] = (0.3, 0.5, 0.7),
    ring: float = 0.25,
    min_area: int = 4,
    features: np.ndarray | None = None,
    whitened: bool = False,
    min_side: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate boxes of a normalised heat map ``(h, w)`` in ``[0, 1]``.

    Args:
        min_side: candidates with a side under this many pixels are dropped before scoring.
        features: ``(C, fh, fw)`` feature map of the same image (any grid size): the boxes
            are then scored by :func:`feature_contrast` instead of by heat, or by
            :func:`whitened_contrast` when ``whitened`` (``features`` are :func:`whiten`'s).

    Returns:
        ``(N, 4)`` float32 xyxy pixel boxes and ``(N,)`` float32 scores (mean heat inside
        minus mean heat in the surrounding ring, or the feature contrast), unsorted, possibly
        overlapping.
    """
    h, w = heat.shape
    b = _at_least(candidate_boxes(heat, thresholds, min_area), min_side)
    if not len(b):
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    if features is not None:
        score = whitened_contrast if whitened else feature_contrast
        return b.astype(np.float32), score(b, features, (w, h), ring)
    return b.astype(np.float32), heat_contrast(b, heat, ring)


def candidate_boxes(heat: np.ndarray, thresholds: Sequence[float], min_area: int) -> np.ndarray:
    """The distinct ``(N, 4)`` int64 xyxy boxes of :func:`heat_boxes`, sorted: per threshold,
    every 8-connected component of ``heat >= t`` of at least ``min_area`` pixels and the box of
    the whole thresholded map."""
    cv2 = _cv2()
    heat = np.ascontiguousarray(heat, dtype=np.float32)  # OpenCV needs C order
    found: list[np.ndarray] = []
    for t in thresholds:
        mask = (heat >= t).view(np.uint8)
        rows = np.flatnonzero(mask.any(axis=1))
        if not len(rows):
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        st = stats[1:n][stats[1:n, 4] >= min_area].astype(np.int64)  # x, y, w, h, area
        found.append(np.concatenate([st[:, :2], st[:, :2] + st[:, 2:4]], axis=1))
        found.append(np.array([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], np.int64))
    if not found:
        return np.zeros((0, 4), np.int64)
    return np.unique(np.concatenate(found), axis=0)



def device_candidate_boxes(
    heat: torch.Tensor,
    thresholds: Sequence[float],
    min_area: int,
    jumps: int = 6,
    max_pixels: int = 1 << 23,
) -> list[np.ndarray]:
    """:func:`candidate_boxes` of a batch of heat maps ``(B, h, w)``, on their device.

    The same boxes, in the same order, as OpenCV's connected components on the host: every
    8-connected component of ``heat >= t`` (one mask per map and threshold), found by label
    equivalence: each pixel starts with its own index as label; each round, each label's root
    is hooked to the smallest label in the 3x3 neighbourhood of any of its pixels (one
    ``scatter_reduce``), the roots are compressed by pointer jumping and every pixel takes its
    root's label, until no label changes (five rounds for the heat maps of 64x48 feature grids
    at 256x192). Each component (labelled by its smallest pixel index) then gets its box and
    area from one ``scatter_reduce`` per side. On a GPU this replaces the refresh's host-side
    part; on a CPU OpenCV is faster.

    Args:
        jumps: pointer jumps per round (more: fewer rounds, each dearer).
        max_pixels: maps times thresholds times pixels labelled at once (up to about eight
            int64 arrays of that length are live: 0.5 GiB at the default 2**23); larger
            batches go in chunks of maps.

    Returns:
        per map, the distinct ``(N, 4)`` int64 xyxy boxes, sorted as by :func:`candidate_boxes`.
    """
    if heat.dim() != 3:
        raise ValueError(f"device_candidate_boxes: heat must be (B, h, w), got {tuple(heat.shape)}")
    b, h, w = heat.shape
    hw = h * w
    per_map = max(1, len(thresholds) * hw)
    if b > 1 and b * per_map > max_pixels:
        step = max(1, max_pixels // per_map)
        return [boxes for i in range(0, b, step)
                for boxes in device_candidate_boxes(heat[i:i + step], thresholds, min_area,
                                                    jumps, max_pixels)]
    dev = heat.device
    ths = torch.tensor([float(t) for t in thresholds], device=dev, dtype=heat.dtype)
    levels = len(ths)
    n = b * levels
    fg = (heat[:, None] >= ths.view(1, -1, 1, 1)).reshape(n, hw)
    # per-map labels in floating point for the pooling (exact below 2**24 pixels a map); the
    # background is hw, above every label, so the min-pooling never picks it
    ftype = torch.float32 if hw < 2**24 else torch.float64
    sel = torch.nonzero(fg.flatten()).flatten()  # the foreground, as global pixel indices
    pix = sel % hw
    base = sel - pix  # each foreground pixel's map, as the index of its first pixel
    ident = torch.arange(n * hw, device=dev)
    key = sel  # each foreground pixel's label (global): its own index to begin with
    lab = torch.full((n * hw,), float(hw), device=dev, dtype=ftype)
    while True:
        lab[sel] = (key - base).to(ftype)
        low = -F.max_pool2d(-lab.view(n, 1, h, w), 3, stride=1, padding=1)
        low = low.flatten()[sel].long() + base
        parent = ident.clone().scatter_reduce_(0, key, low, "amin")
        for _ in range(jumps):
            parent = parent[parent]
        new = parent[key]
        if torch.equal(new, key):
            break
        key = new
    # key: each foreground pixel's component, named by its smallest pixel
    xs, ys = pix % w, pix // w
    x0 = torch.full((n * hw,), hw, device=dev).scatter_reduce_(0, key, xs, "amin")
    y0 = torch.full((n * hw,), hw, device=dev).scatter_reduce_(0, key, ys, "amin")
    x1 = torch.full((n * hw,), -1, device=dev).scatter_reduce_(0, key, xs, "amax")
    y1 = torch.full((n * hw,), -1, device=dev).scatter_reduce_(0, key, ys, "amax")
    area = torch.zeros(n * hw, device=dev, dtype=torch.long).index_add_(
        0, key, torch.ones_like(key))
    roots = torch.nonzero(area >= max(1, int(min_area))).flatten()
    comp = torch.stack([x0[roots], y0[roots], x1[roots] + 1, y1[roots] + 1], 1)
    # the box of each whole thresholded map
    m3 = fg.view(n, h, w)
    rows, cols = m3.any(2).to(torch.uint8), m3.any(1).to(torch.uint8)
    has = rows.amax(1) > 0
    r0, r1 = rows.argmax(1), h - rows.flip(1).argmax(1)
    c0, c1 = cols.argmax(1), w - cols.flip(1).argmax(1)
    whole = torch.stack([c0, r0, c1, r1], 1)[has]
    owner = torch.cat([roots // hw, torch.nonzero(has).flatten()]) // levels
    boxes = torch.cat([comp, whole]).cpu().numpy()
    owner = owner.cpu().numpy()
    order = np.argsort(owner, kind="stable")
    boxes, owner = boxes[order], owner[order]
    parts = np.split(boxes, np.searchsorted(owner, np.arange(1, b)))
    return [np.unique(x, axis=0) if len(x) else np.zeros((0, 4), np.int64) for x in parts]


def segment_boxes(
    image: np.ndarray,
    scales: Sequence[float],
    segment_side: int | None = 256,
    max_area: float = 0.8,
) -> np.ndarray:
    """The distinct ``(N, 4)`` int64 xyxy boxes of the Felzenszwalb segments of an image
    (``(h, w, 3)`` uint8 RGB) at each ``k`` in ``scales`` (OpenCV's graph segmentation, sigma
    0.8, the smallest segment ``max(4, h * w / 2000)`` pixels), in pixels of ``image``.

    The image is segmented at most ``segment_side`` px on its long side (``None``: as it is);
    segments covering more than ``max_area`` of the image (background) are left out. No
    grouping of segments: the heat map's own boxes supply the larger regions.
    """
    h, w = image.shape[:2]
    img = np.ascontiguousarray(image)
    if segment_side is not None and max(h, w) > segment_side:
        f = segment_side / max(h, w)
        cv2 = _cv2()
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))),
                         interpolation=cv2.INTER_AREA)
    if not len(scales) or min(img.shape[:2]) < 2:
        return np.zeros((0, 4), np.int64)
    b, _ = graph_segment_regions(img, scales, merge_neighbours=False)
    sh, sw = img.shape[:2]
    b = b * np.array([w / sw, h / sh, w / sw, h / sh])
    b = np.stack([np.floor(b[:, 0]), np.floor(b[:, 1]), np.ceil(b[:, 2]), np.ceil(b[:, 3])], 1)
    b = np.clip(b, 0, [w, h, w, h]).astype(np.int64)
    keep = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) <= max_area * h * w
    return np.unique(b[keep], axis=0)



class SegmentCache:
    """:func:`segment_boxes` results by working image content, kept across refreshes.

    The segments depend on the pixels alone, not on the network, so an online run computes
    them at its first refresh and reuses them at every later one (decoding is deterministic:
    the same image gives the same working pixels). Keyed by a BLAKE2b digest of the pixels,
    their shape and the segmentation's parameters; the boxes are held as int32. When
    ``max_bytes`` are held, new entries are not kept (the first ones stay: with a dataset read
    in the same order at every refresh, a cache that evicted the oldest would never hit).
    Thread-safe.
    """

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self.full = False
        self._held: dict[bytes, np.ndarray] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(image: np.ndarray, scales: Sequence[float], segment_side: int | None) -> bytes:
        h = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=20)
        h.update(repr((image.shape, str(image.dtype), [float(k) for k in scales],
                       segment_side)).encode())
        return h.digest()

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            boxes = self._held.get(key)
            if boxes is None:
                self.misses += 1
                return None
            self.hits += 1
        return boxes.astype(np.int64)

    def put(self, key: bytes, boxes: np.ndarray) -> None:
        small = np.ascontiguousarray(boxes, dtype=np.int32)
        with self._lock:
            if key in self._held:
                return
            if self._bytes + small.nbytes + 64 > self.max_bytes:
                if not self.full:
                    self.full = True
                    log.warning("heatmap: the segment cache is full (%d images, %d MiB): "
                                "the images after them are segmented again at every refresh "
                                "(raise SEGMENT_CACHE.max_bytes to keep more)", len(self._held),
                                self.max_bytes >> 20)
                return
            self._held[key] = small
            self._bytes += small.nbytes + 64

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self._bytes = 0
            self.hits = self.misses = 0
            self.full = False

    def __len__(self) -> int:
        return len(self._held)


#: the process's segment cache (:class:`SegmentCache`), shared by every heat-map generator
#: made with ``segment_cache=True`` (the default): an online run makes one per refresh
SEGMENT_CACHE = SegmentCache()


def cached_segment_boxes(
    image: np.ndarray, scales: Sequence[float], segment_side: int | None,
    cache: SegmentCache | None,
) -> np.ndarray:
    """:func:`segment_boxes` through ``cache`` (``None``: no cache)."""
    if cache is None:
        return segment_boxes(image, scales, segment_side)
    key = cache.key(image, scales, segment_side)
    boxes = cache.get(key)
    if boxes is None:
        boxes = segment_boxes(image, scales, segment_side)
        cache.put(key, boxes)
    return boxes


def heat_contrast(boxes: np.ndarray, heat: np.ndarray, ring: float) -> np.ndarray:
    """Mean heat inside integer boxes minus the mean in the ring around each (``score="heat"``);
    a box that fills the map has no ring and is compared with nothing (mean 0 around)."""
    cv2 = _cv2()
    integral = cv2.integral(np.ascontiguousarray(heat, np.float32), sdepth=cv2.CV_64F)
    mean_in, mean_ring, has_ring = _inside_and_ring(integral, *np.asarray(boxes).T, ring)
    return (mean_in - np.where(has_ring, mean_ring, 0.0)).astype(np.float32)


def _rings(
    x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray, ring: float, min_ring: int,
    w: int, h: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The boxes grown by ``ring`` of their size (at least ``min_ring`` cells) on each side,
    clipped to a ``w`` x ``h`` map."""
    gx = np.maximum(np.ceil((x2 - x1) * ring), min_ring).astype(np.int64)
    gy = np.maximum(np.ceil((y2 - y1) * ring), min_ring).astype(np.int64)
    return (np.maximum(x1 - gx, 0), np.maximum(y1 - gy, 0), np.minimum(x2 + gx, w),
            np.minimum(y2 + gy, h))


def _inside_and_ring(
    integral: np.ndarray,
    x1: np.ndarray,
    y1: np.ndarray,
    x2: np.ndarray,
    y2: np.ndarray,
    ring: float,
    min_ring: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means of a map inside integer boxes and in the ring around each (the box grown by
    ``ring`` of its size, at least ``min_ring`` cells, on each side, clipped to the map).

    Args:
        integral: ``(h + 1, w + 1)`` or ``(h + 1, w + 1, C)`` summed-area table of the map.

    Returns:
        ``(mean inside, mean in the ring, whether the ring has any cell)``; the means are
        ``(N,)`` or ``(N, C)``.
    """
    h, w = integral.shape[0] - 1, integral.shape[1] - 1

    def box_sum(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
        return integral[d, c] - integral[b, c] - integral[d, a] + integral[b, a]

    inside = box_sum(x1, y1, x2, y2)
    ox1, oy1, ox2, oy2 = _rings(x1, y1, x2, y2, ring, min_ring, w, h)
    area_in = (x2 - x1) * (y2 - y1)
    area_ring = (ox2 - ox1) * (oy2 - oy1) - area_in
    per = (slice(None),) + (None,) * (integral.ndim - 2)  # areas broadcast over channels
    mean_in = inside / np.maximum(area_in, 1)[per]
    mean_ring = (box_sum(ox1, oy1, ox2, oy2) - inside) / np.maximum(area_ring, 1)[per]
    return mean_in, mean_ring, area_ring > 0


def _box_means(
    boxes: np.ndarray, features: np.ndarray, image_size: tuple[int, int], ring: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean feature vectors ``(N, C)`` inside each box and in the ring around it, and whether
    the ring has any cell; boxes snapped outwards to the cells, rings at least one cell."""
    c, fh, fw = features.shape
    integral = np.zeros((fh + 1, fw + 1, c), np.float64)
    integral[1:, 1:] = np.asarray(features, np.float64).transpose(1, 2, 0).cumsum(0).cumsum(1)
    return _inside_and_ring(integral, *_cells(boxes, (fh, fw), image_size), ring, min_ring=1)


def _cells(
    boxes: np.ndarray, grid: tuple[int, int], image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel boxes of an image of ``image_size`` (w, h) snapped outwards to the cells of a
    ``grid`` (fh, fw): ``x1, y1, x2, y2`` int64 cell bounds, each box at least one cell."""
    fh, fw = grid
    w, h = image_size
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x1 = np.clip(np.floor(b[:, 0] * fw / w), 0, fw - 1).astype(np.int64)
    y1 = np.clip(np.floor(b[:, 1] * fh / h), 0, fh - 1).astype(np.int64)
    x2 = np.clip(np.ceil(b[:, 2] * fw / w), x1 + 1, fw).astype(np.int64)
    y2 = np.clip(np.ceil(b[:, 3] * fh / h), y1 + 1, fh).astype(np.int64)
    return x1, y1, x2, y2


def box_contrast(
    features: torch.Tensor,
    boxes: Sequence[np.ndarray],
    image_size: tuple[int, int],
    ring: float = 0.25,
    whitened: bool = False,
    max_elements: int = 1 << 23,
) -> list[np.ndarray]:
    """:func:`whitened_contrast` (``whitened``) or :func:`feature_contrast` of a batch of images,
    computed on the features' device: the feature maps never travel to the host, only one
    score per box does.

    Each image's float64 summed-area table is built there and every box's sums inside and
    in its ring are gathered from it: the cost is that of the table, whatever the number of
    boxes. The scores agree with the reference functions to float64 rounding before the cast
    to float32.

    Args:
        features: ``(B, C, fh, fw)`` feature maps (:func:`whiten`'s for ``whitened``).
        boxes: per image, ``(N_i, 4)`` xyxy pixel boxes of an image of ``image_size``
            (w, h); boxes are snapped outwards to the cells, rings are at least one cell.
        max_elements: images are tabulated in chunks of at most this many table entries
            (at least one image per chunk).

    Returns:
        Per image, ``(N_i,)`` float32 scores.
    """
    b, c, fh, fw = features.shape
    counts = [len(x) for x in boxes]
    k = max(counts, default=0)
    if k == 0:
        return [np.zeros(0, np.float32) for _ in counts]
    # per image and box (padded with one-cell boxes): the cell bounds of the box and of the box
    # grown by its ring, and the flat indices of their corners in the (fh + 1, fw + 1) table
    bounds = np.zeros((b, k, 8), np.int64)
    bounds[..., 2:4] = bounds[..., 6:8] = 1
    for i, bx in enumerate(boxes):
        if counts[i]:
            x1, y1, x2, y2 = _cells(bx, (fh, fw), image_size)
            bounds[i, :counts[i]] = np.stack(
                [x1, y1, x2, y2, *_rings(x1, y1, x2, y2, ring, 1, fw, fh)], axis=1)
    x1, y1, x2, y2 = (bounds[..., j::4] for j in range(4))  # (b, k, 2): the box, its ring's
    w1 = fw + 1
    corners = np.stack([y2 * w1 + x2, y1 * w1 + x2, y2 * w1 + x1, y1 * w1 + x1], axis=-1)
    dev = features.device
    index = torch.from_numpy(corners.reshape(b, 1, k * 8)).to(dev)
    chunk = max(1, max_elements // (c * (fh + 1) * w1))
    sums = []
    for s in range(0, b, chunk):
        f = features[s:s + chunk]
        table = F.pad(f.double(), (1, 0, 1, 0)).cumsum_(2).cumsum_(3).flatten(2)
        g = table.gather(2, index[s:s + chunk].expand(-1, c, -1)).view(len(f), c, k, 2, 4)
        sums.append(g[..., 0] - g[..., 1] - g[..., 2] + g[..., 3])  # (n, C, k, 2)
    total = torch.cat(sums).permute(0, 2, 3, 1)  # (B, k, 2, C)
    area = (x2 - x1) * (y2 - y1)  # (b, k, 2)
    area_ring = area[..., 1] - area[..., 0]
    inside = total[:, :, 0]
    mean_in = inside / torch.from_numpy(np.maximum(area[..., 0], 1)).to(dev)[..., None]
    mean_ring = (total[:, :, 1] - inside) / torch.from_numpy(
        np.maximum(area_ring, 1)).to(dev)[..., None]
    n_in = mean_in.norm(dim=2)
    cos = (mean_in * mean_ring).sum(2) / (n_in * mean_ring.norm(dim=2) + 1e-12)
    score = (1.0 - cos.clamp_min(0)) * n_in.sqrt() if whitened else 1.0 - cos
    score = torch.where(torch.from_numpy(area_ring > 0).to(dev), score, 0.0)
    host = score.float().cpu().numpy()
    return [host[i, :n].copy() for i, n in enumerate(counts)]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def feature_contrast(
    boxes: np.ndarray, features: np.ndarray, image_size: tuple[int, int], ring: float = 0.25
) -> np.ndarray:
    """``1 - cos`` of the mean feature vector inside each box and in the ring around it.

    Args:
        boxes: ``(N, 4)`` xyxy pixels of an image of ``image_size`` (width, height).
        features: ``(C, fh, fw)`` feature map of that image; boxes are snapped outwards to its
            cells, and the ring is ``ring`` of the box's size (at least one cell) on each side.

    Returns:
        ``(N,)`` float32 in ``[0, 2]``; 0 for a box with no ring (it fills the image).
    """
    if len(boxes) == 0:
        return np.zeros(0, np.float32)
    mean_in, mean_ring, has_ring = _box_means(boxes, features, image_size, ring)
    return np.where(has_ring, 1.0 - _cosine(mean_in, mean_ring), 0.0).astype(np.float32)


def whitened_contrast(
    boxes: np.ndarray, z: np.ndarray, image_size: tuple[int, int], ring: float = 0.25
) -> np.ndarray:
    """The score of boxes on whitened features ``z`` (:func:`whiten`'s, one image):
    ``(1 - max(cos, 0)) * sqrt(|m_in|)``, with ``m_in`` and ``m_ring`` the mean whitened vectors
    inside each box and in the ring around it and ``cos`` their cosine.

    In whitened coordinates the image's typical feature is the origin and every direction of
    background variation has unit spread. ``|m_in|`` is how unusual the box's content is (in
    standard deviations of the image's features); ``1 - max(cos, 0)`` is 1 where the surround
    varies in an unrelated direction and falls towards 0 where the ring continues the box's
    content (a piece of a larger region, a texture). Same arguments as
    :func:`feature_contrast`.

    Returns:
        ``(N,)`` float32, ``>= 0``; 0 for a box with no ring (it fills the image).
    """
    if len(boxes) == 0:
        return np.zeros(0, np.float32)
    mean_in, mean_ring, has_ring = _box_means(boxes, z, image_size, ring)
    score = (1.0 - np.maximum(_cosine(mean_in, mean_ring), 0.0)) * np.sqrt(
        np.linalg.norm(mean_in, axis=1))
    return np.where(has_ring, score, 0.0).astype(np.float32)


class HeatmapGenerator(BatchedProposalGenerator):
    """Boxes from a heat map of a timm backbone's features (see the module docstring).

    Args:
        model: timm model name, created with ``pretrained=False``.
        checkpoint: local weights file for ``model`` (``None``: timm's initial weights,
            seeded by ``seed``; a warning says so. Their whitened map still finds regions
            that stand out from the rest of the image: the demo's ``@initial`` runs; a
            trained network's finds more objects on photos, see the README's recall table).
        prefix: the backbone's key prefix inside ``checkpoint`` (``None``: detected).
        seed: the initial weights' seed when there is no ``checkpoint`` (the same network,
            hence the same boxes, in every process, shard and resumed build).
        module: an already built backbone to use instead of ``model``/``checkpoint`` (not a
            parameter of a store's manifest; used as it is, in eval mode during a call).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``dynamic_img_size=True``).
        level: ``"auto"`` or an index into the model's feature levels (``-1``: the last).
        min_cells: ``level="auto"`` picks the deepest level with at least this many cells
            along the network input's short side.
        scale: the working image is resized by this factor before the network (``2``: the
            network sees twice the working resolution, every grid is twice as fine).
        heat: ``"whitened"`` (Mahalanobis distance from the image's median feature),
            ``"contrast"`` (L2 distance from it) or ``"activation"`` (ContrastiveCrop's
            channel reduction, see ``reduce``).
        score: ``"feature"`` (a box's features against its ring's: :func:`whitened_contrast`
            for the whitened map, else :func:`feature_contrast`), ``"heat"`` (mean heat
            inside minus around) or ``"feature*heat"`` (the first times the square root of the
            second where it is positive).
        thresholds: heat levels whose connected components become boxes (every 0.1: on the
            demo's photo domain recall@10 0.53 against 0.47 with 0.2, 0.35, ..., 0.8, an
            object's blob separating from its neighbours' at a level of its own).
        ring: width of the ring around a box, as a fraction of the box's size, for its score.
        reduce: the activation map's channel reduction: ``"auto"`` (channel sum where the
            features are non-negative, else L2 norm), ``"sum"`` or ``"norm"``.
        eps: the whitened map's regularisation: each direction's variance is raised by
            ``eps`` times the mean variance per channel (recall barely moves between 1e-4 and
            1e-2).
        segments: Felzenszwalb ``k`` values: the boxes of the working image's colour segments
            at each become candidates too (:func:`segment_boxes`; ``None``: heat-map blobs
            only).
        segment_side: the working image is segmented at most this many px on its long side
            (``None``: at the working size).
        components: where the heat maps' connected components run: ``"host"`` (OpenCV),
            ``"device"`` (:func:`device_candidate_boxes`) or ``"auto"`` (the device when it is
            a GPU). The boxes are the same; on a GPU the host's components were most of a
            refresh's cost.
        segment_cache: keep each image's segment boxes in the process's
            :data:`SEGMENT_CACHE` (by content), so that the refreshes of an online run after
            the first segment nothing. The boxes are the same either way.
        min_side_fraction: boxes with a side under this fraction of the working image's
            short side are dropped too (the larger of this and ``min_side`` applies). Specks of
            a cell or two are as unusual as objects to the whitened map, and at 512 px
            ``min_side`` alone keeps little else (see the module docstring).
        top_k, max_side, nms_iou, min_side, batch_size, device: see
            :class:`~objcrop_plugin.proposals.generators.BatchedProposalGenerator`
            (``device="auto"`` with ``module``: the module's device).
    """

    name: ClassVar[str] = "heatmap"

    def __init__(
        self,
        model: str = "resnet50",
        checkpoint: str | os.PathLike[str] | None = None,
        prefix: str | None = None,
        seed: int = 0,
        module: torch.nn.Module | None = None,
        model_kwargs: dict[str, Any] | None = None,
        level: int | str = "auto",
        min_cells: int = 32,
        scale: float = 1.0,
        heat: str = "whitened",
        score: str = "feature",
        thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        ring: float = 0.25,
        reduce: str = "auto",
        eps: float = 1e-3,
        segments: Sequence[float] | None = None,
        segment_side: int | None = 256,
        components: str = "auto",
        segment_cache: bool = True,
        top_k: int = 10,
        max_side: int = 512,
        nms_iou: float | None = 0.5,
        min_side: float = 4.0,
        min_side_fraction: float = 0.08,
        batch_size: int = 32,
        device: str = "auto",
    ) -> None:
        super().__init__(top_k=top_k, max_side=max_side, nms_iou=nms_iou, min_side=min_side,
                         batch_size=batch_size, device=device)
        if not 0.0 <= float(min_side_fraction) < 1.0:
            raise ValueError("heatmap: min_side_fraction must lie in [0, 1), got "
                             f"{min_side_fraction!r}")
        self.min_side_fraction = float(min_side_fraction)
        if isinstance(level, str) and level.lstrip("-").isdigit():
            level = int(level)
        if level != "auto" and not isinstance(level, int):
            raise ValueError(f"heatmap: level must be 'auto' or an integer, got {level!r}")
        if heat not in ("whitened", "contrast", "activation"):
            raise ValueError("heatmap: heat must be 'whitened', 'contrast' or 'activation', "
                             f"got {heat!r}")
        if not float(eps) > 0:
            raise ValueError(f"heatmap: eps must be > 0, got {eps!r}")
        if score not in _SCORES:
            raise ValueError(f"heatmap: score must be one of {', '.join(map(repr, _SCORES))}, "
                             f"got {score!r}")
        if reduce not in ("auto", "sum", "norm"):
            raise ValueError(f"heatmap: reduce must be 'auto', 'sum' or 'norm', got {reduce!r}")
        ths = [float(t) for t in (thresholds if isinstance(thresholds, (list, tuple))
                                  else [thresholds])]
        if not ths or not all(0.0 < t < 1.0 for t in ths):
            raise ValueError(f"heatmap: thresholds must lie in (0, 1), got {thresholds!r}")
        if not float(scale) > 0 or int(min_cells) < 1 or not float(ring) > 0:
            raise ValueError("heatmap: need scale > 0, min_cells >= 1 and ring > 0")
        if segments is not None:
            ks = segments if isinstance(segments, (list, tuple)) else [segments]
            segments = [float(k) for k in ks]
            if not segments or min(segments) <= 0:
                raise ValueError(f"heatmap: segments must be positive Felzenszwalb k values "
                                 f"(e.g. [100, 300]) or None, got {ks!r}")
            _ximgproc("heatmap with segments")
        if components not in ("auto", "host", "device"):
            raise ValueError("heatmap: components must be 'auto', 'host' or 'device', got "
                             f"{components!r}")
        if segment_side is not None and int(segment_side) < 8:
            raise ValueError(f"heatmap: need segment_side >= 8 or None, got {segment_side!r}")
        _cv2()  # fail at construction, not in the middle of a build
        self.model = str(model)
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.prefix = prefix
        self.seed = int(seed)
        self.model_kwargs = dict(model_kwargs or {})
        self.level = level
        self.min_cells = int(min_cells)
        self.scale = float(scale)
        self.heat = heat
        self.score = score
        self.thresholds = ths
        self.ring = float(ring)
        self.reduce = reduce
        self.eps = float(eps)
        self.segments = segments
        self.segment_side = None if segment_side is None else int(segment_side)
        # where the connected components run changes no box: not a parameter of the store
        self._components = components
        self._segment_cache = SEGMENT_CACHE if segment_cache else None
        if module is None:
            from ..backbones import create_backbone

            if self.checkpoint is None:
                log.warning("heatmap: no checkpoint given: %s keeps its initial weights "
                            "(seed %d), whose boxes are those of regions that stand out, not "
                            "of what a trained network knows (--checkpoint FILE, or "
                            "checkpoint=PATH in Python, for a trained network's)", self.model, self.seed)
            # a ViT or Swin takes each image's own input size (dynamic_img_size)
            module = create_backbone(self.model, self.checkpoint, prefix, seed=self.seed,
                                     any_size=True, **self.model_kwargs)
            module = module.to(self._device)
        else:
            if getattr(module, "dynamic_img_size", None) is False:
                raise ValueError(
                    f"heatmap: the module ({type(module).__name__}) was built without "
                    "dynamic_img_size, so it only takes its training input size, not each "
                    "image's. Fix: build it with dynamic_img_size=True (objcrop train: "
                    "backbone.kwargs.dynamic_img_size: true; objcrop-solo: "
                    "++backbone.kwargs.dynamic_img_size=True), or pass model=NAME"
                )
            if str(device) == "auto":
                p = next(module.parameters(), None)
                self._device = p.device if p is not None else resolve_device(device)
        self._net = module
        self._vit = hasattr(module, "patch_embed") and hasattr(module, "blocks")
        reductions = [int(f["reduction"]) for f in getattr(module, "feature_info", [])]
        if not hasattr(module, "forward_intermediates") or not reductions:
            raise ValueError(
                f"heatmap: model {self.model if module is None else type(module).__name__} "
                "has no timm feature levels (forward_intermediates / feature_info). Fix: use "
                "a timm model such as resnet50, convnext_tiny or vit_small_patch16_224"
            )
        if isinstance(level, int) and not -len(reductions) <= level < len(reductions):
            raise ValueError(f"heatmap: level {level} out of range: the model has "
                             f"{len(reductions)} levels (strides {reductions})")
        self._reductions = reductions

    # ------------------------------------------------------------------ network side

    def input_size(self, work_hw: tuple[int, int]) -> tuple[int, int]:
        """The network input ``(h, w)`` for a working image of ``work_hw``."""
        h, w = work_hw
        h, w = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        if self._vit:  # patch grid: a multiple of the patch size
            p = self._reductions[-1]
            h, w = max(p, round(h / p) * p), max(p, round(w / p) * p)
        elif self._reductions:
            # a CNN gives ceil(side / stride) cells: its grid would reach past an image whose
            # sides are no multiple of the level's stride, and the map (and the boxes) would
            # shift and shrink towards the top left. Down to a multiple: the level chosen for
            # the smaller input is the same or a shallower one, whose stride divides it too
            r = self._reductions[self.level_index((h, w))]
            h, w = max(r, h // r * r), max(r, w // r * r)
        return h, w

    def level_index(self, input_hw: tuple[int, int]) -> int:
        n = len(self._reductions)
        if self._vit:
            return n - 1 if self.level == "auto" else int(self.level) % n
        if self.level == "auto":
            return choose_level(self._reductions, min(input_hw), self.min_cells)
        return int(self.level) % n

    @property
    def components_on_device(self) -> bool:
        """Whether the heat maps' connected components run on the device
        (:func:`device_candidate_boxes`) rather than on the host (:func:`candidate_boxes`)."""
        if self._components == "auto":
            return self._device.type == "cuda"
        return self._components == "device"

    def min_side_for(self, size: tuple[int, int]) -> float:
        """``min_side``, or ``min_side_fraction`` of the working image's short side when that
        is more (boxes of a cell or two: specks, not objects, at any resolution)."""
        return max(self.min_side, self.min_side_fraction * min(size))

    @property
    def min_area(self) -> int:
        """The smallest connected component (pixels) that becomes a candidate box: a quarter
        of a ``min_side`` square (the shared post-processing then drops boxes under
        ``min_side``)."""
        return max(1, int(self.min_side) ** 2 // 4)

    def heat_maps(self, works: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Normalised heat maps ``(h, w)`` in [0, 1], one per working image, at its size."""
        return [m for m, _ in self._run(works, with_boxes=False)]

    def _run(
        self, works: Sequence[np.ndarray], with_boxes: bool
    ) -> list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]]:
        """Per working image: its heat map and, ``with_boxes``, its candidate boxes and their
        scores (:func:`heat_boxes`). Per group of equal sizes, one batched forward; the heat
        maps go to the host (connected components), the features stay on the device, where
        :func:`box_contrast` scores the boxes."""
        out: list[Any] = [None] * len(works)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, work in enumerate(works):
            groups.setdefault(tuple(work.shape[:2]), []).append(i)
        net, dev = self._net, self._device
        segs: Any = None
        pool = None
        if with_boxes and self.segments:
            # the segmentation needs only the pixels: it runs in threads while the network
            # runs (OpenCV releases the GIL)
            pool = ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(works))))
            segs = [pool.submit(cached_segment_boxes, work, self.segments, self.segment_side,
                                self._segment_cache) for work in works]
        was_training = net.training
        net.eval()
        mean = torch.tensor(_MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=dev).view(1, 3, 1, 1)
        try:
            with torch.no_grad():
                for (wh, ww), idx in groups.items():
                    x = torch.from_numpy(np.stack([works[i] for i in idx])).to(dev)
                    x = x.permute(0, 3, 1, 2).float().div_(255)
                    ih, iw = self.input_size((wh, ww))
                    if (ih, iw) != (wh, ww):
                        x = F.interpolate(x, size=(ih, iw), mode="bilinear", align_corners=False,
                                          antialias=ih < wh)
                    x = ((x - mean) / std).to(input_dtype(net))
                    lvl = self.level_index((ih, iw))
                    feats = net.forward_intermediates(
                        x, indices=[lvl], intermediates_only=True, stop_early=True
                    )[-1].float()
                    heat, feats = self._heat(feats)
                    lo = heat.amin(dim=(1, 2), keepdim=True)
                    hi = heat.amax(dim=(1, 2), keepdim=True)
                    heat = (heat - lo) / (hi - lo).clamp_min(1e-12)
                    heat = F.interpolate(heat[:, None], size=(wh, ww), mode="bilinear",
                                         align_corners=False)[:, 0].clamp_(0, 1)
                    maps = heat.cpu().numpy()  # one transfer per group
                    if not with_boxes:
                        for j, i in enumerate(idx):
                            out[i] = (maps[j], None)
                        continue
                    boxes = self._device_components(heat) if self.components_on_device else None
                    if boxes is None:
                        boxes = [candidate_boxes(m, self.thresholds, self.min_area)
                                 for m in maps]
                    if segs is not None:
                        boxes = [np.unique(np.concatenate([b, segs[i].result()]), axis=0)
                                 for b, i in zip(boxes, idx)]
                    # the post-processing would drop boxes under the floor: not scored at all
                    # (at 512 px most candidates are specks: 87% on the photo domain)
                    floor = self.min_side_for((ww, wh))
                    boxes = [_at_least(b, floor) for b in boxes]
                    if self.score == "heat":
                        scores = [heat_contrast(b, m, self.ring) for b, m in zip(boxes, maps)]
                    else:
                        scores = box_contrast(feats, boxes, (ww, wh), self.ring,
                                              whitened=self.heat == "whitened")
                    if self.score == "feature*heat":
                        scores = [s * np.sqrt(heat_contrast(b, m, self.ring).clip(0, None))
                                  for s, b, m in zip(scores, boxes, maps)]
                    for j, i in enumerate(idx):
                        out[i] = (maps[j], (boxes[j].astype(np.float32), scores[j]))
        finally:
            net.train(was_training)
            if pool is not None:
                pool.shutdown()
        return out

    def _device_components(self, heat: torch.Tensor) -> list[np.ndarray] | None:
        """:func:`device_candidate_boxes` of ``heat``; ``None`` (and OpenCV on the host from
        then on, logged) when the device cannot run it (out of memory, an operation missing)."""
        try:
            return device_candidate_boxes(heat, self.thresholds, self.min_area)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            log.warning("heatmap: the connected components failed on %s (%s); they run on the "
                        "host from now on (the same boxes; set components='host' to skip this)",
                        heat.device, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self._components = "host"
            return None

    def _heat(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, h, w)`` heat (not normalised) and the features that score the boxes."""
        if self.heat == "whitened":
            z = whiten(feats, self.eps)
            return z.norm(dim=1), z
        if self.heat == "contrast":
            return (feats - _median_feature(feats)[..., None, None]).norm(dim=1), feats
        return self._reduce(feats), feats

    def _reduce(self, feats: torch.Tensor) -> torch.Tensor:
        if self.reduce == "sum":
            return feats.sum(1)
        if self.reduce == "norm":
            return feats.norm(dim=1)
        nonneg = (feats.flatten(1).amin(1) >= 0).view(-1, 1, 1)
        return torch.where(nonneg, feats.sum(1), feats.norm(dim=1))

    def raw_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [boxes for _, boxes in self._run(images, with_boxes=True)]

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["thresholds"] = list(self.thresholds)
        return p
