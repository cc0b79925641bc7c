"""Both datasets: folder layout, targets, seeds; canvases and windows; the device loader.

The canvas dataset's oracles are the CPU engine (the same windows for the same seed) and PIL
(the decoded image, the shrink to the canvas).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_testing import IMG_H, IMG_W, SQUARE, H, W, displayed_scene, save_oriented, smooth_image

from objcrop_plugin._random import sample_rng
from objcrop_plugin.engine import ViewEngine
from objcrop_plugin.engine.datasets import (
    CanvasDataset,
    DeviceViewLoader,
    ObjectCropDataset,
    collate_canvas,
    fit_to_canvas,
)
from objcrop_plugin.engine.gpu import GPUViewEngine
from objcrop_plugin.images import ImageDecodeError, draft_factor, load_rgb, open_image
from objcrop_plugin.proposals import ProposalStore

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ ObjectCropDataset

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


@pytest.mark.parametrize("cls", [ObjectCropDataset, CanvasDataset])
def test_a_store_built_over_another_folder_is_refused(tmp_path, cls):
    """None of the folder's images in the store: every view would be a scene crop (a
    baseline run, with only per-sample warnings); refused, naming both sides' keys and the fix.
    A store that has some of them is taken (its other images fall back, counted)."""
    save_oriented(tmp_path / "a.jpg", 1)
    save_oriented(tmp_path / "b.jpg", 1)
    ProposalStore.write(tmp_path / "other.objcrop",
                        [("images/000000.jpg", [SQUARE], [1.0], (W, H))])
    with pytest.raises(ValueError, match=r"none of the 2 images checked under .* has an entry "
                                         r"in .*other\.objcrop: the image key 'a\.jpg' .*keys "
                                         r"look like 'images/000000\.jpg'.*Fix: pass the folder"):
        cls(tmp_path, tmp_path / "other.objcrop", views="obj_obj_dilate", size=32)
    ProposalStore.write(tmp_path / "half.objcrop", [("b.jpg", [SQUARE], [1.0], (W, H))])
    assert len(cls(tmp_path, tmp_path / "half.objcrop", views="obj_obj_dilate", size=32)) == 2


def _folder_of(tmp_path, n):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
            tmp_path / f"img{i:02d}.png")
    return tmp_path


def test_set_epoch_reaches_persistent_workers(tmp_path):
    """A persistent worker keeps its copy of the dataset: set_epoch in the main process used
    to leave it at the epoch it started with, so every epoch had the first one's crops."""
    ds = ObjectCropDataset(_folder_of(tmp_path, 6), None, views="scene_scene",
                           photometrics="none", seed=3, size=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2,
                                         persistent_workers=True)
    views = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        views.append([v for batch in loader for v in batch[0]])
    assert not all(torch.equal(a, b) for a, b in zip(*views))
    # epoch 1's crops in the workers are epoch 1's crops of the main process
    expected = [torch.stack([ds[i][0][v] for i in range(b, b + 3)])
                for b in (0, 3) for v in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(views[1], expected))


def test_without_a_seed_a_short_epoch_visits_other_images_each_epoch(tmp_path):
    """seed=None, epoch_length below the images: the epoch's subset followed (seed or 0,
    epoch), the same images every epoch and run unless set_epoch was called."""
    ds = ObjectCropDataset(_folder_of(tmp_path, 20), None, views="scene_scene",
                           photometrics="none", seed=None, size=16, epoch_length=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    torch.manual_seed(0)
    visited = [sorted(int(k[3:5]) for k in next(iter(loader))[2]) for _ in range(3)]
    assert len({tuple(v) for v in visited}) == 3, visited


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
    assert ds.recipe.fallbacks.as_dict() == {"samples": 2, "missing": 1, "unusable": 0, "mismatched": 0}


def test_undecodable_file_names_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    ds = ObjectCropDataset(tmp_path, None, views="scene_scene")
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        ds[0]


def test_both_datasets_list_the_same_keys_and_targets(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        displayed_scene().save(tmp_path / cls / "x.jpg")
    cpu = ObjectCropDataset(tmp_path, None, views="scene_scene", size=24, seed=0)
    canvas = CanvasDataset(tmp_path, None, views="scene_scene", size=24, seed=0)
    assert canvas.keys == cpu.keys and canvas.classes == cpu.classes == ["cat", "dog"]
    assert [canvas[i]["target"] for i in range(2)] == [cpu[i][1] for i in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="no proposal store"):
        CanvasDataset(tmp_path, None, views="obj_obj_dilate")


# --------------------------------------------------------------------- CanvasDataset

def test_canvas_windows_are_the_cpu_engine_windows_in_canvas_pixels(demo):
    ds = CanvasDataset(demo.root, demo.proposals_path, views="obj_obj_dilate", size=32,
                       canvas=64, seed=5, keys=list(demo.keys))
    cpu = ViewEngine("obj_obj_dilate", photometrics="none", size=32)
    for i in range(4):
        item = ds[i]
        key = demo.keys[i]
        opened = open_image(demo.root / key)
        windows = cpu.windows(opened.size, lambda size, k=key: ds.store.lookup(k, size),
                              sample_rng(5, i, 0), key=key)
        scale = 64 / IMG_W  # 128x96 shrinks to 64x48
        want = torch.tensor([w.box for w in windows], dtype=torch.float32) * scale
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
    assert draft_factor([(0, 0, 1024, 512)], [(64, 128)]) == 8
    item = ds[0]
    assert item["valid"].tolist() == [128, 64]
    ref, valid = fit_to_canvas(big, (128, 128))
    assert valid == (128, 64)
    diff = (item["canvas"].float() - ref.float()).abs()[:, :64]
    assert diff.mean() < 4  # draft decoding + JPEG vs the full-resolution PIL shrink


def test_collate_canvas_names_the_fix_for_other_items():
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
    wrapped = DeviceViewLoader(loader, GPUViewEngine.from_recipe(ds.recipe), device="cpu")
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
