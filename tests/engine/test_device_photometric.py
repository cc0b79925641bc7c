"""Device photometrics: the CPU engine's parameter distributions, PIL's and torchvision's kernels.

Kernels vs ``Photometric.apply_pil`` per operation: see ``KERNEL_TOLERANCE`` (PIL works in 8
bits per step, quantises hue to 1/255 turn, and blurs with 3 box passes).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from engine_testing import EPS, smooth_image
from PIL import Image

from objcrop_plugin._random import counter_uniforms
from objcrop_plugin.engine.device_photometric import (
    N_DRAWS,
    PhotometricBatch,
    apply_photometric,
    draw_photometric,
)
from objcrop_plugin.engine.photometric import (
    Photometric,
    PhotometricParams,
    make_photometrics,
    to_tensor,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_counter_uniforms_depend_only_on_seed_slot_and_draw():
    seeds = torch.tensor([5, 2**62 + 7, 5, 0])
    u = counter_uniforms(seeds, 3, N_DRAWS)
    assert u.shape == (4, 3, N_DRAWS) and u.dtype == torch.float32
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert torch.equal(counter_uniforms(seeds[[1, 0]], 3, N_DRAWS), u[[1, 0]])  # any batch
    many = counter_uniforms(torch.arange(2000), 2, N_DRAWS)
    assert float(many.min()) >= 0.0 and float(many.max()) < 1.0
    assert abs(float(many.mean()) - 0.5) < 0.01


CPU_PRESET_VIEWS = {
    "mocov2": make_photometrics("mocov2").globals_[0],
    "simclr": make_photometrics("simclr").globals_[0],
    "byol_1": make_photometrics("byol").globals_[0],
    "byol_2": make_photometrics("byol").globals_[1],
    "vicreg": make_photometrics("vicreg").globals_[0],
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
    batch = draw_photometric(p, counter_uniforms(seeds, 1, N_DRAWS)[:, 0])
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
    p = make_photometrics("vicreg").globals_[0]
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

    p = Photometric(normalize=False, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.4,
                    blur=0.0)  # every row compared (blur has its own test above)
    batch = draw_photometric(p, counter_uniforms(torch.arange(24) + 100, 1, N_DRAWS)[:, 0])
    assert sum(batch.params(i).jitter_order is not None for i in range(24)) >= 12
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
        assert q.blur_sigma is None and (out[i] - ref).abs().max() < 3e-4, q


def test_normalisation_and_untouched_rows():
    p = Photometric()
    x = to_tensor(smooth_image(6).resize((32, 32)), None)[None].repeat(2, 1, 1, 1)
    params = [PhotometricParams(), PhotometricParams(jitter_order=(3, 2, 1, 0))]  # neutral
    out = apply_photometric(x, PhotometricBatch.from_params(params, p))
    mean = torch.tensor(p.mean).view(3, 1, 1)
    std = torch.tensor(p.std).view(3, 1, 1)
    assert torch.allclose(out[0], (x[0] - mean) / std, atol=1e-6)
    assert torch.allclose(out[1], out[0], atol=1e-5)
