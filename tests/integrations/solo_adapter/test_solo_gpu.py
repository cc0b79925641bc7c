"""``crop.engine: gpu``: canvases in the workers, solo-learn's views cut after the transfer."""

from __future__ import annotations

import pickle

import pytest
import torch
from solo_testing import (
    OBJ_OBJ_DILATE,
    colour_fractions,
    dilated_object_of,
    make_cfg,
    make_entry,
    object_of,
    train_through_main,
    write_recipe,
)
from torchvision.datasets import ImageFolder

from objcrop_plugin.integrations.solo.gpu import (
    ObjectAwareCanvasDataset,
    entry_photometric,
    gpu_method,
    gpu_views,
)
from objcrop_plugin.solo import SoloConfigError, parse_object_aware


def gpu_setup(scenes, augmentations, **data):
    cfg = make_cfg(augmentations, proposals=str(scenes / "train.objcrop"), **data)
    cfg["crop"] = {"engine": "gpu"}
    plan = parse_object_aware(cfg)
    return cfg, plan, gpu_views(cfg, plan)


class _SoloLikeMethod:
    """Stands in for a solo-learn method class: Lightning's hook passes batches through."""

    def __init__(self, cfg):
        self.cfg = cfg

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch


def test_gpu_mode_cuts_solo_views_after_transfer(scenes):
    pytest.importorskip("kornia")
    cfg, plan, views = gpu_setup(scenes, [
        make_entry("object_aware"),
        make_entry(None),  # solo-learn's RandomResizedCrop, made on the device as a scene window
        make_entry({"policy": "object", "scale": [0.3, 1.0]}, size=32, n=2),
    ])
    assert views.canvas == (128, 128) and list(views.scenes) == [1]
    dataset = ObjectAwareCanvasDataset(
        ImageFolder(str(scenes / "train")), views, scenes / "train")
    item = dataset[5]
    assert item["index"] == 5 and item["target"] == 1 and item["key"] == "b/005.png"
    assert tuple(item["windows"].shape) == (4, 4) and item["canvas"].dtype == torch.uint8
    pickle.loads(pickle.dumps(dataset))  # workers under spawn
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)  # solo-learn's default collate
    method = gpu_method(_SoloLikeMethod, views.engine)(cfg)
    assert issubclass(type(method), _SoloLikeMethod)
    assert type(method).__name__ == "ObjectAwareGPU_SoloLikeMethod"
    for batch in loader:
        index, out, targets = method.on_after_batch_transfer(batch, 0)  # solo-learn's format
        assert [tuple(v.shape) for v in out] == [(4, 3, 64, 64)] * 2 + [(4, 3, 32, 32)] * 2
        assert targets.dtype == torch.int64 and index.tolist() == batch["index"].tolist()
        for b in range(4):
            colour = object_of(out[0][b])
            assert colour_fractions(out[1][b])["blue"] > 0.1
            assert object_of(out[2][b]) == object_of(out[3][b]) == colour
    plain = [torch.zeros(2, 3, 8, 8), torch.zeros(2)]  # a validation batch passes through
    assert method.on_after_batch_transfer(plain, 0) is plain


def test_gpu_mode_uses_each_entrys_photometrics():
    from objcrop_plugin.engine.photometric import make_photometrics

    moco = dict(make_entry("object_aware"))
    moco.update({
        "color_jitter": {"prob": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                         "hue": 0.1},
        "grayscale": {"prob": 0.2}, "gaussian_blur": {"prob": 0.5},
    })
    assert entry_photometric(moco, "custom", "x") == make_photometrics("mocov2").globals_[0]
    solarized = {**moco, "solarization": {"prob": 0.2}, "mean": [0.5] * 3, "std": [0.25] * 3}
    p = entry_photometric(solarized, "custom", "x")
    assert p.solarize == 0.2 and not p.solarize_before_blur and p.mean == (0.5,) * 3
    assert entry_photometric(solarized, "imagenet", "x").mean == (0.485, 0.456, 0.406)


def test_gpu_mode_errors(scenes):
    with pytest.raises(SoloConfigError, match=r"augmentations\[0\]\.equalization.*Fix"):
        gpu_setup(scenes, [{**make_entry("object_aware"), "equalization": {"prob": 0.2}}])
    with pytest.raises(SoloConfigError, match=r"augmentations\[2\]: .*large entries before"):
        gpu_setup(scenes, [make_entry("object_aware"), make_entry("object", size=32), make_entry(None)])
    plain = make_entry(None)
    plain["rrc"] = {"enabled": False}
    with pytest.raises(SoloConfigError, match=r"augmentations\[1\]\.rrc\.enabled"):
        gpu_setup(scenes, [make_entry("object_aware"), plain])
    odd = make_entry("object", size=32)
    odd["grayscale"] = {"prob": 1.0}
    with pytest.raises(SoloConfigError, match="same photometrics"):
        gpu_setup(scenes, [make_entry("object_aware", n=2), make_entry("object", size=32), odd])


def test_gpu_mode_trains_through_main_pretrain(solo_root, scenes, tmp_path):
    pytest.importorskip("kornia")
    data = {"dataset": "custom", "train_path": str(scenes / "train"),
            "proposals": str(scenes / "train.objcrop")}
    recipe = write_recipe(tmp_path / "recipes", "simclr", OBJ_OBJ_DILATE, data)
    record = train_through_main(tmp_path, tmp_path / "recipes", recipe, "++crop.engine=gpu")
    assert record["facts"]["method"] == "ObjectAwareGPUSimCLR"
    assert record["facts"]["dataset"] == "ObjectAwareCanvasDataset"
    assert len(record["steps"]) == 2 and record["facts"]["loss_finite"]
    for step in record["steps"]:
        views = step["views"]
        assert [tuple(v.shape) for v in views] == [(4, 3, 64, 64)] * 2
        for b in range(4):
            c0, c1 = colour_fractions(views[0][b]), colour_fractions(views[1][b])
            inside, dilated = (views[0][b], views[1][b]) if c0["blue"] <= c1["blue"] else (
                views[1][b], views[0][b])
            assert dilated_object_of(dilated) == object_of(inside)


def test_gpu_dataset_skips_a_corrupt_image(scenes, tmp_path):
    import shutil

    pytest.importorskip("kornia")
    root = tmp_path / "train"
    shutil.copytree(scenes / "train", root)
    bad = root / "b" / "007.png"
    bad.write_bytes(bad.read_bytes()[:60])
    _, _, views = gpu_setup(scenes, [make_entry("object_aware"), make_entry("object_dilated")])
    dataset = ObjectAwareCanvasDataset(ImageFolder(str(root)), views, root, max_failure_rate=0.2)
    item = dataset[7]
    assert item["index"] == 7 and item["key"] == "a/000.png"  # wraps around to index 0
    assert dataset.bad.indices() == [7]


def test_gpu_dataset_without_labels_leaves_out_what_is_no_image(scenes, tmp_path):
    """As the CPU dataset: solo-learn's os.listdir listing loses its subfolders and other
    files before they are read as images (and counted as failures)."""
    import os
    import shutil

    pytest.importorskip("kornia")
    root = tmp_path / "flat"
    shutil.copytree(scenes / "flat", root)
    (root / "sub").mkdir()
    (root / ".DS_Store").write_bytes(b"\0")

    class NoLabels(torch.utils.data.Dataset):  # solo-learn's CustomDatasetWithoutLabels listing
        def __init__(self, root):
            self.root, self.images = root, os.listdir(root)

        def __len__(self):
            return len(self.images)

    _, _, views = gpu_setup(scenes, [make_entry("object_aware")])
    dataset = ObjectAwareCanvasDataset(NoLabels(root), views, root)
    assert sorted(dataset.dataset.images) == [f"{i:03d}.png" for i in range(8)]
    assert len(dataset) == 8 and dataset.bad.n == 8
