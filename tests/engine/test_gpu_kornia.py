"""``antialias=False`` resampling with Kornia's ``crop_by_transform_mat`` (the default backend).

Oracles: the ``grid_sample`` backend (positions clamped to the image, the earlier
implementation) and PIL's bilinear ``resize(box=...)`` where it is plain bilinear sampling
(windows enlarged in both directions). Differences in units of 1/255 of the pixel range:
Kornia vs grid < 1e-3 (measured about 2e-5: float32 rounding of Kornia's normalised
coordinates); vs PIL mean < 0.5, max <= 2 (PIL rounds to 8 bits between its two passes).
"""

from __future__ import annotations

import pytest
import torch
from engine_testing import EPS, pil_view, smooth_image

from objcrop_plugin.engine.datasets import fit_to_canvas
from objcrop_plugin.engine.resample import default_backend, replicate_edges, resample_windows

pytest.importorskip("kornia")
pytestmark = pytest.mark.usefixtures("one_thread")

CANVAS = (56, 72)  # (H, W)
VALID = [(72, 56), (40, 30), (72, 21), (9, 56), (2, 2)]  # (w, h): full, inset, strips, tiny


def border_windows(w: float, h: float, gen: torch.Generator) -> list[list[float]]:
    """Windows touching each image border and corner, 1-2 px windows, the whole image, and
    random ones (xyxy inside ``[0, w] x [0, h]``)."""
    boxes = [
        [0, 0, w, h],                                   # whole image
        [0, 0.3 * h, 0.5 * w, 0.7 * h],                 # left
        [0.2 * w, 0, 0.6 * w, 0.4 * h],                 # top
        [0.6 * w, 0.2 * h, w, 0.9 * h],                 # right
        [0.1 * w, 0.5 * h, 0.8 * w, h],                 # bottom
        [0, 0, 1, 1], [w - 1, h - 1, w, h],             # 1 px corners
        [w - 2, 0, w, 2], [0, h - 2, 2, h],             # 2 px corners
        [w - 1.5, 0.5, w, 1.7],                         # sub-pixel at the right border
        [0, h - 1, w, h],                               # a 1 px row along the bottom
    ]
    for _ in range(9):
        lo = torch.rand(2, generator=gen) * torch.tensor([w, h])
        hi = lo + torch.rand(2, generator=gen) * (torch.tensor([w, h]) - lo)
        boxes.append([*lo.tolist(), *hi.tolist()])
    return boxes


def batch(gen: torch.Generator, padding: str = "noise"):
    """A canvas batch of VALID images: random image pixels; the padding holds noise (which
    neither backend may read), or NaN (float canvases: any tap beyond the one replicated
    column/row shows)."""
    b = len(VALID)
    canvas = torch.randint(0, 256, (b, 3, *CANVAS), generator=gen, dtype=torch.uint8)
    if padding == "nan":
        canvas = canvas.float() / 255.0
    for i, (w, h) in enumerate(VALID):
        pad = torch.full_like(canvas[i], float("nan")) if padding == "nan" else (
            torch.randint(0, 256, canvas[i].shape, generator=gen, dtype=torch.uint8))
        inside = torch.zeros(CANVAS, dtype=torch.bool)
        inside[:h, :w] = True
        canvas[i] = torch.where(inside, canvas[i], pad)
    windows = torch.tensor([border_windows(w, h, gen) for w, h in VALID], dtype=torch.float32)
    flip = torch.rand(windows.shape[1], b, generator=gen) < 0.5
    return canvas, windows, torch.tensor(VALID), flip


def test_kornia_is_the_default_backend_when_installed():
    assert default_backend() == "kornia"
    with pytest.raises(ValueError, match="backend"):
        resample_windows(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 4), (4, 4), backend="cv2")


@pytest.mark.parametrize("size", [(1, 1), (2, 7), (16, 16), (24, 96), (96, 96), (224, 160)])
def test_kornia_backend_matches_grid_sample_clamped_to_the_image(size):
    """Windows touching all four image borders, 1-2 px windows (enlarged up to ~100x),
    shrunk windows, flips; noise in the padding that neither may read."""
    canvas, windows, valid, flip = batch(torch.Generator().manual_seed(sum(size)))
    kw = dict(valid=valid, flip=flip, antialias=False)
    kornia = resample_windows(canvas, windows, size, backend="kornia", **kw)
    grid = resample_windows(canvas, windows, size, backend="grid", **kw)
    assert kornia.shape == grid.shape == (windows.shape[1] * len(VALID), 3, *size)
    assert torch.isfinite(kornia).all()
    diff = (kornia - grid).abs().max()
    assert diff < 1e-3, diff  # of the pixel range (measured ~2e-5)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (24, 24), (96, 96)])
def test_one_replicated_row_and_column_are_enough(size):
    """The claim behind the edge replication: a window inside the image samples positions in
    ``[-0.5, valid - 0.5]``, so its bilinear taps never reach past the first padding column
    or row. With NaN in the rest of the padding, any tap beyond it would give NaN (0 * NaN)."""
    canvas, windows, valid, flip = batch(torch.Generator().manual_seed(7), padding="nan")
    out = resample_windows(canvas, windows, size, valid, flip, antialias=False, backend="kornia")
    assert torch.isfinite(out).all()
    # and the values are the clamped sampling of the image alone
    clean = torch.nan_to_num(canvas, nan=0.0)
    ref = resample_windows(clean, windows, size, valid, flip, antialias=False, backend="grid")
    assert (out - ref).abs().max() < 1e-4


def test_edge_replication_copies_the_last_column_and_row_only():
    canvas = torch.arange(2 * 3 * 5 * 6, dtype=torch.uint8).view(2, 3, 5, 6)
    out = replicate_edges(canvas, torch.tensor([[4.0, 3.0], [6.0, 5.0]]))
    assert out.dtype == torch.float32 and canvas.dtype == torch.uint8  # a copy
    ref = canvas.float()
    expected = ref[0].clone()
    expected[:, :, 4] = expected[:, :, 3]  # column 4 := column 3 (the last of the image)
    expected[:, 3, :] = expected[:, 2, :]  # then row 3 := row 2, the corner included
    assert torch.equal(out[0], expected)
    assert torch.equal(out[1], ref[1])  # an image filling its canvas: unchanged
    float_canvas = canvas.float()
    replicate_edges(float_canvas, torch.tensor([[4.0, 3.0], [6.0, 5.0]]))
    assert torch.equal(float_canvas, ref)  # a float canvas is copied too, not written to


def test_kornia_backend_matches_pil_when_enlarging():
    """Windows smaller than the view in both directions: PIL's bilinear is plain bilinear
    sampling with the edge clamped, which the Kornia backend computes."""
    image = smooth_image(5)
    canvas, valid = fit_to_canvas(image, (112, 160))  # padded right and below
    boxes = [(0, 0, 20, 16), (108, 80, 128, 96), (0.0, 90.5, 30.2, 96.0), (126, 0, 128, 2),
             (40.3, 30.7, 52.9, 41.1), (100, 0, 128, 24)]
    windows = torch.tensor(boxes, dtype=torch.float32)[None]
    for size in [(32, 32), (48, 40)]:
        out = resample_windows(canvas[None], windows, size, torch.tensor([valid]),
                               antialias=False, backend="kornia")
        for j, box in enumerate(boxes):
            diff = (out[j] - pil_view(image, box, size)).abs()
            assert diff.mean() < 0.5 * EPS and diff.max() <= 2 * EPS, (box, diff.max() / EPS)


def test_degenerate_windows_give_finite_views():
    canvas = torch.randint(0, 256, (3, 3, 20, 30), dtype=torch.uint8)
    nan, inf = float("nan"), float("inf")
    windows = torch.tensor([
        [[nan, 0, 5, 5], [5, 5, 5, 5], [-10, -10, 100, 100]],
        [[inf, 0, 1, 1], [20, 10, 3, 2], [29.9, 19.9, 30, 20]],
        [[0, 0, 0.01, 20], [0, 0, 30, 0.01], [1, 1, 2, 2]],
    ])
    valid = torch.tensor([[30, 20], [1, 1], [7, 3]])
    for size in [(1, 1), (17, 9)]:
        out = resample_windows(canvas, windows, size, valid, antialias=False, backend="kornia")
        assert out.shape == (9, 3, *size) and torch.isfinite(out).all()
        assert (out >= 0).all() and (out <= 1).all()
