"""Online proposals in ``objcrop train``: the recipe key, the schedule, the datasets following
it, a run, kill -9 during a refresh (exact resume) and DDP; and ``crop.jitter``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import warm_python
import yaml

pytest.importorskip("lightly")
pytest.importorskip("pytorch_lightning")
pytest.importorskip("cv2", reason="the heatmap generator needs OpenCV (proposals extra)")
pytest.importorskip("timm")

from objcrop_plugin.data.synthetic import write_dataset  # noqa: E402
from objcrop_plugin.proposals import ProposalStore  # noqa: E402
from objcrop_plugin.train import RecipeError, load_recipe, train  # noqa: E402
from objcrop_plugin.train.online import OnlineSchedule, parse_online  # noqa: E402
from objcrop_plugin.train.runner import build_dataset  # noqa: E402

ONLINE = {"warmup_epochs": 1, "every_epochs": 1, "params": {"scale": 2, "max_side": 96}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("online_data"), 24, size=(96, 72), seed=5,
                         workers=1)


def recipe(tmp_path, ds, name="r.yaml", **sections):
    raw = {
        "data": {"train_path": str(ds.root), "num_workers": 0},
        "crop": {"type": "object_aware", "views": "obj_obj_dilate", "size": 32,
                 "proposals": ONLINE},
        "method": {"name": "mocov2", "params": {"memory_bank_size": 64, "proj_hidden_dim": 64,
                                                "proj_dim": 32}},
        "backbone": {"name": "test_efficientnet"},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "trainer": {"epochs": 3, "batch_size": 8, "accelerator": "cpu", "devices": 1,
                    "out_dir": str(tmp_path / "run"), "progress_bar": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_recipe_key_override_and_errors(tmp_path, data):
    path = recipe(tmp_path, data, crop={"proposals": None})
    with pytest.raises(RecipeError, match="data.proposals is not set"):
        load_recipe(path)
    cfg = load_recipe(path, ["crop.proposals=online"])  # no store: no warm-up
    s = parse_online(cfg)
    assert (s.method, s.warmup_epochs, s.every_epochs) == ("heatmap", 0, 1)  # a tenth, >= 1
    s = parse_online(load_recipe(path, ["crop.proposals=online", "trainer.epochs=200"]))
    assert (s.warmup_epochs, s.every_epochs) == (0, 20)
    # with a store, the warm-up trains on it first: a tenth of the epochs
    store = tmp_path / "given.objcrop"
    ProposalStore.write(store, [])
    s = parse_online(load_recipe(path, ["crop.proposals=online", "trainer.epochs=200",
                                        f"data.proposals={store}"]))
    assert (s.warmup_epochs, s.every_epochs) == (20, 20)
    # initial: one store from the initial weights for the whole run (no refresh)
    s = parse_online(load_recipe(path, ["crop.proposals=initial", "trainer.epochs=200"]))
    assert (s.method, s.warmup_epochs, s.every_epochs) == ("heatmap", 0, 0)
    schedule = OnlineSchedule("/o", s.warmup_epochs, s.every_epochs)
    assert {schedule.path_for(e) for e in range(200)} == {"/o/epoch-0000.objcrop"}
    # one key of the mapping a mode stands for
    s = parse_online(load_recipe(path, ["crop.proposals=online", "crop.proposals.warmup_epochs=0"]))
    assert (s.warmup_epochs, s.every_epochs) == (0, 1)
    s = parse_online(load_recipe(path, ["crop.proposals=initial",
                                        "crop.proposals.params.max_side=64"]))
    assert (s.warmup_epochs, s.every_epochs, s.params) == (0, 0, {"max_side": 64})
    # every_epochs 0: the first refresh's store for the rest of the run
    s = parse_online(load_recipe(path, ["crop.proposals={warmup_epochs: 2, every_epochs: 0}",
                                        "trainer.epochs=10"]))
    assert [OnlineSchedule("/o", 2, 0).refresh_epoch(e) for e in range(5)] == [None, None, 2, 2, 2]
    assert "top_k" not in s.params  # the generator's default, as the views' (10)
    # the store keeps as many boxes as the views draw from; an explicit value wins
    s = parse_online(load_recipe(path, ["crop.proposals=online", "crop.params.top_k=20"]))
    assert s.params["top_k"] == 20
    s = parse_online(load_recipe(path, ["crop.proposals={params: {top_k: 30}}",
                                        "crop.params.top_k=20"]))
    assert s.params["top_k"] == 30
    cases = {
        "crop.proposals=fixed": "not a mode",
        "crop.proposals.every=3": "unknown key",
        "crop.proposals.method=bing": "cannot run on the model being trained",
        "crop.proposals.every_epochs=-1": "every_epochs must be an integer >= 0",
        "crop.proposals.warmup_epochs=-1": "warmup_epochs must be an integer >= 0",
        "crop.proposals.warmup_epochs=3": "must be below trainer.epochs",
        "crop.proposals.params.checkpoint=x.pth": "use the backbone being trained",
        "crop.proposals.params.device=cuda": "trainer.accelerator",
        "crop.proposals.params.thresholds=[2]": "thresholds",
        "crop.proposals.params.level_of=2": "unknown parameter",
    }
    for override, message in cases.items():
        with pytest.raises(RecipeError, match=message):
            load_recipe(recipe(tmp_path, data), [override])
    # the default warm-up on a given store (a tenth, at least 1) of a 1-epoch run: say so,
    # and the fix; without a store there is no warm-up to outlast the run
    with pytest.raises(RecipeError, match=r"\(1 \(its default with data.proposals.*Fix: "
                       r"crop.proposals=initial"):
        load_recipe(path, ["crop.proposals=online", "trainer.epochs=1", f"data.proposals={store}"])
    assert parse_online(load_recipe(path, ["crop.proposals=online", "trainer.epochs=1"])) == \
        parse_online(load_recipe(path, ["crop.proposals={every_epochs: 1}", "trainer.epochs=1"]))
    with pytest.raises(RecipeError, match="crop.proposals is 'fixed', not a mode"):
        load_recipe(path, ["crop.proposals=fixed", "crop.proposals.warmup_epochs=0"])


def test_schedule():
    s = OnlineSchedule("/o/proposals", warmup_epochs=3, every_epochs=2, initial="/d/gt.objcrop")
    assert [s.refresh_epoch(e) for e in range(8)] == [None, None, None, 3, 3, 5, 5, 7]
    assert s.path_for(0) == "/d/gt.objcrop" and s.path_for(4) == "/o/proposals/epoch-0003.objcrop"
    assert OnlineSchedule("/o", 0, 1).path_for(0) == "/o/epoch-0000.objcrop"
    # every_epochs past the run's end: the initial weights' boxes serve the whole run
    fixed = OnlineSchedule("/o", 0, 100)
    assert {fixed.path_for(e) for e in range(25)} == {"/o/epoch-0000.objcrop"}
    assert [e for e in range(1, 25) if fixed.refresh_epoch(e) == e] == []


def test_dataset_follows_the_schedule(tmp_path, data):
    """Warm-up without a store: scene crops, not counted as fallbacks; from the refresh on,
    crops from the epoch's store (opened by whichever process makes the item)."""
    cfg = load_recipe(recipe(tmp_path, data))
    ds = build_dataset(cfg)
    assert ds.store is None and ds.engine.recipe.scene_only
    ds.set_epoch(0)
    views, _, _ = ds[0]
    assert len(views) == 2 and ds.engine.recipe.fallbacks.as_dict()["missing"] == 0
    ds.set_epoch(1)  # the store is opened with the epoch's first item, not before
    with pytest.raises(FileNotFoundError, match="epoch-0001.objcrop"):
        ds[0]
    key = ds.keys[0]
    store_dir = tmp_path / "run" / "proposals"
    store_dir.mkdir(parents=True)
    ProposalStore.write(store_dir / "epoch-0001.objcrop",
                        [(key, np.array([[10, 10, 40, 30]], np.float32), np.ones(1, np.float32),
                          (96, 72))])
    ds[1]
    assert str(ds.store.path) == str(store_dir / "epoch-0001.objcrop")
    assert not ds.engine.recipe.scene_only
    windows = ds.engine.windows((96, 72), lambda _s: ds.store.get(key), np.random.default_rng(0))
    assert sorted(w.policy for w in windows) == ["object", "object_dilated"]
    x1, y1, x2, y2 = next(w for w in windows if w.policy == "object").box
    assert x1 >= 10 - 1e-6 and y1 >= 10 - 1e-6 and x2 <= 40 + 1e-6 and y2 <= 30 + 1e-6


def test_a_run_refreshes_from_its_momentum_encoder(tmp_path, data, monkeypatch):
    from objcrop_plugin.train import online

    seen = []
    network = online._network

    def spied(module):
        net = network(module)
        seen.append(net is module.backbone_momentum and net is not module.backbone)
        return net

    monkeypatch.setattr(online, "_network", spied)
    res = train(load_recipe(recipe(tmp_path, data)), echo=lambda s: None)
    assert len(seen) >= 2 and all(seen)  # the refreshes ran MoCo-v2's momentum encoder
    refreshes = res["online_proposals"]
    assert [r["epoch"] for r in refreshes] == [1, 2]
    assert all(r["images"] == 24 and r["boxes"] > 0 for r in refreshes)
    stores = sorted((tmp_path / "run" / "proposals").iterdir())
    assert [p.name for p in stores] == ["epoch-0001.objcrop", "epoch-0002.objcrop"]
    assert ProposalStore(stores[0]).meta["online"] is True
    assert res["fallbacks"]["missing"] == 0 and res["fallbacks"]["samples"] == 3 * 24
    # the checkpoint names the stores made so far
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    state = [v for k, v in ckpt["callbacks"].items() if "OnlineProposals" in k]
    assert state and sorted(state[0]["made"]) == ["1", "2"]


def test_no_warm_up_boxes_from_the_initial_weights(tmp_path, data):
    """warmup_epochs 0: the first store is computed before epoch 1 (from the initial weights),
    so no view of the run is a scene crop, and it is the same store as a fresh run computes."""
    online = {**ONLINE, "warmup_epochs": 0, "every_epochs": 2}
    lines: list[str] = []
    # a worker process: Lightning starts the workers before its on_train_start hook
    res = train(load_recipe(recipe(tmp_path, data, crop={"proposals": online},
                                   data={"num_workers": 1})), echo=lines.append)
    assert [r["epoch"] for r in res["online_proposals"]] == [0, 2]
    assert [x for x in lines if "online proposals" in x][0].startswith(
        "  online proposals (heatmap) before epoch 1: 24 images")
    stores = sorted(p.name for p in (tmp_path / "run" / "proposals").iterdir())
    assert stores == ["epoch-0000.objcrop", "epoch-0002.objcrop"]
    assert res["fallbacks"]["missing"] == 0 and res["fallbacks"]["samples"] == 3 * 24
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    state = [v for k, v in ckpt["callbacks"].items() if "OnlineProposals" in k]
    assert sorted(state[0]["made"]) == ["0", "2"]
    # the initial weights' store equals one computed from the same initialisation afresh
    first = (tmp_path / "run" / "proposals" / "epoch-0000.objcrop").read_bytes()
    again = train(load_recipe(recipe(tmp_path, data, crop={"proposals": online},
                                     trainer={"epochs": 1, "out_dir": str(tmp_path / "b")})),
                  echo=lambda s: None)
    assert [r["epoch"] for r in again["online_proposals"]] == [0]
    assert (tmp_path / "b" / "proposals" / "epoch-0000.objcrop").read_bytes() == first


def test_a_refresh_changes_nothing_but_the_boxes(tmp_path, data, monkeypatch):
    """A run refreshed every epoch whose refreshes are made to write the first store's boxes
    again must end with the same weights as a run that keeps the first store: computing a
    refresh (the trained network in eval mode, its DataLoader, its random draws) leaves the
    training untouched, so refreshed and fixed runs differ by their boxes alone. Drop path
    makes the training draw from torch's global generator, and the exported weights hold the
    batch-norm statistics."""
    import shutil

    import objcrop_plugin.proposals.online as online_module  # where the callback calls it

    def weights(name: str, every: int) -> dict[str, torch.Tensor]:
        online = {**ONLINE, "warmup_epochs": 0, "every_epochs": every}
        out = tmp_path / name
        res = train(load_recipe(recipe(
            tmp_path, data, name=f"{name}.yaml", crop={"proposals": online},
            data={"num_workers": 1}, trainer={"out_dir": str(out)}, method={"name": "simclr",
                                                                     "params": {}},
            backbone={"name": "test_resnet", "kwargs": {"drop_path_rate": 0.2}})),
            echo=lambda s: None)
        assert [r["epoch"] for r in res["online_proposals"]] == ([0] if every > 3 else [0, 1, 2])
        return torch.load(out / "backbone.pth", weights_only=True)

    fixed = weights("fixed", 100)
    compute = online_module.refresh_proposals

    def same_boxes(network, settings, root, keys, out, **kw):
        stats = compute(network, settings, root, keys, out, **kw)  # with all it does
        first = Path(out).parent / "epoch-0000.objcrop"
        if Path(out) != first:
            shutil.copyfile(first, out)
        return stats

    monkeypatch.setattr(online_module, "refresh_proposals", same_boxes)
    refreshed = weights("refreshed", 1)
    assert fixed.keys() == refreshed.keys()
    assert all(torch.equal(fixed[k], refreshed[k]) for k in fixed)


def test_an_unreadable_image_is_counted_not_fatal(tmp_path, data):
    """A JPEG that cannot be decoded: the refreshes leave it out of their stores and say so,
    the run skips it as any other and finishes."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data.root, root)
    (root / "images" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    lines: list[str] = []
    cfg = load_recipe(recipe(tmp_path, data, data={"train_path": str(root),
                                                   "max_failure_rate": 0.1}))
    res = train(cfg, echo=lines.append)
    assert [(r["images"], r["failures"]) for r in res["online_proposals"]] == [(25, 1), (25, 1)]
    refresh_lines = [x for x in lines if "online proposals" in x]
    assert len(refresh_lines) == 2
    assert all("1 not proposed" in x and "images/zz_corrupt.jpg: " in x for x in refresh_lines)
    for store in sorted((tmp_path / "run" / "proposals").glob("*.objcrop")):
        s = ProposalStore(store)
        assert len(s) == 24 and "images/zz_corrupt.jpg" not in s
        listed = Path(f"{store}.failures.tsv").read_text().splitlines()
        assert listed[0] == "key\treason" and listed[1].startswith("images/zz_corrupt.jpg\t")
    rows = (tmp_path / "run" / "bad_images.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == ["images/zz_corrupt.jpg"]


@pytest.mark.parametrize("every_n_steps", [0, 3])
def test_kill_9_during_a_refresh_resumes_to_the_same_weights(tmp_path, data, kill_and_resume,
                                                             every_n_steps):
    """The refresh at the end of epoch 2 runs at 8x (seconds, while an epoch takes a fraction
    of one): the kill lands in it; the rerun resumes from epoch 1's checkpoint, trains epoch 2
    again, refreshes from the same weights and ends as an uninterrupted run. With a step
    checkpoint on each epoch's last batch (3 steps an epoch), taken before the refresh, the
    rerun resumes in epoch 3 and makes the refresh from that checkpoint's weights first."""
    online = {**ONLINE, "params": {"scale": 8, "max_side": 96}}
    path = recipe(tmp_path, data, data={"num_workers": 1}, crop={"proposals": online},
                  trainer={"epochs": 4, "checkpoint_every_n_steps": every_n_steps})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "objcrop_plugin.cli", "train", str(path)]
    done, res = kill_and_resume(cmd, out, tmp_path / "ref", kill_when="epoch 2/4 loss")
    assert "resuming from" in done.stdout
    assert ("epoch 2/4" in done.stdout) == (every_n_steps == 0)  # epoch 2 again, or not
    assert "online proposals (heatmap) before epoch 3" in done.stdout
    assert res["epochs"] == 4
    a = torch.load(tmp_path / "ref" / "backbone.pth", weights_only=True)
    b = torch.load(out / "backbone.pth", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("epoch-0001.objcrop", "epoch-0002.objcrop", "epoch-0003.objcrop"):
        assert (out / "proposals" / name).read_bytes() == (
            tmp_path / "ref" / "proposals" / name).read_bytes()


def test_a_finished_run_reruns_and_extends(tmp_path, data):
    """Rerunning a finished run trains nothing and asks for no store; extending it computes
    the refresh its last epoch skipped, from the checkpoint's weights, before going on. A run
    whose default schedule changes with trainer.epochs is refused where the trained epochs
    would have been served otherwise, with the override that keeps it."""
    path = recipe(tmp_path, data, crop={"proposals": "online"}, trainer={"epochs": 2})
    first = train(load_recipe(path), echo=lambda s: None)  # no warm-up, every 1 (a tenth)
    assert [r["epoch"] for r in first["online_proposals"]] == [0, 1]
    lines: list[str] = []
    again = train(load_recipe(path), echo=lines.append)
    # no refresh made; results.json keeps the run's own
    assert not any("online proposals" in x for x in lines)
    assert again["resumed_from"] and again["steps"] == 6
    assert again["online_proposals"] == first["online_proposals"]
    with pytest.raises(RecipeError, match=r"first 2 epochs with a warm-up of 0 and a refresh "
                       r"every 1 epochs; the recipe now gives 0 and 3.*Fix: crop.proposals."
                       r"warmup_epochs=0 crop.proposals.every_epochs=1"):
        train(load_recipe(path, ["trainer.epochs=30"]), echo=lambda s: None)
    lines = []
    more = train(load_recipe(path, ["trainer.epochs=3", "crop.proposals.every_epochs=1"]),
                 echo=lines.append)
    assert [r["epoch"] for r in more["online_proposals"]] == [2]
    assert any("before epoch 3: 24 images" in x for x in lines) and more["steps"] == 9
    assert more["fallbacks"]["missing"] == 0
    stores = sorted(p.name for p in (tmp_path / "run" / "proposals").glob("*.objcrop"))
    assert stores == ["epoch-0000.objcrop", "epoch-0001.objcrop", "epoch-0002.objcrop"]
    # `initial`: one store, never refreshed, however long the run becomes
    out = str(tmp_path / "initial")
    train(load_recipe(path, ["crop.proposals=initial", f"trainer.out_dir={out}"]),
          echo=lambda s: None)
    longer = train(load_recipe(path, ["crop.proposals=initial", f"trainer.out_dir={out}",
                                      "trainer.epochs=3"]), echo=lambda s: None)
    assert longer["online_proposals"] == [] and longer["steps"] == 9


def test_generator_and_backbone_checked_before_training(tmp_path, data):
    path = recipe(tmp_path, data, crop={"proposals": {**ONLINE, "method": "token_cut",
                                                      "params": {}}})
    with pytest.raises(RecipeError, match=r"token_cut generator cannot run on the backbone "
                       r"being trained \(test_efficientnet\).*Fix: change crop.proposals.params "
                       r"or backbone.name, or crop.proposals.method=heatmap"):
        train(load_recipe(path), echo=lambda s: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_without_an_epoch_limit_refreshes(tmp_path, data):
    """trainer.epochs -1 with max_steps: the refreshes follow the schedule; none is made after
    the last step."""
    res = train(load_recipe(recipe(tmp_path, data, trainer={"epochs": -1, "max_steps": 6})),
                echo=lambda s: None)
    assert [r["epoch"] for r in res["online_proposals"]] == [1] and res["steps"] == 6


@pytest.mark.parametrize("warmup", [1, 0])
def test_ddp_ranks_share_one_merged_store(tmp_path, data, warmup):
    """warmup 0: the first refresh runs before training (Lightning's setup hook), where the
    process group already exists."""
    path = recipe(tmp_path, data, trainer={"devices": 2, "strategy": "ddp", "epochs": 2},
                  crop={"proposals": {**ONLINE, "warmup_epochs": warmup, "every_epochs": 2}})
    done = warm_python.shared("objcrop").run(
        [sys.executable, "-m", "objcrop_plugin.cli", "train", str(path)],
        timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"online proposals (heatmap) before epoch {warmup + 1}") == 1
    files = sorted(p.name for p in (tmp_path / "run" / "proposals").iterdir())
    assert files == [f"epoch-000{warmup}.objcrop"]  # shards merged and removed
    store = ProposalStore(tmp_path / "run" / "proposals" / f"epoch-000{warmup}.objcrop")
    assert len(store) == 24
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["online_proposals"][0]["images"] == 24  # both ranks' shares


def test_two_nodes_of_one_process_each_share_one_merged_store(tmp_path, data):
    """`trainer.num_nodes: 2` as two launches (NODE_RANK 0 and 1) over one shared folder, as
    on two machines: each is its node's LOCAL_RANK 0, yet only the global rank 0 speaks,
    merges and writes the results; the other node's share is in every count."""
    import os
    import socket

    path = recipe(tmp_path, data, trainer={"devices": 1, "num_nodes": 2, "strategy": "ddp",
                                           "epochs": 2, "batch_size": 6},
                  crop={"proposals": {**ONLINE, "warmup_epochs": 1, "every_epochs": 2}})
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "objcrop_plugin.cli", "train", str(path)]
    warm = warm_python.shared("objcrop")
    nodes = [warm.popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                             "NODE_RANK": str(rank)})
             for rank in (1, 0)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    (out1, err1), (out0, err0) = outputs
    assert [node.returncode for node in nodes] == [0, 0], (err0 + err1)[-3000:]
    assert out1 == "" and out0.count("done in") == 1
    assert out0.count("online proposals (heatmap) before epoch 2: 24 images") == 1
    assert [p.name for p in (tmp_path / "run" / "proposals").iterdir()] == ["epoch-0001.objcrop"]
    assert len(ProposalStore(tmp_path / "run" / "proposals" / "epoch-0001.objcrop")) == 24
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    # each node takes 12 images an epoch: two steps of 6; the samples of both nodes counted
    assert res["steps"] == 4 and res["fallbacks"]["samples"] == 2 * 24
    assert res["online_proposals"][0]["images"] == 24


_RANK_1_FAILS = """
import os, sys
from objcrop_plugin.cli import main
from objcrop_plugin.proposals.store import ProposalStore
write = ProposalStore.write
def fails_on_rank_1(path, records, meta=None):
    if os.environ.get("LOCAL_RANK") == "1":
        raise OSError(28, "No space left on device", str(path))
    return write(path, records, meta)
ProposalStore.write = staticmethod(fails_on_rank_1)
sys.exit(main())
"""


def test_a_rank_that_fails_its_refresh_stops_every_rank(tmp_path, data):
    """One rank's refresh fails (a full disk): every rank stops with an error naming it,
    instead of the others waiting at the merge's barrier until the collective times out."""
    path = recipe(tmp_path, data, trainer={"devices": 2, "strategy": "ddp", "epochs": 2},
                  crop={"proposals": {**ONLINE, "warmup_epochs": 1, "every_epochs": 2}})
    script = tmp_path / "rank_1_fails.py"
    script.write_text(_RANK_1_FAILS)
    done = warm_python.shared("objcrop").run([sys.executable, str(script), "train", str(path)],
                                             timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert "failed on another rank (rank 1: OSError" in done.stderr, done.stderr[-3000:]
    assert "No space left on device" in done.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_fast_jitter_kernel_from_the_recipe(tmp_path, data):
    """`crop.jitter: fast` selects the fused colour kernel of the method's preset."""
    cfg = load_recipe(recipe(tmp_path, data), ["crop.jitter=fast"])
    assert build_dataset(cfg).engine.photometrics.name == "mocov2:fast"
    cfg = load_recipe(recipe(tmp_path, data), ["crop.jitter=fast", "crop.photometrics=byol"])
    assert build_dataset(cfg).engine.photometrics.name == "byol:fast"
    assert build_dataset(load_recipe(recipe(tmp_path, data))).engine.photometrics.name == "mocov2"
    with pytest.raises(RecipeError, match="crop.jitter"):
        load_recipe(recipe(tmp_path, data), ["crop.jitter=quick"])
