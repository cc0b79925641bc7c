"""Per-box sampling and epoch lengths (``FolderSource``): one item per stored box, its object
views cut from that box; scene runs cycled to a per-box run's length (matched compute).

Oracles: PIL pixels (each box holds one colour, so a view cut inside it shows that colour),
the store's boxes ranked by hand, and the view recipe called directly with the item's stream.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from objcrop_plugin._random import sample_rng
from objcrop_plugin.engine.datasets import BoxIndex, CanvasDataset, ObjectCropDataset
from objcrop_plugin.engine.photometric import IMAGENET_MEAN, IMAGENET_STD
from objcrop_plugin.proposals import ProposalStore

pytestmark = pytest.mark.usefixtures("one_thread")

W, H = 128, 120
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "yellow": (255, 255, 0)}
BOXES = {"red": (8, 8, 48, 40), "green": (60, 10, 110, 50), "yellow": (20, 60, 70, 110)}
# image -> stored boxes (colour, score) in stored order; ranked best first by score
STORED = {
    "a/0.png": [("red", 0.2), ("green", 0.9), ("yellow", 0.5)],  # green, yellow, red
    "a/1.png": [("yellow", 0.3), ("red", 0.8)],  # red, yellow
    "b/3.png": [],  # an entry without boxes
}  # b/2.png: no entry at all
ITEMS = [("a/0.png", "green"), ("a/0.png", "yellow"), ("a/0.png", "red"),
         ("a/1.png", "red"), ("a/1.png", "yellow")]


@pytest.fixture
def folder(tmp_path):
    for key in ("a/0.png", "a/1.png", "b/2.png", "b/3.png"):
        img = Image.new("RGB", (W, H), (0, 0, 255))
        for colour, _ in STORED.get(key, []):
            x1, y1, x2, y2 = BOXES[colour]
            img.paste(Image.new("RGB", (x2 - x1, y2 - y1), COLOURS[colour]), (x1, y1))
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / key)
    ProposalStore.write(tmp_path / "p.objcrop", [
        (key, [BOXES[c] for c, _ in boxes] or np.zeros((0, 4)), [s for _, s in boxes], (W, H))
        for key, boxes in STORED.items()
    ])
    return tmp_path


def colour_of(view: torch.Tensor) -> str:
    """The box colour a view shows: >= 80% of its pixels within 0.1 of it."""
    rgb = view * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    for name, c in COLOURS.items():
        close = ((rgb - torch.tensor(c).view(3, 1, 1) / 255.0).abs() < 0.1).all(0)
        if close.float().mean() >= 0.8:
            return name
    raise AssertionError("the view shows no single box colour")


def per_box(folder, **kw) -> ObjectCropDataset:
    kw = {"views": "obj_obj", "photometrics": "none", "size": 16, "seed": 0, "sampling": "per_box",
          **kw}
    return ObjectCropDataset(folder, folder / "p.objcrop", **kw)


def test_one_item_per_stored_box_best_first_views_from_its_box(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        ds = per_box(folder)
    assert "2 images have no proposals and are not sampled with per_box sampling" in caplog.text
    assert len(ds) == 5 and ds.keys == ["a/0.png", "a/1.png", "b/2.png", "b/3.png"]
    for i, (key, colour) in enumerate(ITEMS):
        for _ in range(3):  # every draw: both views inside the item's own box
            views, target, name = ds[i]
            assert (name, target) == (key, 0)
            assert [colour_of(v) for v in views] == [colour, colour]
    assert ds.recipe.fallbacks.fallbacks == 0
    # the item's stream is sample_rng(seed, i, epoch), its proposals the one box
    ds.set_epoch(2)
    s = ds.source.sample(4)
    got = [w.box for w in ds.engine.windows((W, H), s.proposals, s.rng, s.key)]
    want = ds.recipe((W, H), np.array([BOXES["yellow"]], float), rng=sample_rng(0, 4, 2))
    assert got == [w.box for w in want]


def test_max_boxes_per_image_takes_the_best_and_canvas_dataset_agrees(folder):
    ds = per_box(folder, max_boxes_per_image=1)
    assert len(ds) == 2
    assert [(ds[i][2], colour_of(ds[i][0][0])) for i in range(2)] == [
        ("a/0.png", "green"), ("a/1.png", "red")]
    canvas = CanvasDataset(folder, folder / "p.objcrop", views="obj_obj", size=16, seed=0,
                           canvas=(H, W), sampling="per_box")
    assert len(canvas) == 5
    for i, (key, colour) in enumerate(ITEMS):
        item = canvas[i]
        x1, y1, x2, y2 = BOXES[colour]  # canvas = image size: canvas pixels are image pixels
        win = item["windows"]
        assert item["key"] == key and item["target"] == 0
        assert bool(((win[:, 0] >= x1 - 1e-4) & (win[:, 2] <= x2 + 1e-4)
                     & (win[:, 1] >= y1 - 1e-4) & (win[:, 3] <= y2 + 1e-4)).all())
    index = BoxIndex(ProposalStore(folder / "p.objcrop"), ds.keys, 1)
    assert index.counts.tolist() == [1, 1, 0, 0] and index.locate(1) == (1, 0)


def test_the_recipes_area_bounds_decide_which_boxes_are_items(folder):
    """`min_area=0.1` leaves out the red box (8% of the image): it makes no item, instead of
    an item whose views fall back to scene crops (27 of 32 items did, silently)."""
    ds = per_box(folder, min_area=0.1)
    items = [("a/0.png", "green"), ("a/0.png", "yellow"), ("a/1.png", "yellow")]
    assert len(ds) == 3
    for i, (key, colour) in enumerate(items):
        views, _, name = ds[i]
        assert name == key and [colour_of(v) for v in views] == [colour, colour]
    assert ds.recipe.fallbacks.fallbacks == 0
    canvas = CanvasDataset(folder, folder / "p.objcrop", views="obj_obj", size=16, seed=0,
                           canvas=(H, W), sampling="per_box", max_area=0.14)
    assert len(canvas) == 3  # green, red; red
    assert [canvas[i]["key"] for i in range(3)] == ["a/0.png", "a/0.png", "a/1.png"]


def test_an_index_past_the_end_is_an_index_error(folder):
    """`for item in dataset` (Python's sequence protocol) ends at len(dataset), instead of
    wrapping round for ever; ds[-1] is the last item."""
    for ds in (per_box(folder), ObjectCropDataset(folder, folder / "p.objcrop", views="obj_obj",
                                                  size=16, seed=0),
               CanvasDataset(folder, folder / "p.objcrop", views="obj_obj", size=16, seed=0)):
        with pytest.raises(IndexError, match=f"index {len(ds)} out of range"):
            ds[len(ds)]
        with pytest.raises(IndexError):
            ds[-len(ds) - 1]
        assert len(list(ds)) == len(ds)
        last = ds[-1]
        name = last["key"] if isinstance(last, dict) else last[2]
        assert name == ds.keys[ds.source.image(len(ds) - 1)]


def test_boxes_no_view_can_be_cut_from_make_no_item(tmp_path):
    """A NaN box and a sliver under 2 px wide, scored best: per-box items are the usable
    box only, so the image's one item with max_boxes_per_image=1 is an object view."""
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "a.png")
    ProposalStore.write(tmp_path / "p.objcrop", [(
        "a.png", [[np.nan, 0, 10, 10], [5, 5, 40, 40], [1, 1, 1.5, 30]], [0.9, 0.5, 0.95],
        (64, 48))])
    for m in (1, None):
        ds = ObjectCropDataset(tmp_path, tmp_path / "p.objcrop", photometrics="none", seed=0,
                               size=16, sampling="per_box", max_boxes_per_image=m)
        assert len(ds) == 1
        ds[0]
        assert ds.recipe.fallbacks.as_dict()["unusable"] == 0
    index = BoxIndex(ProposalStore(tmp_path / "p.objcrop"), ["a.png"])
    assert index.counts.tolist() == [1]


def test_epoch_length_boxes_cycles_images_with_fresh_crops(folder):
    scene = ObjectCropDataset(folder, folder / "p.objcrop", views="scene_scene", size=16, seed=1,
                              epoch_length="boxes")
    assert len(scene) == 5 == len(per_box(folder))  # a per_box run's samples, per epoch
    assert sorted(Counter(scene.source.image(k) for k in range(5)).values()) == [1, 1, 1, 2]
    long = ObjectCropDataset(folder, None, views="scene_scene", size=16, seed=1, epoch_length=40)
    orders = []
    for epoch in range(3):
        long.set_epoch(epoch)
        images = [long.source.image(k) for k in range(40)]
        assert Counter(images) == {0: 10, 1: 10, 2: 10, 3: 10}
        orders.append(images)
    assert len({tuple(o) for o in orders}) == 3  # a new order per epoch
    again = ObjectCropDataset(folder, None, views="scene_scene", size=16, seed=1, epoch_length=40)
    again.set_epoch(2)
    assert [again.source.image(k) for k in range(40)] == orders[2]  # from (seed, epoch) only
    # sample k and k + 4 visit the same image with their own streams: other crops
    a, b = long[3], long[7]
    assert a[2] == b[2] and not torch.equal(a[0][0], b[0][0])


def test_an_unreadable_image_gives_way_to_the_next_readable_item(folder):
    bad = folder / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: its three items cannot be made
    ds = per_box(folder, max_failure_rate=0.5)
    views, target, name = ds[0]
    assert name == "a/1.png" and colour_of(views[0]) == "red"  # item 3, with item 0's stream
    assert ds.bad.count == 1 and ds.bad.indices() == [0] and ds.bad.failed_reads == 1
    assert [row[0] for row in ds.bad_images()] == ["a/0.png"]
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    batch_views, targets, names = next(iter(loader))
    assert [tuple(v.shape) for v in batch_views] == [(5, 3, 16, 16)] * 2
    assert list(names) == ["a/1.png"] * 5


def test_per_box_errors_name_the_argument_and_the_fix(folder, tmp_path_factory):
    with pytest.raises(ValueError, match=r"sampling='per_box' needs a proposal store.*Fix"):
        ObjectCropDataset(folder, None, views="scene_scene", sampling="per_box")
    with pytest.raises(ValueError, match=r"epoch_length='boxes' needs a proposal store"):
        ObjectCropDataset(folder, None, views="scene_scene", epoch_length="boxes")
    with pytest.raises(ValueError, match="sampling must be one of per_image, per_box"):
        per_box(folder, sampling="per_bbox")
    with pytest.raises(ValueError, match="epoch_length must be"):
        per_box(folder, epoch_length=0)
    with pytest.raises(ValueError, match="max_boxes_per_image must be >= 1"):
        per_box(folder, max_boxes_per_image=0)
    with pytest.raises(ValueError, match=r"weighting='rank' chooses among an image's boxes, but "
                                         r"with sampling='per_box'.*Fix"):
        per_box(folder, weighting="rank")
    ds = per_box(folder)
    with pytest.raises(ValueError, match=r"needs a fixed proposal store, but online"):
        ds.source.schedule = object()
    ds.source.schedule = None  # a fixed store: fine
    other = tmp_path_factory.mktemp("other")
    shutil.copytree(folder / "a", other / "x")
    shutil.copy(folder / "p.objcrop", other / "p.objcrop")
    with pytest.raises(ValueError, match=r"none of the 2 images checked .* has an entry in .*"
                                         r"Fix: pass the folder the store was built over"):
        per_box(other)


def test_per_box_refuses_a_store_whose_boxes_make_no_item(folder):
    """The folder's images are in the store but no box can be cut (under 2 px): nothing to
    sample per box, said with the fix."""
    keys = ["a/0.png", "a/1.png", "b/2.png", "b/3.png"]
    ProposalStore.write(folder / "tiny.objcrop", [(k, [[0, 0, 1, 1]], [1.0], (W, H)) for k in keys])
    with pytest.raises(ValueError, match=r"none of the 4 images under .* has a box in .*tiny\.objcrop"
                                         r".*Fix: .*sampling='per_image'"):
        ObjectCropDataset(folder, folder / "tiny.objcrop", views="obj_obj", size=16,
                          sampling="per_box")
