"""Photometric presets match lightly's defaults; draws follow their probabilities and ranges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from objcrop_plugin.engine.photometric import (
    Photometric,
    PhotometricParams,
    make_photometrics,
    to_tensor,
)

lightly_transforms = pytest.importorskip("lightly.transforms", reason="lightly is not installed")


def _lightly_view_settings(view_transform) -> dict:
    """Read probabilities and ranges out of a lightly view transform's torchvision Compose."""
    out = {"solarize": 0.0, "blur": 0.0}
    order = []
    for t in view_transform.transform.transforms:
        name = type(t).__name__
        if name == "RandomHorizontalFlip":
            out["hflip"] = t.p
        elif name == "RandomApply":
            cj = t.transforms[0]
            out["jitter"] = t.p
            out["brightness"] = cj.brightness[1] - 1
            out["contrast"] = cj.contrast[1] - 1
            out["saturation"] = cj.saturation[1] - 1
            out["hue"] = cj.hue[1]
        elif name == "RandomGrayscale":
            out["grayscale"] = t.p
        elif name == "GaussianBlur":
            out["blur"], out["blur_sigma"] = t.prob, tuple(t.sigmas)
            order.append("blur")
        elif name == "RandomSolarization":
            out["solarize"] = t.prob
            order.append("solarize")
    out["solarize_before_blur"] = order == ["solarize", "blur"]
    return out


def _ours(p: Photometric) -> dict:
    keys = ("hflip", "jitter", "brightness", "contrast", "saturation", "hue", "grayscale", "blur",
            "solarize")
    d = {k: getattr(p, k) for k in keys}
    d["blur_sigma"] = p.blur_sigma
    d["solarize_before_blur"] = p.solarize_before_blur
    return d


@pytest.mark.parametrize(
    "preset, views",
    [
        ("mocov2", lambda: [lightly_transforms.MoCoV2Transform().transforms[0]]),
        ("simclr", lambda: [lightly_transforms.SimCLRTransform().transforms[0]]),
        ("byol", lambda: list(lightly_transforms.BYOLTransform().transforms)),
        ("vicreg", lambda: [lightly_transforms.VICRegTransform().transforms[0]]),
    ],
)
def test_presets_equal_lightly_defaults(preset, views):
    ours = make_photometrics(preset).globals_
    theirs = views()
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        expected = _lightly_view_settings(t)
        got = _ours(o)
        for k, v in expected.items():
            assert got[k] == pytest.approx(v), (preset, k)


def test_byol_views_alternate_between_its_two_asymmetric_transforms():
    pset = make_photometrics("byol")
    assert pset.for_view(0, False).blur == 1.0 and pset.for_view(1, False).solarize == 0.2
    assert pset.for_view(2, False) is pset.for_view(0, False)


def test_draws_follow_the_configured_probabilities_and_ranges():
    p = make_photometrics("vicreg").globals_[0]
    rng = np.random.default_rng(0)
    draws = [p.draw(rng) for _ in range(4000)]
    freq = lambda f: np.mean([f(d) for d in draws])  # noqa: E731
    assert freq(lambda d: d.flip) == pytest.approx(0.5, abs=0.03)
    assert freq(lambda d: d.jitter_order is not None) == pytest.approx(0.8, abs=0.03)
    assert freq(lambda d: d.grayscale) == pytest.approx(0.2, abs=0.03)
    assert freq(lambda d: d.blur_sigma is not None) == pytest.approx(0.5, abs=0.03)
    assert freq(lambda d: d.solarize) == pytest.approx(0.1, abs=0.02)
    jittered = [d for d in draws if d.jitter_order is not None]
    b = np.array([d.brightness for d in jittered])
    h = np.array([d.hue for d in jittered])
    assert b.min() >= 0.6 and b.max() <= 1.4 and np.mean(b) == pytest.approx(1.0, abs=0.02)
    assert h.min() >= -0.1 and h.max() <= 0.1
    assert {d.jitter_order for d in jittered} == {tuple(x) for x in __import__("itertools").permutations(range(4))}
    sig = np.array([d.blur_sigma for d in draws if d.blur_sigma is not None])
    assert sig.min() >= 0.1 and sig.max() <= 2.0


def test_apply_uses_torchvision_kernels():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    p = Photometric()
    params = PhotometricParams(
        flip=True, jitter_order=(3, 0, 2, 1), brightness=1.2, contrast=0.7, saturation=1.3,
        hue=0.05, grayscale=False, blur_sigma=1.0, solarize=False,
    )
    ours = np.asarray(p.apply_pil(img, params))
    ref = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    F = T.functional
    ref = F.adjust_hue(ref, 0.05)
    ref = F.adjust_brightness(ref, 1.2)
    ref = F.adjust_saturation(ref, 1.3)
    ref = F.adjust_contrast(ref, 0.7)
    ref = ref.filter(ImageFilter.GaussianBlur(radius=1.0))
    assert np.array_equal(ours, np.asarray(ref))


def test_to_tensor_normalises_like_torchvision():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 9, 3), dtype=np.uint8))
    ref = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(T.ToTensor()(img))
    assert torch.allclose(to_tensor(img), ref, atol=1e-5)
    assert torch.allclose(to_tensor(img, None), T.ToTensor()(img), atol=1e-6)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="mocov2, simclr, byol, vicreg"):
        make_photometrics("moco")
