"""Shared by the solo-learn adapter's tests: two-object scenes, recipes, and a recorder.

The "crops came from proposals" checks use scenes with exactly two objects in distinctive
colours (a red and a green rectangle on blue), a proposal store holding exactly their boxes,
and no colour augmentation: a view cut inside a box is that object's colour, a view cut
inside the dilated box still shows that object and never the other one, and a scene crop
shows the blue background.

Tests that run solo-learn (the ``solo_root`` fixture) train two steps through the real
``main_pretrain.py`` in a subprocess (:func:`train_through_main`, forked from a process that
has imported solo-learn once: ``warm_python``), so solo-learn's global state never leaks into
the test process or from one run to the next; they skip, saying how to install solo-learn, when no
checkout is found.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import warm_python
import yaml
from PIL import Image
from torchvision import transforms as T

from objcrop_plugin.integrations.solo.cli import find_solo_root
from objcrop_plugin.integrations.solo.errors import SoloNotFoundError
from objcrop_plugin.solo import ObjectAwareTransform, parse_object_aware

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "recipes" / "solo"
SOLO_SKIP = (
    "solo-learn is not installed: check out github.com/vturrisi/solo-learn and pip install "
    "--no-deps --build-constraint <file with setuptools<82> <checkout> (older pip: "
    "PIP_CONSTRAINT=<file> pip install --no-deps <checkout>; see README)"
)

# scene layout: blue background, a red and a green rectangle far apart
# scene layout: blue background, a red and a green rectangle far apart
W, H = 128, 96
RED_BOX = (8, 8, 56, 48)
GREEN_BOX = (72, 48, 120, 88)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # solo-learn's ImageNet default


def solo_missing() -> str | None:
    try:
        find_solo_root()
    except SoloNotFoundError:
        return SOLO_SKIP

    for module in ("lightning", "hydra", "omegaconf", "timm", "einops", "sklearn", "torchmetrics"):
        if importlib.util.find_spec(module) is None:
            return f"{SOLO_SKIP}; solo-learn's dependency {module} is missing (objcrop-plugin[solo])"
    return None


def scene_image(shift: int) -> Image.Image:
    a = np.zeros((H, W, 3), np.uint8)
    a[...] = (0, 0, 255)
    x1, y1, x2, y2 = RED_BOX
    a[y1 + shift : y2 + shift, x1 + shift : x2 + shift] = (255, 0, 0)
    x1, y1, x2, y2 = GREEN_BOX
    a[y1 - shift : y2 - shift, x1 - shift : x2 - shift] = (0, 255, 0)
    return Image.fromarray(a)


def scene_boxes(shift: int) -> list[list[float]]:
    r, g = RED_BOX, GREEN_BOX
    return [[v + shift for v in r], [v - shift for v in g]]


def colour_fractions(view: torch.Tensor) -> dict[str, float]:
    """Fractions of red, green and blue pixels of one normalised view ``(3, h, w)``."""
    rgb = view * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    r, g, b = rgb
    hi, lo = 0.6, 0.4
    return {
        "red": float(((r > hi) & (g < lo) & (b < lo)).float().mean()),
        "green": float(((g > hi) & (r < lo) & (b < lo)).float().mean()),
        "blue": float(((b > hi) & (r < lo) & (g < lo)).float().mean()),
    }


def object_of(view: torch.Tensor) -> str:
    """The object a view cut *inside a box* shows; asserts it shows nothing else."""
    c = colour_fractions(view)
    colour = max(("red", "green"), key=c.get)
    other = "green" if colour == "red" else "red"
    assert c[colour] > 0.75 and c[other] == 0.0 and c["blue"] < 0.05, c
    return colour


def dilated_object_of(view: torch.Tensor) -> str:
    """The object a view cut inside a *dilated* box shows (never the other one)."""
    c = colour_fractions(view)
    colour = max(("red", "green"), key=c.get)
    other = "green" if colour == "red" else "red"
    assert c[colour] > 0.3 and c[other] == 0.0, c
    return colour


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


def make_entry(crop=None, size: int = 64, n: int = 1, scale=(0.2, 1.0)) -> dict:
    entry = {} if crop is None else {"crop": crop}
    entry["rrc"] = {"enabled": True, "crop_min_scale": scale[0], "crop_max_scale": scale[1]}
    entry.update(PHOTOMETRICS_OFF)
    entry.update({"crop_size": size, "num_crops": n})
    return entry


OBJ_OBJ_DILATE = [make_entry("object_aware"), make_entry({"policy": "object_dilated", "dilation": 0.05})]


def write_recipe(folder: Path, method: str, augmentations: list, data: dict,
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
    from objcrop_plugin.integrations.solo.patch import import_solo
    from objcrop_plugin.solo import main

    import_solo()
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
            dataset_len=len(self.trainer.train_dataloader.dataset),
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

    # the methods' own (self-supervised) losses, as they log them
    SSL_LOSSES = ("train_nce_loss", "train_neg_cos_sim", "train_vicreg_loss")
    log, log_dict = BaseMethod.log, BaseMethod.log_dict

    def ssl_seen(name, value):
        if name in SSL_LOSSES:
            facts["ssl_losses"] = facts.get("ssl_losses", 0) + 1
            facts["ssl_loss_finite"] = facts.get("ssl_loss_finite", True) and bool(
                torch.isfinite(torch.as_tensor(value)).all())
            torch.save({"steps": steps, "facts": facts}, out)

    def logged(self, name, value, *args, **kwargs):
        ssl_seen(name, value)
        return log(self, name, value, *args, **kwargs)

    def logged_dict(self, metrics, *args, **kwargs):
        for name, value in metrics.items():
            ssl_seen(name, value)
        return log_dict(self, metrics, *args, **kwargs)

    BaseMethod.training_step = training_step
    BaseMethod.log, BaseMethod.log_dict = logged, logged_dict
    sys.exit(main(sys.argv[2:]))
    """
)


def train_through_main(tmp_path: Path, recipe_dir: Path, recipe: str, *overrides: str) -> dict:
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    out = tmp_path / "record.pt"
    proc = warm_python.shared("solo").run(
        [sys.executable, str(script), str(out), "--config-path", str(recipe_dir),
         "--config-name", recipe, *overrides],
        cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    record = torch.load(out, weights_only=False)
    record["stderr"] = proc.stderr
    return record


def make_cfg(augmentations, **data):
    return {"augmentations": augmentations,
            "data": {"dataset": "custom", "train_path": "train", **data}}


def solo_like_pipeline(size: int) -> T.Compose:
    """What solo-learn's build_transform_pipeline returns (photometrics off)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(0.5),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def make_transform(scenes, augmentations, **crop) -> ObjectAwareTransform:
    cfg = make_cfg(augmentations, proposals=str(scenes / "train.objcrop"))
    cfg["crop"] = crop
    plan = parse_object_aware(cfg)
    return ObjectAwareTransform(plan, [solo_like_pipeline(e.crop_size) for e in plan.entries])


def compose_recipe(name: str, *overrides: str):
    hydra = pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.2"):
        return compose(config_name=name, overrides=list(overrides))
    del hydra


# Runs objcrop-solo's main several times in one fresh interpreter (solo-learn, Lightning and
# torch are imported once), each run's output after a marker line on stdout and stderr.
RUNS = textwrap.dedent(
    """
    import json, sys
    from objcrop_plugin.solo import main

    rcs = []
    for n, overrides in enumerate(json.loads(sys.argv[1])):
        for stream in (sys.stdout, sys.stderr):
            print(f"=== objcrop-test run {n} ===", file=stream, flush=True)
        try:
            rc = main([*sys.argv[2:], *overrides])
        except SystemExit as exc:
            rc = exc.code
        sys.stdout.flush()
        sys.stderr.flush()
        rcs.append(rc)
    print("RCS " + json.dumps(rcs), flush=True)
    """
)


def run_main_several(tmp_path: Path, recipe_dir: Path, recipe: str,
                     runs: list[list[str]]) -> list[dict]:
    """``[{"rc", "stdout", "stderr"}]``, one per run of ``objcrop-solo`` with ``runs[i]``'s
    overrides (see :data:`RUNS`), all in one subprocess started in ``tmp_path``."""
    import json

    script = tmp_path / "runs.py"
    script.write_text(RUNS)
    proc = warm_python.shared("solo").run(
        [sys.executable, str(script), json.dumps(runs), "--config-path", str(recipe_dir),
         "--config-name", recipe],
        cwd=tmp_path, timeout=300,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode == 0 and "RCS " in proc.stdout, tail
    rcs = json.loads(proc.stdout.rsplit("RCS ", 1)[1])
    outs = [proc.stdout.split(f"=== objcrop-test run {n} ===\n")[1].split("=== objcrop-test")[0]
            for n in range(len(runs))]
    errs = [proc.stderr.split(f"=== objcrop-test run {n} ===\n")[1].split("=== objcrop-test")[0]
            for n in range(len(runs))]
    return [{"rc": rc, "stdout": o, "stderr": e} for rc, o, e in zip(rcs, outs, errs)]
