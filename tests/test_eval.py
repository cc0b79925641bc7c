"""Frozen-feature evaluation: exact AP, probe and kNN sanity, feature extraction."""

import math

import numpy as np
import pytest
import torch

from objcrop_plugin.data.synthetic import load_labels, write_dataset
from objcrop_plugin.eval import (
    average_precision,
    evaluate_backbone,
    extract_features,
    knn,
    linear_probe,
    load_backbone,
    mean_average_precision,
    split_indices,
)
from objcrop_plugin.images import ImageDecodeError

timm = pytest.importorskip("timm")


# -- average precision ----------------------------------------------------------------------


def test_ap_matches_hand_computation():
    # ranks 1 and 3 positive: (P@1 + P@3) / 2 = (1 + 2/3) / 2
    ap = average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert ap.shape == (1,) and ap.dtype == torch.float64
    assert ap.item() == pytest.approx(5 / 6)
    # sklearn's docstring example: average_precision_score([0, 0, 1, 1], [.1, .4, .35, .8])
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]).item() == pytest.approx(
        0.8333333333333333
    )


def test_ap_groups_tied_scores_into_one_operating_point():
    # thresholds 0.9 (P 0, R 0), 0.5 (tie: P 1/3, R 1/2), 0.1 (P 1/2, R 1)
    # AP = 1/2 * 1/3 + 1/2 * 1/2 = 5/12, whatever the order inside the tie
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    for targets in ([0, 1, 0, 1], [0, 0, 1, 1]):
        assert average_precision(scores, targets).item() == pytest.approx(5 / 12)
    # all scores tied: one operating point, AP = prevalence
    assert average_precision(torch.zeros(5), [1, 0, 0, 1, 0]).item() == pytest.approx(0.4)


def test_ap_is_per_column_and_invariant_to_row_order():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 6), generator=g).float()  # many ties
    targets = (torch.rand(50, 6, generator=g) < 0.4).float()
    ap = average_precision(scores, targets)
    for c in range(6):
        assert ap[c].item() == pytest.approx(average_precision(scores[:, c], targets[:, c]).item())
    perm = torch.randperm(50, generator=g)
    torch.testing.assert_close(average_precision(scores[perm], targets[perm]), ap)


def _reference_ap(scores, targets):
    """sklearn's definition, written out: sum over distinct thresholds of (R_n - R_n-1) P_n."""
    ap, prev_recall = 0.0, 0.0
    positives = sum(targets)
    for t in sorted(set(scores), reverse=True):
        chosen = [y for s, y in zip(scores, targets) if s >= t]
        recall = sum(chosen) / positives
        ap += (recall - prev_recall) * sum(chosen) / len(chosen)
        prev_recall = recall
    return ap


def test_ap_equals_the_threshold_sum_definition():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 30))
        scores = rng.integers(0, 5, n).astype(float) if trial % 2 else rng.random(n)
        targets = (rng.random(n) < 0.4).astype(int)
        if targets.sum() == 0:
            targets[0] = 1
        got = average_precision(scores, targets).item()
        assert got == pytest.approx(_reference_ap(scores.tolist(), targets.tolist()))


def test_class_without_positives_is_excluded_from_map():
    scores = torch.tensor([[0.9, 0.2, 0.3], [0.8, 0.1, 0.6], [0.7, 0.4, 0.5]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0]])
    ap = average_precision(scores, targets)
    assert ap[0].item() == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(ap[1].item())
    assert ap[2].item() == pytest.approx(1.0)
    assert mean_average_precision(scores, targets) == pytest.approx(100 * ((5 / 6) + 1) / 2)
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(scores, torch.zeros(3, 3))


def test_ap_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        average_precision(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="0 and 1"):
        average_precision(torch.zeros(3), [0, 2, 1])
    with pytest.raises(ValueError, match="finite"):
        average_precision([0.1, float("nan")], [1, 0])


# -- probe and kNN --------------------------------------------------------------------------


def _labels(n, c=6, seed=0):
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.1, 0.5, c)
    return (rng.random((n, c)) < prevalence).astype(np.float32)


def _separable(y, dim=48, seed=0):
    """Features that encode the label set exactly (plus a little noise), randomly rotated."""
    rng = np.random.default_rng(seed)
    code = np.concatenate([y, 1.0 - y], axis=1)
    rot, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    x = np.pad(code, ((0, 0), (0, dim - code.shape[1]))) @ rot
    return torch.from_numpy(x + 0.05 * rng.normal(size=x.shape)).float()


def test_separable_features_give_map_100():
    y = torch.from_numpy(_labels(400))
    x = _separable(y.numpy())
    tr, te = slice(0, 300), slice(300, None)
    probe = linear_probe(x[tr], y[tr], x[te], y[te], epochs=30)
    assert probe["map"] > 99.5 and probe["train_map"] > 99.5
    assert probe["test_scores"].shape == (100, 6) and probe["classes_evaluated"] == 6
    assert knn(x[tr], y[tr], x[te], y[te], k=20)["map"] > 99.5


def test_random_features_give_chance():
    y = torch.from_numpy(_labels(1200, seed=1))
    x = torch.randn(1200, 64, generator=torch.Generator().manual_seed(1))
    tr, te = slice(0, 800), slice(800, None)
    chance = 100 * y[te].mean(0).mean().item()  # the AP of a constant score is the prevalence
    probe = linear_probe(x[tr], y[tr], x[te], y[te], epochs=20)
    nn_res = knn(x[tr], y[tr], x[te], y[te])
    assert abs(probe["map"] - chance) < 6, (probe["map"], chance)
    assert abs(nn_res["map"] - chance) < 6, (nn_res["map"], chance)


def test_probe_is_deterministic_and_leaves_global_state_alone():
    y = torch.from_numpy(_labels(300, seed=2))
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(2)) + y[:, :1]
    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    a = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=5, batch_size=64, seed=3)
    b = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=5, batch_size=64, seed=3)
    c = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=5, batch_size=64, seed=4)
    torch.testing.assert_close(a["test_scores"], b["test_scores"], rtol=0, atol=0)
    assert not torch.equal(a["test_scores"], c["test_scores"])  # the seed orders the batches
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng_state)
    sgd = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=5, optimizer="sgd", lr=0.1)
    assert math.isfinite(sgd["map"])


def test_knn_weights_and_k():
    # one test point between two train points: T -> 0 follows the nearest, large T averages
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    train_y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    test_x = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    test_y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sharp = knn(train_x, train_y, test_x, test_y, k=2, temperature=0.01)["test_scores"]
    assert sharp[0, 0] > 0.99 and sharp[1, 1] > 0.99
    flat = knn(train_x, train_y, test_x, test_y, k=2, temperature=100.0)["test_scores"]
    torch.testing.assert_close(flat.sum(1), torch.ones(2))
    assert (flat - 0.5).abs().max() < 0.01
    assert knn(train_x, train_y, test_x, test_y, k=50)["k"] == 2  # clipped to N_train
    with pytest.raises(ValueError, match="temperature"):
        knn(train_x, train_y, test_x, test_y, temperature=0.0)


def test_split_indices():
    tr, te = split_indices(10, 0.7, seed=0)
    assert len(tr) == 7 and len(te) == 3 and not set(tr) & set(te)
    assert sorted([*tr, *te]) == list(range(10))
    tr2, _ = split_indices(10, 0.7, seed=0)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(split_indices(100, 0.7, seed=1)[0], split_indices(100, 0.7, 2)[0])


# -- feature extraction on the demo data ----------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("demo"), n_images=8, size=(96, 72))


def _resnet(seed):
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, num_classes=0)


def test_extract_features_shape_determinism_and_mode(demo):
    net = _resnet(0)
    net.train()
    a = extract_features(net, demo.root, demo.keys, image_size=(72, 96), batch_size=3)
    assert a.shape == (8, net.num_features) and a.dtype == torch.float32
    assert net.training  # the caller's mode is restored
    b = extract_features(net, demo.root, demo.keys, image_size=(72, 96), batch_size=8)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # eval mode: batch-independent
    rev = extract_features(net, demo.root, demo.keys[::-1], image_size=(72, 96), batch_size=8)
    torch.testing.assert_close(rev, b.flip(0), rtol=1e-4, atol=1e-5)
    sq = extract_features(net, demo.root, demo.keys[:2], image_size=64, resize="center_crop")
    assert sq.shape == (2, net.num_features)


def test_different_initialisations_give_different_features(demo):
    f0 = extract_features(_resnet(0), demo.root, demo.keys, image_size=64)
    f1 = extract_features(_resnet(1), demo.root, demo.keys, image_size=64)
    assert not torch.allclose(f0, f1, rtol=1e-2, atol=1e-3)


def test_extract_features_errors(demo):
    net = _resnet(0)
    with pytest.raises(ImageDecodeError, match="missing.jpg"):
        extract_features(net, demo.root, ["images/missing.jpg"], image_size=32)
    with pytest.raises(ValueError, match="resize"):
        extract_features(net, demo.root, demo.keys, resize="stretch")


def _oracle_feature_maps(net, root, keys, size_wh):
    """PIL decode + bilinear resize + ImageNet normalisation by hand, then timm's feature map."""
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    batch = []
    for key in keys:
        with Image.open(root / key) as im:
            arr = np.array(im.convert("RGB").resize(size_wh, Image.BILINEAR), dtype=np.float32)
        batch.append((torch.from_numpy(arr).permute(2, 0, 1) / 255.0 - mean) / std)
    with torch.no_grad():
        return net.eval().forward_features(torch.stack(batch))


def test_pooling_and_scale_match_a_hand_computed_feature_map(demo):
    net = _resnet(0)
    fmap = _oracle_feature_maps(net, demo.root, demo.keys, (192, 144))  # 2x (96, 72)
    kw = dict(image_size=(72, 96), scale=2.0, batch_size=4)
    avg = extract_features(net, demo.root, demo.keys, **kw)
    mx = extract_features(net, demo.root, demo.keys, pooling="max", **kw)
    both = extract_features(net, demo.root, demo.keys, pooling="avgmax", **kw)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(avg, fmap.mean((2, 3)), **tol)
    torch.testing.assert_close(mx, fmap.amax((2, 3)), **tol)
    assert both.shape == (8, 2 * net.num_features)
    torch.testing.assert_close(both, torch.cat([avg, mx], 1))
    same = extract_features(net, demo.root, demo.keys, image_size=(144, 192), batch_size=4)
    torch.testing.assert_close(avg, same)  # scale multiplies image_size
    keys, y, _ = load_labels(demo.labels_path)
    res = evaluate_backbone(net, demo.root, keys, y, train_fraction=0.5, probe={"epochs": 5},
                            knn_kwargs={"k": 3}, pooling="avgmax", **kw)
    torch.testing.assert_close(res["features"], both)


def test_pooling_and_scale_errors(demo):
    net = _resnet(0)
    with pytest.raises(ValueError, match="pooling"):
        extract_features(net, demo.root, demo.keys, pooling="sum")
    with pytest.raises(ValueError, match="scale"):
        extract_features(net, demo.root, demo.keys, scale=0.0)
    pooled_only = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                      torch.nn.Flatten())
    with pytest.raises(ValueError, match=r"pooling='max' needs a \(B, D, h, w\) feature map"):
        extract_features(pooled_only, demo.root, demo.keys, image_size=32, pooling="max")


def test_evaluate_backbone_end_to_end(demo):
    keys, y, classes = load_labels(demo.labels_path)
    res = evaluate_backbone(
        _resnet(0), demo.root, keys, y, train_fraction=0.5, seed=0, image_size=(72, 96),
        probe={"epochs": 5}, knn_kwargs={"k": 3},
    )
    assert res["n_train"] == 4 and res["n_test"] == 4
    assert res["features"].shape == (8, res["feature_dim"])
    for name in ("probe_map", "knn_map", "prevalence_map"):
        assert 0.0 <= res[name] <= 100.0
    # the constant-score baseline is exactly the mean test prevalence of evaluated classes
    yte = y[res["test_indices"]]
    present = yte.sum(0) > 0
    assert res["prevalence_map"] == pytest.approx(100 * yte.mean(0)[present].mean())
    # an explicit split and precomputed features skip the split and the extraction
    again = evaluate_backbone(
        None, demo.root, keys, y, split=(res["train_indices"], res["test_indices"]),
        features=res["features"], probe={"epochs": 5}, knn_kwargs={"k": 3},
    )
    assert again["probe_map"] == pytest.approx(res["probe_map"])
    assert again["knn_map"] == pytest.approx(res["knn_map"])
    with pytest.raises(ValueError, match="overlap"):
        evaluate_backbone(None, demo.root, keys, y, split=([0, 1], [1, 2]), features=res["features"])


def test_unreadable_images_are_left_out_of_the_evaluation(demo, tmp_path, caplog):
    """A corrupt file among the labelled images: left out of both splits and listed (the run
    it ends would otherwise have trained for nothing); the other images keep their split."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo.root, root)
    keys, y, _ = load_labels(demo.labels_path)
    kw = dict(train_fraction=0.5, seed=0, image_size=(72, 96), probe={"epochs": 5},
              knn_kwargs={"k": 3})
    full = evaluate_backbone(_resnet(0), root, keys, y, **kw)
    bad = [keys[int(full["train_indices"][0])], keys[int(full["test_indices"][1])]]
    for key in bad:
        data = (root / key).read_bytes()
        (root / key).write_bytes(data[: len(data) // 4])  # truncated
    res = evaluate_backbone(_resnet(0), root, keys, y, **kw)
    assert res["unreadable"] == sorted(bad, key=keys.index)
    assert res["n_train"] == 3 and res["n_test"] == 3
    assert [keys[i] for i in res["train_indices"]] == [
        keys[i] for i in full["train_indices"] if keys[i] not in bad]
    assert [keys[i] for i in res["test_indices"]] == [
        keys[i] for i in full["test_indices"] if keys[i] not in bad]
    kept = [i for i in range(len(keys)) if keys[i] not in bad]
    torch.testing.assert_close(res["features"][kept], full["features"][kept])
    assert torch.isnan(res["features"][[keys.index(k) for k in bad]]).all()
    with pytest.raises(ImageDecodeError, match="truncated|cannot"):
        evaluate_backbone(_resnet(0), root, keys, y, skip_unreadable=False, **kw)
    # a labelled name that no file has is said as such (objcrop check cannot list it)
    import logging

    gone = keys[int(full["test_indices"][0])]
    (root / gone).rename(root / (gone + ".moved"))
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        evaluate_backbone(_resnet(0), root, keys, y, **kw)
    assert f"1 labelled images do not exist under {root} ({gone})" in caplog.text
    for key in keys:
        (root / key).write_bytes(b"")
    with pytest.raises(ValueError, match=r"8 of 8 images .* could not be read .* leaving no"):
        evaluate_backbone(_resnet(0), root, keys, y, **kw)


def test_load_backbone_finds_the_online_backbone_in_a_checkpoint(demo, tmp_path):
    online, momentum = _resnet(0), _resnet(1)
    ckpt = {
        "epoch": 3,
        "state_dict": {
            **{f"momentum_backbone.{k}": v for k, v in momentum.state_dict().items()},
            **{f"backbone.{k}": v for k, v in online.state_dict().items()},
            "projection_head.layer.weight": torch.zeros(4, 512),
        },
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    net = load_backbone("resnet18", tmp_path / "last.ckpt")
    assert not net.training
    for k, v in online.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    explicit = load_backbone("resnet18", tmp_path / "last.ckpt", prefix="momentum_backbone.")
    assert torch.equal(explicit.conv1.weight, momentum.conv1.weight)
    with pytest.raises(ValueError, match="lacks"):
        load_backbone("resnet18", tmp_path / "last.ckpt", prefix="projection_head.")


def test_a_vit_by_name_takes_the_evaluations_input_size(tmp_path):
    """`objcrop eval --model vit_... --scale 2` fed a 224 px ViT 448 px images: an
    AssertionError traceback. A ViT named here is built with dynamic_img_size; its weights
    load from a checkpoint of one built without it, and CNNs are built as before."""
    import timm

    vit = load_backbone("test_vit")
    assert vit(torch.zeros(2, 3, 96, 64)).shape == (2, vit.num_features)
    trained = timm.create_model("test_vit", pretrained=False, num_classes=0)
    torch.save(trained.state_dict(), tmp_path / "vit.pth")
    loaded = load_backbone("test_vit", tmp_path / "vit.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())
    x = torch.rand(1, 3, 224, 224)  # pos_embed grid = dynamic_img_size at its own size
    assert torch.allclose(loaded(x), trained.eval()(x), atol=1e-5)
    torch.manual_seed(0)
    cnn = load_backbone("resnet10t")
    torch.manual_seed(0)
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    assert all(torch.equal(cnn.state_dict()[k], v) for k, v in plain.state_dict().items())
