"""Batched crop-and-resize against PIL's ``resize(BILINEAR, box=...)`` (the CPU engine's kernel).

Tolerances (images in [0, 1], differences in units of 1/255): image no larger than the canvas:
mean < 0.5, max <= 3 (PIL rounds to 8 bits between its two passes and at the end); from a
canvas smaller than the image: mean < 5 (0.02), the detail the canvas drops.
"""

from __future__ import annotations

import pytest
import torch
from engine_testing import EPS, pil_view, smooth_image

from objcrop_plugin.engine.datasets import fit_to_canvas
from objcrop_plugin.engine.resample import resample_windows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [(16, 16), (48, 40), (224, 224)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16: CUDA's default
def test_resampling_matches_pil_bilinear_with_box(size, dtype):
    image = smooth_image(2)
    canvas, valid = fit_to_canvas(image, (112, 160))  # padded on both sides
    boxes = [(0, 0, 128, 96), (10.3, 5.2, 60.7, 50.1), (3, 3, 9, 8), (100, 80, 102, 82),
             (0, 0, 2, 96), (0.0, 90.5, 128.0, 96.0)]
    windows = torch.tensor(boxes, dtype=torch.float32)[None]
    out = resample_windows(canvas[None], windows, size, valid=torch.tensor([valid]), dtype=dtype)
    assert out.shape == (len(boxes), 3, *size) and out.dtype == torch.float32
    for j, box in enumerate(boxes):
        diff = (out[j] - pil_view(image, box, size)).abs()
        assert diff.mean() < 0.5 * EPS, (box, diff.mean() / EPS)
        assert diff.max() <= 3 * EPS, (box, diff.max() / EPS)


def test_bilinear_path_equals_antialiased_path_when_enlarging():
    canvas, valid = fit_to_canvas(smooth_image(3), (96, 128))
    windows = torch.tensor([[[4.0, 6.0, 20.0, 30.0], [100.0, 70.0, 128.0, 96.0]]])
    kw = dict(valid=torch.tensor([valid]), flip=torch.tensor([[True], [False]]))
    smooth = resample_windows(canvas[None], windows, (64, 64), **kw)
    fast = resample_windows(canvas[None], windows, (64, 64), antialias=False, **kw)
    assert (smooth - fast).abs().max() < 1e-4
    ref = pil_view(smooth_image(3), (4.0, 6.0, 20.0, 30.0), (64, 64)).flip(-1)
    assert (smooth[0] - ref).abs().mean() < 0.5 * EPS


def test_shrunk_canvas_views_stay_close_to_full_resolution_cpu_views(tmp_path):
    image = smooth_image(4, (256, 192))
    image.save(tmp_path / "a.png")
    canvas, valid = fit_to_canvas(image, (128, 128))  # half resolution
    boxes = [(0, 0, 256, 192), (20, 30, 200, 150), (64, 64, 128, 128)]
    windows = torch.tensor(boxes, dtype=torch.float32)[None] * 0.5
    for size in [(32, 32), (96, 96)]:
        out = resample_windows(canvas[None], windows, size, valid=torch.tensor([valid]))
        for j, box in enumerate(boxes):
            assert (out[j] - pil_view(image, box, size)).abs().mean() < 0.02
