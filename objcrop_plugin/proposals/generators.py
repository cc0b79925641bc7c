"""Proposal generators: an image in, scored boxes out.

A generator works on the *displayed* image (EXIF orientation applied, RGB uint8, as
:func:`objcrop_plugin.images.load_rgb` gives it), at a working resolution whose longest
side is ``max_side``; its boxes are mapped back to the image it was given, clipped, stripped of
tiny and degenerate boxes, de-duplicated by non-maximum suppression and cut to the ``top_k``
best by score.

Subclasses implement :meth:`ProposalGenerator.raw` and register the class in the entry-point
group ``objcrop_plugin.proposals``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from .. import boxes as box_ops

__all__ = ["ProposalGenerator", "postprocess"]


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

    def working_image(self, image: np.ndarray | Image.Image) -> np.ndarray:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
        w, h = pil.size
        scale = self.max_side / max(w, h)
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            pil = pil.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(pil)

    def __call__(self, image: np.ndarray | Image.Image) -> tuple[np.ndarray, np.ndarray]:
        size = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
        work = self.working_image(image)
        wh, ww = work.shape[:2]
        boxes, scores = self.raw(work)
        boxes, scores = postprocess(
            boxes, scores, (ww, wh), top_k=self.top_k, nms_iou=self.nms_iou,
            min_side=self.min_side,
        )
        return box_ops.rescale(boxes, (ww, wh), size).astype(np.float32), scores

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
