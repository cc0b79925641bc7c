"""Proposal generators: an image in, scored boxes out.

A generator works on the *displayed* image (EXIF orientation applied, RGB uint8, as
:func:`objcrop_plugin.images.load_rgb` gives it), at a working resolution whose longest
side is ``max_side``; its boxes are mapped back to the image it was given, clipped, stripped of
tiny and degenerate boxes, de-duplicated by non-maximum suppression and cut to the ``top_k``
best by score.

Subclasses implement :meth:`ProposalGenerator.raw` and register the class in the entry-point
group ``objcrop_plugin.proposals``. Generators that run a network implement
:meth:`BatchedProposalGenerator.raw_batch` instead: ``objcrop proposals build`` then decodes in
DataLoader workers and runs the network on batches in the main process (on the GPU when there
is one).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from .. import boxes as box_ops
from ..images import to_rgb

__all__ = ["BatchedProposalGenerator", "ProposalGenerator", "input_dtype", "postprocess",
           "resolve_device", "working_resize"]


def postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    image_size: tuple[int, int],
    top_k: int = 10,
    nms_iou: float | None = 0.7,
    min_side: float = 4.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Clip, drop boxes with a side under ``min_side`` px or non-finite values, NMS, top-k.

    Args:
        boxes: ``(N, 4)`` xyxy pixels of an image of ``image_size`` (width, height).
        scores: ``(N,)``; higher is better.
        nms_iou: IoU above which the lower-scored of two boxes is dropped (``None``: no NMS).

    Returns:
        ``(K, 4)`` float32 boxes and ``(K,)`` float32 scores, best first, ``K <= top_k``.
    """
    b = box_ops.as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(b) != len(s):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    keep = np.isfinite(s) & box_ops.valid_mask(b, image_size, min_side=min_side)
    b, s = box_ops.clip(b[keep], image_size), s[keep]
    order = np.argsort(-s, kind="stable")
    if len(b) and nms_iou is not None:
        import torchvision

        # Greedy NMS decides each box from the better-scored ones only, so NMS on a prefix of
        # the ranking keeps exactly the global result's first boxes: try a short prefix first
        # (BING yields thousands of raw boxes; full NMS would cost more than BING itself).
        prefix = 50 * top_k
        while True:
            cand = order[:prefix]
            kept = torchvision.ops.nms(
                torch.from_numpy(b[cand]), torch.from_numpy(s[cand]), float(nms_iou)
            ).numpy()
            if len(kept) >= top_k or prefix >= len(order):
                break
            prefix *= 4
        idx = cand[kept]
    else:
        idx = order
    idx = idx[:top_k]
    return b[idx].astype(np.float32), s[idx].astype(np.float32)


def working_resize(image: np.ndarray | Image.Image, max_side: int) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB, shrunk (never enlarged) so its longest side is ``max_side``."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if pil.mode != "RGB":
        pil = to_rgb(pil)  # the package's one conversion (16-bit data scaled, not clipped)
    w, h = pil.size
    scale = max_side / max(w, h)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pil = pil.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(pil)


class ProposalGenerator:
    """Base class of proposal generators.

    Args:
        top_k: boxes kept per image (paper: 10).
        max_side: longest side of the working resolution (images are only ever shrunk).
        nms_iou: NMS threshold (``None`` disables NMS).
        min_side: boxes with a side shorter than this many pixels *of the working image* are
            dropped.

    Input: ``(H, W, 3)`` uint8 RGB array or PIL image, displayed orientation.

    Output: ``(boxes (K, 4) float32 xyxy pixels of the input image, scores (K,) float32)``.
    """

    kind: ClassVar[str] = "generator"
    name: ClassVar[str] = "generator"

    def __init__(
        self,
        top_k: int = 10,
        max_side: int = 512,
        nms_iou: float | None = 0.7,
        min_side: float = 4.0,
    ) -> None:
        if int(top_k) < 1 or int(max_side) < 8:
            raise ValueError(f"{self.name}: need top_k >= 1 and max_side >= 8")
        self.top_k = int(top_k)
        self.max_side = int(max_side)
        self.nms_iou = nms_iou
        self.min_side = float(min_side)

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate boxes and scores on the working image ``(h, w, 3)`` uint8 RGB."""
        raise NotImplementedError

    def min_side_for(self, size: tuple[int, int]) -> float:
        """The smallest box side kept on a working image of ``size`` (width, height), in its
        pixels: ``min_side`` (a generator may raise it with the image's size)."""
        return self.min_side

    def working_image(self, image: np.ndarray | Image.Image) -> np.ndarray:
        return working_resize(image, self.max_side)

    def __call__(self, image: np.ndarray | Image.Image) -> tuple[np.ndarray, np.ndarray]:
        size = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
        work = self.working_image(image)
        wh, ww = work.shape[:2]
        boxes, scores = self.raw(work)
        boxes, scores = postprocess(
            boxes, scores, (ww, wh), top_k=self.top_k, nms_iou=self.nms_iou,
            min_side=self.min_side_for((ww, wh)),
        )
        return box_ops.rescale(boxes, (ww, wh), size).astype(np.float32), scores

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` / ``None``: CUDA when available (under ``torchrun`` or another launcher
    that sets ``LOCAL_RANK``, that rank's GPU, so the shards of a build share out the
    machine's GPUs), else the CPU; otherwise ``torch.device(device)``."""
    if device is None or str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = os.environ.get("LOCAL_RANK", "")
        if local.isdigit():
            return torch.device("cuda", int(local) % max(1, torch.cuda.device_count()))
        return torch.device("cuda")
    return torch.device(device)


class BatchedProposalGenerator(ProposalGenerator):
    """Base class of generators that run a network over batches of working images.

    Args:
        batch_size: images per forward pass.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda:1"``...
        top_k, max_side, nms_iou, min_side: as :class:`ProposalGenerator`.

    A batch's results must not depend on which other images are in it beyond floating-point
    rounding; ``objcrop proposals build`` forms the same batches on every run (within each
    chunk, in key order), so a resumed build writes the same bytes.
    """

    batched: ClassVar[bool] = True

    def __init__(
        self,
        top_k: int = 10,
        max_side: int = 512,
        nms_iou: float | None = 0.7,
        min_side: float = 4.0,
        batch_size: int = 32,
        device: str = "auto",
    ) -> None:
        super().__init__(top_k=top_k, max_side=max_side, nms_iou=nms_iou, min_side=min_side)
        if int(batch_size) < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.device = str(device)
        self._device = resolve_device(device)

    def raw_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Candidate boxes and scores for each working image ``(h, w, 3)`` uint8 RGB."""
        raise NotImplementedError

    def raw(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.raw_batch([image])[0]

    def propose_working(
        self, works: list[np.ndarray], sizes: list[tuple[int, int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Post-processed proposals of working images (from :meth:`working_image`), mapped to
        the images' full ``sizes`` ``(width, height)``; the images are run ``batch_size`` at a
        time."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for s in range(0, len(works), self.batch_size):
            batch = works[s : s + self.batch_size]
            for work, size, (boxes, scores) in zip(batch, sizes[s : s + self.batch_size],
                                                   self.raw_batch(batch)):
                wh, ww = work.shape[:2]
                boxes, scores = postprocess(
                    boxes, scores, (ww, wh), top_k=self.top_k, nms_iou=self.nms_iou,
                    min_side=self.min_side_for((ww, wh)),
                )
                out.append((box_ops.rescale(boxes, (ww, wh), size).astype(np.float32), scores))
        return out

    def propose_batch(
        self, images: list[np.ndarray | Image.Image]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`__call__` for several images (batched)."""
        sizes = [im.size if isinstance(im, Image.Image) else (im.shape[1], im.shape[0])
                 for im in images]
        return self.propose_working([self.working_image(im) for im in images], sizes)

    def __call__(self, image: np.ndarray | Image.Image) -> tuple[np.ndarray, np.ndarray]:
        return self.propose_batch([image])[0]

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def input_dtype(net: torch.nn.Module) -> torch.dtype:
    """The dtype the network's weights hold (a run with ``precision: bf16-true`` or
    ``16-true`` keeps them in half precision): its inputs must match them."""
    p = next((q for q in net.parameters() if q.is_floating_point()), None)
    return torch.float32 if p is None else p.dtype
