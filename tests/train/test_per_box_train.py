"""``objcrop train`` with ``data.sampling: per_box`` and ``data.epoch_length``: the steps of an
epoch, matched compute for the scene baseline, exact resume after a kill, DDP, recipe errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import warm_python

pytest.importorskip("lightly")
pytest.importorskip("pytorch_lightning")

from test_runner import SMALL_HEADS, recipe  # noqa: E402

from objcrop_plugin.data.synthetic import write_dataset  # noqa: E402
from objcrop_plugin.proposals import ProposalStore  # noqa: E402
from objcrop_plugin.train import RecipeError, load_recipe, train  # noqa: E402
from objcrop_plugin.train.config import parse_recipe  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("per_box_data"), 24, size=(96, 72), seed=3,
                         workers=1)


def n_boxes(ds, cap: int | None = None) -> int:
    """The boxes of the store, counted from the store itself (capped per image)."""
    store = ProposalStore(ds.proposals_path)
    counts = np.array([len(store.get(k).boxes) if k in store else 0 for k in ds.keys])
    return int(np.minimum(counts, cap).sum() if cap else counts.sum())


def test_a_per_box_epoch_visits_every_box_and_a_matched_scene_run_as_many(tmp_path, data):
    boxes = n_boxes(data)
    assert boxes > 2 * len(data.keys)  # several boxes per image: more steps than images
    lines: list[str] = []
    path = recipe(tmp_path, data, "box.yaml", data={"sampling": "per_box"})
    res = train(load_recipe(path), echo=lines.append)
    assert res["steps"] == boxes // 8 and res["epochs"] == 1
    assert res["samples_per_epoch"] == boxes
    assert res["fallbacks"]["samples"] == 8 * (boxes // 8) and res["fallbacks"]["unusable"] == 0
    assert f"on {boxes} boxes of 24 images (per_box)" in lines[0]
    scene = recipe(tmp_path, data, "scene.yaml", crop={"type": "scene", "views": "scene_scene"},
                   data={"epoch_length": "boxes"},
                   trainer={"out_dir": str(tmp_path / "scene")})
    matched = train(load_recipe(scene), echo=lambda s: None)
    assert matched["steps"] == res["steps"]  # matched compute
    assert matched["samples_per_epoch"] == boxes and matched["fallbacks"]["unusable"] == 0
    capped = train(load_recipe(scene, ["data.max_boxes_per_image=2",
                                       f"trainer.out_dir={tmp_path / 'capped'}"]),
                   echo=lambda s: None)
    assert capped["steps"] == n_boxes(data, 2) // 8 < res["steps"]


def test_a_killed_per_box_run_resumes_to_the_same_weights(tmp_path, data, kill_and_resume):
    path = recipe(tmp_path, data, "killed.yaml",
                  data={"sampling": "per_box", "max_boxes_per_image": 2},
                  method={"name": "mocov2", "params": SMALL_HEADS["mocov2"]},
                  trainer={"epochs": 2})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "objcrop_plugin.cli", "train", str(path)]
    _, res = kill_and_resume(cmd, out, tmp_path / "ref")
    assert res["resumed_from"] and res["epochs"] == 2
    assert res["steps"] == 2 * (n_boxes(data, 2) // 8)
    a = torch.load(tmp_path / "ref" / "backbone.pth", weights_only=True)
    b = torch.load(out / "backbone.pth", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_per_box_ddp_on_two_cpu_processes(tmp_path, data):
    path = recipe(tmp_path, data, data={"sampling": "per_box"},
                  trainer={"devices": 2, "strategy": "ddp", "epochs": 1})
    done = warm_python.shared("objcrop").run(
        [sys.executable, "-m", "objcrop_plugin.cli", "train", str(path)],
        timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["steps"] == n_boxes(data) // (2 * 8)  # each rank takes half the boxes


BASE = {"data": {"train_path": "imgs", "proposals": "p.objcrop"}}


@pytest.mark.parametrize("data, crop, match", [
    ({"sampling": "per_box", "proposals": None}, "scene",
     r"data\.sampling: per_box needs data\.proposals.*Fix"),
    ({"epoch_length": "boxes", "proposals": None}, "scene",
     r"data\.epoch_length: boxes needs data\.proposals"),
    ({"sampling": "per_box"}, {"type": "object_aware", "proposals": "online"},
     r"per_box needs a fixed proposal store, but crop\.proposals is online.*Fix"),
    ({"max_boxes_per_image": 3}, "object_aware",
     r"data\.max_boxes_per_image applies to data\.sampling: per_box and data\.epoch_length: "
     "boxes only"),
    ({"sampling": "per_box", "max_boxes_per_image": 0}, "object_aware",
     r"data\.max_boxes_per_image must be >= 1"),
    ({"epoch_length": 0}, "object_aware", r"data\.epoch_length must be"),
    ({"sampling": "per_box"}, {"type": "object_aware", "params": {"weighting": "rank"}},
     r"crop\.params\.weighting chooses among an image's boxes, but with data\.sampling: "
     r"per_box each sample is one box already\. Fix"),
    ({"sampling": "per_bbox"}, "object_aware", r"data\.sampling: expected one of 'per_image'"),
    ({"epoch_length": "box"}, "object_aware", r"data\.epoch_length: expected"),
])
def test_sampling_recipe_errors_name_the_key_and_the_fix(data, crop, match):
    raw = {"data": {**BASE["data"], **data}, "crop": crop}
    with pytest.raises(RecipeError, match=match):
        parse_recipe(raw)


def test_sampling_keys_parse():
    cfg = parse_recipe({"data": {**BASE["data"], "sampling": "per_box", "max_boxes_per_image": 12}})
    assert (cfg.data.sampling, cfg.data.max_boxes_per_image, cfg.data.epoch_length) == (
        "per_box", 12, "images")
    cfg = parse_recipe({**BASE, "crop": "scene", "data": {**BASE["data"], "epoch_length": 5000}})
    assert cfg.data.epoch_length == 5000


def test_a_run_saved_before_the_sampling_keys_resumes_and_a_changed_sampling_is_refused(tmp_path):
    import yaml

    from objcrop_plugin.train.config import save_recipe
    from objcrop_plugin.train.runner import _check_same_run

    cfg = parse_recipe(BASE)
    saved = tmp_path / "config.yaml"
    save_recipe(cfg, saved)
    raw = yaml.safe_load(saved.read_text())
    for key in ("sampling", "max_boxes_per_image", "epoch_length"):  # an older run's config
        del raw["data"][key]
    saved.write_text(yaml.safe_dump(raw))
    _check_same_run(cfg, saved)  # the defaults: the same run
    per_box = parse_recipe({"data": {**BASE["data"], "sampling": "per_box"}})
    with pytest.raises(RecipeError, match=r"differs in data\.sampling"):
        _check_same_run(per_box, saved)
