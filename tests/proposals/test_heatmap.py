"""The heatmap generator: boxes from planted heat maps, level choice, the generator's contract
and batching, and ``objcrop proposals build --method heatmap`` (workers, failures, kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import warm_python

cv2 = pytest.importorskip("cv2", reason="the heatmap generator needs OpenCV (proposals extra)")
timm = pytest.importorskip("timm")

from objcrop_plugin.boxes import iou  # noqa: E402
from objcrop_plugin.cli import main as cli_main  # noqa: E402
from objcrop_plugin.data.synthetic import write_dataset  # noqa: E402
from objcrop_plugin.proposals import ProposalStore  # noqa: E402
from objcrop_plugin.proposals import heatmap as heatmap_module  # noqa: E402
from objcrop_plugin.proposals.build import build_store, make_generator  # noqa: E402
from objcrop_plugin.proposals.heatmap import (  # noqa: E402
    SEGMENT_CACHE,
    HeatmapGenerator,
    SegmentCache,
    candidate_boxes,
    choose_level,
    device_candidate_boxes,
    feature_contrast,
    heat_boxes,
    heat_contrast,
    segment_boxes,
)

MODEL = "test_efficientnet"  # timm's tiny test network: strides 2, 4, 8, 16, 32


def blob(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    m = np.zeros((h, w), np.float32)
    m[y1:y2, x1:x2] = 1.0
    return m


def test_planted_blobs_give_one_box_each_and_the_union():
    heat = np.maximum(blob(60, 80, (5, 10, 20, 30)), 0.8 * blob(60, 80, (50, 20, 75, 50)))
    heat += np.random.default_rng(0).uniform(0, 0.1, heat.shape).astype(np.float32)
    boxes, scores = heat_boxes(heat / heat.max(), thresholds=(0.3, 0.5, 0.7))
    found = {tuple(int(v) for v in b) for b in boxes}
    assert (5, 10, 20, 30) in found and (50, 20, 75, 50) in found
    assert (5, 10, 75, 50) in found  # the whole thresholded map (ContrastiveCrop's box)
    by_box = dict(zip(map(tuple, boxes.astype(int).tolist()), scores))
    # a tight box is hot inside and cool around: it outscores the loose union box
    assert by_box[(5, 10, 20, 30)] > by_box[(5, 10, 75, 50)]
    assert heat_boxes(np.zeros((8, 8), np.float32))[0].shape == (0, 4)


def test_level_choice_follows_the_input_resolution():
    strides = [2, 4, 8, 16, 32]
    assert choose_level(strides, 96, 32) == 0  # 48 cells at stride 2, 24 at stride 4
    assert choose_level(strides, 192, 32) == 1  # the demo at scale 2: stride 4
    assert choose_level(strides, 384, 12) == 4  # a 512x384 photo: the last stage
    assert choose_level(strides, 20, 32) == 0  # nothing fine enough: the finest
    gen = HeatmapGenerator(MODEL, device="cpu", scale=2.0, min_cells=32)
    assert gen.input_size((96, 128)) == (192, 256) and gen.level_index((192, 256)) == 1
    # the demo's setting (64 cells) takes the stride-2 level for its scenes at 2x
    assert HeatmapGenerator(MODEL, device="cpu", scale=2.0, min_cells=64).level_index(
        (192, 256)) == 0


def test_feature_contrast_prefers_the_box_that_differs_from_its_ring():
    feats = np.zeros((2, 24, 32), np.float32)
    feats[0] = 1.0  # background: one direction
    feats[:, 8:14, 10:20] = np.array([0.0, 1.0], np.float32)[:, None, None]  # the object
    size = (128, 96)  # stride 4: the object is pixels (40, 32, 80, 56)
    boxes = np.array([[40, 32, 80, 56],  # the object
                      [20, 16, 100, 72],  # loose around it
                      [44, 36, 76, 52],  # inside it
                      [0, 70, 40, 96],  # background only
                      [0, 0, 128, 96]], np.float32)  # the whole image: no ring
    s = feature_contrast(boxes, feats, size)
    assert s.dtype == np.float32 and s.shape == (5,)
    assert s[0] == pytest.approx(1.0, abs=1e-6)  # orthogonal inside and around
    assert s[0] > s[1] and s[0] > s[2] and s[3] == pytest.approx(0.0, abs=1e-6)
    assert s[4] == 0.0
    # heat_boxes with features scores by feature contrast, not by heat
    heat = np.zeros((96, 128), np.float32)
    heat[32:56, 40:80] = 1.0
    b, sc = heat_boxes(heat, thresholds=(0.5,), features=feats)
    assert b.tolist() == [[40, 32, 80, 56]] and sc[0] == pytest.approx(1.0, abs=1e-6)


class PlantedFeatures(torch.nn.Module):
    """A stand-in 'network' whose stride-4 feature map is planted: a textured background of
    strong activations in one channel, and a weaker object in another."""

    feature_info = [{"reduction": 4, "num_chs": 2, "module": "planted"}]

    def __init__(self, feats: torch.Tensor) -> None:
        super().__init__()
        self.feats = feats

    def forward_intermediates(self, x, indices, intermediates_only, stop_early):
        return [self.feats.expand(x.shape[0], -1, -1, -1)]


class CeilGrid(torch.nn.Module):
    """A stand-in CNN: each stride-``s`` cell's mean brightness, with a conv net's
    ``ceil(side / s)`` cells (the last row and column reach past the input's edge)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.feature_info = [{"reduction": stride, "num_chs": 4, "module": "pool"}]

    def forward_intermediates(self, x, indices, intermediates_only, stop_early):
        f = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), self.stride, self.stride,
                                           ceil_mode=True)
        return [f.repeat(1, 4, 1, 1)]


@pytest.mark.parametrize("stride", [8, 32])
def test_boxes_line_up_when_the_image_is_no_multiple_of_the_stride(stride):
    """A 100 px image at stride 32: a 4x4 grid over 128 px, stretched onto 100 px, put the
    object's box at [50, 75) instead of [64, 96) (IoU 0.08)."""
    img = np.full((100, 100, 3), 112, np.uint8)  # about the ImageNet mean: no activation
    img[64:96, 64:96] = 255
    gen = HeatmapGenerator(module=CeilGrid(stride), heat="activation", reduce="norm",
                           min_cells=1, thresholds=[0.5], min_side=1, min_side_fraction=0,
                           max_side=1000, score="heat", nms_iou=None)
    assert gen.input_size((100, 100)) == (100 // stride * stride,) * 2
    boxes, _ = gen(img)
    assert iou(np.array([[64, 64, 96, 96]], np.float32), boxes[:1]).max() > 0.65


def test_contrast_map_finds_a_weak_object_on_a_strong_texture():
    rng = np.random.default_rng(0)
    f = np.zeros((1, 2, 24, 32), np.float32)
    f[0, 0] = rng.uniform(2.0, 3.0, (24, 32))  # texture: the strongest activations
    f[0, :, 8:14, 10:20] = np.array([0.0, 1.0], np.float32)[:, None, None]
    net = PlantedFeatures(torch.from_numpy(f))
    img = np.zeros((96, 128, 3), np.uint8)
    obj = np.array([[40, 32, 80, 56]], np.float32)
    boxes, _ = HeatmapGenerator(module=net, top_k=3, heat="contrast")(img)  # feature scores
    assert iou(obj, boxes[:1]).max() > 0.8
    # ContrastiveCrop's activation map marks the texture: its best box is not the object
    boxes, _ = HeatmapGenerator(module=net, top_k=3, heat="activation", score="heat")(img)
    assert iou(obj, boxes[:1]).max() < 0.5


def test_whitened_map_finds_an_object_that_differs_where_the_background_does_not_vary():
    """Texture in two channels varies more than the object differs in a third, where the
    background is flat: the contrast map marks the texture, the whitened map the object."""
    yy, xx = np.mgrid[0:24, 0:32].astype(np.float32)
    f = np.zeros((1, 3, 24, 32), np.float32)
    f[0, 0] = 2.5 + 0.5 * np.sin(xx * np.pi / 4) * np.cos(yy * np.pi / 3)  # texture
    f[0, 1] = 2.5 + 0.5 * np.cos(xx * np.pi / 5 + yy * np.pi / 7)
    f[0, :2, 8:14, 10:20] = 2.5  # the object: plain in the texture's channels ...
    f[0, 2, 8:14, 10:20] = 0.3  # ... and a small offset where the background never varies
    net = PlantedFeatures(torch.from_numpy(f))
    img = np.zeros((96, 128, 3), np.uint8)
    obj = np.array([[40, 32, 80, 56]], np.float32)
    boxes, _ = HeatmapGenerator(module=net, top_k=3)(img)  # the default: whitened
    assert iou(obj, boxes[:1]).max() > 0.8
    boxes, _ = HeatmapGenerator(module=net, top_k=3, heat="contrast")(img)
    assert iou(obj, boxes[:1]).max() < 0.5


def test_whitened_contrast_scores_unusual_boxes_unlike_their_ring():
    from objcrop_plugin.proposals.heatmap import whitened_contrast

    z = np.zeros((2, 24, 32), np.float32)
    z[:, 8:14, 10:20] = np.array([3.0, 4.0], np.float32)[:, None, None]  # |v| = 5, ring 0
    z[:, 0:6, 0:30] = np.array([0.0, 1.0], np.float32)[:, None, None]  # a wide region
    boxes = np.array([[40, 32, 80, 56],  # the isolated object: (1 - 0) * sqrt(5)
                      [40, 4, 60, 16],  # a piece of the region: its ring continues it
                      [0, 0, 128, 96]], np.float32)  # the whole image: no ring
    s = whitened_contrast(boxes, z, (128, 96))
    assert s[0] == pytest.approx(np.sqrt(5.0), rel=1e-5)
    assert s[1] < 0.2 * s[0] and s[2] == 0.0
    assert whitened_contrast(np.zeros((0, 4), np.float32), z, (128, 96)).shape == (0,)


@pytest.mark.parametrize("whitened", [False, True])
def test_batched_box_contrast_equals_the_per_image_reference(whitened):
    """The generator's scorer (summed-area tables on the features' device, chunked) gives the
    reference functions' scores: boxes of every shape, on and off the grid, touching the
    border, filling the image (no ring: 0), and images with no box at all."""
    from objcrop_plugin.proposals.heatmap import box_contrast, whitened_contrast

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 7, 12, 16)).astype(np.float32)  # the image is 64x48 px
    boxes = []
    for n in (9, 0, 1, 30, 4):
        xy = rng.uniform(-4, 70, size=(n, 2, 2))
        b = np.concatenate([xy.min(1), xy.max(1) + 1], axis=1).clip(0, [64, 48, 64, 48])
        boxes.append(b.astype(np.float32))
    boxes[4][0] = (0, 0, 64, 48)
    reference = whitened_contrast if whitened else feature_contrast
    for max_elements in (1, 1 << 23):  # one image per chunk, all in one
        got = box_contrast(torch.from_numpy(feats), boxes, (64, 48), ring=0.3, whitened=whitened,
                           max_elements=max_elements)
        assert [g.shape for g in got] == [(len(b),) for b in boxes]
        for f, b, g in zip(feats, boxes, got):
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, reference(b, f, (64, 48), 0.3), rtol=1e-6, atol=1e-7)
        assert got[4][0] == 0.0
    none = box_contrast(torch.from_numpy(feats[:2]), [boxes[1]] * 2, (64, 48))
    assert [(g.shape, g.dtype) for g in none] == [((0,), np.float32)] * 2


def test_generator_boxes_are_heat_boxes_of_its_maps(gen):
    """Batched on the device, the generator finds and scores the same candidates as
    :func:`heat_boxes` on each image's heat map and whitened features."""
    from objcrop_plugin.proposals.heatmap import _MEAN, _STD, whiten

    rng = np.random.default_rng(1)
    works = [rng.integers(0, 255, (72, 96, 3), dtype=np.uint8) for _ in range(3)]
    raw = gen.raw_batch(works)
    maps = gen.heat_maps(works)
    x = torch.from_numpy(np.stack(works)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)
    was_training = gen._net.training
    with torch.no_grad():
        gen._net.eval()
        feats = gen._net.forward_intermediates(x, indices=[gen.level_index((72, 96))],
                                               intermediates_only=True, stop_early=True)[-1]
    gen._net.train(was_training)
    z = whiten(feats.float(), gen.eps).numpy()
    for (b, s), m, zi in zip(raw, maps, z):
        rb, rs = heat_boxes(m, gen.thresholds, gen.ring, gen.min_area, features=zi,
                            whitened=True, min_side=gen.min_side_for((96, 72)))
        np.testing.assert_array_equal(b, rb)
        np.testing.assert_allclose(s, rs, rtol=1e-6, atol=1e-7)
        assert len(b) > 0


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 30, 3, 4)])  # C <= h*w and C > h*w
def test_whiten_norms_are_mahalanobis_distances_from_the_median(shape):
    from objcrop_plugin.proposals.heatmap import _median_feature, whiten

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(*shape, generator=g) * torch.linspace(0.1, 3.0, shape[1])[:, None, None]
    z = whiten(feats, eps=1e-3)
    b, c, h, w = shape
    assert z.shape == (b, min(c, h * w), h, w)
    x = feats.flatten(2).double() - _median_feature(feats).double()[..., None]  # (B, C, n)
    for i in range(b):
        cov = x[i] @ x[i].T / (h * w)
        reg = 1e-3 * cov.diagonal().mean()
        d2 = (x[i] * torch.linalg.solve(cov + reg * torch.eye(c, dtype=torch.float64), x[i])).sum(0)
        torch.testing.assert_close(z[i].double().pow(2).sum(0).flatten(), d2, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return HeatmapGenerator(MODEL, device="cpu", batch_size=3, top_k=5)


def test_contract_batches_and_determinism(gen):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (72, 96, 3), dtype=np.uint8),
              rng.integers(0, 255, (120, 80, 3), dtype=np.uint8),
              rng.integers(0, 255, (72, 96, 3), dtype=np.uint8),
              rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)]
    together = gen.propose_batch(images)
    for image, (boxes, scores) in zip(images, together):
        h, w = image.shape[:2]
        assert boxes.dtype == np.float32 and scores.dtype == np.float32
        assert 0 < len(boxes) <= 5 and scores.shape == (len(boxes),)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (np.diff(scores) <= 0).all()
    for image, (boxes, scores) in zip(images, together):  # alone = in a mixed batch
        b, s = gen(image)
        np.testing.assert_allclose(b, boxes, atol=1e-4)
        np.testing.assert_allclose(s, scores, atol=1e-5)
    again = gen.propose_batch(images)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(together, again))


def test_boxes_find_a_bright_object_on_a_dark_scene(gen):
    """Even random weights respond to a high-contrast square on a flat background."""
    img = np.full((96, 128, 3), 30, np.uint8)
    img[30:62, 70:110] = (250, 240, 10)
    boxes, _ = gen(img)
    assert iou(np.array([[70, 30, 110, 62]], np.float32), boxes).max() > 0.5


def test_min_side_keeps_specks_from_outranking_the_object():
    """3 px specks are as unusual as an object to the whitened map and outscore it; the demo's
    ``min_side: 8`` drops them, so the object comes first."""
    from objcrop_plugin.demo import HEATMAP_PARAMS

    img = np.full((96, 128, 3), 30, np.uint8)
    img[30:62, 70:110] = (250, 240, 10)
    for x, y in [(10, 10), (20, 70), (45, 15), (115, 80), (40, 50)]:
        img[y:y + 3, x:x + 3] = (10, 200, 250)
    obj = np.array([[70, 30, 110, 62]], np.float32)
    torch.manual_seed(0)
    loose = HeatmapGenerator(MODEL, device="cpu", **{
        **HEATMAP_PARAMS, "min_side": 4.0, "min_side_fraction": 0.0, "top_k": 30})
    boxes, _ = loose(img)
    assert iou(obj, boxes[:1]).max() < 0.5 and iou(obj, boxes).max() > 0.5
    torch.manual_seed(0)
    boxes, _ = HeatmapGenerator(MODEL, device="cpu", **HEATMAP_PARAMS)(img)
    assert np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).min() >= 8
    assert iou(obj, boxes[:1]).max() > 0.8


def test_the_default_floor_follows_the_image_size():
    """At 512 px a cell of the map is several pixels, and specks (the dots, the object's own
    corners) pass a floor of a few pixels: ``min_side_fraction`` (8% of the working image's
    short side by default) drops them at any size, so the object comes first with the
    generator's defaults."""
    img = np.full((384, 512, 3), 30, np.uint8)
    img[120:248, 280:440] = (250, 240, 10)
    for x, y in [(40, 40), (80, 280), (180, 60), (460, 320), (160, 200)]:
        img[y:y + 3, x:x + 3] = (10, 200, 250)
    obj = np.array([[280, 120, 440, 248]], np.float32)
    assert HeatmapGenerator(MODEL, device="cpu").min_side_for((512, 384)) == pytest.approx(30.72)
    assert HeatmapGenerator(MODEL, device="cpu", min_side=40).min_side_for((512, 384)) == 40
    boxes, _ = HeatmapGenerator(MODEL, device="cpu", min_side_fraction=0.0)(img)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert iou(obj, boxes).max() < 0.5 and np.median(sides) < 16  # specks: none is the object
    boxes, _ = HeatmapGenerator(MODEL, device="cpu")(img)
    assert np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).min() >= 30.72
    assert iou(obj, boxes[:1]).max() > 0.8
    # out of range: an error that names the parameter
    with pytest.raises(ValueError, match="min_side_fraction"):
        HeatmapGenerator(MODEL, device="cpu", min_side_fraction=1.0)


def planted_scene(seed: int = 0, size: tuple[int, int] = (128, 96)) -> tuple[np.ndarray, list]:
    """Flat-coloured rectangles on a noisy textured background, and their boxes."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = rng.integers(60, 140, (h, w, 3), dtype=np.uint8)
    rects = [(10, 12, 34, 30), (60, 40, 76, 62), (90, 8, 120, 26)]
    for (x1, y1, x2, y2), colour in zip(rects, [(250, 30, 30), (20, 220, 40), (30, 40, 240)]):
        img[y1:y2, x1:x2] = colour
    return img, rects


def test_segment_boxes_hold_flat_objects_on_a_textured_background():
    img, rects = planted_scene()
    boxes = segment_boxes(img, [100.0, 400.0])
    assert boxes.dtype == np.int64 and boxes.shape[1] == 4
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
    got = iou(np.asarray(rects, np.float32), boxes.astype(np.float32)).max(axis=1)
    assert (got > 0.8).all(), got
    # nothing covering most of the image (the background's segments)
    assert ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) <= 0.8 * 128 * 96).all()
    # segmented at a reduced size, the boxes are still in the input's pixels
    big = cv2.resize(img, (256, 192), interpolation=cv2.INTER_NEAREST)
    small = segment_boxes(big, [100.0, 400.0], segment_side=128)
    twice = np.asarray(rects, np.float32) * 2
    assert (iou(twice, small.astype(np.float32)).max(axis=1) > 0.75).all()
    assert segment_boxes(img, []).shape == (0, 4)


def test_segments_add_candidates_and_feature_heat_scores_them():
    """With ``segments`` the candidates are the heat map's plus the colour segments' (those
    above the size floor), each scored as without them; ``score="feature*heat"`` multiplies
    the feature score by the square root of the positive heat contrast."""
    img, rects = planted_scene(1)
    torch.manual_seed(0)
    net = timm.create_model(MODEL, pretrained=False, num_classes=0)
    plain = HeatmapGenerator(module=net, device="cpu")
    seg = HeatmapGenerator(module=net, device="cpu", segments=[100.0, 400.0])
    both = HeatmapGenerator(module=net, device="cpu", segments=[100.0, 400.0],
                            score="feature*heat")
    (pb, ps), = plain.raw_batch([img])
    (sb, ss), = seg.raw_batch([img])
    (bb, bs), = both.raw_batch([img])
    want = np.unique(np.concatenate([pb.astype(np.int64), segment_boxes(img, [100.0, 400.0])]),
                     axis=0)
    floor = seg.min_side_for((128, 96))  # candidates under the size floor are not scored
    want = want[np.minimum(want[:, 2] - want[:, 0], want[:, 3] - want[:, 1]) >= floor]
    np.testing.assert_array_equal(sb, want)
    np.testing.assert_array_equal(bb, sb)
    rows = {tuple(b): s for b, s in zip(sb.astype(int).tolist(), ss)}
    np.testing.assert_allclose([rows[tuple(b)] for b in pb.astype(int).tolist()], ps, rtol=1e-6)
    heat = seg.heat_maps([img])[0]
    np.testing.assert_allclose(
        bs, ss * np.sqrt(heat_contrast(sb.astype(np.int64), heat, seg.ring).clip(0, None)),
        rtol=1e-5, atol=1e-7)
    # batches and repeats give the same boxes (the segmentation runs in threads)
    again = both.propose_batch([img, img[:, ::-1].copy(), img])
    for a, b in zip(again, both.propose_batch([img, img[:, ::-1].copy(), img])):
        np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(again[0][0], again[2][0])
    assert seg.params()["segments"] == [100.0, 400.0]


def test_module_is_used_as_is_and_its_mode_restored(gen):
    net = timm.create_model(MODEL, pretrained=False, num_classes=0)
    net.train()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    g = HeatmapGenerator(module=net, batch_size=2)
    assert g._net is net and g._device == torch.device("cpu") and "module" not in g.params()
    g(np.zeros((40, 60, 3), np.uint8))
    assert net.training
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        HeatmapGenerator(MODEL, checkpoint=tmp_path / "missing.pth", device="cpu")
    with pytest.raises(ValueError, match="out of range"):
        HeatmapGenerator(MODEL, level=9, device="cpu")
    with pytest.raises(ValueError, match="thresholds"):
        HeatmapGenerator(MODEL, thresholds=[0.5, 1.5], device="cpu")
    with pytest.raises(ValueError, match="heat must be"):
        HeatmapGenerator(MODEL, heat="saliency", device="cpu")
    with pytest.raises(ValueError, match="score must be"):
        HeatmapGenerator(MODEL, score="area", device="cpu")
    with pytest.raises(ValueError, match="segments must be positive"):
        HeatmapGenerator(MODEL, segments=[100, -5], device="cpu")
    with pytest.raises(ValueError, match="segment_side"):
        HeatmapGenerator(MODEL, segments=[100], segment_side=4, device="cpu")
    with pytest.raises(ValueError, match="components must be"):
        HeatmapGenerator(MODEL, components="gpu", device="cpu")
    with pytest.raises(ValueError, match="feature levels"):
        HeatmapGenerator(module=torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="unknown parameter"):
        make_generator("heatmap", modle=MODEL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A synthetic dataset, one corrupt JPEG among its images, and an exported backbone."""
    root = tmp_path_factory.mktemp("hm")
    ds = write_dataset(root / "data", 40, size=(96, 72), seed=1, workers=1)
    (Path(ds.root) / "images" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    torch.manual_seed(1)
    net = timm.create_model(MODEL, pretrained=False, num_classes=0)
    weights = root / "backbone.pth"
    torch.save(net.state_dict(), weights)
    return Path(ds.root), weights


def test_cli_build_with_a_checkpoint_lists_the_corrupt_image(tmp_path, folder, capsys):
    root, weights = folder
    out = tmp_path / "h.objcrop"
    rc = cli_main(["proposals", "build", str(root), "-o", str(out), "--method", "heatmap",
                   "--model", MODEL, "--checkpoint", str(weights), "--device", "cpu",
                   "--batch-size", "4", "--workers", "2", "--chunk-size", "16",
                   "--no-progress", "--param", "scale=2", "--max-failure-rate", "0.1"])
    assert rc == 0, capsys.readouterr().err
    store = ProposalStore(out)
    assert len(store) == 40 and "images/zz_corrupt.jpg" not in store
    assert store.meta["params"]["checkpoint"] == str(weights)
    failures = Path(str(out) + ".failures.tsv").read_text()
    assert "images/zz_corrupt.jpg" in failures
    # the same build in one process, other batches within the chunks: the same store
    build_store(root, tmp_path / "one.objcrop", "heatmap",
                params={"model": MODEL, "checkpoint": str(weights), "device": "cpu",
                        "batch_size": 4, "scale": 2}, workers=1, chunk_size=16, progress=False)
    assert (tmp_path / "one.objcrop").read_bytes() == out.read_bytes()


def test_kill_9_mid_build_resumes_to_the_identical_store(tmp_path, folder):
    root, weights = folder
    params = ["--method", "heatmap", "--model", MODEL, "--checkpoint", str(weights),
              "--device", "cpu", "--batch-size", "2", "--workers", "1", "--chunk-size", "2",
              "--param", "scale=4", "--no-progress", "--max-failure-rate", "0.1"]
    # every build in a process of its own: the same torch thread count (CPU float sums depend
    # on it)
    ref = tmp_path / "ref.objcrop"
    cli = [sys.executable, "-m", "objcrop_plugin.cli", "proposals", "build", str(root), "-o"]
    warm = warm_python.shared("objcrop")  # the killed and resumed builds skip the imports
    warm.run(cli + [str(ref)] + params, check=True, timeout=300, cold=True)
    out = tmp_path / "run" / "p.objcrop"
    cmd = cli + [str(out)] + params
    proc = warm.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                      start_new_session=True)
    parts = out.parent / ".p.objcrop.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("chunk-*.jsonl"))) < 2:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("chunk-*.jsonl")))
    assert 2 <= done < 21, "the kill must land mid-build for this test to mean anything"
    done = warm.run(cmd, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed" in done.stdout
    assert out.read_bytes() == ref.read_bytes()


def test_without_a_checkpoint_every_process_builds_the_same_seeded_network(tmp_path, folder,
                                                                           caplog):
    """Boxes from the initial weights: two builds in separate processes (other global
    seeds) and a resumed or sharded one must use one network, so the weights are seeded."""
    root, _ = folder
    cli = [sys.executable, "-m", "objcrop_plugin.cli", "proposals", "build", str(root),
           "--method", "heatmap", "--model", MODEL, "--device", "cpu", "--workers", "1",
           "--no-progress", "--max-failure-rate", "0.1", "-o"]
    a, b, c = (tmp_path / f"{n}.objcrop" for n in "abc")
    for out, extra in ((a, []), (b, []), (c, ["--param", "seed=1"])):
        # the first in a fresh interpreter: its own hash seed and global random states
        done = warm_python.shared("objcrop").run(cli + [str(out)] + extra, timeout=300,
                                                 cold=out == a)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "keeps its initial weights (seed" in done.stderr
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    with caplog.at_level("WARNING", logger="objcrop_plugin"):
        torch.manual_seed(7)
        g0 = HeatmapGenerator(MODEL, device="cpu")
        torch.manual_seed(8)
        g1 = HeatmapGenerator(MODEL, device="cpu")
    assert "keeps its initial weights (seed 0)" in caplog.text
    assert all(torch.equal(x, y) for x, y in zip(g0._net.state_dict().values(),
                                                 g1._net.state_dict().values()))


@pytest.mark.parametrize("hw", [(5, 7), (6, 8), (1, 1)])
@pytest.mark.parametrize("channels", [4, 150])  # 150: rows shared among threads
def test_median_feature_is_torch_median_on_the_cpu(hw, channels):
    from objcrop_plugin.proposals.heatmap import _median_feature

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, channels, *hw, generator=g)
    feats[0, 0] = 1.0  # ties
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for f in (feats, feats.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(_median_feature(f), f.flatten(2).median(dim=2).values)
    finally:
        torch.set_num_threads(threads)


def test_whiten_redoes_an_image_in_float64_when_its_float32_factorisation_fails(monkeypatch):
    from objcrop_plugin.proposals import heatmap

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 4, 5, 6, generator=g)
    expected = heatmap.whiten(feats)
    real = torch.linalg.cholesky_ex

    def failing(a):  # as if rounding had made image 1's covariance indefinite
        chol, info = real(a)
        chol = chol.clone()
        chol[1] = float("nan")  # what a failed factorisation leaves
        return chol, info + torch.tensor([0, 1, 0], dtype=info.dtype)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    z = heatmap.whiten(feats)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)


def smooth_maps(n: int, hw: tuple[int, int], grid: tuple[int, int], seed: int) -> np.ndarray:
    """``n`` heat maps in [0, 1]: random grids upsampled bicubically (blobs of all shapes)."""
    g = torch.from_numpy(np.random.default_rng(seed).random((n, 1, *grid)).astype(np.float32))
    m = torch.nn.functional.interpolate(g, size=hw, mode="bicubic", align_corners=False)[:, 0]
    lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
    return ((m - lo) / (hi - lo)).numpy()


def shapes_map() -> np.ndarray:
    """Components that take a propagation many steps, or none: a spiral, a U, pixels touching
    only at corners (one 8-connected component), single pixels, a ring around an island."""
    m = np.zeros((40, 48), np.float32)
    # a square spiral, 1 px wide, from the outside in
    x0, y0, x1, y1 = 1, 1, 22, 22
    while x0 <= x1 and y0 <= y1:
        m[y0, x0:x1 + 1] = 1
        m[y0:y1 + 1, x1] = 1
        if y1 > y0 + 2:
            m[y1, x0:x1 + 1] = 1
        if x1 > x0 + 4:
            m[y0 + 2:y1 + 1, x0] = 1
        x0, y0, x1, y1 = x0 + 2, y0 + 2, x1 - 2, y1 - 2
    m[25:38, 2] = m[37, 2:12] = m[25:38, 11] = 1  # a U
    for i in range(8):  # a diagonal staircase touching at corners
        m[25 + i, 14 + i] = 1
    m[2, 30] = m[4, 32] = m[6, 46] = 1  # single pixels
    m[10:20, 30:40] = 0.6  # a ring (0.6) around an island (0.9)
    m[12:18, 32:38] = 0.0
    m[14:16, 34:36] = 0.9
    m[30:39, 30:47] = np.linspace(0.05, 1.0, 17, dtype=np.float32)  # a ramp
    return m


@pytest.mark.parametrize("case", ["smooth", "shapes", "empty", "full"])
def test_device_components_give_opencvs_boxes(case):
    """:func:`device_candidate_boxes` (label equivalence in torch) gives exactly the boxes of
    OpenCV's connected components (:func:`candidate_boxes`) on the host, map by map."""
    ths = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    if case == "smooth":
        maps = np.concatenate([smooth_maps(5, (48, 64), (6, 8), 0),
                               smooth_maps(3, (48, 64), (24, 32), 1)])  # many small blobs
    elif case == "shapes":
        m = shapes_map()
        maps = np.stack([m, m[::-1, ::-1].copy(), m[:, ::-1].copy()])
    elif case == "empty":
        maps = np.zeros((2, 9, 11), np.float32)
    else:
        maps = np.ones((2, 9, 11), np.float32)
    for min_area in (1, 4, 9):
        want = [candidate_boxes(m, ths, min_area) for m in maps]
        got = device_candidate_boxes(torch.from_numpy(maps), ths, min_area)
        assert len(got) == len(maps)
        for w, g in zip(want, got):
            assert g.dtype == np.int64 and g.shape[1:] == (4,)
            np.testing.assert_array_equal(g, w)
    if case == "shapes":  # the planted components are there: the spiral and the U whole
        found = {tuple(b) for b in device_candidate_boxes(torch.from_numpy(maps[:1]), [0.5], 1)[0]}
        assert {(1, 1, 23, 23), (2, 25, 12, 38), (14, 25, 22, 33), (30, 2, 31, 3)} <= found


def test_device_components_in_chunks_and_with_one_jump_are_the_same():
    maps = torch.from_numpy(smooth_maps(6, (30, 40), (5, 7), 2))
    ths = [0.3, 0.5, 0.7]
    whole = device_candidate_boxes(maps, ths, 4)
    for kw in ({"max_pixels": 3 * 1200}, {"max_pixels": 1}, {"jumps": 1}, {"jumps": 0}):
        for a, b in zip(whole, device_candidate_boxes(maps, ths, 4, **kw)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="B, h, w"):
        device_candidate_boxes(maps[0], ths, 4)


def test_generator_components_on_the_device_change_no_box():
    """``components="device"`` (the default on a GPU) gives the host's boxes and scores, and
    is not a parameter of the store (the boxes do not depend on it)."""
    torch.manual_seed(0)
    net = timm.create_model(MODEL, pretrained=False, num_classes=0)
    host = HeatmapGenerator(module=net, device="cpu", components="host", top_k=8)
    dev = HeatmapGenerator(module=net, device="cpu", components="device", top_k=8)
    assert not HeatmapGenerator(module=net, device="cpu").components_on_device
    assert dev.components_on_device and not host.components_on_device
    assert host.params() == dev.params() and "components" not in dev.params()
    images = [planted_scene(i)[0] for i in range(3)]
    for (hb, hs), (db, ds) in zip(host.raw_batch(images), dev.raw_batch(images)):
        np.testing.assert_array_equal(db, hb)
        np.testing.assert_array_equal(ds, hs)
    for a, b in zip(host.propose_batch(images), dev.propose_batch(images)):
        np.testing.assert_array_equal(a[0], b[0])


def test_segment_cache_keeps_each_images_segments_for_the_next_refresh(monkeypatch):
    """An online run makes a generator per refresh: the later ones take every image's segment
    boxes from the process's cache (by content) and segment nothing; the boxes are the same."""
    calls = []
    real = heatmap_module.segment_boxes
    monkeypatch.setattr(heatmap_module, "segment_boxes",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    SEGMENT_CACHE.clear()
    images = [planted_scene(i)[0] for i in range(3)]
    torch.manual_seed(0)
    net = timm.create_model(MODEL, pretrained=False, num_classes=0)

    def refresh(**kw):
        gen = HeatmapGenerator(module=net, device="cpu", segments=[100.0, 300.0], **kw)
        return gen, gen.propose_batch(images)

    gen, first = refresh()
    assert len(calls) == 3 and len(SEGMENT_CACHE) == 3 and SEGMENT_CACHE.misses == 3
    _, second = refresh()
    assert len(calls) == 3 and SEGMENT_CACHE.hits == 3  # nothing segmented again
    _, uncached = refresh(segment_cache=False)
    assert len(calls) == 6 and SEGMENT_CACHE.hits == 3
    for a, b, c in zip(first, second, uncached):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[0], c[0])
        np.testing.assert_array_equal(a[1], c[1])
    assert "segment_cache" not in gen.params()
    # other parameters or other pixels are other entries
    refresh(segment_side=64)
    assert len(calls) == 9 and len(SEGMENT_CACHE) == 6
    SEGMENT_CACHE.clear()
    assert len(SEGMENT_CACHE) == 0 and SEGMENT_CACHE.hits == 0


def test_a_full_segment_cache_keeps_its_first_entries(caplog):
    cache = SegmentCache(max_bytes=2 * (4 * 4 * 3 + 64))
    boxes = np.array([[0, 0, 5, 5], [1, 2, 3, 4], [2, 2, 9, 9]], np.int64)
    keys = [cache.key(np.full((4, 5, 3), v, np.uint8), [100.0], 256) for v in range(3)]
    assert len(set(keys)) == 3
    assert cache.key(np.full((4, 5, 3), 0, np.uint8), [300.0], 256) != keys[0]
    assert cache.key(np.full((5, 4, 3), 0, np.uint8), [100.0], 256) != keys[0]
    with caplog.at_level("WARNING", logger="objcrop_plugin"):
        for k in keys:
            cache.put(k, boxes)
        cache.put(cache.key(np.zeros((2, 2, 3), np.uint8), [1.0], None), boxes)
    assert len(cache) == 2 and cache.get(keys[2]) is None and cache.full
    assert caplog.text.count("segment cache is full (2 images") == 1  # said once
    got = cache.get(keys[0])
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, boxes)


def test_components_that_fail_on_the_device_fall_back_to_the_host(monkeypatch, caplog):
    torch.manual_seed(0)
    net = timm.create_model(MODEL, pretrained=False, num_classes=0)
    images = [planted_scene(i)[0] for i in range(2)]
    want = HeatmapGenerator(module=net, device="cpu", components="host").raw_batch(images)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(heatmap_module, "device_candidate_boxes", broken)
    gen = HeatmapGenerator(module=net, device="cpu", components="device")
    with caplog.at_level("WARNING", logger="objcrop_plugin"):
        got = gen.raw_batch(images)
    assert calls == [1] and not gen.components_on_device
    assert "run on the host from now on" in caplog.text and "out of memory" in caplog.text
    for (wb, ws), (gb, gs) in zip(want, got):
        np.testing.assert_array_equal(gb, wb)
        np.testing.assert_array_equal(gs, ws)
    gen.raw_batch(images)
    assert calls == [1]  # not tried again


def test_a_resumed_build_refuses_a_checkpoint_that_changed(tmp_path, folder, monkeypatch):
    """A build interrupted after its first chunk, its checkpoint then overwritten (a longer
    run wrote over backbone.pth): resuming would mix two networks' boxes in one store, so the
    rerun is refused naming the parameter; with the file put back it resumes."""
    import shutil

    import objcrop_plugin.proposals.build as build

    root, weights = folder
    ckpt = tmp_path / "backbone.pth"
    shutil.copyfile(weights, ckpt)
    out = tmp_path / "h.objcrop"
    params = {"model": MODEL, "checkpoint": str(ckpt), "device": "cpu", "batch_size": 4}
    real = build.propose_keys

    def first_chunk_then_killed(*args, **kwargs):
        chunks = real(*args, **kwargs)
        yield next(chunks)
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "propose_keys", first_chunk_then_killed)
    with pytest.raises(KeyboardInterrupt):
        build_store(root, out, "heatmap", params=params, chunk_size=8, progress=False)
    monkeypatch.setattr(build, "propose_keys", real)
    state = torch.load(ckpt, weights_only=True)
    torch.save({k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}, ckpt)
    with pytest.raises(ValueError, match=r"the content of checkpoint \(.*backbone.pth\) changed"):
        build_store(root, out, "heatmap", params=params, chunk_size=8, progress=False)
    shutil.copyfile(weights, ckpt)
    summary = build_store(root, out, "heatmap", params=params, chunk_size=8, progress=False)
    assert summary.resumed_images == 8 and len(ProposalStore(out)) == 40


def test_a_network_in_half_precision_gets_inputs_of_its_dtype():
    """A run with ``precision: bf16-true`` keeps the backbone's weights in bfloat16: online
    refreshes feed it bfloat16 inputs, and find the same object."""
    net = timm.create_model(MODEL, pretrained=False, num_classes=0).eval()
    img = np.full((96, 128, 3), 30, np.uint8)
    img[30:62, 70:110] = (250, 240, 10)
    boxes, _ = HeatmapGenerator(module=net.to(torch.bfloat16), device="cpu", top_k=3)(img)
    assert iou(np.array([[70, 30, 110, 62]], np.float32), boxes).max() > 0.5


def test_a_vit_built_by_name_takes_each_images_own_size():
    """timm's ViTs and Swins are built for one input size: by name the generator builds them
    with ``dynamic_img_size``; a module built without it is refused, naming the fix."""
    img = np.full((96, 128, 3), 30, np.uint8)
    img[30:62, 70:110] = (250, 240, 10)
    gen = HeatmapGenerator(model="vit_tiny_patch16_224", device="cpu", scale=4, top_k=3,
                           model_kwargs={"depth": 2})
    assert gen._net.dynamic_img_size is True and len(gen(img)[0]) > 0
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2)
    with pytest.raises(ValueError, match=r"without dynamic_img_size.*Fix: build it with "
                                         r"dynamic_img_size=True"):
        HeatmapGenerator(module=fixed)
