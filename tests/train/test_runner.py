"""``objcrop train``: the four methods, multi-crop, export, resume after a kill, errors."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import warm_python
import yaml

pytest.importorskip("lightly")
pytest.importorskip("pytorch_lightning")
timm = pytest.importorskip("timm")

from objcrop_plugin.data.synthetic import write_dataset  # noqa: E402
from objcrop_plugin.train import RecipeError, load_recipe, train  # noqa: E402
from objcrop_plugin.train.methods import METHODS  # noqa: E402

SMALL_HEADS = {
    "simclr": {"proj_dim": 32},
    "mocov2": {"memory_bank_size": 64, "proj_hidden_dim": 64, "proj_dim": 32},
    "byol": {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64},
    "vicreg": {"proj_hidden_dim": 64, "proj_dim": 64},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("train_data"), 24, size=(96, 72), seed=3,
                         workers=1)


def recipe(tmp_path: Path, ds, name: str = "r.yaml", **sections) -> Path:
    raw = {
        "data": {"train_path": str(ds.root), "proposals": str(ds.proposals_path),
                 "num_workers": 0},
        "crop": {"type": "object_aware", "views": "obj_obj_dilate", "size": 32},
        "method": {"name": "simclr", "params": SMALL_HEADS["simclr"]},
        "backbone": {"name": "test_efficientnet"},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "trainer": {"epochs": 1, "batch_size": 8, "accelerator": "cpu", "devices": 1,
                    "out_dir": str(tmp_path / "run"), "progress_bar": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_and_exports_a_timm_checkpoint(tmp_path, data, method, monkeypatch):
    from objcrop_plugin.train import runner

    init: dict[str, torch.Tensor] = {}
    build = runner.build_backbone

    def initial_weights_kept(cfg, multi_size=False):
        net = build(cfg, multi_size)
        init.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        return net

    monkeypatch.setattr(runner, "build_backbone", initial_weights_kept)
    path = recipe(tmp_path, data, method={"name": method, "params": SMALL_HEADS[method]},
                  trainer={"max_steps": 2, "epochs": 5})
    res = train(load_recipe(path), echo=lambda s: None)
    out = tmp_path / "run"
    assert res["steps"] == 2 and res["method"] == method
    assert res["final_loss"] is not None and math.isfinite(res["final_loss"])
    assert res["fallbacks"]["samples"] >= 16 and res["fallbacks"]["missing"] == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"]["name"] == method and saved["trainer"]["max_steps"] == 2
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert (out / "checkpoints" / "last.ckpt").is_file()
    # the exported weights load into a plain timm model and equal the trained backbone
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=0,
                            checkpoint_path=str(out / "backbone.pth"))
    state = torch.load(out / "backbone.pth", weights_only=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    # two steps moved the weights the run started from
    assert init.keys() == state.keys()
    assert any(not torch.equal(v, init[k]) for k, v in state.items() if v.is_floating_point())


@pytest.mark.parametrize("method", ["mocov2", "byol"])
def test_object_aware_multi_crop(tmp_path, data, method, monkeypatch):
    from objcrop_plugin.engine.datasets import ObjectCropDataset

    sizes = set()
    getitem = ObjectCropDataset.__getitem__

    def seen(self, i):
        item = getitem(self, i)
        sizes.add(tuple(tuple(v.shape) for v in item[0]))
        return item

    monkeypatch.setattr(ObjectCropDataset, "__getitem__", seen)
    path = recipe(
        tmp_path, data, method={"name": method, "params": SMALL_HEADS[method]},
        crop={"views": "multi_crop", "size": 32,
              "params": {"n_global": 2, "n_local": 3, "local_size": 16}},
        trainer={"max_steps": 2, "epochs": 5},
    )
    res = train(load_recipe(path), echo=lambda s: None)
    assert res["steps"] == 2 and math.isfinite(res["final_loss"])
    assert res["fallbacks"]["missing"] == 0
    # two global views of crop.size and three local ones of local_size, every sample
    assert sizes == {((3, 32, 32),) * 2 + ((3, 16, 16),) * 3}


def test_scene_crops_need_no_proposals_and_eval_runs(tmp_path, data):
    path = recipe(tmp_path, data, crop={"type": "scene", "views": "scene_scene"},
                  data={"proposals": None, "labels": str(data.labels_path)},
                  eval={"image_size": [72, 96], "probe": {"epochs": 5}})
    res = train(load_recipe(path), echo=lambda s: None)
    assert res["crop"] == "scene" and res["fallbacks"]["missing"] == 0
    assert 0 <= res["eval"]["probe_map"] <= 100 and 0 <= res["eval"]["knn_map"] <= 100
    assert res["eval"]["n_train"] + res["eval"]["n_test"] == 24


def _backbone_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "backbone.pth", weights_only=True)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, data, kill_and_resume):
    """SIGKILL a real `objcrop train` process after its first checkpoint, rerun the same
    command: it resumes and ends with exactly the weights of an uninterrupted run."""
    common = dict(method={"name": "mocov2", "params": SMALL_HEADS["mocov2"]},
                  trainer={"epochs": 6})
    path = recipe(tmp_path, data, "killed.yaml", **common)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "objcrop_plugin.cli", "train", str(path)]
    _, res = kill_and_resume(cmd, out, tmp_path / "ref")
    last = out / "checkpoints" / "last.ckpt"
    assert res["resumed_from"] == str(last) and res["epochs"] == 6
    a, b = _backbone_state(tmp_path / "ref"), _backbone_state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the counts are the whole run's, as the uninterrupted run's (not those since the resume)
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert res["fallbacks"] == ref["fallbacks"] and res["fallbacks"]["samples"] == 6 * 24
    assert res["bad_images"] == ref["bad_images"]


@pytest.mark.parametrize("died_at", [2, 3, 4])
def test_a_run_resumed_from_a_step_checkpoint_trains_the_rest_of_its_epoch(
        tmp_path, data, monkeypatch, died_at):
    """``checkpoint_every_n_steps``: a run that dies mid-epoch (3 batches an epoch) resumes
    with the batches its epoch had left, not its first ones again, and ends with the weights
    of an uninterrupted run; at step 3 (an epoch's last batch) it resumes at the next epoch."""
    import pytorch_lightning as pl

    from objcrop_plugin.train import runner

    trained: list[tuple[int, int]] = []
    items = runner.EpochItems.__getitem__

    def getitem(self, item):
        trained.append(item)
        return items(self, item)

    monkeypatch.setattr(runner.EpochItems, "__getitem__", getitem)

    class Dies(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == died_at:
                raise RuntimeError("killed")

    common = dict(method={"name": "mocov2", "params": SMALL_HEADS["mocov2"]},
                  trainer={"epochs": 2, "checkpoint_every_n_steps": 1})
    train(load_recipe(recipe(tmp_path, data, "ref.yaml", **common),
                      [f"trainer.out_dir={tmp_path / 'ref'}"]), echo=lambda s: None)
    ref, trained[:] = list(trained), []
    path = recipe(tmp_path, data, **common)
    callbacks = runner._callbacks
    monkeypatch.setattr(runner, "_callbacks", lambda *a, **k: callbacks(*a, **k) + [Dies()])
    with pytest.raises(RuntimeError, match="killed"):
        train(load_recipe(path), echo=lambda s: None)
    monkeypatch.setattr(runner, "_callbacks", callbacks)
    before, trained[:] = trained[: died_at * 8], []
    res = train(load_recipe(path), echo=lambda s: None)
    assert res["resumed_from"] and res["steps"] == 6
    assert before + trained == ref  # each (epoch, index) once, in the uninterrupted order
    a, b = _backbone_state(tmp_path / "ref"), _backbone_state(tmp_path / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_scene_crop_fallbacks_are_counted_at_the_end(tmp_path, data):
    """A store that covers half the images: the run says how many samples took scene crops
    (else only results.json and the first few warnings would)."""
    from objcrop_plugin.proposals import ProposalStore
    from objcrop_plugin.proposals.store import ProposalRecord

    full = ProposalStore(data.proposals_path)
    keys = sorted(full)[::2]
    half = tmp_path / "half.objcrop"
    ProposalStore.write(half, [ProposalRecord(k, full[k].boxes, full[k].scores,
                                              full[k].image_size) for k in keys])
    lines: list[str] = []
    res = train(load_recipe(recipe(tmp_path, data), [f"data.proposals={half}"]), echo=lines.append)
    fb = res["fallbacks"]
    assert fb["missing"] > 0
    said = [line for line in lines if "took scene crops" in line]
    assert said and said[0].startswith(f"{fb['missing']} of {fb['samples']} samples"), lines
    assert f"{fb['missing']} missing" in said[0]


def test_a_store_built_over_other_images_of_the_same_names_is_named(tmp_path, data, caplog):
    """Another dataset of the same file names and image sizes (regenerated with another
    seed): keys and sizes agree, the file sizes the build recorded do not."""
    import logging

    from objcrop_plugin.proposals.build import build_store

    store = tmp_path / "gs.objcrop"
    build_store(data.root, store, "graph_segments", progress=False)
    other = write_dataset(tmp_path / "other", 24, size=(96, 72), seed=4, workers=1)
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        train(load_recipe(recipe(tmp_path, data), [f"data.proposals={store}",
                                                   f"data.train_path={other.root}"]),
              echo=lambda s: None)
    assert "16 of the 16 images it recorded at its build have another file size" in caplog.text
    assert "built for other images of the same names" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        train(load_recipe(recipe(tmp_path, data), [f"data.proposals={store}",
                                                   f"trainer.out_dir={tmp_path / 'same'}"]),
              echo=lambda s: None)
    assert "another file size" not in caplog.text


def test_resuming_a_different_recipe_is_refused(tmp_path, data):
    path = recipe(tmp_path, data)
    train(load_recipe(path), echo=lambda s: None)
    with pytest.raises(RecipeError, match=r"different recipe \(differs in method\.name\)"):
        train(load_recipe(path, ["method.name=byol"]), echo=lambda s: None)
    # more epochs is a continuation, not a different run
    res = train(load_recipe(path, ["trainer.epochs=2"]), echo=lambda s: None)
    assert res["resumed_from"] and res["epochs"] == 2
    # so is the same folder spelled otherwise, or moved
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    res = train(load_recipe(path, ["trainer.epochs=2", f"trainer.out_dir={moved}/."]),
                echo=lambda s: None)
    assert res["resumed_from"] and res["epochs"] == 2


def test_resume_never_sets_the_earlier_runs_checkpoints_aside(tmp_path, data, monkeypatch):
    import pytorch_lightning as pl

    path = recipe(tmp_path, data)
    train(load_recipe(path), echo=lambda s: None)
    ckpts = tmp_path / "run" / "checkpoints"
    first = (ckpts / "last.ckpt").read_bytes()

    def dies(self, *args, **kwargs):  # killed before the new run's first checkpoint
        raise RuntimeError("killed")

    monkeypatch.setattr(pl.Trainer, "fit", dies)
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="killed"):
        train(load_recipe(path, ["optimizer.lr=0.05", "trainer.resume=never"]), echo=lines.append)
    assert any("moved to" in line and "replaced" in line for line in lines), lines
    assert not (ckpts / "last.ckpt").exists()
    assert (ckpts / "replaced" / "last.ckpt").read_bytes() == first
    monkeypatch.undo()
    # the rerun of the new recipe starts afresh: the earlier recipe's weights are not resumed
    res = train(load_recipe(path, ["optimizer.lr=0.05"]), echo=lambda s: None)
    assert res["resumed_from"] is None
    assert not (ckpts / "previous.ckpt").exists()


def test_cli_errors_name_the_key_and_the_fix(tmp_path, data, capsys):
    path = recipe(tmp_path, data)
    from objcrop_plugin.cli import main

    def run(*args: str) -> int:
        return main(["train", str(path), *args])

    for override, named in ((f"data.proposals={tmp_path / 'nope.objcrop'}", "data.proposals"),
                            ("trainer.batch_size=1000", "trainer.batch_size"),
                            ("trainer.epoch=1", "trainer.epochs")):
        assert run(override) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err
    other = write_dataset(tmp_path / "other", 4, size=(64, 48), seed=9, workers=1)
    with pytest.raises(RecipeError, match="has an entry in"):
        train(load_recipe(path, [f"data.train_path={other.image_dir}"]), echo=lambda s: None)
    with pytest.raises(RecipeError, match=r"data\.proposals: .* is a folder, not a proposal "
                                          r"store .*Fix: `objcrop proposals build .* -o "
                                          r"STORE\.objcrop`"):
        train(load_recipe(path, [f"data.proposals={data.image_dir}"]), echo=lambda s: None)
    with pytest.raises(FileNotFoundError, match=r"data\.proposals: proposal store not found"):
        train(load_recipe(path, [f"data.proposals={tmp_path / 'x.objcrop'}"]), echo=lambda s: None)
    with pytest.raises(RecipeError, match=r"batch_size 1000 exceeds the 24"):
        train(load_recipe(path, ["trainer.batch_size=1000"]), echo=lambda s: None)
    with pytest.raises(RecipeError, match="timm has no model 'no_such_net'"):
        train(load_recipe(path, ["backbone.name=no_such_net"]), echo=lambda s: None)
    from objcrop_plugin.proposals import ProposalStore
    from objcrop_plugin.proposals.store import ProposalRecord

    right = ProposalStore(data.proposals_path)
    turned = tmp_path / "turned.objcrop"  # the same keys, built for images of another shape
    ProposalStore.write(turned, [ProposalRecord(k, right[k].boxes, right[k].scores,
                                                right[k].image_size[::-1]) for k in right])
    with pytest.raises(RecipeError, match=r"was built for other images: .* 24 of 24 images "
                                          r"checked \(e.g. '.*': stored 72x96, image 96x72\)"):
        train(load_recipe(path, [f"data.proposals={turned}"]), echo=lambda s: None)
    # a labels file that cannot be read is found before training, not after it
    (tmp_path / "labels.json").write_text('{"images": [')
    for labels in (tmp_path / "nope.json", tmp_path / "labels.json"):
        with pytest.raises(RecipeError, match=r"data\.labels: .* cannot be read for the "
                                              r"evaluation .*Fix: .*data\.labels=null"):
            train(load_recipe(path, [f"data.labels={labels}"]), echo=lambda s: None)
    # labels of another folder: refused before training, not an unreadable folder after it
    import json

    other_labels = json.loads(Path(data.labels_path).read_text())
    moved = json.dumps(other_labels).replace('"images/', '"elsewhere/')
    (tmp_path / "other.json").write_text(moved)
    with pytest.raises(RecipeError, match=r"data\.labels: none of the 24 labelled images checked "
                                          r"is under data\.train_path .*\(elsewhere/.*labels "
                                          r"another folder\. Fix: .*data\.labels=null"):
        train(load_recipe(path, [f"data.labels={tmp_path / 'other.json'}"]), echo=lambda s: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"data\.train_path: no images found under .*empty"):
        train(load_recipe(path, [f"data.train_path={tmp_path / 'empty'}"]), echo=lambda s: None)
    assert not (tmp_path / "run").exists()  # a recipe that fails its checks writes nothing


def test_a_batch_larger_than_a_ranks_share_is_refused(tmp_path, data, monkeypatch):
    """With DDP each rank draws its batches from its share of the epoch: 24 images over 4
    ranks leave 6 to each, no batch of 8 (the run would end having trained nothing)."""
    import pytorch_lightning as pl

    monkeypatch.setattr(pl.Trainer, "world_size", property(lambda self: 4))
    with pytest.raises(RecipeError, match=r"batch_size 8 exceeds each of the 4 ranks' share \(6\)"):
        train(load_recipe(recipe(tmp_path, data)), echo=lambda s: None)


def test_cli_print_config_resolves_overrides(tmp_path, data, capsys):
    from objcrop_plugin.cli import main

    path = recipe(tmp_path, data)
    assert main(["train", str(path), "trainer.epochs=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["epochs"] == 7 and printed["crop"]["views"] == "obj_obj_dilate"
    assert not (tmp_path / "run").exists()


def test_vit_with_views_of_several_sizes_needs_dynamic_img_size(tmp_path, data):
    path = recipe(tmp_path, data, backbone={"name": "test_vit"},
                  crop={"views": "multi_crop", "params": {"n_local": 2, "local_size": 16}})
    with pytest.raises(RecipeError, match="dynamic_img_size: true"):
        train(load_recipe(path), echo=lambda s: None)


def test_ddp_on_two_cpu_processes(tmp_path, data):
    """Lightning DDP (gloo, 2 processes) through the real CLI: one voice, one export, and the
    counts of both ranks (an unreadable image among 25, met by one of them)."""
    root = tmp_path / "data"
    shutil.copytree(data.root, root)
    (root / data.image_dir.relative_to(data.root) / "zz_corrupt.jpg").write_bytes(
        b"\xff\xd8\xff\xe0 not a jpeg")
    path = recipe(tmp_path, data, trainer={"devices": 2, "strategy": "ddp", "epochs": 1,
                                           "batch_size": 13},
                  data={"train_path": str(root), "max_failure_rate": 0.1})
    done = warm_python.shared("objcrop").run(
        [sys.executable, "-m", "objcrop_plugin.cli", "train", str(path)],
        timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("objcrop train:") == 1 and done.stdout.count("done in") == 1
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["steps"] == 1  # each rank takes half the 25 images (13) per epoch
    assert res["fallbacks"]["samples"] == 2 * 13 and res["bad_images"]["bad_images"] == 1
    listed = (tmp_path / "run" / "bad_images.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed[1:]] == [
        str((data.image_dir.relative_to(data.root) / "zz_corrupt.jpg").as_posix())]
    assert (tmp_path / "run" / "backbone.pth").is_file()


def test_gpu_engine_crops_after_transfer(tmp_path, data, monkeypatch):
    """`crop.engine: gpu`: workers return canvases + windows, the module's
    on_after_batch_transfer turns them into views (device = cpu here, same code path)."""
    pytest.importorskip("kornia")
    from objcrop_plugin.engine.gpu import GPUViewEngine

    sizes = []
    transform = GPUViewEngine.transform_batch

    def counted(self, batch, *args, **kwargs):
        out = transform(self, batch, *args, **kwargs)
        sizes.append([tuple(v.shape) for v in out[0]])
        return out

    monkeypatch.setattr(GPUViewEngine, "transform_batch", counted)
    path = recipe(tmp_path, data, crop={"engine": "gpu", "canvas": 64},
                  method={"name": "byol", "params": SMALL_HEADS["byol"]},
                  trainer={"max_steps": 2, "epochs": 5})
    res = train(load_recipe(path), echo=lambda s: None)
    assert res["steps"] == 2 and math.isfinite(res["final_loss"])
    # the views of both steps were cut on the device from the workers' canvases
    assert sizes == [[(8, 3, 32, 32)] * 2] * 2


def test_backbone_starts_from_a_local_checkpoint(tmp_path, data):
    from objcrop_plugin.train.runner import build_backbone

    path = recipe(tmp_path, data, trainer={"max_steps": 1})
    train(load_recipe(path), echo=lambda s: None)
    weights = tmp_path / "run" / "backbone.pth"
    cfg = load_recipe(path, [f"backbone.checkpoint={weights}"])
    net = build_backbone(cfg)
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    with pytest.raises(FileNotFoundError, match="backbone.checkpoint: file not found"):
        build_backbone(load_recipe(path, [f"backbone.checkpoint={tmp_path / 'nope.pth'}"]))


@pytest.mark.parametrize("trainer", [{"epochs": 3}, {"epochs": -1, "max_steps": 9},
                                     {"epochs": 30, "max_steps": 9}])
def test_the_warm_up_lasts_its_epochs_when_max_steps_ends_the_run(tmp_path, data, monkeypatch,
                                                                   trainer):
    """24 images in batches of 8: 3 steps an epoch, so ``warmup_epochs: 1`` is 3 steps however
    the run's length is given."""
    from objcrop_plugin.train import methods

    made = {}
    configure = methods.SSLMethod.configure_optimizers

    def keep(self):
        out = configure(self)
        made["scheduler"] = out["lr_scheduler"]["scheduler"]
        return out

    monkeypatch.setattr(methods.SSLMethod, "configure_optimizers", keep)
    path = recipe(tmp_path, data, crop={"type": "scene", "views": "scene_scene"},
                  data={"proposals": None}, trainer=trainer,
                  schedule={"warmup_epochs": 1, "scheduler": "constant"})
    train(load_recipe(path), echo=lambda s: None)
    factor = made["scheduler"].lr_lambdas[0]
    assert [round(factor(i), 2) for i in range(5)] == [0.33, 0.67, 1.0, 1.0, 1.0]


def test_labels_partly_under_the_folder_are_said_before_training(tmp_path, data):
    from objcrop_plugin.train.runner import _check_labels_folder

    path = recipe(tmp_path, data)
    cfg = load_recipe(path, [f"data.labels={data.labels_path}"])
    keys = sorted(p.relative_to(data.root).as_posix() for p in data.image_dir.iterdir())
    said: list[str] = []
    _check_labels_folder(cfg, keys, said.append)
    assert said == []  # all there: nothing to say
    _check_labels_folder(cfg, keys + ["images/gone.jpg"], said.append)
    assert len(said) == 1 and said[0].startswith(
        f"warning: data.labels: 1 of {len(keys) + 1} labelled images checked are not under")
    assert "images/gone.jpg" in said[0]
