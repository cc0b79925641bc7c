"""``backbone.name: timm`` and timm's registry after a solo-learn style override."""

from __future__ import annotations

import sys

import pytest
import torch

from objcrop_plugin.integrations.solo.backbone import restore_timm_registry
from objcrop_plugin.solo import SoloConfigError, timm_backbone


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
        assert restore_timm_registry() == ["test_resnet"]
        assert registry._model_entrypoints["test_resnet"] is original
        assert timm.create_model("test_resnet", num_classes=0).num_features > 0
    finally:
        registry._model_entrypoints["test_resnet"] = original
        del sys.modules["solo.fake_backbones"]
