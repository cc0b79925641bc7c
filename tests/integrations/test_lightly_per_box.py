"""The lightly adapter with per-box sampling: ``ObjectAwareDataset(..., sampling="per_box")``
yields one item per stored box in lightly's batch format, each with its image's lightly
target and filename (lightly's own ``LightlyDataset`` is the oracle)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from objcrop_plugin.proposals import ProposalStore

lightly = pytest.importorskip("lightly", reason='pip install "objcrop-plugin[lightly]"')

from lightly.data import LightlyDataset, MultiViewCollate  # noqa: E402

from objcrop_plugin.lightly import ObjectAwareCollate, ObjectAwareDataset  # noqa: E402

W, H = 64, 48
# class folders, as LightlyDataset reads them; number of stored boxes per image
BOXES = {"dog/b/y.jpg": 0, "dog/a.jpg": 1, "cat/z.png": 2, "cat/k.jpg": 3}


@pytest.fixture
def folder(tmp_path):
    records = []
    for i, (name, k) in enumerate(BOXES.items()):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H), (40 * i, 90, 200)).save(path)
        if k:
            boxes = [[4 + 2 * b, 4, 30 + 2 * b, 40] for b in range(k)]
            records.append((name, boxes, [1.0 - 0.1 * b for b in range(k)], (W, H)))
    ProposalStore.write(tmp_path / "p.objcrop", records)
    return tmp_path


def test_per_box_items_are_lightly_items_of_their_images(folder):
    ours = ObjectAwareDataset(folder, folder / "p.objcrop", sampling="per_box", size=32, seed=0)
    ref = LightlyDataset(str(folder))
    expected = [ref[j][1:] for j in range(len(ref)) for _ in range(BOXES[ref[j][2]])]
    assert len(ours) == sum(BOXES.values()) == len(expected) == 6
    assert [ours[i][1:] for i in range(len(ours))] == expected  # (target, filename)
    assert ours.get_filenames() == ref.get_filenames()  # the images, as lightly lists them
    views, targets, names = next(iter(torch.utils.data.DataLoader(
        ours, batch_size=3, collate_fn=MultiViewCollate())))
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2
    assert targets.dtype == torch.long and list(names) == [e[1] for e in expected[:3]]
    with pytest.raises(ValueError, match=r"weighting='rank'.*sampling='per_box'.*Fix"):
        ObjectAwareDataset(folder, folder / "p.objcrop", sampling="per_box", weighting="rank")
    capped = ObjectAwareDataset(folder, folder / "p.objcrop", sampling="per_box",
                                max_boxes_per_image=1, size=32)
    assert len(capped) == 3
    # matched compute: scene crops, as many samples per epoch as the per-box dataset
    scene = ObjectAwareDataset(folder, folder / "p.objcrop", views="scene_scene", size=32,
                               epoch_length="boxes")
    assert len(scene) == len(ours) and {scene[i][2] for i in range(6)} <= set(ref.get_filenames())


def test_collate_points_per_box_sampling_to_the_dataset(folder):
    with pytest.raises(TypeError, match=r"ObjectAwareDataset\(input_dir, proposals, "
                                        r"sampling='per_box'\)"):
        ObjectAwareCollate(folder / "p.objcrop", sampling="per_box")
