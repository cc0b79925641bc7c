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
    assert "8 samples cropped from proposals, 0 fell back" in proc.stderr
    assert demo.proposals_path.is_file()


def test_two_rounds_heatmap_boxes_from_a_solo_checkpoint(solo_root, tmp_path):
    """docs/solo-learn.md's two-round route: a first solo-learn run, heat-map proposals from its
    Lightning checkpoint (`objcrop proposals build --method heatmap --checkpoint`), then a
    second run on them (`data.proposals`)."""
    pytest.importorskip("cv2", reason="the heatmap generator needs OpenCV (proposals extra)")
    from objcrop_plugin.data.synthetic import write_dataset

    demo = write_dataset(tmp_path / "datasets" / "objcrop-demo", n_images=8, size=(128, 96))
    command = shutil.which("objcrop-solo")
    command = [command] if command else [sys.executable, "-m", "objcrop_plugin.solo"]
    common = ["--config-path", str(RECIPES), "--config-name", "demo_cpu.yaml", "++max_steps=2",
              "optimizer.batch_size=4", "data.num_workers=0", "max_epochs=1",
              "backbone.kwargs.model_name=test_resnet", "++enable_progress_bar=False"]
    first = subprocess.run([*command, *common, "checkpoint.dir=round1"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-6000:]
    (ckpt,) = sorted((tmp_path / "round1").rglob("*.ckpt"))[-1:]
    store = tmp_path / "demo.heatmap.objcrop"
    build = subprocess.run(
        [sys.executable, "-m", "objcrop_plugin.cli", "proposals", "build", str(demo.root),
         "--method", "heatmap", "--model", "test_resnet", "--checkpoint", str(ckpt),
         "--param", "scale=2", "--workers", "1", "--no-progress", "-o", str(store)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert "images: 8" in build.stdout
    second = subprocess.run([*command, *common, f"data.proposals={store}",
                             "checkpoint.enabled=False"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-6000:]
    assert "8 samples cropped from proposals, 0 fell back" in second.stderr


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
    }
    script = tmp_path / "errors.py"
    script.write_text(ERRORS)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(list(cases.values())),
         "--config-path", str(tmp_path / "recipes"), "--config-name", recipe],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
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
