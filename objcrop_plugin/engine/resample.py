"""Batched crop-and-resize of many windows of many canvases: PIL's resampling as matrix products.

:func:`resample_windows` cuts ``V`` windows out of each of ``B`` canvases and resizes them to
one output size in a single batch. With ``antialias=True`` (the default) it computes PIL's
``Image.resize(size, BILINEAR, box=...)``, the CPU engine's kernel: every output pixel is a
triangle-filtered average over the window whose support widens with the downscale factor
(antialiasing), renormalised at the image border (not the canvas border, so the zero padding
of a canvas never blends in). It is separable, so it runs as two batched matrix products whose
weights are built on the device from the windows: windows are arbitrary sub-pixel boxes, and
nothing is read back to the host. With ``antialias=False`` views are bilinearly sampled at the
same pixel centres, clamped to the image (cost independent of the canvas size, aliased when a
window is shrunk a lot); for windows that are enlarged the two paths agree. Two backends do
that sampling:

- ``"kornia"`` (the default when kornia is installed): Kornia's box cropping,
  ``kornia.geometry.transform.crop_by_transform_mat``, one call per view slot with each
  window's affine map from canvas to view pixels. Kornia clamps to the *canvas* border
  (``padding_mode="border"``); the image's own border is made to clamp the same way by copying
  its last valid column and row into the first padding column and row of each canvas (on the
  device, per sample). One of each is enough: output pixel ``i`` samples
  ``x1 + (i + 0.5) (x2 - x1) / w - 0.5``, which for a window inside ``[0, valid]`` lies in
  ``[-0.5, valid - 0.5]`` whatever the scale, so no bilinear tap reaches past column ``valid``
  (nor row ``valid``);
- ``"grid"``: ``torch.nn.functional.grid_sample`` on sampling positions clamped to the image,
  all ``V`` views of a canvas in one call.

Both agree to float rounding (about 2e-5 of the pixel range; tested < 1e-3).

Windows are first made usable as :func:`~objcrop_plugin.policies.fit_window` does on the host:
finite, inside the image, at least :data:`~objcrop_plugin.boxes.MIN_WINDOW` pixels a side.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from types import ModuleType

import torch
import torch.nn.functional as F

from ..boxes import MIN_WINDOW

__all__ = ["BACKENDS", "default_backend", "replicate_edges", "require_kornia", "resample_windows"]

#: the sampling backends of ``antialias=False`` (see the module docstring)
BACKENDS = ("kornia", "grid")


def require_kornia() -> ModuleType:
    """Import kornia (the ``"kornia"`` backend's box cropping), or raise an ImportError that
    names the fix."""
    try:
        import kornia
        import kornia.geometry.transform  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "resample_windows(backend='kornia') needs kornia, which could not be imported "
            f"({type(exc).__name__}: {exc}). Fix: pip install \"objcrop-plugin[gpu]\", or "
            "backend='grid'"
        ) from exc
    return kornia


@functools.lru_cache(maxsize=1)
def default_backend() -> str:
    """``"kornia"`` when kornia is installed, else ``"grid"`` (looked up without importing it)."""
    return "kornia" if importlib.util.find_spec("kornia") is not None else "grid"


def _fit_windows(windows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`~objcrop_plugin.policies.fit_window`: finite, inside, >= MIN_WINDOW.

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
    need = size.clamp(max=MIN_WINDOW)
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


def _sample_grid(
    canvas: torch.Tensor, win: torch.Tensor, valid: torch.Tensor, flips: torch.Tensor | None,
    size: tuple[int, int],
) -> torch.Tensor:
    """Bilinear views with ``grid_sample``, positions clamped to the image.

    ``win (V*B, 4)`` fitted windows, view-major; ``valid (B, 2)``; ``flips bool (V*B,)``.
    Output: float32 ``(V*B, 3, h, w)`` on the canvas's scale (0-255 for uint8).
    """
    b, _, height, width = canvas.shape
    n_views = win.shape[0] // b
    h, w = size
    device = canvas.device
    vrow = valid.repeat(n_views, 1)
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
    return out.view(b, 3, n_views, h, w).permute(2, 0, 1, 3, 4).reshape(n_views * b, 3, h, w)


def replicate_edges(canvas: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``canvas`` whose column ``valid_w`` and row ``valid_h`` repeat the
    image's last column and row (where they are inside the canvas): with Kornia's
    ``padding_mode="border"``, bilinear taps just past the image then read its edge.

    ``canvas (B, C, H, W)``, ``valid (B, 2)`` width/height in ``[1, W] x [1, H]``. Two
    gathers and scatters per batch, on the device.
    """
    b, c, height, width = canvas.shape
    out = canvas.to(torch.float32, copy=True)
    n = valid.ceil().to(torch.int64)  # the first column/row past the image
    src_x = (n[:, 0] - 1).clamp(0, width - 1).view(b, 1, 1, 1)
    dst_x = n[:, 0].clamp(max=width - 1).view(b, 1, 1, 1)  # an image as wide as the canvas:
    col = out.gather(3, src_x.expand(b, c, height, 1))  # its last column onto itself
    out.scatter_(3, dst_x.expand(b, c, height, 1), col)
    src_y = (n[:, 1] - 1).clamp(0, height - 1).view(b, 1, 1, 1)
    dst_y = n[:, 1].clamp(max=height - 1).view(b, 1, 1, 1)
    row = out.gather(2, src_y.expand(b, c, 1, width))  # after the column: the corner too
    return out.scatter_(2, dst_y.expand(b, c, 1, width), row)


def _sample_kornia(
    canvas: torch.Tensor, win: torch.Tensor, valid: torch.Tensor, flips: torch.Tensor | None,
    size: tuple[int, int],
) -> torch.Tensor:
    """Bilinear views with Kornia's ``crop_by_transform_mat``, one call per view slot; the
    arguments and output are :func:`_sample_grid`'s."""
    kornia = require_kornia()
    b = canvas.shape[0]
    n_views = win.shape[0] // b
    h, w = size
    src = replicate_edges(canvas, valid)
    # view pixel (u, v) samples canvas position (x0 + u sx, y0 + v sy), pixel-index space
    sx = (win[:, 2] - win[:, 0]) / w
    sy = (win[:, 3] - win[:, 1]) / h
    x0 = win[:, 0] + 0.5 * sx - 0.5
    y0 = win[:, 1] + 0.5 * sy - 0.5
    if flips is not None:  # column u samples the mirrored column w - 1 - u
        x0 = torch.where(flips, x0 + (w - 1) * sx, x0)
        sx = torch.where(flips, -sx, sx)
    # Kornia takes the inverse, canvas pixel -> view pixel; a (N, 2, 3) affine matrix takes
    # its warp_affine path (a (N, 3, 3) one the perspective warp)
    zero = torch.zeros_like(sx)
    mat = torch.stack([
        torch.stack([1.0 / sx, zero, -x0 / sx], 1),
        torch.stack([zero, 1.0 / sy, -y0 / sy], 1),
    ], 1).view(n_views, b, 2, 3)
    crop = kornia.geometry.transform.crop_by_transform_mat
    return torch.cat([
        crop(src, mat[v], (h, w), mode="bilinear", padding_mode="border", align_corners=True)
        for v in range(n_views)
    ])


def resample_windows(
    canvas: torch.Tensor,
    windows: torch.Tensor,
    size: tuple[int, int],
    valid: torch.Tensor | None = None,
    flip: torch.Tensor | None = None,
    antialias: bool = True,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
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
            ``False``: plain bilinear sampling at the same pixel centres.
        dtype: precision of the antialiased path's matmuls (default float16 on CUDA, float32
            elsewhere; float16 stays within 1.5/255 of float32, bfloat16 within 3/255).
            Bilinear sampling always runs in float32.
        backend: the bilinear sampler of ``antialias=False``: ``"kornia"``
            (``crop_by_transform_mat``) or ``"grid"`` (``grid_sample``); default
            :func:`default_backend`. Ignored when ``antialias`` is set.

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
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        sample = _sample_kornia if (backend or default_backend()) == "kornia" else _sample_grid
        out = sample(canvas, win, valid, flips, (h, w))  # (V*B, 3, h, w)
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
