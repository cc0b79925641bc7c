"""The solo-learn adapter: recipe parsing, patches, errors, and solo-learn's own main_pretrain.py.

Tests that run solo-learn (the ``solo_root`` fixture) train two steps of SimCLR, MoCo-v2+, BYOL
and VICReg on CPU through the real ``main_pretrain.py``, each in a subprocess so solo-learn's
global state never leaks into this one; they skip, saying how to install solo-learn, when no
checkout is found. Everything else tests the adapter's own logic without solo-learn.

The "crops came from proposals" checks use scenes with exactly two objects in distinctive
colours (a red and a green rectangle on blue), a proposal store holding exactly their boxes,
and no colour augmentation: a view cut inside a box is that object's colour, a view cut
inside the dilated box still shows that object and never the other one, and a scene crop
shows the blue background.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from objcrop_plugin.integrations import solo as adapter
from objcrop_plugin.integrations.solo import (
    INSTALL_HINT,
    IndexedDataset,
    ObjectAwareSoloDataset,
    ObjectAwareTransform,
    SoloConfigError,
    SoloNotFoundError,
    find_solo_root,
    fix_solo_quirks,
    parse_object_aware,
    split_args,
    timm_backbone,
)
from objcrop_plugin.proposals import ProposalStore

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "solo"
SOLO_SKIP = (
    "solo-learn is not installed: check out github.com/vturrisi/solo-learn and pip install "
    "--no-deps --build-constraint <file with setuptools<82> <checkout> (see README)"
)

# scene layout: blue background, a red and a green rectangle far apart
W, H = 128, 96
RED_BOX = (8, 8, 56, 48)
GREEN_BOX = (72, 48, 120, 88)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # solo-learn's ImageNet default


# --------------------------------------------------------------------------- fixtures

def _solo_missing() -> str | None:
    try:
        find_solo_root()
    except SoloNotFoundError:
        return SOLO_SKIP
    import importlib.util

    for module in ("lightning", "hydra", "omegaconf", "timm", "einops", "sklearn", "torchmetrics"):
        if importlib.util.find_spec(module) is None:
            return f"{SOLO_SKIP}; solo-learn's dependency {module} is missing (objcrop-plugin[solo])"
    return None


@pytest.fixture(scope="module")
def solo_root() -> Path:
    reason = _solo_missing()
    if reason:
        pytest.skip(reason)
    return find_solo_root()


def _scene(shift: int) -> Image.Image:
    a = np.zeros((H, W, 3), np.uint8)
    a[...] = (0, 0, 255)
    x1, y1, x2, y2 = RED_BOX
    a[y1 + shift : y2 + shift, x1 + shift : x2 + shift] = (255, 0, 0)
    x1, y1, x2, y2 = GREEN_BOX
    a[y1 - shift : y2 - shift, x1 - shift : x2 - shift] = (0, 255, 0)
    return Image.fromarray(a)


def _boxes(shift: int) -> list[list[float]]:
    r, g = RED_BOX, GREEN_BOX
    return [[v + shift for v in r], [v - shift for v in g]]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """8 PNG scenes as class folders (``train/a``, ``train/b``) and flat (``flat/``), with
    stores keyed relative to each folder, and one keyed relative to the wrong folder."""
    root = tmp_path_factory.mktemp("solo-scenes")
    records_train, records_flat, records_wrong = [], [], []
    for i in range(8):
        shift = i % 4
        image = _scene(shift)
        cls = "a" if i < 4 else "b"
        for path in (root / "train" / cls / f"{i:03d}.png", root / "flat" / f"{i:03d}.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        boxes, scores = _boxes(shift), [1.0, 1.0]
        records_train.append((f"{cls}/{i:03d}.png", boxes, scores, (W, H)))
        records_flat.append((f"{i:03d}.png", boxes, scores, (W, H)))
        records_wrong.append((f"images/{i:03d}.png", boxes, scores, (W, H)))
    ProposalStore.write(root / "train.objcrop", records_train)
    ProposalStore.write(root / "flat.objcrop", records_flat)
    ProposalStore.write(root / "wrong.objcrop", records_wrong)
    return root


def _colours(view: torch.Tensor) -> dict[str, float]:
    """Fractions of red, green and blue pixels of one normalised view ``(3, h, w)``."""
    rgb = view * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    r, g, b = rgb
    hi, lo = 0.6, 0.4
    return {
        "red": float(((r > hi) & (g < lo) & (b < lo)).float().mean()),
        "green": float(((g > hi) & (r < lo) & (b < lo)).float().mean()),
        "blue": float(((b > hi) & (r < lo) & (g < lo)).float().mean()),
    }


def _object_of(view: torch.Tensor) -> str:
    """The object a view cut *inside a box* shows; asserts it shows nothing else."""
    c = _colours(view)
    colour = max(("red", "green"), key=c.get)
    other = "green" if colour == "red" else "red"
    assert c[colour] > 0.75 and c[other] == 0.0 and c["blue"] < 0.05, c
    return colour


def _dilated_object_of(view: torch.Tensor) -> str:
    """The object a view cut inside a *dilated* box shows (never the other one)."""
    c = _colours(view)
    colour = max(("red", "green"), key=c.get)
    other = "green" if colour == "red" else "red"
    assert c[colour] > 0.3 and c[other] == 0.0, c
    return colour


# --------------------------------------------------------------------------- recipes

PHOTOMETRICS_OFF = {
    "color_jitter": {"prob": 0.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    "grayscale": {"prob": 0.0},
    "gaussian_blur": {"prob": 0.0},
    "solarization": {"prob": 0.0},
    "equalization": {"prob": 0.0},
    "horizontal_flip": {"prob": 0.5},
}

METHOD_KWARGS = {
    "simclr": {"method_kwargs": {"proj_hidden_dim": 32, "proj_output_dim": 16, "temperature": 0.2}},
    "mocov2plus": {
        "method_kwargs": {
            "proj_hidden_dim": 32, "proj_output_dim": 16, "queue_size": 32, "temperature": 0.2,
        },
        "momentum": {"base_tau": 0.99, "final_tau": 0.999},
    },
    "byol": {
        "method_kwargs": {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32},
        "momentum": {"base_tau": 0.99, "final_tau": 1.0},
    },
    "vicreg": {
        "method_kwargs": {
            "proj_hidden_dim": 32, "proj_output_dim": 32, "sim_loss_weight": 25.0,
            "var_loss_weight": 25.0, "cov_loss_weight": 1.0,
        },
    },
}


def _entry(crop=None, size: int = 64, n: int = 1, scale=(0.2, 1.0)) -> dict:
    entry = {} if crop is None else {"crop": crop}
    entry["rrc"] = {"enabled": True, "crop_min_scale": scale[0], "crop_max_scale": scale[1]}
    entry.update(PHOTOMETRICS_OFF)
    entry.update({"crop_size": size, "num_crops": n})
    return entry


OBJ_OBJ_DILATE = [_entry("object_aware"), _entry({"policy": "object_dilated", "dilation": 0.05})]


def _write_recipe(folder: Path, method: str, augmentations: list, data: dict,
                  backbone: dict | None = None, **extra) -> str:
    """A solo-learn recipe laid out as solo-learn's own (defaults list + augmentations group)."""
    (folder / "augmentations").mkdir(parents=True, exist_ok=True)
    (folder / "augmentations" / "views.yaml").write_text(yaml.safe_dump(augmentations))
    recipe = {
        "defaults": [
            "_self_",
            {"augmentations": "views.yaml"},
            {"override hydra/hydra_logging": "disabled"},
            {"override hydra/job_logging": "disabled"},
        ],
        "hydra": {"output_subdir": None, "run": {"dir": "."}},
        "name": f"{method}-test",
        "method": method,
        "backbone": backbone or {"name": "resnet18"},
        **METHOD_KWARGS[method],
        "data": {"format": "image_folder", "num_workers": 0, **data},
        "optimizer": {
            "name": "sgd", "batch_size": 4, "lr": 0.1, "classifier_lr": 0.1, "weight_decay": 1e-4,
        },
        "scheduler": {"name": "warmup_cosine", "warmup_epochs": 0},
        "checkpoint": {"enabled": False},
        "auto_resume": {"enabled": False},
        "wandb": {"enabled": False},
        "performance": {"disable_channel_last": True},
        "max_epochs": 1,
        "max_steps": 2,
        "devices": 1,  # an int, as a user writes it: the adapter makes it solo/Lightning-proof
        "accelerator": "cpu",
        "precision": 32,
        "enable_progress_bar": False,
        "seed": 3,
        **extra,
    }
    (folder / f"{method}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return f"{method}.yaml"


# Runs objcrop-solo's main in a fresh interpreter, recording what solo-learn's BaseMethod
# receives: the batches (views after solo-learn's whole pipeline) and a few facts.
RECORDER = textwrap.dedent(
    """
    import json, sys, torch
    from objcrop_plugin.integrations import solo as adapter

    adapter.import_solo()
    import timm.models._registry as registry
    from solo.methods.base import BaseMethod

    out = sys.argv[1]
    steps, facts = [], {}
    original = BaseMethod.training_step

    def training_step(self, batch, batch_idx):
        index, views, targets = batch
        steps.append({
            "index": index.clone(), "views": [v.detach().clone() for v in views],
            "targets": targets.clone(),
        })
        facts.update(
            num_large_crops=self.num_large_crops, num_small_crops=self.num_small_crops,
            method=type(self).__name__, backbone=type(self.backbone).__module__,
            dataset=type(self.trainer.train_dataloader.dataset).__name__,
            convnext_tiny=registry._model_entrypoints["convnext_tiny"].__module__,
            poolformer_s12=registry._model_entrypoints["poolformer_s12"].__module__,
        )
        facts["backbone_finite"] = facts.get("backbone_finite", True) and all(
            bool(torch.isfinite(p).all()) for p in self.backbone.parameters())
        result = original(self, batch, batch_idx)
        facts["loss_finite"] = facts.get("loss_finite", True) and bool(
            torch.isfinite(result["loss"]).all())
        torch.save({"steps": steps, "facts": facts}, out)
        return result

    BaseMethod.training_step = training_step
    sys.exit(adapter.main(sys.argv[2:]))
    """
)


def _train(tmp_path: Path, recipe_dir: Path, recipe: str, *overrides: str) -> dict:
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    out = tmp_path / "record.pt"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), "--config-path", str(recipe_dir),
         "--config-name", recipe, *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    record = torch.load(out, weights_only=False)
    record["stderr"] = proc.stderr
    return record


# --------------------------------------------------------------------------- four methods

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
    recipe = _write_recipe(tmp_path / "recipes", method, OBJ_OBJ_DILATE, data, backbone)
    record = _train(tmp_path, tmp_path / "recipes", recipe)
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
            c0, c1 = _colours(v0), _colours(v1)
            inside, dilated = (v0, v1) if c0["blue"] <= c1["blue"] else (v1, v0)
            colour = _object_of(inside)
            assert _dilated_object_of(dilated) == colour
            seen.add(colour)
    assert seen == {"red", "green"}  # the proposal is drawn per sample
    assert "0 fell back to scene crops" in record["stderr"]


def test_multicrop_counts_small_crops_and_keeps_solo_crops_for_plain_entries(
    solo_root, scenes, tmp_path
):
    augmentations = [
        _entry("object_aware"),  # large, from the proposal
        _entry(None),  # large, solo-learn's own RandomResizedCrop of the scene
        _entry({"policy": "object", "scale": [0.3, 1.0]}, size=32, n=2),  # small, same proposal
    ]
    data = {"dataset": "custom", "train_path": str(scenes / "train"),
            "proposals": str(scenes / "train.objcrop")}
    recipe = _write_recipe(tmp_path / "recipes", "simclr", augmentations, data)
    record = _train(tmp_path, tmp_path / "recipes", recipe)
    facts = record["facts"]
    assert facts["num_large_crops"] == 2 and facts["num_small_crops"] == 2
    for step in record["steps"]:
        views = step["views"]
        assert [tuple(v.shape[1:]) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
        for b in range(4):
            colour = _object_of(views[0][b])
            assert _colours(views[1][b])["blue"] > 0.1  # a scene crop: mostly background
            assert _object_of(views[2][b]) == _object_of(views[3][b]) == colour


def test_shipped_demo_recipe_runs_with_the_console_script(solo_root, tmp_path):
    from objcrop_plugin.data.synthetic import write_dataset

    demo = write_dataset(tmp_path / "datasets" / "objcrop-demo", n_images=8, size=(128, 96))
    command = shutil.which("objcrop-solo")
    command = [command] if command else [sys.executable, "-m", "objcrop_plugin.integrations.solo"]
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


ERRORS = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from objcrop_plugin.integrations import solo as adapter

    results = []
    for overrides in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = adapter.main([*sys.argv[2:], *overrides])
            except SystemExit as exc:
                rc = exc.code
        results.append({"rc": rc, "stderr": err.getvalue()})
    print(json.dumps(results))
    """
)


def test_clear_errors_through_main_pretrain(solo_root, scenes, tmp_path):
    data = {"dataset": "custom", "train_path": str(scenes / "train"),
            "proposals": str(scenes / "train.objcrop")}
    recipe = _write_recipe(tmp_path / "recipes", "simclr", OBJ_OBJ_DILATE, data)
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


# --------------------------------------------------------------------------- no solo-learn needed

def _cfg(augmentations, **data):
    return {"augmentations": augmentations,
            "data": {"dataset": "custom", "train_path": "train", **data}}


def test_recipe_forms(scenes):
    plan = parse_object_aware(_cfg(
        [_entry("object_aware"),
         _entry({"policy": "object_dilated", "dilation": 0.2, "dilation_mode": "coordinate"}),
         _entry(None), _entry("rrc"),
         _entry({"name": "object_aware", "policy": "scene", "scale": [0.5, 1.0]}, size=32, n=3)],
        proposals=str(scenes / "train.objcrop"),
    ))
    assert plan.enabled and plan.needs_proposals
    names = [e.policy.name if e.policy else None for e in plan.entries]
    assert names == ["object", "object_dilated", None, None, "scene"]
    assert plan.entries[0].policy.scale == (0.2, 1.0)  # from the entry's rrc
    assert plan.entries[1].policy.dilation == 0.2
    assert plan.entries[1].policy.dilation_mode == "coordinate"
    assert plan.entries[4].policy.scale == (0.5, 1.0)  # an explicit scale wins
    assert [e.local for e in plan.entries] == [False] * 4 + [True]  # solo-learn's size rule
    assert plan.proposals == scenes / "train.objcrop"
    assert plan.choice.top_k == 10 and plan.shuffle_views and plan.engine == "cpu"
    recipe = plan.recipe()
    assert [v.local for v in recipe.views] == [False, False, True, True, True]


def test_recipe_wide_settings_and_conflicts(scenes):
    store = str(scenes / "train.objcrop")
    cfg = _cfg([_entry({"policy": "object", "top_k": 3}), _entry("object_dilated")],
               proposals=store)
    cfg["crop"] = {"min_area": 0.01, "shuffle_views": False, "strict": True}
    plan = parse_object_aware(cfg)
    assert (plan.choice.top_k, plan.choice.min_area) == (3, 0.01)
    assert not plan.shuffle_views and plan.strict

    cfg["crop"]["top_k"] = 5
    with pytest.raises(SoloConfigError, match=r"augmentations\[0\]\.crop\.top_k=3 disagrees"):
        parse_object_aware(cfg)
    with pytest.raises(SoloConfigError, match="crop: unknown key"):
        parse_object_aware({**cfg, "crop": {"topk": 5}})
    with pytest.raises(SoloConfigError, match="crop.engine"):
        parse_object_aware({**cfg, "crop": {"engine": "tpu"}})


def test_recipe_errors_name_the_key_and_the_fix(scenes, tmp_path):
    store = str(scenes / "train.objcrop")
    with pytest.raises(SoloConfigError, match=r"augmentations\[1\]\.crop\.policy.*objekt"):
        parse_object_aware(_cfg([_entry(None), _entry({"policy": "objekt"})], proposals=store))
    with pytest.raises(SoloConfigError, match=r"augmentations\[0\]\.crop.*dilatation.*accepts"):
        parse_object_aware(_cfg([_entry({"policy": "object", "dilatation": 0.1})], proposals=store))
    with pytest.raises(SoloConfigError, match=r"augmentations\[0\]\.crop\.policy: 'obj_obj_dilate' is a view recipe.*Fix"):
        parse_object_aware(_cfg([_entry("obj_obj_dilate")], proposals=store))
    with pytest.raises(SoloConfigError, match="data.proposals.*names no proposal store.*Fix"):
        parse_object_aware(_cfg([_entry("object_aware")]))
    with pytest.raises(SoloConfigError, match="does not exist.*objcrop proposals build"):
        parse_object_aware(_cfg([_entry("object_aware")], proposals=str(tmp_path / "x.objcrop")))
    bad = tmp_path / "bad.objcrop"
    bad.write_bytes(b"not a store at all, sorry")
    with pytest.raises(SoloConfigError, match="data.proposals: .*not an objcrop proposal store"):
        parse_object_aware(_cfg([_entry("object_aware")], proposals=str(bad)))
    with pytest.raises(SoloConfigError, match="data.format: dali.*Fix"):
        parse_object_aware(_cfg([_entry("object_aware")], proposals=store, format="dali"))
    with pytest.raises(SoloConfigError, match="data.format: h5"):
        parse_object_aware(_cfg([_entry("object_aware")], proposals=store, format="h5"))
    cfg = _cfg([_entry("object_aware")], proposals=store)
    cfg["data"]["dataset"] = "stl10"
    with pytest.raises(SoloConfigError, match="data.dataset: stl10 is not a folder"):
        parse_object_aware(cfg)
    with pytest.raises(SoloConfigError, match="augmentations: .*non-empty list"):
        parse_object_aware({"data": {"dataset": "custom", "train_path": "x"}})
    with pytest.raises(SoloConfigError, match="integer crop_size"):
        parse_object_aware(_cfg([{"crop": "object_aware", "num_crops": 1}], proposals=store))


def test_recipes_without_object_aware_entries_are_left_to_solo(scenes):
    plan = parse_object_aware(_cfg([_entry(None, n=2)], format="dali"))
    assert not plan.enabled  # DALI, no proposals: fine, solo-learn runs untouched
    # scene-only object-aware entries need no store
    assert parse_object_aware(_cfg([_entry("scene", n=2)])).enabled


def test_parses_omegaconf_nodes(scenes):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        _cfg([_entry("object_aware"), _entry("object_dilated")],
             proposals=str(scenes / "train.objcrop"))
    )
    assert [e.policy.name for e in parse_object_aware(cfg).entries] == ["object", "object_dilated"]


def _solo_like_pipeline(size: int) -> T.Compose:
    """What solo-learn's build_transform_pipeline returns (photometrics off)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(0.5),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def _transform(scenes, augmentations, **crop) -> ObjectAwareTransform:
    cfg = _cfg(augmentations, proposals=str(scenes / "train.objcrop"))
    cfg["crop"] = crop
    plan = parse_object_aware(cfg)
    return ObjectAwareTransform(plan, [_solo_like_pipeline(e.crop_size) for e in plan.entries])


def test_transform_keeps_solo_order_and_shares_one_proposal(scenes):
    transform = _transform(scenes, [
        _entry("object_aware", n=2),
        _entry(None),
        _entry({"policy": "object_dilated", "dilation": 0.05}),
        _entry("object", size=32, n=2),
    ])
    image = _scene(0)
    colours = set()
    for index in range(40):
        views = transform(image, key="a/000.png", index=index)
        assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 4 + [(3, 32, 32)] * 2
        # the large object-aware views (slots 0, 1, 3: two inside the box, one inside the
        # dilated box) are shuffled among their entries; solo's scene crop stays in slot 2
        large = sorted((views[k] for k in (0, 1, 3)), key=lambda v: _colours(v)["blue"])
        colour = _object_of(large[0])
        assert _object_of(large[1]) == _dilated_object_of(large[2]) == colour
        assert _object_of(views[4]) == _object_of(views[5]) == colour
        assert _colours(views[2])["blue"] > 0.1
        colours.add(colour)
    assert colours == {"red", "green"}
    assert transform.recipe.fallbacks.as_dict() == {"samples": 40, "missing": 0, "unusable": 0}


def test_transform_falls_back_to_scene_crops_and_counts(scenes):
    transform = _transform(scenes, [_entry("object_aware"), _entry("object_dilated")])
    views = transform(_scene(0), key="not/in/store.png", index=0)
    assert len(views) == 2
    views = transform(_scene(0))  # no key at all (someone else's dataset)
    assert transform.recipe.fallbacks.as_dict() == {"samples": 2, "missing": 2, "unusable": 0}
    strict = _transform(scenes, [_entry("object_aware")], strict=True)
    with pytest.raises(LookupError, match="not/in/store.png"):
        strict(_scene(0), key="not/in/store.png", index=0)


def test_transform_rescales_boxes_to_the_decoded_image(scenes):
    transform = _transform(scenes, [_entry("object_aware")])
    big = _scene(0).resize((W * 3, H * 3), Image.Resampling.NEAREST)
    for index in range(10):
        _object_of(transform(big, key="a/000.png", index=index)[0])


def test_dataset_items_keep_solos_format_and_pickle(scenes):
    transform = _transform(scenes, [_entry("object_aware"), _entry("object_dilated")])
    base = ImageFolder(str(scenes / "train"))
    dataset = ObjectAwareSoloDataset(base, transform, scenes / "train")
    assert len(dataset) == 8 and dataset.classes == ["a", "b"]  # forwarded to solo's dataset
    index, views, target = dataset[5]
    assert index == 5 and target == 1 and len(views) == 2
    assert dataset.key(5) == "b/005.png"
    clone = pickle.loads(pickle.dumps(dataset))  # module-level classes: spawn workers can
    assert clone.key(5) == "b/005.png" and len(clone[0][1]) == 2
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    idx, batch_views, targets = next(iter(loader))
    assert idx.tolist() == [0, 1, 2, 3] and targets.tolist() == [0] * 4
    assert [tuple(v.shape) for v in batch_views] == [(4, 3, 64, 64)] * 2

    plain = IndexedDataset(ImageFolder(str(scenes / "train"), transform=T.ToTensor()))
    again = pickle.loads(pickle.dumps(plain))
    i, x, y = again[2]
    assert (i, y, tuple(x.shape)) == (2, 0, (3, H, W))


def test_dataset_decodes_upright_exif_images(tmp_path):
    # stored rotated, with an EXIF tag that turns it upright: boxes refer to the upright image
    folder = tmp_path / "exif" / "a"
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 degrees clockwise
    stored = _scene(0).transpose(Image.Transpose.ROTATE_90)
    stored.save(folder / "000.jpg", exif=exif, quality=100, subsampling=0)
    store = tmp_path / "exif.objcrop"
    ProposalStore.write(store, [("a/000.jpg", _boxes(0), [1.0, 1.0], (W, H))])
    plan = parse_object_aware(_cfg([_entry("object_aware")], proposals=str(store)))
    transform = ObjectAwareTransform(plan, [_solo_like_pipeline(64)])
    dataset = ObjectAwareSoloDataset(ImageFolder(str(tmp_path / "exif")), transform,
                                     tmp_path / "exif")
    assert dataset.key(0) == "a/000.jpg"
    for _ in range(10):
        _object_of(dataset[0][1][0])
    assert transform.recipe.fallbacks.fallbacks == 0


def test_key_check_reports_a_store_built_over_another_folder(scenes):
    transform = _transform(scenes, [_entry("object_aware")])
    wrong = ProposalStore(scenes / "wrong.objcrop")
    dataset = ObjectAwareSoloDataset(ImageFolder(str(scenes / "train")), transform, scenes / "train")
    with pytest.raises(SoloConfigError, match=r"'a/000.png'.*keys look like 'images/000.png'.*Fix"):
        adapter.check_keys(dataset, wrong, strict=False)
    assert adapter.check_keys(dataset, transform.store, strict=False) == 1.0


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
    monkeypatch.setattr(adapter.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SoloNotFoundError) as info:
        find_solo_root()
    message = str(info.value)
    assert INSTALL_HINT in message and "setuptools<82" in message and "--no-deps" in message


def test_cli_without_a_checkout_says_how_to_install(tmp_path, capsys, monkeypatch):
    (tmp_path / "r.yaml").write_text("method: simclr\n")
    monkeypatch.delenv("SOLO_ROOT", raising=False)
    rc = adapter.main(["--solo-root", str(tmp_path), "--config-path", str(tmp_path),
                       "--config-name", "r.yaml"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("objcrop-solo: error: --solo-root=") and "pip install --no-deps" in err
    assert adapter.main(["--help"]) == 0
    assert "--config-path DIR --config-name NAME.yaml" in capsys.readouterr().out


def test_adapter_imports_without_solo_and_says_how_to_install():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["solo"] = None  # as if solo-learn were not installed
        import objcrop_plugin.solo  # the adapter's own logic needs no solo-learn
        from objcrop_plugin.integrations.solo import SoloNotFoundError, import_solo
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


def test_skip_reason_says_how_to_install(monkeypatch):
    def missing(explicit=None):
        raise SoloNotFoundError("no solo")

    monkeypatch.setattr(sys.modules[__name__], "find_solo_root", missing)
    assert _solo_missing() == SOLO_SKIP == INSTALL_HINT


def test_timm_backbone(tmp_path):
    model = timm_backbone("simclr", model_name="test_resnet")
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, model.num_features)
    with pytest.raises(SoloConfigError, match="'resnet5O' is not a timm model.*resnet50"):
        timm_backbone("simclr", model_name="resnet5O")
    with pytest.raises(SoloConfigError, match="model_name"):
        timm_backbone("simclr")
    with pytest.raises(SoloConfigError, match="local file.*checkpoint=PATH"):
        timm_backbone("simclr", model_name="test_resnet", pretrained=True)
    # a local checkpoint (with a classifier head) loads into the headless backbone
    import timm

    source = timm.create_model("test_resnet", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = timm_backbone("simclr", model_name="test_resnet", checkpoint=str(tmp_path / "w.pth"))
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(SoloConfigError, match="checkpoint: .* does not exist"):
        timm_backbone("simclr", model_name="test_resnet", checkpoint=str(tmp_path / "no.pth"))


def test_timm_registry_is_restored_after_a_solo_style_override():
    import warnings

    import timm
    from timm.models import _registry as registry

    original = registry._model_entrypoints["test_resnet"]
    fake_module = type(sys)("solo.fake_backbones")
    sys.modules["solo.fake_backbones"] = fake_module

    def test_resnet(**kwargs):  # what solo-learn's register_model'd factories look like
        raise AssertionError("solo-learn's version")

    test_resnet.__module__ = "solo.fake_backbones"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            registry.register_model(test_resnet)
        assert registry._model_entrypoints["test_resnet"] is test_resnet
        assert adapter.restore_timm_registry() == ["test_resnet"]
        assert registry._model_entrypoints["test_resnet"] is original
        assert timm.create_model("test_resnet", num_classes=0).num_features > 0
    finally:
        registry._model_entrypoints["test_resnet"] = original
        del sys.modules["solo.fake_backbones"]


# --------------------------------------------------------------------------- GPU mode

def _gpu_setup(scenes, augmentations, **data):
    cfg = _cfg(augmentations, proposals=str(scenes / "train.objcrop"), **data)
    cfg["crop"] = {"engine": "gpu"}
    plan = parse_object_aware(cfg)
    return cfg, plan, adapter.gpu_views(cfg, plan)


class _SoloLikeMethod:
    """Stands in for a solo-learn method class: Lightning's hook passes batches through."""

    def __init__(self, cfg):
        self.cfg = cfg

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch


def test_gpu_mode_cuts_solo_views_after_transfer(scenes):
    pytest.importorskip("kornia")
    cfg, plan, views = _gpu_setup(scenes, [
        _entry("object_aware"),
        _entry(None),  # solo-learn's RandomResizedCrop, made on the device as a scene window
        _entry({"policy": "object", "scale": [0.3, 1.0]}, size=32, n=2),
    ])
    assert views.canvas == (128, 128) and list(views.scenes) == [1]
    dataset = adapter.ObjectAwareCanvasDataset(
        ImageFolder(str(scenes / "train")), views, scenes / "train")
    item = dataset[5]
    assert item["index"] == 5 and item["target"] == 1 and item["key"] == "b/005.png"
    assert tuple(item["windows"].shape) == (4, 4) and item["canvas"].dtype == torch.uint8
    pickle.loads(pickle.dumps(dataset))  # workers under spawn
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)  # solo-learn's default collate
    method = adapter.gpu_method(_SoloLikeMethod, views.engine)(cfg)
    assert issubclass(type(method), _SoloLikeMethod)
    assert type(method).__name__ == "ObjectAwareGPU_SoloLikeMethod"
    for batch in loader:
        index, out, targets = method.on_after_batch_transfer(batch, 0)  # solo-learn's format
        assert [tuple(v.shape) for v in out] == [(4, 3, 64, 64)] * 2 + [(4, 3, 32, 32)] * 2
        assert targets.dtype == torch.int64 and index.tolist() == batch["index"].tolist()
        for b in range(4):
            colour = _object_of(out[0][b])
            assert _colours(out[1][b])["blue"] > 0.1
            assert _object_of(out[2][b]) == _object_of(out[3][b]) == colour
    plain = [torch.zeros(2, 3, 8, 8), torch.zeros(2)]  # a validation batch passes through
    assert method.on_after_batch_transfer(plain, 0) is plain


def test_gpu_mode_uses_each_entrys_photometrics():
    from objcrop_plugin.engine.photometric import photometrics

    moco = dict(_entry("object_aware"))
    moco.update({
        "color_jitter": {"prob": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                         "hue": 0.1},
        "grayscale": {"prob": 0.2}, "gaussian_blur": {"prob": 0.5},
    })
    assert adapter._entry_photometric(moco, "custom", "x") == photometrics("mocov2").globals_[0]
    solarized = {**moco, "solarization": {"prob": 0.2}, "mean": [0.5] * 3, "std": [0.25] * 3}
    p = adapter._entry_photometric(solarized, "custom", "x")
    assert p.solarize == 0.2 and not p.solarize_before_blur and p.mean == (0.5,) * 3
    assert adapter._entry_photometric(solarized, "imagenet", "x").mean == (0.485, 0.456, 0.406)


def test_gpu_mode_errors(scenes):
    with pytest.raises(SoloConfigError, match=r"augmentations\[0\]\.equalization.*Fix"):
        _gpu_setup(scenes, [{**_entry("object_aware"), "equalization": {"prob": 0.2}}])
    with pytest.raises(SoloConfigError, match=r"augmentations\[2\]: .*large entries before"):
        _gpu_setup(scenes, [_entry("object_aware"), _entry("object", size=32), _entry(None)])
    plain = _entry(None)
    plain["rrc"] = {"enabled": False}
    with pytest.raises(SoloConfigError, match=r"augmentations\[1\]\.rrc\.enabled"):
        _gpu_setup(scenes, [_entry("object_aware"), plain])
    odd = _entry("object", size=32)
    odd["grayscale"] = {"prob": 1.0}
    with pytest.raises(SoloConfigError, match="same photometrics"):
        _gpu_setup(scenes, [_entry("object_aware", n=2), _entry("object", size=32), odd])


def test_gpu_mode_trains_through_main_pretrain(solo_root, scenes, tmp_path):
    pytest.importorskip("kornia")
    data = {"dataset": "custom", "train_path": str(scenes / "train"),
            "proposals": str(scenes / "train.objcrop")}
    recipe = _write_recipe(tmp_path / "recipes", "simclr", OBJ_OBJ_DILATE, data)
    record = _train(tmp_path, tmp_path / "recipes", recipe, "++crop.engine=gpu")
    assert record["facts"]["method"] == "ObjectAwareGPUSimCLR"
    assert record["facts"]["dataset"] == "ObjectAwareCanvasDataset"
    assert len(record["steps"]) == 2 and record["facts"]["loss_finite"]
    for step in record["steps"]:
        views = step["views"]
        assert [tuple(v.shape) for v in views] == [(4, 3, 64, 64)] * 2
        for b in range(4):
            c0, c1 = _colours(views[0][b]), _colours(views[1][b])
            inside, dilated = (views[0][b], views[1][b]) if c0["blue"] <= c1["blue"] else (
                views[1][b], views[0][b])
            assert _dilated_object_of(dilated) == _object_of(inside)


# --------------------------------------------------------------------------- shipped recipes

def _compose(name: str, *overrides: str):
    hydra = pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.2"):
        return compose(config_name=name, overrides=list(overrides))
    del hydra


@pytest.mark.parametrize("method", ["simclr", "mocov2plus", "byol", "vicreg"])
def test_shipped_recipes_have_the_papers_settings(method):
    cfg = _compose(f"{method}.yaml")
    assert cfg.method == method and cfg.backbone.name == "resnet50"
    assert cfg.data.format == "image_folder" and cfg.data.proposals
    plan = parse_object_aware(cfg, check_paths=False)
    assert [(e.policy.name, e.crop_size, e.num_crops) for e in plan.entries] == [
        ("object", 224, 1), ("object_dilated", 224, 1)]
    assert plan.entries[1].policy.dilation == 0.1 and plan.choice.top_k == 10
    for entry in cfg.augmentations:  # MoCo-v2 photometrics
        cj = entry.color_jitter
        assert (cj.prob, cj.brightness, cj.contrast, cj.saturation, cj.hue) == (
            0.8, 0.4, 0.4, 0.4, 0.1)
        assert entry.grayscale.prob == 0.2 and entry.gaussian_blur.prob == 0.5
        assert entry.solarization.prob == 0.0 and entry.horizontal_flip.prob == 0.5


def test_shipped_augmentation_groups():
    multicrop = parse_object_aware(
        _compose("simclr.yaml", "augmentations=object_aware_multicrop.yaml"), check_paths=False
    )
    assert [(e.policy.name, e.crop_size, e.num_crops, e.local) for e in multicrop.entries] == [
        ("object", 224, 1, False), ("object_dilated", 224, 1, False), ("object", 96, 6, True)]
    obj_scene = parse_object_aware(
        _compose("simclr.yaml", "augmentations=obj_scene.yaml"), check_paths=False
    )
    assert [e.object_aware for e in obj_scene.entries] == [True, False]
    scene = parse_object_aware(_compose("simclr.yaml", "augmentations=scene.yaml"))
    assert not scene.enabled
    demo = parse_object_aware(_compose("demo_cpu.yaml"), check_paths=False)
    assert [e.crop_size for e in demo.entries] == [64, 64]
