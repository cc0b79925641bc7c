"""Object proposals from image segmentation: selective search and graph segments (OpenCV contrib).

Two generators, both without a model file:

- :class:`SelectiveSearchGenerator` (``selective_search``) wraps OpenCV's selective search
  (Uijlings et al., IJCV 2013): Felzenszwalb segments of several colour spaces grouped
  hierarchically, a few thousand boxes per image. Slow (about 1 s per 512 px image in ``fast``
  mode on one core) and, having no scores, a poor choice when only 10 boxes are kept.
- :class:`GraphSegmentsGenerator` (``graph_segments``) is the fast default: Felzenszwalb
  segments of a reduced image, grouped hierarchically by merging mutually most similar
  neighbours (a vectorised selective search), every region scored by an objectness measure
  (centre-surround colour contrast with a size prior, see the class). About 30 images per
  second per core at 512 px.

Both run OpenCV on one thread (``num_threads=1``; a dataset build parallelises over
processes) and are deterministic: the same image gives the same boxes and scores.

Both need ``cv2.ximgproc`` from ``opencv-contrib-python-headless``; constructing a generator
without it raises :class:`ImportError` naming the package to install.

References:
    Uijlings, van de Sande, Gevers, Smeulders. "Selective Search for Object Recognition".
    IJCV 2013.

    Felzenszwalb, Huttenlocher. "Efficient Graph-Based Image Segmentation". IJCV 2004.

    Alexe, Deselaers, Ferrari. "Measuring the Objectness of Image Windows". TPAMI 2012.

    Mishra et al. "Object-aware Cropping for Self-Supervised Learning". TMLR 2022.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from .generators import ProposalGenerator

__all__ = [
    "GraphSegmentsGenerator",
    "SelectiveSearchGenerator",
    "graph_segment_regions",
    "label_boxes",
    "seed_c_rand",
]

_INSTALL_HINT = (
    "install OpenCV's contrib modules: pip install opencv-contrib-python-headless "
    "(and uninstall opencv-python / opencv-python-headless, which shadow it)"
)


def _ximgproc(who: str) -> Any:
    """The ``cv2`` module, checked to have ``ximgproc``; ``ImportError`` naming the fix."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"{who} needs OpenCV: {_INSTALL_HINT}") from e
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(
            f"{who} needs cv2.ximgproc, which this OpenCV ({cv2.__version__}) lacks: "
            f"{_INSTALL_HINT}"
        )
    return cv2


@contextlib.contextmanager
def _cv_threads(cv2: Any, num_threads: int | None) -> Iterator[None]:
    """Run OpenCV on ``num_threads`` threads inside the block (``None``: leave it alone)."""
    if num_threads is None:
        yield
        return
    before = cv2.getNumThreads()
    cv2.setNumThreads(int(num_threads))
    try:
        yield
    finally:
        cv2.setNumThreads(before)


# ------------------------------------------------------------------------------------------
# Selective search


_C_RAND_LOCK = threading.Lock()
_C_SRAND: Any = None
_C_SRAND_WARNED = False


def seed_c_rand(seed: int) -> bool:
    """Seed the C library's ``rand()`` with ``srand(seed)``; ``False`` if it cannot be reached.

    OpenCV's selective search ranks its regions with C ``rand()`` (not ``cv::theRNG()``, so
    ``cv2.setRNGSeed`` has no effect on it). Seeding the process's C library right before
    ``process()`` makes the order reproducible. This works where Python and OpenCV share one C
    library (Linux, macOS); elsewhere the order varies between calls.
    """
    global _C_SRAND
    if _C_SRAND is None:
        _C_SRAND = False
        for name in (None, ctypes.util.find_library("c")):
            try:
                _C_SRAND = ctypes.CDLL(name).srand
                _C_SRAND.argtypes, _C_SRAND.restype = [ctypes.c_uint], None
                break
            except (OSError, TypeError, AttributeError):
                continue
    if _C_SRAND is False:
        return False
    _C_SRAND(int(seed) & 0xFFFFFFFF)
    return True


class SelectiveSearchGenerator(ProposalGenerator):
    """Selective search proposals (Uijlings et al., IJCV 2013) through OpenCV contrib.

    Wraps ``cv2.ximgproc.segmentation.createSelectiveSearchSegmentation``: the working image
    (BGR) is the base image, ``switchToSelectiveSearchFast`` / ``Quality`` /
    ``switchToSingleStrategy`` picks the strategy set, ``process()`` gives de-duplicated
    ``(x, y, w, h)`` rectangles.

    Scores: selective search has none. OpenCV sorts its regions by a rank
    ``U(0, 1) * level``, where ``level`` is 1 for an initial segment and grows by one with each
    merge, so earlier entries are *on average* lower in the hierarchy (smaller), shuffled by
    the random factor. The score of the ``i``-th of ``N`` rectangles is ``1 - i / N`` (in
    ``(0, 1]``, first = best), so NMS and top-k keep OpenCV's order. The random factor comes
    from C ``rand()``, seeded with ``seed`` right before every ``process()`` (see
    :func:`seed_c_rand`), which makes the boxes reproducible; note that this re-seeds the
    process's C ``rand()``.

    This order is made for recall with thousands of boxes, not for a top 10: on the synthetic
    demo scenes recall@10 (IoU 0.5) is about 0.3 at 512 px, against about 0.9 for
    :class:`GraphSegmentsGenerator`.

    Args:
        mode: ``"fast"`` (OpenCV's fast set: BGR and Lab images, k = 150, 300; about 1 s per
            512 px image on one core), ``"quality"`` (more colour spaces, k = 150 .. 750;
            several times slower) or ``"single"`` (one BGR segmentation at ``base_k``, one
            strategy).
        top_k: boxes kept per image (paper: 10).
        max_side: longest side of the working image; selective search's cost grows quickly
            with it (256 is about 8x faster than 512).
        nms_iou: IoU threshold of the final NMS (``None``: off).
        min_side: smallest box side kept, in working-image pixels.
        base_k: Felzenszwalb ``k`` of the first segmentation (OpenCV default 150).
        inc_k: increment of ``k`` between segmentations (OpenCV default 150).
        sigma: Gaussian smoothing of the segmentation (OpenCV default 0.8).
        seed: seed of OpenCV's ranking randomness.
        num_threads: OpenCV threads during the call (``None``: leave OpenCV's setting).

    Input: ``(H, W, 3)`` uint8 RGB array or PIL image.

    Output: ``(boxes (K, 4) float32 xyxy pixels of the input, scores (K,) float32)``, best
    first, ``K <= top_k``.

    Example:
        >>> from objcrop_plugin.data.synthetic import render_scene
        >>> gen = SelectiveSearchGenerator("fast", max_side=128)
        >>> boxes, scores = gen(render_scene(0, size=(256, 192)).image)
        >>> boxes.shape[1], boxes.dtype.name, len(boxes) <= 10
        (4, 'float32', True)
    """

    name: ClassVar[str] = "selective_search"
    kind: ClassVar[str] = "generator"
    MODES: ClassVar[tuple[str, ...]] = ("fast", "quality", "single")

    def __init__(
        self,
        mode: str = "fast",
        top_k: int = 10,
        max_side: int = 512,
        nms_iou: float | None = 0.7,
        min_side: float = 4.0,
        base_k: int = 150,
        inc_k: int = 150,
        sigma: float = 0.8,
        seed: int = 0,
        num_threads: int | None = 1,
    ) -> None:
        super().__init__(top_k=top_k, max_side=max_side, nms_iou=nms_iou, min_side=min_side)
        if mode not in self.MODES:
            raise ValueError(f"{self.name}: unknown mode {mode!r}; choose one of {self.MODES}")
        if int(base_k) < 1 or int(inc_k) < 1 or not float(sigma) >= 0:
            raise ValueError(f"{self.name}: need base_k >= 1, inc_k >= 1 and sigma >= 0")
        _ximgproc(f"{self.name} proposals")
        self.mode = mode
        self.base_k = int(base_k)
        self.inc_k = int(inc_k)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.num_threads = None if num_threads is None else int(num_threads)

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All selective search boxes of the working image, scored by their order.

        Args:
            image: ``(h, w, 3)`` uint8 RGB.

        Returns:
            ``(N, 4)`` float64 xyxy boxes and ``(N,)`` scores ``1 - i / N``.
        """
        global _C_SRAND_WARNED
        cv2 = _ximgproc(self.name)
        if image.shape[0] < 2 or image.shape[1] < 2:
            return np.zeros((0, 4)), np.zeros(0)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        with _cv_threads(cv2, self.num_threads):
            ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
            ss.setBaseImage(bgr)
            if self.mode == "fast":
                ss.switchToSelectiveSearchFast(self.base_k, self.inc_k, self.sigma)
            elif self.mode == "quality":
                ss.switchToSelectiveSearchQuality(self.base_k, self.inc_k, self.sigma)
            else:
                ss.switchToSingleStrategy(self.base_k, self.sigma)
            with _C_RAND_LOCK:  # seed and draw without another thread's rand() in between
                if not seed_c_rand(self.seed) and not _C_SRAND_WARNED:
                    _C_SRAND_WARNED = True
                    warnings.warn(
                        f"{self.name}: cannot seed the C library's rand() on this platform, "
                        "so OpenCV's selective search order (and the kept boxes) may vary "
                        "between runs",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                rects = ss.process()
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
        n = len(boxes)
        return boxes, 1.0 - np.arange(n, dtype=np.float64) / max(n, 1)


# ------------------------------------------------------------------------------------------
# Graph segments


#: bins per Lab channel of the colour histograms that drive the grouping (selective search: 25)
_HIST_BINS = 25


def label_boxes(labels: np.ndarray, n: int | None = None) -> np.ndarray:
    """Bounding box of every label of a label map, vectorised.

    Args:
        labels: ``(H, W)`` integer labels in ``[0, n)``.
        n: number of labels (default ``labels.max() + 1``).

    Returns:
        ``(n, 4)`` float64 xyxy boxes with exclusive ``x2``/``y2`` (a label at the single
        pixel ``(x=3, y=1)`` gives ``[3, 1, 4, 2]``); absent labels give ``[W, H, 0, 0]``.

    Example:
        >>> label_boxes(np.array([[0, 0, 1], [2, 2, 1]]))
        array([[0., 0., 2., 1.],
               [2., 0., 3., 2.],
               [0., 1., 2., 2.]])
    """
    labels = np.asarray(labels)
    h, w = labels.shape
    n = int(labels.max()) + 1 if n is None and labels.size else int(n or 0)
    flat = labels.ravel()
    xs = np.tile(np.arange(w, dtype=np.int64), h)
    ys = np.repeat(np.arange(h, dtype=np.int64), w)
    out = np.empty((4, n), dtype=np.int64)
    out[0], out[1], out[2], out[3] = w, h, -1, -1
    np.minimum.at(out[0], flat, xs)
    np.minimum.at(out[1], flat, ys)
    np.maximum.at(out[2], flat, xs)
    np.maximum.at(out[3], flat, ys)
    out[2:] += 1
    return out.T.astype(np.float64)


def _adjacent_pairs(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, of labels that touch (4-neighbourhood), each pair once."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()]).astype(np.int64)
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()]).astype(np.int64)
    diff = a != b
    a, b = a[diff], b[diff]
    key = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    return key // n, key % n


def _union_boxes(box: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [np.minimum(box[i, :2], box[j, :2]), np.maximum(box[i, 2:], box[j, 2:])], axis=1
    )


def _box_sums(integral: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Sums over integer xyxy ``boxes`` ``(N, 4)`` from an integral image ``(h+1, w+1, C)``."""
    x1, y1, x2, y2 = boxes.T
    return integral[y2, x2] - integral[y1, x2] - integral[y2, x1] + integral[y1, x1]


def graph_segment_regions(
    image: np.ndarray,
    scales: Sequence[float] = (200.0,),
    sigma: float = 0.8,
    min_size: int | None = None,
    merge_neighbours: bool = True,
    max_rounds: int = 40,
) -> tuple[np.ndarray, np.ndarray]:
    """Regions of Felzenszwalb segmentations and of their hierarchical grouping.

    For every ``k`` in ``scales``: ``cv2.ximgproc.segmentation.createGraphSegmentation(sigma,
    k, min_size)`` labels the image; every segment is a region. With ``merge_neighbours``,
    rounds of grouping follow: each region picks its most similar *adjacent* region, and pairs
    that picked each other (mutual best neighbours) merge; every merged region is a region too.
    The first round's regions are merged adjacent pairs; the rounds continue until nothing is
    adjacent any more or ``max_rounds``. The similarity is selective search's colour + size +
    fill (Uijlings et al. 2013): Lab colour-histogram intersection, ``1 - (|r_i| + |r_j|) /
    |image|`` (small regions merge first) and ``1 - (|box_ij| - |r_i| - |r_j|) / |image|``
    (merges that fill their joint box first). Mutual-best merging is the vectorised form of
    selective search's greedy "merge the most similar pair": the globally most similar pair is
    always mutual, and disjoint mutual pairs do not influence each other.

    Args:
        image: ``(h, w, 3)`` uint8 RGB.
        scales: Felzenszwalb ``k`` values (larger: larger segments).
        sigma: Gaussian smoothing before segmentation.
        min_size: smallest segment in pixels (``None``: ``max(4, h * w / 2000)``).
        merge_neighbours: group adjacent regions hierarchically.
        max_rounds: most grouping rounds per scale.

    Returns:
        ``(R, 4)`` float64 xyxy boxes (exclusive ``x2``/``y2``) and ``(R, 3)`` float64 mean
        colour of each region's own pixels, in OpenCV's 8-bit Lab.
    """
    cv2 = _ximgproc("graph_segments")
    h, w = image.shape[:2]
    if h < 2 or w < 2:
        return np.zeros((0, 4)), np.zeros((0, 3))
    lab8 = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB)
    lab = lab8.reshape(-1, 3).astype(np.float64)
    # colour-histogram bin of each pixel, per channel: columns 0..24 L, 25..49 a, 50..74 b
    bins = (lab8.reshape(-1, 3).astype(np.int64) * _HIST_BINS) // 256
    bins += np.arange(3) * _HIST_BINS
    area = float(h * w)
    ms = int(min_size) if min_size is not None else max(4, round(area / 2000))
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    out_boxes, out_means = [], []
    for k in scales:
        seg = cv2.ximgproc.segmentation.createGraphSegmentation(float(sigma), float(k), ms)
        labels = seg.processImage(bgr)
        n = int(labels.max()) + 1
        flat = labels.ravel().astype(np.int64)
        size = np.bincount(flat, minlength=n).astype(np.float64)
        if not size.all():  # OpenCV numbers its segments 0..n-1; be safe if it ever does not
            _, flat = np.unique(flat, return_inverse=True)
            labels = flat.reshape(labels.shape)
            n = int(flat.max()) + 1
            size = np.bincount(flat, minlength=n).astype(np.float64)
        colour = np.stack([np.bincount(flat, lab[:, c], n) for c in range(3)], axis=1)
        hist = np.bincount((flat[:, None] * 3 * _HIST_BINS + bins).ravel(),
                           minlength=n * 3 * _HIST_BINS).reshape(n, 3 * _HIST_BINS)
        hist = hist / (3.0 * size[:, None])  # each region's histogram sums to 1
        box = label_boxes(labels, n)
        out_boxes.append(box)
        out_means.append(colour / size[:, None])
        if not merge_neighbours:
            continue
        ei, ej = _adjacent_pairs(labels, n)
        for _ in range(int(max_rounds)):
            if len(ei) == 0:
                break
            sim = np.minimum(hist[ei], hist[ej]).sum(axis=1)
            sim += 1.0 - (size[ei] + size[ej]) / area
            ub = _union_boxes(box, ei, ej)
            sim += 1.0 - ((ub[:, 2] - ub[:, 0]) * (ub[:, 3] - ub[:, 1]) - size[ei] - size[ej]) / area
            # each region's best neighbour: sort the directed edges by (source, -similarity)
            src, dst = np.concatenate([ei, ej]), np.concatenate([ej, ei])
            order = np.lexsort((-np.concatenate([sim, sim]), src))
            src, dst = src[order], dst[order]
            first = np.ones(len(src), dtype=bool)
            first[1:] = src[1:] != src[:-1]
            best = np.full(n, -1, dtype=np.int64)
            best[src[first]] = dst[first]
            a = np.nonzero(best >= 0)[0]
            a = a[(best[best[a]] == a) & (a < best[a])]  # mutual pairs, each once
            if len(a) == 0:  # only possible with exactly tied similarities
                break
            b = best[a]
            # relabel: a pair becomes one region; ids stay in [0, m)
            root = np.arange(n)
            root[b] = a
            _, comp = np.unique(root, return_inverse=True)
            m = int(comp.max()) + 1
            merged = np.zeros(m, dtype=bool)
            merged[comp[a]] = True
            size_new = np.bincount(comp, size, m)
            hist_new = np.zeros((m, hist.shape[1]))
            np.add.at(hist_new, comp, hist * size[:, None])
            hist = hist_new / size_new[:, None]
            colour_new = np.zeros((m, 3))
            np.add.at(colour_new, comp, colour)
            colour = colour_new
            box_new = np.empty((m, 4))
            box_new[:, :2], box_new[:, 2:] = np.inf, -np.inf
            for c, reduce in ((0, np.minimum), (1, np.minimum), (2, np.maximum), (3, np.maximum)):
                reduce.at(box_new[:, c], comp, box[:, c])
            box, size, n = box_new, size_new, m
            out_boxes.append(box[merged])
            out_means.append(colour[merged] / size[merged, None])
            ci, cj = comp[ei], comp[ej]
            diff = ci != cj
            key = np.unique(np.minimum(ci[diff], cj[diff]) * m + np.maximum(ci[diff], cj[diff]))
            ei, ej = key // m, key % m
    return np.concatenate(out_boxes), np.concatenate(out_means)


class GraphSegmentsGenerator(ProposalGenerator):
    """Fast proposals without a model file: grouped graph segments scored by objectness.

    Regions: :func:`graph_segment_regions` on the working image reduced to ``segment_side``
    px (Felzenszwalb segments at each ``k`` in ``scales``, plus, with ``merge_neighbours``,
    every region of their hierarchical grouping of adjacent regions: merged neighbour pairs,
    then merged pairs of those, ...). Boxes covering more than ``max_area`` of the image are
    dropped (background, not objects); boxes with a side under ``min_side`` px are dropped by
    the base class.

    Objectness score of a region ``r`` with box ``b`` (all in OpenCV's 8-bit Lab)::

        score = |mean(r) - mean(ring)| / sqrt(var(ring) + noise_floor) * (|b| / |image|) ** size_prior

    where ``ring`` is the frame around ``b`` grown by ``ring`` times its width and height
    (clipped to the image), ``mean(r)`` the mean colour of the region's *own* pixels (not of
    its box), ``var(ring)`` the total colour variance of the ring.

    - The first factor is a centre-surround colour contrast (the "colour contrast" cue of
      Alexe et al.'s objectness) measured as a z-score: how far the region's colour lies from
      the colour distribution of its surroundings. Dividing by the ring's spread makes a
      region on a busy background need more contrast than one on a smooth background, and
      favours whole objects (whose ring is background) over object parts (whose ring is the
      rest of the object, and so busy). ``noise_floor`` keeps it finite on flat surroundings.
    - The size prior ``(|b| / |image|) ** size_prior`` counters the z-score's bias towards
      tiny regions (a few pixels of noise or texture contrast easily) and towards parts over
      the whole; an object crop also needs pixels to give a useful view.

    Defaults were tuned on the synthetic demo scenes (640x480, 2-6 objects of 1-8% of the
    image on a cluttered background): recall@10 at IoU 0.5 is about 0.89 on scenes 0-49 and
    0.91 on scenes 50-149 (0.77 without ``merge_neighbours``), at about 30 images/s on one
    core (512 px working image). More scales or a larger ``segment_side`` did not raise recall
    there but cost time; set ``segment_side=None`` for images with many small objects.

    Args:
        scales: Felzenszwalb ``k`` values, at the ``segment_side`` resolution.
        sigma: Gaussian smoothing of the segmentation.
        min_size: smallest segment in pixels at the segmentation resolution (``None``:
            ``max(4, h * w / 2000)``).
        merge_neighbours: add the regions of the hierarchical grouping of adjacent segments
            (``False``: segments only; faster, much lower recall on multi-part objects).
        top_k: boxes kept per image (paper: 10).
        max_side: longest side of the working image.
        nms_iou: IoU threshold of the final NMS (``None``: off).
        min_side: smallest box side kept, in working-image pixels.
        segment_side: longest side of the image that is segmented (the working image is
            shrunk further to it; ``None``: segment the working image itself).
        ring: width of the surrounding frame, as a fraction of the box's width / height.
        size_prior: exponent of the box-area prior (0: none).
        noise_floor: added to the ring's colour variance (8-bit Lab units squared).
        max_area: boxes covering more than this fraction of the image are dropped.
        max_rounds: most grouping rounds per scale.
        num_threads: OpenCV threads during the call (``None``: leave OpenCV's setting).

    Input: ``(H, W, 3)`` uint8 RGB array or PIL image.

    Output: ``(boxes (K, 4) float32 xyxy pixels of the input, scores (K,) float32)``, best
    first, ``K <= top_k``; a uniform image gives no boxes.

    Example:
        >>> from objcrop_plugin.data.synthetic import render_scene
        >>> gen = GraphSegmentsGenerator()
        >>> boxes, scores = gen(render_scene(0, size=(640, 480)).image)
        >>> boxes.shape, boxes.dtype.name, bool((scores[:-1] >= scores[1:]).all())
        ((10, 4), 'float32', True)
    """

    name: ClassVar[str] = "graph_segments"
    kind: ClassVar[str] = "generator"

    def __init__(
        self,
        scales: Sequence[float] = (200.0,),
        sigma: float = 0.8,
        min_size: int | None = None,
        merge_neighbours: bool = True,
        top_k: int = 10,
        max_side: int = 512,
        nms_iou: float | None = 0.7,
        min_side: float = 4.0,
        segment_side: int | None = 256,
        ring: float = 0.15,
        size_prior: float = 0.35,
        noise_floor: float = 50.0,
        max_area: float = 0.8,
        max_rounds: int = 40,
        num_threads: int | None = 1,
    ) -> None:
        super().__init__(top_k=top_k, max_side=max_side, nms_iou=nms_iou, min_side=min_side)
        scales = [float(k) for k in (scales if isinstance(scales, Sequence) else [scales])]
        if not scales or min(scales) <= 0:
            raise ValueError(f"{self.name}: scales must be positive Felzenszwalb k values")
        if segment_side is not None and int(segment_side) < 8:
            raise ValueError(f"{self.name}: need segment_side >= 8 or None")
        if not 0 < float(max_area) <= 1 or float(ring) <= 0 or float(noise_floor) <= 0:
            raise ValueError(f"{self.name}: need 0 < max_area <= 1, ring > 0, noise_floor > 0")
        _ximgproc(f"{self.name} proposals")
        self.scales = scales
        self.sigma = float(sigma)
        self.min_size = None if min_size is None else int(min_size)
        self.merge_neighbours = bool(merge_neighbours)
        self.segment_side = None if segment_side is None else int(segment_side)
        self.ring = float(ring)
        self.size_prior = float(size_prior)
        self.noise_floor = float(noise_floor)
        self.max_area = float(max_area)
        self.max_rounds = int(max_rounds)
        self.num_threads = None if num_threads is None else int(num_threads)

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Region boxes of the working image and their objectness scores.

        Args:
            image: ``(h, w, 3)`` uint8 RGB working image.

        Returns:
            ``(N, 4)`` float64 xyxy boxes in pixels of ``image`` and ``(N,)`` scores >= 0.
        """
        cv2 = _ximgproc(self.name)
        H, W = image.shape[:2]
        img = np.ascontiguousarray(image)
        if self.segment_side is not None and max(H, W) > self.segment_side:
            s = self.segment_side / max(H, W)
            size = (max(1, round(W * s)), max(1, round(H * s)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
        with _cv_threads(cv2, self.num_threads):
            boxes, means = graph_segment_regions(
                img, self.scales, self.sigma, self.min_size, self.merge_neighbours,
                self.max_rounds,
            )
            lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float64)
            integral = np.concatenate(
                [cv2.integral(lab, sdepth=cv2.CV_64F), cv2.integral(lab * lab, sdepth=cv2.CV_64F)],
                axis=2,
            )
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = bw * bh <= self.max_area * h * w
        boxes, means, bw, bh = boxes[keep], means[keep], bw[keep], bh[keep]
        if not len(boxes):
            return np.zeros((0, 4)), np.zeros(0)
        dx, dy = np.ceil(self.ring * bw), np.ceil(self.ring * bh)
        inner = boxes.astype(np.int64)
        outer = np.stack([np.maximum(boxes[:, 0] - dx, 0), np.maximum(boxes[:, 1] - dy, 0),
                          np.minimum(boxes[:, 2] + dx, w), np.minimum(boxes[:, 3] + dy, h)],
                         axis=1).astype(np.int64)
        ring_area = (outer[:, 2] - outer[:, 0]) * (outer[:, 3] - outer[:, 1]) - bw * bh
        sums = _box_sums(integral, outer) - _box_sums(integral, inner)
        with np.errstate(invalid="ignore", divide="ignore"):
            ring_mean = sums[:, :3] / ring_area[:, None]
            ring_var = (sums[:, 3:] / ring_area[:, None] - ring_mean**2).clip(0).sum(axis=1)
            contrast = np.linalg.norm(means - ring_mean, axis=1) / np.sqrt(
                ring_var + self.noise_floor
            )
        contrast = np.where(ring_area > 0, np.nan_to_num(contrast), 0.0)
        scores = contrast * (bw * bh / (h * w)) ** self.size_prior
        scale = np.array([W / w, H / h, W / w, H / h])
        return boxes * scale, scores
