"""``objcrop-solo``: arguments, finding the checkout, errors, the console script."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import solo_testing
import warm_python
from solo_testing import OBJ_OBJ_DILATE, RECIPES, SOLO_SKIP, solo_missing, write_recipe

from objcrop_plugin.integrations.solo.cli import find_solo_root, split_args
from objcrop_plugin.integrations.solo.errors import INSTALL_HINT
from objcrop_plugin.solo import SoloConfigError, SoloNotFoundError, main


def test_split_args_makes_the_config_path_absolute(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "simclr.yaml").write_text("method: simclr\n")
    monkeypatch.chdir(tmp_path)
    root, args = split_args(["--solo-root", "/opt/solo", "--config-path", "recipes",
                             "--config-name", "simclr.yaml", "data.num_workers=2", "++x=1"])
    assert root == "/opt/solo"
    assert args == ["--config-path", str(tmp_path / "recipes"), "--config-name", "simclr.yaml",
                    "data.num_workers=2", "++x=1"]
    root, args = split_args(["-cp=recipes", "-cn", "simclr", "--solo-root=/s"])
    assert root == "/s" and args[:2] == ["--config-path", str(tmp_path / "recipes")]
    with pytest.raises(SoloConfigError, match="--config-path DIR --config-name"):
        split_args(["--config-name", "simclr.yaml"])
    with pytest.raises(SoloConfigError, match="is not a folder"):
        split_args(["--config-path", "nowhere", "--config-name", "simclr.yaml"])
    with pytest.raises(SoloConfigError, match="no recipe byol.yaml in"):
        split_args(["--config-path", "recipes", "--config-name", "byol.yaml"])


def test_finding_the_checkout(tmp_path, monkeypatch):
    checkout = tmp_path / "solo-learn"
    (checkout / "solo").mkdir(parents=True)
    (checkout / "main_pretrain.py").write_text("")
    assert find_solo_root(checkout) == checkout
    monkeypatch.setenv("SOLO_ROOT", str(checkout))
    assert find_solo_root() == checkout
    monkeypatch.setenv("SOLO_ROOT", str(tmp_path))
    with pytest.raises(SoloNotFoundError, match="SOLO_ROOT=.*not a solo-learn checkout.*Fix"):
        find_solo_root()
    monkeypatch.delenv("SOLO_ROOT")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SoloNotFoundError) as info:
        find_solo_root()
    message = str(info.value)
    assert INSTALL_HINT in message and "setuptools<82" in message and "--no-deps" in message


def test_cli_without_a_checkout_says_how_to_install(tmp_path, capsys, monkeypatch):
    (tmp_path / "r.yaml").write_text("method: simclr\n")
    monkeypatch.delenv("SOLO_ROOT", raising=False)
    rc = main(["--solo-root", str(tmp_path), "--config-path", str(tmp_path),
                       "--config-name", "r.yaml"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("objcrop-solo: error: --solo-root=") and "pip install --no-deps" in err
    assert main(["--help"]) == 0
    assert "--config-path DIR --config-name NAME.yaml" in capsys.readouterr().out


def test_skip_reason_says_how_to_install(monkeypatch):
    def missing(explicit=None):
        raise SoloNotFoundError("no solo")

    monkeypatch.setattr(solo_testing, "find_solo_root", missing)
    assert solo_missing() == SOLO_SKIP == INSTALL_HINT


def test_shipped_demo_recipe_runs_with_the_console_script(solo_root, tmp_path):
    from objcrop_plugin.data.synthetic import write_dataset

    demo = write_dataset(tmp_path / "datasets" / "objcrop-demo", n_images=8, size=(128, 96))
    command = shutil.which("objcrop-solo")
    command = [command] if command else [sys.executable, "-m", "objcrop_plugin.solo"]
    config_path = os.path.relpath(RECIPES, tmp_path)  # relative to the current directory
    proc = subprocess.run(
        [*command, "--config-path", config_path, "--config-name", "demo_cpu.yaml",
         "++max_steps=2", "optimizer.batch_size=4", "data.num_workers=0",
         "checkpoint.enabled=False", "backbone.kwargs.model_name=test_resnet",
         "++enable_progress_bar=False"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "8 samples, 8 cropped from proposals, 0 fell back" in proc.stderr
    assert demo.proposals_path.is_file()


def test_every_ddp_rank_runs_with_the_plugin(solo_root, tmp_path):
    """Lightning starts further DDP ranks as `python sys.argv[0] ARGS`: each must install the
    plugin (its crops, its timm backbone), not run solo-learn's script without it."""
    from objcrop_plugin.data.synthetic import write_dataset

    write_dataset(tmp_path / "datasets" / "objcrop-demo", n_images=8, size=(128, 96))
    command = shutil.which("objcrop-solo")
    command = [command] if command else [sys.executable, "-m", "objcrop_plugin.solo"]
    proc = subprocess.run(
        [*command, "--config-path", str(RECIPES), "--config-name", "demo_cpu.yaml",
         "++max_steps=1", "optimizer.batch_size=2", "data.num_workers=0",
         "checkpoint.enabled=False", "backbone.kwargs.model_name=test_resnet",
         "++enable_progress_bar=False", "++devices=2", "++strategy=ddp"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    # one line per rank: both cropped from the proposals
    assert proc.stderr.count("cropped from proposals, 0 fell back") == 2, proc.stderr[-3000:]


def test_two_rounds_heatmap_boxes_from_a_solo_checkpoint(solo_root, tmp_path):
    """docs/solo-learn.md's two-round route: a first solo-learn run, heat-map proposals from its
    Lightning checkpoint (`objcrop proposals build --method heatmap --checkpoint`), then a
    second run on them (`data.proposals`)."""
    pytest.importorskip("cv2", reason="the heatmap generator needs OpenCV (proposals extra)")
    from objcrop_plugin.data.synthetic import write_dataset

    demo = write_dataset(tmp_path / "datasets" / "objcrop-demo", n_images=8, size=(128, 96))
    solo = warm_python.shared("solo")
    command = [sys.executable, "-m", "objcrop_plugin.solo"]  # the console script's main
    common = ["--config-path", str(RECIPES), "--config-name", "demo_cpu.yaml", "++max_steps=2",
              "optimizer.batch_size=4", "data.num_workers=0", "max_epochs=1",
              "backbone.kwargs.model_name=test_resnet", "++enable_progress_bar=False"]
    first = solo.run([*command, *common, "checkpoint.dir=round1"], cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-6000:]
    (ckpt,) = sorted((tmp_path / "round1").rglob("*.ckpt"))[-1:]
    store = tmp_path / "demo.heatmap.objcrop"
    build = warm_python.shared("objcrop").run(
        [sys.executable, "-m", "objcrop_plugin.cli", "proposals", "build", str(demo.root),
         "--method", "heatmap", "--model", "test_resnet", "--checkpoint", str(ckpt),
         "--param", "scale=2", "--workers", "1", "--no-progress", "-o", str(store)],
        cwd=tmp_path, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert "images: 8" in build.stdout
    second = solo.run([*command, *common, f"data.proposals={store}", "checkpoint.enabled=False"],
                      cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr[-6000:]
    assert "8 samples, 8 cropped from proposals, 0 fell back" in second.stderr


ERRORS = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from objcrop_plugin.solo import main

    results = []
    for overrides in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = main([*sys.argv[2:], *overrides])
            except SystemExit as exc:
                rc = exc.code
        results.append({"rc": rc, "stderr": err.getvalue()})
    print(json.dumps(results))
    """
)


def test_clear_errors_through_main_pretrain(solo_root, scenes, tmp_path):
    data = {"dataset": "custom", "train_path": str(scenes / "train"),
            "proposals": str(scenes / "train.objcrop")}
    recipe = write_recipe(tmp_path / "recipes", "simclr", OBJ_OBJ_DILATE, data)
    cases = {
        "data.format: dali": ["data.format=dali"],
        "does not exist": [f"data.proposals={tmp_path / 'nope.objcrop'}"],
        "is not in the store": [f"data.proposals={scenes / 'wrong.objcrop'}"],
        "is not a timm model": ["backbone.name=timm", "++backbone.kwargs.model_name=resnet5O"],
        "data.dataset: cifar10": ["data.dataset=cifar10"],
        "weights are only loaded from a local file": [
            "backbone.name=timm", "++backbone.kwargs.model_name=resnet18",
            "++backbone.kwargs.pretrained=true"],
        "holds another model's weights": [
            "backbone.name=timm", "++backbone.kwargs.model_name=resnet18",
            f"++backbone.kwargs.checkpoint={tmp_path / 'other.pth'}"],
    }
    import timm
    import torch

    from objcrop_plugin.proposals import ProposalStore
    from objcrop_plugin.proposals.store import ProposalRecord

    # a store of the same file names, built for images of another shape
    right = ProposalStore(scenes / "train.objcrop")
    ProposalStore.write(tmp_path / "sizes.objcrop", [
        ProposalRecord(k, right[k].boxes, right[k].scores, right[k].image_size[::-1])
        for k in right])
    cases["was built for other images"] = [f"data.proposals={tmp_path / 'sizes.objcrop'}"]
    torch.save(timm.create_model("test_efficientnet", pretrained=False, num_classes=0).state_dict(),
               tmp_path / "other.pth")
    script = tmp_path / "errors.py"
    script.write_text(ERRORS)
    proc = warm_python.shared("solo").run(
        [sys.executable, str(script), json.dumps(list(cases.values())),
         "--config-path", str(tmp_path / "recipes"), "--config-name", recipe],
        cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (message, _), result in zip(cases.items(), results):
        assert result["rc"] == 2, result
        lines = [ln for ln in result["stderr"].splitlines() if ln.startswith("objcrop-solo: error:")]
        assert len(lines) == 1 and message in lines[0], result["stderr"][-2000:]
        assert "Fix" in lines[0] or "Close matches" in lines[0]
        assert "Traceback" not in result["stderr"]


def test_one_public_import_path_for_python_and_the_console_script():
    import importlib.metadata

    import objcrop_plugin.solo as public
    from objcrop_plugin.integrations import solo as package

    surface = {"install", "uninstall", "main", "ObjectAwareTransform", "parse_object_aware",
               "timm_backbone", "SoloConfigError", "SoloNotFoundError"}
    assert set(public.__all__) == set(package.__all__) == surface
    assert all(getattr(public, name) is getattr(package, name) for name in surface)
    scripts = importlib.metadata.entry_points(group="console_scripts", name="objcrop-solo")
    assert [ep.value for ep in scripts] == ["objcrop_plugin.solo:main"]


def test_auto_resume_never_continues_a_run_with_other_crops(solo_root, scenes, tmp_path):
    """Finding 1: with auto_resume (every paper recipe), the scene baseline and the
    object-aware run of the same recipe no longer resume each other (the second trained
    nothing); the same setup run again still resumes."""
    import yaml
    from solo_testing import make_entry, run_main_several

    data = {"dataset": "custom", "train_path": str(scenes / "flat"), "no_labels": True,
            "proposals": str(scenes / "flat.objcrop")}
    recipes = tmp_path / "recipes"
    recipe = write_recipe(recipes, "simclr", OBJ_OBJ_DILATE, data,
                          checkpoint={"enabled": True, "dir": "ckpt", "frequency": 1},
                          auto_resume={"enabled": True, "max_hours": 36})
    (recipes / "augmentations" / "scene.yaml").write_text(
        yaml.safe_dump([make_entry(None), make_entry(None)]))
    baseline, object_aware, again = run_main_several(
        tmp_path, recipes, recipe, [["augmentations=scene.yaml"], [], []])
    for run in (baseline, object_aware, again):
        assert run["rc"] == 0, run["stderr"][-4000:]
    assert "Resuming from previous checkpoint" not in baseline["stdout"]
    assert "Resuming from previous checkpoint" not in object_aware["stdout"], object_aware["stdout"]
    assert len(list((tmp_path / "ckpt" / "simclr").glob("*/*.ckpt"))) == 2  # both trained
    assert "objcrop: 8 samples, 8 cropped from proposals, 0 fell back" in object_aware["stderr"]
    for run in (baseline, object_aware, again):  # each says which identity it resumes by
        identity = [ln for ln in run["stderr"].splitlines() if "auto_resume resumes only" in ln]
        assert len(identity) == 1 and "objcrop_identity=" in identity[0], run["stderr"][-2000:]
    # the object-aware setup run again resumes the object-aware run, not the baseline
    assert "Resuming from previous checkpoint" in again["stdout"]
    resumed = again["stdout"].split("matches specifications:", 1)[1].split("'")[1]
    args = json.loads((tmp_path / os.path.dirname(resumed) / "args.json").read_text())
    assert args["augmentations"][0]["crop"] == "object_aware"


def test_bad_and_unlisted_images_are_reported_and_the_failure_rate_is_a_recipe_key(
    solo_root, scenes, tmp_path
):
    """Findings 2, 3, 4 and 7 through main_pretrain.py, under `hydra/job_logging: disabled`:
    the warnings for images without proposals and for an unreadable image reach stderr (from a
    DataLoader worker too); the end-of-run line says how many samples were cropped from
    proposals and which image was skipped; `++data.max_failure_rate` is honoured, and above it
    the run ends with one line naming that key (no traceback, exit status 1);
    `accelerator=auto` runs on a machine without a GPU."""
    import re

    from solo_testing import run_main_several, scene_image

    folder = tmp_path / "flat"
    shutil.copytree(scenes / "flat", folder)
    for i in range(4):  # not in the store: scene crops
        scene_image(i).save(folder / f"new_{i}.png")
    data = (scenes / "flat" / "003.png").read_bytes()
    (folder / "003.png").write_bytes(data[: len(data) // 3])  # truncated
    recipe = write_recipe(
        tmp_path / "recipes", "simclr", OBJ_OBJ_DILATE,
        {"dataset": "custom", "train_path": str(folder), "no_labels": True,
         "proposals": str(scenes / "flat.objcrop"), "num_workers": 1},
    )
    tolerated, stopped = run_main_several(
        tmp_path, tmp_path / "recipes", recipe,
        [["accelerator=auto", "++data.max_failure_rate=0.2", "max_steps=-1"],
         ["max_steps=-1"]])

    err = tolerated["stderr"]
    assert tolerated["rc"] == 0, err[-4000:]
    assert "objcrop: 33.3% of the images checked have no proposals" in err
    assert re.search(r"objcrop: skipping unreadable image \S*003\.png", err), err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("objcrop: 12 samples")]
    assert len(line) == 1, err[-3000:]
    found = re.fullmatch(
        r"objcrop: 12 samples, (\d+) cropped from proposals, (\d+) fell back to scene crops "
        r"\(no entry: (\d+), no usable box: 0, stored size of another aspect: 0\); 1 unreadable "
        r"image skipped, e.g. (\S+) \(data.max_failure_rate 0.2\)", line[0])
    assert found, line[0]
    cropped, fell_back, missing, example = found.groups()
    assert int(cropped) + int(fell_back) == 12 and int(fell_back) == int(missing) in (4, 5)
    assert example == str(folder / "003.png")

    err = stopped["stderr"]
    assert stopped["rc"] == 1, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("objcrop-solo: error: 1 of 12 images could not be read, more than "
                           "data.max_failure_rate=0.01 (1.00%) allows; e.g. "), last
    assert "003.png" in last and "raise data.max_failure_rate" in last
