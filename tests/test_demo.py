"""`objcrop demo` end to end on the quick budget: structure, RESULT line, determinism.

Learning itself is not asserted here (that is the benchmark's job: the default budget)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from objcrop_plugin.demo import BUDGETS, run_demo

RESULT = re.compile(
    r"^RESULT scene_map=(\S+) obj_obj_dilate_map=(\S+) random_map=(\S+) delta=(\S+)$"
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    res = run_demo(root / "out", budget="quick", seed=0, data_dir=root / "data", log=lines.append)
    return root, res, lines


def test_quick_demo_writes_results_and_result_line(quick_run):
    root, res, lines = quick_run
    on_disk = json.loads((root / "out" / "results.json").read_text())
    assert on_disk["runs"].keys() == {"random", "scene_scene", "obj_obj_dilate"}
    for info in on_disk["runs"].values():
        assert 0.0 <= info["map"] <= 100.0
        assert info["pretrain_seconds"] >= 0.0
    assert on_disk["runs"]["random"]["pretrain_seconds"] == 0.0
    assert on_disk["runs"]["scene_scene"]["pretrain_seconds"] > 0.0
    m = RESULT.match(lines[-1])
    assert m, lines[-1]
    scene, obj, rnd, delta = map(float, m.groups())
    assert scene == res["runs"]["scene_scene"]["map"]
    assert obj == res["runs"]["obj_obj_dilate"]["map"]
    assert rnd == res["runs"]["random"]["map"]
    assert delta == pytest.approx(obj - scene, abs=0.011)


def test_quick_demo_is_deterministic_given_seed(quick_run, tmp_path):
    """Two runs of one seed give identical probe results, also when the caller's torch thread
    count differs (as it does between machines with different core counts): CPU reductions
    depend on the thread count, so the demo pins it (``threads``) and restores the caller's."""
    root, res, _ = quick_run
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before != 1 else 3)
    try:
        again = run_demo(tmp_path / "out", budget="quick", seed=0, data_dir=root / "data",
                         log=lambda s: None)
        assert torch.get_num_threads() == (1 if before != 1 else 3)
    finally:
        torch.set_num_threads(before)
    for name in ("random", "scene_scene", "obj_obj_dilate"):
        assert again["runs"][name]["map"] == res["runs"][name]["map"]
    assert again["runs"]["scene_scene"]["final_loss"] == res["runs"]["scene_scene"]["final_loss"]
    assert again["runs"]["obj_obj_dilate"]["knn_map"] == res["runs"]["obj_obj_dilate"]["knn_map"]
    assert again["data_root"] == res["data_root"]  # the dataset is reused, not rewritten


def test_runs_with_generated_proposals_and_obj_scene(quick_run, tmp_path):
    root, _, _ = quick_run
    res = run_demo(tmp_path / "out", budget="quick", seed=0, data_dir=root / "data",
                   runs=["obj_scene", "obj_obj_dilate@graph_segments"], log=lambda s: None)
    assert set(res["runs"]) == {"obj_scene", "obj_obj_dilate@graph_segments"}
    built = list((root / "data").glob("*/proposals_graph_segments.objcrop"))
    assert len(built) == 1
    assert res["delta"] is None  # no scene_scene / obj_obj_dilate pair in this run
    with pytest.raises(ValueError, match="unknown run"):
        run_demo(tmp_path / "bad", budget="quick", runs=["scene_scene@bing"], log=lambda s: None)


def test_a_rank_weighted_run_draws_its_boxes_by_rank(quick_run, tmp_path):
    """``VIEWS:rank@SOURCE``: the recipe's proposal choice is weighted by rank; the other crop
    parameters stay the demo's."""
    import yaml

    from objcrop_plugin.demo import run_dir

    root, _, _ = quick_run
    out = tmp_path / "out"
    res = run_demo(out, budget="quick", seed=0, data_dir=root / "data",
                   runs=["obj_obj_dilate:rank@graph_segments", "obj_obj_dilate@graph_segments"],
                   log=lambda s: None)
    params = {n: yaml.safe_load((run_dir(out, n) / "config.yaml").read_text())["crop"]["params"]
              for n in res["runs"]}
    ranked, uniform = params["obj_obj_dilate:rank@graph_segments"], params[
        "obj_obj_dilate@graph_segments"]
    assert ranked.pop("weighting") == "rank" and "weighting" not in uniform
    assert ranked == uniform
    assert all(math.isfinite(r["map"]) for r in res["runs"].values())
    with pytest.raises(ValueError, match="':per_box' and ':rank' are the only suffixes"):
        run_demo(tmp_path / "bad", budget="quick", runs=["scene_scene:rank"], log=lambda s: None)


def test_unknown_setting_and_budget_are_refused(tmp_path):
    with pytest.raises(TypeError, match="unknown demo settings"):
        run_demo(tmp_path, budget="quick", epoch=3)
    with pytest.raises(ValueError, match="budget"):
        run_demo(tmp_path, budget="huge")


def test_budgets_share_their_keys():
    assert set(BUDGETS) >= {"quick", "default", "full"}
    assert {frozenset(b) for b in BUDGETS.values()} == {frozenset(BUDGETS["default"])}


def test_demo_probe_is_objcrop_eval_with_the_demo_options(quick_run):
    """One evaluation path: the demo's numbers are evaluate_backbone's (what objcrop eval and
    objcrop train run) with the demo's split, input scale and pooling."""
    from objcrop_plugin.data.synthetic import load_labels
    from objcrop_plugin.demo import _backbone
    from objcrop_plugin.eval import evaluate_backbone

    _, res, _ = quick_run
    cfg = res["config"]
    keys, y, _ = load_labels(res["data_root"])
    n = cfg["n_train"]
    w, h = cfg["image_size"]
    before = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        ev = evaluate_backbone(
            _backbone(cfg["model"], 0), res["data_root"], keys, y,
            split=(range(n), range(n, len(keys))), seed=0, image_size=(h, w),
            scale=cfg["eval_scale"], pooling=cfg["pooling"], probe={"epochs": cfg["probe_epochs"]},
        )
    finally:
        torch.set_num_threads(before)
    assert round(ev["probe_map"], 2) == res["runs"]["random"]["map"]
    assert round(ev["knn_map"], 2) == res["runs"]["random"]["knn_map"]
    assert ev["feature_dim"] == 2 * _backbone(cfg["model"], 0).num_features  # avg + max


def test_reuse_takes_earlier_runs_with_the_same_settings_only(quick_run, tmp_path):
    root, res, _ = quick_run
    out = tmp_path / "out"
    first = run_demo(out, budget="quick", seed=0, data_dir=root / "data",
                     runs=["random", "scene_scene"], log=lambda s: None)
    assert first["runs"]["scene_scene"]["map"] == res["runs"]["scene_scene"]["map"]
    lines: list[str] = []
    again = run_demo(out, budget="quick", seed=0, data_dir=root / "data",
                     runs=["random", "scene_scene", "obj_obj_dilate"],
                     reuse=["scene_scene", "obj_obj_dilate"], log=lines.append)
    assert again["runs"]["scene_scene"] == dict(first["runs"]["scene_scene"], reused=True)
    assert "reused" not in again["runs"]["random"]  # not asked for
    assert any("obj_obj_dilate: no earlier result" in line for line in lines)  # none on disk
    assert again["runs"]["obj_obj_dilate"]["map"] == res["runs"]["obj_obj_dilate"]["map"]
    assert json.loads((out / "results.json").read_text())["runs"].keys() == {
        "random", "scene_scene", "obj_obj_dilate"}
    # other settings (or a lost backbone) mean the run is run again
    other = run_demo(out, budget="quick", seed=0, data_dir=root / "data", runs=["scene_scene"],
                     reuse=["scene_scene"], log=lambda s: None, lr=2e-2)
    assert "reused" not in other["runs"]["scene_scene"]
    (out / "runs" / "scene_scene" / "backbone.pth").unlink()
    run_demo(out, budget="quick", seed=0, data_dir=root / "data", runs=["scene_scene"],
             log=lambda s: None)
    (out / "runs" / "scene_scene" / "backbone.pth").unlink()
    lost = run_demo(out, budget="quick", seed=0, data_dir=root / "data", runs=["scene_scene"],
                    reuse=["scene_scene"], log=lambda s: None)
    assert "reused" not in lost["runs"]["scene_scene"]
    assert lost["runs"]["scene_scene"]["map"] == res["runs"]["scene_scene"]["map"]


def test_runs_on_the_networks_own_boxes(quick_run, tmp_path):
    """``@initial``: one store, from the initial weights, before the first epoch, for the whole
    run; ``@online``: scene crops in the warm-up, then refreshed stores; ``@online_no_warmup``:
    the initial store, then refreshed ones."""
    from objcrop_plugin.demo import run_dir
    from objcrop_plugin.proposals import ProposalStore

    root, _, _ = quick_run
    out = tmp_path / "out"
    res = run_demo(out, budget="quick", seed=0, data_dir=root / "data",
                   runs=["obj_obj_dilate@initial", "obj_obj_dilate@online",
                         "obj_obj_dilate@online_no_warmup"], epochs=3,
                   log=lambda s: None)
    stores = {n: sorted(p.name for p in (run_dir(out, n) / "proposals").glob("*.objcrop"))
              for n in res["runs"]}
    assert stores["obj_obj_dilate@initial"] == ["epoch-0000.objcrop"]
    assert stores["obj_obj_dilate@online"] == ["epoch-0001.objcrop", "epoch-0002.objcrop"]
    assert stores["obj_obj_dilate@online_no_warmup"] == [
        "epoch-0000.objcrop", "epoch-0001.objcrop", "epoch-0002.objcrop"]
    first = ProposalStore(run_dir(out, "obj_obj_dilate@initial") / "proposals" /
                          "epoch-0000.objcrop")
    assert first.meta["online"] is True and len(first) > 0
    assert all(math.isfinite(res["runs"][n]["map"]) for n in res["runs"])
