"""Fixtures of the solo-learn adapter's tests (helpers in ``solo_testing``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from solo_testing import H, W, scene_boxes, scene_image, solo_missing

from objcrop_plugin.integrations.solo.cli import find_solo_root
from objcrop_plugin.proposals import ProposalStore


@pytest.fixture(scope="session")
def solo_root() -> Path:
    reason = solo_missing()
    if reason:
        pytest.skip(reason)
    return find_solo_root()


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """8 PNG scenes as class folders (``train/a``, ``train/b``) and flat (``flat/``), with
    stores keyed relative to each folder, and one keyed relative to the wrong folder."""
    root = tmp_path_factory.mktemp("solo-scenes")
    records_train, records_flat, records_wrong = [], [], []
    for i in range(8):
        shift = i % 4
        image = scene_image(shift)
        cls = "a" if i < 4 else "b"
        for path in (root / "train" / cls / f"{i:03d}.png", root / "flat" / f"{i:03d}.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        boxes, scores = scene_boxes(shift), [1.0, 1.0]
        records_train.append((f"{cls}/{i:03d}.png", boxes, scores, (W, H)))
        records_flat.append((f"{i:03d}.png", boxes, scores, (W, H)))
        records_wrong.append((f"images/{i:03d}.png", boxes, scores, (W, H)))
    ProposalStore.write(root / "train.objcrop", records_train)
    ProposalStore.write(root / "flat.objcrop", records_flat)
    ProposalStore.write(root / "wrong.objcrop", records_wrong)
    return root
