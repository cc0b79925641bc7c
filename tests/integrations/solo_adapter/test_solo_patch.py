"""What ``install`` patches, seen from solo-learn's own ``main_pretrain.py``: four methods train
on views cut from proposals; solo-learn's quirks are smoothed; importing needs no solo-learn."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from solo_testing import (
    OBJ_OBJ_DILATE,
    colour_fractions,
    dilated_object_of,
    make_entry,
    object_of,
    train_through_main,
    write_recipe,
)

from objcrop_plugin.integrations.solo.errors import INSTALL_HINT
from objcrop_plugin.integrations.solo.patch import fix_solo_quirks

CASES = {
    # method: (dataset node, backbone, what it exercises)
    "simclr": ({"dataset": "custom", "train_path": "train", "proposals": "train.objcrop"},
               {"name": "resnet18"}),
    "mocov2plus": ({"dataset": "imagenet100", "train_path": "train", "proposals": "train.objcrop"},
                   {"name": "timm", "kwargs": {"model_name": "test_resnet"}}),
    "byol": ({"dataset": "custom", "train_path": "flat", "no_labels": True,
              "proposals": "flat.objcrop", "num_workers": 1},
             {"name": "timm", "kwargs": {"model_name": "test_efficientnet"}}),
    "vicreg": ({"dataset": "custom", "train_path": "train", "proposals": "train.objcrop"},
               {"name": "timm", "kwargs": {"model_name": "test_convnext"}}),
}


@pytest.mark.parametrize("method", list(CASES))
def test_method_trains_two_steps_on_views_cut_from_proposals(method, solo_root, scenes, tmp_path):
    data, backbone = CASES[method]
    data = {**data, "train_path": str(scenes / data["train_path"]),
            "proposals": str(scenes / data["proposals"])}
    recipe = write_recipe(tmp_path / "recipes", method, OBJ_OBJ_DILATE, data, backbone)
    record = train_through_main(tmp_path, tmp_path / "recipes", recipe)
    steps, facts = record["steps"], record["facts"]

    assert len(steps) == 2  # max_steps: 2, through solo-learn's own training loop
    assert facts["backbone_finite"]  # after solo-learn's first optimizer step
    # without labels (targets -1) solo-learn's online classifier loss is NaN (a cross-entropy
    # that ignores every target), so only labelled runs have a finite total loss
    assert facts["loss_finite"] or data.get("no_labels")
    assert facts["num_large_crops"] == 2 and facts["num_small_crops"] == 0
    assert facts["dataset"] == "ObjectAwareSoloDataset"
    if backbone["name"] == "timm":
        assert facts["backbone"].startswith("timm.models.")
    # importing solo-learn left timm's own convnext/poolformer names registered
    assert facts["convnext_tiny"] == "timm.models.convnext"
    assert facts["poolformer_s12"] == "timm.models.metaformer"

    seen = set()
    for step in steps:
        views, targets = step["views"], step["targets"]
        assert [tuple(v.shape) for v in views] == [(4, 3, 64, 64)] * 2
        expected = {-1} if data.get("no_labels") else {0, 1}
        assert set(targets.tolist()) <= expected
        for b in range(4):
            # Obj-Obj+Dilate, order shuffled: one view inside a box, the other inside the same
            # box dilated; both show the same object, never the other one
            v0, v1 = views[0][b], views[1][b]
            c0, c1 = colour_fractions(v0), colour_fractions(v1)
            inside, dilated = (v0, v1) if c0["blue"] <= c1["blue"] else (v1, v0)
            colour = object_of(inside)
            assert dilated_object_of(dilated) == colour
            seen.add(colour)
    assert seen == {"red", "green"}  # the proposal is drawn per sample
    assert "0 fell back to scene crops" in record["stderr"]


def test_multicrop_counts_small_crops_and_keeps_solo_crops_for_plain_entries(
    solo_root, scenes, tmp_path
):
    augmentations = [
        make_entry("object_aware"),  # large, from the proposal
        make_entry(None),  # large, solo-learn's own RandomResizedCrop of the scene
        make_entry({"policy": "object", "scale": [0.3, 1.0]}, size=32, n=2),  # small, same proposal
    ]
    data = {"dataset": "custom", "train_path": str(scenes / "train"),
            "proposals": str(scenes / "train.objcrop")}
    recipe = write_recipe(tmp_path / "recipes", "simclr", augmentations, data)
    record = train_through_main(tmp_path, tmp_path / "recipes", recipe)
    facts = record["facts"]
    assert facts["num_large_crops"] == 2 and facts["num_small_crops"] == 2
    for step in record["steps"]:
        views = step["views"]
        assert [tuple(v.shape[1:]) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
        for b in range(4):
            colour = object_of(views[0][b])
            assert colour_fractions(views[1][b])["blue"] > 0.1  # a scene crop: mostly background
            assert object_of(views[2][b]) == object_of(views[3][b]) == colour


def test_solo_quirks_are_fixed():
    cpu = {"accelerator": "cpu", "devices": 1, "strategy": None}
    fix_solo_quirks(cpu)
    assert cpu == {"accelerator": "cpu", "devices": "1", "strategy": "auto"}
    cpu = {"accelerator": "cpu", "devices": [0, 1]}
    fix_solo_quirks(cpu)
    assert cpu["devices"] == "2"
    gpu = {"accelerator": "gpu", "devices": 2}
    fix_solo_quirks(gpu)
    assert gpu["devices"] == [0, 1]
    kept = {"accelerator": "gpu", "devices": [0, 1], "strategy": "ddp"}
    fix_solo_quirks(kept)
    assert kept == {"accelerator": "gpu", "devices": [0, 1], "strategy": "ddp"}
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"accelerator": "cpu", "devices": 1})
    fix_solo_quirks(node)
    assert node.devices == "1" and len(node.devices) == 1


def test_adapter_imports_without_solo_and_says_how_to_install():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["solo"] = None  # as if solo-learn were not installed
        import objcrop_plugin.solo  # the adapter's own logic needs no solo-learn
        from objcrop_plugin.integrations.solo.patch import import_solo
        from objcrop_plugin.solo import SoloNotFoundError
        try:
            import_solo()
        except SoloNotFoundError as exc:
            print("NOT-FOUND:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "NOT-FOUND: " + INSTALL_HINT in out.stdout
    assert "git clone https://github.com/vturrisi/solo-learn" in out.stdout
