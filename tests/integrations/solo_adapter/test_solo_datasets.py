"""solo-learn's dataset as module-level classes: items, pickling, EXIF, the store key check."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from solo_testing import (
    H,
    W,
    make_cfg,
    make_entry,
    make_transform,
    object_of,
    scene_boxes,
    scene_image,
    solo_like_pipeline,
)
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from objcrop_plugin.integrations.solo.datasets import (
    IndexedDataset,
    ObjectAwareSoloDataset,
    check_keys,
)
from objcrop_plugin.proposals import ProposalStore
from objcrop_plugin.solo import ObjectAwareTransform, SoloConfigError, parse_object_aware


def test_dataset_items_keep_solos_format_and_pickle(scenes):
    transform = make_transform(scenes, [make_entry("object_aware"), make_entry("object_dilated")])
    base = ImageFolder(str(scenes / "train"))
    dataset = ObjectAwareSoloDataset(base, transform, scenes / "train")
    assert len(dataset) == 8 and dataset.classes == ["a", "b"]  # forwarded to solo's dataset
    index, views, target = dataset[5]
    assert index == 5 and target == 1 and len(views) == 2
    assert dataset.key(5) == "b/005.png"
    clone = pickle.loads(pickle.dumps(dataset))  # module-level classes: spawn workers can
    assert clone.key(5) == "b/005.png" and len(clone[0][1]) == 2
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    idx, batch_views, targets = next(iter(loader))
    assert idx.tolist() == [0, 1, 2, 3] and targets.tolist() == [0] * 4
    assert [tuple(v.shape) for v in batch_views] == [(4, 3, 64, 64)] * 2

    plain = IndexedDataset(ImageFolder(str(scenes / "train"), transform=T.ToTensor()))
    again = pickle.loads(pickle.dumps(plain))
    i, x, y = again[2]
    assert (i, y, tuple(x.shape)) == (2, 0, (3, H, W))


def test_dataset_decodes_upright_exif_images(tmp_path):
    # stored rotated, with an EXIF tag that turns it upright: boxes refer to the upright image
    folder = tmp_path / "exif" / "a"
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 degrees clockwise
    stored = scene_image(0).transpose(Image.Transpose.ROTATE_90)
    stored.save(folder / "000.jpg", exif=exif, quality=100, subsampling=0)
    store = tmp_path / "exif.objcrop"
    ProposalStore.write(store, [("a/000.jpg", scene_boxes(0), [1.0, 1.0], (W, H))])
    plan = parse_object_aware(make_cfg([make_entry("object_aware")], proposals=str(store)))
    transform = ObjectAwareTransform(plan, [solo_like_pipeline(64)])
    dataset = ObjectAwareSoloDataset(ImageFolder(str(tmp_path / "exif")), transform,
                                     tmp_path / "exif")
    assert dataset.key(0) == "a/000.jpg"
    for _ in range(10):
        object_of(dataset[0][1][0])
    assert transform.recipe.fallbacks.fallbacks == 0


def test_key_check_reports_a_store_built_over_another_folder(scenes):
    transform = make_transform(scenes, [make_entry("object_aware")])
    wrong = ProposalStore(scenes / "wrong.objcrop")
    dataset = ObjectAwareSoloDataset(ImageFolder(str(scenes / "train")), transform, scenes / "train")
    with pytest.raises(SoloConfigError, match=r"'a/000.png'.*keys look like 'images/000.png'.*Fix"):
        check_keys(dataset, wrong, strict=False)
    assert check_keys(dataset, transform.store, strict=False) == 1.0


def test_dataset_skips_a_corrupt_image_for_the_next_readable_one(scenes, tmp_path, caplog):
    import shutil

    root = tmp_path / "train"
    shutil.copytree(scenes / "train", root)
    bad = root / "a" / "002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
    transform = make_transform(scenes, [make_entry("object_aware"), make_entry("object_dilated")])
    dataset = ObjectAwareSoloDataset(ImageFolder(str(root)), transform, root,
                                     max_failure_rate=0.2)
    with caplog.at_level("WARNING", logger="objcrop_plugin"):
        index, views, target = dataset[2]
    assert index == 2 and len(views) == 2 and target == 0  # image 3 (class a) in its place
    assert dataset.bad.count == 1 and dataset.bad.indices() == [2] and str(bad) in caplog.text
    strict = ObjectAwareSoloDataset(ImageFolder(str(root)), transform, root, max_failure_rate=0)
    from objcrop_plugin.stats import TooManyBadImagesError

    with pytest.raises(TooManyBadImagesError, match="002.png"):
        strict[2]


def test_a_listing_without_labels_leaves_out_subfolders_and_other_files(scenes, tmp_path, caplog):
    """solo-learn's no_labels listing is os.listdir: a subfolder or a .DS_Store would each be
    read as an image, fail and count against max_failure_rate (2 of 10 here: the run would
    stop); they are left out, with warnings naming them and the subfolder's images."""
    import logging
    import os
    import shutil

    root = tmp_path / "flat"
    shutil.copytree(scenes / "flat", root)
    shutil.copytree(scenes / "train" / "a", root / "sub")
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / "notes.txt").write_text("x")

    class NoLabels(torch.utils.data.Dataset):  # solo-learn's CustomDatasetWithoutLabels listing
        def __init__(self, root):
            self.root, self.images = root, os.listdir(root)

        def __len__(self):
            return len(self.images)

    plan = parse_object_aware(make_cfg([make_entry("object_aware")],
                                       proposals=str(scenes / "flat.objcrop")))
    transform = ObjectAwareTransform(plan, [solo_like_pipeline(64)])
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        dataset = ObjectAwareSoloDataset(NoLabels(root), transform, root)
    assert sorted(dataset.dataset.images) == [f"{i:03d}.png" for i in range(8)]
    assert len(dataset) == 8 and dataset.bad.n == 8
    said = caplog.text
    assert "the images in its subfolder(s) sub are not trained" in said
    assert "2 file(s) in" in said and ".DS_Store, notes.txt" in said
    for i in range(8):
        assert dataset[i][0] == i
    assert dataset.bad.count == 0
    # class folders read without labels: nothing left, said with the fix (not an empty sampler)
    with pytest.raises(SoloConfigError, match=r"data\.no_labels: .* none of them is an image "
                                              r"\(subfolders: a, b; .*Fix: data\.no_labels=False"):
        ObjectAwareSoloDataset(NoLabels(scenes / "train"), transform, scenes / "train")
