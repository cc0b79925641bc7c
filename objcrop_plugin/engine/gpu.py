"""The GPU view engine: decoded canvases + crop windows -> object-aware views, batched on the device.

The CPU engine (:mod:`objcrop_plugin.engine.cpu`) cuts, resizes and augments every view in the
DataLoader workers, which is where SSL training usually runs out of CPU. This engine splits the
work instead:

- **Worker side** (:class:`CanvasDataset`): decode each image (EXIF upright, JPEG draft mode when
  the canvas is much smaller than the image), shrink it to fit a fixed canvas keeping its aspect
  ratio (never enlarging it), pad with zeros, and plan the crop windows with the view recipe,
  exactly as the CPU engine does (same ``sample_rng(seed, index, epoch)`` stream, so the same
  windows). An item is a ``uint8`` canvas, its windows in canvas pixels, the valid region, a
  photometric seed, the target and the key; :func:`collate_canvas` just stacks them.
- **Device side** (:class:`GPUViewEngine`): after the batch reached the device, for each group
  of view slots of one output size, one batched resample of all ``B x V`` windows, then the
  method's photometric augmentations with per-sample random parameters, then normalisation.

Resampling (``antialias=True``, the default) is PIL's ``Image.resize(size, BILINEAR, box=...)``,
the CPU engine's kernel, computed as two batched matrix products: every output pixel is a
triangle-filtered average over the window whose support widens with the downscale factor
(antialiasing), renormalised at the image border. The weights are built on the device from the
windows, so windows are arbitrary sub-pixel boxes and no host synchronisation happens. With
``antialias=False`` views are bilinearly sampled with ``grid_sample`` (cost independent of the
canvas size, aliasing when a window is shrunk a lot); for windows that are enlarged the two
paths agree. Kornia's ``crop_by_transform_mat`` computes the same bilinear sampling but pads at
the canvas border, not the image's (views touching the padded side would blend in the zeros),
and has no antialiasing; the explicit grid and the matmul path avoid both.

Photometrics follow :mod:`objcrop_plugin.engine.photometric` (the presets of lightly's
transforms): flip, colour jitter (brightness, contrast, saturation, hue in each sample's own
random order, torchvision's tensor semantics), grayscale (ITU-R 601), Gaussian blur with
per-sample sigma (Kornia's ``gaussian_blur2d``), solarisation (before or after the blur, per
preset), ImageNet normalisation. Every operation runs on all rows at once with per-row factors
(rows without it are selected back unchanged), and nothing synchronises with the host. Kornia's
``adjust_brightness`` adds rather than multiplies and its ``adjust_hue`` converts to HSV and
back; the colour jitter is therefore written out here with torchvision's semantics (tested
against torchvision's kernels), the hue shift straight from the channel extremes. Their
random parameters are drawn on the device by :func:`draw_photometric` from counter-based
uniforms keyed by a per-sample seed that the dataset draws from the sample's own generator,
so a sample's views depend only on ``(seed, epoch, index, rank)``, never on the batch it landed
in, and the distributions equal :meth:`Photometric.draw`'s (tested).

Agreement with the CPU engine (photometrics off, same windows, image no larger than the canvas):
within PIL's 8-bit rounding, about 1/255 (tested: mean absolute difference < 0.5/255, maximum
<= 3/255). When the canvas is smaller than the image the views are cut from the shrunk canvas:
sharper detail than the canvas holds is lost (choose the canvas about twice the global view
size, the default). Photometric kernels agree with PIL's within a few 1/255 (PIL rounds to 8
bits after each operation and quantises hue to 1/255 of a turn; PIL's blur is a three-pass box
approximation of the Gaussian).

Wiring:

- plain PyTorch or lightly loops: :class:`DeviceViewLoader` wraps the DataLoader and yields
  ``(views, targets, filenames)`` already on the device;
- Lightning: :func:`apply_gpu_views` (or :class:`GPUViewsMixin`) in the module's
  ``on_after_batch_transfer``; ``objcrop train`` with ``crop.engine: gpu`` and
  ``objcrop-solo`` use it that way.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from objcrop_plugin.engine.gpu import (
    ...     CanvasDataset, DeviceViewLoader, GPUViewEngine, collate_canvas)
    >>> ds = CanvasDataset("images/", "train.objcrop", views="obj_obj_dilate")  # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=256, num_workers=8, pin_memory=True,
    ...                     collate_fn=collate_canvas)  # doctest: +SKIP
    >>> engine = GPUViewEngine("obj_obj_dilate", photometrics="mocov2")
    >>> for views, targets, keys in DeviceViewLoader(loader, engine, "cuda"):  # doctest: +SKIP
    ...     x0, x1 = views

References:
    - Mishra et al., "Object-aware Cropping for Self-Supervised Learning", TMLR 2022,
      https://arxiv.org/abs/2112.00319
    - Riba et al., "Kornia: an Open Source Differentiable Computer Vision Library for
      PyTorch", WACV 2020.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .._random import distributed_rank, sample_rng
from ..policies import ViewRecipe, make_recipe
from ..proposals.store import ProposalStore
from .cpu import ObjectCropDataset
from .decode import OpenedImage, load_rgb, open_image
from .photometric import Photometric, PhotometricParams, PhotometricSet
from .photometric import photometrics as photometrics_set

__all__ = [
    "CANVAS_KEYS",
    "CanvasDataset",
    "DeviceViewLoader",
    "GPUViewEngine",
    "GPUViewsMixin",
    "PhotometricBatch",
    "apply_gpu_views",
    "apply_photometric",
    "collate_canvas",
    "draw_photometric",
    "fit_to_canvas",
    "is_canvas_batch",
    "photometric_uniforms",
    "resample_windows",
]

#: the fields of a canvas item and of a collated canvas batch
CANVAS_KEYS = ("canvas", "windows", "valid", "seed", "target", "key")

#: uniforms drawn per (sample, view slot); see :func:`draw_photometric`
N_DRAWS = 14

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision
_SEED_HIGH = 2**63 - 1


def _kornia() -> ModuleType:
    try:
        import kornia
        import kornia.filters  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the GPU view engine needs kornia for its per-sample Gaussian blur, which could not be "
            f"imported ({type(exc).__name__}: {exc}). Fix: pip install \"objcrop-plugin[gpu]\""
        ) from exc
    return kornia


# ------------------------------------------------------------------------------ worker side

def _canvas_size(canvas: int | Sequence[int] | None, recipe: ViewRecipe) -> tuple[int, int]:
    if canvas is None:
        return (2 * max(v.size[0] for v in recipe.views), 2 * max(v.size[1] for v in recipe.views))
    if isinstance(canvas, (int, np.integer)):
        h = w = int(canvas)
    else:
        try:
            h, w = (int(c) for c in canvas)
        except Exception as exc:
            raise ValueError(
                f"canvas must be an int or (height, width), got {canvas!r}"
            ) from exc
    if h < 2 or w < 2:
        raise ValueError(f"canvas must be at least 2 x 2 pixels, got {canvas!r}")
    return h, w


def _fit(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """Size ``(w, h)`` of an image of ``size`` shrunk (never enlarged) to fit ``canvas (H, W)``."""
    w, h = size
    s = min(1.0, canvas[1] / w, canvas[0] / h)
    return max(1, min(canvas[1], round(w * s))), max(1, min(canvas[0], round(h * s)))


def fit_to_canvas(image: Image.Image, canvas: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Shrink an RGB image to fit ``canvas`` (height, width), keeping its aspect ratio; pad.

    Input: a PIL RGB image. Images that already fit are not resized.

    Output: a ``uint8`` tensor ``(3, H, W)``, the image at the top left, zeros elsewhere, and
    the valid region's ``(width, height)``.
    """
    nw, nh = _fit(image.size, canvas)
    if (nw, nh) != image.size:
        # reducing_gap: a box pre-reduction for large factors, visually identical and faster
        image = image.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    out = torch.zeros((3, canvas[0], canvas[1]), dtype=torch.uint8)
    arr = np.array(image.convert("RGB"), dtype=np.uint8)  # writable: torch shares it
    out[:, :nh, :nw] = torch.from_numpy(arr).permute(2, 0, 1)
    return out, (nw, nh)


def _draft_reduce(opened: OpenedImage, fitted: tuple[int, int]) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) whose decoded image is still >= ``fitted``."""
    if not opened.is_jpeg:
        return 1
    w, h = opened.size
    r = 1
    while r < 8 and w // (2 * r) >= fitted[0] and h // (2 * r) >= fitted[1]:
        r *= 2
    return r


class CanvasDataset(ObjectCropDataset):
    """A folder of images as fixed-size canvases plus planned crop windows, for the GPU engine.

    Input to this dataset:
        An image folder (targets from class subfolders as for
        :class:`~objcrop_plugin.engine.cpu.ObjectCropDataset`) and a proposal store whose keys
        are paths relative to ``root``.

    Output of this dataset (one dict per item, see :data:`CANVAS_KEYS`):
        - ``canvas``: ``uint8 (3, H, W)``, the upright image shrunk to fit (never enlarged),
          at the top left, zero padding elsewhere;
        - ``windows``: ``float32 (V, 4)`` xyxy crop windows in canvas pixels, globals first:
          the CPU engine's windows for the same ``(seed, epoch, index)``, scaled to the canvas;
        - ``valid``: ``int64 (2,)`` width and height of the image inside the canvas;
        - ``seed``: ``int64 ()`` the sample's photometric seed (from the same generator);
        - ``target``: int; ``key``: the path relative to ``root``.

    Args:
        root, proposals, views, seed, keys, recipe_kwargs: as for ``ObjectCropDataset``.
        canvas: ``(height, width)`` or one int; default twice the largest view side (448 for
            224-pixel views): large enough that global views rarely need more detail.
        draft: decode JPEGs at 1/2, 1/4 or 1/8 resolution when the canvas allows.

    Photometrics are applied on the device (:class:`GPUViewEngine`), so there is no
    ``photometrics`` argument. Batch with :func:`collate_canvas`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        proposals: ProposalStore | str | os.PathLike[str] | None = None,
        views: Any = "obj_obj_dilate",
        canvas: int | Sequence[int] | None = None,
        seed: int | None = None,
        keys: Sequence[str] | None = None,
        draft: bool = True,
        **recipe_kwargs: Any,
    ) -> None:
        super().__init__(root, proposals, views, "none", draft, seed, keys, **recipe_kwargs)
        self.canvas = _canvas_size(canvas, self.recipe)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        rng = sample_rng(self.seed, index, self.epoch)
        store = self.store
        proposals = (lambda size: store.lookup(key, size)) if store is not None else None
        opened = open_image(self.root / key)
        try:
            planned = self.engine.plan(opened, proposals, rng, key=key)
            fitted = _fit(opened.size, self.canvas)
            reduce = _draft_reduce(opened, fitted) if self.engine.draft else 1
            image = load_rgb(opened, reduce)
        except BaseException:
            opened.image.close()
            raise
        # the photometric seed is drawn after the windows, so the windows equal the CPU engine's
        return canvas_item(image, opened.size, [w.box for w in planned.windows], self.canvas,
                           rng, self.target(index), key)


def canvas_item(
    image: Image.Image,
    image_size: tuple[int, int],
    boxes: Sequence[Sequence[float]],
    canvas_size: tuple[int, int],
    rng: np.random.Generator,
    target: int,
    key: str,
) -> dict[str, Any]:
    """One worker-side item: ``image`` (possibly decoded smaller than ``image_size``) fitted
    into the canvas, ``boxes`` (xyxy in pixels of ``image_size``) mapped to canvas pixels, and
    a photometric seed drawn from ``rng``."""
    canvas, (nw, nh) = fit_to_canvas(image, canvas_size)
    sx, sy = nw / image_size[0], nh / image_size[1]
    windows = torch.tensor(
        [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes], dtype=torch.float32
    )
    return {
        "canvas": canvas,
        "windows": windows,
        "valid": torch.tensor([nw, nh], dtype=torch.int64),
        "seed": torch.tensor(int(rng.integers(0, _SEED_HIGH)), dtype=torch.int64),
        "target": target,
        "key": key,
    }


def is_canvas_batch(batch: Any) -> bool:
    """Whether ``batch`` is a collated canvas batch (a mapping with ``canvas`` and ``windows``)."""
    return isinstance(batch, Mapping) and "canvas" in batch and "windows" in batch


def collate_canvas(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack canvas items: a plain stack, cheap enough for the main process.

    Output: ``{"canvas": uint8 (B, 3, H, W), "windows": float32 (B, V, 4), "valid": int64
    (B, 2), "seed": int64 (B,), "target": int64 (B,), "key": list[str]}``.
    """
    if not items:
        raise ValueError("collate_canvas got an empty batch")
    first = items[0]
    if not is_canvas_batch(first):
        raise TypeError(
            f"collate_canvas expects CanvasDataset items (dicts with {CANVAS_KEYS}), got "
            f"{type(first).__name__}. Fix: use it only with objcrop_plugin.engine.gpu.CanvasDataset"
        )
    shapes = {tuple(it["canvas"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"canvases of different sizes in one batch: {sorted(shapes)}")
    # default_collate stacks straight into shared memory inside DataLoader workers
    return torch.utils.data.default_collate(list(items))


# --------------------------------------------------------------------- photometric draws

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``x`` in ``[0, 2**32)``, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (C. Wellons, hash-prospector): full avalanche on 32 bits
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def photometric_uniforms(seeds: torch.Tensor, n_slots: int, n_draws: int = N_DRAWS) -> torch.Tensor:
    """Counter-based uniforms in ``[0, 1)``: a pure function of (seed, slot, draw).

    Input: ``seeds`` int64 ``(B,)`` on any device.

    Output: float32 ``(B, n_slots, n_draws)`` on the same device (24-bit resolution). The same
    seed gives the same numbers on every device and in every batch, which is what makes a
    sample's photometrics independent of batching and resumable.
    """
    s = seeds.to(torch.int64).reshape(-1)
    lo, hi = s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF
    base = _hash32(_hash32(hi ^ 0x9E3779B9) ^ lo)
    ctr = torch.arange(n_slots * n_draws, device=s.device, dtype=torch.int64)
    x = _hash32(base[:, None] ^ _hash32(ctr + 0x632BE5AB)[None, :])
    return ((x >> 8).to(torch.float32) * (1.0 / 2**24)).view(-1, n_slots, n_draws)


@dataclass
class PhotometricBatch:
    """Per-sample photometric parameters of ``N`` views, as tensors on one device.

    The random draw (``flip`` ... ``solarize``) and the per-view constants the kernel needs
    (solarisation threshold and position, normalisation), so :func:`apply_photometric` is a
    deterministic function of an image batch and this. Row ``i`` converts to the CPU engine's
    :class:`PhotometricParams` with :meth:`params`; :meth:`from_params` goes the other way.

    Attributes (``N`` rows): ``flip, jitter, grayscale, blur, solarize, solarize_before_blur``
    bool; ``order`` int64 ``(N, 4)`` (0 brightness, 1 contrast, 2 saturation, 3 hue);
    ``brightness, contrast, saturation, hue, sigma`` float32 (neutral 1, 1, 1, 0 when not
    jittered); ``threshold`` float32 (solarisation threshold, 0-255 units); ``mean, std``
    float32 ``(N, 3)`` (0 and 1 when not normalising). Host-side: ``kernel_size`` of the blur
    (odd, covering 3 sigma of the largest sigma possible) and ``ops``, the operations that can
    occur (others are skipped without looking at the tensors).
    """

    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor
    solarize_before_blur: torch.Tensor
    threshold: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    kernel_size: int = 1
    ops: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return int(self.flip.shape[0])

    @classmethod
    def cat(cls, batches: Sequence[PhotometricBatch]) -> PhotometricBatch:
        """Rows of several batches (e.g. the view slots of one output size), in order."""
        tensors = {
            f.name: torch.cat([getattr(b, f.name) for b in batches])
            for f in fields(cls) if f.name not in ("kernel_size", "ops")
        }
        return cls(
            **tensors,
            kernel_size=max(b.kernel_size for b in batches),
            ops=frozenset().union(*(b.ops for b in batches)),
        )

    def params(self, i: int) -> PhotometricParams:
        """Row ``i`` as the CPU engine's :class:`PhotometricParams` (for tests, pictures)."""
        jit = bool(self.jitter[i])
        return PhotometricParams(
            flip=bool(self.flip[i]),
            jitter_order=tuple(int(v) for v in self.order[i]) if jit else None,
            brightness=float(self.brightness[i]),
            contrast=float(self.contrast[i]),
            saturation=float(self.saturation[i]),
            hue=float(self.hue[i]),
            grayscale=bool(self.grayscale[i]),
            blur_sigma=float(self.sigma[i]) if bool(self.blur[i]) else None,
            solarize=bool(self.solarize[i]),
        )

    @classmethod
    def from_params(
        cls,
        params: Sequence[PhotometricParams],
        photometric: Photometric,
        device: torch.device | str | None = None,
    ) -> PhotometricBatch:
        """A batch from CPU-drawn parameters (e.g. to replay :meth:`Photometric.draw`)."""
        n = len(params)

        def t(values: Sequence[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(list(values), dtype=dtype, device=device)

        jit = [p.jitter_order is not None for p in params]
        order = [list(p.jitter_order) if p.jitter_order is not None else [0, 1, 2, 3] for p in params]
        sig = [p.blur_sigma if p.blur_sigma is not None else 0.0 for p in params]
        consts = _constants(photometric, n, device)
        ops = {"flip"} if any(p.flip for p in params) else set()
        ops |= {"jitter"} if any(jit) else set()
        ops |= {"hue"} if any(p.hue != 0.0 for p in params) else set()
        ops |= {"grayscale"} if any(p.grayscale for p in params) else set()
        ops |= {"blur"} if any(p.blur_sigma is not None for p in params) else set()
        ops |= {"solarize"} if any(p.solarize for p in params) else set()
        return cls(
            flip=t([p.flip for p in params], torch.bool),
            jitter=t(jit, torch.bool),
            order=torch.tensor(order, dtype=torch.int64, device=device).view(n, 4),
            brightness=t([p.brightness for p in params], torch.float32),
            contrast=t([p.contrast for p in params], torch.float32),
            saturation=t([p.saturation for p in params], torch.float32),
            hue=t([p.hue for p in params], torch.float32),
            grayscale=t([p.grayscale for p in params], torch.bool),
            blur=t([p.blur_sigma is not None for p in params], torch.bool),
            sigma=t(sig, torch.float32),
            solarize=t([p.solarize for p in params], torch.bool),
            kernel_size=_kernel_size(max([*sig, 0.0])),
            ops=frozenset(ops),
            **consts,
        )


def _kernel_size(max_sigma: float) -> int:
    return 2 * math.ceil(3.0 * max_sigma) + 1 if max_sigma > 0 else 1


def _constants(p: Photometric, n: int, device: torch.device | str | None) -> dict[str, torch.Tensor]:
    mean = p.mean if p.normalize else (0.0, 0.0, 0.0)
    std = p.std if p.normalize else (1.0, 1.0, 1.0)

    def fill(value: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # filled on the device: torch.tensor(list, device="cuda") would wait for the GPU
        return torch.full((n,), value, dtype=dtype, device=device)

    return {
        "solarize_before_blur": fill(bool(p.solarize_before_blur), torch.bool),
        "threshold": fill(float(p.solarize_threshold)),
        "mean": torch.stack([fill(float(m)) for m in mean], 1),
        "std": torch.stack([fill(float(v)) for v in std], 1),
    }


def draw_photometric(p: Photometric, u: torch.Tensor) -> PhotometricBatch:
    """Draw one view's photometric parameters for ``N`` samples from uniforms ``u (N, 14)``.

    The distributions are :meth:`Photometric.draw`'s (torchvision's ColorJitter and lightly's
    random-apply probabilities): flip with ``p.hflip``; jitter with ``p.jitter``, then a
    uniformly random order of the four operations and factors uniform in ``[max(0, 1 - s),
    1 + s]`` (hue in ``[-h, h]``); grayscale with ``p.grayscale``; blur with ``p.blur``, sigma
    uniform in ``p.blur_sigma``; solarisation with ``p.solarize``. Everything stays on
    ``u``'s device.
    """
    if u.dim() != 2 or u.shape[1] < N_DRAWS:
        raise ValueError(f"need uniforms of shape (N, {N_DRAWS}), got {tuple(u.shape)}")
    n, device = u.shape[0], u.device

    def between(col: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * u[:, col]

    jit = u[:, 1] < p.jitter
    one = torch.ones(n, device=device)
    sig_lo, sig_hi = (float(s) for s in p.blur_sigma)
    ops = set()
    ops |= {"flip"} if p.hflip > 0 else set()
    ops |= {"jitter"} if p.jitter > 0 and (p.brightness or p.contrast or p.saturation or p.hue) else set()
    ops |= {"hue"} if p.jitter > 0 and p.hue > 0 else set()
    ops |= {"grayscale"} if p.grayscale > 0 else set()
    ops |= {"blur"} if p.blur > 0 else set()
    ops |= {"solarize"} if p.solarize > 0 else set()
    return PhotometricBatch(
        flip=u[:, 0] < p.hflip,
        jitter=jit,
        # argsort of i.i.d. uniforms: a uniformly random permutation
        order=torch.argsort(u[:, 2:6], dim=1),
        brightness=torch.where(jit, between(6, max(0.0, 1 - p.brightness), 1 + p.brightness), one),
        contrast=torch.where(jit, between(7, max(0.0, 1 - p.contrast), 1 + p.contrast), one),
        saturation=torch.where(jit, between(8, max(0.0, 1 - p.saturation), 1 + p.saturation), one),
        hue=torch.where(jit, between(9, -p.hue, p.hue), torch.zeros_like(one)),
        grayscale=u[:, 10] < p.grayscale,
        blur=u[:, 11] < p.blur,
        sigma=between(12, sig_lo, sig_hi),
        solarize=u[:, 13] < p.solarize,
        kernel_size=_kernel_size(sig_hi if p.blur > 0 else 0.0),
        ops=frozenset(ops),
        **_constants(p, n, device),
    )


# ------------------------------------------------------------------- photometric kernels

def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``(N, 1, H, W)`` (PIL's ``convert("L")`` and torchvision's weights)."""
    gray = x[:, 0:1] * _GRAY[0]
    gray.add_(x[:, 1:2], alpha=_GRAY[1])
    return gray.add_(x[:, 2:3], alpha=_GRAY[2])


def _rows(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend_step(x: torch.Tensor, op: torch.Tensor, p: PhotometricBatch, active: torch.Tensor) -> torch.Tensor:
    """One colour-jitter position: brightness, contrast or saturation per row, or nothing.

    torchvision's tensor semantics, all three as one blend ``clamp(f x + (1 - f) ref)``, where
    ref is 0 (brightness), the mean of the grayscale image (contrast) or the grayscale image
    (saturation). Inactive rows get ``f = 1`` and ``ref = 0``: an exact identity.
    """
    factors = torch.stack([p.brightness, p.contrast, p.saturation], 1)
    f = factors.gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1)
    on = active & (op < 3)
    f = torch.where(on, f, torch.ones_like(f))
    gray = _gray(x)
    ref = torch.where(_rows(op == 2), gray, gray.mean((2, 3), keepdim=True))
    ref = ref * _rows((1.0 - f) * (on & (op > 0)))  # (1 - f) ref on 1 channel, then one pass
    return torch.addcmul(ref, x, _rows(f)).clamp_(0.0, 1.0)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (HSV hue rotation by ``shift`` turns) for each row.

    The same result as converting to HSV, adding to the hue and converting back, computed
    straight from the channel extremes: each channel is ``max - (max - min) * clamp(2 -
    |k - 2|, 0, 1)`` with ``k = (n + 6 h') mod 6`` (n = 5, 3, 1 for r, g, b), about half the
    memory traffic of the round trip (Kornia's ``adjust_hue`` computes the same values).
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = x.amax(1, keepdim=True)
    cr = maxc - x.amin(1, keepdim=True)
    safe = torch.where(cr > 0, cr, torch.ones_like(cr))
    # hue in sextants, torchvision's channel priority on ties (r, then g, then b)
    h6 = torch.where(
        maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    h6 = h6 + _rows(shift * 6.0)
    n = 5.0 - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(h6 + n, 6.0)
    ramp = (2.0 - (k - 2.0).abs_()).clamp_(0.0, 1.0)
    return maxc - cr * ramp


def _solarize(x: torch.Tensor, p: PhotometricBatch, rows: torch.Tensor) -> torch.Tensor:
    # PIL solarises 8-bit values v >= threshold; a float x rounds to v at x * 255 + 0.5
    thr = _rows((p.threshold - 0.5) / 255.0)
    return torch.where(_rows(rows) & (x >= thr), 1.0 - x, x)


def apply_photometric(x: torch.Tensor, p: PhotometricBatch, flip: bool = True) -> torch.Tensor:
    """Apply drawn photometric parameters to a batch of views and normalise (deterministic).

    Input: ``x`` float ``(N, 3, H, W)`` in ``[0, 1]``; ``p`` with ``N`` rows on ``x``'s
    device. ``flip=False`` when the flips were already applied (the engine folds them into
    the resampling).

    Output: float32 ``(N, 3, H, W)``, normalised with each row's mean/std.

    Order, as the CPU engine: flip, colour jitter (each row's own order of brightness,
    contrast, saturation, hue; torchvision's tensor kernels), grayscale, solarisation when
    ``solarize_before_blur``, Gaussian blur (Kornia, per-row sigma, replicated border), else
    solarisation. Rows whose operation is off are left exactly as they are. No operation
    synchronises with the host.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected views of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.shape[0] != len(p):
        raise ValueError(f"{x.shape[0]} views but photometric parameters for {len(p)}")
    x = x.to(torch.float32)
    if flip and "flip" in p.ops:
        x = torch.where(_rows(p.flip), x.flip(-1), x)
    if "jitter" in p.ops:
        # a row's hue step splits its order into the steps before and after it: 3 blend
        # positions, the hue shift, 3 more blend positions (instead of all four operations
        # at all four positions)
        hue_pos = (p.order == 3).to(torch.int64).argmax(1)
        for k in range(3):
            x = _blend_step(x, p.order[:, k], p, p.jitter & (hue_pos > k))
        if "hue" in p.ops:
            x = torch.where(_rows(p.jitter & (p.hue != 0)), _hue_shift(x, p.hue), x)
        for k in range(1, 4):
            x = _blend_step(x, p.order[:, k], p, p.jitter & (hue_pos < k))
    if "grayscale" in p.ops:
        x = torch.where(_rows(p.grayscale), _gray(x).expand_as(x), x)
    if "solarize" in p.ops:
        x = _solarize(x, p, p.solarize & p.solarize_before_blur)
    if "blur" in p.ops and p.kernel_size > 1:
        kornia = _kornia()
        sigma = p.sigma.clamp(min=1e-3).unsqueeze(1).expand(-1, 2)
        blurred = kornia.filters.gaussian_blur2d(
            x, (p.kernel_size, p.kernel_size), sigma, border_type="replicate"
        )
        x = torch.where(_rows(p.blur), blurred, x)
    if "solarize" in p.ops:
        x = _solarize(x, p, p.solarize & ~p.solarize_before_blur)
    scale = 1.0 / p.std
    return torch.addcmul((-p.mean * scale).view(-1, 3, 1, 1), x, scale.view(-1, 3, 1, 1))


# ------------------------------------------------------------------------------ resampling

def _fit_windows(windows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`~objcrop_plugin.policies.fit_window`: finite, inside, >= 2 px.

    ``windows (B, V, 4)``, ``valid (B, 2)`` width/height; non-finite windows become the
    whole valid region.
    """
    size = valid.to(windows.dtype).clamp(min=1.0)[:, None, :]  # (B, 1, 2)
    full = torch.cat([torch.zeros_like(size), size], -1).expand_as(windows)
    win = torch.where(torch.isfinite(windows).all(-1, keepdim=True), windows, full)
    lo = torch.minimum(win[..., :2], win[..., 2:])
    hi = torch.maximum(win[..., :2], win[..., 2:])
    lo = torch.minimum(lo.clamp(min=0.0), size)
    hi = torch.minimum(hi.clamp(min=0.0), size)
    need = size.clamp(max=2.0)
    short = (hi - lo) < need
    start = torch.minimum(((lo + hi) * 0.5 - need * 0.5).clamp(min=0.0), size - need)
    lo = torch.where(short, start, lo)
    hi = torch.where(short, start + need, hi)
    return torch.cat([lo, hi], -1)


def _triangle_weights(
    lo: torch.Tensor, hi: torch.Tensor, n_out: int, n_in: int, valid: torch.Tensor,
    flip: torch.Tensor | None, gain: float, dtype: torch.dtype,
) -> torch.Tensor:
    """PIL's separable resampling weights ``(N, n_out, n_in)`` for windows ``[lo, hi)``.

    Output pixel ``o`` averages input pixels with a triangle of half-width ``max(s, 1)`` around
    ``lo + (o + 0.5) s`` (``s`` = window / output size): bilinear interpolation when enlarging,
    a triangle-filtered (antialiased) average when shrinking, as ``Image.resize(BILINEAR,
    box=...)``. Pixels outside the valid region are left out and the weights renormalised, as
    PIL does at the image border. Only the taps inside the support are computed (their number
    is bounded by ``n_in / n_out`` since windows lie inside the canvas) and scattered into the
    dense matrix the matmul needs.
    """
    scale = (hi - lo) / n_out  # (N,)
    out = torch.arange(n_out, device=lo.device, dtype=torch.float32) + 0.5
    centre = lo[:, None] + out[None, :] * scale[:, None]  # (N, n_out)
    if flip is not None:
        centre = torch.where(flip[:, None], centre.flip(1), centre)
    support = scale.clamp(min=1.0)[:, None, None]
    taps = int(math.floor(2.0 * max(1.0, n_in / n_out))) + 3
    first = torch.floor(centre - support[..., 0] - 0.5)
    idx = first[..., None] + torch.arange(taps, device=lo.device, dtype=torch.float32)
    w = (1.0 - (idx + 0.5 - centre[..., None]).abs() / support).clamp_(min=0.0)
    w = w * ((idx >= 0) & (idx < valid[:, None, None]))
    # the input pixel nearest the centre always weighs >= 1/2: the sum is never 0
    w = w * (gain / w.sum(-1, keepdim=True).clamp(min=1e-6))
    dense = torch.zeros(lo.shape[0], n_out, n_in, device=lo.device, dtype=dtype)
    return dense.scatter_add_(2, idx.clamp_(0, n_in - 1).to(torch.int64), w.to(dtype))


def resample_windows(
    canvas: torch.Tensor,
    windows: torch.Tensor,
    size: tuple[int, int],
    valid: torch.Tensor | None = None,
    flip: torch.Tensor | None = None,
    antialias: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Crop-and-resize ``V`` windows of each of ``B`` canvases to ``size``, in one batch.

    Input:
        canvas: ``uint8 (B, 3, H, W)`` (or float in ``[0, 1]``), on any device.
        windows: ``(B, V, 4)`` xyxy in canvas pixels (made finite, >= 2 px and inside
            ``valid`` here).
        size: output ``(height, width)``, the same for all ``V`` slots.
        valid: ``(B, 2)`` width/height of the image in each canvas (default: all of it).
        flip: ``bool (V, B)``: mirror these views horizontally (free: folded into the
            weights).
        antialias: PIL ``BILINEAR`` semantics (triangle filter widened when shrinking);
            ``False``: plain bilinear sampling with ``grid_sample``.
        dtype: precision of the antialiased path's matmuls (default float16 on CUDA, float32
            elsewhere; float16 stays within 1.5/255 of float32, bfloat16 within 3/255).

    Output: float32 ``(V * B, 3, h, w)`` in ``[0, 1]``, view-major (rows ``v * B + b``).

    Example:
        >>> canvas = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
        >>> windows = torch.tensor([[[0.0, 0.0, 64.0, 64.0]], [[3.0, 4.0, 20.0, 9.0]]])
        >>> resample_windows(canvas, windows, (16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """
    if canvas.dim() != 4 or canvas.shape[1] != 3:
        raise ValueError(f"canvas must be (B, 3, H, W), got {tuple(canvas.shape)}")
    b, _, height, width = canvas.shape
    if windows.dim() != 3 or windows.shape[0] != b or windows.shape[2] != 4:
        raise ValueError(f"windows must be (B={b}, V, 4) xyxy, got {tuple(windows.shape)}")
    n_views = windows.shape[1]
    h, w = size
    device = canvas.device
    if valid is None:
        valid = torch.full((b, 2), float(max(width, height)), device=device)
    valid = valid.to(device=device, dtype=torch.float32)
    # (no tensors built from host values here: on a GPU that would synchronise every batch)
    valid = torch.stack([valid[:, 0].clamp(1.0, width), valid[:, 1].clamp(1.0, height)], 1)
    win = _fit_windows(windows.to(device=device, dtype=torch.float32), valid)
    win = win.transpose(0, 1).reshape(n_views * b, 4)  # view-major rows
    vrow = valid.repeat(n_views, 1)
    flips = None if flip is None else flip.to(device).reshape(n_views * b)
    integral = not canvas.dtype.is_floating_point
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32

    if not antialias:
        # pixel-centre sampling positions, clamped to the image: PIL's edge renormalisation
        sx = (win[:, 2] - win[:, 0]) / w
        sy = (win[:, 3] - win[:, 1]) / h
        gx = win[:, 0:1] + (torch.arange(w, device=device) + 0.5) * sx[:, None] - 0.5
        gy = win[:, 1:2] + (torch.arange(h, device=device) + 0.5) * sy[:, None] - 0.5
        if flips is not None:
            gx = torch.where(flips[:, None], gx.flip(1), gx)
        gx = torch.minimum(gx.clamp(min=0.0), vrow[:, 0:1] - 1.0) * (2.0 / max(width - 1, 1)) - 1.0
        gy = torch.minimum(gy.clamp(min=0.0), vrow[:, 1:2] - 1.0) * (2.0 / max(height - 1, 1)) - 1.0
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
        # the V views of a canvas stacked along the grid's height: no copy of the canvas
        grid = grid.view(n_views, b, h, w, 2).transpose(0, 1).reshape(b, n_views * h, w, 2)
        # float32 whatever ``dtype``: a half-precision grid would misplace samples by ~0.1 px
        out = F.grid_sample(canvas.to(torch.float32), grid, mode="bilinear",
                            padding_mode="border", align_corners=True)  # (B, 3, V*h, w)
        out = out.view(b, 3, n_views, h, w).permute(2, 0, 1, 3, 4).reshape(n_views * b, 3, h, w)
        return (out * (1.0 / 255.0) if integral else out).clamp_(0.0, 1.0)

    wx = _triangle_weights(win[:, 0], win[:, 2], w, width, vrow[:, 0], flips, 1.0, dtype)
    wy = _triangle_weights(win[:, 1], win[:, 3], h, height, vrow[:, 1], None,
                           1.0 / 255.0 if integral else 1.0, dtype)
    # horizontal pass for all V views at once: (B, 3H, W) @ (B, W, V*w)
    wx = wx.view(n_views, b, w, width).permute(1, 3, 0, 2).reshape(b, width, n_views * w)
    tmp = torch.bmm(canvas.to(dtype).view(b, 3 * height, width), wx)
    # vertical pass per (view, canvas): (V*B, h, H) @ (V*B, H, 3w)
    tmp = tmp.view(b, 3, height, n_views, w).permute(3, 0, 2, 1, 4).reshape(n_views * b, height, 3 * w)
    out = torch.bmm(wy, tmp).view(n_views * b, h, 3, w)
    out = out.permute(0, 2, 1, 3).to(torch.float32, memory_format=torch.contiguous_format)
    return out.clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------- the engine

@dataclass(frozen=True)
class _Slot:
    index: int
    size: tuple[int, int]
    local: bool
    photometric: Photometric


class GPUViewEngine:
    """Turns a batch of canvases and crop windows into the views of a recipe, on the device.

    Args:
        views: the view recipe (or a name / list for :func:`~objcrop_plugin.policies.make_recipe`);
            only its view sizes and global/local split are used here (the windows come from
            :class:`CanvasDataset`, which planned them with the same recipe).
        photometrics: preset name or :class:`PhotometricSet` (as the CPU engine).
        antialias: PIL ``BILINEAR`` crop-and-resize semantics (the CPU engine's); ``False``:
            plain bilinear sampling, faster on large canvases, aliased when shrinking a lot.
        seed: seeds the engine's own generator, used only for batches without per-sample
            seeds; ``None``: torch's default generator of the device.
        precision: ``"auto"`` (float16 matmuls on CUDA, float32 elsewhere), ``"float32"``,
            ``"float16"`` or ``"bfloat16"``. Photometrics always run in float32.
        recipe_kwargs: parameters for ``views`` when it is a name.

    Input to this engine (``__call__``):
        canvas ``uint8 (B, 3, H, W)`` on the device, windows ``(B, V, 4)`` in canvas pixels,
        optionally per-sample ``seeds`` int64 ``(B,)`` and ``valid`` ``(B, 2)``.

    Output of this engine:
        a list of ``V`` float32 tensors ``(B, 3, h_v, w_v)``, globals first, normalised.

    Applies by default: the MoCo-v2 photometrics (flip, colour jitter 0.4/0.4/0.4/0.1 p=0.8,
    grayscale 0.2, blur p=0.5) and ImageNet normalisation. Global view ``g`` gets the preset's
    ``g``-th global augmentation (BYOL's asymmetric pair), local views the local one.

    Example:
        >>> engine = GPUViewEngine("scene_scene", photometrics="none", size=32)
        >>> canvas = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
        >>> windows = torch.tensor([0.0, 0.0, 48.0, 40.0]).expand(4, 2, 4)
        >>> [tuple(v.shape) for v in engine(canvas, windows, seeds=torch.arange(4))]
        [(4, 3, 32, 32), (4, 3, 32, 32)]
    """

    def __init__(
        self,
        views: Any = "obj_obj_dilate",
        photometrics: str | Photometric | PhotometricSet = "mocov2",
        antialias: bool = True,
        seed: int | None = None,
        precision: str = "auto",
        **recipe_kwargs: Any,
    ) -> None:
        self.recipe: ViewRecipe = make_recipe(views, **recipe_kwargs)
        self.photometrics = photometrics_set(photometrics)
        self.antialias = bool(antialias)
        if seed is not None and int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        dtypes = {"auto": None, "float32": torch.float32, "float16": torch.float16,
                  "bfloat16": torch.bfloat16}
        if precision not in dtypes:
            raise ValueError(f"precision must be one of {sorted(dtypes)}, got {precision!r}")
        self.precision = precision
        self._dtype = dtypes[precision]
        slots, g = [], 0
        for i, spec in enumerate(self.recipe.views):
            slots.append(_Slot(i, tuple(spec.size), spec.local,
                               self.photometrics.for_view(g, spec.local)))
            g += 0 if spec.local else 1
        self.slots: list[_Slot] = slots
        groups: dict[tuple[int, int], list[int]] = {}
        for s in slots:
            groups.setdefault(s.size, []).append(s.index)
        self.groups = groups
        if any(p.blur > 0 for p in self._photometrics()):
            _kornia()  # fail here, not in the first training step
        self._generators: dict[torch.device, torch.Generator] = {}

    def _photometrics(self) -> list[Photometric]:
        return [s.photometric for s in self.slots]

    def __repr__(self) -> str:
        sizes = [s.size for s in self.slots]
        return (f"{type(self).__name__}(views={self.recipe.name!r}, sizes={sizes}, "
                f"photometrics={self.photometrics.name!r}, antialias={self.antialias})")

    # -- randomness

    def new_seeds(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Per-sample seeds for a batch that brings none (the engine's or torch's generator)."""
        device = torch.device(device)
        if self.seed is None:
            return torch.randint(0, _SEED_HIGH, (n,), device=device, dtype=torch.int64)
        gen = self._generators.get(device)
        if gen is None:
            entropy = np.random.SeedSequence([self.seed, distributed_rank()]).generate_state(2)
            gen = torch.Generator(device=device)
            gen.manual_seed(int(entropy[0]) << 31 ^ int(entropy[1]))
            self._generators[device] = gen
        return torch.randint(0, _SEED_HIGH, (n,), device=device, dtype=torch.int64, generator=gen)

    def draw(self, seeds: torch.Tensor) -> list[PhotometricBatch]:
        """Each view slot's photometric parameters for samples with these seeds ``(B,)``."""
        u = photometric_uniforms(seeds, len(self.slots))
        return [draw_photometric(s.photometric, u[:, s.index]) for s in self.slots]

    # -- kernels

    def render(
        self,
        canvas: torch.Tensor,
        windows: torch.Tensor,
        params: Sequence[PhotometricBatch],
        valid: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The views for given photometric parameters (deterministic); see :meth:`__call__`."""
        n_slots = len(self.slots)
        if windows.dim() != 3 or windows.shape[1] != n_slots:
            raise ValueError(
                f"the recipe '{self.recipe.name}' has {n_slots} views but the windows have shape "
                f"{tuple(windows.shape)} (need (B, {n_slots}, 4)). Fix: build the canvas dataset "
                "and this engine from the same recipe"
            )
        if len(params) != n_slots:
            raise ValueError(f"{len(params)} photometric parameter sets for {n_slots} views")
        out: list[torch.Tensor | None] = [None] * n_slots
        b = canvas.shape[0]
        with torch.no_grad(), torch.autocast(canvas.device.type, enabled=False):
            for size, idx in self.groups.items():
                p = PhotometricBatch.cat([params[i] for i in idx])
                # a stack of basic indexing: indexing a CUDA tensor with a list would copy the
                # list to the device and wait for the queued work
                group = torch.stack([windows[:, i] for i in idx], 1)
                views = resample_windows(
                    canvas, group, size, valid,
                    flip=p.flip.view(len(idx), b), antialias=self.antialias, dtype=self._dtype,
                )
                views = apply_photometric(views, p, flip=False)
                for j, tensor in zip(idx, views.split(b)):
                    out[j] = tensor
        return out  # type: ignore[return-value]

    def __call__(
        self,
        canvas: torch.Tensor,
        windows: torch.Tensor,
        seeds: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Views of a canvas batch: one ``(B, 3, h, w)`` float32 tensor per view, globals first.

        Args:
            canvas: ``uint8 (B, 3, H, W)`` (float canvases are taken as ``[0, 1]``).
            windows: ``(B, V, 4)`` xyxy in canvas pixels.
            seeds: int64 ``(B,)`` per-sample photometric seeds (:class:`CanvasDataset` gives
                them); ``None``: drawn with :meth:`new_seeds`.
            valid: ``(B, 2)`` width/height of each image in its canvas (default: all).
        """
        if canvas.dim() != 4 or canvas.shape[1] != 3:
            raise ValueError(f"canvas must be (B, 3, H, W), got {tuple(canvas.shape)}")
        if seeds is None:
            seeds = self.new_seeds(canvas.shape[0], canvas.device)
        return self.render(canvas, windows, self.draw(seeds.to(canvas.device)), valid)

    def transform_batch(self, batch: Mapping[str, Any]) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
        """A collated canvas batch on the device -> lightly's ``(views, targets, filenames)``."""
        if not is_canvas_batch(batch):
            raise TypeError(
                f"expected a canvas batch (a dict with {CANVAS_KEYS}), got {type(batch).__name__}. "
                "Fix: load CanvasDataset with collate_fn=collate_canvas"
            )
        canvas = batch["canvas"]
        views = self(canvas, batch["windows"], seeds=batch.get("seed"), valid=batch.get("valid"))
        targets = batch.get("target")
        if not isinstance(targets, torch.Tensor):
            targets = torch.as_tensor(
                targets if targets is not None else [0] * canvas.shape[0], dtype=torch.int64
            )
        return views, targets.to(canvas.device), list(batch.get("key", []))


def apply_gpu_views(engine: GPUViewEngine, batch: Any) -> Any:
    """Canvas batches become ``(views, targets, filenames)``; any other batch passes through.

    For a LightningModule's ``on_after_batch_transfer(batch, dataloader_idx)``, which Lightning
    calls once the batch is on the device: ``objcrop train`` (``crop.engine: gpu``) sets its
    module's ``batch_transform`` to ``lambda batch: apply_gpu_views(engine, batch)``, and
    ``objcrop-solo`` overrides the solo-learn method's hook with it.
    """
    return engine.transform_batch(batch) if is_canvas_batch(batch) else batch


class GPUViewsMixin:
    """Mixin for a LightningModule: views made on the device after each batch transfer.

    List it before the LightningModule base and set ``self.gpu_views`` to a
    :class:`GPUViewEngine`; canvas batches then reach ``training_step`` as lightly's
    ``(views, targets, filenames)``, other batches unchanged.

    Example:
        >>> import pytorch_lightning as pl  # doctest: +SKIP
        >>> class Model(GPUViewsMixin, pl.LightningModule):  # doctest: +SKIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gpu_views = GPUViewEngine("obj_obj_dilate", photometrics="mocov2")
    """

    gpu_views: GPUViewEngine | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        parent = getattr(super(), "on_after_batch_transfer", None)
        if parent is not None:
            batch = parent(batch, dataloader_idx)
        return apply_gpu_views(self.gpu_views, batch) if self.gpu_views is not None else batch


def _to_device(batch: Mapping[str, Any], device: torch.device, non_blocking: bool) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class DeviceViewLoader:
    """Wraps a DataLoader of canvas batches; yields ``(views, targets, filenames)`` on the device.

    A drop-in for the DataLoader in a plain PyTorch or lightly training loop: the loop body
    stays as it is, the views arrive as lightly's ``MultiViewCollate`` would give them, but
    cut and augmented on ``device``.

    Args:
        loader: a DataLoader over a :class:`CanvasDataset` with ``collate_fn=collate_canvas``
            (``pin_memory=True`` lets the copy to a GPU overlap with compute).
        engine: the :class:`GPUViewEngine` (same recipe as the dataset).
        device: where the views are made (default: ``cuda`` when available, else ``cpu``).
        non_blocking: asynchronous host-to-device copies (effective with pinned memory).

    Example:
        >>> loader = DataLoader(CanvasDataset(root, store), batch_size=256, num_workers=8,
        ...                     collate_fn=collate_canvas, pin_memory=True)  # doctest: +SKIP
        >>> for views, targets, filenames in DeviceViewLoader(loader, engine):  # doctest: +SKIP
        ...     loss = model.training_step((views, targets, filenames), 0)
    """

    def __init__(
        self,
        loader: Any,
        engine: GPUViewEngine,
        device: torch.device | str | None = None,
        non_blocking: bool = True,
    ) -> None:
        self.loader = loader
        self.engine = engine
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.non_blocking = bool(non_blocking)

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch to the dataset and sampler that take one (seeded crops, DDP order)."""
        for obj in (self.dataset, getattr(self.loader, "sampler", None),
                    getattr(self.loader, "batch_sampler", None)):
            if obj is not None and callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list[str]]]:
        for batch in self.loader:
            if not is_canvas_batch(batch):
                raise TypeError(
                    f"DeviceViewLoader got a {type(batch).__name__} batch, not a canvas batch. "
                    "Fix: DataLoader(CanvasDataset(...), collate_fn=collate_canvas)"
                )
            yield self.engine.transform_batch(_to_device(batch, self.device, self.non_blocking))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self.engine!r}, device='{self.device}')"

