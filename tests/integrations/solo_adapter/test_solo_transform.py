"""The object-aware transform: solo-learn's view order, one proposal per sample, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from solo_testing import (
    H,
    W,
    colour_fractions,
    dilated_object_of,
    make_entry,
    make_transform,
    object_of,
    scene_boxes,
    scene_image,
)

from objcrop_plugin.proposals import ProposalStore


def test_transform_keeps_solo_order_and_shares_one_proposal(scenes):
    transform = make_transform(scenes, [
        make_entry("object_aware", n=2),
        make_entry(None),
        make_entry({"policy": "object_dilated", "dilation": 0.05}),
        make_entry("object", size=32, n=2),
    ])
    image = scene_image(0)
    colours = set()
    for index in range(40):
        views = transform(image, key="a/000.png", index=index)
        assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 4 + [(3, 32, 32)] * 2
        # the large object-aware views (slots 0, 1, 3: two inside the box, one inside the
        # dilated box) are shuffled among their entries; solo's scene crop stays in slot 2
        large = sorted((views[k] for k in (0, 1, 3)), key=lambda v: colour_fractions(v)["blue"])
        colour = object_of(large[0])
        assert object_of(large[1]) == dilated_object_of(large[2]) == colour
        assert object_of(views[4]) == object_of(views[5]) == colour
        assert colour_fractions(views[2])["blue"] > 0.1
        colours.add(colour)
    assert colours == {"red", "green"}
    assert transform.recipe.fallbacks.as_dict() == {"samples": 40, "missing": 0, "unusable": 0, "mismatched": 0}


def test_transform_falls_back_to_scene_crops_and_counts(scenes):
    transform = make_transform(scenes, [make_entry("object_aware"), make_entry("object_dilated")])
    views = transform(scene_image(0), key="not/in/store.png", index=0)
    assert len(views) == 2
    views = transform(scene_image(0))  # no key at all (someone else's dataset)
    assert transform.recipe.fallbacks.as_dict() == {"samples": 2, "missing": 2, "unusable": 0, "mismatched": 0}
    strict = make_transform(scenes, [make_entry("object_aware")], strict=True)
    with pytest.raises(LookupError, match="not/in/store.png"):
        strict(scene_image(0), key="not/in/store.png", index=0)


def test_transform_rescales_boxes_to_the_decoded_image(scenes):
    transform = make_transform(scenes, [make_entry("object_aware")])
    big = scene_image(0).resize((W * 3, H * 3), Image.Resampling.NEAREST)
    for index in range(10):
        object_of(transform(big, key="a/000.png", index=index)[0])


def test_a_stored_size_of_another_aspect_gives_scene_crops(tmp_path, caplog):
    # the same boxes stored for the image turned by 90 degrees (an EXIF mismatch): not used
    ProposalStore.write(tmp_path / "train.objcrop",
                        [("a/000.png", scene_boxes(0), [1.0, 1.0], (H, W))])
    transform = make_transform(tmp_path, [make_entry("object_aware")])
    with caplog.at_level("WARNING", logger="objcrop_plugin"):
        windows = transform.planner.windows((W, H), "a/000.png", np.random.default_rng(0))
    assert all(w.fallback for w in windows)
    assert transform.recipe.fallbacks.as_dict()["mismatched"] == 1
    assert "a/000.png" in caplog.text and "transpose" in caplog.text
