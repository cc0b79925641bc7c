"""The registry: built-in names without installed metadata, every registered thing smoke-tested
(timm style), and real third-party distributions on disk (policies, an importer used from the
CLI, name clashes)."""

import json
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from objcrop_plugin import registry
from objcrop_plugin.cli import main
from objcrop_plugin.policies import CropPolicy, ScenePolicy, ViewRecipe, make_policy, make_recipe
from objcrop_plugin.proposals.generators import ProposalGenerator
from objcrop_plugin.proposals.importer_base import ProposalImporter, make_importer
from objcrop_plugin.proposals.jsonl import JsonLinesImporter
from objcrop_plugin.proposals.store import ProposalStore
from objcrop_plugin.registry import (
    BUILTIN_POLICIES,
    BUILTIN_PROPOSAL_SOURCES,
    RegistryError,
    RegistryWarning,
    list_policies,
    list_proposal_sources,
    refresh,
)

REPO = Path(__file__).resolve().parents[1]
BING_MODEL = REPO / ".." / "shared" / "models" / "bing"

OWN_POLICIES = [
    "scene",
    "object",
    "object_dilated",
    "scene_scene",
    "obj_scene",
    "obj_obj",
    "obj_obj_dilate",
    "multi_crop",
]
OWN_SOURCES = {
    "jsonl": "importer",
    "coco": "importer",
    "openimages": "importer",
    "bing": "generator",
    "bing_opencv": "generator",
    "graph_segments": "generator",
    "heatmap": "generator",
    "selective_search": "generator",
    "token_cut": "generator",
}

_PLUGIN_SOURCE = '''
"""A third-party crop policy: a fixed central crop of the proposal."""

from objcrop_plugin.policies import CropPolicy


class CenterObjectPolicy(CropPolicy):
    name = "center_object"
    needs_proposal = True

    def __init__(self, fraction=0.5):
        super().__init__()
        self.fraction = float(fraction)

    def sample(self, image_size, box, rng):
        x1, y1, x2, y2 = (float(v) for v in box)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        hw, hh = (x2 - x1) * self.fraction / 2, (y2 - y1) * self.fraction / 2
        return (cx - hw, cy - hh, cx + hw, cy + hh)
'''

_IMPORTER_SOURCE = '''
"""A third-party importer: whitespace-separated ``key width height x1 y1 x2 y2`` lines."""

from objcrop_plugin.proposals.importer_base import ProposalImporter


class BoxLinesImporter(ProposalImporter):
    name = "myimporter"

    def __init__(self, path, key_prefix="", score=1.0):
        super().__init__(path)
        self.key_prefix = key_prefix
        self.score = float(score)

    def records(self):
        with open(self.path) as f:
            for line in f:
                key, w, h, *box = line.split()
                yield (self.key_prefix + key, [[float(v) for v in box]], [self.score],
                       (int(w), int(h)))
'''


def _write_dist(root, name, entry_points, module_source=None, group=registry.POLICY_GROUP):
    """A real installed distribution: ``<name>-0.1.dist-info/{METADATA,entry_points.txt}``."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    )
    if module_source is not None:
        (root / f"{name}.py").write_text(textwrap.dedent(module_source))


@pytest.fixture
def fresh_registry():
    refresh()
    yield
    for module in ("mythirdparty_policy", "otherthirdparty_policy", "myimporter_pkg"):
        sys.modules.pop(module, None)
    refresh()


def test_own_policies_and_sources_are_registered():
    names = list_policies()
    assert set(OWN_POLICIES) <= set(names)
    assert names == sorted(names)
    assert set(OWN_SOURCES) <= set(list_proposal_sources())
    assert registry.load_proposal_source("jsonl") is JsonLinesImporter
    assert issubclass(registry.load_policy("object"), CropPolicy)
    importers = list_proposal_sources(kind="importer")
    assert {"jsonl", "coco", "openimages"} <= set(importers)
    assert not {"bing", "graph_segments"} & set(importers)


def test_builtin_table_matches_pyproject_entry_points():
    """pyproject's entry points (what importlib.metadata users see) list exactly the built-ins."""
    tomllib = pytest.importorskip("tomllib")
    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert eps[registry.POLICY_GROUP] == BUILTIN_POLICIES
    assert eps[registry.PROPOSAL_GROUP] == BUILTIN_PROPOSAL_SOURCES
    assert set(BUILTIN_POLICIES) == set(OWN_POLICIES)
    assert set(BUILTIN_PROPOSAL_SOURCES) == set(OWN_SOURCES)


def test_builtins_resolve_without_installed_metadata(monkeypatch, fresh_registry):
    """A source tree that was never installed has no entry points: the built-ins still work."""
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: metadata.EntryPoints(()))
    refresh()
    assert list_policies() == sorted(OWN_POLICIES)
    assert list_proposal_sources() == sorted(OWN_SOURCES)
    box = np.array([[100.0, 100.0, 300.0, 200.0]])
    for name in OWN_POLICIES:
        views = make_recipe(name)((640, 480), box, rng=np.random.default_rng(0))
        assert len(views) >= 2, name
    assert isinstance(make_policy("object_dilated", dilation=0.2), CropPolicy)
    for name, kind in OWN_SOURCES.items():
        assert registry.load_proposal_source(name).kind == kind
    assert list_proposal_sources(kind="importer") == ["coco", "jsonl", "openimages"]
    from objcrop_plugin.proposals.build import make_generator

    assert make_generator("graph_segments", top_k=3).top_k == 3


# --- every registered thing, instantiated and run (timm style) ---------------------------------
_BOX = np.array([[100.0, 80.0, 300.0, 240.0], [20.0, 20.0, 60.0, 90.0]])


@pytest.mark.parametrize("name", list_policies())
def test_every_registered_policy_or_recipe_draws_windows(name):
    factory = registry.load_policy(name)
    if isinstance(factory, type) and issubclass(factory, CropPolicy):
        policy = make_policy(name)
        assert isinstance(policy, CropPolicy)
    recipe = make_recipe(name)
    assert isinstance(recipe, ViewRecipe)
    windows = recipe((640, 480), _BOX, rng=np.random.default_rng(0))
    assert len(windows) >= 2
    for w in windows:
        x1, y1, x2, y2 = w.box
        assert -1e-6 <= x1 < x2 <= 640 + 1e-6 and -1e-6 <= y1 < y2 <= 480 + 1e-6, (name, w)


def _scene_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((120, 160, 3), 40, np.uint8) + rng.integers(0, 20, (120, 160, 3), dtype=np.uint8)
    img[30:90, 50:120] = (220, 60, 40)
    return img


def _generator_kwargs(name: str) -> dict:
    if name in ("bing", "bing_opencv"):
        if not (BING_MODEL / "ObjNessB2W8MAXBGR.idx.yml.gz").is_file():
            pytest.skip(f"BING model files not found in {BING_MODEL}")
        return {"model_dir": str(BING_MODEL)}
    if name == "heatmap":  # random weights: the mechanics only
        return {"model": "test_efficientnet", "device": "cpu"}
    if name == "token_cut":
        return {"model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2},
                "input_side": 160, "device": "cpu"}
    return {}


def _importer_input(name: str, tmp_path: Path) -> tuple[Path, dict]:
    """A small input file for each built-in importer, and its options."""
    if name == "jsonl":
        path = tmp_path / "in.jsonl"
        path.write_text(json.dumps({"key": "a.jpg", "width": 64, "height": 48,
                                    "boxes": [[2, 4, 12, 24]], "scores": [1.0]}) + "\n")
        return path, {}
    if name == "coco":
        path = tmp_path / "in.json"
        path.write_text(json.dumps({
            "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 4, 10, 20], "category_id": 1}],
        }))
        return path, {}
    if name == "openimages":
        path = tmp_path / "in.csv"
        path.write_text("ImageID,XMin,XMax,YMin,YMax\na,0.03125,0.1875,0.08333333,0.5\n")
        return path, {"key_format": "{image_id}.jpg", "sizes": {"a": [64, 48]}}
    pytest.skip(f"no sample input for the third-party importer '{name}'")


@pytest.mark.parametrize("name", list_proposal_sources())
def test_every_registered_proposal_source_runs(name, tmp_path):
    source = registry.load_proposal_source(name)
    if source.kind == "generator":
        assert issubclass(source, ProposalGenerator) and source.name == name
        gen = source(top_k=5, **_generator_kwargs(name))
        boxes, scores = gen(_scene_image())
        assert boxes.shape[1:] == (4,) and 1 <= len(boxes) <= 5 and scores.shape == (len(boxes),)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()
    else:
        assert source.kind == "importer"
        assert issubclass(source, ProposalImporter) and source.name == name
        path, options = _importer_input(name, tmp_path)
        importer = make_importer(name, path, **options)
        out = tmp_path / "s.objcrop"
        assert importer.write(out) == 1
        store = ProposalStore(out)
        assert store.meta["source"] == name
        np.testing.assert_allclose(store["a.jpg"].boxes, [[2, 4, 12, 24]], rtol=1e-5)


def test_third_party_distribution_on_disk_is_found_and_forgotten(
    tmp_path, monkeypatch, fresh_registry
):
    _write_dist(
        tmp_path,
        "mythirdparty_policy",
        {"center_object": "mythirdparty_policy:CenterObjectPolicy"},
        _PLUGIN_SOURCE,
    )
    assert "center_object" not in list_policies()
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh()
    assert "center_object" in list_policies()
    assert set(OWN_POLICIES) <= set(list_policies())  # the plugin's own names stay

    pol = make_policy("center_object", fraction=0.25)
    assert type(pol).__name__ == "CenterObjectPolicy" and isinstance(pol, CropPolicy)
    box = np.array([100.0, 100.0, 300.0, 200.0])
    assert pol.sample((640, 480), box, np.random.default_rng(0)) == (175.0, 137.5, 225.0, 162.5)

    recipe = make_recipe(["center_object", "scene"])
    assert recipe.needs_proposals
    first, second = recipe((640, 480), box[None], rng=np.random.default_rng(0))
    assert (first.policy, first.proposal, first.fallback) == ("center_object", 0, False)
    assert first.box == (150.0, 125.0, 250.0, 175.0)  # central half of the proposal
    assert second.policy == "scene"
    # a recipe made of the plugin's name uses its policy for both views
    assert [w.box for w in make_recipe("center_object")((640, 480), box[None])] == [
        (150.0, 125.0, 250.0, 175.0)
    ] * 2

    sys.path.remove(str(tmp_path))
    refresh()
    assert "center_object" not in list_policies()
    with pytest.raises(RegistryError, match="center_object"):
        make_policy("center_object")


def test_broken_plugin_names_its_distribution(tmp_path, monkeypatch, fresh_registry):
    _write_dist(tmp_path, "brokenplugin", {"broken_crop": "no_such_module:Policy"})
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh()
    assert "broken_crop" in list_policies()
    with pytest.raises(RegistryError) as info:
        make_policy("broken_crop")
    msg = str(info.value)
    assert "brokenplugin" in msg and "broken_crop" in msg and "ModuleNotFoundError" in msg
    # one broken plugin does not break the others
    assert make_recipe("obj_obj_dilate").name == "obj_obj_dilate"


def test_a_plugin_cannot_replace_a_builtin_name(tmp_path, monkeypatch, fresh_registry):
    """A built-in name always means the built-in; the clashing distribution is named."""
    _write_dist(
        tmp_path,
        "mythirdparty_policy",
        {"scene": "mythirdparty_policy:CenterObjectPolicy"},
        _PLUGIN_SOURCE,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh()
    assert list_policies().count("scene") == 1
    with pytest.warns(RegistryWarning, match="mythirdparty_policy") as info:
        pol = make_policy("scene")
    assert type(pol) is ScenePolicy
    assert "built into objcrop-plugin" in str(info[0].message)


def test_two_distributions_claiming_one_name_is_an_error(tmp_path, monkeypatch, fresh_registry):
    for dist in ("mythirdparty_policy", "otherthirdparty_policy"):
        _write_dist(tmp_path, dist, {"center_object": f"{dist}:CenterObjectPolicy"},
                    _PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh()
    with pytest.raises(RegistryError, match="more than one distribution") as info:
        make_policy("center_object")
    assert "mythirdparty_policy" in str(info.value) and "otherthirdparty_policy" in str(info.value)


def test_third_party_importer_is_usable_from_the_cli(tmp_path, monkeypatch, capsys, fresh_registry):
    site = tmp_path / "site"
    site.mkdir()
    _write_dist(site, "myimporter_pkg", {"myimporter": "myimporter_pkg:BoxLinesImporter"},
                _IMPORTER_SOURCE, group=registry.PROPOSAL_GROUP)
    src = tmp_path / "boxes.txt"
    src.write_text("a.jpg 64 48 2 4 12 24\nb.jpg 10 8 1 1 5 5\n")
    out = tmp_path / "s.objcrop"
    args = ["proposals", "import", str(src), "--source", "myimporter", "--out", str(out)]
    assert main(args) == 2
    assert "unknown proposal importer 'myimporter'" in capsys.readouterr().err

    monkeypatch.syspath_prepend(str(site))
    refresh()
    assert main([*args, "--param", "key_prefix=imgs/", "--param", "score=0.5"]) == 0
    assert "2 images" in capsys.readouterr().out
    store = ProposalStore(out)
    assert sorted(store.keys()) == ["imgs/a.jpg", "imgs/b.jpg"]
    rec = store["imgs/a.jpg"]
    assert rec.boxes.tolist() == [[2, 4, 12, 24]] and rec.scores.tolist() == [0.5]
    assert rec.image_size == (64, 48)
    assert store.meta == {"source": "myimporter", "path": str(src)}

    assert main(["policies"]) == 0
    listing = capsys.readouterr().out
    importers = next(line for line in listing.splitlines() if line.startswith("proposal importers"))
    assert "myimporter" in importers and "jsonl" in importers

    assert main([*args, "--param", "nope=1"]) == 2
    err = capsys.readouterr().err
    assert "'myimporter' got unknown option(s) ['nope']" in err and "key_prefix, score" in err

    assert main([*args[:-4], "--source", "no_such_importer", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown proposal importer 'no_such_importer'" in err
    assert "coco, jsonl, myimporter, openimages" in err


def test_the_built_in_sources_kinds_are_those_of_their_classes():
    """list_proposal_sources(kind=...) reads the built-ins' kinds from a table, without
    importing them: the table must say what each class says."""
    from objcrop_plugin import registry

    assert set(registry._BUILTIN_SOURCE_KINDS) == set(registry.BUILTIN_PROPOSAL_SOURCES)
    for name, kind in registry._BUILTIN_SOURCE_KINDS.items():
        assert registry.load_proposal_source(name).kind == kind, name
