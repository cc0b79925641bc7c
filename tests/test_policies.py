"""Crop policies and view recipes: usable windows for any input, seeded, faithful to the paper."""

import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objcrop_plugin import boxes as box_ops
from objcrop_plugin._random import distributed_rank, process_rng, sample_rng
from objcrop_plugin.policies import (
    CropPolicy,
    NoProposalError,
    ObjectDilatedPolicy,
    ObjectPolicy,
    ProposalChoice,
    ViewRecipe,
    fit_window,
    make_policy,
    make_recipe,
    random_resized_crop,
)
from objcrop_plugin.registry import RegistryError, list_policies

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ----------------------------------------------------------------------------- strategies

_any_float = st.floats(allow_nan=True, allow_infinity=True)
_pixel = st.floats(-200.0, 6000.0, allow_nan=False)


@st.composite
def _plausible_box(draw):
    x1, y1 = draw(_pixel), draw(_pixel)
    w = draw(st.floats(0.0, 3000.0))
    h = draw(st.floats(0.0, 3000.0))
    return [x1, y1, x1 + w, y1 + h]


# mostly boxes that could come from a detector, plus anything at all (NaN, inf, inverted, huge)
_box = st.one_of(_plausible_box(), st.lists(st.one_of(_any_float, _pixel), min_size=4, max_size=4))


@st.composite
def _proposals(draw):
    """(boxes or None, scores or None): 0..20 boxes of any kind, scores possibly NaN or absent."""
    if draw(st.integers(0, 9)) == 0:
        return None, None  # the image has no entry in the store
    n = draw(st.integers(0, 20))
    boxes = np.array(draw(st.lists(_box, min_size=n, max_size=n)), dtype=np.float64).reshape(n, 4)
    scores = None
    if draw(st.booleans()):
        scores = np.array(draw(st.lists(_any_float, min_size=n, max_size=n)), dtype=np.float64)
    return boxes, scores


_image_size = st.tuples(st.integers(8, 5000), st.integers(8, 5000))


def assert_usable(box, image_size):
    """The contract every window keeps: finite, inside the image, at least 2 px per side."""
    w, h = image_size
    x1, y1, x2, y2 = box
    assert all(math.isfinite(v) for v in box), box
    assert 0.0 <= x1 < x2 <= w and 0.0 <= y1 < y2 <= h, (box, image_size)
    assert x2 - x1 >= box_ops.MIN_WINDOW and y2 - y1 >= box_ops.MIN_WINDOW, (box, x2 - x1, y2 - y1)


def inside(box, region, tol=1e-6):
    return (
        box[0] >= region[0] - tol
        and box[1] >= region[1] - tol
        and box[2] <= region[2] + tol
        and box[3] <= region[3] + tol
    )


# every registered policy / recipe with its defaults, plus object-aware variants worth covering
RECIPES = [(name, {}) for name in list_policies()] + [
    ("multi_crop", {"global_policy": "object", "local_policy": "object_dilated", "n_local": 3}),
    ("multi_crop", {"global_policy": "object", "proposal_per_view": True}),
    ("obj_obj_dilate", {"released_code": True}),
    ("obj_obj", {"min_size": 224, "min_area": 0.01, "max_area": 0.5, "top_k": 3}),
]


def _recipe_id(param):
    name, kwargs = param
    return name + ("-" + "-".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name,kwargs", RECIPES, ids=[_recipe_id(p) for p in RECIPES])
@PROPERTY
@given(props=_proposals(), image_size=_image_size, seed=st.integers(0, 2**32 - 1))
def test_every_recipe_gives_usable_windows_for_any_proposals(name, kwargs, props, image_size, seed):
    recipe = make_recipe(name, **kwargs)
    boxes, scores = props
    windows = recipe(image_size, boxes, scores, rng=np.random.default_rng(seed), key="k.jpg")

    assert len(windows) == len(recipe.views)
    assert [w.size for w in windows] == [v.size for v in recipe.views]
    flags = [w.local for w in windows]
    assert flags == sorted(flags), "globals must come before locals"
    assert flags == [v.local for v in recipe.views]
    usable = set() if boxes is None else set(np.flatnonzero(box_ops.valid_mask(boxes, image_size)))
    for w in windows:
        assert_usable(w.box, image_size)
        if w.proposal is not None:
            assert w.proposal in usable  # only usable proposals are ever cropped from
            assert not w.fallback
        if w.fallback:
            assert w.policy == "scene" and w.proposal is None
    if recipe.needs_proposals and not usable:
        assert any(w.fallback for w in windows)


@PROPERTY
@given(
    window=st.one_of(
        st.lists(st.one_of(_any_float, _pixel), min_size=4, max_size=4),
        _plausible_box(),
        st.just(None),
        st.just([1.0, 2.0]),
    ),
    image_size=_image_size,
)
def test_fit_window_makes_any_window_usable(window, image_size):
    out = fit_window(window, image_size)
    assert_usable(out, image_size)


@PROPERTY
@given(
    lo=st.floats(-10.0, 5000.0),
    thickness=st.floats(-2.0, 2.0),
    length=st.integers(8, 5000),
)
def test_fit_window_thin_windows_become_at_least_two_pixels(lo, thickness, length):
    out = fit_window((lo, lo, lo + thickness, lo + thickness), (length, length))
    assert_usable(out, (length, length))


def test_fit_window_regression_rounding_below_two_pixels():
    # centre +- 1 rounds to 1.9999999999999998 here
    out = fit_window((1.8904244107520451, 0.0, 1.9742782285826128, 100.0), (5000, 100))
    assert out[2] - out[0] >= 2.0
    assert_usable(out, (5000, 100))


@PROPERTY
@given(
    x=st.floats(0.0, 4000.0),
    y=st.floats(0.0, 4000.0),
    w=st.floats(2.0, 1000.0),
    h=st.floats(2.0, 1000.0),
    image_size=_image_size,
)
def test_fit_window_keeps_a_window_that_is_already_usable(x, y, w, h, image_size):
    W, H = image_size
    box = (min(x, W - 2.0), min(y, H - 2.0), 0.0, 0.0)
    box = (box[0], box[1], min(box[0] + w, W), min(box[1] + h, H))
    if box[2] - box[0] >= 2.0 and box[3] - box[1] >= 2.0:
        assert fit_window(box, image_size) == box


@PROPERTY
@given(
    x1=st.floats(-1000.0, 5000.0),
    y1=st.floats(-1000.0, 5000.0),
    w=st.floats(2.0, 5000.0),
    h=st.floats(2.0, 5000.0),
    scale=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(sorted),
    ratio=st.tuples(st.floats(0.1, 1.0), st.floats(1.0, 10.0)),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_resized_crop_stays_in_region_with_ratio_in_range(x1, y1, w, h, scale, ratio, seed):
    region = (x1, y1, x1 + w, y1 + h)
    out = random_resized_crop(region, tuple(scale), ratio, np.random.default_rng(seed))
    assert all(math.isfinite(v) for v in out)
    assert inside(out, region)
    ow, oh = out[2] - out[0], out[3] - out[1]
    assert ow >= box_ops.MIN_WINDOW - 1e-9 and oh >= box_ops.MIN_WINDOW - 1e-9
    assert ratio[0] * (1 - 1e-9) <= ow / oh <= ratio[1] * (1 + 1e-9)


def test_random_resized_crop_draws_area_in_scale():
    rng = np.random.default_rng(0)
    region = (100.0, 50.0, 500.0, 450.0)
    fractions = []
    for _ in range(500):
        x1, y1, x2, y2 = random_resized_crop(region, (0.3, 0.6), (3 / 4, 4 / 3), rng)
        fractions.append((x2 - x1) * (y2 - y1) / 400.0**2)
    assert 0.3 - 1e-9 <= min(fractions) <= max(fractions) <= 0.6 + 1e-9
    assert max(fractions) - min(fractions) > 0.2  # it really draws, not a fixed crop


# ----------------------------------------------------------------------------- reproducibility

_SIZE = (640, 480)
_BOXES = np.array(
    [[10.0, 20.0, 200.0, 220.0], [300.0, 100.0, 600.0, 400.0], [50.0, 300.0, 150.0, 470.0]]
)
_SCORES = np.array([0.9, 0.5, 0.7])


def _boxes_of(windows):
    return [(w.box, w.proposal, w.policy) for w in windows]


def test_same_seed_and_index_give_identical_windows():
    recipe = make_recipe("multi_crop", global_policy="object", proposal_per_view=True)
    a = recipe(_SIZE, _BOXES, _SCORES, rng=sample_rng(7, 12, epoch=3, rank=0))
    b = recipe(_SIZE, _BOXES, _SCORES, rng=sample_rng(7, 12, epoch=3, rank=0))
    assert _boxes_of(a) == _boxes_of(b)


@pytest.mark.parametrize(
    "other",
    [
        {"seed": 8, "index": 12, "epoch": 3, "rank": 0},
        {"seed": 7, "index": 13, "epoch": 3, "rank": 0},
        {"seed": 7, "index": 12, "epoch": 4, "rank": 0},
        {"seed": 7, "index": 12, "epoch": 3, "rank": 1},
    ],
    ids=["seed", "index", "epoch", "rank"],
)
def test_seed_index_epoch_and_rank_each_change_the_windows(other):
    recipe = make_recipe("obj_obj_dilate")
    ref = recipe(_SIZE, _BOXES, _SCORES, rng=sample_rng(7, 12, epoch=3, rank=0))
    new = recipe(_SIZE, _BOXES, _SCORES, rng=sample_rng(**other))
    assert _boxes_of(ref) != _boxes_of(new)


def test_sample_rng_without_seed_follows_the_torch_seed():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        a = sample_rng(None, 5, rank=0).integers(2**62, size=4).tolist()
        torch.manual_seed(2)
        b = sample_rng(None, 5, rank=0).integers(2**62, size=4).tolist()
        torch.manual_seed(1)
        c = sample_rng(None, 5, rank=0).integers(2**62, size=4).tolist()
    assert a != b  # DataLoader workers get different torch seeds, hence different streams
    assert a == c  # and the same seed reproduces the stream


class _ProcessDraws(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return info.id, int(process_rng().integers(2**62))


def test_process_rng_differs_between_dataloader_workers_and_from_the_parent():
    # the parent's cached stream is inherited by forked workers: they must not continue it
    parent_next = int(copy.deepcopy(process_rng()).integers(2**62))
    loader = torch.utils.data.DataLoader(
        _ProcessDraws(), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    draws = {}
    for worker, value in loader:
        draws.setdefault(int(worker), []).append(value)
    assert sorted(draws) == [0, 1]
    assert draws[0][0] != draws[1][0]
    assert parent_next not in draws[0] + draws[1]
    assert len(set(draws[0])) == len(draws[0])  # a worker's stream moves on between calls


class _RankedDraws(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return distributed_rank(), sample_rng(7, i).integers(2**62, size=2).tolist()


def test_spawned_workers_under_lightnings_launcher_keep_their_ranks_streams(monkeypatch):
    """Lightning's DDP launcher sets LOCAL_RANK and NODE_RANK, not RANK, and a spawned worker
    has no process group: rank 1's workers must still draw rank 1's crops, not rank 0's."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("NODE_RANK", "0")
    loader = torch.utils.data.DataLoader(
        _RankedDraws(), batch_size=None, num_workers=1, multiprocessing_context="spawn"
    )
    got = list(loader)
    assert [rank for rank, _ in got] == [1, 1]
    assert [draws for _, draws in got] == [
        sample_rng(7, i, rank=1).integers(2**62, size=2).tolist() for i in range(2)]
    assert got[0][1] != sample_rng(7, 0, rank=0).integers(2**62, size=2).tolist()


@pytest.mark.parametrize("env, rank", [
    ({}, 0),
    ({"RANK": "5", "LOCAL_RANK": "1"}, 5),  # torchrun
    ({"LOCAL_RANK": "3"}, 3),  # Lightning's launcher, one machine
    ({"LOCAL_RANK": "1", "NODE_RANK": "2", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 9),
    ({"LOCAL_RANK": "1", "NODE_RANK": "1", "WORLD_SIZE": "8"}, 9),  # unique, if not exact
])
def test_rank_from_the_environment_without_a_process_group(monkeypatch, env, rank):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed_rank() == rank


def test_process_streams_of_different_seeds_do_not_reset_each_other():
    """A dataset's views (one seed) and a collate function (another) in one process: each
    keeps its own stream instead of restarting it whenever the other draws."""
    alone = process_rng(7).bit_generator.state  # a fresh key: the stream from its start
    first = [int(process_rng(7).integers(2**62))]
    for _ in range(3):
        process_rng(8).integers(2**62)
        first.append(int(process_rng(7).integers(2**62)))
    replay = np.random.default_rng()
    replay.bit_generator.state = alone
    assert first == [int(replay.integers(2**62)) for _ in range(4)]
    assert len(set(first)) == 4


# ----------------------------------------------------------------------------- obj_obj_dilate


def _by_policy(windows):
    return {w.policy: w for w in windows}


def test_obj_obj_dilate_dilated_view_comes_from_the_same_proposal():
    size = (1000, 1000)
    # far apart, so a window from another proposal's dilated box cannot fit by accident
    props = np.array(
        [[50.0, 50.0, 100.0, 100.0], [800.0, 800.0, 900.0, 900.0], [50.0, 800.0, 100.0, 900.0]]
    )
    recipe = make_recipe("obj_obj_dilate")
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        views = _by_policy(recipe(size, props, rng=rng))
        obj, dil = views["object"], views["object_dilated"]
        assert obj.proposal == dil.proposal is not None
        seen.add(obj.proposal)
        dilated_box = box_ops.clip(box_ops.dilate(props[obj.proposal], size), size)[0]  # default 0.1 x image
        assert inside(dil.box, dilated_box)
        assert inside(obj.box, box_ops.clip(props[obj.proposal], size)[0])
        assert inside(obj.box, dilated_box)
    assert seen == {0, 1, 2}


def test_obj_obj_dilate_dilated_view_reaches_beyond_the_object():
    size = (1000, 800)
    box = np.array([[400.0, 300.0, 500.0, 400.0]])
    recipe = make_recipe("obj_obj_dilate", dilation=0.2, shuffle_globals=False)
    rng = np.random.default_rng(1)
    outside = 0
    for _ in range(200):
        obj, dil = recipe(size, box, rng=rng)
        assert (obj.policy, dil.policy) == ("object", "object_dilated")
        assert inside(dil.box, (200.0, 140.0, 700.0, 560.0))  # 0.2 x 1000, 0.2 x 800 per side
        outside += not inside(dil.box, box[0])
    assert outside > 150  # the dilated view mostly shows context around the object


def test_obj_obj_dilate_released_code_rules_near_the_top_left_corner():
    size = (640, 480)
    box = np.array([[10.0, 20.0, 50.0, 60.0]])
    recipe = make_recipe("obj_obj_dilate", released_code=True, shuffle_globals=False)
    obj_pol, dil_pol = (v.policy for v in recipe.views)
    assert isinstance(dil_pol, ObjectDilatedPolicy)
    assert obj_pol.scale == (0.0, 1.0) and dil_pol.scale == (0.2, 1.0)
    assert (dil_pol.dilation, dil_pol.dilation_mode) == (0.2, "coordinate")
    # object: 40x40 < 224 grows 112 px each side -> (-102, -92, 162, 172), clipped
    assert obj_pol.region(size, box[0]) == (0.0, 0.0, 162.0, 172.0)
    # dilated: coordinates x 0.8 / 1.2 -> (8, 16, 60, 72), then +-112 -> (-104, -96, 172, 184)
    assert dil_pol.region(size, box[0]) == (0.0, 0.0, 172.0, 184.0)
    # the image-size rule would have given (0, 0, 114, 108): the modes really differ
    default = make_recipe("obj_obj_dilate", shuffle_globals=False).views[1].policy
    assert default.region(size, box[0]) == (0.0, 0.0, 114.0, 108.0)

    rng = np.random.default_rng(0)
    beyond = 0
    for _ in range(300):
        obj, dil = recipe(size, box, rng=rng)
        assert inside(obj.box, (0.0, 0.0, 162.0, 172.0))
        assert inside(dil.box, (0.0, 0.0, 172.0, 184.0))
        beyond += dil.box[2] > 162.0 or dil.box[3] > 172.0
    assert beyond > 0

    # boxes already 224 px or more are not grown: only the coordinate dilation applies
    big = np.array([300.0, 200.0, 600.0, 450.0])
    assert obj_pol.region(size, big) == (300.0, 200.0, 600.0, 450.0)
    assert dil_pol.region(size, big) == (240.0, 160.0, 640.0, 480.0)


def test_shuffle_globals_gives_both_orders():
    recipe = make_recipe("obj_obj_dilate")
    rng = np.random.default_rng(3)
    orders = Counter(tuple(w.policy for w in recipe(_SIZE, _BOXES, rng=rng)) for _ in range(200))
    assert set(orders) == {("object", "object_dilated"), ("object_dilated", "object")}
    assert min(orders.values()) > 60
    fixed = make_recipe("obj_obj_dilate", shuffle_globals=False)
    assert {tuple(w.policy for w in fixed(_SIZE, _BOXES, rng=rng)) for _ in range(50)} == {
        ("object", "object_dilated")
    }
    # global views of different sizes: the views change places, each slot keeps its size
    mixed = make_recipe([{"policy": "scene", "size": 64}, {"policy": "object", "size": 32}],
                        shuffle_globals=True)
    drawn = {tuple((w.size, w.policy) for w in mixed(_SIZE, _BOXES, rng=rng)) for _ in range(50)}
    assert {tuple(p for _, p in d) for d in drawn} == {("scene", "object"), ("object", "scene")}
    assert {tuple(size for size, _ in d) for d in drawn} == {((64, 64), (32, 32))}


# ----------------------------------------------------------------------------- proposal choice


def _chosen(recipe, size, boxes, scores, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return Counter(recipe(size, boxes, scores, rng=rng)[0].proposal for _ in range(n))


def _scored_boxes(seed):
    """12 random boxes in an 800x600 image, their scores, and their indices best first."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 500, size=(12, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 90, size=(12, 2))], axis=1)
    scores = rng.permutation(12).astype(float)
    return (800, 600), boxes, scores, np.argsort(-scores)


def test_only_top_k_usable_proposals_by_score_are_chosen_uniformly():
    size, boxes, scores, best = _scored_boxes(0)
    # the three best-scored boxes are unusable: they must be skipped, not counted in top-k
    boxes[best[0]] = [np.nan, 0, 10, 10]
    boxes[best[1]] = [900, 700, 950, 750]  # outside the image
    boxes[best[2]] = [50, 50, 50, 90]  # zero width
    counts = _chosen(make_recipe("obj_obj", top_k=4), size, boxes, scores)
    assert set(counts) == set(best[3:7].tolist())
    assert all(650 < c < 850 for c in counts.values()), counts  # uniform among the top 4


def test_rank_weighting_draws_the_box_of_rank_r_in_proportion_to_one_over_r():
    size, boxes, scores, best = _scored_boxes(1)
    boxes[best[0]] = [np.nan, 0, 10, 10]  # unusable: not a rank
    n = 6000
    for recipe in (make_recipe("obj_obj_dilate", top_k=4, weighting="rank"),
                   make_recipe("object", top_k=4, weighting="rank"),
                   make_recipe(["object", "object_dilated"], top_k=4, weighting="rank")):
        counts = _chosen(recipe, size, boxes, scores, n=n)
        assert set(counts) == set(best[1:5].tolist())
        expected = np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (1 + 1 / 2 + 1 / 3 + 1 / 4)
        observed = np.array([counts[i] for i in best[1:5]]) / n
        # 0.48, 0.24, 0.16, 0.12; binomial sd <= 0.0065
        assert np.abs(observed - expected).max() < 0.03, (observed, expected)
        assert recipe.choice.weighting == "rank"
    # every view of a sample still comes from the one drawn box
    windows = make_recipe("obj_obj_dilate", weighting="rank")(size, boxes, scores,
                                                               rng=np.random.default_rng(0))
    assert len({w.proposal for w in windows}) == 1


def test_rank_weighting_per_view_draws_and_follows_the_stored_order_without_scores():
    boxes = np.array([[i * 10.0, 0.0, i * 10.0 + 8.0, 8.0] for i in range(3)])
    recipe = make_recipe(["object", "object"], weighting="rank", proposal_per_view=True)
    rng = np.random.default_rng(0)
    per_view = Counter(w.proposal for _ in range(3000) for w in recipe((40, 20), boxes, None, rng))
    # ranks 1, 2, 3 in the stored order: 6/11, 3/11, 2/11 of 6000 views
    assert abs(per_view[0] / 6000 - 6 / 11) < 0.03 and abs(per_view[2] / 6000 - 2 / 11) < 0.03
    # a single usable box is drawn whatever the weighting
    one = make_recipe("obj_obj", weighting="rank")((40, 20), boxes[:1], None, rng)
    assert [w.proposal for w in one] == [0, 0]


def test_uniform_weighting_is_the_default_and_a_bad_weighting_names_the_choices():
    assert make_recipe("obj_obj_dilate").choice.weighting == "uniform"
    size, boxes = (200, 20), np.array([[i * 10.0, 0.0, i * 10.0 + 8.0, 8.0] for i in range(15)])
    scores = np.arange(15, dtype=float)
    # the default and an explicit uniform draw the same windows from the same stream
    a = [make_recipe("obj_obj_dilate")(size, boxes, scores, rng=np.random.default_rng(s))
         for s in range(20)]
    b = [make_recipe("obj_obj_dilate", weighting="uniform")(size, boxes, scores,
                                                            rng=np.random.default_rng(s))
         for s in range(20)]
    assert a == b
    with pytest.raises(ValueError, match=r"weighting must be one of 'uniform', 'rank', got 'score'"):
        make_recipe("obj_obj_dilate", weighting="score")
    with pytest.raises(ValueError, match="weighting must be one of"):
        ProposalChoice(weighting="Rank")


def test_top_k_default_is_the_papers_ten():
    assert make_recipe("obj_obj_dilate").choice.top_k == 10
    boxes = np.array([[i * 10.0, 0.0, i * 10.0 + 8.0, 8.0] for i in range(15)])
    scores = np.arange(15, dtype=float)
    counts = _chosen(make_recipe("obj_obj"), (200, 20), boxes, scores, n=1000)
    assert set(counts) == set(range(5, 15))


def test_nan_scores_rank_last():
    boxes = np.array([[0.0, 0.0, 10.0, 10.0]] * 4)
    scores = np.array([np.nan, 0.1, np.nan, 0.2])
    choice = ProposalChoice(top_k=10)
    assert choice.candidates((100, 100), boxes, scores).tolist() == [3, 1, 0, 2]
    assert set(_chosen(make_recipe("obj_obj", top_k=2), (100, 100), boxes, scores, n=300)) == {
        3,
        1,
    }
    # no scores at all: the stored order is the ranking
    assert ProposalChoice(top_k=2).candidates((100, 100), boxes, None).tolist() == [0, 1]


def test_min_area_and_max_area_filter_on_clipped_area():
    size = (100, 100)
    boxes = np.array(
        [
            [0.0, 0.0, 10.0, 10.0],  # 1 %
            [0.0, 0.0, 50.0, 50.0],  # 25 %
            [0.0, 0.0, 90.0, 90.0],  # 81 %
            [-50.0, -50.0, 50.0, 50.0],  # 100x100 unclipped, 25 % once clipped to the image
        ]
    )
    choice = ProposalChoice(top_k=10, min_area=0.1, max_area=0.5)
    assert choice.candidates(size, boxes, None).tolist() == [1, 3]
    counts = _chosen(make_recipe("obj_obj", min_area=0.1, max_area=0.5), size, boxes, None, n=300)
    assert set(counts) == {1, 3}
    # nothing in range: a counted fallback, not an error
    recipe = make_recipe("obj_obj", min_area=0.9)
    windows = recipe(size, boxes, rng=np.random.default_rng(0))
    assert all(w.fallback for w in windows)
    assert recipe.fallbacks.as_dict()["unusable"] == 1


# ----------------------------------------------------------------------------- fallback


def test_missing_proposals_fall_back_to_counted_scene_crops():
    recipe = make_recipe("obj_obj_dilate")
    windows = recipe(_SIZE, None, rng=np.random.default_rng(0), key="a.jpg")
    assert [w.policy for w in windows] == ["scene", "scene"]
    assert all(w.fallback and w.proposal is None for w in windows)
    for w in windows:
        assert_usable(w.box, _SIZE)
    recipe(_SIZE, None, rng=np.random.default_rng(1), key="b.jpg")
    assert recipe.fallbacks.as_dict() == {"samples": 2, "missing": 2, "unusable": 0, "mismatched": 0}
    assert recipe.fallbacks.fallbacks == 2


def test_unusable_proposals_fall_back_and_count_separately():
    recipe = make_recipe("multi_crop", global_policy="object", n_local=2)
    bad = np.array([[np.nan, 0, 5, 5], [700, 500, 800, 600], [5, 5, 1, 1], [0, 0, 0, 0]])
    windows = recipe(_SIZE, bad, np.ones(4), rng=np.random.default_rng(0), key="c.jpg")
    assert all(w.fallback and w.policy == "scene" for w in windows)
    assert [w.local for w in windows] == [False, False, True, True]
    assert recipe.fallbacks.as_dict() == {"samples": 1, "missing": 0, "unusable": 1, "mismatched": 0}
    # an image stored with zero boxes is unusable too
    recipe(_SIZE, np.zeros((0, 4)), rng=np.random.default_rng(0))
    assert recipe.fallbacks.as_dict()["unusable"] == 2


def test_scene_only_recipes_never_count_fallbacks():
    recipe = make_recipe("scene_scene")
    windows = recipe(_SIZE, None, rng=np.random.default_rng(0))
    assert [w.policy for w in windows] == ["scene", "scene"]
    assert not any(w.fallback for w in windows)
    assert recipe.fallbacks.as_dict() == {"samples": 1, "missing": 0, "unusable": 0, "mismatched": 0}


def test_strict_mode_raises_naming_the_key():
    recipe = make_recipe("obj_obj_dilate", strict=True)
    with pytest.raises(NoProposalError, match="train/img_42.jpg"):
        recipe(_SIZE, None, key="train/img_42.jpg")
    with pytest.raises(NoProposalError, match="val/img_7.jpg"):
        recipe(_SIZE, np.array([[np.nan] * 4]), key="val/img_7.jpg")
    # a usable proposal still works in strict mode
    assert len(recipe(_SIZE, _BOXES, key="ok.jpg")) == 2


class _FallbackDataset(torch.utils.data.Dataset):
    def __init__(self, recipe):
        self.recipe = recipe

    def __len__(self):
        return 10

    def __getitem__(self, i):
        boxes = None if i % 2 == 0 else np.array([[np.nan, 0.0, 5.0, 5.0]])
        windows = self.recipe((64, 48), boxes, rng=sample_rng(0, i), key=f"img{i}.jpg")
        return int(all(w.fallback for w in windows))


def test_fallback_counts_from_dataloader_workers_reach_the_main_process():
    recipe = make_recipe("obj_obj_dilate")
    loader = torch.utils.data.DataLoader(
        _FallbackDataset(recipe), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    assert sum(loader) == 10
    assert recipe.fallbacks.as_dict() == {"samples": 10, "missing": 5, "unusable": 5, "mismatched": 0}


# ----------------------------------------------------------------------------- factories


def test_make_recipe_by_name_with_parameters():
    recipe = make_recipe("obj_obj_dilate", size=160, dilation=0.2, top_k=3, min_area=0.01)
    assert isinstance(recipe, ViewRecipe) and recipe.name == "obj_obj_dilate"
    assert [v.size for v in recipe.views] == [(160, 160), (160, 160)]
    assert recipe.views[1].policy.dilation == 0.2
    assert (recipe.choice.top_k, recipe.choice.min_area) == (3, 0.01)
    assert make_recipe("obj_obj_dilate", size=(96, 128)).views[0].size == (96, 128)
    assert make_recipe(recipe) is recipe


def test_make_policy_by_name_mapping_or_instance():
    pol = make_policy("object_dilated", dilation=0.3, dilation_mode="coordinate")
    assert isinstance(pol, ObjectDilatedPolicy)
    assert (pol.dilation, pol.dilation_mode) == (0.3, "coordinate")
    pol = make_policy({"policy": "object", "scale": (0.5, 1.0), "min_size": 64})
    assert isinstance(pol, ObjectPolicy) and pol.scale == (0.5, 1.0) and pol.min_size == 64.0
    assert make_policy(pol) is pol
    with pytest.raises(TypeError, match="view recipe"):
        make_policy("obj_obj_dilate")


@pytest.mark.parametrize(
    "build",
    [
        lambda: make_recipe("obj_obj_dilate", dilaton=0.2),
        lambda: make_policy("object_dilated", dilaton=0.2),
    ],
)
def test_unknown_parameter_is_a_type_error_listing_accepted_ones(build):
    with pytest.raises(TypeError) as info:
        build()
    msg = str(info.value)
    assert "dilaton" in msg and "dilation" in msg and "scale" in msg


def test_unknown_name_is_a_registry_error_listing_installed_names():
    for build in (lambda: make_recipe("obj_obj_dilated"), lambda: make_policy("centre")):
        with pytest.raises(RegistryError) as info:
            build()
        msg = str(info.value)
        assert "obj_obj_dilate" in msg and "scene" in msg and "multi_crop" in msg


def test_view_list_with_local_views_orders_globals_first():
    recipe = make_recipe(
        [
            {"policy": "object", "local": True, "size": 96, "scale": (0.05, 0.4)},
            "scene",
            {"policy": "object_dilated", "dilation": 0.2},
            {"policy": "object", "local": True},
        ],
        size=160,
        local_size=64,
    )
    assert [(v.policy.name, v.size, v.local) for v in recipe.views] == [
        ("scene", (160, 160), False),
        ("object_dilated", (160, 160), False),
        ("object", (96, 96), True),
        ("object", (64, 64), True),
    ]
    assert (recipe.n_global, recipe.n_local) == (2, 2)
    windows = recipe(_SIZE, _BOXES, _SCORES, rng=np.random.default_rng(0))
    assert [(w.policy, w.size, w.local) for w in windows] == [
        (v.policy.name, v.size, v.local) for v in recipe.views
    ]
    # all object views share the sample's one proposal
    assert len({w.proposal for w in windows if w.policy != "scene"}) == 1
    with pytest.raises(TypeError, match="sise"):
        make_recipe(["scene", "object"], sise=10)


def test_a_single_policy_name_gives_two_views():
    recipe = make_recipe("object", size=128)
    assert len(recipe.views) == 2
    assert all(isinstance(v.policy, ObjectPolicy) and v.size == (128, 128) for v in recipe.views)
    windows = recipe(_SIZE, _BOXES, _SCORES, rng=np.random.default_rng(0))
    assert windows[0].proposal == windows[1].proposal is not None
    assert len(make_recipe("scene", n_views=3).views) == 3


def test_multi_crop_defaults_are_two_global_scene_and_six_local_object_crops():
    recipe = make_recipe("multi_crop")
    windows = recipe(_SIZE, _BOXES, _SCORES, rng=np.random.default_rng(0))
    assert [w.policy for w in windows] == ["scene"] * 2 + ["object"] * 6
    assert [w.size for w in windows] == [(224, 224)] * 2 + [(96, 96)] * 6
    assert recipe.views[0].policy.scale == (0.14, 1.0)
    assert recipe.views[-1].policy.scale == (0.05, 0.4)


def test_a_custom_policy_subclass_is_made_usable_by_the_recipe():
    class Wild(CropPolicy):
        name = "wild"

        def sample(self, image_size, box, rng):
            return (float("nan"), -5.0, 1e9, 3.0)

    recipe = make_recipe([Wild(), "scene"])
    for w in recipe((50, 40), None, rng=np.random.default_rng(0)):
        assert_usable(w.box, (50, 40))


def test_scores_of_another_length_than_boxes_name_the_key():
    recipe = make_recipe("obj_obj_dilate")
    with pytest.raises(ValueError, match="img.jpg: 2 boxes but 3 scores"):
        recipe((100, 100), np.array([[0, 0, 50, 50], [10, 10, 60, 60.0]]), np.ones(3),
               rng=np.random.default_rng(0), key="img.jpg")


def test_negative_seed_is_a_clear_error():
    with pytest.raises(ValueError, match="non-negative"):
        sample_rng(-1, 0)


def test_unknown_parameter_error_lists_recipe_level_parameters_too():
    with pytest.raises(TypeError, match="top_k"):
        make_recipe("object", bogus=1)
