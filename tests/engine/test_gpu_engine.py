"""GPU view engine, run on the CPU: same views as the CPU engine, same photometric draws.

Tolerances (images in [0, 1], differences in units of 1/255):

- resampling vs the CPU engine's PIL crop-and-resize, image no larger than the canvas: mean
  < 0.5, max <= 3 (PIL rounds to 8 bits between its two passes and at the end);
- from a canvas smaller than the image: mean < 5 (0.02), the detail the canvas drops;
- photometric kernels vs ``Photometric.apply_pil`` per operation: see ``KERNEL_TOLERANCE``
  (PIL works in 8 bits per step, quantises hue to 1/255 turn, and blurs with 3 box passes).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from objcrop_plugin._random import sample_rng
from objcrop_plugin.data.synthetic import write_dataset
from objcrop_plugin.engine import ViewEngine, load_rgb, open_image
from objcrop_plugin.engine.gpu import (
    CanvasDataset,
    DeviceViewLoader,
    GPUViewEngine,
    GPUViewsMixin,
    PhotometricBatch,
    _draft_reduce,
    apply_gpu_views,
    apply_photometric,
    collate_canvas,
    draw_photometric,
    fit_to_canvas,
    photometric_uniforms,
    resample_windows,
)
from objcrop_plugin.engine.photometric import (
    Photometric,
    PhotometricParams,
    photometrics,
    to_tensor,
)

IMG_W, IMG_H = 128, 96
EPS = 1.0 / 255.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation (10 ms per op on a
    loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_engine") / "demo"
    return write_dataset(root, n_images=12, size=(IMG_W, IMG_H), seed=0)


def smooth_image(seed: int = 0, size: tuple[int, int] = (IMG_W, IMG_H)) -> Image.Image:
    """A textured, colourful test image (random walk in both axes)."""
    rng = np.random.default_rng(seed)
    field = np.cumsum(np.cumsum(rng.normal(size=(size[1], size[0], 3)), 0), 1)
    field = (field - field.mean((0, 1))) / field.std((0, 1))
    return Image.fromarray(np.clip(field * 50 + 128, 0, 255).astype(np.uint8))


def pil_view(image: Image.Image, box, size) -> torch.Tensor:
    return to_tensor(image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box), None)


def canvas_batch(ds: CanvasDataset, indices) -> dict:
    return collate_canvas([ds[i] for i in indices])


# ------------------------------------------------------------------------------ canvas side

def test_canvas_windows_are_the_cpu_engine_windows_in_canvas_pixels(demo):
    ds = CanvasDataset(demo.root, demo.proposals_path, views="obj_obj_dilate", size=32,
                       canvas=64, seed=5, keys=list(demo.keys))
    cpu = ViewEngine("obj_obj_dilate", photometrics="none", size=32)
    for i in range(4):
        item = ds[i]
        key = demo.keys[i]
        opened = open_image(demo.root / key)
        planned = cpu.plan(opened, lambda size, k=key: ds.store.lookup(k, size),
                           sample_rng(5, i, 0), key=key)
        scale = 64 / IMG_W  # 128x96 shrinks to 64x48
        want = torch.tensor([w.box for w in planned.windows], dtype=torch.float32) * scale
        assert torch.allclose(item["windows"], want, atol=1e-4)
        assert item["valid"].tolist() == [64, 48]
        w = item["windows"]
        assert (w[:, 0] >= 0).all() and (w[:, 2] <= 64 + 1e-4).all() and (w[:, 3] <= 48 + 1e-4).all()
        assert item["canvas"].dtype == torch.uint8 and item["canvas"].shape == (3, 64, 64)
        assert item["canvas"][:, 48:].eq(0).all()  # padding below the image
        assert item["seed"].dtype == torch.int64 and item["key"] == key


def test_canvas_keeps_aspect_and_pads_without_enlarging(demo):
    key = demo.keys[0]
    ds = CanvasDataset(demo.root, demo.proposals_path, size=16, canvas=(200, 300), seed=0,
                       keys=[key])
    item = ds[0]
    assert item["valid"].tolist() == [IMG_W, IMG_H]  # fits: not enlarged
    decoded = np.asarray(load_rgb(open_image(demo.root / key)))
    assert np.array_equal(item["canvas"][:, :IMG_H, :IMG_W].permute(1, 2, 0).numpy(), decoded)
    assert item["canvas"][:, IMG_H:].eq(0).all() and item["canvas"][:, :, IMG_W:].eq(0).all()
    tall = CanvasDataset(demo.root, demo.proposals_path, size=16, canvas=(160, 64), seed=0,
                         keys=[key])[0]
    assert tall["valid"].tolist() == [64, 48]  # width-limited: scale 0.5 on both axes
    assert tall["canvas"][:, 48:].eq(0).all()
    default = CanvasDataset(demo.root, demo.proposals_path, size=40, seed=0, keys=[key])
    assert default.canvas == (80, 80)  # twice the largest view side


def test_fit_to_canvas_shrinks_large_images_and_draft_decodes_jpegs(tmp_path):
    big = smooth_image(1, (1024, 512))
    big.save(tmp_path / "big.jpg", quality=95)
    ds = CanvasDataset(tmp_path, None, views="scene_scene", size=32, canvas=128, seed=0)
    assert _draft_reduce(open_image(tmp_path / "big.jpg"), (128, 64)) == 8
    item = ds[0]
    assert item["valid"].tolist() == [128, 64]
    ref, valid = fit_to_canvas(big, (128, 128))
    assert valid == (128, 64)
    diff = (item["canvas"].float() - ref.float()).abs()[:, :64]
    assert diff.mean() < 4  # draft decoding + JPEG vs the full-resolution PIL shrink


# ------------------------------------------------------------------------- resampling

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


def test_views_match_the_cpu_engine_with_photometrics_off(demo):
    none = photometrics("none", normalize=False)
    ds = CanvasDataset(demo.root, demo.proposals_path, views="multi_crop", canvas=(96, 128),
                       seed=1, keys=list(demo.keys), n_global=2, n_local=3, global_size=64,
                       local_size=24, global_policy="object")
    engine = GPUViewEngine(ds.recipe, photometrics=none)
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
    engine = GPUViewEngine("scene_scene", photometrics=preset, size=(24, 96), antialias=antialias)
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


# ------------------------------------------------------------------------- photometrics

CPU_PRESET_VIEWS = {
    "mocov2": photometrics("mocov2").globals_[0],
    "simclr": photometrics("simclr").globals_[0],
    "byol_1": photometrics("byol").globals_[0],
    "byol_2": photometrics("byol").globals_[1],
    "vicreg": photometrics("vicreg").globals_[0],
}


def same_distribution(a, b) -> bool:
    """Two-sample Kolmogorov-Smirnov test at significance 0.001."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max()) < 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


@pytest.mark.parametrize("name", list(CPU_PRESET_VIEWS))
def test_photometric_draws_have_the_cpu_engines_distributions(name):
    p, n = CPU_PRESET_VIEWS[name], 4000
    rng = np.random.default_rng(0)
    cpu = [p.draw(rng) for _ in range(n)]
    seeds = torch.from_numpy(np.random.default_rng(1).integers(0, 2**62, n))
    batch = draw_photometric(p, photometric_uniforms(seeds, 1)[:, 0])
    gpu = [batch.params(i) for i in range(n)]
    flags = {
        "flip": (lambda q: q.flip, p.hflip),
        "jitter": (lambda q: q.jitter_order is not None, p.jitter),
        "grayscale": (lambda q: q.grayscale, p.grayscale),
        "blur": (lambda q: q.blur_sigma is not None, p.blur),
        "solarize": (lambda q: q.solarize, p.solarize),
    }
    for flag, (get, prob) in flags.items():
        tol = 5 * math.sqrt(max(prob * (1 - prob), 1e-12) / n) + 1e-9
        for draws in (cpu, gpu):
            assert abs(np.mean([get(q) for q in draws]) - prob) <= tol, flag
    jit_c = [q for q in cpu if q.jitter_order is not None]
    jit_g = [q for q in gpu if q.jitter_order is not None]
    for attr, spread in (("brightness", p.brightness), ("contrast", p.contrast),
                         ("saturation", p.saturation), ("hue", p.hue)):
        lo, hi = (-spread, spread) if attr == "hue" else (max(0.0, 1 - spread), 1 + spread)
        g = np.array([getattr(q, attr) for q in jit_g])
        assert g.min() >= lo - 1e-6 and g.max() <= hi + 1e-6
        assert g.min() < lo + 0.01 * (hi - lo) and g.max() > hi - 0.01 * (hi - lo)
        assert same_distribution(g, [getattr(q, attr) for q in jit_c]), attr
    # every one of the 24 orders, equally often (chi-square, 23 dof, p ~ 1e-4 at 55)
    counts = Counter(q.jitter_order for q in jit_g)
    assert len(counts) == 24
    expected = len(jit_g) / 24
    assert sum((c - expected) ** 2 / expected for c in counts.values()) < 55
    if p.blur > 0:
        s_g = [q.blur_sigma for q in gpu if q.blur_sigma is not None]
        s_c = [q.blur_sigma for q in cpu if q.blur_sigma is not None]
        assert min(s_g) >= p.blur_sigma[0] - 1e-6 and max(s_g) <= p.blur_sigma[1] + 1e-6
        assert same_distribution(s_g, s_c)
    # non-jittered views keep neutral factors
    assert all(q.brightness == 1 and q.hue == 0 for q in gpu if q.jitter_order is None)


def test_params_round_trip_between_cpu_and_gpu_forms():
    p = photometrics("vicreg").globals_[0]
    rng = np.random.default_rng(3)
    drawn = [p.draw(rng) for _ in range(50)]
    batch = PhotometricBatch.from_params(drawn, p)
    back = [batch.params(i) for i in range(50)]
    for a, b in zip(drawn, back):
        assert (a.flip, a.jitter_order, a.grayscale, a.solarize) == (b.flip, b.jitter_order, b.grayscale, b.solarize)
        assert (a.blur_sigma is None) == (b.blur_sigma is None)
        assert a.brightness == pytest.approx(b.brightness, abs=1e-6)
        assert a.hue == pytest.approx(b.hue, abs=1e-6)


# (mean, max) allowed difference to PIL, in 1/255
# (PIL rounds to 8 bits after every step: a chain of three adds up its roundings)
KERNEL_TOLERANCE = {"flip": (0.01, 0.01), "jitter": (0.6, 1.5), "chain": (2.0, 4.0),
                    "hue": (2.0, 12.0), "grayscale": (0.5, 1.0), "blur": (0.8, 6.0),
                    "solarize": (0.01, 0.01)}
KERNEL_CASES = [
    ("flip", PhotometricParams(flip=True)),
    ("jitter", PhotometricParams(jitter_order=(0, 1, 2, 3), brightness=1.35)),
    ("jitter", PhotometricParams(jitter_order=(0, 1, 2, 3), brightness=0.6)),
    ("jitter", PhotometricParams(jitter_order=(1, 0, 2, 3), contrast=1.4)),
    ("jitter", PhotometricParams(jitter_order=(1, 0, 2, 3), contrast=0.6)),
    ("jitter", PhotometricParams(jitter_order=(2, 0, 1, 3), saturation=1.4)),
    ("jitter", PhotometricParams(jitter_order=(2, 0, 1, 3), saturation=0.0)),
    ("chain", PhotometricParams(jitter_order=(2, 1, 0, 3), brightness=1.2, contrast=0.7,
                                 saturation=1.3)),
    ("hue", PhotometricParams(jitter_order=(3, 0, 1, 2), hue=0.08)),
    ("hue", PhotometricParams(jitter_order=(3, 0, 1, 2), hue=-0.1)),
    ("hue", PhotometricParams(jitter_order=(1, 3, 0, 2), brightness=0.8, contrast=1.3,
                              saturation=0.6, hue=-0.07)),
    ("hue", PhotometricParams(jitter_order=(2, 0, 1, 3), brightness=1.2, contrast=0.7,
                              saturation=1.3, hue=0.05)),
    ("grayscale", PhotometricParams(grayscale=True)),
    ("blur", PhotometricParams(blur_sigma=0.1)),
    ("blur", PhotometricParams(blur_sigma=1.0)),
    ("blur", PhotometricParams(blur_sigma=2.0)),
    ("solarize", PhotometricParams(solarize=True)),
]


def test_photometric_kernels_match_pil_per_operation():
    crop = smooth_image(5).resize((64, 64), Image.Resampling.BILINEAR, box=(10, 5, 90, 85))
    for solarize_first in (False, True):
        p = Photometric(normalize=False, solarize_before_blur=solarize_first)
        params = [q for _, q in KERNEL_CASES]
        params.append(PhotometricParams(blur_sigma=1.5, solarize=True))
        x = to_tensor(crop, None).expand(len(params), 3, 64, 64)
        out = apply_photometric(x, PhotometricBatch.from_params(params, p))
        for (op, q), view in zip([*KERNEL_CASES, ("blur", params[-1])], out):
            diff = (view - to_tensor(p.apply_pil(crop, q), None)).abs() / EPS
            mean_tol, max_tol = KERNEL_TOLERANCE[op]
            assert diff.mean() <= mean_tol and diff.max() <= max_tol, (q, diff.mean(), diff.max())


def test_colour_jitter_has_torchvision_tensor_semantics():
    """Each row's own order and factors, as torchvision's tensor kernels apply them."""
    import torchvision.transforms.v2.functional as TF

    p = Photometric(normalize=False, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.4)
    batch = draw_photometric(p, photometric_uniforms(torch.arange(24) + 100, 1)[:, 0])
    batch.flip[:] = False
    x = torch.rand(24, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    x[0], x[1, :, :4] = 0.0, 0.5  # black, gray: no NaN from the hue of a colourless pixel
    out = apply_photometric(x, batch)
    kernels = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(24):
        q, ref = batch.params(i), x[i]
        for op in q.jitter_order or ():
            ref = kernels[op](ref, (q.brightness, q.contrast, q.saturation, q.hue)[op])
        if q.grayscale:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        # (luma weights: PIL's 0.299 here, torchvision's 0.2989: 1e-4 apart)
        assert (out[i] - ref).abs().max() < 3e-4 or q.blur_sigma is not None, q


def test_normalisation_and_untouched_rows():
    p = Photometric()
    x = to_tensor(smooth_image(6).resize((32, 32)), None)[None].repeat(2, 1, 1, 1)
    params = [PhotometricParams(), PhotometricParams(jitter_order=(3, 2, 1, 0))]  # neutral
    out = apply_photometric(x, PhotometricBatch.from_params(params, p))
    mean = torch.tensor(p.mean).view(3, 1, 1)
    std = torch.tensor(p.std).view(3, 1, 1)
    assert torch.allclose(out[0], (x[0] - mean) / std, atol=1e-6)
    assert torch.allclose(out[1], out[0], atol=1e-5)


# ------------------------------------------------------------------------------- engine

def test_byol_views_get_asymmetric_augmentations_and_multi_crop_sizes():
    engine = GPUViewEngine("multi_crop", photometrics="byol", n_global=2, n_local=4,
                           global_size=(40, 32), local_size=16)
    byol = photometrics("byol")
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
    engine = GPUViewEngine(ds.recipe, photometrics="mocov2")
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
    a = GPUViewEngine(ds.recipe, seed=3)(batch["canvas"], batch["windows"])
    b = GPUViewEngine(ds.recipe, seed=3)(batch["canvas"], batch["windows"])
    c = GPUViewEngine(ds.recipe, seed=4)(batch["canvas"], batch["windows"])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_wrong_number_of_windows_names_the_fix():
    engine = GPUViewEngine("obj_obj_dilate", size=16)
    with pytest.raises(ValueError, match="same recipe"):
        engine(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="collate_canvas"):
        collate_canvas([(torch.zeros(3), 0, "x")])


@pytest.mark.parametrize("workers", [0, 2])
def test_device_view_loader_yields_lightly_batches(demo, workers):
    ds = CanvasDataset(demo.root, demo.proposals_path, size=24, canvas=48, seed=0,
                       keys=list(demo.keys))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=workers, collate_fn=collate_canvas,
        multiprocessing_context="spawn" if workers else None,
    )
    wrapped = DeviceViewLoader(loader, GPUViewEngine(ds.recipe), device="cpu")
    assert len(wrapped) == 3 and wrapped.dataset is ds
    wrapped.set_epoch(2)
    assert ds.epoch == 2
    seen = []
    for views, targets, filenames in wrapped:
        assert isinstance(views, list) and [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2
        assert targets.dtype == torch.int64 and targets.shape == (4,)
        assert isinstance(filenames, list) and all(isinstance(f, str) for f in filenames)
        assert all(torch.isfinite(v).all() for v in views)
        seen += filenames
    assert seen == list(demo.keys)


def test_lightning_hook_converts_canvas_batches_only(demo):
    pl = pytest.importorskip("pytorch_lightning")
    ds = CanvasDataset(demo.root, demo.proposals_path, size=24, canvas=48, seed=0,
                       keys=list(demo.keys))
    engine = GPUViewEngine(ds.recipe)

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
