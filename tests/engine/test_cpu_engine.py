"""CPU view engine: modes, EXIF orientation, pixels of known objects, draft decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_testing import SQUARE, H, W, displayed_scene, save_oriented
from PIL import Image

from objcrop_plugin.engine import ViewEngine
from objcrop_plugin.images import draft_factor, load_rgb, open_image, to_rgb
from objcrop_plugin.policies import CropPolicy, ViewRecipe, ViewSpec, make_recipe
from objcrop_plugin.proposals import Proposals, ProposalStore


class ExactBox(CropPolicy):
    """Crops exactly the proposal box: lets a test check which pixels a box refers to."""

    name = "exact_box"
    needs_proposal = True

    def sample(self, image_size, box, rng):
        return tuple(float(v) for v in box)


def exact_engine(size=16, phot="none"):
    recipe = ViewRecipe([ViewSpec(ExactBox(), (size, size))], name="exact")
    return ViewEngine(recipe, photometrics=phot, draft=False)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_box_on_displayed_image_crops_the_object_for_every_exif_orientation(tmp_path, orientation):
    path = save_oriented(tmp_path / f"o{orientation}.jpg", orientation)
    opened = open_image(path)
    assert opened.size == (W, H)
    props = Proposals(np.array([SQUARE], np.float32), np.array([1.0], np.float32), (W, H))
    engine = exact_engine()
    (view,) = engine.from_path(path, props, np.random.default_rng(0))
    assert view.shape == (3, 16, 16)
    rgb = view.mul(255).round()
    # JPEG blurs edges: the interior of the crop is red
    inner = rgb[:, 3:-3, 3:-3]
    assert inner[0].mean() > 200 and inner[1].mean() < 60 and inner[2].mean() < 60


def test_boxes_from_a_store_of_another_resolution_are_rescaled(tmp_path):
    path = save_oriented(tmp_path / "a.png", 6, fmt="PNG")
    half = [v / 2 for v in SQUARE]
    ProposalStore.write(tmp_path / "p.objcrop", [("a.png", [half], [1.0], (W // 2, H // 2))])
    store = ProposalStore(tmp_path / "p.objcrop")
    (view,) = exact_engine().from_path(path, lambda size: store.lookup("a.png", size), np.random.default_rng(0))
    assert torch.all(view[0] > 0.99) and torch.all(view[2] < 0.01)


def make_mode_image(mode: str) -> Image.Image:
    rgb = displayed_scene()
    if mode == "I;16":
        arr = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        return Image.fromarray(arr)
    if mode == "I":
        arr = np.asarray(rgb.convert("L")).astype(np.int32) * 257
        return Image.fromarray(arr)
    if mode == "F":
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32) / 255.0)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"])
def test_every_mode_gives_rgb_views_of_the_right_sizes(tmp_path, mode):
    img = make_mode_image(mode)
    assert img.mode == mode
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (W, H)
    # 16-bit data must not saturate to white: the blue background is darker than the square
    lum = np.asarray(rgb.convert("L")).astype(float)
    if mode not in ("1",):
        assert lum[30, 120] != lum[100, 10]
    fmt = {"CMYK": "TIFF", "F": "TIFF", "I": "TIFF", "I;16": "PNG"}.get(mode, "PNG")
    path = tmp_path / f"m.{fmt.lower()}"
    img.save(path, format=fmt)
    props = Proposals(np.array([[10, 10, 90, 80]], np.float32), np.ones(1, np.float32), (W, H))
    engine = ViewEngine("multi_crop", photometrics="mocov2", n_global=2, n_local=3,
                        global_size=(48, 40), local_size=24, global_policy="object")
    views = engine.from_path(path, props, np.random.default_rng(1))
    assert [tuple(v.shape) for v in views] == [(3, 48, 40)] * 2 + [(3, 24, 24)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    # a PIL image of this mode given to render() directly: converted as the loaders do
    windows = engine.windows((W, H), props, np.random.default_rng(1))
    direct = engine.render(img, windows, np.random.default_rng(2))
    ref = engine.render(rgb, windows, np.random.default_rng(2))
    assert all(torch.equal(a, b) for a, b in zip(direct, ref))
    assert [c.mode for c in engine.crops(img, windows)] == ["RGB"] * 5


def test_draft_factor_never_upsamples():
    assert draft_factor([(0, 0, 640, 480)], [(224, 224)]) == 2
    assert draft_factor([(0, 0, 1800, 1800)], [(224, 224)]) == 8
    assert draft_factor([(0, 0, 640, 480), (0, 0, 100, 100)], [(224, 224), (96, 96)]) == 1
    assert draft_factor([(0, 0, 4000, 4000)], [(96, 96)], max_factor=4) == 4


def test_draft_decoding_keeps_the_object_where_the_box_says(tmp_path):
    big = displayed_scene().resize((W * 8, H * 8), Image.Resampling.NEAREST)
    big.save(tmp_path / "big.jpg", quality=95)
    opened = open_image(tmp_path / "big.jpg")
    assert load_rgb(opened, reduce=4).size == (W * 2, H * 2)
    box = [v * 8 for v in SQUARE]
    props = Proposals(np.array([box], np.float32), np.ones(1, np.float32), (W * 8, H * 8))
    engine = ViewEngine(ViewRecipe([ViewSpec(ExactBox(), (32, 32))]), photometrics="none")
    (view,) = engine.from_path(tmp_path / "big.jpg", props, np.random.default_rng(0))
    inner = view.mul(255)[:, 4:-4, 4:-4]
    assert inner[0].mean() > 200 and inner[2].mean() < 60


def test_view_recipe_passes_through_engine_unchanged():
    recipe = make_recipe("obj_scene", size=40)
    assert ViewEngine(recipe).recipe is recipe
