"""BING objectness proposals (Cheng et al., CVPR 2014): the object-aware cropping paper's proposals.

Two generators read the same trained models (PASCAL VOC 2007, the nine files
``ObjNessB2W8{MAXBGR,HSV,I}.{idx,wS1,wS2}.yml.gz`` of opencv_contrib's
``modules/saliency/samples/ObjectnessTrainedModel``):

- :class:`OpenCVBingGenerator` wraps ``cv2.saliency.ObjectnessBING`` (the reference; needs
  ``opencv-contrib-python-headless``).
- :class:`BingGenerator` re-implements OpenCV's algorithm with vectorised torch ops (CPU or
  CUDA, no OpenCV needed) and gives the *same* boxes in the same order, with the calibrated
  stage-II scores that OpenCV computes but does not expose.

The algorithm, as OpenCV runs it (``modules/saliency/src/BING/objectnessBING.cpp``), for each of
the trained window sizes ``(w, h) = (2**(r % 6 + 4), 2**(r // 6 + 4))`` listed in the ``idx`` file:

1. resize the image (``INTER_LINEAR_EXACT``, fixed point) so that a ``w x h`` window becomes
   ``8 x 8``;
2. normed gradient: ``min(|dI/dx| + |dI/dy|, 255)`` as a byte, with the colour-space specific
   distance (max over B, G, R; L1 over H, S, V; or gray);
3. score every ``8 x 8`` window with the stage-I filter ``wS1``, approximated by two binary bases
   and applied to the top four bits of the gradient byte (``FilterTIG``);
4. greedy non-maximum suppression in a ``5 x 5`` neighbourhood, keeping the 250 best windows;
5. stage II: ``score * wS2[size, 0] + wS2[size, 1]``, then one sort over all sizes.

The torch version computes all sizes at once: the resized images are tiled into one mosaic
(one gather per axis, OpenCV's fixed-point weights), one gradient pass and one ``conv2d`` score
every window of every size, and the greedy suppression runs on all sizes together in parallel
rounds that give exactly OpenCV's sequential result (ties included).

Known OpenCV quirks that this module deals with (checked against OpenCV 5.0):

- ``computeSaliency`` runs all three colour spaces and concatenates their lists, and its
  ``getobjectnessValues()`` are rank-derived (``(rank + 300) * {1, 3, 5}``), not the objectness
  scores. :class:`OpenCVBingGenerator` points OpenCV at a private folder that holds only the
  chosen colour space's files, and reports ``-rank`` as the score.
- It prints a timing line to standard output on every call, logs errors for the colour spaces
  it cannot load, and writes ``bb.txt`` into ``<results dir>/BBoxesB2W8I/`` (with the default
  empty results dir: ``/BBoxesB2W8I/`` at the file-system root). The wrapper silences file
  descriptors 1 and 2 around the call and gives OpenCV a results path that cannot be created.

References:
    Cheng, Zhang, Lin, Torr. "BING: Binarized Normed Gradients for Objectness Estimation at
    300fps". CVPR 2014.

    Mishra et al. "Object-aware Cropping for Self-Supervised Learning". TMLR 2022.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import os
import re
import shutil
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .generators import ProposalGenerator

__all__ = [
    "COLOR_SPACES",
    "MODEL_ENV",
    "MODEL_SOURCE",
    "BingGenerator",
    "BingModel",
    "OpenCVBingGenerator",
    "binarize_filter",
    "load_bing_model",
    "model_file_names",
    "read_opencv_matrix",
    "silence_fds",
]

#: Colour spaces with a trained model; ``"MAXBGR"`` is OpenCV's first and the usual choice.
COLOR_SPACES: tuple[str, ...] = ("MAXBGR", "HSV", "I")

#: Where users get the trained model folder.
MODEL_SOURCE = (
    "the folder modules/saliency/samples/ObjectnessTrainedModel of opencv_contrib "
    "(https://github.com/opencv/opencv_contrib/tree/4.x/modules/saliency/samples/"
    "ObjectnessTrainedModel, Apache-2.0)"
)

# OpenCV's ObjectnessBING constants: base 2, 8x8 feature window, window sides 2**4 .. 2**9
# (ceil(log2(10)) .. ceil(log2(500))), 5x5 non-maximum suppression, 250 windows per size.
_W = 8
_MIN_T = 4
_NUM_T = 6
_NSS = 2
_PER_SIZE = 250
_PARTS = ("idx", "wS1", "wS2")
_HIST_BINS = 2048
_DONE = 1 << 40  # 'decided' marker of the NMS counters


def _model_name(color_space: str) -> str:
    return f"ObjNessB2W{_W}{color_space}"


def model_file_names(color_space: str = "MAXBGR") -> list[str]:
    """The three file names of one colour space's model, e.g. ``ObjNessB2W8MAXBGR.wS1.yml.gz``."""
    cs = _check_color_space(color_space)
    return [f"{_model_name(cs)}.{part}.yml.gz" for part in _PARTS]


def _check_color_space(color_space: str) -> str:
    cs = str(color_space).upper()
    if cs not in COLOR_SPACES:
        raise ValueError(f"BING: unknown color_space {color_space!r}; choose one of {COLOR_SPACES}")
    return cs


#: Environment variable naming the model folder when none is given.
MODEL_ENV = "OBJCROP_BING_MODEL"


def _resolve_model_dir(model_dir: str | os.PathLike[str] | None) -> str:
    if model_dir is None or str(model_dir) == "":
        model_dir = os.environ.get(MODEL_ENV)
        if not model_dir:
            raise FileNotFoundError(
                f"BING needs its trained model folder: pass model_dir (CLI: --bing-model) or set "
                f"${MODEL_ENV}; the folder holds {model_file_names('MAXBGR')} (and the HSV / I "
                f"variants); get it from {MODEL_SOURCE}."
            )
    return str(model_dir)


def _model_files(model_dir: str | os.PathLike[str], color_space: str) -> dict[str, Path]:
    """Check the folder and return ``{part: path}``; raise ``FileNotFoundError`` naming the fix."""
    folder = Path(model_dir).expanduser()
    names = model_file_names(color_space)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"BING model folder {str(folder)!r} {what}. It must hold the trained BING model "
            f"files {names}; get them from {MODEL_SOURCE}."
        )
    files = {part: folder / name for part, name in zip(_PARTS, names)}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"BING model folder {str(folder)!r} lacks {missing} (colour space "
            f"{color_space!r} needs {names}); get them from {MODEL_SOURCE}."
        )
    return files


# ------------------------------------------------------------------------------------------
# Model files: gzipped OpenCV FileStorage YAML


_MATRIX_RE = re.compile(
    r"^(?P<name>[^\s:#][^:]*?)\s*:\s*!!opencv-matrix\s*$"
    r"(?P<body>(?:\n[ \t]+.*)+)",
    re.M,
)
_DTYPES = {"u": np.uint8, "c": np.int8, "w": np.uint16, "s": np.int16, "i": np.int32,
           "f": np.float32, "d": np.float64}


def read_opencv_matrix(path: str | os.PathLike[str], name: str | None = None) -> np.ndarray:
    """Read one matrix from an OpenCV FileStorage YAML file (``.yml`` or gzipped ``.yml.gz``).

    Args:
        path: the file.
        name: the matrix's key; ``None``: the file's only (first) matrix.

    Returns:
        ``(rows, cols)`` array of the stored type (``dt: f`` -> float32, ``i`` -> int32, ...),
        values parsed exactly as OpenCV does (decimal text -> double -> stored type).

    Raises:
        ValueError: the file is not an OpenCV YAML matrix file or lacks ``name``.

    Example:
        >>> m = read_opencv_matrix("ObjNessB2W8MAXBGR.wS1.yml.gz")  # doctest: +SKIP
        >>> m.shape, m.dtype
        ((8, 8), dtype('float32'))
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a readable (gzipped) OpenCV YAML file: {e}") from e
    if not text.lstrip().startswith("%YAML"):
        raise ValueError(f"{str(path)!r} is not an OpenCV YAML file (no %YAML header)")
    found = {}
    for m in _MATRIX_RE.finditer(text):
        found[m.group("name").strip().strip("\"'")] = m.group("body")
    if not found:
        raise ValueError(f"{str(path)!r} holds no !!opencv-matrix")
    key = name if name is not None else next(iter(found))
    if key not in found:
        raise ValueError(f"{str(path)!r} has no matrix named {key!r} (it has {sorted(found)})")
    body = found[key]
    fields = dict(re.findall(r"^[ \t]+(rows|cols|dt)\s*:\s*(\S+)\s*$", body, re.M))
    data = re.search(r"data\s*:\s*\[([^\]]*)\]", body)
    try:
        rows, cols, dt = int(fields["rows"]), int(fields["cols"]), fields["dt"].strip("\"'")
        dtype = _DTYPES[dt]
        values = [float(v) for v in data.group(1).replace(",", " ").split()] if data else None
        if values is None or len(values) != rows * cols:
            raise ValueError(f"expected {rows}x{cols} values")
        arr = np.asarray(values, dtype=np.float64)
        if np.issubdtype(dtype, np.integer) and not np.array_equal(arr, np.round(arr)):
            raise ValueError("non-integer values in an integer matrix")
    except (KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"{str(path)!r}: malformed matrix {key!r}: {e}") from e
    return arr.astype(dtype).reshape(rows, cols)


def binarize_filter(w: np.ndarray, n_bases: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Approximate an ``8 x 8`` filter by binary bases, bit-exactly as OpenCV's ``FilterTIG``.

    Greedy: ``b_i = sign(residual)`` (``+1`` for ``>= 0``), ``beta_i = <residual, b_i> / 64``
    accumulated in float32 in row-major order, ``residual -= beta_i * b_i``.

    Args:
        w: ``(8, 8)`` float32 stage-I filter (``wS1``).
        n_bases: number of binary bases (OpenCV: 2).

    Returns:
        ``(signs (n_bases, 8, 8) float32 of +-1, coeffs (n_bases,) float32)``; the filter is
        approximated by ``sum_i coeffs[i] * signs[i]``.
    """
    res = np.asarray(w, dtype=np.float32).reshape(-1).copy()
    d = np.float32(res.size)
    signs, coeffs = [], []
    for _ in range(n_bases):
        b = np.where(res >= 0, np.float32(1), np.float32(-1))
        avg = np.float32(0)
        for j in range(res.size):  # sequential float32 sum: the order fixes the rounding
            avg = np.float32(avg + np.float32(res[j] * b[j]))
        avg = np.float32(avg / d)
        res = (res - np.float32(avg) * b).astype(np.float32)
        signs.append(b.reshape(np.shape(w)))
        coeffs.append(avg)
    return np.stack(signs).astype(np.float32), np.asarray(coeffs, dtype=np.float32)


@dataclass(frozen=True)
class BingModel:
    """One colour space's trained BING model.

    Attributes:
        color_space: ``"MAXBGR"``, ``"HSV"`` or ``"I"``.
        size_idx: ``(S,)`` int64 window-size indices ``r``; window ``(w, h) = (2**(r % 6 + 4),
            2**(r // 6 + 4))`` pixels.
        filter: ``(8, 8)`` float32 stage-I linear filter.
        calibration: ``(S, 2)`` float32 stage-II ``(scale, bias)`` per size.
        signs: ``(2, 8, 8)`` float32 binary bases of ``filter`` (see :func:`binarize_filter`).
        coeffs: ``(2,)`` float32 their coefficients.
    """

    color_space: str
    size_idx: np.ndarray
    filter: np.ndarray
    calibration: np.ndarray
    signs: np.ndarray
    coeffs: np.ndarray


def load_bing_model(model_dir: str | os.PathLike[str], color_space: str = "MAXBGR") -> BingModel:
    """Read and check one colour space's model from the folder OpenCV's ``setTrainingPath`` takes.

    Raises:
        FileNotFoundError: the folder or one of its three files is missing (the message names
            the folder, the expected file names and where to get them).
        ValueError: a file is unreadable or its matrices have the wrong shape.
    """
    cs = _check_color_space(color_space)
    files = _model_files(model_dir, cs)
    name = _model_name(cs)
    idx = read_opencv_matrix(files["idx"], name)
    w1 = read_opencv_matrix(files["wS1"], name)
    w2 = read_opencv_matrix(files["wS2"], name)
    if w1.shape != (_W, _W) or w1.dtype != np.float32:
        raise ValueError(f"{str(files['wS1'])!r}: expected an 8x8 float matrix, got {w1.shape} {w1.dtype}")
    if idx.size < 2 or not np.issubdtype(idx.dtype, np.integer) or (idx < 0).any():
        raise ValueError(f"{str(files['idx'])!r}: expected >= 2 non-negative size indices, got {idx.ravel()}")
    if w2.shape != (idx.size, 2):
        raise ValueError(
            f"{str(files['wS2'])!r}: expected a {idx.size}x2 matrix (one row per size in the idx "
            f"file), got {w2.shape}"
        )
    signs, coeffs = binarize_filter(w1)
    return BingModel(cs, idx.reshape(-1).astype(np.int64), w1, w2.astype(np.float32), signs, coeffs)


# ------------------------------------------------------------------------------------------
# The torch re-implementation


def _linear_exact_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Taps of OpenCV's bit-exact linear resize (``INTER_LINEAR_EXACT``) along one axis.

    Returns ``(i0, i1, w0, w1)``: ``out[k] = w0[k] * in[i0[k]] + w1[k] * in[i1[k]]`` with 8-bit
    fixed-point weights (``w0 + w1 = 256``); samples left/right of the source repeat its edge.
    """
    fval = (1.0 / (dst / src)) * (np.arange(dst, dtype=np.float64) + 0.5) - 0.5
    ival = np.floor(fval).astype(np.int64)
    w1 = np.rint((fval - ival) * 256.0).astype(np.int64)  # cvRound: half to even
    i0 = ival.copy()
    edge = (ival < 0) | (ival >= src - 1)
    i0[ival < 0] = 0
    i0[ival >= src - 1] = src - 1
    if src == 1:
        i0[:] = 0
        edge[:] = True
    w1[edge] = 0
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, 256 - w1, w1


@dataclass
class _Layout:
    """Everything that depends only on the working-image size (cached per size and device).

    All the resized images of one image are laid out as blocks of one mosaic: block ``(j, i)``
    is the image resized to ``(dws[i], dhs[j])``, at rows ``y_off[j]:`` and columns ``x_off[i]:``.
    The 8x8 window scores of the whole mosaic come from one convolution; windows that straddle
    two blocks are not valid, and the >= 7 invalid rows/columns between blocks keep the 5x5
    suppression of different blocks apart. Valid windows are listed block by block, each block
    in raster order.
    """

    height: int
    width: int
    sizes: list[tuple[int, int, int, int, int, int]]  # (ir, block, w, h, rx, ry), OpenCV's order
    n_blocks: int
    hx: tuple[torch.Tensor, ...]  # horizontal taps (i0, i1, w0, w1) over the mosaic columns
    vy: tuple[torch.Tensor, ...]  # vertical taps over the mosaic rows
    col_first: torch.Tensor  # mosaic columns that are a block's first / last column
    col_last: torch.Tensor
    row_first: torch.Tensor
    row_last: torch.Tensor
    valid_pos: torch.Tensor  # (V,) flat positions of valid windows in the score map
    valid_ppos: torch.Tensor  # (V,) the same in the score map padded by 2 (for the 5x5 NMS)
    valid_x: torch.Tensor  # (V,) window position within its block (resized-image pixels)
    valid_y: torch.Tensor
    valid_block: torch.Tensor  # (V,) block of each valid window
    block_hist: torch.Tensor  # (V,) int32 block * _HIST_BINS (histogram offsets)
    block_count: list[int]  # valid windows per block
    grid_shape: tuple[int, int]  # padded score map
    pos_bits: int  # bits of a score-map position in the sort key


def _make_layout(height: int, width: int, model: BingModel, device: torch.device) -> _Layout:
    sizes_wh: list[tuple[int, int, int, int, int]] = []  # (ir, w, h, dw, dh)
    for ir in range(len(model.size_idx) - 1, -1, -1):  # OpenCV's order: last size first
        r = int(model.size_idx[ir])
        h, w = 2 ** (r // _NUM_T + _MIN_T), 2 ** (r % _NUM_T + _MIN_T)
        if h > height * 2 or w > width * 2:
            continue
        h, w = min(h, height), min(w, width)
        # round() is half-to-even like cvRound
        sizes_wh.append((ir, w, h, round(_W * width / w), round(_W * height / h)))
    dws = sorted({s[3] for s in sizes_wh}, reverse=True)
    dhs = sorted({s[4] for s in sizes_wh}, reverse=True)
    x_off = np.concatenate([[0], np.cumsum(dws)])[:-1].astype(np.int64)
    y_off = np.concatenate([[0], np.cumsum(dhs)])[:-1].astype(np.int64)
    blocks: dict[tuple[int, int], int] = {}
    sizes = []
    for ir, w, h, dw, dh in sizes_wh:
        b = blocks.setdefault((dws.index(dw), dhs.index(dh)), len(blocks))
        sizes.append((ir, b, w, h, w // _W, h // _W))  # ratios: integer division as OpenCV

    def taps(src: int, dsts: list[int]) -> tuple[torch.Tensor, ...]:
        parts = [_linear_exact_taps(src, d) for d in dsts] or [(np.zeros(0, np.int64),) * 4]
        cat = [np.concatenate([p[k] for p in parts]) for k in range(4)]
        return tuple(
            torch.from_numpy(a).to(device, torch.int64 if k < 2 else torch.int32)
            for k, a in enumerate(cat)
        )

    sh, sw = int(sum(dhs)) - _W + 1, int(sum(dws)) - _W + 1
    pw = sw + 2 * _NSS
    pos, ppos, vx, vy, vb, counts = [], [], [], [], [], []
    for (i, j), b in blocks.items():
        ly, lx = np.meshgrid(np.arange(dhs[j] - _W + 1), np.arange(dws[i] - _W + 1), indexing="ij")
        ys, xs = (ly + y_off[j]).reshape(-1), (lx + x_off[i]).reshape(-1)
        pos.append(ys * sw + xs)
        ppos.append((ys + _NSS) * pw + xs + _NSS)
        vx.append(lx.reshape(-1))
        vy.append(ly.reshape(-1))
        vb.append(np.full(ys.size, b))
        counts.append(int(ys.size))
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)  # noqa: E731
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    vb_t = as_t(cat(vb))
    return _Layout(
        height=height,
        width=width,
        sizes=sizes,
        n_blocks=len(blocks),
        hx=taps(width, dws),
        vy=taps(height, dhs),
        col_first=as_t(x_off),
        col_last=as_t(x_off + np.asarray(dws) - 1),
        row_first=as_t(y_off),
        row_last=as_t(y_off + np.asarray(dhs) - 1),
        valid_pos=as_t(cat(pos)),
        valid_ppos=as_t(cat(ppos)),
        valid_x=as_t(cat(vx)),
        valid_y=as_t(cat(vy)),
        valid_block=vb_t,
        block_hist=(vb_t * _HIST_BINS).to(torch.int32),
        block_count=counts,
        grid_shape=(sh + 2 * _NSS, pw),
        pos_bits=max(1, (max(sh * sw, 1) - 1).bit_length()),
    )


_SDIV = np.zeros(256, np.int64)
_HDIV = np.zeros(256, np.int64)
_SDIV[1:] = np.rint((255 << 12) / np.arange(1, 256, dtype=np.float64))
_HDIV[1:] = np.rint((180 << 12) / (6.0 * np.arange(1, 256, dtype=np.float64)))


def _to_color_space(rgb: torch.Tensor, color_space: str) -> torch.Tensor:
    """``(3, H, W)`` int16 RGB -> OpenCV's 8-bit ``BGR2HSV`` (``(3, H, W)``: H, S, V) or
    ``BGR2GRAY`` (``(1, H, W)``), bit-exact; MAXBGR uses the colours as they are."""
    if color_space == "MAXBGR":
        return rgb
    r, g, b = rgb.to(torch.int32).unbind(0)
    if color_space == "I":
        return ((b * 3735 + g * 19235 + r * 9798 + (1 << 14)) >> 15).to(torch.int16)[None]
    v = torch.maximum(torch.maximum(b, g), r)
    diff = v - torch.minimum(torch.minimum(b, g), r)
    sdiv = torch.as_tensor(_SDIV, dtype=torch.int32, device=rgb.device)
    hdiv = torch.as_tensor(_HDIV, dtype=torch.int32, device=rgb.device)
    s = (diff * sdiv[v.long()] + (1 << 11)) >> 12
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff.long()] + (1 << 11)) >> 12
    h = h + (h < 0).to(h.dtype) * 180
    return torch.stack([h, s, v]).to(torch.int16)


def _channel_dist(a: torch.Tensor, b: torch.Tensor, color_space: str) -> torch.Tensor:
    """OpenCV's colour distances over the channel dim 0: ``bgrMaxDist`` (MAXBGR), ``vecDist3b``
    (HSV, L1) or ``abs`` (gray)."""
    d = (a - b).abs_()
    if color_space == "HSV":
        return d.sum(0, dtype=d.dtype)
    return d.amax(0) if d.shape[0] > 1 else d[0]


def _normed_gradient(img: torch.Tensor, lay: _Layout, color_space: str) -> torch.Tensor:
    """OpenCV's ``gradientRGB`` / ``gradientHSV`` / ``gradientGray`` on every block of the
    ``(C, H, W)`` mosaic, then ``min(Ix + Iy, 255)``; returns ``(H, W)`` int16."""
    edge_mul, half = (1, 2) if color_space == "HSV" else (2, 1)
    _, mh, mw = img.shape
    ix = torch.empty(mh, mw, dtype=img.dtype, device=img.device)
    iy = torch.empty_like(ix)
    # inner pixels: central differences (halved for HSV); block borders: one-sided
    # differences, doubled for MAXBGR and gray
    ix[:, 1:-1] = _channel_dist(img[:, :, 2:], img[:, :, :-2], color_space)
    iy[1:-1] = _channel_dist(img[:, 2:], img[:, :-2], color_space)
    if half != 1:
        ix //= half
        iy //= half
    cf, cl, rf, rl = lay.col_first, lay.col_last, lay.row_first, lay.row_last
    ix[:, cf] = _channel_dist(img.index_select(2, cf + 1), img.index_select(2, cf), color_space) * edge_mul
    ix[:, cl] = _channel_dist(img.index_select(2, cl), img.index_select(2, cl - 1), color_space) * edge_mul
    iy[rf] = _channel_dist(img.index_select(1, rf + 1), img.index_select(1, rf), color_space) * edge_mul
    iy[rl] = _channel_dist(img.index_select(1, rl), img.index_select(1, rl - 1), color_space) * edge_mul
    return ix.add_(iy).clamp_(max=255)


def _greedy_nms(cand_ppos: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
    """Exact greedy 5x5 non-maximum suppression of candidates given in rank order.

    ``cand_ppos`` (N,) int64 are flat positions in the score map padded by 2 on each side
    (``grid_shape``), best first within each block (blocks never touch). OpenCV visits windows
    best first and keeps one unless a kept window lies within Chebyshev distance 2. Computed here in parallel rounds: a window is kept once all its better
    neighbours are suppressed, and suppressed as soon as one better neighbour is kept. Each
    window's neighbour list is visited at most twice, and the arrays are compacted to the open
    windows as these dwindle, so the work is O(24 N) plus a few small tensor ops per round.
    Returns an (N,) bool mask of kept windows.
    """
    dev = cand_ppos.device
    n = cand_ppos.numel()
    pw = grid_shape[1]
    # candidate index at each position of the padded score map; n = none (the sentinel)
    grid = torch.full((grid_shape[0] * pw,), n, dtype=torch.int32, device=dev)
    ar = torch.arange(n, dtype=torch.int32, device=dev)
    grid[cand_ppos] = ar
    # the 5x5 neighbourhood of every candidate (itself included) as one strided gather
    win = grid.as_strided((grid.numel() - 2 * _NSS * (pw + 1), 2 * _NSS + 1, 2 * _NSS + 1), (1, pw, 1))
    nb = win[cand_ppos - _NSS * (pw + 1)].view(n, -1)
    del grid, win
    # s = -1 where the neighbour is worse (higher index) or absent (n), else 0; branch-free
    # selects are much faster here than torch.where / masked_fill
    s = ar[:, None] - nb
    s >>= 31
    # pending: better neighbours not yet suppressed (24 others minus worse-or-absent ones);
    # decided windows (and the sentinel n) get pending >= _DONE
    pending = torch.empty(n + 1, dtype=torch.int64, device=dev)
    pending[:n] = s.sum(1, dtype=torch.int32)
    pending[:n] += (2 * _NSS + 1) ** 2 - 1
    pending[n] = _DONE
    low = nb.sub_(n).bitwise_and_(s).add_(n)  # worse neighbours; n = none (self included)
    del s, nb
    kept_parts = []
    orig = torch.arange(n, device=dev)  # current index -> original index
    cur = n_open = n
    ready = torch.nonzero(pending == 0).squeeze(1)
    while ready.numel():
        kept_parts.append(orig.index_select(0, ready))
        pending.index_fill_(0, ready, _DONE)
        # the open worse neighbours of kept windows are suppressed
        hit = torch.zeros(cur + 1, dtype=torch.bool, device=dev)
        hit.index_fill_(0, low.index_select(0, ready).reshape(-1).long(), True)
        hit &= pending < _DONE // 2  # decided ones only ever drop by <= 25 N
        pending.masked_fill_(hit, _DONE)
        sup = torch.nonzero(hit).squeeze(1)
        # ... and no longer hold back their own worse neighbours
        pending -= torch.bincount(low.index_select(0, sup).reshape(-1), minlength=cur + 1)
        n_open -= ready.numel() + sup.numel()
        ready = torch.nonzero(pending == 0).squeeze(1)
        if 0 < n_open < cur // 2:
            # keep only the open windows; links to decided ones go to the new sentinel
            keep = torch.nonzero(pending < _DONE // 2).squeeze(1)
            n_open = keep.numel()
            remap = torch.full((cur + 1,), n_open, dtype=torch.int32, device=dev)
            remap[keep] = torch.arange(n_open, dtype=torch.int32, device=dev)
            low = remap.index_select(0, low.index_select(0, keep).reshape(-1)).view(n_open, -1)
            pending = torch.cat([pending.index_select(0, keep), pending.new_full((1,), _DONE)])
            orig = orig.index_select(0, keep)
            ready = remap.index_select(0, ready).long()
            cur = n_open
    kept = torch.zeros(n, dtype=torch.bool, device=dev)
    if kept_parts:
        kept[torch.cat(kept_parts)] = True
    return kept


_THREADS_LOCK = threading.Lock()
_threads = {"users": 0, "saved": 0}  # concurrent calls inside _torch_threads, torch's setting


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op CPU threads inside the block (torch's setting is process-wide: it is
    restored when the last concurrent user leaves)."""
    if n is None:
        yield
        return
    with _THREADS_LOCK:
        if _threads["users"] == 0:
            _threads["saved"] = torch.get_num_threads()
            if _threads["saved"] != n:
                torch.set_num_threads(n)
        _threads["users"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _threads["users"] -= 1
            if _threads["users"] == 0 and torch.get_num_threads() != _threads["saved"]:
                torch.set_num_threads(_threads["saved"])


class BingGenerator(ProposalGenerator):
    """BING objectness proposals computed with torch: OpenCV's algorithm and models, vectorised.

    Reads the same model files as ``cv2.saliency.ObjectnessBING`` and reproduces its boxes
    exactly (same integer coordinates, same order) for one colour space, with OpenCV's own
    fixed-point resize, colour conversion, gradient quantisation, binarised filter and greedy
    non-maximum suppression. Runs on any torch device.

    Args:
        model_dir: folder with ``ObjNessB2W8<color_space>.{idx,wS1,wS2}.yml.gz`` (get it from
            opencv_contrib ``modules/saliency/samples/ObjectnessTrainedModel``); ``None``:
            ``$OBJCROP_BING_MODEL``.
        top_k: boxes kept per image (paper: 10).
        max_side: longest side of the working image.
        nms_iou: IoU threshold of the final box NMS (``None``: off).
        min_side: smallest box side kept, in working-image pixels.
        color_space: ``"MAXBGR"`` (default, OpenCV's first), ``"HSV"`` or ``"I"`` (gray).
        device: torch device for the computation, e.g. ``"cuda"``.
        per_size: windows kept per window size before the final sort (OpenCV: 250), as
            :meth:`objectness` returns them.
        candidates_per_size: the same limit when only the ``top_k`` best boxes are wanted
            (``__call__`` / :meth:`raw`); default ``max(40, 4 * top_k)``. The best boxes of a
            size come first in its list, so a short list gives the same top-k as OpenCV's full
            one (tested) at about 1.8x the speed; ``None`` on the instance means ``per_size``.
        num_threads: torch intra-op threads during a call on the CPU (``None``: torch's current
            setting). The work is many small tensor ops that gain little from more threads and
            slow down badly when the cores are shared; for throughput run one process per core.

    Input: ``(H, W, 3)`` uint8 RGB array or PIL image.

    Output: ``(boxes (K, 4) float32 xyxy pixels, scores (K,) float32)``, best first; scores are
    the calibrated stage-II objectness.

    Example:
        >>> gen = BingGenerator("../shared/models/bing")  # doctest: +SKIP
        >>> boxes, scores = gen(np.zeros((480, 640, 3), np.uint8))  # doctest: +SKIP
        >>> boxes.shape[1], boxes.dtype
        (4, dtype('float32'))
    """

    name: ClassVar[str] = "bing"
    kind: ClassVar[str] = "generator"

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        top_k: int = 10,
        max_side: int = 512,
        nms_iou: float | None = 0.7,
        min_side: float = 4.0,
        color_space: str = "MAXBGR",
        device: str | torch.device = "cpu",
        per_size: int = _PER_SIZE,
        num_threads: int | None = 1,
        candidates_per_size: int | None = -1,
    ) -> None:
        super().__init__(top_k=top_k, max_side=max_side, nms_iou=nms_iou, min_side=min_side)
        if candidates_per_size == -1:
            candidates_per_size = max(40, 4 * self.top_k)
        self.candidates_per_size = candidates_per_size
        self.model_dir = _resolve_model_dir(model_dir)
        self.color_space = _check_color_space(color_space)
        self.device = str(device)
        if int(per_size) < 1:
            raise ValueError(f"{self.name}: need per_size >= 1, got {per_size}")
        self.per_size = int(per_size)
        if num_threads is not None and int(num_threads) < 1:
            raise ValueError(f"{self.name}: need num_threads >= 1 or None, got {num_threads}")
        self.num_threads = None if num_threads is None else int(num_threads)
        self._model = load_bing_model(self.model_dir, self.color_space)
        self._dev = torch.device(device)
        self._weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._layouts: OrderedDict[tuple[int, int], _Layout] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_weights"] = None
        state["_layouts"] = OrderedDict()
        return state

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def _layout(self, height: int, width: int) -> _Layout:
        key = (height, width)
        lay = self._layouts.get(key)
        if lay is None:
            lay = _make_layout(height, width, self._model, self._dev)
            self._layouts[key] = lay
            if len(self._layouts) > 32:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return lay

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._weights is None:
            m = self._model
            self._weights = (
                torch.from_numpy(m.signs).to(self._dev).unsqueeze(1),  # (2, 1, 8, 8)
                torch.from_numpy(m.coeffs).to(self._dev),
                torch.from_numpy(m.calibration).to(self._dev),
            )
        return self._weights

    def objectness(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All windows OpenCV would return for ``image``, in OpenCV's order and convention.

        Args:
            image: ``(H, W, 3)`` uint8 RGB (no resizing is done here).

        Returns:
            ``boxes (N, 4) int32`` as OpenCV's ``Vec4i`` ``(minX, minY, maxX, maxY)`` with 1-based
            ``minX``/``minY`` (pixel columns ``minX - 1 .. maxX - 1``), and ``scores (N,)
            float32`` calibrated objectness, descending; ``N <= per_size * sizes``.
        """
        return self._run(image, self.per_size)

    def _run(self, image: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        threads = self.num_threads if self._dev.type == "cpu" else None
        self._limit = int(limit)
        with torch.no_grad(), _torch_threads(threads):
            return self._objectness(image)

    def _objectness(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: expected an (H, W, 3) uint8 RGB image, got {img.shape} {img.dtype}"
            )
        if not (img.flags.c_contiguous and img.flags.writeable):
            img = np.array(img, order="C")
        height, width = img.shape[:2]
        lay = self._layout(height, width)
        if not lay.sizes:
            return np.zeros((0, 4), np.int32), np.zeros(0, np.float32)
        signs, coeffs, calib = self._tensors()
        x = torch.from_numpy(img).to(self._dev)

        # 1. every resized image at once: OpenCV's INTER_LINEAR_EXACT is an integer bilinear
        # form rounded once at the end, so rows first then columns gives the same bytes
        j0, j1, v0, v1 = lay.vy
        t = x.index_select(0, j0) * v0[:, None, None]
        t += x.index_select(0, j1) * v1[:, None, None]
        i0, i1, w0, w1 = lay.hx
        mos = t.index_select(1, i0) * w0[None, :, None]
        mos += t.index_select(1, i1) * w1[None, :, None]
        del t
        mos.add_(1 << 15).bitwise_right_shift_(16)
        mos = mos.permute(2, 0, 1).to(torch.int16, memory_format=torch.contiguous_format)

        # 2. normed gradient bytes; only their top 4 bits reach the filter
        mos = _to_color_space(mos, self.color_space)
        q = (_normed_gradient(mos, lay, self.color_space) >> 4).to(torch.float32)
        del mos

        # 3. stage I: binary bases on the 4-bit gradient give exact small integers; then OpenCV's
        # float32 combination c0 * bc0 + c1 * bc1 (two roundings, no fused multiply-add)
        bc = torch.round(F.conv2d(q[None, None], signs))[0]
        score = bc[0] * coeffs[0] + bc[1] * coeffs[1]
        val = score.reshape(-1).index_select(0, lay.valid_pos) + 0.0  # + 0.0: no negative zeros
        if 32 + lay.pos_bits + max(1, (lay.n_blocks - 1).bit_length()) > 63:
            raise ValueError(f"{self.name}: working image {width}x{height} too large; lower max_side")

        # 4. greedy NMS per block, 5. stage II and the final sort
        idx, blk = self._suppress(val, lay)
        return self._assemble(idx, blk, val, lay, calib)

    def _top_windows(
        self, val: torch.Tensor, lay: _Layout, want: dict[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The ``want[b]`` best windows of each block ``b``, in OpenCV's visiting order (value
        descending, then the later raster position first).

        Returns ``(cand, seg, blocks)``: indices into the valid-window arrays, grouped by block in
        the order ``blocks``, and the segment (position in ``blocks``) of each.
        """
        dev = val.device
        nb = lay.n_blocks
        blocks = sorted(want, reverse=True)
        m = [want[b] for b in blocks]
        vb = lay.valid_block
        if any(want.get(b, 0) < c for b, c in enumerate(lay.block_count)):
            # A histogram of the values of each block gives a value bin above which the block
            # has enough windows; only those (a set closed under "better") are sorted.
            need = torch.zeros(nb, dtype=torch.int64, device=dev)
            need[torch.tensor(blocks, device=dev)] = torch.tensor(m, device=dev)
            lo, hi = torch.aminmax(val)
            bins = ((val - lo) * ((_HIST_BINS - 1) / torch.clamp(hi - lo, min=1e-30))).to(torch.int32)
            hist = torch.bincount(lay.block_hist + bins, minlength=nb * _HIST_BINS)
            above = hist.view(nb, _HIST_BINS).flip(1).cumsum(1).flip(1)
            thr = (above >= need[:, None]).sum(1) - 1
            thr[need == 0] = _HIST_BINS  # blocks not wanted: nothing
            sub = torch.nonzero(bins >= thr.index_select(0, vb)).squeeze(1)
        else:
            sub = torch.arange(vb.numel(), device=dev)
        sb = vb.index_select(0, sub)
        bits = val.index_select(0, sub).view(torch.int32)
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64) + (1 << 31)
        pb = lay.pos_bits
        key = (sb << (32 + pb)) | (bits << pb) | lay.valid_pos.index_select(0, sub)
        order = torch.sort(key, descending=True).indices
        # blocks come out in descending id; each block's run starts after all higher ids
        cnt = torch.bincount(sb, minlength=nb)
        start = cnt.flip(0).cumsum(0).flip(0) - cnt
        m_t = torch.tensor(m, device=dev)
        seg = torch.repeat_interleave(torch.arange(len(blocks), device=dev), m_t, output_size=sum(m))
        base = start.index_select(0, torch.tensor(blocks, device=dev)) - (torch.cumsum(m_t, 0) - m_t)
        sel = base.index_select(0, seg) + torch.arange(sum(m), device=dev)
        return sub.index_select(0, order.index_select(0, sel)), seg, blocks

    def _suppress(self, val: torch.Tensor, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy NMS of each block; its first ``per_size`` kept windows in visiting order.

        Returns ``(idx, block)``: the kept windows (indices into the valid-window arrays),
        grouped by block in ascending block order, and their blocks.
        """
        dev = val.device
        # Among a block's m best windows at least m / 25 are kept (a kept window suppresses at
        # most 24), so 25 * per_size always suffice; most blocks need far fewer: try a shorter
        # prefix first and redo only the blocks that came short.
        full = 25 * self._limit
        want = {b: min(c, 12 * self._limit) for b, c in enumerate(lay.block_count)}
        out: dict[int, torch.Tensor] = {}
        while want:
            cand, seg, blocks = self._top_windows(val, lay, want)
            kept = _greedy_nms(lay.valid_ppos.index_select(0, cand), lay.grid_shape)
            kidx = torch.nonzero(kept).squeeze(1)
            kseg = seg.index_select(0, kidx)
            nk = torch.bincount(kseg, minlength=len(blocks))
            krank = torch.arange(kidx.numel(), device=dev) - (torch.cumsum(nk, 0) - nk).index_select(0, kseg)
            take = torch.nonzero(krank < self._limit).squeeze(1)
            kc = cand.index_select(0, kidx.index_select(0, take))
            ks = kseg.index_select(0, take)
            nk_list = nk.tolist()
            retry = {}
            for i, b in enumerate(blocks):
                if nk_list[i] < self._limit and want[b] < min(lay.block_count[b], full):
                    retry[b] = min(lay.block_count[b], full)
                else:
                    out[b] = kc[ks == i]
            want = retry
        order = sorted(out)
        idx = torch.cat([out[b] for b in order])
        return idx, lay.valid_block.index_select(0, idx)

    def _assemble(
        self, idx: torch.Tensor, blk: torch.Tensor, val: torch.Tensor, lay: _Layout, calib: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """Boxes of every size in OpenCV's insertion order (sizes from the last one, windows in
        visiting order), stage-II scores, and OpenCV's final sort."""
        dev = idx.device
        n_per_block = torch.bincount(blk, minlength=lay.n_blocks)
        first = torch.cumsum(n_per_block, 0) - n_per_block
        nb_list, first_list = n_per_block.tolist(), first.tolist()
        parts, prm = [], []
        for ir, b, w, h, rx, ry in lay.sizes:
            n = nb_list[b]
            parts.append(torch.arange(first_list[b], first_list[b] + n, device=dev))
            prm.append(torch.tensor([[ir, w, h, rx, ry]], device=dev).expand(n, 5))
        win = idx.index_select(0, torch.cat(parts))
        ir, w, h, rx, ry = torch.cat(prm).unbind(1)
        x1 = lay.valid_x.index_select(0, win) * rx
        y1 = lay.valid_y.index_select(0, win) * ry
        boxes = torch.stack(
            [x1 + 1, y1 + 1, torch.clamp(x1 + w, max=lay.width), torch.clamp(y1 + h, max=lay.height)],
            1,
        )
        # stage II in float32 (separate multiply and add, as OpenCV)
        cal = calib.index_select(0, ir)
        s2 = val.index_select(0, win) * cal[:, 0] + cal[:, 1]
        # OpenCV sorts (score, insertion index) pairs descending: ties go to the later window
        rev = torch.arange(s2.numel() - 1, -1, -1, device=dev)
        o = rev.index_select(0, torch.sort(s2.index_select(0, rev), descending=True, stable=True).indices)
        return (
            boxes.index_select(0, o).to(torch.int32).cpu().numpy(),
            s2.index_select(0, o).cpu().numpy().astype(np.float32, copy=False),
        )

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate boxes ``(N, 4)`` float32 xyxy and calibrated scores ``(N,)``, best first
        (each size's ``candidates_per_size`` best; see the class)."""
        limit = self.per_size
        if self.candidates_per_size is not None:
            limit = min(limit, int(self.candidates_per_size))
        boxes, scores = self._run(image, limit)
        return _vec4i_to_xyxy(boxes), scores


def _vec4i_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """OpenCV BING's ``(minX, minY, maxX, maxY)`` with 1-based min -> xyxy pixel edges."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, :2] -= 1.0
    return b


# ------------------------------------------------------------------------------------------
# The OpenCV reference

_FD_LOCK = threading.Lock()


def _reset_lock() -> None:  # a fork while another thread held the lock must not deadlock
    global _FD_LOCK
    _FD_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock)


def _c_fflush() -> None:
    """Flush C stdio buffers: OpenCV's printf output must reach /dev/null before fd 1 returns."""
    try:
        libc = ctypes.CDLL(None) if os.name == "posix" else ctypes.cdll.msvcrt
        libc.fflush(None)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def silence_fds(fds: tuple[int, ...] = (1, 2)) -> Iterator[None]:
    """Send everything written to the OS-level ``fds`` (default stdout and stderr) to the null
    device, including output of C/C++ code, and restore them afterwards, also on exceptions.

    Calls are serialised by a process-wide lock; output of *other* threads during the block is
    discarded too (the descriptors are per process).
    """
    with _FD_LOCK:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()
        _c_fflush()
        saved: list[tuple[int, int]] = []
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                for fd in fds:
                    try:
                        copy = os.dup(fd)
                    except OSError:  # descriptor not open: nothing to silence
                        continue
                    saved.append((fd, copy))
                    os.dup2(null, fd)
            finally:
                os.close(null)
            yield
        finally:
            _c_fflush()
            for fd, copy in reversed(saved):
                os.dup2(copy, fd)
                os.close(copy)


def _rmtree(path: str, owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked child must not remove its parent's folder
        return
    shutil.rmtree(path, ignore_errors=True)


class OpenCVBingGenerator(ProposalGenerator):
    """BING proposals from OpenCV's ``cv2.saliency.ObjectnessBING`` (the reference).

    Needs ``opencv-contrib-python-headless`` (the extra ``objcrop-plugin[proposals]``). OpenCV
    is made to run one colour space (its default runs all three and concatenates the lists; the
    head of that list is the MAXBGR list), and its console output and result file are suppressed.

    Args:
        model_dir: folder with ``ObjNessB2W8<color_space>.{idx,wS1,wS2}.yml.gz`` (get it from
            opencv_contrib ``modules/saliency/samples/ObjectnessTrainedModel``); ``None``:
            ``$OBJCROP_BING_MODEL``.
        top_k, max_side, nms_iou, min_side: as :class:`ProposalGenerator`.
        color_space: ``"MAXBGR"`` (default), ``"HSV"`` or ``"I"``.
        num_threads: OpenCV threads during a call (``None``: leave OpenCV's setting).

    Input: ``(H, W, 3)`` uint8 RGB array or PIL image.

    Output: ``(boxes (K, 4) float32 xyxy pixels, scores (K,) float32)``. OpenCV does not expose
    its calibrated scores (``getobjectnessValues`` is ``rank + 300``), so ``scores = -rank`` in
    OpenCV's list; the order is OpenCV's.

    Example:
        >>> gen = OpenCVBingGenerator("../shared/models/bing")  # doctest: +SKIP
        >>> boxes, scores = gen(np.zeros((480, 640, 3), np.uint8))  # doctest: +SKIP
    """

    name: ClassVar[str] = "bing_opencv"
    kind: ClassVar[str] = "generator"

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        top_k: int = 10,
        max_side: int = 512,
        nms_iou: float | None = 0.7,
        min_side: float = 4.0,
        color_space: str = "MAXBGR",
        num_threads: int | None = 1,
    ) -> None:
        super().__init__(top_k=top_k, max_side=max_side, nms_iou=nms_iou, min_side=min_side)
        self.model_dir = _resolve_model_dir(model_dir)
        self.color_space = _check_color_space(color_space)
        if num_threads is not None and int(num_threads) < 1:
            raise ValueError(f"{self.name}: need num_threads >= 1 or None, got {num_threads}")
        self.num_threads = None if num_threads is None else int(num_threads)
        self._files = _model_files(self.model_dir, self.color_space)
        load_bing_model(self.model_dir, self.color_space)  # clear errors now, not asserts in C++
        _saliency_module()
        self._cv: Any = None
        self._tmp: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cv"] = None
        state["_tmp"] = None
        return state

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def _detector(self) -> Any:
        if self._cv is not None:
            return self._cv
        tmp = tempfile.mkdtemp(prefix="objcrop-bing-")
        weakref.finalize(self, _rmtree, tmp, os.getpid())
        model = os.path.join(tmp, "model")
        os.mkdir(model)
        for src in self._files.values():  # only this colour space: OpenCV skips the others
            dst = os.path.join(model, src.name)
            try:
                os.symlink(src.resolve(), dst)
            except OSError:
                shutil.copyfile(src, dst)
        # OpenCV writes "<results>/BBoxesB2W8I/bb.txt" on every call; a results path below a
        # regular file can never be created, so nothing is written.
        blocker = os.path.join(tmp, "no-results")
        Path(blocker).touch()
        if len(blocker) > 900:  # OpenCV copies the results path into a 1024-byte buffer
            raise RuntimeError(f"temporary folder path too long for OpenCV: {tmp!r}; set TMPDIR")
        det = _saliency_module().ObjectnessBING.create()
        det.setTrainingPath(model)
        det.setBBResDir(os.path.join(blocker, "x"))
        self._tmp, self._cv = tmp, det
        return det

    def objectness(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """OpenCV's result for ``image``: ``boxes (N, 4) int32`` ``Vec4i`` (1-based min corner)
        and its ``getobjectnessValues()`` ``(N,)`` float32, in OpenCV's order."""
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"{self.name}: expected an (H, W, 3) uint8 RGB image, got {img.shape} {img.dtype}")
        bgr = np.ascontiguousarray(img[..., ::-1])
        det = self._detector()
        cv2 = sys.modules["cv2"]
        with silence_fds():  # also serialises the calls (OpenCV's BING is not thread-safe)
            before = cv2.getNumThreads()
            if self.num_threads is not None:
                cv2.setNumThreads(self.num_threads)
            try:
                ok, boxes = det.computeSaliency(bgr)
                values = det.getobjectnessValues()
            finally:
                cv2.setNumThreads(before)
        if not ok or boxes is None:
            return np.zeros((0, 4), np.int32), np.zeros(0, np.float32)
        return np.asarray(boxes, np.int32).reshape(-1, 4), np.asarray(values, np.float32).reshape(-1)

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate boxes ``(N, 4)`` float32 xyxy in OpenCV's order, scores ``-rank``."""
        boxes, _ = self.objectness(image)
        return _vec4i_to_xyxy(boxes), -np.arange(len(boxes), dtype=np.float32)


def _saliency_module() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "OpenCVBingGenerator needs OpenCV with the contrib modules: pip install "
            "opencv-contrib-python-headless (or objcrop-plugin[proposals]); BingGenerator needs "
            "no OpenCV"
        ) from e
    sal = getattr(cv2, "saliency", None)
    if sal is None or not hasattr(sal, "ObjectnessBING"):
        raise ImportError(
            f"this OpenCV ({cv2.__version__}) lacks cv2.saliency.ObjectnessBING (a contrib "
            "module): pip install opencv-contrib-python-headless instead of opencv-python"
        )
    return sal
