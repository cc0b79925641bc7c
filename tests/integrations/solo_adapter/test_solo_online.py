"""Online proposals in ``objcrop-solo`` (``crop.proposals``): the recipe keys, the planner
following the refreshed stores in DataLoader workers, and whole solo-learn runs that refresh,
checkpoint and resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm_python
from solo_testing import (
    RECIPES,
    H,
    W,
    compose_recipe,
    make_cfg,
    make_entry,
    object_of,
    scene_boxes,
    solo_like_pipeline,
)
from torchvision.datasets import ImageFolder

from objcrop_plugin.integrations.solo.datasets import ObjectAwareSoloDataset
from objcrop_plugin.proposals import ProposalStore
from objcrop_plugin.proposals.online import OnlineSchedule, OnlineSettings
from objcrop_plugin.solo import ObjectAwareTransform, SoloConfigError, parse_object_aware

OBJ = [make_entry("object_aware"), make_entry("object_aware")]


def online_cfg(crop, epochs=20, **data):
    cfg = make_cfg(OBJ, **data)
    cfg["crop"], cfg["max_epochs"] = crop, epochs
    return cfg


def test_recipe_keys_and_their_defaults(scenes):
    plan = parse_object_aware(online_cfg({"proposals": "online"}))  # no store: no error
    assert plan.online == OnlineSettings("heatmap", 0, 2, {})  # the generator's top 10
    assert plan.proposals is None and plan.proposals_dir is None
    # a store of the recipe is the warm-up's: a tenth of the epochs by default
    store = str(scenes / "train.objcrop")
    plan = parse_object_aware(online_cfg({"proposals": "online", "top_k": 3,
                                          "proposals_dir": "runs/boxes"}, proposals=store))
    assert plan.online == OnlineSettings("heatmap", 2, 2, {"top_k": 3})
    assert plan.proposals_dir == Path.cwd() / "runs" / "boxes"
    plan = parse_object_aware(online_cfg({"proposals": {"warmup_epochs": 1, "every_epochs": 0,
                                                        "params": {"scale": 2}}}))
    assert plan.online == OnlineSettings("heatmap", 1, 0, {"scale": 2})
    assert parse_object_aware(online_cfg({"proposals": "initial"})).online.every_epochs == 0
    assert parse_object_aware(make_cfg(OBJ, proposals=store)).online is None


@pytest.mark.parametrize("crop, data, message", [
    ({"proposals": "onlin"}, {}, r"crop.proposals: 'onlin' is not a mode"),
    ({"proposals": {"method": "bing"}}, {}, r"crop.proposals.method: 'bing' cannot run"),
    ({"proposals": {"params": {"model": "resnet50"}}}, {},
     r"crop.proposals.params.model: .*backbone.kwargs.model_name"),
    ({"proposals": {"params": {"device": "cuda"}}}, {}, r"params.device: .*\(accelerator\)"),
    ({"proposals": {"warmup_epochs": 20}}, {}, r"warmup_epochs \(20\) must be below max_epochs"),
    ({"proposals": {"every_epochs": -1}}, {}, r"every_epochs must be an integer >= 0"),
    ({"proposals_dir": "boxes"}, {}, r"crop.proposals_dir: .*crop.proposals is not set"),
    ({"proposals": "online"}, {"sampling": "per_box"},
     r"data.sampling: per_box .*online proposals .*Fix"),
])
def test_recipe_errors_name_the_key_and_the_fix(scenes, crop, data, message):
    if data.get("sampling") == "per_box":
        data = {**data, "proposals": str(scenes / "train.objcrop")}
    with pytest.raises(SoloConfigError, match=message):
        parse_object_aware(online_cfg(crop, **data))


def test_online_needs_object_aware_entries_an_epoch_count_and_a_timm_backbone():
    cfg = make_cfg([make_entry(None)])
    cfg["crop"], cfg["max_epochs"] = {"proposals": "online"}, 10
    with pytest.raises(SoloConfigError, match="no augmentations entry has 'crop: object_aware'"):
        parse_object_aware(cfg)
    with pytest.raises(SoloConfigError, match="max_epochs: .*need max_epochs >= 1"):
        parse_object_aware(online_cfg({"proposals": "online"}, epochs=None))
    cfg = online_cfg({"proposals": "online"})
    cfg["backbone"] = {"name": "resnet50"}
    with pytest.raises(SoloConfigError, match=r"backbone.name: .*Fix: backbone.name=timm "
                                              r"\+\+backbone.kwargs.model_name=resnet50"):
        parse_object_aware(cfg)
    cfg["backbone"] = {"name": "timm", "kwargs": {"model_name": "resnet50"}}
    assert parse_object_aware(cfg).online is not None


def test_the_shipped_online_recipe_parses_to_online_boxes_on_a_timm_resnet50():
    """``mocov2plus_online.yaml``: ``mocov2plus.yaml`` with no store, ``crop.proposals:
    online`` and a timm backbone, so the run needs no proposal stage."""
    cfg = compose_recipe("mocov2plus_online.yaml")
    assert cfg.backbone.name == "timm" and cfg.backbone.kwargs.model_name == "resnet50"
    assert cfg.method == "mocov2plus" and cfg.max_epochs == 200
    plan = parse_object_aware(cfg, check_paths=False)
    # the initial weights' boxes, refreshed every tenth of the 200 epochs, 10 boxes kept
    assert plan.online == OnlineSettings("heatmap", 0, 20, {"top_k": 10})
    assert plan.proposals is None
    assert [e.object_aware for e in plan.entries] == [True, True]
    plan = parse_object_aware(compose_recipe("mocov2plus_online.yaml",
                                             "++crop.proposals.params.max_side=256"),
                              check_paths=False)
    assert plan.online.params == {"max_side": 256, "top_k": 10}


def test_workers_follow_the_schedule_from_scene_crops_to_each_refreshed_store(scenes, tmp_path):
    """A warm-up without a store gives scene crops (not fallbacks); then each epoch's views
    come from the store its refresh wrote, in DataLoader workers too (set in the main
    process): the red box's store for epochs 1-2, the green box's from epoch 3."""
    root = scenes / "train"
    base = ImageFolder(str(root))
    keys = [os.path.relpath(p, root) for p, _ in base.samples]
    schedule = OnlineSchedule(str(tmp_path / "proposals"), 1, 2)
    for epoch, which in ((1, 0), (3, 1)):  # the red box's store, then the green box's
        records = [(k, [scene_boxes(int(k.split("/")[1][:3]) % 4)[which]], [1.0], (W, H))
                   for k in keys]
        ProposalStore.write(schedule.store_path(epoch), records)
    plan = parse_object_aware(online_cfg({"proposals": {"warmup_epochs": 1, "every_epochs": 2}},
                                         train_path=str(root)))
    transform = ObjectAwareTransform(plan, [solo_like_pipeline(64), solo_like_pipeline(64)])
    transform.planner.schedule = schedule
    dataset = ObjectAwareSoloDataset(base, transform, root)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1,
                                         persistent_workers=True)
    seen = {}
    for epoch in range(4):
        dataset.set_epoch(epoch)
        views = [v for _, vs, _ in loader for v in vs]
        if epoch == 0:
            assert all(v.shape[0] == 4 for v in views)
            continue
        seen[epoch] = {object_of(v[i]) for v in views for i in range(len(v))}
    assert seen == {1: {"red"}, 2: {"red"}, 3: {"green"}}
    counts = transform.recipe.fallbacks.as_dict()
    assert counts["samples"] == 4 * len(base) and transform.recipe.fallbacks.fallbacks == 0
    assert transform.planner.warmup.as_dict()["samples"] == len(base)  # epoch 0's


def _solo(cwd, *overrides, timeout=300, ddp=False):
    """objcrop-solo's main in a process forked from one that has imported solo-learn; with
    ``ddp``, the console script in a fresh interpreter (Lightning starts the other ranks as
    ``python sys.argv[0] ...``)."""
    command = shutil.which("objcrop-solo") if ddp else None
    command = [command] if command else [sys.executable, "-m", "objcrop_plugin.solo"]
    run = subprocess.run if ddp else warm_python.shared("solo").run
    kwargs = {"capture_output": True, "text": True} if ddp else {}
    return run(
        [*command, "--config-path", str(RECIPES), "--config-name", "demo_cpu.yaml",
         "optimizer.batch_size=4", "data.num_workers=1", "backbone.kwargs.model_name=test_resnet",
         "++enable_progress_bar=False", "data.proposals=null", "checkpoint.dir=ck",
         "++checkpoint.keep_prev=True", "++crop.proposals.every_epochs=1",
         "++crop.proposals.params.scale=2", *overrides],
        cwd=cwd, timeout=timeout, **kwargs,
    )


def _refreshes(stderr):
    return [line for line in stderr.splitlines() if "online proposals (heatmap) before" in line]


def test_a_solo_run_refreshes_checkpoints_and_resumes(solo_root, tmp_path):
    """objcrop-solo with crop.proposals: every epoch's views come from boxes the network being
    trained proposed (no store in the recipe, no scene crop); each refresh is written before
    solo-learn's checkpoint of its epoch and recorded in it; a fresh run refuses to replace
    the stores; a resumed run makes only the refreshes still due, and refuses a changed store."""
    pytest.importorskip("cv2", reason="the heatmap generator needs OpenCV (proposals extra)")
    from objcrop_plugin.data.synthetic import write_dataset

    write_dataset(tmp_path / "datasets" / "objcrop-demo", n_images=16, size=(128, 96))
    first = _solo(tmp_path, "max_epochs=2")
    assert first.returncode == 0, first.stderr[-6000:]
    assert [line.split(" before ")[1][:7] for line in _refreshes(first.stderr)] == [
        "epoch 1", "epoch 2"]
    # 16 images x 2 epochs, every sample cut from the refreshed boxes
    assert "objcrop: 32 samples, 32 cropped from proposals, 0 fell back" in first.stderr
    (folder,) = (tmp_path / "ck" / "simclr" / "objcrop-proposals").iterdir()
    stores = sorted(p.name for p in folder.glob("*.objcrop"))
    assert stores == ["epoch-0000.objcrop", "epoch-0001.objcrop"]
    assert ProposalStore(folder / stores[0]).meta["online"] is True
    ckpts = sorted((tmp_path / "ck" / "simclr").rglob("*.ckpt"))
    assert [c.name.rsplit("-", 1)[1] for c in ckpts] == ["ep=0.ckpt", "ep=1.ckpt"]
    state = torch.load(ckpts[0], weights_only=False)["callbacks"]
    (made,) = [v["made"] for k, v in state.items() if "OnlineProposals" in k]
    assert sorted(made) == ["0", "1"]  # epoch 2's refresh came before epoch 1's checkpoint

    again = _solo(tmp_path, "max_epochs=2")
    assert again.returncode == 2
    assert "crop.proposals_dir: " in again.stderr and "would replace them. Fix:" in again.stderr

    resume = f'++resume_from_checkpoint="{ckpts[-1]}"'
    more = _solo(tmp_path, "max_epochs=3", resume)
    assert more.returncode == 0, more.stderr[-6000:]
    assert [line.split(" before ")[1][:7] for line in _refreshes(more.stderr)] == ["epoch 3"]
    assert sorted(p.name for p in folder.glob("*.objcrop"))[-1] == "epoch-0002.objcrop"

    # resumed after epoch 1, whose checkpoint recorded epoch 2's store: that store, changed,
    # is refused
    (folder / "epoch-0001.objcrop").write_bytes((folder / "epoch-0000.objcrop").read_bytes())
    changed = _solo(tmp_path, "max_epochs=3", f'++resume_from_checkpoint="{ckpts[0]}"')
    assert changed.returncode == 2
    assert "epoch-0001.objcrop that the checkpoint was saved with" in changed.stderr
    assert "missing or changed. Fix:" in changed.stderr


def test_a_warm_up_on_scene_crops_is_reported_as_such(solo_root, tmp_path):
    pytest.importorskip("cv2", reason="the heatmap generator needs OpenCV (proposals extra)")
    from objcrop_plugin.data.synthetic import write_dataset

    write_dataset(tmp_path / "datasets" / "objcrop-demo", n_images=16, size=(128, 96))
    run = _solo(tmp_path, "max_epochs=2", "++crop.proposals.warmup_epochs=1",
                "checkpoint.enabled=False", "++crop.proposals_dir=boxes")
    assert run.returncode == 0, run.stderr[-6000:]
    assert [line.split(" before ")[1][:7] for line in _refreshes(run.stderr)] == ["epoch 2"]
    assert ("objcrop: 32 samples (16 of them in the warm-up, scene crops), 16 cropped from "
            "proposals, 0 fell back") in run.stderr
    assert [p.name for p in (tmp_path / "boxes").iterdir()] == ["epoch-0001.objcrop"]
    # no checkpoint can record these stores: the same command runs again and replaces them
    again = _solo(tmp_path, "max_epochs=2", "++crop.proposals.warmup_epochs=1",
                  "checkpoint.enabled=False", "++crop.proposals_dir=boxes")
    assert again.returncode == 0, again.stderr[-6000:]
    assert "holds online proposals that no checkpoint records (epoch-0001.objcrop" in again.stderr
    assert len(_refreshes(again.stderr)) == 1


def test_a_fresh_run_replaces_only_stores_that_no_checkpoint_can_record(tmp_path):
    """A run stopped before its first checkpoint leaves stores (and a DDP refresh's shards)
    that nothing can resume: a fresh run replaces them. A checkpoint saved after the first
    store may record them: a fresh run refuses (the real run: the test above)."""
    from objcrop_plugin.integrations.solo.patch import OnlineRun, _earlier_run

    folder, checkpoints = tmp_path / "ck" / "simclr" / "objcrop-proposals" / "x", tmp_path / "ck"
    run = OnlineRun(OnlineSettings("heatmap", 0, 1, {}), OnlineSchedule(str(folder), 0, 1),
                    "timm test_resnet", 0, str(checkpoints / "simclr"))
    assert _earlier_run(run) == ([], [])
    folder.mkdir(parents=True)
    for name in ("epoch-0000.objcrop", "epoch-0001.shard-00000-of-00002.objcrop"):
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (1000, 1000))
    old = checkpoints / "simclr" / "abc" / "simclr-ep=0.ckpt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    os.utime(old, (999, 999))  # an earlier run's, saved before these stores
    assert _earlier_run(run) == (["epoch-0000.objcrop"], [])
    os.utime(old, (1001, 1001))
    assert _earlier_run(run) == (["epoch-0000.objcrop"], [str(old)])
    run.checkpoints = None  # checkpoint.enabled=False
    assert _earlier_run(run)[1] == []


def test_ddp_ranks_refresh_their_shares_into_one_store(solo_root, tmp_path):
    """Two DDP ranks (gloo on the CPU): each computes half of the images, rank 0 merges them
    into one store (reported once, for all 16 images) that both ranks crop from."""
    pytest.importorskip("cv2", reason="the heatmap generator needs OpenCV (proposals extra)")
    from objcrop_plugin.data.synthetic import write_dataset

    write_dataset(tmp_path / "datasets" / "objcrop-demo", n_images=16, size=(128, 96))
    run = _solo(tmp_path, "max_epochs=2", "optimizer.batch_size=2", "data.num_workers=0",
                "checkpoint.enabled=False", "++devices=2", "++strategy=ddp", ddp=True)
    assert run.returncode == 0, run.stderr[-6000:]
    lines = _refreshes(run.stderr)
    assert len(lines) == 2 and all(": 16 images, 160 boxes, 0 without any" in ln for ln in lines)
    # each rank: its 8 images in each of the 2 epochs, all cut from the merged stores
    assert run.stderr.count("objcrop: 16 samples, 16 cropped from proposals, 0 fell back") == 2
    (folder,) = (tmp_path / "ck" / "simclr" / "objcrop-proposals").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0000.objcrop", "epoch-0001.objcrop"]
    assert len(ProposalStore(folder / "epoch-0001.objcrop")) == 16
