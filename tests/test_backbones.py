"""The one backbone builder: timm names, checkpoint layouts, errors (timm's own loader as oracle)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from objcrop_plugin.backbones import BackboneError, create_backbone  # noqa: E402
from objcrop_plugin.eval import load_backbone  # noqa: E402

NAME = "test_efficientnet"  # tiny timm CNN


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _other(name: str = NAME) -> torch.nn.Module:
    torch.manual_seed(123)
    return timm.create_model(name, pretrained=False, num_classes=0)


def test_random_init_is_timms_pooled_model():
    torch.manual_seed(0)
    ours = create_backbone(NAME)
    torch.manual_seed(0)
    theirs = timm.create_model(NAME, pretrained=False, num_classes=0)
    assert _same(ours, theirs)
    assert ours(torch.zeros(2, 3, 64, 64)).shape == (2, ours.num_features)


def test_a_seed_gives_the_same_initial_weights_and_leaves_the_callers_generator_alone():
    torch.manual_seed(5)
    first = create_backbone(NAME, seed=3)
    after = torch.rand(4)
    torch.manual_seed(99)
    second = create_backbone(NAME, seed=3)
    assert _same(first, second)  # whatever the global generator held
    torch.manual_seed(3)
    assert _same(first, timm.create_model(NAME, pretrained=False, num_classes=0))
    assert not _same(first, create_backbone(NAME, seed=4))
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))  # building drew nothing from the caller's


def test_exported_backbone_loads_like_timm_checkpoint_path(tmp_path):
    src = _other()
    torch.save(src.state_dict(), tmp_path / "backbone.pth")  # what objcrop train exports
    ours = create_backbone(NAME, tmp_path / "backbone.pth")
    oracle = timm.create_model(NAME, pretrained=False, num_classes=0,
                               checkpoint_path=str(tmp_path / "backbone.pth"))
    assert _same(ours, src) and _same(ours, oracle)
    assert ours.training  # the builder leaves the mode to the caller; load_backbone: eval
    evaluated = load_backbone(NAME, tmp_path / "backbone.pth")
    assert _same(evaluated, src) and not evaluated.training


def test_a_timm_state_dict_with_classifier_loads_without_it(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("resnet18", pretrained=False, num_classes=10)
    torch.save(full.state_dict(), tmp_path / "resnet18.pth")
    net = create_backbone("resnet18", tmp_path / "resnet18.pth")
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in net.state_dict().items())
    assert "fc.weight" not in net.state_dict()


def test_lightning_checkpoint_online_backbone_is_found(tmp_path):
    online, momentum = _other(), create_backbone(NAME)
    state = {f"backbone.{k}": v for k, v in online.state_dict().items()}
    state.update({f"backbone_momentum.{k}": v for k, v in momentum.state_dict().items()})
    state["projection_head.layers.0.weight"] = torch.zeros(4, 4)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    assert _same(create_backbone(NAME, tmp_path / "last.ckpt"), online)
    chosen = create_backbone(NAME, tmp_path / "last.ckpt", prefix="backbone_momentum.")
    assert _same(chosen, momentum)


def test_solo_style_kwargs_are_passed_through():
    net = create_backbone("vit_tiny_patch16_224", img_size=[64, 96], num_classes=1000,
                          dynamic_img_size=True)
    assert net.patch_embed.img_size == (64, 96)  # YAML list -> tuple
    assert net(torch.zeros(1, 3, 48, 48)).shape == (1, net.num_features)  # num_classes -> 0


def test_errors_name_the_model_or_file(tmp_path):
    with pytest.raises(BackboneError, match=r"timm has no model 'resnet5O'.*resnet50"):
        create_backbone("resnet5O")
    with pytest.raises(BackboneError, match="pretrained=True"):
        create_backbone(NAME, pretrained=True)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_backbone(NAME, tmp_path / "nope.pth")
    torch.save(_other().state_dict(), tmp_path / "effnet.pth")
    with pytest.raises(BackboneError, match=r"effnet\.pth"):
        create_backbone("resnet18", tmp_path / "effnet.pth")
    # BackboneError is a ValueError (documented for eval)
    with pytest.raises(ValueError, match=r"effnet\.pth: holds another model's weights.*first keys"):
        load_backbone("resnet18", tmp_path / "effnet.pth")
    # the right model with a few tensors missing: named, with the prefix found
    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    partial = {f"backbone.{k}": v for k, v in list(state.items())[:-3]}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(BackboneError, match=r"partial\.pth: under prefix 'backbone\.' the "
                       r"checkpoint lacks 2 of"):  # the third, a BatchNorm step count, may go
        create_backbone("resnet18", tmp_path / "partial.pth")


def test_a_deeper_networks_checkpoint_is_refused_not_cut_down(tmp_path):
    """A ResNet-34 checkpoint holds every tensor of a ResNet-18 under the same names (and a
    solo-learn checkpoint a projection head beside them): loading it would silently drop
    the blocks the smaller model lacks. A classifier that ``num_classes=0`` removed is no
    such part, and BatchNorm's step counters may be absent."""
    deep = timm.create_model("resnet34", pretrained=False, num_classes=10)
    ckpt = {"state_dict": {**{f"backbone.{k}": v for k, v in deep.state_dict().items()},
                           "projector.0.weight": torch.zeros(4, 4)}}
    torch.save(ckpt, tmp_path / "r34.ckpt")
    with pytest.raises(BackboneError, match=r"r34\.ckpt: under prefix 'backbone\.' the "
                       r"checkpoint holds \d+ tensors of the model's parts that the model "
                       r"lacks \(e\.g\. \['layer1\.2\..*Fix: pass the model name"):
        create_backbone("resnet18", tmp_path / "r34.ckpt")
    net = create_backbone("resnet34", tmp_path / "r34.ckpt")  # its head (fc) left out
    assert torch.equal(net.layer4[2].conv2.weight, deep.layer4[2].conv2.weight)
    old = {k: v for k, v in deep.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    assert torch.equal(create_backbone("resnet34", tmp_path / "old.pth").conv1.weight,
                       deep.conv1.weight)


def test_load_backbone_accepts_a_module(tmp_path):
    src = _other()
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}},
               tmp_path / "ddp.pth")
    net = load_backbone(create_backbone(NAME), tmp_path / "ddp.pth")
    assert _same(net, src) and not net.training
