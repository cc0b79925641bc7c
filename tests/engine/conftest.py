"""Fixtures of the engine tests (helpers in ``engine_testing``)."""

from __future__ import annotations

import pytest
from engine_testing import IMG_H, IMG_W

from objcrop_plugin.data.synthetic import SyntheticDataset


@pytest.fixture(scope="session")
def demo(demo_data) -> SyntheticDataset:
    """12 demo scenes of 128 x 96 with a proposal store (read-only)."""
    return demo_data(n_images=12, size=(IMG_W, IMG_H), seed=0)
