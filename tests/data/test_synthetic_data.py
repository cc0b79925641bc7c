"""The synthetic demo dataset: determinism, small tight boxes, the written files, resuming."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from objcrop_plugin.data import (
    CLASSES,
    SyntheticDataset,
    load_labels,
    multi_hot,
    render_scene,
    write_dataset,
)
from objcrop_plugin.proposals import ProposalStore

SIZE = (256, 192)


def _pixels(scene):
    return np.asarray(scene.image)


# -- render_scene ---------------------------------------------------------------------------


def test_render_is_deterministic_and_index_dependent():
    a, b = render_scene(7, SIZE, seed=3), render_scene(7, SIZE, seed=3)
    assert a.key == "images/000007.jpg"
    assert a.image.mode == "RGB" and a.image.size == SIZE
    np.testing.assert_array_equal(_pixels(a), _pixels(b))
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.boxes.dtype == np.float32 and a.boxes.shape == (len(a.labels), 4)
    assert a.labels.dtype == np.int64

    other_index = render_scene(8, SIZE, seed=3)
    other_seed = render_scene(7, SIZE, seed=4)
    for other in (other_index, other_seed):
        assert np.abs(_pixels(other).astype(int) - _pixels(a)).mean() > 5
        assert other.boxes.shape != a.boxes.shape or not np.array_equal(other.boxes, a.boxes)


def test_render_does_not_depend_on_call_order():
    later = render_scene(5, SIZE, seed=0)
    for i in range(5):
        render_scene(i, SIZE, seed=0)
    again = render_scene(5, SIZE, seed=0)
    np.testing.assert_array_equal(_pixels(later), _pixels(again))


@pytest.mark.parametrize("size", [SIZE, (640, 480), (300, 500)])
def test_objects_are_small_several_and_apart(size):
    w, h = size
    counts = []
    for i in range(40):
        s = render_scene(i, size, seed=1)
        k = len(s.labels)
        counts.append(k)
        assert 2 <= k <= 6
        b = s.boxes.astype(np.float64)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
        assert area.max() <= 0.10, (i, area)
        assert area.min() >= 0.003, (i, area)
        # inside the image, integer pixel edges (tight boxes of rasterised objects)
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2:] > b[:, :2]).all()
        # little overlap between objects
        lt = np.maximum(b[:, None, :2], b[None, :, :2])
        rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = np.clip(rb - lt, 0, None).prod(axis=2)
        box_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        iou = inter / (box_area[:, None] + box_area[None, :] - inter)
        np.fill_diagonal(iou, 0)
        assert iou.max() <= 0.1 + 1e-6
        assert s.labels.min() >= 0 and s.labels.max() < len(CLASSES)
    assert len(set(counts)) >= 3  # the count varies


def test_object_count_bounds_are_honoured():
    for i in range(10):
        s = render_scene(i, SIZE, seed=0, min_objects=4, max_objects=4)
        assert len(s.labels) == 4
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        render_scene(0, SIZE, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="both >= 32 pixels"):
        render_scene(0, (16, 16))


def test_boxes_are_tight_around_the_drawn_objects():
    """Against the same scene rendered without objects (same background, same grain): every
    changed pixel lies in a box, and each box's changed pixels reach all four of its edges."""
    for i in range(12):
        full = render_scene(i, SIZE, seed=2)
        bg = render_scene(i, SIZE, seed=2, draw_objects=False)
        np.testing.assert_array_equal(full.boxes, bg.boxes)
        changed = (np.abs(_pixels(full).astype(int) - _pixels(bg)) > 0).any(axis=2)
        in_boxes = np.zeros_like(changed)
        for x1, y1, x2, y2 in full.boxes.astype(int):
            in_boxes[y1:y2, x1:x2] = True
        assert not (changed & ~in_boxes).any(), f"image {i}: pixels drawn outside every box"
        for x1, y1, x2, y2 in full.boxes.astype(int):
            sub = changed[y1:y2, x1:x2]
            ys, xs = np.nonzero(sub)
            # anti-aliased edge pixels can round to the background value: 1 px slack
            assert xs.min() <= 1 and ys.min() <= 1, (i, (x1, y1, x2, y2))
            assert xs.max() >= sub.shape[1] - 2 and ys.max() >= sub.shape[0] - 2
            # an object, not a few stray pixels: most of the box is drawn
            assert sub.mean() > 0.25


def test_objects_stand_out_from_the_background_and_classes_differ():
    """Objects are more saturated than the muted background, and every class appears."""
    seen = set()
    for i in range(30):
        s = render_scene(i, SIZE, seed=0)
        seen.update(s.labels.tolist())
        hsv = np.asarray(s.image.convert("HSV"), dtype=float)
        mask = np.zeros(hsv.shape[:2], bool)
        for x1, y1, x2, y2 in s.boxes.astype(int):
            mask[y1:y2, x1:x2] = True
        assert np.median(hsv[..., 1][~mask]) < np.median(hsv[..., 1][mask])
    assert seen == set(range(len(CLASSES)))


def test_background_is_cluttered_not_flat():
    bg = np.asarray(render_scene(0, (640, 480), draw_objects=False).image, dtype=float)
    # structure beyond the grain: the blurred image still varies a lot
    small = np.asarray(Image.fromarray(bg.astype(np.uint8)).resize((64, 48), Image.BOX), float)
    assert small.std(axis=(0, 1)).mean() > 5
    edges = np.abs(np.diff(small, axis=1)).mean()
    assert edges > 1.0


def test_multi_hot():
    v = multi_hot(np.array([3, 1, 3]))
    assert v.dtype == np.float32 and v.shape == (len(CLASSES),)
    assert v.tolist() == [0, 1, 0, 1, 0, 0, 0, 0]
    assert multi_hot(np.zeros(0, np.int64), 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 8\)"):
        multi_hot(np.array([8]))


# -- write_dataset ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "ds"
    return write_dataset(root, n_images=12, size=SIZE, seed=5, quality=85)


def _mtimes(root):
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_write_dataset_layout(written: SyntheticDataset):
    ds = written
    assert ds.image_dir == ds.root / "images"
    assert ds.labels_path == ds.root / "labels.json"
    assert ds.proposals_path == ds.root / "proposals_gt.objcrop"
    assert ds.keys == [f"images/{i:06d}.jpg" for i in range(12)]
    assert ds.classes == CLASSES and len(ds) == 12
    names = sorted(p.name for p in ds.image_dir.iterdir())
    assert names == [f"{i:06d}.jpg" for i in range(12)]  # no temporary files left
    assert sorted(p.name for p in ds.root.iterdir()) == [
        "images", "labels.json", "proposals_gt.objcrop", "synthetic.json",
    ]
    for key in ds.keys:
        with Image.open(ds.root / key) as im:
            assert im.format == "JPEG" and im.size == SIZE and im.mode == "RGB"


def test_jpegs_match_the_render(written: SyntheticDataset):
    scene = render_scene(3, SIZE, seed=5)
    with Image.open(written.root / scene.key) as im:
        stored = np.asarray(im.convert("RGB"), dtype=float)
    assert np.abs(stored - _pixels(scene)).mean() < 4  # JPEG error only


def test_labels_json_and_load_labels(written: SyntheticDataset):
    ds = written
    obj = json.loads(ds.labels_path.read_text())
    assert obj["classes"] == list(CLASSES)
    keys, targets, classes = load_labels(ds.labels_path)
    assert keys == ds.keys and classes == CLASSES
    assert targets.dtype == np.float32 and targets.shape == (12, len(CLASSES))
    assert load_labels(ds.root)[0] == keys  # the root works too
    for i, entry in enumerate(obj["images"]):
        scene = render_scene(i, SIZE, seed=5)
        assert entry["key"] == keys[i] == scene.key
        assert (entry["width"], entry["height"]) == SIZE
        np.testing.assert_array_equal(np.asarray(entry["boxes"], np.float32), scene.boxes)
        assert entry["box_labels"] == scene.labels.tolist()
        assert entry["labels"] == sorted(set(entry["box_labels"]))
        np.testing.assert_array_equal(targets[i], multi_hot(scene.labels))
        assert targets[i].sum() >= 1


def test_ground_truth_store_matches_labels(written: SyntheticDataset):
    obj = json.loads(written.labels_path.read_text())
    store = ProposalStore(written.proposals_path)
    assert len(store) == 12
    assert store.meta["source"] == "ground_truth"
    for entry in obj["images"]:
        props = store[entry["key"]]
        np.testing.assert_allclose(props.boxes, np.asarray(entry["boxes"], np.float32), atol=1e-4)
        assert props.scores.tolist() == [1.0] * len(entry["boxes"])
        assert props.image_size == SIZE


def test_second_call_renders_and_writes_nothing(written: SyntheticDataset, monkeypatch):
    before = _mtimes(written.root)
    import objcrop_plugin.data.synthetic as synthetic

    render = synthetic.render_scene

    def no_render(*args, draw_objects=True, **kwargs):
        if draw_objects:  # the argument check renders nothing
            raise AssertionError("a complete dataset was rendered again")
        return render(*args, draw_objects=False, **kwargs)

    monkeypatch.setattr(synthetic, "render_scene", no_render)
    again = write_dataset(written.root, n_images=12, size=SIZE, seed=5, quality=85)
    assert again == written
    assert _mtimes(written.root) == before


@pytest.mark.parametrize(
    "change",
    [{"n_images": 13}, {"seed": 6}, {"size": (128, 96)}, {"quality": 70}, {"max_objects": 3}],
)
def test_other_parameters_raise(written: SyntheticDataset, change):
    kwargs = {"n_images": 12, "size": SIZE, "seed": 5, "quality": 85, **change}
    before = _mtimes(written.root)
    with pytest.raises(ValueError, match="overwrite=True") as info:
        write_dataset(written.root, **kwargs)
    assert str(written.root) in str(info.value)
    assert _mtimes(written.root) == before


def test_overwrite_replaces_and_unknown_files_are_refused(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, n_images=4, size=SIZE, seed=0)
    (root / "notes.txt").write_text("mine")
    ds = write_dataset(root, n_images=2, size=SIZE, seed=1, overwrite=True)
    assert sorted(p.name for p in ds.image_dir.iterdir()) == ["000000.jpg", "000001.jpg"]
    assert load_labels(ds.labels_path)[0] == ds.keys
    assert len(ProposalStore(ds.proposals_path)) == 2
    assert (root / "notes.txt").read_text() == "mine"  # not ours: kept

    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "000000.jpg").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="overwrite=True"):
        write_dataset(foreign, n_images=2, size=SIZE)


def test_resumes_after_losing_an_image(tmp_path):
    root = tmp_path / "ds"
    ds = write_dataset(root, n_images=6, size=SIZE, seed=0)
    lost = ds.root / ds.keys[2]
    original = lost.read_bytes()
    lost.unlink()
    before = _mtimes(root)
    write_dataset(root, n_images=6, size=SIZE, seed=0)
    assert lost.read_bytes() == original
    after = _mtimes(root)
    for key in ds.keys:
        if key != ds.keys[2]:
            assert after[key] == before[key]  # kept, not rewritten


def test_resumes_an_interrupted_run(tmp_path):
    """Without the manifest (a crash before the end), the next call completes the dataset."""
    root = tmp_path / "ds"
    ds = write_dataset(root, n_images=5, size=SIZE, seed=0)
    reference = {k: (root / k).read_bytes() for k in ds.keys}
    manifest = (root / "synthetic.json").read_text()
    # what a crash after 3 images leaves: the in-progress marker and 3 images
    (root / "synthetic.json").unlink()
    (root / ".synthetic.partial.json").write_text(manifest)
    for name in ("labels.json", "proposals_gt.objcrop", *ds.keys[3:]):
        os.unlink(root / name)
    write_dataset(root, n_images=5, size=SIZE, seed=0)
    assert {k: (root / k).read_bytes() for k in ds.keys} == reference
    assert (root / "synthetic.json").read_text() == manifest
    assert not (root / ".synthetic.partial.json").exists()


def test_workers_give_identical_output(tmp_path):
    one = write_dataset(tmp_path / "one", n_images=10, size=SIZE, seed=9, workers=1)
    two = write_dataset(tmp_path / "two", n_images=10, size=SIZE, seed=9, workers=2)
    for name in ["labels.json", "proposals_gt.objcrop", "synthetic.json", *one.keys]:
        assert (one.root / name).read_bytes() == (two.root / name).read_bytes(), name


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_images must be >= 1"):
        write_dataset(tmp_path / "a", n_images=0)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        write_dataset(tmp_path / "b", n_images=2, workers=0)
    with pytest.raises(ValueError, match="both >= 32 pixels"):
        write_dataset(tmp_path / "c", n_images=2, size=(8, 8))
