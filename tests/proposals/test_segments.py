"""Segmentation proposals (selective search, graph segments): output contract, mapping back to
the input resolution, determinism, recall on the synthetic scenes, degenerate images."""

import json
import pickle

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="segmentation proposals need OpenCV")
if not hasattr(cv2, "ximgproc"):
    pytest.skip(
        "cv2.ximgproc is missing: install opencv-contrib-python-headless",
        allow_module_level=True,
    )

from objcrop_plugin.boxes import iou  # noqa: E402
from objcrop_plugin.data.synthetic import render_scene  # noqa: E402
from objcrop_plugin.proposals.segments import (  # noqa: E402
    GraphSegmentsGenerator,
    SelectiveSearchGenerator,
    graph_segment_regions,
    label_boxes,
    seed_c_rand,
)
from objcrop_plugin.registry import list_proposal_sources, load_proposal_source  # noqa: E402

# selective search runs at 128 px here: it costs about 1 s per image at 512 px
FACTORIES = {
    "graph_segments": lambda **kw: GraphSegmentsGenerator(**kw),
    "selective_search": lambda **kw: SelectiveSearchGenerator("fast", **{"max_side": 128, **kw}),
}


@pytest.fixture(params=sorted(FACTORIES))
def make(request):
    return FACTORIES[request.param]


def _check_contract(boxes, scores, size, top_k=10):
    w, h = size
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and scores.shape == (len(boxes),)
    assert len(boxes) <= top_k
    assert np.isfinite(boxes).all() and np.isfinite(scores).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (np.diff(scores) <= 0).all(), "scores must be sorted best first"


def _recall(gen, indices, size=(640, 480)):
    hit = total = 0
    for i in indices:
        scene = render_scene(i, size=size, seed=0)
        boxes, _ = gen(scene.image)
        best = iou(scene.boxes, boxes).max(axis=1) if len(boxes) else np.zeros(len(scene.boxes))
        hit += int((best >= 0.5).sum())
        total += len(best)
    return hit / total


def _one_object_image(size=(1024, 768), box=(610, 420, 850, 640)):
    """A smooth, slightly noisy background with one saturated rectangle at ``box``."""
    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([120 + 30 * xx / w, 110 + 20 * yy / h, 130 - 20 * xx / w], axis=2)
    img = bg + rng.normal(0, 3, size=bg.shape)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = (220, 30, 40)
    return np.clip(img, 0, 255).astype(np.uint8), np.array([box], dtype=np.float64)


# ------------------------------------------------------------------------------ contract


def test_output_contract_on_a_scene(make):
    scene = render_scene(0, size=(640, 480), seed=0)
    boxes, scores = make()(scene.image)
    _check_contract(boxes, scores, (640, 480))
    assert len(boxes) > 0


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_is_respected(make, top_k):
    scene = render_scene(1, size=(320, 240), seed=0)
    boxes, scores = make(top_k=top_k)(np.asarray(scene.image))
    _check_contract(boxes, scores, (320, 240), top_k=top_k)
    assert len(boxes) == top_k


def test_boxes_map_back_to_the_original_resolution(make):
    image, gt = _one_object_image()
    gen = make()
    assert max(image.shape[:2]) > gen.max_side  # the generator works on a shrunk copy
    boxes, scores = gen(image)
    _check_contract(boxes, scores, (1024, 768))
    assert iou(gt, boxes).max() > 0.5, "no proposal on the object, in original pixels"


def test_same_image_same_boxes(make):
    if not seed_c_rand(0):
        pytest.skip("the C library's rand() cannot be seeded here (selective search order)")
    image = np.asarray(render_scene(2, size=(400, 300), seed=0).image)
    b1, s1 = make()(image)
    b2, s2 = make()(image)  # a fresh instance
    gen = make()
    b3, s3 = gen(image)
    b4, s4 = gen(image)  # the same instance twice
    for b, s in [(b2, s2), (b3, s3), (b4, s4)]:
        np.testing.assert_array_equal(b, b1)
        np.testing.assert_array_equal(s, s1)


def test_uniform_image_gives_few_or_no_boxes(make):
    image = np.full((240, 320, 3), 128, dtype=np.uint8)
    boxes, scores = make()(image)
    _check_contract(boxes, scores, (320, 240))
    assert len(boxes) <= 1


@pytest.mark.parametrize("size", [(16, 12), (12, 16), (8, 8), (1, 1), (3, 40)])
def test_tiny_images(make, size):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image[size[1] // 4 : size[1] // 2 + 1, size[0] // 4 : size[0] // 2 + 1] = (255, 0, 0)
    boxes, scores = make(min_side=1.0)(image)
    _check_contract(boxes, scores, size)


def test_grayscale_converted_rgb(make):
    gray = render_scene(3, size=(320, 240), seed=0).image.convert("L")
    gen = make()
    b_rgb, s_rgb = gen(gray.convert("RGB"))
    _check_contract(b_rgb, s_rgb, (320, 240))
    assert len(b_rgb) > 0
    b_l, s_l = gen(gray)  # a mode "L" PIL image is converted by the base class
    np.testing.assert_array_equal(b_l, b_rgb)
    np.testing.assert_array_equal(s_l, s_rgb)


def test_generators_pickle_and_have_json_params(make):
    gen = make()
    json.dumps(gen.params())  # the build manifest stores them
    clone = pickle.loads(pickle.dumps(gen))  # worker processes get a copy
    assert clone.params() == gen.params()
    img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for a, b in zip(clone(img), gen(img)):
        np.testing.assert_array_equal(a, b)


def test_opencv_thread_setting_is_restored(make):
    before = cv2.getNumThreads()
    cv2.setNumThreads(3)  # not what the generator asks for, so a leak would show
    try:
        make(num_threads=1)(np.zeros((32, 48, 3), dtype=np.uint8))
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)


# ------------------------------------------------------------------------------ recall


def test_graph_segments_recall_on_synthetic_scenes():
    # measured 0.90 (43/48) on these 12 scenes (0.77 without grouping); 0.90 on scenes 0-149
    assert _recall(GraphSegmentsGenerator(), range(12)) >= 0.6


def test_selective_search_recall_on_synthetic_scenes():
    # measured 0.66 (21/32) on these 8 scenes at 128 px; its order-derived score is weak at k=10
    assert _recall(SelectiveSearchGenerator("fast", max_side=128), range(8)) >= 0.45


def test_graph_segments_grouping_finds_multi_part_objects():
    # without grouping, a striped or checkered object is many segments and rarely one box
    with_groups = _recall(GraphSegmentsGenerator(), range(12))
    without = _recall(GraphSegmentsGenerator(merge_neighbours=False), range(12))
    assert with_groups > without


# ------------------------------------------------------------------------------ parts


def test_selective_search_scores_follow_opencv_order():
    gen = SelectiveSearchGenerator("fast", max_side=128)
    work = gen.working_image(render_scene(0, size=(256, 192), seed=0).image)
    boxes, scores = gen.raw(work)
    assert len(boxes) > 10
    assert scores[0] == 1.0 and (np.diff(scores) < 0).all() and (scores > 0).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()  # (x, y, w, h) became xyxy
    assert (boxes[:, 2] <= work.shape[1]).all() and (boxes[:, 3] <= work.shape[0]).all()


def test_selective_search_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode 'slow'"):
        SelectiveSearchGenerator("slow")


def test_graph_segments_rejects_bad_parameters():
    with pytest.raises(ValueError, match="scales"):
        GraphSegmentsGenerator(scales=())
    with pytest.raises(ValueError, match="max_area"):
        GraphSegmentsGenerator(max_area=0.0)


def test_label_boxes_matches_a_loop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=(13, 17))
    labels[labels == 5] = 4  # label 5 absent
    got = label_boxes(labels, 8)
    for k in range(8):
        ys, xs = np.nonzero(labels == k)
        if len(xs):
            np.testing.assert_array_equal(got[k], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        else:
            np.testing.assert_array_equal(got[k], [17, 13, 0, 0])


def test_grouping_adds_the_union_of_adjacent_segments():
    # two touching squares of different colours on a flat background: the grouping must offer
    # their joint box, which no single segment has
    img = np.full((60, 80, 3), 90, dtype=np.uint8)
    img[20:40, 10:30] = (250, 20, 20)
    img[20:40, 30:50] = (20, 20, 250)
    boxes, means = graph_segment_regions(img, scales=(100.0,), min_size=4)
    assert boxes.shape[1] == 4 and means.shape == (len(boxes), 3)
    union = np.array([[10, 20, 50, 40]], dtype=np.float64)
    assert iou(union, boxes).max() == pytest.approx(1.0)
    alone, _ = graph_segment_regions(img, scales=(100.0,), min_size=4, merge_neighbours=False)
    assert iou(union, alone).max() < 0.9


def test_graph_segments_prefers_the_object_over_background():
    image, gt = _one_object_image(size=(400, 300), box=(150, 100, 250, 180))
    boxes, _ = GraphSegmentsGenerator()(image)
    assert iou(gt, boxes[:1]).max() > 0.7, "the object is not the best-scored proposal"


def test_entry_points_when_registered():
    names = list_proposal_sources()
    for name, cls in [("graph_segments", GraphSegmentsGenerator),
                      ("selective_search", SelectiveSearchGenerator)]:
        assert name in names
        assert load_proposal_source(name) is cls
