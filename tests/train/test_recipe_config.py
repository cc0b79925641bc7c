"""Recipe files: schema validation, overrides, saved configs, the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from objcrop_plugin.train.config import (
    RecipeError,
    apply_overrides,
    load_recipe,
    parse_recipe,
    save_recipe,
    to_dict,
)

REPO = Path(__file__).resolve().parents[2]
BASE = {"data": {"train_path": "imgs", "proposals": "p.objcrop"}}


def write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_and_shorthands():
    cfg = parse_recipe({**BASE, "crop": "object_aware", "method": "byol", "backbone": "resnet18"})
    assert cfg.crop.type == "object_aware" and cfg.views == "obj_obj_dilate"
    assert cfg.method.name == "byol" and cfg.backbone.name == "resnet18"
    assert cfg.trainer.batch_size == 256 and cfg.optimizer.name == "sgd"
    scene = parse_recipe({"data": {"train_path": "imgs"}, "crop": "scene"})
    assert scene.views == "scene_scene" and scene.data.proposals is None


@pytest.mark.parametrize(
    "raw, match",
    [
        ({**BASE, "trainer": {"epoch": 3}}, r"unknown key 'trainer\.epoch'.*'trainer\.epochs'"),
        ({**BASE, "optimiser": {}}, r"unknown key 'optimiser'.*'optimizer'"),
        ({**BASE, "trainer": {"epochs": "ten"}}, r"trainer\.epochs: expected an integer"),
        ({**BASE, "trainer": {"epochs": True}}, r"trainer\.epochs: expected an integer"),
        ({**BASE, "optimizer": {"lr": "fast"}}, r"optimizer\.lr: expected a number"),
        ({**BASE, "method": {"name": "swav"}}, r"method\.name: expected one of"),
        ({**BASE, "crop": {"engine": "tpu"}}, r"crop\.engine: expected one of 'cpu' \| 'gpu'"),
        ({**BASE, "crop": {"params": {"dilaton": 0.1}}}, r"crop\.params.*dilaton.*dilation"),
        ({**BASE, "crop": {"views": "obj_obj_dilat"}}, r"crop\.views: unknown crop policy 'obj_obj_dilat'\. Did you mean 'obj_obj_dilate'\?"),
        ({**BASE, "method": {"params": {"temprature": 0.1}}}, r"method\.params\.temperature"),
        ({**BASE, "crop": {"type": "scene", "views": "obj_obj"}}, r"crop\.type is scene"),
        ({**BASE, "crop": {"views": "scene_scene"}}, r"never uses proposals"),
        ({"data": {"train_path": "imgs"}}, r"data\.proposals is not set.*proposals build"),
        ({"data": {}}, r"data\.train_path is required"),
        ({**BASE, "data": "imgs"}, r"data: expected a mapping"),
    ],
)
def test_bad_recipes_are_clear_errors(raw, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(raw, "my.yaml")


def test_error_names_the_file(tmp_path):
    path = write(tmp_path, {**BASE, "trainer": {"batch_size": "x"}})
    with pytest.raises(RecipeError, match=rf"^{path}: trainer\.batch_size"):
        load_recipe(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_parse_yaml_values_and_create_sections():
    raw = apply_overrides(
        {"crop": "object_aware"},
        ["trainer.epochs=5", "crop.params.top_k=3", "crop.size=[32, 48]", "data.labels=null",
         "+method.name=vicreg", "trainer.precision=16-mixed"],
    )
    assert raw["trainer"]["epochs"] == 5
    assert raw["crop"] == {"type": "object_aware", "params": {"top_k": 3}, "size": [32, 48]}
    assert raw["data"]["labels"] is None and raw["method"]["name"] == "vicreg"
    assert raw["trainer"]["precision"] == "16-mixed"
    kept = apply_overrides({"crop": {"type": "object_aware", "size": 48}}, ["crop=scene"])
    assert kept["crop"] == {"type": "scene", "size": 48}
    with pytest.raises(RecipeError, match="dotted.key=value"):
        apply_overrides({}, ["trainer.epochs"])
    with pytest.raises(RecipeError, match="not a mapping"):
        apply_overrides({"trainer": {"epochs": 3}}, ["trainer.epochs.x=1"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_recipe(write(tmp_path, BASE), ["method.name=mocov2", "crop.params.top_k=4"])
    save_recipe(cfg, tmp_path / "out" / "config.yaml")
    again = load_recipe(tmp_path / "out" / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_paths_relative_to_recipe(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    raw = {"data": {"train_path": "imgs", "proposals": "p.objcrop",
                    "paths_relative_to_recipe": True}}
    cfg = load_recipe(write(sub, raw))
    assert cfg.data.train_path == str(sub.resolve() / "imgs")
    plain = load_recipe(write(sub, BASE, "plain.yaml"))
    assert plain.data.train_path == "imgs"  # relative to the current directory, as given


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "lightly").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    cfg = load_recipe(path)
    assert cfg.name == path.stem
    assert cfg.data.proposals
    # object-aware, or a scene baseline that counts the store's boxes (matched compute)
    assert cfg.crop.type == "object_aware" or cfg.data.epoch_length == "boxes"


def _commented_train_commands() -> list[tuple[str, list[str]]]:
    """Every ``objcrop train recipes/...`` line in the shipped recipes' comments."""
    found = []
    for path in sorted((REPO / "recipes" / "lightly").glob("*.yaml")):
        for line in path.read_text().splitlines():
            words = line.lstrip("# ").split(" #")[0].split()
            if words[:2] == ["objcrop", "train"] and words[2].startswith("recipes/"):
                found.append((words[2], words[3:]))
    return found


@pytest.mark.parametrize("recipe,overrides", _commented_train_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_the_commands_in_the_recipes_comments_are_valid(recipe, overrides):
    cfg = load_recipe(REPO / recipe, overrides)
    if "crop.proposals=initial" in overrides:
        assert cfg.data.proposals is None and cfg.crop.proposals is not None


def test_an_error_of_an_override_names_the_override_not_only_the_file():
    path = REPO / "recipes/lightly/demo_simclr.yaml"
    with pytest.raises(RecipeError, match=r"demo_simclr\.yaml, override 'trainer\.epoch=1': "
                                          r"unknown key 'trainer\.epoch'"):
        load_recipe(path, ["trainer.epochs=2", "trainer.epoch=1"])
    with pytest.raises(RecipeError, match=r"override 'trainer\.epochs=abc': trainer\.epochs: "
                                          "expected an integer"):
        load_recipe(path, ["trainer.epochs=abc"])
    with pytest.raises(RecipeError, match=r"override 'data\.train_path=null': data\.train_path: "
                                          "expected a string, got None"):
        load_recipe(path, ["data.train_path=null"])


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "lightly").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_crop_scene_is_each_shipped_recipes_scene_baseline(path):
    """`crop=scene` (the baseline the recipes' comments name): scene crops of the same size,
    photometrics and engine; multi-crop keeps its views and counts."""
    from objcrop_plugin.policies import make_recipe
    from objcrop_plugin.train.config import recipe_params

    cfg = load_recipe(path)
    scene = load_recipe(path, ["crop=scene"])
    assert scene.crop.type == "scene"
    assert not make_recipe(scene.views, **recipe_params(scene)).needs_proposals
    assert (scene.crop.size, scene.crop.photometrics, scene.crop.engine) == (
        cfg.crop.size, cfg.crop.photometrics, cfg.crop.engine)
    before = make_recipe(cfg.views, **recipe_params(cfg))
    after = make_recipe(scene.views, **recipe_params(scene))
    assert [v.size for v in after.views] == [v.size for v in before.views]
    if cfg.views == "multi_crop":
        assert scene.views == "multi_crop" and scene.crop.params["n_local"] == 6
    if cfg.data.sampling == "per_box":  # the matched baseline: images, as many as the boxes
        assert (scene.data.sampling, scene.data.epoch_length) == ("per_image", "boxes")
        matched = load_recipe(path.with_name(f"{path.stem}_scene_matched.yaml"))
        assert (scene.views, scene.crop.params, scene.data.max_boxes_per_image) == (
            matched.views, matched.crop.params, matched.data.max_boxes_per_image)


def test_crop_scene_keeps_what_scene_crops_take():
    raw = apply_overrides(
        {"crop": {"type": "object_aware", "views": "obj_scene", "size": 32,
                  "params": {"top_k": 3, "scene_scale": [0.3, 1.0], "ratio": [0.5, 2.0]}}},
        ["crop=scene"])
    assert raw["crop"] == {"type": "scene", "views": "scene_scene", "size": 32,
                           "params": {"scale": [0.3, 1.0], "ratio": [0.5, 2.0]}}
    # a view size in the parameters, n views of one policy, online boxes
    sized = apply_overrides({"crop": {"views": "obj_obj", "size": 224, "params": {"size": 160}}},
                            ["crop=scene"])
    assert sized["crop"]["params"] == {"size": 160}
    many = apply_overrides(
        {"crop": {"views": "object_dilated", "params": {"n_views": 4, "dilation": 0.2},
                  "proposals": "online"}}, ["crop=scene"])
    assert many["crop"] == {"views": "scene", "params": {"n_views": 4}, "type": "scene"}
    multi = apply_overrides(
        {"crop": {"views": "multi_crop", "params": {
            "n_local": 4, "local_policy": {"policy": "object", "scale": [0.1, 0.5], "top_k": 5}}}},
        ["crop=scene"])
    assert multi["crop"]["params"] == {
        "n_local": 4, "global_policy": "scene",
        "local_policy": {"scale": [0.1, 0.5], "policy": "scene"}}


def test_an_override_that_would_drop_an_earlier_one_is_refused():
    """`a.b.c=1 a.b=x` would lose a.b.c (silently, and a typo in it would never be checked);
    the other order sets the key in the mapping a.b=x stands for."""
    path = REPO / "recipes/lightly/demo_simclr.yaml"
    with pytest.raises(RecipeError, match=r"override 'crop\.proposals=online' replaces "
                       r"crop\.proposals, which the earlier override 'crop\.proposals\.params"
                       r"\.max_sid=256' set a key inside.*Fix: put 'crop\.proposals=online' "
                       r"before"):
        load_recipe(path, ["data.proposals=null", "crop.proposals.params.max_sid=256",
                           "crop.proposals=online"])
    with pytest.raises(RecipeError, match=r"unknown parameter.*max_sid"):
        load_recipe(path, ["data.proposals=null", "crop.proposals=online",
                           "crop.proposals.params.max_sid=256"])
    cfg = load_recipe(path, ["data.proposals=null", "crop.proposals=online",
                             "crop.proposals.params.max_side=256"])
    assert cfg.crop.proposals["params"]["max_side"] == 256
    # the same key twice, or a sibling: the last wins, nothing is lost
    assert load_recipe(path, ["trainer.epochs=2", "trainer.epochs=3"]).trainer.epochs == 3
    # a section's shorthand keeps the rest of the section
    assert load_recipe(path, ["crop.size=32", "crop=scene"]).crop.size == 32
    # null or a mapping replaces the mapping on purpose ("last one wins")
    assert apply_overrides({}, ["crop.proposals.warmup_epochs=0", "crop.proposals=null"]) == {
        "crop": {"proposals": None}}
    assert apply_overrides({}, ["a.b.c=1", "a.b={d: 2}"]) == {"a": {"b": {"d": 2}}}


def test_the_recipes_comments_hold_commands():
    assert len(_commented_train_commands()) >= 10


def test_released_code_recipes_are_per_box_and_its_matched_scene_baseline():
    from objcrop_plugin.policies import make_recipe
    from objcrop_plugin.train.config import recipe_params

    box = load_recipe(REPO / "recipes" / "lightly" / "released_mocov2.yaml")
    scene = load_recipe(REPO / "recipes" / "lightly" / "released_mocov2_scene_matched.yaml")
    assert box.data.sampling == "per_box" and scene.data.sampling == "per_image"
    assert scene.data.epoch_length == "boxes" and scene.crop.type == "scene"
    assert (scene.data.proposals, scene.data.max_boxes_per_image) == (
        box.data.proposals, box.data.max_boxes_per_image)
    # the object policies' released_code=True settings, spelled out in the recipe
    built = make_recipe(box.views, **recipe_params(box))
    released = make_recipe("obj_obj_dilate", released_code=True, size=224)
    assert [(type(v.policy), v.policy.params(), v.size) for v in built.views] == [
        (type(v.policy), v.policy.params(), v.size) for v in released.views]
    assert built.shuffle_globals and built.views[1].policy.dilation_mode == "coordinate"
    # MoCo-v2 as the released code trains it, identical in both runs
    assert (box.method.name, box.backbone.name, box.crop.size, box.crop.photometrics) == (
        "mocov2", "resnet50", 224, "mocov2")
    assert (box.optimizer.name, box.optimizer.lr, box.trainer.batch_size, box.trainer.epochs) == (
        "sgd", 0.03, 256, 200)
    for section in ("method", "backbone", "optimizer", "schedule"):
        assert getattr(box, section) == getattr(scene, section), section
    assert to_dict(box.trainer) == {**to_dict(scene.trainer), "out_dir": box.trainer.out_dir}


def test_method_params_are_validated_without_lightly():
    """method.params defaults are data in the config module: a recipe is checked (unknown
    parameter named, closest known suggested) in a process where lightly cannot be imported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['lightly'] = None  # import lightly -> ImportError\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "from objcrop_plugin.train.config import RecipeError, parse_recipe\n"
        "base = {'data': {'train_path': 'imgs', 'proposals': 'p.objcrop'}}\n"
        "cfg = parse_recipe({**base, 'method': {'name': 'mocov2', "
        "'params': {'memory_bank_size': 64}}})\n"
        "assert cfg.method.params == {'memory_bank_size': 64}\n"
        "try:\n"
        "    parse_recipe({**base, 'method': {'name': 'byol', 'params': {'temperature': 0.1}}})\n"
        "except RecipeError as exc:\n"
        "    print('ERR', exc)\n"
        "assert 'lightly' not in sys.modules or sys.modules['lightly'] is None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "method.params.temperature" in out.stdout, out.stdout


def test_method_names_and_defaults_are_defined_once():
    from objcrop_plugin.engine.photometric import PRESETS
    from objcrop_plugin.train.config import METHOD_DEFAULTS, METHODS, MethodConfig

    assert METHODS == tuple(METHOD_DEFAULTS) == ("simclr", "mocov2", "byol", "vicreg")
    assert set(METHODS) <= set(PRESETS)  # each method's default photometrics
    for name in METHODS:  # every name is a valid method.name, and nothing else is
        assert parse_recipe({**BASE, "method": {"name": name}}).method.name == name
    assert MethodConfig().name in METHODS
    pytest.importorskip("lightly")
    from objcrop_plugin.train.methods import METHODS as CLASSES

    assert list(CLASSES) == list(METHODS)
    for name, cls in CLASSES.items():
        assert cls.name == name and cls.defaults is METHOD_DEFAULTS[name]
