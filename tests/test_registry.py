"""The entry-point registry: the plugin's own names, and a real third-party distribution on disk."""

import sys
import textwrap

import numpy as np
import pytest

from objcrop_plugin import registry
from objcrop_plugin.policies import CropPolicy, make_policy, make_recipe
from objcrop_plugin.proposals.jsonl import JsonLinesImporter
from objcrop_plugin.registry import RegistryError, list_policies, list_proposal_sources, refresh

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


def _write_dist(root, name, entry_points, module_source=None):
    """A real installed distribution: ``<name>-0.1.dist-info/{METADATA,entry_points.txt}``."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[objcrop_plugin.policies]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    )
    if module_source is not None:
        (root / f"{name}.py").write_text(textwrap.dedent(module_source))


@pytest.fixture
def fresh_registry():
    refresh()
    yield
    sys.modules.pop("mythirdparty_policy", None)
    refresh()


def test_own_policies_and_sources_are_registered():
    names = list_policies()
    assert set(OWN_POLICIES) <= set(names)
    assert names == sorted(names)
    assert "jsonl" in list_proposal_sources()
    assert registry.load_proposal_source("jsonl") is JsonLinesImporter
    assert issubclass(registry.load_policy("object"), CropPolicy)


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


def test_two_distributions_claiming_one_name_is_an_error(tmp_path, monkeypatch, fresh_registry):
    _write_dist(
        tmp_path,
        "mythirdparty_policy",
        {"scene": "mythirdparty_policy:CenterObjectPolicy"},
        _PLUGIN_SOURCE,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh()
    with pytest.raises(RegistryError, match="more than one distribution") as info:
        make_policy("scene")
    assert "mythirdparty_policy" in str(info.value) and "objcrop" in str(info.value)
