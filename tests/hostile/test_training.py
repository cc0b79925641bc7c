"""Hostile input to `objcrop train` and `objcrop eval`: kills with DataLoader workers, planted
pickles, truncated checkpoints, recipes the machine cannot run, typos. Each case asserts the exit
code or exception, that the message names the file or key (and the fix), and that nothing the
user owns changed."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lightly")
pytest.importorskip("pytorch_lightning")
timm = pytest.importorskip("timm")

from objcrop_plugin.cli import main  # noqa: E402
from objcrop_plugin.data.synthetic import write_dataset  # noqa: E402
from objcrop_plugin.train import RecipeError, load_recipe, train  # noqa: E402
from objcrop_plugin.train import resources as resources  # noqa: E402
from objcrop_plugin.train.runner import (  # noqa: E402
    CheckpointError,
    EpochShuffleSampler,
    _checkpoint_io,
    load_checkpoint,
)

NAME = "test_efficientnet"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("hostile_train"), 24, size=(96, 72), seed=3,
                         workers=1)


def recipe(tmp_path: Path, ds, name: str = "r.yaml", **sections) -> Path:
    raw = {
        "data": {"train_path": str(ds.root), "proposals": str(ds.proposals_path),
                 "num_workers": 0},
        "crop": {"type": "object_aware", "views": "obj_obj_dilate", "size": 32},
        "method": {"name": "simclr", "params": {"proj_dim": 32}},
        "backbone": {"name": NAME},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "trainer": {"epochs": 1, "batch_size": 8, "accelerator": "cpu", "devices": 1,
                    "out_dir": str(tmp_path / "run"), "progress_bar": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ------------------------------------------------------------------ 1: exact resume, workers

@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent_workers"])
def test_a_killed_run_with_workers_resumes_to_the_same_weights(tmp_path, data, persistent,
                                                               kill_and_resume):
    """SIGKILL a real `objcrop train` with 2 DataLoader workers after its first checkpoint and
    rerun it: the resumed epochs see the batches and crops of an uninterrupted run (the
    workers start before Lightning sets the resumed epoch, so it must travel with the index)."""
    path = recipe(tmp_path, data, "killed.yaml",
                  data={"num_workers": 2, "persistent_workers": persistent},
                  trainer={"epochs": 3})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "objcrop_plugin.cli", "train", str(path)]
    _, res = kill_and_resume(cmd, out, tmp_path / "ref")
    assert res["epochs"] == 3
    _assert_same(_weights(tmp_path / "ref" / "backbone.pth"), _weights(out / "backbone.pth"))


def test_sampler_carries_the_epoch_and_shards_ranks(monkeypatch):
    s = EpochShuffleSampler(10, seed=1)
    s.set_epoch(3)
    items = list(s)
    assert {e for e, _ in items} == {3} and sorted(i for _, i in items) == list(range(10))
    shards = []
    for rank in (0, 1, 2):
        monkeypatch.setattr("objcrop_plugin._random.distributed_rank", lambda r=rank: r)
        d = EpochShuffleSampler(10, seed=1, world_size=3)
        d.set_epoch(3)
        shards.append([i for _, i in d])
        assert len(shards[-1]) == len(d) == 4
    assert set(sum(shards, [])) == set(range(10))  # padded to 12 like DistributedSampler
    assert [i for _, i in items] == [i for t in zip(*shards) for i in t][:10]  # same order


# ------------------------------------------------------------ 6: planted pickles never run

class _Plant:
    """Unpickling this calls ``open(marker, "w")``: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, lightning: bool = False) -> Path:
    state = {f"w{i}": torch.zeros(2) for i in range(3)}
    state["evil"] = _Plant(marker)
    obj = {"state_dict": state, "loops": {}, "epoch": 0} if lightning else state
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_the_plant_is_real(tmp_path):
    """The oracle: an unrestricted torch.load of the planted file does create the file."""
    marker = tmp_path / "pwned"
    plant = _plant(tmp_path / "x.pth", marker)
    torch.load(plant, weights_only=False)["evil"].close()
    assert marker.exists()


def test_a_planted_last_ckpt_is_refused_and_never_run(tmp_path, data, capsys):
    marker = tmp_path / "pwned"
    path = recipe(tmp_path, data)
    last = _plant(tmp_path / "run" / "checkpoints" / "last.ckpt", marker, lightning=True)
    before = _snapshot(tmp_path / "run")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(last) in err and re.search(r"pickled Python objects \((io|builtins)\.open\)", err)
    assert "trainer.resume=never" in err and "Traceback" not in err
    assert not marker.exists()
    assert _snapshot(tmp_path / "run") == before  # nothing renamed, written or removed
    # Lightning's own load goes through the runner's checkpoint IO: weights only there too
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        _checkpoint_io().load_checkpoint(str(last))
    assert not marker.exists()


def test_a_planted_backbone_checkpoint_is_refused_and_never_run(tmp_path, data, capsys):
    marker = tmp_path / "pwned"
    plant = _plant(tmp_path / "weights.pth", marker)
    path = recipe(tmp_path, data)
    with pytest.raises(RecipeError, match=r"backbone\.checkpoint: .*weights\.pth: not a plain "
                       r"weights file .*pickled.*backbone\.pth"):
        train(load_recipe(path, [f"backbone.checkpoint={plant}"]), echo=lambda s: None)
    assert main(["train", str(path), f"backbone.checkpoint={plant}"]) == 2
    assert "not a plain weights file" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "run" / "backbone.pth").exists()


def test_a_planted_eval_checkpoint_is_refused_and_never_run(tmp_path, data, capsys):
    marker = tmp_path / "pwned"
    plant = _plant(tmp_path / "weights.pth", marker)
    before = plant.read_bytes()
    rc = main(["eval", "--root", str(data.root), "--model", NAME, "--checkpoint", str(plant)])
    err = capsys.readouterr().err
    assert rc == 2 and str(plant) in err and "not a plain weights file" in err
    assert "objcrop train" in err and "backbone.pth" in err and "Traceback" not in err
    assert not marker.exists() and plant.read_bytes() == before


# ------------------------------------------- 9: a truncated last.ckpt, the previous one kept

def test_a_truncated_last_ckpt_resumes_from_the_previous_one(tmp_path, data):
    ref = train(load_recipe(recipe(tmp_path, data, "ref.yaml", trainer={
        "epochs": 2, "out_dir": str(tmp_path / "ref")})), echo=lambda s: None)
    path = recipe(tmp_path, data, trainer={"epochs": 2})
    train(load_recipe(path), echo=lambda s: None)
    ckpts = tmp_path / "run" / "checkpoints"
    last, previous = ckpts / "last.ckpt", ckpts / "previous.ckpt"
    assert load_checkpoint(previous)["epoch"] < load_checkpoint(last)["epoch"]
    data_bytes = last.read_bytes()
    last.write_bytes(data_bytes[: len(data_bytes) // 2])  # disk full, interrupted copy

    lines: list[str] = []
    res = train(load_recipe(path), echo=lines.append)  # the same command again
    said = "\n".join(lines)
    assert f"cannot resume from {last}: truncated" in said and str(previous) in said
    assert res["resumed_from"] == str(previous) and res["epochs"] == 2
    assert (ckpts / "last.ckpt.unreadable").read_bytes() == data_bytes[: len(data_bytes) // 2]
    _assert_same(_weights(Path(ref["backbone_weights"])), _weights(Path(res["backbone_weights"])))


def test_no_loadable_checkpoint_is_refused_naming_both(tmp_path, data, capsys):
    path = recipe(tmp_path, data, trainer={"epochs": 2})
    train(load_recipe(path), echo=lambda s: None)
    ckpts = tmp_path / "run" / "checkpoints"
    for name in ("last.ckpt", "previous.ckpt"):
        (ckpts / name).write_bytes((ckpts / name).read_bytes()[:1000])
    before = _snapshot(tmp_path / "run")
    assert main(["train", str(path), "trainer.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "last.ckpt: truncated" in err and "previous.ckpt: truncated" in err
    assert "trainer.out_dir" in err and "Traceback" not in err
    assert _snapshot(tmp_path / "run") == before


# ------------------------------------------ 11: sizes and devices checked against the machine

def test_a_view_size_no_machine_holds_is_refused_before_anything_starts(tmp_path, data, capsys,
                                                                       monkeypatch):
    from objcrop_plugin.train import runner

    def started(*args, **kwargs):
        raise AssertionError("the run started building its data or network")

    monkeypatch.setattr(runner, "build_dataset", started)
    monkeypatch.setattr(runner, "build_backbone", started)
    path = recipe(tmp_path, data)
    assert main(["train", str(path), "crop.size=100000"]) == 2
    err = capsys.readouterr().err
    assert "crop.size: 100000 is too large" in err and "GB" in err and "Fix: lower crop.size" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_view_size_is_checked_against_the_memory_available(tmp_path, data, monkeypatch):
    monkeypatch.setattr(resources, "memory_available", lambda: 8 * 1024**3)
    path = recipe(tmp_path, data, data={"num_workers": 4})
    with pytest.raises(RecipeError, match=r"crop\.size: 4096 is too large .* 8\.0 GB of memory "
                       r"available\. Fix: lower crop\.size"):
        train(load_recipe(path, ["crop.size=4096"]), echo=lambda s: None)
    assert not (tmp_path / "run").exists()
    resources.check_machine(load_recipe(path))  # the small recipe fits


def test_more_cpu_devices_than_cores_are_refused(tmp_path, data, capsys):
    path = recipe(tmp_path, data)
    assert main(["train", str(path), "trainer.devices=99"]) == 2
    err = capsys.readouterr().err
    cores = len(os.sched_getaffinity(0))
    assert "trainer.devices: 99 asks for 99 CPU devices" in err
    assert f"this machine has {cores} CPU cores. Fix: trainer.devices={cores}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_one_line(tmp_path, data, capsys):
    path = recipe(tmp_path, data)
    assert main(["train", str(path), "trainer.accelerator=gpu"]) == 2
    err = capsys.readouterr().err
    assert "trainer.accelerator: 'gpu' but torch sees no GPU" in err
    assert "Fix: trainer.accelerator=cpu" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------ 12: one line with a fix, not a trace

@pytest.mark.parametrize("model, said", [
    ("resnet5O", "timm has no model 'resnet5O'. Close matches: resnet50"),
    ("ResNet50", "timm has no model 'ResNet50'. Close matches: resnet50"),
    ("resnet18.a1_in1kk", "timm's model 'resnet18' has no tag 'a1_in1kk'. Its tags: a1_in1k"),
])
def test_eval_model_typo_names_it_and_close_matches(data, capsys, model, said):
    assert main(["eval", "--root", str(data.root), "--model", model]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, why", [
    (b"101 not a checkpoint\n", "not a torch.save file"),
    ("truncated", "truncated"),
])
def test_eval_checkpoint_that_is_no_weights_file_says_so(tmp_path, data, capsys, content, why):
    bad = tmp_path / "backbone.pth"
    if content == "truncated":
        torch.save(timm.create_model(NAME, num_classes=0).state_dict(), bad)
        content = bad.read_bytes()[:2000]
    bad.write_bytes(content)
    rc = main(["eval", "--root", str(data.root), "--model", NAME, "--checkpoint", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}: not a plain weights file ({why}" in err
    assert "objcrop train" in err and "Traceback" not in err
    assert bad.read_bytes() == content
