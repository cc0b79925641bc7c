"""Reading and checking the object-aware part of solo-learn recipes (no solo-learn needed)."""

from __future__ import annotations

import pytest
from solo_testing import compose_recipe, make_cfg, make_entry

from objcrop_plugin.solo import SoloConfigError, parse_object_aware


def test_recipe_forms(scenes):
    plan = parse_object_aware(make_cfg(
        [make_entry("object_aware"),
         make_entry({"policy": "object_dilated", "dilation": 0.2, "dilation_mode": "coordinate"}),
         make_entry(None), make_entry("rrc"),
         make_entry({"name": "object_aware", "policy": "scene", "scale": [0.5, 1.0]}, size=32, n=3)],
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
    cfg = make_cfg([make_entry({"policy": "object", "top_k": 3}), make_entry("object_dilated")],
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
        parse_object_aware(make_cfg([make_entry(None), make_entry({"policy": "objekt"})], proposals=store))
    with pytest.raises(SoloConfigError, match=r"augmentations\[0\]\.crop.*dilatation.*accepts"):
        parse_object_aware(make_cfg([make_entry({"policy": "object", "dilatation": 0.1})], proposals=store))
    with pytest.raises(SoloConfigError, match=r"augmentations\[0\]\.crop\.policy: 'obj_obj_dilate' is a view recipe.*Fix"):
        parse_object_aware(make_cfg([make_entry("obj_obj_dilate")], proposals=store))
    with pytest.raises(SoloConfigError, match="data.proposals.*names no proposal store.*Fix"):
        parse_object_aware(make_cfg([make_entry("object_aware")]))
    with pytest.raises(SoloConfigError, match="does not exist.*objcrop proposals build"):
        parse_object_aware(make_cfg([make_entry("object_aware")], proposals=str(tmp_path / "x.objcrop")))
    bad = tmp_path / "bad.objcrop"
    bad.write_bytes(b"not a store at all, sorry")
    with pytest.raises(SoloConfigError, match="data.proposals: .*not an objcrop proposal store"):
        parse_object_aware(make_cfg([make_entry("object_aware")], proposals=str(bad)))
    with pytest.raises(SoloConfigError, match="data.format: dali.*Fix"):
        parse_object_aware(make_cfg([make_entry("object_aware")], proposals=store, format="dali"))
    with pytest.raises(SoloConfigError, match="data.format: h5"):
        parse_object_aware(make_cfg([make_entry("object_aware")], proposals=store, format="h5"))
    cfg = make_cfg([make_entry("object_aware")], proposals=store)
    cfg["data"]["dataset"] = "stl10"
    with pytest.raises(SoloConfigError, match="data.dataset: stl10 is not a folder"):
        parse_object_aware(cfg)
    with pytest.raises(SoloConfigError, match="augmentations: .*non-empty list"):
        parse_object_aware({"data": {"dataset": "custom", "train_path": "x"}})
    with pytest.raises(SoloConfigError, match="integer crop_size"):
        parse_object_aware(make_cfg([{"crop": "object_aware", "num_crops": 1}], proposals=store))


def test_recipes_without_object_aware_entries_are_left_to_solo(scenes):
    plan = parse_object_aware(make_cfg([make_entry(None, n=2)], format="dali"))
    assert not plan.enabled  # DALI, no proposals: fine, solo-learn runs untouched
    # scene-only object-aware entries need no store
    assert parse_object_aware(make_cfg([make_entry("scene", n=2)])).enabled


def test_parses_omegaconf_nodes(scenes):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        make_cfg([make_entry("object_aware"), make_entry("object_dilated")],
             proposals=str(scenes / "train.objcrop"))
    )
    assert [e.policy.name for e in parse_object_aware(cfg).entries] == ["object", "object_dilated"]


@pytest.mark.parametrize("method", ["simclr", "mocov2plus", "byol", "vicreg"])
def test_shipped_recipes_have_the_papers_settings(method):
    cfg = compose_recipe(f"{method}.yaml")
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
        compose_recipe("simclr.yaml", "augmentations=object_aware_multicrop.yaml"), check_paths=False
    )
    assert [(e.policy.name, e.crop_size, e.num_crops, e.local) for e in multicrop.entries] == [
        ("object", 224, 1, False), ("object_dilated", 224, 1, False), ("object", 96, 6, True)]
    obj_scene = parse_object_aware(
        compose_recipe("simclr.yaml", "augmentations=obj_scene.yaml"), check_paths=False
    )
    assert [e.object_aware for e in obj_scene.entries] == [True, False]
    scene = parse_object_aware(compose_recipe("simclr.yaml", "augmentations=scene.yaml"))
    assert not scene.enabled
    demo = parse_object_aware(compose_recipe("demo_cpu.yaml"), check_paths=False)
    assert [e.crop_size for e in demo.entries] == [64, 64]


@pytest.mark.parametrize(
    ("crop", "message"),
    [
        ({"canvas": "abc"}, r"^crop\.canvas: expected an integer side in pixels.*got 'abc'$"),
        ({"canvas": 12.5}, r"^crop\.canvas: expected an integer side"),
        ({"canvas": 32}, r"^crop\.canvas: 32 px is smaller than the largest crop_size \(64\)"),
        ({"top_k": "ten"}, r"^crop\.top_k: expected an integer >= 1, got 'ten'$"),
        ({"top_k": 2.5}, r"^crop\.top_k: expected an integer >= 1, got 2\.5$"),
        ({"top_k": 0}, r"^crop\.top_k: expected an integer >= 1, got 0$"),
        ({"min_area": "small"}, r"^crop\.min_area: expected a fraction of the image area"),
        ({"max_area": "big"}, r"^crop\.max_area: expected a fraction of the image area"),
        ({"min_area": 0.5, "max_area": 0.2}, r"^crop\.min_area=0\.5 is above crop\.max_area=0\.2"),
        ({"weighting": "score"}, r"^crop\.weighting='score': expected one of uniform, rank"),
    ],
)
def test_crop_settings_errors_name_the_key(scenes, crop, message):
    """Finding 5: a non-integer crop.canvas / crop.top_k (or a bad min/max_area) is one line
    naming the key, not a ValueError from int()."""
    cfg = make_cfg([make_entry("object_aware"), make_entry("object_dilated")],
                   proposals=str(scenes / "train.objcrop"))
    cfg["crop"] = {"engine": "gpu", **crop} if "canvas" in crop else crop
    with pytest.raises(SoloConfigError, match=message) as info:
        parse_object_aware(cfg)
    assert "\n" not in str(info.value)


def test_rank_weighting_is_a_recipe_wide_setting(scenes):
    cfg = make_cfg([make_entry({"policy": "object", "weighting": "rank"}),
                    make_entry("object_dilated")], proposals=str(scenes / "train.objcrop"))
    plan = parse_object_aware(cfg)
    assert plan.choice.weighting == "rank" and plan.recipe().choice.weighting == "rank"
    cfg["crop"] = {"weighting": "uniform"}
    with pytest.raises(SoloConfigError, match=r"augmentations\[0\]\.crop\.weighting='rank' disagrees"):
        parse_object_aware(cfg)
    assert parse_object_aware(make_cfg([make_entry("object_aware")], proposals=str(
        scenes / "train.objcrop"))).choice.weighting == "uniform"


def test_crop_settings_in_an_entry_are_named_there(scenes):
    cfg = make_cfg([make_entry({"policy": "object", "top_k": "ten"})],
                   proposals=str(scenes / "train.objcrop"))
    with pytest.raises(SoloConfigError, match=r"^augmentations\[0\]\.crop\.top_k: expected an integer"):
        parse_object_aware(cfg)
    cfg["crop"] = {"top_k": "3", "canvas": 128}  # numeric strings (from a shell) are numbers
    cfg["augmentations"][0]["crop"] = "object_aware"
    plan = parse_object_aware(cfg)
    assert plan.choice.top_k == 3 and plan.canvas == 128


def test_proposals_pointing_at_a_folder_says_so(scenes):
    """Finding 6: data.proposals naming a folder is 'a folder, not a store file', not 'does not
    exist' with a build command that would write over that folder."""
    cfg = make_cfg([make_entry("object_aware")], proposals=str(scenes / "flat"))
    with pytest.raises(SoloConfigError) as info:
        parse_object_aware(cfg)
    message = str(info.value)
    assert message.startswith(f"data.proposals: {scenes / 'flat'} is a folder, not a proposal "
                              "store file")
    assert "data.train_path" in message and "does not exist" not in message


def test_max_failure_rate_is_a_checked_recipe_key(scenes):
    """Finding 3: data.max_failure_rate is read (default 1%, as objcrop train) and checked."""
    store = str(scenes / "train.objcrop")
    entries = [make_entry("object_aware")]
    assert parse_object_aware(make_cfg(entries, proposals=store)).max_failure_rate == 0.01
    assert parse_object_aware(make_cfg(entries, proposals=store,
                                       max_failure_rate=0.2)).max_failure_rate == 0.2
    assert parse_object_aware(make_cfg(entries, proposals=store,
                                       max_failure_rate=0)).max_failure_rate == 0.0
    for bad in (1.5, -0.1, "lots", True):
        with pytest.raises(SoloConfigError, match=r"^data\.max_failure_rate: expected .* from 0 "
                                                  r"to 1 \(e\.g\. 0\.05\), got"):
            parse_object_aware(make_cfg(entries, proposals=store, max_failure_rate=bad))


def test_misspelt_crop_key_is_warned_about(scenes, caplog):
    """A 'crops:' (or 'Crop:') entry key would silently keep solo-learn's crops."""
    entry = make_entry(None)
    entry["crops"] = "object_aware"
    cfg = make_cfg([entry, make_entry(None)], proposals=str(scenes / "train.objcrop"))
    with caplog.at_level("WARNING", logger="objcrop_plugin"):
        plan = parse_object_aware(cfg)
    assert not plan.enabled
    text = caplog.text
    assert "augmentations[0].crops is not a key of a solo-learn augmentations entry" in text
    assert "no augmentations entry has 'crop: object_aware' (augmentations[0].crops: did you " \
           "mean 'crop'?)" in text
