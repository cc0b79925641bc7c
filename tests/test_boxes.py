"""Box geometry: the values every policy and the store rely on (xyxy float pixels)."""

import numpy as np
import pytest

from objcrop_plugin import boxes as box_ops


def test_as_boxes_accepts_single_box_and_empty_and_rejects_bad_shape():
    assert box_ops.as_boxes([1, 2, 3, 4]).shape == (1, 4)
    assert box_ops.as_boxes([]).shape == (0, 4)
    assert box_ops.as_boxes(np.zeros((0, 4), np.float32)).dtype == np.float64
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        box_ops.as_boxes([[1, 2, 3]])


def test_clip_values_inf_clipped_nan_kept_input_untouched():
    b = np.array([[-5.0, -1.0, 50.0, 70.0], [10.0, 20.0, np.inf, -np.inf], [np.nan, 1.0, 2.0, 3.0]])
    before = b.copy()
    out = box_ops.clip(b, (40, 60))
    np.testing.assert_array_equal(out[0], [0.0, 0.0, 40.0, 60.0])
    np.testing.assert_array_equal(out[1], [10.0, 20.0, 40.0, 0.0])
    assert np.isnan(out[2, 0]) and out[2, 1:].tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(b, before)  # never modifies its input
    with pytest.raises(ValueError, match="positive"):
        box_ops.clip(b, (0, 10))


def test_dilate_image_mode_grows_each_side_by_fraction_of_image_side():
    b = np.array([[10.0, 10.0, 30.0, 50.0]])
    # default dilation is 0.1 of the image side: x by 0.1 * 100, y by 0.1 * 200
    np.testing.assert_allclose(box_ops.dilate(b, (100, 200)), [[0.0, -10.0, 40.0, 70.0]])
    np.testing.assert_allclose(box_ops.dilate(b, (100, 200), 0.2), [[-10.0, -30.0, 50.0, 90.0]])
    # the growth does not depend on where the box is
    far = np.array([[60.0, 110.0, 80.0, 150.0]])
    np.testing.assert_allclose(box_ops.dilate(far, (100, 200)) - far, [[-10.0, -20.0, 10.0, 20.0]])
    np.testing.assert_allclose(box_ops.dilate(b, (100, 200), 0.0), b)


def test_dilate_coordinate_mode_is_the_released_code_rule():
    b = np.array([[10.0, 20.0, 100.0, 200.0], [300.0, 400.0, 500.0, 600.0]])
    out = box_ops.dilate(b, (1000, 1000), 0.2, mode="coordinate")
    # x1 -= x1*d; y1 -= y1*d; x2 += x2*d; y2 += y2*d
    np.testing.assert_allclose(out, [[8.0, 16.0, 120.0, 240.0], [240.0, 320.0, 600.0, 720.0]])
    # boxes near the top-left corner grow less than the same box further away
    grow_near = (out[0, 2] - out[0, 0]) - 90.0
    grow_far = (out[1, 2] - out[1, 0]) - 200.0
    assert grow_near < grow_far


def test_dilate_rejects_bad_arguments():
    b = np.array([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="mode"):
        box_ops.dilate(b, (10, 10), 0.1, mode="pixels")
    with pytest.raises(ValueError, match="dilation"):
        box_ops.dilate(b, (10, 10), -0.1)
    with pytest.raises(ValueError, match="dilation"):
        box_ops.dilate(b, (10, 10), float("nan"))


def test_ensure_min_size_symmetric_widening():
    b = np.array([[10.0, 10.0, 20.0, 100.0], [0.0, 0.0, 80.0, 80.0]])
    out = box_ops.ensure_min_size(b, 50)
    # width 10 -> 50 about the centre x=15; height 90 already >= 50
    np.testing.assert_allclose(out[0], [-10.0, 10.0, 40.0, 100.0])
    np.testing.assert_allclose(out[1], b[1])  # already big enough
    assert ((out[:, 2] - out[:, 0]) >= 50).all() and ((out[:, 3] - out[:, 1]) >= 50).all()


def test_ensure_min_size_released_code_rule_224_grow_112():
    b = np.array(
        [
            [100.0, 100.0, 200.0, 400.0],  # width 100 < 224, height 300 >= 224
            [50.0, 60.0, 150.0, 160.0],  # both sides < 224
            [0.0, 0.0, 224.0, 300.0],  # exactly 224 wide: not grown
        ]
    )
    out = box_ops.ensure_min_size(b, 224, grow=112)
    np.testing.assert_allclose(out[0], [-12.0, 100.0, 312.0, 400.0])
    np.testing.assert_allclose(out[1], [-62.0, -52.0, 262.0, 272.0])
    np.testing.assert_allclose(out[2], b[2])


def test_rescale_values_and_round_trip():
    b = np.array([[10.0, 5.0, 50.0, 25.0], [0.0, 0.0, 100.0, 50.0]])
    up = box_ops.rescale(b, (100, 50), (200, 150))
    np.testing.assert_allclose(up, [[20.0, 15.0, 100.0, 75.0], [0.0, 0.0, 200.0, 150.0]])
    np.testing.assert_allclose(box_ops.rescale(up, (200, 150), (100, 50)), b)
    rng = np.random.default_rng(0)
    r = rng.uniform(0, 1000, size=(50, 4))
    there = box_ops.rescale(r, (1000, 800), (333, 517))
    np.testing.assert_allclose(box_ops.rescale(there, (333, 517), (1000, 800)), r, rtol=1e-12)


def test_valid_mask():
    size = (100, 80)
    b = np.array(
        [
            [10.0, 10.0, 50.0, 50.0],  # fine
            [np.nan, 10.0, 50.0, 50.0],  # NaN
            [10.0, 10.0, np.inf, 50.0],  # inf
            [10.0, 10.0, 10.0, 50.0],  # zero width
            [10.0, 10.0, 50.0, 10.0],  # zero height
            [50.0, 10.0, 10.0, 50.0],  # inverted
            [200.0, 10.0, 300.0, 50.0],  # wholly right of the image
            [-50.0, -50.0, -10.0, -10.0],  # wholly above-left of the image
            [10.0, 10.0, 11.0, 50.0],  # 1 px wide: below MIN_WINDOW
            [-50.0, -50.0, 5.0, 5.0],  # partly outside, clips to 5x5: fine
            [10.0, 10.0, 12.0, 12.0],  # exactly MIN_WINDOW: fine
        ]
    )
    expected = [True, False, False, False, False, False, False, False, False, True, True]
    assert box_ops.valid_mask(b, size).tolist() == expected
    # without a size, position does not matter, but non-finite and inverted still do
    assert box_ops.valid_mask(b).tolist() == [
        True,
        False,
        False,
        False,
        False,
        False,
        True,
        True,
        False,
        True,
        True,
    ]


def test_area_and_iou_values():
    a = np.array([[0.0, 0.0, 10.0, 10.0]])
    b = np.array(
        [
            [0.0, 0.0, 10.0, 10.0],  # identical
            [5.0, 0.0, 15.0, 10.0],  # half overlap: 50 / 150
            [20.0, 20.0, 30.0, 30.0],  # disjoint
            [2.0, 2.0, 4.0, 4.0],  # inside: 4 / 100
        ]
    )
    np.testing.assert_allclose(box_ops.area(b), [100.0, 100.0, 100.0, 4.0])
    assert box_ops.area([[10.0, 0.0, 0.0, 10.0]]).tolist() == [0.0]  # inverted: 0
    out = box_ops.iou(a, b)
    assert out.shape == (1, 4)
    np.testing.assert_allclose(out[0], [1.0, 1.0 / 3.0, 0.0, 0.04])
    np.testing.assert_allclose(box_ops.iou(b, a)[:, 0], out[0])  # symmetric
    # two degenerate boxes: 0, not NaN
    z = np.array([[5.0, 5.0, 5.0, 5.0]])
    assert box_ops.iou(z, z).tolist() == [[0.0]]
