"""Evaluation of frozen features: multi-label linear probe and kNN, scored by mAP.

This is the paper's OpenImages/COCO protocol (Mishra et al., TMLR 2022, Sec. 4): the
self-supervised backbone is frozen, one feature vector is extracted per *whole* image, a
multi-label linear classifier is trained on the train split with a binary cross-entropy loss
(100 epochs), and the test split is scored by the mean over classes of the average precision
(mAP, in percent). A weighted kNN classifier on the same features (InstDisc / DINO style) gives
a second, training-free number, and the label prevalence gives the chance level.

Pieces, usable on their own:

* :func:`extract_features` -- ``(N, D)`` features of a list of image keys under a root
  (``pooling`` avg / max / avgmax of the feature map, input ``scale``).
* :func:`average_precision` / :func:`mean_average_precision` -- exact AP as
  ``sklearn.metrics.average_precision_score`` (ties grouped, no interpolation), no sklearn.
* :func:`linear_probe` -- standardised features, linear layer, ``BCEWithLogits``, Adam or SGD.
* :func:`knn` -- cosine similarity, weights ``exp(sim / T)``, weighted vote of multi-hot labels.
* :func:`evaluate_backbone` -- all of the above with one feature pass and a seeded split.
* :func:`load_backbone` -- a timm model in eval mode with local weights
  (:func:`objcrop_plugin.backbones.create_backbone`).

``objcrop eval``, the evaluation at the end of ``objcrop train`` and ``objcrop demo`` all run
:func:`evaluate_backbone`; the demo with ``scale=2.0, pooling="avgmax"`` and its own
train/test split.

Example:
    >>> import torch
    >>> y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    >>> x = y + 0.01 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    >>> round(mean_average_precision(x, y), 1)
    100.0
    >>> round(knn(x, y, x, y, k=2)["map"], 1)
    100.0

References:
    - Mishra et al., "Object-aware Cropping for Self-Supervised Learning", TMLR 2022,
      arXiv:2112.00319 (multi-label linear probe, mAP).
    - Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
      CVPR 2018, and Caron et al., "Emerging Properties in Self-Supervised Vision
      Transformers" (DINO), ICCV 2021 (weighted kNN with temperature).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from .engine.photometric import IMAGENET_MEAN, IMAGENET_STD
from .images import ImageDecodeError, draft_factor, load_rgb, open_image

__all__ = [
    "average_precision",
    "evaluate_backbone",
    "extract_features",
    "knn",
    "linear_probe",
    "load_backbone",
    "mean_average_precision",
    "split_indices",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Pooling = Literal["avg", "max", "avgmax"]
ArrayLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]


# --------------------------------------------------------------------------------------------
# feature extraction
# --------------------------------------------------------------------------------------------
def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        h = w = image_size
    else:
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
        h, w = (int(v) for v in image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


class _EvalImages(torch.utils.data.Dataset):
    """Deterministic eval view of each image: ``(3, H, W)`` float32, ImageNet-normalised."""

    def __init__(
        self, root: PathLike, keys: Sequence[str], size: tuple[int, int], resize: str,
        skip_unreadable: bool = False,
    ) -> None:
        self.root = os.fspath(root)
        self.keys = list(keys)
        self.size = size
        self.resize = resize
        self.skip_unreadable = skip_unreadable
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        """The image's tensor and whether it could be read (a zero image when not, with
        ``skip_unreadable``; else :class:`ImageDecodeError`)."""
        try:
            return self._load(index), True
        except ImageDecodeError:
            if not self.skip_unreadable:
                raise
            return torch.zeros(3, *self.size), False

    def _load(self, index: int) -> torch.Tensor:
        oh, ow = self.size
        opened = open_image(os.path.join(self.root, self.keys[index]))
        w, h = opened.size
        if self.resize == "center_crop":
            scale = max(ow / w, oh / h)  # shorter side (relative to the target) fits exactly
            rw, rh = max(ow, round(w * scale)), max(oh, round(h * scale))
        else:
            rw, rh = ow, oh
        # JPEG DCT draft decoding only where the decoded image still covers the output
        reduce = draft_factor([(0, 0, w, h)], [(rh, rw)])
        img = load_rgb(opened, reduce=reduce)
        img = img.resize((rw, rh), Image.BILINEAR)  # PIL's resize antialiases when shrinking
        if self.resize == "center_crop":
            left, top = (rw - ow) // 2, (rh - oh) // 2
            img = img.crop((left, top, left + ow, top + oh))
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return (x.float().div_(255.0) - self.mean) / self.std


def extract_features(
    backbone: nn.Module,
    root: PathLike,
    keys: Sequence[str],
    image_size: int | Sequence[int] = 224,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    *,
    resize: Literal["resize", "center_crop"] = "resize",
    scale: float = 1.0,
    pooling: Pooling = "avg",
    skip_unreadable: bool = False,
) -> torch.Tensor:
    """One feature vector per whole image, from a frozen backbone.

    The eval transform is deterministic: decode (EXIF orientation applied, any mode to RGB,
    via :mod:`objcrop_plugin.images`), resize, scale to [0, 1], ImageNet-normalise.

    * ``resize="resize"`` (default): the whole image is resized to ``image_size``, aspect
      ratio not kept. In multi-label evaluation every labelled object counts, so nothing is
      cropped away (objects near the border of COCO/OpenImages images keep their labels).
    * ``resize="center_crop"``: the image is resized, aspect kept, so that it just covers
      ``image_size``, then the centre ``image_size`` is cut out (the ImageNet convention without
      the 0.875 margin).

    ``scale`` multiplies ``image_size`` (the input is ``round(scale * height) x
    round(scale * width)``): a small backbone trained on small views sees the objects of a
    small image larger, e.g. ``image_size=(96, 128), scale=2.0`` probes 96x128 images at
    192x256.

    ``pooling`` turns a feature map into one vector:

    * ``"avg"`` (default): the backbone's own output, ``backbone(x)`` (for a timm model created
      with ``num_classes=0`` its global pooling: the mean for CNNs, the class token or token
      mean for ViTs); a ``(B, D, h, w)`` output is averaged over ``h, w``.
    * ``"max"``: the maximum over ``h, w`` of the feature map ``backbone.forward_features(x)``
      (a timm CNN's ``(B, D, h, w)``); small objects show in the max more than in the mean.
    * ``"avgmax"``: both, concatenated: ``(B, 2D)``, mean first.

    The backbone runs in eval mode under :func:`torch.inference_mode`; its previous
    ``training`` flag is restored afterwards.

    Args:
        backbone: maps ``(B, 3, H, W)`` float32 to ``(B, D)`` (or ``(B, D, h, w)``).
        root: dataset root; ``keys`` are paths relative to it.
        keys: the N images, in output order.
        image_size: ``int`` for square, or ``(height, width)``.
        batch_size: images per forward pass.
        num_workers: DataLoader workers for decoding.
        device: where the backbone runs (it is moved there).
        resize: ``"resize"`` or ``"center_crop"``, see above.
        scale: input upscaling factor applied to ``image_size`` (> 0).
        pooling: ``"avg"``, ``"max"`` or ``"avgmax"``, see above.
        skip_unreadable: give an image that cannot be opened or decoded a row of NaN instead
            of raising.

    Returns:
        ``(N, D)`` float32 CPU tensor (``(N, 2D)`` for ``"avgmax"``), row ``i`` for ``keys[i]``.

    Raises:
        ValueError: bad ``image_size``/``resize``/``scale``/``pooling``, or a backbone output
            of unsupported shape (``max``/``avgmax`` need a ``(B, D, h, w)`` feature map).
        ImageDecodeError: an image cannot be opened or decoded (the message names the file),
            unless ``skip_unreadable``.

    Example:
        >>> import timm  # doctest: +SKIP
        >>> net = timm.create_model("resnet18", pretrained=False, num_classes=0)  # doctest: +SKIP
        >>> extract_features(net, ds.root, ds.keys, image_size=(192, 256)).shape  # doctest: +SKIP
        torch.Size([200, 512])
    """
    if resize not in ("resize", "center_crop"):
        raise ValueError(f"resize must be 'resize' or 'center_crop', got {resize!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pooling not in ("avg", "max", "avgmax"):
        raise ValueError(f"pooling must be 'avg', 'max' or 'avgmax', got {pooling!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    h, w = _hw(image_size)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    device = torch.device(device)
    dataset = _EvalImages(root, keys, size, resize, skip_unreadable)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    was_training = backbone.training
    backbone.eval()
    backbone.to(device)
    chunks: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for x, ok in loader:
                out = _pooled(backbone, x.to(device, non_blocking=True), pooling).float().cpu()
                out[~ok] = float("nan")  # unreadable (skip_unreadable): marked, not a feature
                chunks.append(out)
    finally:
        backbone.train(was_training)
    if not chunks:
        return torch.zeros(0, 0)
    return torch.cat(chunks)


def _pooled(backbone: nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(B, D)`` (``(B, 2D)`` for avgmax) features of one batch."""
    if pooling == "avg":
        out = backbone(x)
    else:
        forward_features = getattr(backbone, "forward_features", None)
        out = forward_features(x) if callable(forward_features) else backbone(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if pooling != "avg" and out.ndim != 4:
        raise ValueError(
            f"pooling={pooling!r} needs a (B, D, h, w) feature map; the backbone gives shape "
            f"{tuple(out.shape)}. Fix: pooling='avg', or a CNN with forward_features (timm)."
        )
    if out.ndim == 4:
        avg = out.mean(dim=(2, 3))
        if pooling == "avg":
            out = avg
        elif pooling == "max":
            out = out.amax(dim=(2, 3))
        else:
            out = torch.cat([avg, out.amax(dim=(2, 3))], dim=1)
    if out.ndim != 2:
        raise ValueError(
            f"backbone output has shape {tuple(out.shape)}; expected (B, D) or "
            "(B, D, h, w). Fix: pass a pooled backbone, e.g. timm.create_model("
            "name, num_classes=0)."
        )
    return out


def load_backbone(
    model: str | nn.Module,
    checkpoint: PathLike | None = None,
    prefix: str | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A frozen-evaluation backbone, in eval mode: :func:`objcrop_plugin.backbones.create_backbone`
    for a timm model name, or ``model`` itself with the weights of ``checkpoint``
    (:func:`objcrop_plugin.backbones.load_backbone_weights`).

    ``checkpoint`` is a ``backbone.pth`` exported by ``objcrop train``, a timm state dict, or a
    lightly/Lightning/solo-learn checkpoint whose backbone prefix is detected (pass ``prefix``
    to choose, ``""`` for none). ``**timm_kwargs`` go to ``timm.create_model``; a ViT or Swin
    named by ``model`` is built with ``dynamic_img_size=True``, so it takes any input size.

    Raises:
        objcrop_plugin.backbones.BackboneError: unknown model name (close matches are named),
            a checkpoint that is not a plain weights file (truncated, not a ``torch.save``
            file, or pickled objects, which are never run), or one without a complete set of
            the model's tensors (a :class:`ValueError`).
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    from .backbones import create_backbone, load_backbone_weights

    if isinstance(model, str):  # a ViT takes the evaluation's input size (dynamic_img_size)
        return create_backbone(model, checkpoint, prefix, any_size=True, **timm_kwargs).eval()
    if checkpoint is not None:
        load_backbone_weights(model, checkpoint, prefix)
    return model.eval()


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def _as_2d(name: str, a: ArrayLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    t = t.detach().to("cpu", dtype)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, C) or (N,), got shape {tuple(t.shape)}")
    return t


def _targets(name: str, targets: ArrayLike, n: int | None = None) -> torch.Tensor:
    y = _as_2d(name, targets)
    if n is not None and y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} rows, the features have {n}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{name} must be multi-hot with values 0 and 1 only")
    return y


def average_precision(scores: ArrayLike, targets: ArrayLike) -> torch.Tensor:
    """Average precision of each class (column), exactly as sklearn's.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in decreasing
    order: samples with tied scores enter together (one operating point), and the curve is not
    interpolated -- the definition of ``sklearn.metrics.average_precision_score``. Equivalently,
    the mean over the positives of the precision at the threshold equal to their score.

    Args:
        scores: ``(N, C)`` (or ``(N,)``) real scores, higher = more likely positive.
        targets: ``(N, C)`` (or ``(N,)``) multi-hot, values 0/1 (bool, int or float).

    Returns:
        ``(C,)`` float64 AP in [0, 1]; ``nan`` for a class without positives.

    Raises:
        ValueError: shapes differ, targets not 0/1, or scores not finite.

    Example:
        >>> average_precision(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 0, 1])).tolist()
        [0.8333333333333333]
    """
    s = _as_2d("scores", scores)
    y = _targets("targets", targets)
    if s.shape != y.shape:
        raise ValueError(f"scores {tuple(s.shape)} and targets {tuple(y.shape)} differ in shape")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores must be finite (found nan or inf)")
    n, c = s.shape
    if n == 0:
        return torch.full((c,), math.nan, dtype=torch.float64)
    s_sorted, order = torch.sort(s, dim=0, descending=True, stable=True)
    y_sorted = torch.gather(y, 0, order)
    tp = torch.cumsum(y_sorted, dim=0)
    # last row of each run of tied scores: the operating point the whole run belongs to
    last = torch.ones_like(s_sorted, dtype=torch.bool)
    last[:-1] = s_sorted[1:] != s_sorted[:-1]
    rows = torch.arange(n).view(-1, 1).expand(n, c)
    end = torch.where(last, rows, torch.full_like(rows, n))
    end = torch.flip(torch.cummin(torch.flip(end, [0]), dim=0).values, [0])
    precision_at_end = torch.gather(tp, 0, end) / (end + 1).to(torch.float64)
    positives = y.sum(dim=0)
    ap = (precision_at_end * y_sorted).sum(dim=0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, math.nan))


def mean_average_precision(scores: ArrayLike, targets: ArrayLike) -> float:
    """mAP in percent (0-100): the mean of :func:`average_precision` over classes with positives.

    Args:
        scores: ``(N, C)`` scores.
        targets: ``(N, C)`` multi-hot 0/1.

    Returns:
        mAP in percent; classes without a positive in ``targets`` are left out.

    Raises:
        ValueError: no class has a positive (mAP undefined), or as :func:`average_precision`.
    """
    ap = average_precision(scores, targets)
    valid = ~torch.isnan(ap)
    if not bool(valid.any()):
        raise ValueError("mAP is undefined: no class has a positive sample in targets")
    return float(ap[valid].mean()) * 100.0


def _summary(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    ap = average_precision(scores, targets)
    valid = ~torch.isnan(ap)
    return {
        "map": float(ap[valid].mean()) * 100.0 if bool(valid.any()) else math.nan,
        "ap": ap,
        "classes_evaluated": int(valid.sum()),
    }


# --------------------------------------------------------------------------------------------
# classifiers on frozen features
# --------------------------------------------------------------------------------------------
def _features(name: str, x: ArrayLike) -> torch.Tensor:
    t = _as_2d(name, x, torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (found nan or inf)")
    return t


def _train_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    weight_decay: float,
    bs: int,
    seed: int,
    optimizer: str,
    momentum: float,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Train ``logits = x @ weight.T + bias`` with BCE; returns ``(weight (C, D), bias (C,), loss)``."""
    n, d = x.shape
    c = y.shape[1]
    steps_per_epoch = math.ceil(n / bs)
    total = max(1, epochs * steps_per_epoch)
    with torch.enable_grad():
        weight = torch.zeros(c, d, device=x.device, requires_grad=True)
        bias = torch.zeros(c, device=x.device, requires_grad=True)
        groups = [{"params": [weight], "weight_decay": weight_decay},
                  {"params": [bias], "weight_decay": 0.0}]
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(groups, lr=lr)
        else:
            opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if cosine
                 else None)
        loss_fn = nn.BCEWithLogitsLoss()
        gen = torch.Generator().manual_seed(int(seed))
        last_loss = math.nan
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x.device) if bs < n else None
            running = 0.0
            for i in range(steps_per_epoch):
                if order is None:
                    xb, yb = x, y
                else:
                    idx = order[i * bs:(i + 1) * bs]
                    xb, yb = x[idx], y[idx]
                loss = loss_fn(torch.addmm(bias, xb, weight.t()), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                running += float(loss.detach()) * xb.shape[0]
            last_loss = running / n
    return weight.detach(), bias.detach(), last_loss


def _check_split(train_x, train_y, test_x, test_y):
    """Features and targets of a train/test split as tensors, with matching shapes."""
    xtr, xte = _features("train_x", train_x), _features("test_x", test_x)
    ytr = _targets("train_y", train_y, xtr.shape[0]).float()
    yte = _targets("test_y", test_y, xte.shape[0])
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train_x has {xtr.shape[1]} dims, test_x has {xte.shape[1]}")
    if ytr.shape[1] != yte.shape[1]:
        raise ValueError(f"train_y has {ytr.shape[1]} classes, test_y has {yte.shape[1]}")
    if xtr.shape[0] == 0:
        raise ValueError("train_x is empty")
    return xtr, ytr, xte, yte


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int | None = 256,
    seed: int = 0,
    *,
    optimizer: Literal["adam", "sgd"] = "adam",
    momentum: float = 0.9,
    cosine: bool = True,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Multi-label linear classifier on frozen features; test mAP.

    Features are standardised with the *train* mean and standard deviation (per dimension;
    constant dimensions are left at zero), then a linear layer ``D -> C`` (zero-initialised)
    is trained with ``BCEWithLogitsLoss`` for ``epochs`` passes over the train set, with Adam
    (default) or SGD with momentum, L2 ``weight_decay`` on the weights (not the bias) and a
    cosine learning-rate decay to 0. Mini-batches are drawn from a generator seeded with
    ``seed``, so the result is a function of the inputs and ``seed`` (on one device and torch
    build); the global RNG is not touched.

    Args:
        train_x: ``(N_train, D)`` features.
        train_y: ``(N_train, C)`` multi-hot 0/1.
        test_x: ``(N_test, D)`` features.
        test_y: ``(N_test, C)`` multi-hot 0/1.
        epochs: passes over the train set (the paper: 100).
        lr: peak learning rate (Adam default 1e-3; for ``optimizer="sgd"`` try 0.1).
        weight_decay: L2 penalty on the weights.
        batch_size: mini-batch size; ``None`` (or >= N_train) for full-batch steps.
        seed: seed of the mini-batch order.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: SGD momentum.
        cosine: cosine learning-rate decay over all steps (else constant).
        device: where to train (CPU is fast for N ~ 1e4, D ~ 2048).
        num_threads: torch intra-op threads while training on CPU (restored afterwards).
            ``None``: 1 thread when a step is small (``batch x D x C < 2**24``), else torch's
            setting -- waking a thread pool for each tiny matmul costs more than the matmul
            and, on a loaded machine, slows small probes down 10-30x.

    Returns:
        ``dict`` with ``map`` (test mAP, percent), ``ap`` ``(C,)`` float64 test AP per class
        (``nan`` without test positives), ``classes_evaluated``, ``train_map`` (percent),
        ``train_loss`` (mean BCE of the last epoch), ``test_scores`` ``(N_test, C)`` logits,
        and the settings used (``epochs``, ``lr``, ``weight_decay``, ``batch_size``,
        ``optimizer``, ``seed``).

    Raises:
        ValueError: mismatched shapes, non-finite features, targets not 0/1.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = (torch.rand(200, 3, generator=g) < 0.3).float()
        >>> x = torch.cat([y, torch.randn(200, 5, generator=g)], 1)
        >>> res = linear_probe(x[:150], y[:150], x[150:], y[150:], epochs=50, batch_size=32)
        >>> res["map"] > 95, sorted(k for k in res if k.endswith("map"))
        (True, ['map', 'train_map'])
    """
    xtr, ytr, xte, yte = _check_split(train_x, train_y, test_x, test_y)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")

    device = torch.device(device)
    mean = xtr.mean(dim=0)
    std = xtr.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    xtr = ((xtr - mean) / std).to(device)
    xte_n = ((xte - mean) / std).to(device)
    ytr = ytr.to(device)

    n, d = xtr.shape
    c = ytr.shape[1]
    bs = n if batch_size is None or batch_size >= n else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")

    if num_threads is None:
        num_threads = 1 if bs * d * c < 2**24 else torch.get_num_threads()
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and num_threads != threads_before:
        torch.set_num_threads(max(1, int(num_threads)))
    try:
        weight, bias, last_loss = _train_linear(
            xtr, ytr, epochs, lr, weight_decay, bs, seed, optimizer, momentum, cosine
        )
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)

    with torch.no_grad():
        w, b = weight, bias
        train_scores = torch.addmm(b, xtr, w.t()).cpu()
        test_scores = torch.addmm(b, xte_n, w.t()).cpu()
    out = _summary(test_scores, yte)
    train_eval = _summary(train_scores, ytr.cpu())
    out.update(
        train_map=train_eval["map"],
        train_loss=last_loss,
        test_scores=test_scores,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=bs,
        optimizer=optimizer,
        seed=seed,
    )
    return out


def knn(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    k: int = 20,
    temperature: float = 0.07,
    *,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Weighted kNN on cosine similarity, multi-label; test mAP.

    Features are L2-normalised; for each test sample the ``k`` most similar train samples
    (cosine similarity ``s``) vote with weight ``exp(s / temperature)`` (InstDisc / DINO). The
    score of class ``c`` is the weighted fraction of the neighbours that have ``c``:
    ``sum_j w_j y_jc / sum_j w_j`` in [0, 1]. Normalising by the total weight makes scores
    comparable *across* test samples, which the per-class AP ranking needs (DINO's
    single-label vote only compares classes within one sample).

    Args:
        train_x: ``(N_train, D)`` features.
        train_y: ``(N_train, C)`` multi-hot 0/1.
        test_x: ``(N_test, D)`` features.
        test_y: ``(N_test, C)`` multi-hot 0/1.
        k: neighbours (clipped to N_train).
        temperature: softmax temperature of the weights (DINO: 0.07).
        chunk_size: test rows per similarity block (memory ``chunk_size x N_train``).
        device: where to compute.

    Returns:
        ``dict`` with ``map`` (percent), ``ap`` ``(C,)``, ``classes_evaluated``,
        ``test_scores`` ``(N_test, C)`` float32, ``k`` (as used) and ``temperature``.

    Raises:
        ValueError: mismatched shapes, empty train set, ``k < 1`` or ``temperature <= 0``.
    """
    xtr, ytr, xte, yte = _check_split(train_x, train_y, test_x, test_y)
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    device = torch.device(device)
    k = min(int(k), xtr.shape[0])
    xtr_n = nn.functional.normalize(xtr, dim=1).to(device)
    ytr = ytr.to(device)
    parts = []
    for start in range(0, xte.shape[0], chunk_size):
        q = nn.functional.normalize(xte[start:start + chunk_size], dim=1).to(device)
        sim, idx = (q @ xtr_n.t()).topk(k, dim=1)
        # softmax over the neighbours == exp(s/T) / sum exp(s/T), computed stably
        w = torch.softmax(sim / temperature, dim=1)
        parts.append(torch.einsum("qk,qkc->qc", w, ytr[idx]).cpu())
    scores = torch.cat(parts) if parts else torch.zeros(0, ytr.shape[1])
    out = _summary(scores, yte)
    out.update(test_scores=scores, k=k, temperature=temperature)
    return out


# --------------------------------------------------------------------------------------------
# the whole protocol
# --------------------------------------------------------------------------------------------
def split_indices(n: int, train_fraction: float = 0.7, seed: int = 0) -> tuple[
    np.ndarray, np.ndarray
]:
    """A seeded random train/test split of ``range(n)``.

    Returns:
        ``(train, test)`` sorted int64 index arrays, ``round(train_fraction * n)`` train
        (at least 1 of each when ``n >= 2``); a function of ``(n, train_fraction, seed)`` only.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 samples to split, got {n}")
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), n])).permutation(n)
    n_train = min(n - 1, max(1, round(train_fraction * n)))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def evaluate_backbone(
    backbone: nn.Module | None,
    root: PathLike,
    keys: Sequence[str],
    labels: ArrayLike,
    train_fraction: float = 0.7,
    split: tuple[Sequence[int], Sequence[int]] | None = None,
    seed: int = 0,
    *,
    image_size: int | Sequence[int] = 224,
    resize: Literal["resize", "center_crop"] = "resize",
    scale: float = 1.0,
    pooling: Pooling = "avg",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    probe: Mapping[str, Any] | None = None,
    knn_kwargs: Mapping[str, Any] | None = None,
    features: torch.Tensor | None = None,
    skip_unreadable: bool = True,
) -> dict[str, Any]:
    """The whole protocol: features once, a deterministic split, probe + kNN + chance level.

    An image that cannot be opened or decoded (a corrupt or truncated file) is left out of
    both splits, logged and listed in the result's ``unreadable``; the split is drawn over
    every key first, so it does not move the other images between train and test.

    Args:
        backbone: the frozen backbone (see :func:`extract_features`); may be ``None``
            when ``features`` is given.
        root: dataset root.
        keys: N image keys relative to ``root``.
        labels: ``(N, C)`` multi-hot 0/1, row ``i`` for ``keys[i]`` (e.g. from
            :func:`objcrop_plugin.data.synthetic.load_labels` or
            :func:`objcrop_plugin.proposals.importers.coco_labels`).
        train_fraction: share of images in the train split when ``split`` is not given.
        split: explicit ``(train_indices, test_indices)`` into ``keys``, e.g. COCO's
            train2017/val2017 concatenated; overrides ``train_fraction``.
        seed: seed of the split and of the probe.
        image_size, resize, scale, pooling, batch_size, num_workers, device: for
            :func:`extract_features` (``objcrop demo`` uses ``scale=2.0, pooling="avgmax"``).
        probe: extra keyword arguments for :func:`linear_probe` (e.g. ``{"epochs": 100}``).
        knn_kwargs: extra keyword arguments for :func:`knn` (e.g. ``{"k": 20}``).
        features: precomputed ``(N, D)`` features; skips extraction (backbone unused).
        skip_unreadable: ``False``: an unreadable image raises :class:`ImageDecodeError`.

    Returns:
        ``dict`` with ``probe_map``, ``knn_map``, ``prevalence_map`` (percent; the AP of a
        constant score is the test prevalence of the class, i.e. chance), the full ``probe``
        and ``knn`` results, ``features`` ``(N, D)``, ``train_indices``, ``test_indices``,
        ``feature_dim``, ``n_train``, ``n_test``, ``unreadable`` (the keys left out).

    Raises:
        ValueError: ``labels`` does not have one row per key, the split is empty, overlaps or
            is out of range.
    """
    y = _targets("labels", labels, len(keys))
    if split is None:
        train_idx, test_idx = split_indices(len(keys), train_fraction, seed)
    else:
        train_idx = np.asarray(split[0], dtype=np.int64).reshape(-1)
        test_idx = np.asarray(split[1], dtype=np.int64).reshape(-1)
        if train_idx.size == 0 or test_idx.size == 0:
            raise ValueError("split: train and test indices must both be non-empty")
        both = np.concatenate([train_idx, test_idx])
        if both.min() < 0 or both.max() >= len(keys):
            raise ValueError(f"split: indices must lie in [0, {len(keys)})")
        if np.intersect1d(train_idx, test_idx).size:
            raise ValueError("split: train and test indices overlap")
    if features is None:
        if backbone is None:
            raise ValueError("evaluate_backbone: pass a backbone or precomputed features")
        feats = extract_features(
            backbone, root, keys, image_size=image_size, batch_size=batch_size,
            num_workers=num_workers, device=device, resize=resize, scale=scale, pooling=pooling,
            skip_unreadable=skip_unreadable,
        )
    else:
        feats = _features("features", features)
        if feats.shape[0] != len(keys):
            raise ValueError(f"features has {feats.shape[0]} rows for {len(keys)} keys")
    unreadable: list[str] = []
    if features is None and len(feats):
        bad = torch.isnan(feats).all(dim=1).numpy()
        if bad.any():
            unreadable = [keys[i] for i in np.flatnonzero(bad)]
            train_idx, test_idx = train_idx[~bad[train_idx]], test_idx[~bad[test_idx]]
            shown = ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else "")
            absent = [k for k in unreadable if not (Path(root) / k).exists()]
            if absent:  # a label's name that no file has: not a bad file objcrop check can list
                log.warning("evaluation: %d labelled images do not exist under %s (%s): the "
                            "labels name files that are not there (another folder, or a name "
                            "that differs by case or extension)", len(absent), root,
                            ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else ""))
            log.warning("evaluation: %d of %d images could not be read and are left out of the "
                        "probe and kNN (%s); objcrop check lists every bad file with the reason",
                        len(unreadable), len(keys), shown)
            if train_idx.size == 0 or test_idx.size == 0:
                raise ValueError(
                    f"evaluation: {len(unreadable)} of {len(keys)} images under {root} could not "
                    f"be read ({shown}), leaving no {'train' if train_idx.size == 0 else 'test'} "
                    "images. Fix: check the folder (objcrop check)")
    tr, te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    xtr, xte, ytr, yte = feats[tr], feats[te], y[tr], y[te]
    probe_res = linear_probe(xtr, ytr, xte, yte, **{"seed": seed, **dict(probe or {})})
    knn_res = knn(xtr, ytr, xte, yte, **dict(knn_kwargs or {}))
    # the train prevalence as a constant score per class: its AP is the test prevalence
    prevalence = _summary(ytr.mean(dim=0, keepdim=True).expand_as(yte).clone(), yte)
    return {
        "probe_map": probe_res["map"],
        "knn_map": knn_res["map"],
        "prevalence_map": prevalence["map"],
        "probe": probe_res,
        "knn": knn_res,
        "prevalence": prevalence,
        "features": feats,
        "train_indices": train_idx,
        "test_indices": test_idx,
        "feature_dim": int(feats.shape[1]),
        "n_train": int(train_idx.size),
        "n_test": int(test_idx.size),
        "unreadable": unreadable,
    }
