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
    compose_recipe,
    dilated_object_of,
    make_entry,
    object_of,
    train_through_main,
    write_recipe,
)

from objcrop_plugin.integrations.solo.errors import INSTALL_HINT
from objcrop_plugin.integrations.solo.patch import fix_solo_quirks, lightning_devices

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
    # that ignores every target), so only labelled runs have a finite total loss; the
    # method's own loss is finite in every run
    assert facts["loss_finite"] or data.get("no_labels")
    assert facts["ssl_losses"] >= 2 and facts["ssl_loss_finite"]
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
    def fixed(cfg):
        fix_solo_quirks(cfg)
        before = dict(cfg)
        lightning_devices(cfg)
        return before, cfg

    # before solo-learn's parse_cfg: the list of devices, whose length it scales the LR by
    assert fixed({"accelerator": "cpu", "devices": 1, "strategy": None}) == (
        {"accelerator": "cpu", "devices": [0], "strategy": "auto"},
        {"accelerator": "cpu", "devices": "1", "strategy": "auto"})
    for devices in (2, "2", [0, 1]):
        before, after = fixed({"accelerator": "cpu", "devices": devices})
        assert len(before["devices"]) == 2 and after["devices"] == "2", devices
    for devices, listed in ((2, [0, 1]), ("2", [0, 1]), ("0,1", [0, 1]), ("1,", [1]), ([2, 3], [2, 3])):
        before, after = fixed({"accelerator": "gpu", "devices": devices, "strategy": "ddp"})
        assert before == after == {"accelerator": "gpu", "devices": listed, "strategy": "ddp"}
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"accelerator": "cpu", "devices": 1})
    fix_solo_quirks(node)
    assert len(node.devices) == 1
    lightning_devices(node)
    assert node.devices == "1"


@pytest.mark.parametrize("devices", [1, 2])
def test_solo_scales_the_learning_rate_by_every_cpu_device(solo_root, tmp_path, devices):
    """solo-learn's parse_cfg multiplies the LR by batch size x len(devices) / 256: two CPU
    processes count twice (a string "2" would count once)."""
    from omegaconf import OmegaConf
    from solo.args import pretrain

    from objcrop_plugin.integrations.solo.patch import install

    undo = install(solo_root)
    try:
        cfg = compose_recipe("simclr.yaml", "augmentations=scene.yaml", "accelerator=cpu",
                             f"devices={devices}", "optimizer.batch_size=64", "optimizer.lr=0.4",
                             f"data.train_path={tmp_path}")
        OmegaConf.set_struct(cfg, False)  # as main_pretrain.py does before parse_cfg
        cfg = pretrain.parse_cfg(cfg)
    finally:
        undo()
    assert cfg.optimizer.lr == pytest.approx(0.4 * 64 * devices / 256)
    assert cfg.devices == str(devices)  # what Lightning's CPU accelerator takes


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


@pytest.mark.parametrize("accelerator", ["auto", None, "AUTO"])
def test_auto_accelerator_without_a_gpu_is_the_cpu(monkeypatch, accelerator):
    """Finding 4: `accelerator: auto` (or none) on a CPU-only machine is treated as `cpu`:
    `devices: 1` becomes "1", not [0] (which Lightning's CPU accelerator refuses)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = {"devices": 1} if accelerator is None else {"accelerator": accelerator, "devices": 1}
    fix_solo_quirks(cfg)
    lightning_devices(cfg)
    assert cfg["devices"] == "1"
    cfg = {"accelerator": accelerator, "devices": [0, 1]}
    fix_solo_quirks(cfg)
    lightning_devices(cfg)
    assert cfg["devices"] == "2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = {"accelerator": accelerator, "devices": 2}
    fix_solo_quirks(cfg)
    lightning_devices(cfg)
    assert cfg["devices"] == [0, 1]


def test_run_identity_tells_crop_setups_apart(scenes, tmp_path):
    """Finding 1: the hash auto-resume compares differs between a scene baseline and an
    object-aware run, between proposal stores, between sampling modes, and when a store is
    rebuilt in place; it is stable for the same setup."""
    import shutil

    from objcrop_plugin.integrations.solo.patch import run_identity
    from objcrop_plugin.proposals import ProposalStore

    store = tmp_path / "p.objcrop"
    shutil.copy(scenes / "flat.objcrop", store)
    scene = [make_entry(None), make_entry(None)]

    def cfg(augmentations, **data):
        return {"augmentations": augmentations, "crop": {"top_k": 10},
                "data": {"dataset": "custom", "train_path": str(scenes / "flat"),
                         "proposals": str(store), **data}}

    base = run_identity(cfg(OBJ_OBJ_DILATE))[0]
    assert base == run_identity(cfg(OBJ_OBJ_DILATE))[0] and len(base) == 12
    others = {
        run_identity(cfg(scene))[0],
        run_identity(cfg(OBJ_OBJ_DILATE, proposals=str(scenes / "flat.objcrop")))[0],
        run_identity(cfg(OBJ_OBJ_DILATE, sampling="per_box"))[0],
        run_identity({**cfg(OBJ_OBJ_DILATE), "crop": {"top_k": 3}})[0],
    }
    assert len(others) == 4 and base not in others
    digest, what = run_identity(cfg(scene))
    assert "solo, solo crops" in what and "p.objcrop" in what and "per_image" in what
    # the same path rebuilt with other boxes (the same size on disk) is another setup
    size = store.stat().st_size
    with ProposalStore(store) as s:
        records = [(k, s[k].boxes + 1, s[k].scores, s[k].image_size) for k in s.keys()]  # noqa: SIM118
    ProposalStore.write(store, records)
    assert store.stat().st_size == size
    assert run_identity(cfg(OBJ_OBJ_DILATE))[0] != base


def test_objcrop_warnings_get_through_hydras_disabled_logging(capsys):
    """Finding 2: under `hydra/job_logging: disabled` (root at ERROR, existing loggers
    disabled) objcrop's warnings are re-enabled and reach stderr; undone afterwards."""
    import logging
    import logging.config

    from objcrop_plugin.integrations.solo.patch import enable_objcrop_warnings

    logger = logging.getLogger("objcrop_plugin")
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved = (logger.disabled, logger.level, logger.propagate, list(logger.handlers))
    # dictConfig disables every existing logger (the package's modules' too): restore them all
    others = {lg: lg.disabled for lg in logging.root.manager.loggerDict.values()
              if isinstance(lg, logging.Logger)}
    try:
        logging.config.dictConfig({"version": 1, "root": {"level": "ERROR"},
                                   "disable_existing_loggers": True})  # hydra's "disabled"
        logger.warning("objcrop: lost")
        assert "lost" not in capsys.readouterr().err
        undo = enable_objcrop_warnings()
        logger.warning("objcrop: %.1f%% of the images checked have no proposals", 11.1)
        logger.info("objcrop: not at INFO")
        err = capsys.readouterr().err
        assert "objcrop: 11.1% of the images checked have no proposals" in err
        assert "not at INFO" not in err
        undo()
        assert logger.disabled and not logger.handlers
    finally:
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]
        logger.disabled, logger.level, logger.propagate = saved[:3]
        logger.handlers[:] = saved[3]
        for lg, disabled in others.items():
            lg.disabled = disabled


def test_end_of_run_line_counts_proposal_crops_fallbacks_and_bad_images(monkeypatch):
    """Findings 7 and 2: "N samples, N-F cropped from proposals, F fell back ..." and the
    unreadable images skipped, with an example file."""
    from types import SimpleNamespace

    from objcrop_plugin.integrations.solo.cli import end_of_run_line
    from objcrop_plugin.integrations.solo.datasets import SoloBadImages
    from objcrop_plugin.integrations.solo.patch import STATE
    from objcrop_plugin.stats import FallbackCounter

    counter = FallbackCounter({"samples": 32, "missing": 3, "unusable": 1})
    bad = SoloBadImages(32, 0.2)
    bad.record(5, "flat/img_005.jpg", "truncated")
    dataset = SimpleNamespace(bad=bad, item=lambda i: (f"/data/flat/img_{i:03d}.jpg", -1))
    monkeypatch.setattr(STATE, "planner", SimpleNamespace(recipe=SimpleNamespace(fallbacks=counter)))
    monkeypatch.setattr(STATE, "dataset", dataset)
    assert end_of_run_line() == (
        "objcrop: 32 samples, 28 cropped from proposals, 4 fell back to scene crops (no entry: "
        "3, no usable box: 1, stored size of another aspect: 0); 1 unreadable image skipped, "
        "e.g. /data/flat/img_005.jpg (data.max_failure_rate 0.2)"
    )
    monkeypatch.setattr(STATE, "dataset", None)
    assert end_of_run_line().endswith("stored size of another aspect: 0)")


def test_too_many_bad_images_names_the_solo_key_in_one_line():
    """Finding 3: the error names data.max_failure_rate (not objcrop train's key), survives
    pickling to DataLoader workers, and is one line also when a worker raised it."""
    import pickle

    from objcrop_plugin.integrations.solo.datasets import SoloBadImages
    from objcrop_plugin.integrations.solo.patch import bad_images_message
    from objcrop_plugin.stats import TooManyBadImagesError

    bad = pickle.loads(pickle.dumps(SoloBadImages(8, 0.01)))
    assert isinstance(bad, SoloBadImages)
    with pytest.raises(TooManyBadImagesError) as info:
        bad.record(0, "flat/000.png", "truncated")
    message = str(info.value)
    assert message.startswith("1 of 8 images could not be read, more than data.max_failure_rate"
                              "=0.01 (1.00%) allows; e.g. flat/000.png (truncated)")
    assert "++data.max_failure_rate=" in message and "objcrop train" not in message
    # torch re-raises a worker's exception with the worker's traceback in the message
    reraised = TooManyBadImagesError(
        "Caught TooManyBadImagesError in DataLoader worker process 0.\nOriginal Traceback (most "
        "recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
        f"objcrop_plugin.stats.TooManyBadImagesError: {message}\n")
    assert bad_images_message(reraised) == message == bad_images_message(info.value)
