"""GPU view engine, run on the CPU: same views as the CPU engine, seeded per sample.

Resampling against the CPU engine's PIL crop-and-resize (images in [0, 1], differences in
units of 1/255): mean < 0.5, max <= 3 for an image no larger than the canvas.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from engine_testing import EPS

from objcrop_plugin.engine import ViewEngine
from objcrop_plugin.engine.datasets import CanvasDataset, collate_canvas
from objcrop_plugin.engine.gpu import GPUViewEngine, GPUViewsMixin, apply_gpu_views
from objcrop_plugin.engine.photometric import make_photometrics, to_tensor
from objcrop_plugin.images import load_rgb, open_image

pytestmark = pytest.mark.usefixtures("one_thread")


def canvas_batch(ds: CanvasDataset, indices) -> dict:
    return collate_canvas([ds[i] for i in indices])


def test_views_match_the_cpu_engine_with_photometrics_off(demo):
    none = make_photometrics("none", normalize=False)
    ds = CanvasDataset(demo.root, demo.proposals_path, views="multi_crop", canvas=(96, 128),
                       seed=1, keys=list(demo.keys), n_global=2, n_local=3, global_size=64,
                       local_size=24, global_policy="object")
    engine = GPUViewEngine.from_recipe(ds.recipe, photometrics=none)
    cpu = ViewEngine(ds.recipe, photometrics=none)
    batch = canvas_batch(ds, range(6))
    views, targets, keys = engine.transform_batch(batch)
    assert [tuple(v.shape) for v in views] == [(6, 3, 64, 64)] * 2 + [(6, 3, 24, 24)] * 3
    for b, key in enumerate(keys):
        image = load_rgb(open_image(demo.root / key))
        boxes = batch["windows"][b].tolist()  # image fits the canvas: canvas px = image px
        for v, box in enumerate(boxes):
            size = tuple(views[v].shape[-2:])
            ref = to_tensor(cpu.crops(image, [_window(box, size)])[0], None)
            diff = (views[v][b] - ref).abs()
            assert diff.mean() < 0.5 * EPS and diff.max() <= 3 * EPS


def _window(box, size):
    from objcrop_plugin.policies import CropWindow

    return CropWindow(box=tuple(box), size=size, policy="test")


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("preset", ["mocov2", "byol", "vicreg", "simclr"])
def test_degenerate_windows_and_flat_images_never_give_nan(preset, antialias):
    engine = GPUViewEngine([(24, 96)] * 2, photometrics=preset, antialias=antialias)
    canvas = torch.zeros(6, 3, 64, 80, dtype=torch.uint8)
    canvas[1] = 255
    canvas[2, :, :, :40] = 128
    canvas[3:] = torch.randint(0, 256, (3, 3, 64, 80), generator=torch.Generator().manual_seed(0),
                               dtype=torch.uint8)
    inf, nan = math.inf, math.nan
    windows = torch.tensor([
        [[0, 0, 80, 64], [10, 10, 12, 12]],          # full canvas; 2 px
        [[5, 5, 5, 5], [30, 40, 30.5, 40.2]],         # empty; sub-pixel
        [[0, 0, 80, 2], [79, 0, 80, 64]],             # extreme aspect; 1 px column at the edge
        [[nan, 0, 10, 10], [-50, -50, 500, 500]],     # NaN; outside the image
        [[20, 30, 10, 5], [inf, 0, 3, 3]],            # inverted; infinite
        [[0, 0, 2, 2], [78, 62, 80, 64]],             # corners
    ], dtype=torch.float32)
    valid = torch.tensor([[80, 64], [80, 64], [80, 64], [40, 64], [1, 1], [80, 64]])
    seeds = torch.arange(6) * 1000
    for views in (engine(canvas, windows, seeds, valid), engine(canvas, windows)):
        assert [tuple(v.shape) for v in views] == [(6, 3, 24, 96)] * 2
        assert all(torch.isfinite(v).all() for v in views)


def test_byol_views_get_asymmetric_augmentations_and_multi_crop_sizes():
    engine = GPUViewEngine.from_recipe("multi_crop", photometrics="byol", n_global=2, n_local=4,
                                       global_size=(40, 32), local_size=16)
    byol = make_photometrics("byol")
    assert [s.photometric for s in engine.slots] == [byol.globals_[0], byol.globals_[1]] + [byol.local] * 4
    params = engine.draw(torch.arange(2000))
    assert params[0].blur.all() and not params[0].solarize.any()  # first view: blur always
    assert 0.05 < params[1].blur.float().mean() < 0.15  # second: blur 0.1, solarise 0.2
    assert 0.15 < params[1].solarize.float().mean() < 0.25
    canvas = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    windows = torch.tensor([0.0, 0.0, 50.0, 60.0]).expand(3, 6, 4)
    views = engine(canvas, windows)
    assert [tuple(v.shape) for v in views] == [(3, 3, 40, 32)] * 2 + [(3, 3, 16, 16)] * 4
    assert all(v.is_contiguous() and v.dtype == torch.float32 for v in views)


def test_views_depend_only_on_the_sample_seed(demo):
    ds = CanvasDataset(demo.root, demo.proposals_path, size=32, canvas=64, seed=7,
                       keys=list(demo.keys))
    engine = GPUViewEngine.from_recipe(ds.recipe, photometrics="mocov2")
    full = engine.transform_batch(canvas_batch(ds, range(6)))[0]
    again = engine.transform_batch(canvas_batch(ds, range(6)))[0]
    part = engine.transform_batch(canvas_batch(ds, [4, 2]))[0]
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    assert all(torch.allclose(a[[4, 2]], b, atol=1e-6) for a, b in zip(full, part))
    ds.set_epoch(1)
    other = engine.transform_batch(canvas_batch(ds, range(6)))[0]
    assert not torch.allclose(full[0], other[0])
    # without per-sample seeds: the engine's own seeded generator
    batch = canvas_batch(ds, range(4))
    a = GPUViewEngine.from_recipe(ds.recipe, seed=3)(batch["canvas"], batch["windows"])
    b = GPUViewEngine.from_recipe(ds.recipe, seed=3)(batch["canvas"], batch["windows"])
    c = GPUViewEngine.from_recipe(ds.recipe, seed=4)(batch["canvas"], batch["windows"])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("preset", ["none", "mocov2"])
def test_cuda_views_match_the_same_engine_on_the_cpu(demo, preset):
    """The device path (float16 matmuls under precision auto) against the CPU's float32 run:
    the same windows and per-sample seeds give the same views."""
    ds = CanvasDataset(demo.root, demo.proposals_path, views="multi_crop", canvas=64, seed=3,
                       keys=list(demo.keys), global_size=32, local_size=16)
    batch = canvas_batch(ds, range(8))
    engine = GPUViewEngine.from_recipe(ds.recipe, photometrics=preset)
    on_cpu = engine.transform_batch(batch)[0]
    cuda = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    on_gpu = engine.transform_batch(cuda)[0]
    assert all(v.is_cuda for v in on_gpu)
    for a, b in zip(on_cpu, on_gpu):
        assert a.shape == b.shape and torch.isfinite(b).all()
        # normalised units: 3/255 of the pixel range is about 0.06 after ImageNet std
        assert (a - b.cpu()).abs().mean() < 0.02, (a - b.cpu()).abs().mean()


def test_wrong_number_of_windows_names_the_fix():
    engine = GPUViewEngine.from_recipe("obj_obj_dilate", size=16)
    with pytest.raises(ValueError, match="same recipe"):
        engine(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="from_recipe"):
        GPUViewEngine("obj_obj_dilate")
    with pytest.raises(ValueError, match="local flags"):
        GPUViewEngine([16, 16], local=[False])


def test_lightning_hook_converts_canvas_batches_only(demo):
    pl = pytest.importorskip("pytorch_lightning")
    ds = CanvasDataset(demo.root, demo.proposals_path, size=24, canvas=48, seed=0,
                       keys=list(demo.keys))
    engine = GPUViewEngine.from_recipe(ds.recipe)

    class Model(GPUViewsMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gpu_views = engine

    model = Model()
    views, targets, keys = model.on_after_batch_transfer(canvas_batch(ds, range(3)), 0)
    assert len(views) == 2 and views[0].shape == (3, 3, 24, 24) and keys == list(demo.keys[:3])
    other = ([torch.zeros(1)], torch.zeros(1), ["x"])
    assert model.on_after_batch_transfer(other, 0) is other
    assert apply_gpu_views(engine, other) is other
    assert len(apply_gpu_views(engine, canvas_batch(ds, [0]))[0]) == 2


def test_from_recipe_takes_the_recipes_view_slots():
    engine = GPUViewEngine.from_recipe("multi_crop", n_global=2, n_local=3, global_size=(48, 40),
                                       local_size=24, photometrics="byol")
    assert engine.view_sizes == [(48, 40)] * 2 + [(24, 24)] * 3
    assert engine.local == [False, False, True, True, True]
    plain = GPUViewEngine([(48, 40), (48, 40), 24, 24, 24], local=[False, False, True, True, True],
                          photometrics="byol")
    assert plain.slots == engine.slots
    assert GPUViewEngine([32, (16, 8)]).local == [False, False]


def test_importing_the_package_does_not_import_kornia():
    code = "import sys, objcrop_plugin, objcrop_plugin.engine.gpu; assert 'kornia' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
