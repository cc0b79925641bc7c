"""``data.sampling: per_box`` in solo-learn recipes: one sample per stored box, its
object-aware views cut from that box (a red and a green box per scene: the colour a view shows
says which box it came from)."""

from __future__ import annotations

import pickle

import pytest
from solo_testing import (
    GREEN_BOX,
    OBJ_OBJ_DILATE,
    RED_BOX,
    colour_fractions,
    compose_recipe,
    dilated_object_of,
    make_cfg,
    make_entry,
    make_transform,
    object_of,
    train_through_main,
    write_recipe,
)
from torchvision.datasets import ImageFolder

from objcrop_plugin.integrations.solo.datasets import ObjectAwareSoloDataset
from objcrop_plugin.integrations.solo.gpu import ObjectAwareCanvasDataset, gpu_views
from objcrop_plugin.policies import make_recipe
from objcrop_plugin.solo import SoloConfigError, parse_object_aware

# each scene stores [red box, green box] with equal scores: rank 0 is red, rank 1 green
BOX_COLOURS = ("red", "green")


def test_recipe_keys_parse_and_errors_name_the_key(scenes):
    store = str(scenes / "train.objcrop")
    plan = parse_object_aware(make_cfg(OBJ_OBJ_DILATE, proposals=store, sampling="per_box",
                                       max_boxes_per_image=1))
    assert (plan.sampling, plan.max_boxes_per_image) == ("per_box", 1)
    assert parse_object_aware(make_cfg(OBJ_OBJ_DILATE, proposals=store)).sampling == "per_image"
    cases = [
        ({"sampling": "per_bbox"}, OBJ_OBJ_DILATE, r"data\.sampling: expected one of per_image"),
        ({"max_boxes_per_image": 2}, OBJ_OBJ_DILATE, r"applies to data\.sampling: per_box only"),
        ({"sampling": "per_box", "max_boxes_per_image": 0}, OBJ_OBJ_DILATE, r"integer >= 1"),
        ({"sampling": "per_box"}, [make_entry(None)], r"no augmentations entry has 'crop: "
                                                     r"object_aware'.*Fix"),
    ]
    for data, entries, match in cases:
        with pytest.raises(SoloConfigError, match=match):
            parse_object_aware(make_cfg(entries, proposals=store, **data))
    ranked = make_cfg(OBJ_OBJ_DILATE, proposals=store, sampling="per_box")
    ranked["crop"] = {"weighting": "rank"}
    with pytest.raises(SoloConfigError, match=r"crop\.weighting chooses among an image's boxes.*"
                                              r"per_box.*Fix"):
        parse_object_aware(ranked)
    scene_only = [{"crop": {"policy": "scene"}, **make_entry(None)}]
    with pytest.raises(SoloConfigError, match=r"data\.proposals: data\.sampling per_box.*Fix"):
        parse_object_aware(make_cfg(scene_only, sampling="per_box"))


def test_one_item_per_box_with_views_from_its_box(scenes):
    transform = make_transform(scenes, [make_entry("object_aware"), make_entry("object_aware")])
    dataset = ObjectAwareSoloDataset(ImageFolder(str(scenes / "train")), transform,
                                     scenes / "train", sampling="per_box")
    assert len(dataset) == 16  # 8 images x 2 boxes
    for index in range(16):
        i, views, target = dataset[index]
        assert (i, target) == (index, int(index >= 8))  # images a/000-003, then b/004-007
        assert [object_of(v) for v in views] == [BOX_COLOURS[index % 2]] * 2
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone) == 16 and object_of(clone[3][1][0]) == "green"
    capped = ObjectAwareSoloDataset(ImageFolder(str(scenes / "train")), transform,
                                    scenes / "train", sampling="per_box", max_boxes_per_image=1)
    assert len(capped) == 8 and {object_of(capped[k][1][0]) for k in range(8)} == {"red"}


def test_gpu_mode_plans_each_items_windows_in_its_box(scenes):
    cfg = make_cfg(OBJ_OBJ_DILATE[:1] * 2, proposals=str(scenes / "train.objcrop"),
                   sampling="per_box")
    cfg["crop"] = {"engine": "gpu"}
    plan = parse_object_aware(cfg)
    dataset = ObjectAwareCanvasDataset(ImageFolder(str(scenes / "train")), gpu_views(cfg, plan),
                                       scenes / "train", sampling=plan.sampling)
    assert len(dataset) == 16
    for index in (0, 1, 6, 15):  # the scenes fit the 128 px canvas: canvas pixels = image pixels
        item = dataset[index]
        shift = (index // 2) % 4  # scene i's boxes are shifted by i % 4
        x1, y1, x2, y2 = ((v + shift for v in RED_BOX) if index % 2 == 0
                          else (v - shift for v in GREEN_BOX))
        win = item["windows"]
        assert item["index"] == index and item["target"] == int(index >= 8)
        assert bool(((win[:, 0] >= x1 - 1e-4) & (win[:, 2] <= x2 + 1e-4)
                     & (win[:, 1] >= y1 - 1e-4) & (win[:, 3] <= y2 + 1e-4)).all())


def test_per_box_trains_through_main_pretrain(solo_root, scenes, tmp_path):
    data = {"dataset": "custom", "train_path": str(scenes / "train"),
            "proposals": str(scenes / "train.objcrop"), "sampling": "per_box"}
    recipe = write_recipe(tmp_path / "recipes", "simclr", OBJ_OBJ_DILATE, data,
                          {"name": "timm", "kwargs": {"model_name": "test_efficientnet"}})
    record = train_through_main(tmp_path, tmp_path / "recipes", recipe)
    facts = record["facts"]
    assert len(record["steps"]) == 2 and facts["dataset"] == "ObjectAwareSoloDataset"
    assert facts["dataset_len"] == 16  # samples = boxes (8 images x 2)
    for step in record["steps"]:
        views = step["views"]
        for b, index in enumerate(step["index"].tolist()):
            v0, v1 = views[0][b], views[1][b]
            c0, c1 = colour_fractions(v0), colour_fractions(v1)
            inside, dilated = (v0, v1) if c0["blue"] <= c1["blue"] else (v1, v0)
            assert object_of(inside) == dilated_object_of(dilated) == BOX_COLOURS[index % 2]


def test_shipped_released_code_recipe():
    cfg = compose_recipe("released_mocov2plus.yaml")
    plan = parse_object_aware(cfg, check_paths=False)
    assert (plan.sampling, plan.max_boxes_per_image, plan.shuffle_views) == ("per_box", None, True)
    assert (cfg.method, cfg.backbone.name, cfg.max_epochs) == ("mocov2plus", "resnet50", 200)
    # the entries are the object policies' released_code=True settings
    released = make_recipe("obj_obj_dilate", released_code=True, size=224)
    assert [(type(e.policy), e.policy.params(), e.crop_size, e.num_crops) for e in plan.entries] == [
        (type(v.policy), v.policy.params(), 224, 1) for v in released.views]
