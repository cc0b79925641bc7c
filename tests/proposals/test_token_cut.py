"""TokenCut / MaskCut proposals: the cut on planted patch features, the key features of a timm
ViT, output contract, determinism, batch independence, weights files and errors.

The network runs with random weights here (a 2-block ViT-Tiny): its boxes are meaningless, so
the tests check mechanics; what the cut finds is checked on planted features instead."""

import json
import logging
import pickle

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from objcrop_plugin.proposals.token_cut import TokenCutGenerator, token_cut

TINY = "vit_tiny_patch16_224"
TINY_KW = {"depth": 2}


def _tiny_vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(TINY, pretrained=False, num_classes=0, dynamic_img_size=True,
                             **{**TINY_KW, **kwargs}).eval()


@pytest.fixture(scope="module")
def vit():
    return _tiny_vit()


def _gen(module, **kw):
    return TokenCutGenerator(module=module, **{"input_side": 160, "device": "cpu", **kw})


def _images():
    """Smooth noisy backgrounds with a saturated rectangle, of several sizes ``(w, h)``."""
    rng = np.random.default_rng(0)
    out = []
    for w, h in [(200, 150), (120, 160), (200, 150), (700, 300), (31, 17)]:
        yy, xx = np.mgrid[0:h, 0:w]
        im = np.stack([100 + 50 * np.sin(xx / 20), 120 + 40 * np.cos(yy / 15), 90 + 0 * xx], 2)
        im = im + rng.normal(0, 10, (h, w, 3))
        im[h // 4 : h // 2, w // 3 : w // 2] = (230, 40, 30)
        out.append(np.clip(im, 0, 255).astype(np.uint8))
    return out


def _planted(hw, objects, channels=32, noise=0.05, seed=0):
    """Patch features ``(h, w, C)``: background along e0, object ``i`` (a grid box ``x1, y1,
    x2, y2``) along e_{i+1}, plus Gaussian noise."""
    h, w = hw
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(channels)
    feats = eye[0].expand(h, w, channels).clone()
    for i, (x1, y1, x2, y2) in enumerate(objects):
        feats[y1:y2, x1:x2] = eye[i + 1]
    return feats + noise * torch.randn(h, w, channels, generator=g)


def _check_contract(boxes, scores, size, top_k=10):
    w, h = size
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and scores.shape == (len(boxes),)
    assert len(boxes) <= top_k
    assert np.isfinite(boxes).all() and np.isfinite(scores).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (np.diff(scores) <= 0).all(), "scores must be sorted best first"


# ------------------------------------------------------------------------- the cut itself


@pytest.mark.parametrize(
    ("hw", "box"),
    [((12, 16), (5, 3, 10, 7)), ((30, 30), (0, 0, 7, 12)), ((9, 20), (14, 4, 20, 9)),
     ((30, 22), (10, 12, 11, 13))],
)
def test_cut_finds_the_planted_object(hw, box):
    boxes, scores = token_cut(_planted(hw, [box]), max_objects=1)
    np.testing.assert_array_equal(boxes, [box])
    assert scores.shape == (1,) and scores[0] > 0


def test_cut_finds_two_planted_objects():
    a, b = (5, 3, 10, 7), (0, 8, 3, 11)
    boxes, scores = token_cut(_planted((12, 16), [a, b]), max_objects=2)
    found = [tuple(x) for x in boxes.astype(int).tolist()]
    assert a in found and b in found
    assert found[0] in (a, b), "the first cut's object must rank first"
    assert (np.diff(scores) < 0).all() and (scores > 0).all()
    # one object only: the second is not searched for (the first cut's whole foreground,
    # here both objects, may come as one more, lower-scored box)
    boxes1, _ = token_cut(_planted((12, 16), [a, b]), max_objects=1)
    assert tuple(boxes1[0].astype(int)) == found[0] and len(boxes1) <= 2


def test_cut_stops_without_structure():
    uniform = torch.ones(8, 10, 16)
    assert token_cut(uniform)[0].shape == (0, 4)
    # every object found: the remaining background is uniform, the search stops early
    boxes, _ = token_cut(_planted((12, 16), [(5, 3, 10, 7)]), max_objects=3)
    assert len(boxes) == 1
    assert token_cut(torch.randn(1, 1, 8))[0].shape == (0, 4)  # one patch: nothing to cut


def test_cut_is_invariant_to_feature_sign_and_scale():
    feats = _planted((12, 16), [(5, 3, 10, 7), (0, 8, 3, 11)], seed=3)
    b1, s1 = token_cut(feats, max_objects=2)
    assert len(b1) == 3  # the two objects and their union (the first cut's foreground)
    for other in (3.0 * feats.double(), -feats):  # scale; sign (cosine affinities)
        b2, s2 = token_cut(other, max_objects=2)
        np.testing.assert_array_equal(b1, b2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_cut_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(h, w, C\)"):
        token_cut(torch.zeros(16, 8))


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 4}, {"class_token": False,
                                                            "global_pool": "avg"}])
def test_patch_features_are_the_last_blocks_keys(kwargs):
    net = _tiny_vit(**kwargs)
    gen = _gen(net)
    image = _images()[0]  # 200x150 -> 160x128 network input (7.5 rounds to 8), an 8x10 grid
    feats = gen.patch_features([image])
    assert gen.input_size(image.shape[:2]) == (128, 160)
    assert feats.shape == (1, 8, 10, net.embed_dim)
    # outside oracle: timm's own blocks, run by hand up to the last block's qkv projection
    x = gen._prepare(image, (128, 160))[None]
    with torch.no_grad():
        t = net.norm_pre(net._pos_embed(net.patch_embed(x)))
        for blk in net.blocks[:-1]:
            t = blk(t)
        attn = net.blocks[-1].attn
        qkv = attn.qkv(net.blocks[-1].norm1(t))
        b, n, _ = qkv.shape
        k = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[1]
        k = k.transpose(1, 2).reshape(b, n, -1)[:, net.num_prefix_tokens :]
    torch.testing.assert_close(feats.reshape(1, 80, -1), k)


def test_input_size_is_a_multiple_of_the_patch(vit):
    gen = _gen(vit, input_side=480)
    assert gen.input_size((512, 384)) == (480, 352)  # 22.5 patches: Python rounds to even
    assert gen.input_size((300, 700)) == (208, 480)
    assert gen.input_size((3, 700)) == (16, 480)
    assert _gen(vit, input_side=470).input_size((100, 100)) == (464, 464)


def test_grid_boxes_map_to_working_pixels(vit, monkeypatch):
    gen = _gen(vit)
    image = np.zeros((150, 200, 3), np.uint8)  # network input 128x160: an 8x10 grid
    planted = _planted((8, 10), [(2, 1, 5, 4)])
    monkeypatch.setattr(gen, "patch_features", lambda images: planted[None])
    (boxes, scores), = gen.raw_batch([image])
    np.testing.assert_allclose(boxes[0], [2 * 20, 1 * 150 / 8, 5 * 20, 4 * 150 / 8])
    # and through the base class, to an image twice the working size
    big = np.zeros((300, 400, 3), np.uint8)
    gen.max_side = 200
    boxes_big, _ = gen(big)
    np.testing.assert_allclose(boxes_big[0], [80, 300 / 8, 200, 1200 / 8], rtol=1e-6)


# --------------------------------------------------------------------------- generator


def test_output_contract(vit):
    gen = _gen(vit, max_side=256)
    images = _images()
    results = gen.propose_batch(images + [Image.fromarray(images[0])])
    assert len(results) == len(images) + 1
    for image, (boxes, scores) in zip(images + [images[0]], results):
        _check_contract(boxes, scores, (image.shape[1], image.shape[0]))
        assert len(boxes) <= gen.max_objects + 1
    assert sum(len(b) for b, _ in results) > 0
    boxes, scores = _gen(vit, top_k=1)(images[0])
    _check_contract(boxes, scores, (200, 150), top_k=1)


def test_same_image_same_boxes(vit):
    images = _images()
    gen = _gen(vit)
    first = gen.propose_batch(images)
    again = gen.propose_batch(images)
    fresh = _gen(vit).propose_batch(images)
    for (b1, s1), (b2, s2), (b3, s3) in zip(first, again, fresh):
        np.testing.assert_array_equal(b1, b2)
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(b1, b3)
        np.testing.assert_array_equal(s1, s3)


def test_result_does_not_depend_on_batchmates(vit):
    images = _images()
    gen = _gen(vit, batch_size=3)
    together = gen.propose_batch(images)  # two 200x150 images share a forward
    for image, (boxes, scores) in zip(images, together):
        alone_boxes, alone_scores = gen(image)
        np.testing.assert_allclose(alone_boxes, boxes, atol=1e-3)
        np.testing.assert_allclose(alone_scores, scores, atol=1e-5)


def test_default_input_side(vit):
    gen = TokenCutGenerator(module=vit, device="cpu")
    assert gen.input_size((150, 200)) == (352, 480)
    boxes, scores = gen(_images()[0])
    _check_contract(boxes, scores, (200, 150))


def test_module_mode_is_restored():
    net = _tiny_vit().train()
    _gen(net)(_images()[0])
    assert net.training


def test_params_are_json_and_pickle(vit):
    gen = _gen(vit, max_objects=2, tau=0.3)
    params = gen.params()
    assert "module" not in params and "_net" not in params
    assert params["max_objects"] == 2 and params["tau"] == 0.3 and params["input_side"] == 160
    json.dumps(params)
    clone = pickle.loads(pickle.dumps(gen))
    assert clone.params() == params
    image = _images()[1]
    for a, b in zip(gen(image), clone(image)):
        np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------- weights and errors


def test_checkpoint_round_trip(tmp_path, caplog):
    net = _tiny_vit(seed=7)
    path = tmp_path / "vit.pth"
    torch.save(net.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        from_file = TokenCutGenerator(model=TINY, model_kwargs=TINY_KW, checkpoint=str(path),
                                      input_side=160, device="cpu")
    assert "random weights" not in caplog.text
    images = _images()
    for (b1, s1), (b2, s2) in zip(from_file.propose_batch(images),
                                  _gen(net).propose_batch(images)):
        np.testing.assert_array_equal(b1, b2)
        np.testing.assert_array_equal(s1, s2)
    assert from_file.params()["checkpoint"] == str(path)


def test_random_weights_are_warned_about_and_seeded(caplog):
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        torch.manual_seed(1)
        a = TokenCutGenerator(model=TINY, model_kwargs=TINY_KW, device="cpu")
    assert "random weights" in caplog.text and "checkpoint" in caplog.text
    torch.manual_seed(2)  # another global seed: the same network (one per seed, any process)
    b = TokenCutGenerator(model=TINY, model_kwargs=TINY_KW, device="cpu")
    c = TokenCutGenerator(model=TINY, model_kwargs=TINY_KW, device="cpu", seed=1)
    sa, sb, sc = (g._net.state_dict() for g in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_cnn_is_refused():
    with pytest.raises(ValueError, match="resnet18"):
        TokenCutGenerator(model="resnet18", device="cpu")
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="ResNet.*not a vision transformer"):
        TokenCutGenerator(module=cnn, device="cpu")


def test_fixed_size_vit_module_is_refused():
    net = timm.create_model(TINY, pretrained=False, num_classes=0, **TINY_KW)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        TokenCutGenerator(module=net, device="cpu")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TokenCutGenerator(model=TINY, model_kwargs=TINY_KW, checkpoint=tmp_path / "nope.pth",
                          device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_objects": 0}, "max_objects"), ({"tau": 1.0}, "tau"), ({"eps": 0.0}, "eps"),
     ({"input_side": 8}, "input_side"), ({"batch_size": 0}, "batch_size"),
     ({"checkpoint": "w.pth"}, "either a built module")],
)
def test_bad_parameters(vit, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _gen(vit, **kwargs)


def test_registered_name(vit):
    from objcrop_plugin.proposals.build import make_generator
    from objcrop_plugin.registry import list_proposal_sources

    assert "token_cut" in list_proposal_sources(kind="generator")
    gen = make_generator("token_cut", module=vit, input_side=160, device="cpu")
    assert isinstance(gen, TokenCutGenerator)


def test_a_network_in_half_precision_gets_inputs_of_its_dtype():
    """``precision: bf16-true`` keeps the ViT's weights in bfloat16; its inputs follow."""
    net = _tiny_vit().to(torch.bfloat16)
    feats = _gen(net).patch_features([_images()[0]])
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
