"""CPU view engine: modes, EXIF orientation, pixels of known objects, draft decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from objcrop_plugin.engine import ObjectCropDataset, ViewEngine, load_rgb, open_image, to_rgb
from objcrop_plugin.engine.decode import ImageDecodeError, draft_factor
from objcrop_plugin.policies import CropPolicy, ViewRecipe, ViewSpec, make_recipe
from objcrop_plugin.proposals import Proposals, ProposalStore

W, H = 160, 120
SQUARE = (100, 20, 140, 60)  # xyxy on the displayed image
RED = (255, 0, 0)


class ExactBox(CropPolicy):
    """Crops exactly the proposal box: lets a test check which pixels a box refers to."""

    name = "exact_box"
    needs_proposal = True

    def sample(self, image_size, box, rng):
        return tuple(float(v) for v in box)


def exact_engine(size=16, phot="none"):
    recipe = ViewRecipe([ViewSpec(ExactBox(), (size, size))], name="exact")
    return ViewEngine(recipe, photometrics=phot, draft=False)


def displayed_scene() -> Image.Image:
    img = Image.new("RGB", (W, H), (0, 0, 255))
    img.paste(Image.new("RGB", (SQUARE[2] - SQUARE[0], SQUARE[3] - SQUARE[1]), RED), SQUARE[:2])
    return img


# raw = INVERSE[o](displayed) so that applying EXIF orientation o to raw shows `displayed`
INVERSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def save_oriented(path, orientation: int, fmt: str = "JPEG"):
    shown = displayed_scene()
    raw = shown if INVERSE[orientation] is None else shown.transpose(INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw.save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    # the fixture itself must mean what we think it means
    assert np.array_equal(
        np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[30, 120] > 200,
        np.array([True, False, False]),
    )
    return path


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


def test_same_seed_gives_same_views_and_another_seed_other_views(tmp_path):
    save_oriented(tmp_path / "a.jpg", 1)
    ProposalStore.write(tmp_path / "p.objcrop", [("a.jpg", [SQUARE], [1.0], (W, H))])
    kw = dict(views="obj_obj_dilate", photometrics="mocov2", size=32)
    a = ObjectCropDataset(tmp_path, tmp_path / "p.objcrop", seed=3, **kw)
    b = ObjectCropDataset(tmp_path, tmp_path / "p.objcrop", seed=3, **kw)
    c = ObjectCropDataset(tmp_path, tmp_path / "p.objcrop", seed=4, **kw)
    va, vb, vc = a[0][0], b[0][0], c[0][0]
    assert all(torch.equal(x, y) for x, y in zip(va, vb))
    assert not all(torch.equal(x, y) for x, y in zip(va, vc))
    a.set_epoch(1)
    assert not all(torch.equal(x, y) for x, y in zip(a[0][0], vb))


def test_dataset_item_and_targets_follow_folder_layout(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        displayed_scene().save(tmp_path / cls / "x.jpg")
    ds = ObjectCropDataset(tmp_path, None, views="scene_scene", size=24, seed=0)
    assert ds.keys == ["cat/x.jpg", "dog/x.jpg"]
    views, target, key = ds[1]
    assert (target, key) == (1, "dog/x.jpg") and len(views) == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batch_views, targets, keys = next(iter(loader))
    assert [tuple(v.shape) for v in batch_views] == [(2, 3, 24, 24)] * 2
    assert targets.tolist() == [0, 1] and list(keys) == ["cat/x.jpg", "dog/x.jpg"]


def test_missing_store_for_object_recipe_is_a_clear_error(tmp_path):
    displayed_scene().save(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="no proposal store"):
        ObjectCropDataset(tmp_path, None, views="obj_obj_dilate")


def test_missing_key_falls_back_to_scene_and_is_counted(tmp_path):
    displayed_scene().save(tmp_path / "x.jpg")
    displayed_scene().save(tmp_path / "y.jpg")
    ProposalStore.write(tmp_path / "p.objcrop", [("x.jpg", [SQUARE], [1.0], (W, H))])
    ds = ObjectCropDataset(tmp_path, tmp_path / "p.objcrop", size=16, seed=0)
    for i in range(len(ds)):
        ds[i]
    assert ds.recipe.fallbacks.as_dict() == {"samples": 2, "missing": 1, "unusable": 0}


def test_undecodable_file_names_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    ds = ObjectCropDataset(tmp_path, None, views="scene_scene")
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        ds[0]


def test_view_recipe_passes_through_engine_unchanged():
    recipe = make_recipe("obj_scene", size=40)
    assert ViewEngine(recipe).recipe is recipe
