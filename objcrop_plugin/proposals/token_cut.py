"""Object discovery with a self-supervised ViT and normalized cuts (``token_cut``).

TokenCut (Wang et al., CVPR 2022) finds the salient object of an image from the patch tokens
of a self-supervised vision transformer: the tokens are the nodes of a graph whose edges say
which tokens are alike, and a normalized cut splits the graph in two, object against
background. LOST (Siméoni et al., BMVC 2021) uses the same features (the keys of the last
attention block) with a seed-expansion rule instead of a cut; MaskCut (Wang et al., CutLER,
CVPR 2023) repeats TokenCut's cut after removing each found object, to find several.

This module runs, for every working image:

1. the ViT on the image resized so that its longest side is ``input_side`` px (both sides a
   multiple of the patch size), ImageNet mean/std normalisation;
2. features: the keys of the last block's attention (a forward hook on
   ``blocks[-1].attn.qkv``, all heads concatenated), patch tokens only (the class token and
   any register tokens are dropped), L2-normalised;
3. :func:`token_cut` on the patch grid: affinity ``A = F F^T`` binarised to 1 where above
   ``tau`` and ``eps`` elsewhere (TokenCut's graph); the second smallest eigenvector of
   ``(D - A) x = lambda D x``; a split at the vector's mean; the foreground is the side holding
   the most salient patch (largest ``|x|``) and the object is its 4-connected component
   through that patch; then MaskCut's repeat on the remaining patches, up to ``max_objects``.

Published figures (CorLoc, the share of images whose top box hits an object at IoU >= 0.5,
with DINO ViT-S/16 features; as reported in the authors' READMEs, which give the numbers of
the TokenCut paper's Table 1):

====================  =====  =====  =======
method                VOC07  VOC12  COCO20k
====================  =====  =====  =======
LOST                  61.9   64.0   50.7
TokenCut              68.8   72.1   58.8
====================  =====  =====  =======

These need self-supervised DINO weights: a DINO ViT-S/16 state dict downloaded by the user,
passed as ``TokenCutGenerator(model="vit_small_patch16_224", checkpoint=PATH)`` (DINO's
``VisionTransformer`` names its tensors as timm's does; loading DINO's released file was not
tried here). They are NOT claimed
for this implementation: nothing here has been measured on those data sets, and it differs
from the papers' code in details (the image is resized to ``input_side`` instead of being run
at its own resolution; MaskCut's corner rule and its overlap and size filters are left out).
With random weights (``checkpoint=None``, as in the tests) the boxes are meaningless.

Nothing is downloaded: weights come from a local file through
:func:`objcrop_plugin.backbones.create_backbone` (a timm state dict, an exported
``backbone.pth``, a Lightning / solo-learn checkpoint), or ``module`` passes a built ViT.

References:
    Wang, Shen, Hu, Yuan, Crowley, Vaufreydaz. "Self-Supervised Transformers for Unsupervised
    Object Discovery using Normalized Cut". CVPR 2022.

    Siméoni, Puy, Vo, Roburin, Gidaris, Bursuc, Pérez, Marlet, Ponce. "Localizing Objects with
    Self-Supervised Transformers and no Labels". BMVC 2021.

    Wang, Girdhar, Yu, Misra. "Cut and Learn for Unsupervised Object Detection and Instance
    Segmentation" (CutLER, MaskCut). CVPR 2023.

    Shi, Malik. "Normalized Cuts and Image Segmentation". TPAMI 2000.

Example:
    >>> gen = TokenCutGenerator(checkpoint="dino_deitsmall16_pretrain.pth")  # doctest: +SKIP
    >>> boxes, scores = gen(image)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .generators import BatchedProposalGenerator, input_dtype, resolve_device

__all__ = ["TokenCutGenerator", "token_cut"]

log = logging.getLogger("objcrop_plugin")

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

#: a cut whose second largest eigenvalue of ``D^-1/2 A D^-1/2`` is at most this (relaxed
#: normalized-cut value >= 0.999) splits nothing better than a graph without structure does
#: (all patches alike, e.g. a uniform image): the search stops there
_MIN_EIGENVALUE = 1e-3


def _component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of ``mask`` ``(h, w)`` bool through ``seed`` (row, col)."""
    h, w = mask.shape
    cells = mask.tolist()  # plain lists: this loop runs over at most a few thousand cells
    out = np.zeros((h, w), dtype=bool)
    if not cells[seed[0]][seed[1]]:
        return out
    seen = {seed}
    queue = deque([seed])
    while queue:
        r, c = queue.popleft()
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < h and 0 <= cc < w and cells[rr][cc] and (rr, cc) not in seen:
                seen.add((rr, cc))
                queue.append((rr, cc))
    rows, cols = zip(*seen)
    out[list(rows), list(cols)] = True
    return out


def _mask_box(mask: np.ndarray) -> list[float]:
    """xyxy box of a non-empty ``(h, w)`` mask on the grid, exclusive ``x2``/``y2``."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def token_cut(
    features: torch.Tensor | np.ndarray,
    tau: float = 0.2,
    eps: float = 1e-5,
    max_objects: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """TokenCut's normalized cut on a patch grid, repeated MaskCut-style for several objects.

    Each round, on the patches not yet taken by an object:

    1. ``A = F F^T`` of the L2-normalised features, made exactly symmetric, then ``1`` where
       ``> tau`` and ``eps`` elsewhere; ``D = diag(A 1)``;
    2. ``x``: the second smallest generalised eigenvector of ``(D - A) x = lambda D x``,
       computed as ``D^-1/2 y`` with ``y`` the eigenvector of the second *largest* eigenvalue
       ``mu = 1 - lambda`` of ``D^-1/2 A D^-1/2`` (``torch.linalg.eigh``);
    3. the seed is the patch with the largest ``|x|``; ``x`` is flipped so that it is positive
       there (this fixes eigh's arbitrary sign), and the foreground is ``x > mean(x)``;
    4. the object is the 4-connected component of the foreground through the seed; its box
       is the output, and its patches are removed from the graph for the next round.

    The rounds stop after ``max_objects`` objects, when fewer than two patches remain, when
    ``mu <= 1e-3`` (no split better than that of a graph without structure, e.g. a uniform
    image) or when the split is trivial (the foreground is empty or every remaining patch).

    Scores (higher is better): the object of round ``t`` (0-based) scores
    ``max_objects - t - lambda_t / 4``, with ``lambda_t = 1 - mu_t`` in ``[0, 1)`` the round's
    relaxed normalized-cut value; objects keep the order in which they were found, and within
    an order a cleaner cut scores higher. The box of the whole foreground of the first cut
    (several components: e.g. several instances of a class) is added when it differs from
    the first object's, scored ``max_objects - 0.5 - lambda_0 / 4``: after the first object,
    before the second. Every score is positive.

    Args:
        features: ``(h, w, C)`` patch features (any float dtype; CPU or GPU: the cut runs
            where they are). They are L2-normalised here.
        tau: affinity threshold on the cosine similarity (TokenCut: 0.2).
        eps: weight of the edges below ``tau`` (TokenCut: 1e-5); keeps the graph connected.
        max_objects: most objects to find (TokenCut: 1; MaskCut: 3).

    Returns:
        ``(K, 4)`` float64 xyxy boxes on the patch grid with exclusive ``x2``/``y2`` (the
        single patch at column 3, row 1 is ``[3, 1, 4, 2]``), and ``(K,)`` float64 scores,
        best first; ``K <= max_objects + 1``.

    Example:
        >>> f = torch.zeros(6, 8, 2); f[..., 0] = 1; f[1:3, 2:5] = torch.tensor([0.0, 1.0])
        >>> boxes, scores = token_cut(f, max_objects=1)
        >>> boxes
        array([[2., 1., 5., 3.]])
    """
    feats = torch.as_tensor(features)
    if feats.ndim != 3:
        raise ValueError(f"token_cut: features must be (h, w, C), got shape {tuple(feats.shape)}")
    h, w, c = feats.shape
    n = h * w
    empty = (np.zeros((0, 4)), np.zeros(0))
    if n < 2 or int(max_objects) < 1:
        return empty
    f = F.normalize(feats.reshape(n, c).float(), dim=1)
    sim = f @ f.T
    sim = 0.5 * (sim + sim.T)  # a matmul is not always bitwise symmetric; eigh reads one half
    affinity = torch.where(sim > tau, torch.ones_like(sim), torch.full_like(sim, eps))
    alive = np.ones(n, dtype=bool)
    boxes: list[list[float]] = []
    scores: list[float] = []
    for t in range(int(max_objects)):
        keep = np.flatnonzero(alive)
        if len(keep) < 2:
            break
        idx = torch.from_numpy(keep).to(affinity.device)
        a = affinity.index_select(0, idx).index_select(1, idx)
        d_isqrt = a.sum(dim=1).rsqrt()
        evals, evecs = torch.linalg.eigh(d_isqrt[:, None] * a * d_isqrt[None, :])
        mu = float(evals[-2])
        if not mu > _MIN_EIGENVALUE:
            break
        x = evecs[:, -2] * d_isqrt
        seed = int(torch.argmax(x.abs()))
        x = x if float(x[seed]) > 0 else -x
        fg = (x > x.mean()).cpu().numpy()
        if not fg.any() or fg.all():
            break
        fg_grid = np.zeros(n, dtype=bool)
        fg_grid[keep[fg]] = True
        fg_grid = fg_grid.reshape(h, w)
        obj = _component(fg_grid, divmod(int(keep[seed]), w))
        if not obj.any():  # the seed is in the foreground by construction; guard rounding
            break
        cut = 1.0 - mu
        boxes.append(_mask_box(obj))
        scores.append(max_objects - t - cut / 4)
        if t == 0:
            whole = _mask_box(fg_grid)
            if whole != boxes[0]:
                boxes.append(whole)
                scores.append(max_objects - 0.5 - cut / 4)
        alive[obj.reshape(-1)] = False
    if not boxes:
        return empty
    b, s = np.asarray(boxes, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    return b[order], s[order]


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_vit(net: torch.nn.Module, who: str) -> None:
    blocks = getattr(net, "blocks", None)
    try:
        qkv = blocks[-1].attn.qkv  # type: ignore[index]
    except (TypeError, IndexError, AttributeError):
        qkv = None
    if not hasattr(net, "patch_embed") or not isinstance(qkv, torch.nn.Linear):
        raise ValueError(
            f"token_cut: {who} is not a vision transformer with a qkv attention (it needs "
            "patch_embed and blocks[-1].attn.qkv, as timm's VisionTransformer has). Fix: use a "
            "timm ViT, e.g. model='vit_small_patch16_224' with checkpoint= a DINO ViT-S/16 "
            "state dict"
        )


class TokenCutGenerator(BatchedProposalGenerator):
    """TokenCut / MaskCut object discovery on a self-supervised ViT (see the module docstring).

    Args:
        model: timm ViT name (``timm.list_models("vit_*")``), created with
            ``pretrained=False`` and ``dynamic_img_size=True``.
        checkpoint: local weights file for ``model`` (e.g. a DINO ViT-S/16 state dict for
            ``vit_small_patch16_224``). ``None``: random weights (seeded by ``seed``), which
            give meaningless boxes (tests only; a warning is logged).
        prefix: the backbone's key prefix inside ``checkpoint`` (``None``: detected).
        seed: the random weights' seed when there is no ``checkpoint`` (the same network in
            every process).
        module: an already built timm ViT (with ``dynamic_img_size=True``) to use instead of
            ``model``/``checkpoint``. Used as it is: not moved, put in eval mode during a call
            and back in its mode after. Not part of :meth:`params` (a store's manifest then
            records ``model`` as passed, which does not rebuild this network).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"depth": 2}``);
            ``dynamic_img_size`` is always ``True``.
        max_objects: objects per image (MaskCut's repeated cut; 1 is TokenCut).
        tau: affinity threshold on the keys' cosine similarity (TokenCut: 0.2).
        eps: edge weight below ``tau`` (TokenCut: 1e-5).
        input_side: longest side of the network input in px, rounded to a multiple of the
            patch size (480 with 16 px patches: a 30-patch long side).
        top_k, max_side, nms_iou, min_side, batch_size: see
            :class:`~objcrop_plugin.proposals.generators.BatchedProposalGenerator`.
        device: ``"auto"`` (with ``module``: the module's device; else CUDA when available),
            ``"cpu"``, ``"cuda:1"``...

    Input: ``(H, W, 3)`` uint8 RGB array or PIL image.

    Output: ``(boxes (K, 4) float32 xyxy pixels of the input, scores (K,) float32)``, best
    first, ``K <= min(top_k, max_objects + 1)``; scores as :func:`token_cut`.

    Raises:
        ValueError: a parameter out of range, a model that is not a ViT (no ``patch_embed``
            and ``blocks[-1].attn.qkv``), or a ``module`` without ``dynamic_img_size``.
        FileNotFoundError: ``checkpoint`` does not exist.
    """

    name: ClassVar[str] = "token_cut"

    def __init__(
        self,
        model: str = "vit_small_patch16_224",
        checkpoint: str | os.PathLike[str] | None = None,
        prefix: str | None = None,
        seed: int = 0,
        module: torch.nn.Module | None = None,
        model_kwargs: dict[str, Any] | None = None,
        max_objects: int = 3,
        tau: float = 0.2,
        eps: float = 1e-5,
        input_side: int = 480,
        top_k: int = 10,
        max_side: int = 512,
        nms_iou: float | None = 0.7,
        min_side: float = 4.0,
        batch_size: int = 16,
        device: str = "auto",
    ) -> None:
        super().__init__(top_k=top_k, max_side=max_side, nms_iou=nms_iou, min_side=min_side,
                         batch_size=batch_size, device=device)
        if int(max_objects) < 1:
            raise ValueError(f"token_cut: max_objects must be >= 1, got {max_objects!r}")
        if not -1.0 <= float(tau) < 1.0:
            raise ValueError(f"token_cut: tau is a cosine similarity in [-1, 1), got {tau!r}")
        if not 0.0 < float(eps) < 1.0:
            raise ValueError(f"token_cut: eps must lie in (0, 1), got {eps!r}")
        self.model = str(model)
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.prefix = prefix
        self.seed = int(seed)
        self.model_kwargs = dict(model_kwargs or {})
        self.max_objects = int(max_objects)
        self.tau = float(tau)
        self.eps = float(eps)
        self.input_side = int(input_side)
        if module is None:
            module = self._build()
            module = module.eval().to(self._device)
            who = f"model '{self.model}'"
        else:
            if self.checkpoint is not None or prefix is not None or self.model_kwargs:
                raise ValueError(
                    "token_cut: got module= and checkpoint/prefix/model_kwargs. Fix: pass "
                    "either a built module or model= with checkpoint= (not both)"
                )
            who = f"module {type(module).__name__}"
            _check_vit(module, who)
            if getattr(module, "dynamic_img_size", False) is not True:
                raise ValueError(
                    f"token_cut: {who} was built without dynamic_img_size, so it only takes "
                    "its training input size. Fix: build it with timm.create_model(NAME, "
                    "dynamic_img_size=True), or pass model=NAME and checkpoint=PATH instead"
                )
            p = next(module.parameters(), None)
            own = p.device if p is not None else resolve_device(device)
            if str(device) == "auto":
                self._device = own
            elif not _same_device(own, self._device):
                raise ValueError(
                    f"token_cut: the module is on {own}, not on device={device!r}. Fix: move "
                    "it first (module.to(device)) or pass device='auto'"
                )
        self._net = module
        self._patch = tuple(int(v) for v in module.patch_embed.patch_size)
        self._prefix_tokens = int(getattr(module, "num_prefix_tokens", 1))
        if self.input_side < max(self._patch):
            raise ValueError(
                f"token_cut: input_side {self.input_side} is smaller than {who}'s patch size "
                f"{max(self._patch)}"
            )

    def _build(self) -> torch.nn.Module:
        from ..backbones import create_backbone

        kwargs = dict(self.model_kwargs)
        if kwargs.pop("dynamic_img_size", True) is not True:
            raise ValueError("token_cut: model_kwargs dynamic_img_size must be True (or unset): "
                             "the network runs at each image's own aspect ratio")
        if self.checkpoint is None:
            log.warning("token_cut: no checkpoint given, %s has random weights: its boxes are "
                        "meaningless (--checkpoint FILE, or checkpoint=PATH in Python, e.g. "
                        "a DINO ViT-S/16 state dict)",
                        self.model)
        try:
            net = create_backbone(self.model, self.checkpoint, self.prefix,
                                  seed=self.seed,
                                  dynamic_img_size=True, **kwargs)
        except TypeError as exc:  # a CNN's constructor refuses dynamic_img_size
            raise ValueError(
                f"token_cut: cannot build model '{self.model}' as a ViT with "
                f"dynamic_img_size=True ({exc}). Fix: token_cut needs a timm vision "
                "transformer, e.g. model='vit_small_patch16_224' with checkpoint= a DINO "
                "ViT-S/16 state dict"
            ) from None
        _check_vit(net, f"model '{self.model}'")
        return net

    # ------------------------------------------------------------------ network side

    def input_size(self, work_hw: tuple[int, int]) -> tuple[int, int]:
        """The network input ``(h, w)`` for a working image of ``work_hw``: longest side about
        ``input_side``, each side a positive multiple of the patch size."""
        h, w = work_hw
        ph, pw = self._patch
        s = self.input_side / max(h, w)
        return max(1, round(h * s / ph)) * ph, max(1, round(w * s / pw)) * pw

    def _prepare(self, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        # a copy: the working image from PIL is read-only, which torch warns about
        x = torch.from_numpy(np.array(arr[:, :, :3])).to(self._device)
        x = x.permute(2, 0, 1)[None].float().div_(255)
        h, w = arr.shape[:2]
        if (h, w) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                              antialias=size[0] < h or size[1] < w)
        mean = torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std)[0]

    def patch_features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Keys of the last attention block for images that share one network input size.

        Args:
            images: working images ``(h, w, 3)`` uint8 RGB whose :meth:`input_size` is the
                same.

        Returns:
            ``(B, gh, gw, C)`` float32 on the device: the patch tokens' keys (all heads
            concatenated; class and register tokens dropped), not normalised.
        """
        sizes = {self.input_size(np.asarray(im).shape[:2]) for im in images}
        if len(sizes) != 1:
            raise ValueError(f"token_cut: patch_features needs one input size, got {sizes}")
        ih, iw = sizes.pop()
        net = self._net
        x = torch.stack([self._prepare(im, (ih, iw)) for im in images]).to(input_dtype(net))
        captured: list[torch.Tensor] = []
        hook = net.blocks[-1].attn.qkv.register_forward_hook(
            lambda _m, _i, out: captured.append(out)
        )
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                getattr(net, "forward_features", net)(x)
        finally:
            hook.remove()
            net.train(was_training)
        if not captured:
            raise RuntimeError(
                "token_cut: the network never called blocks[-1].attn.qkv, so its keys cannot "
                "be read. Fix: use a timm VisionTransformer (e.g. vit_small_patch16_224)"
            )
        qkv = captured[-1].float()  # (B, N, 3 * dim): timm splits it as (3, heads, head_dim)
        b, n = qkv.shape[:2]
        keys = qkv.reshape(b, n, 3, -1)[:, :, 1]
        gh, gw = ih // self._patch[0], iw // self._patch[1]
        if n - self._prefix_tokens != gh * gw:
            raise RuntimeError(
                f"token_cut: {n} tokens for a {gh}x{gw} patch grid and "
                f"{self._prefix_tokens} prefix tokens; the model's token layout is not a "
                "timm ViT's"
            )
        return keys[:, self._prefix_tokens :].reshape(b, gh, gw, -1)

    def raw_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Boxes of :func:`token_cut` on each working image, in its pixels.

        Images are grouped by network input size (one forward per group, at most
        ``batch_size`` images), so an image's result does not depend on its batchmates'
        sizes. Patch ``(row i, col j)`` covers ``[j * w / gw, (j + 1) * w / gw) x
        [i * h / gh, (i + 1) * h / gh)`` of an ``(h, w)`` working image with a ``gh x gw`` grid.
        """
        out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros((0, 4)), np.zeros(0))] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(self.input_size(np.asarray(image).shape[:2]), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                feats = self.patch_features([images[i] for i in chunk])
                gh, gw = feats.shape[1:3]
                for j, i in enumerate(chunk):
                    h, w = np.asarray(images[i]).shape[:2]
                    boxes, scores = token_cut(feats[j], self.tau, self.eps, self.max_objects)
                    out[i] = (boxes * np.array([w / gw, h / gh, w / gw, h / gh]), scores)
        return out

