"""The synthetic generator's domains: "demo" unchanged, and "photo" (flat shapes on photos)."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from objcrop_plugin.data import CLASSES, load_labels, render_scene, synthetic, write_dataset
from objcrop_plugin.proposals import ProposalStore

try:
    import skimage.data  # noqa: F401

    HAVE_SKIMAGE = True
except ImportError:
    HAVE_SKIMAGE = False

needs_skimage = pytest.mark.skipif(
    not HAVE_SKIMAGE, reason="the photo domain needs scikit-image (pip install scikit-image)"
)

SIZE = (128, 96)  # the demo's default scene size
AREA = (0.003, 0.15)  # the photo domain's box areas, fractions of the image


def _pixels(scene):
    return np.asarray(scene.image).astype(np.int64)


# -- the demo domain is unchanged -------------------------------------------------------------


def test_demo_domain_is_the_default():
    for i in (0, 3):
        a = render_scene(i, SIZE, seed=1)
        b = render_scene(i, SIZE, seed=1, domain="demo")
        assert a.image.tobytes() == b.image.tobytes()
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_demo_parameters_do_not_record_a_domain():
    """Demo datasets written before domains existed keep matching (and are reused)."""
    params = synthetic._params(10, SIZE, 0, 90, 2, 6)
    assert "domain" not in params
    assert synthetic._params(10, SIZE, 0, 90, 2, 6, "demo") == params
    assert synthetic._params(10, SIZE, 0, 90, 2, 6, "photo")["domain"] == "photo"


def test_unknown_domain_raises():
    with pytest.raises(ValueError, match="domain"):
        render_scene(0, SIZE, domain="cartoon")


def test_photo_without_scikit_image_names_the_install(monkeypatch):
    monkeypatch.setattr(synthetic, "_PHOTO_CACHE", {})
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        render_scene(0, SIZE, domain="photo")


# -- the photo domain ---------------------------------------------------------------------------


@needs_skimage
def test_photo_scenes_are_deterministic_and_differ_by_index():
    a = render_scene(4, SIZE, seed=2, domain="photo")
    for i in range(3):  # call order does not matter
        render_scene(i, SIZE, seed=2, domain="photo")
    b = render_scene(4, SIZE, seed=2, domain="photo")
    assert a.image.mode == "RGB" and a.image.size == SIZE
    assert a.image.tobytes() == b.image.tobytes()
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert a.boxes.shape == (len(a.labels), 4)
    other = render_scene(5, SIZE, seed=2, domain="photo")
    assert np.abs(_pixels(other) - _pixels(a)).mean() > 5
    # not the demo domain's scene
    assert np.abs(_pixels(render_scene(4, SIZE, seed=2)) - _pixels(a)).mean() > 5


@needs_skimage
def test_photo_boxes_are_tight_around_the_drawn_shapes():
    """Against the background alone (same crop): every changed pixel lies in a box, and each
    box's changed pixels reach all four of its edges and cover a good part of it."""
    for i in range(16):
        full = render_scene(i, SIZE, seed=0, domain="photo")
        bg = render_scene(i, SIZE, seed=0, domain="photo", draw_objects=False)
        np.testing.assert_array_equal(full.boxes, bg.boxes)
        changed = (np.abs(_pixels(full) - _pixels(bg)) > 0).any(axis=2)
        in_boxes = np.zeros_like(changed)
        for x1, y1, x2, y2 in full.boxes.astype(int):
            in_boxes[y1:y2, x1:x2] = True
        assert not (changed & ~in_boxes).any(), f"image {i}: pixels drawn outside every box"
        for x1, y1, x2, y2 in full.boxes.astype(int):
            sub = changed[y1:y2, x1:x2]
            ys, xs = np.nonzero(sub)
            assert xs.size, (i, (x1, y1, x2, y2))
            # anti-aliased edge pixels can round to the background value: 1 px slack
            assert xs.min() <= 1 and ys.min() <= 1, (i, (x1, y1, x2, y2))
            assert xs.max() >= sub.shape[1] - 2 and ys.max() >= sub.shape[0] - 2
            assert sub.mean() > 0.2, (i, (x1, y1, x2, y2), sub.mean())


@needs_skimage
def test_photo_sizes_counts_overlap_and_labels():
    w, h = SIZE
    areas, seen, counts = [], set(), set()
    for i in range(60):
        s = render_scene(i, SIZE, seed=1, domain="photo")
        assert 2 <= len(s.labels) <= 6
        counts.add(len(s.labels))
        b = s.boxes.astype(np.float64)
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2:] > b[:, :2]).all()
        assert np.array_equal(b, np.round(b))  # integer pixel edges
        a = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
        areas.extend(a.tolist())
        # the same non-overlap rule as the demo domain
        lt = np.maximum(b[:, None, :2], b[None, :, :2])
        rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = np.clip(rb - lt, 0, None).prod(axis=2)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        iou = inter / (area[:, None] + area[None, :] - inter)
        np.fill_diagonal(iou, 0)
        assert iou.max() <= 0.1 + 1e-6
        assert s.labels.min() >= 0 and s.labels.max() < len(CLASSES)
        seen.update(s.labels.tolist())
    areas = np.asarray(areas)
    # within the stated range (up to pixel rounding), spread over small and medium
    assert areas.min() >= 0.7 * AREA[0] and areas.max() <= 1.15 * AREA[1], (areas.min(), areas.max())
    sides = np.sqrt(areas * w * h)
    assert (sides < 12).mean() > 0.2 and (sides > 30).mean() > 0.1
    assert seen == set(range(len(CLASSES)))
    assert len(counts) >= 3


@needs_skimage
def test_photo_colour_carries_no_class_information():
    """Each class's shapes come in hues all around the circle."""
    import colorsys

    hues: dict[int, list[float]] = {}
    for i in range(60):
        full = render_scene(i, SIZE, seed=3, domain="photo")
        bg = render_scene(i, SIZE, seed=3, domain="photo", draw_objects=False)
        changed = (np.abs(_pixels(full) - _pixels(bg)) > 0).any(axis=2)
        for (x1, y1, x2, y2), c in zip(full.boxes.astype(int), full.labels):
            px = _pixels(full)[y1:y2, x1:x2][changed[y1:y2, x1:x2]]
            r, g, b = np.median(px, axis=0) / 255.0
            hues.setdefault(int(c), []).append(colorsys.rgb_to_hsv(r, g, b)[0])
    assert sum(len(hs) >= 8 for hs in hues.values()) >= 6, {c: len(h) for c, h in hues.items()}
    for c, hs in hues.items():
        if len(hs) >= 8:
            assert np.histogram(hs, bins=4, range=(0, 1))[0].astype(bool).sum() >= 3, (c, hs)


# -- writing a photo dataset ----------------------------------------------------------------


@needs_skimage
def test_photo_write_dataset_round_trip(tmp_path):
    root = tmp_path / "photo"
    ds = write_dataset(root, n_images=8, size=SIZE, seed=5, domain="photo")
    assert len(ds) == 8
    manifest = json.loads((root / "synthetic.json").read_text())
    assert manifest["domain"] == "photo"
    keys, targets, classes = load_labels(ds.labels_path)
    assert keys == ds.keys and classes == CLASSES
    entries = json.loads(ds.labels_path.read_text())["images"]
    store = ProposalStore(ds.proposals_path)
    for i, (key, entry) in enumerate(zip(keys, entries)):
        scene = render_scene(i, SIZE, seed=5, domain="photo")
        assert entry["labels"] == sorted(set(scene.labels.tolist()))
        np.testing.assert_array_equal(targets[i].nonzero()[0], entry["labels"])
        np.testing.assert_allclose(entry["boxes"], scene.boxes)
        assert entry["box_labels"] == scene.labels.tolist()
        np.testing.assert_allclose(store[key].boxes, scene.boxes)
        with Image.open(root / key) as im:
            assert im.size == SIZE
            assert np.abs(np.asarray(im.convert("RGB"), dtype=np.int64)
                          - _pixels(scene)).mean() < 6  # JPEG
    # the same parameters reuse it
    again = write_dataset(root, n_images=8, size=SIZE, seed=5, domain="photo")
    assert again.keys == ds.keys


@needs_skimage
def test_a_folder_of_one_domain_is_not_reused_for_the_other(tmp_path):
    photo, demo = tmp_path / "photo", tmp_path / "demo"
    write_dataset(photo, n_images=2, size=SIZE, seed=0, domain="photo")
    write_dataset(demo, n_images=2, size=SIZE, seed=0)
    with pytest.raises(ValueError, match="domain"):
        write_dataset(photo, n_images=2, size=SIZE, seed=0)
    with pytest.raises(ValueError, match="domain"):
        write_dataset(demo, n_images=2, size=SIZE, seed=0, domain="photo")
    # overwrite replaces it with the requested domain
    write_dataset(demo, n_images=2, size=SIZE, seed=0, domain="photo", overwrite=True)
    assert json.loads((demo / "synthetic.json").read_text())["domain"] == "photo"
    with Image.open(demo / "images" / "000000.jpg") as im:
        ref = _pixels(render_scene(0, SIZE, seed=0, domain="photo"))
        assert np.abs(np.asarray(im.convert("RGB"), dtype=np.int64) - ref).mean() < 6
