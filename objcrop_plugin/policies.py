"""Crop policies and view recipes: where each view of an image is cut from.

A *crop policy* draws one crop window for one view: a float ``xyxy`` box in image pixels. A
*view recipe* is an ordered list of views (policy + output size + global/local) plus the rule
that picks the object proposal they share; calling it returns one :class:`CropWindow` per view,
globals first, then locals. Nothing here touches pixels: the engines resample each window from
the decoded image exactly once, so "which box, how dilated, which RandomResizedCrop inside it"
costs a few microseconds and can be inspected, replayed and tested without images.

Single-view policies (entry-point group ``objcrop_plugin.policies``):

- ``scene``: RandomResizedCrop of the whole image (the usual SSL crop, the paper's baseline).
- ``object``: RandomResizedCrop inside one object proposal.
- ``object_dilated``: RandomResizedCrop inside the proposal dilated by a fraction of the image.

View recipes: ``scene_scene``, ``obj_scene``, ``obj_obj``, ``obj_obj_dilate`` (the paper's best)
and ``multi_crop`` (N global + M local crops, each from any policy).

Reference:
    Mishra et al., "Object-aware Cropping for Self-Supervised Learning", TMLR 2022,
    https://arxiv.org/abs/2112.00319

Example:
    >>> import numpy as np
    >>> from objcrop_plugin.policies import make_recipe
    >>> recipe = make_recipe("obj_obj_dilate", size=224)
    >>> rng = np.random.default_rng(0)
    >>> views = recipe((640, 480), np.array([[100.0, 100.0, 200.0, 220.0]]), rng=rng)
    >>> [v.size for v in views]
    [(224, 224), (224, 224)]
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from . import boxes as box_ops
from .registry import load_policy
from .stats import FallbackCounter

__all__ = [
    "CropPolicy",
    "CropWindow",
    "NoProposalError",
    "ObjectDilatedPolicy",
    "ObjectPolicy",
    "ProposalChoice",
    "ScenePolicy",
    "ViewRecipe",
    "ViewSpec",
    "make_policy",
    "make_recipe",
    "multi_crop",
    "obj_obj",
    "obj_obj_dilate",
    "obj_scene",
    "random_resized_crop",
    "scene_scene",
]

Size = box_ops.Size  # an image's (width, height)
Box = tuple[float, float, float, float]


class NoProposalError(LookupError):
    """Raised in strict mode when a sample has no usable proposal."""


@dataclass(frozen=True)
class CropWindow:
    """One planned view.

    Attributes:
        box: ``(x1, y1, x2, y2)`` float pixels of the image passed to the recipe; inside the
            image, finite, at least 2 px wide and high.
        size: output :class:`~objcrop_plugin.boxes.ViewSize` ``(height, width)`` of the view.
        policy: name of the policy that drew it (``"scene"`` when an object view fell back).
        proposal: index of the proposal it was drawn from (into the boxes passed), or ``None``.
        local: whether this is a local (small) multi-crop view.
        fallback: ``True`` when an object view became a scene crop for lack of a usable proposal.
    """

    box: Box
    size: box_ops.ViewSize
    policy: str
    proposal: int | None = None
    local: bool = False
    fallback: bool = False


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except Exception as exc:
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise ValueError(f"{name} must satisfy 0 <= low <= high, got {value!r}")
    return lo, hi


def _out_size(size: int | Sequence[int]) -> box_ops.ViewSize:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"view size must be positive (height, width), got {size!r}")
    return box_ops.ViewSize(h, w)


def random_resized_crop(
    region: Sequence[float],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> Box:
    """torchvision's RandomResizedCrop parameter draw, inside ``region``, in float pixels.

    Draws an area fraction uniformly in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    after ``attempts`` misses it takes the central crop with the ratio clamped to ``ratio``, as
    torchvision does. Windows are not rounded to whole pixels (the engines resample sub-pixel
    boxes), and are at least :data:`~objcrop_plugin.boxes.MIN_WINDOW` pixels when the region is.
    """
    x1, y1, x2, y2 = (float(v) for v in region)
    width, height = x2 - x1, y2 - y1
    region_area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = region_area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if box_ops.MIN_WINDOW <= w <= width and box_ops.MIN_WINDOW <= h <= height:
            x = x1 + rng.uniform(0.0, width - w)
            y = y1 + rng.uniform(0.0, height - h)
            return (x, y, x + w, y + h)
    in_ratio = width / height if height > 0 else 1.0
    if in_ratio < ratio[0]:
        w, h = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    return (cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0)


def fit_window(window: Sequence[float], image_size: Size) -> Box:
    """Make any window usable: finite, inside the image, at least 2 px per side.

    A non-finite window becomes the whole image; an inverted one is reordered; one thinner than
    2 px grows about its centre and is shifted back inside the image.
    """
    width, height = float(image_size[0]), float(image_size[1])
    try:
        x1, y1, x2, y2 = (float(v) for v in window)
    except Exception:
        return (0.0, 0.0, width, height)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return (0.0, 0.0, width, height)
    out = []
    for lo, hi, length in ((x1, x2, width), (y1, y2, height)):
        lo, hi = min(lo, hi), max(lo, hi)
        lo, hi = min(max(lo, 0.0), length), min(max(hi, 0.0), length)
        need = min(box_ops.MIN_WINDOW, length)
        if hi - lo < need:
            centre = (lo + hi) / 2.0
            lo, hi = centre - need / 2.0, centre + need / 2.0
            if lo < 0.0:
                lo, hi = 0.0, need
            elif hi > length:
                lo, hi = length - need, length
            # centre +- need/2 can round to a hair under `need` (1.9999999999999998): widen by
            # ulps so the >= MIN_WINDOW contract holds exactly, staying inside the image
            while hi - lo < need:
                if hi < length:
                    hi = min(math.nextafter(hi, math.inf), length)
                else:
                    lo = max(math.nextafter(lo, -math.inf), 0.0)
        out.append((lo, hi))
    (x1, x2), (y1, y2) = out
    return (x1, y1, x2, y2)


class CropPolicy:
    """Base class of single-view crop policies.

    Subclass it, set ``name``, set ``needs_proposal = True`` if the policy crops from the
    sample's proposal, and implement one of the two hooks: :meth:`region` (where a
    RandomResizedCrop of ``scale``/``ratio`` is drawn; the default is the whole image) or, for
    another draw, :meth:`sample` (the window itself). Register the class in the entry-point
    group ``objcrop_plugin.policies`` and it can be selected by name everywhere (recipes,
    ``objcrop train``, solo-learn augmentation entries).

    Input to this policy: the image size ``(width, height)``, the chosen proposal box (or
    ``None``), and a ``numpy.random.Generator``.

    Output of this policy: one crop window ``(x1, y1, x2, y2)`` in float pixels. The recipe makes
    it usable (clipped, finite, >= 2 px) whatever the policy returns.
    """

    name: ClassVar[str] = "policy"
    needs_proposal: ClassVar[bool] = False

    def __init__(
        self,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    ) -> None:
        self.scale = _pair(scale, f"{self.name}.scale")
        self.ratio = _pair(ratio, f"{self.name}.ratio")
        if self.ratio[0] <= 0:
            raise ValueError(f"{self.name}.ratio must be > 0, got {ratio!r}")

    def region(self, image_size: Size, box: np.ndarray | None) -> Box:
        """Hook: the region ``(x1, y1, x2, y2)`` the RandomResizedCrop is drawn in.

        ``image_size`` is ``(width, height)``; ``box`` the sample's proposal (``(4,)`` xyxy
        pixels of that image) or ``None`` for policies without ``needs_proposal``. The default
        is the whole image (``scene``); the region may leave the image (it is clipped).
        """
        return (0.0, 0.0, float(image_size[0]), float(image_size[1]))

    def sample(self, image_size: Size, box: np.ndarray | None, rng: np.random.Generator) -> Box:
        """Hook: one crop window ``(x1, y1, x2, y2)``, drawn with ``rng`` only (reproducible).

        The default draws a RandomResizedCrop (``scale``, ``ratio``) inside :meth:`region`.
        """
        region = fit_window(self.region(image_size, box), image_size)
        return random_resized_crop(region, self.scale, self.ratio, rng)

    def scene_fallback(self, image_size: Size, rng: np.random.Generator) -> Box:
        """The scene crop an object view becomes when the sample has no usable proposal."""
        whole = (0.0, 0.0, float(image_size[0]), float(image_size[1]))
        return random_resized_crop(whole, self.scale, self.ratio, rng)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class ScenePolicy(CropPolicy):
    """RandomResizedCrop of the whole image: the usual SSL crop and the paper's baseline.

    Args:
        scale: area fraction of the image, default MoCo-v2's ``(0.2, 1.0)``.
        ratio: aspect ratio range, default ``(3/4, 4/3)``.
    """

    name = "scene"


class ObjectPolicy(CropPolicy):
    """RandomResizedCrop inside one object proposal.

    Args:
        scale: area fraction of the proposal box, default ``(0.2, 1.0)``; the released code uses
            ``(0.0, 1.0)`` (``rescale_parameter = 0``).
        ratio: aspect ratio range, default ``(3/4, 4/3)``.
        min_size: boxes narrower or shorter than this many pixels are enlarged first (``None``:
            never). With ``min_size_grow=None`` the short side is widened to ``min_size``.
        min_size_grow: the released code's rule: a side below ``min_size`` grows by this many
            pixels at each end (``min_size=224, min_size_grow=112``).
    """

    name = "object"
    needs_proposal = True

    def __init__(
        self,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        min_size: float | None = None,
        min_size_grow: float | None = None,
    ) -> None:
        super().__init__(scale, ratio)
        self.min_size = None if min_size is None else float(min_size)
        self.min_size_grow = None if min_size_grow is None else float(min_size_grow)

    def _grow(self, box: np.ndarray, image_size: Size) -> np.ndarray:
        return box

    def region(self, image_size: Size, box: np.ndarray | None) -> Box:
        if box is None:
            return super().region(image_size, None)
        b = self._grow(box_ops.as_boxes(box), image_size)
        if self.min_size is not None:
            b = box_ops.ensure_min_size(b, self.min_size, self.min_size_grow)
        return tuple(box_ops.clip(b, image_size)[0].tolist())


class ObjectDilatedPolicy(ObjectPolicy):
    """RandomResizedCrop inside the dilated proposal: context around the object.

    Args:
        dilation: default 0.1: each side of the box moves out by 10% of the image side (the
            paper's text: 10-20% of the image size).
        dilation_mode: ``"image"`` (default) or ``"coordinate"``, the released code's rule where
            every coordinate grows by ``dilation`` times its own value (use ``dilation=0.2``).
        scale, ratio, min_size, min_size_grow: as for :class:`ObjectPolicy`.
    """

    name = "object_dilated"

    def __init__(
        self,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        dilation: float = 0.1,
        dilation_mode: Literal["image", "coordinate"] = "image",
        min_size: float | None = None,
        min_size_grow: float | None = None,
    ) -> None:
        super().__init__(scale, ratio, min_size, min_size_grow)
        if not (math.isfinite(float(dilation)) and dilation >= 0):
            raise ValueError(f"object_dilated.dilation must be >= 0, got {dilation!r}")
        if dilation_mode not in ("image", "coordinate"):
            raise ValueError(
                f"object_dilated.dilation_mode must be 'image' or 'coordinate', got {dilation_mode!r}"
            )
        self.dilation = float(dilation)
        self.dilation_mode = dilation_mode

    def _grow(self, box: np.ndarray, image_size: Size) -> np.ndarray:
        return box_ops.dilate(box, image_size, self.dilation, self.dilation_mode)


#: how a proposal is drawn among the top-k (:class:`ProposalChoice`)
WEIGHTINGS = ("uniform", "rank")


@dataclass
class ProposalChoice:
    """How a sample's proposal is chosen: among the top-k usable boxes by score, uniformly (the
    paper) or weighted by rank.

    Args:
        top_k: how many of the best-scored usable boxes to draw from (paper: 10).
        min_area, max_area: keep boxes whose clipped area, as a fraction of the image area, lies
            in ``[min_area, max_area]``.
        weighting: ``"uniform"`` (the paper: each of the top-k equally likely) or ``"rank"``
            (the box of rank ``r`` drawn with probability proportional to ``1 / r``: of ten
            boxes the best is drawn 34% of the time, the tenth 3%; every box stays drawable).
            Ranks follow the scores; without scores, the boxes' stored order.

    A box is usable when it is finite and, clipped to the image, at least 2 px per side.
    """

    top_k: int = 10
    min_area: float = 0.0
    max_area: float = 1.0
    weighting: Literal["uniform", "rank"] = "uniform"

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or int(self.top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k!r}")
        self.top_k = int(self.top_k)
        self.min_area, self.max_area = _pair((self.min_area, self.max_area), "min_area/max_area")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(map(repr, WEIGHTINGS))}, "
                             f"got {self.weighting!r}")

    def draw(self, candidates: np.ndarray, rng: np.random.Generator) -> int:
        """One of ``candidates`` (as :meth:`candidates` returns them, best first)."""
        if self.weighting == "rank" and len(candidates) > 1:
            w = 1.0 / np.arange(1, len(candidates) + 1, dtype=np.float64)
            return int(candidates[rng.choice(len(candidates), p=w / w.sum())])
        return int(rng.choice(candidates))

    def usable(self, image_size: Size, boxes: np.ndarray) -> np.ndarray:
        """``bool (K,)``: the boxes a view can be cut from (valid once clipped) whose clipped
        area lies in ``[min_area, max_area]`` of the image's."""
        b = box_ops.as_boxes(boxes)
        ok = box_ops.valid_mask(b, image_size)
        if len(b) and (self.min_area > 0 or self.max_area < 1):
            rel = box_ops.area(box_ops.clip(np.where(ok[:, None], b, 0.0), image_size))
            rel = rel / (float(image_size[0]) * float(image_size[1]))
            ok &= (rel >= self.min_area) & (rel <= self.max_area)
        return ok

    def candidates(self, image_size: Size, boxes: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
        """Indices of the boxes that may be drawn, best score first."""
        b = box_ops.as_boxes(boxes)
        if len(b) == 0:
            return np.zeros(0, dtype=np.int64)
        idx = np.flatnonzero(self.usable(image_size, b))
        if scores is not None and len(idx) > 1:
            s = np.asarray(scores, dtype=np.float64)[idx]
            s = np.where(np.isfinite(s), s, -np.inf)
            idx = idx[np.argsort(-s, kind="stable")]
        return idx[: self.top_k]


@dataclass
class ViewSpec:
    """One view of a recipe: the policy that draws it, its output size, global or local."""

    policy: CropPolicy
    size: tuple[int, int]
    local: bool = False


@dataclass
class ViewRecipe:
    """An ordered set of views and the proposal they are cut from.

    Input to this recipe: the image size ``(width, height)``, the image's proposal boxes
    ``(K, 4)`` in pixels of that image (``None`` when the image has no entry in the store),
    optional scores ``(K,)``, a ``numpy.random.Generator``, the sample's key (for logs) and
    optionally ``boxes_size``, the ``(width, height)`` the boxes refer to when it is not the
    image's: boxes of an image of the same aspect ratio are rescaled; of another aspect ratio
    (width and height swapped by an EXIF orientation mismatch, or another image) they would
    land on other objects, so the sample falls back to scene crops, counted as ``mismatched``.

    Output of this recipe: a list of :class:`CropWindow`, globals first, then locals.

    One proposal is drawn per sample and shared by every object view (``obj_obj_dilate``'s two
    views come from the same box); set ``proposal_per_view=True`` to draw one per view. When a
    sample has no usable proposal its object views become scene crops, counted in
    ``recipe.fallbacks`` (or :class:`NoProposalError` is raised when ``strict=True``).

    Args:
        views: the views.
        choice: proposal choice (top-k, area filter).
        shuffle_globals: shuffle the order of the global views per sample (the released code
            shuffles the object and dilated view, which matters for asymmetric methods).
        proposal_per_view: draw an independent proposal for each object view.
        strict: raise instead of falling back.
        name: for logs and reprs.
    """

    views: list[ViewSpec]
    choice: ProposalChoice = field(default_factory=ProposalChoice)
    shuffle_globals: bool = False
    proposal_per_view: bool = False
    strict: bool = False
    name: str = "custom"
    fallbacks: FallbackCounter = field(default_factory=FallbackCounter, repr=False)
    #: object views become their policies' scene crops, deliberately (not counted as
    #: fallbacks): the warm-up epochs of online proposals before there is a store
    scene_only: bool = False

    def __post_init__(self) -> None:
        if not self.views:
            raise ValueError("a view recipe needs at least one view")
        # globals first, then locals, whatever order the views were given in
        self.views = [v for v in self.views if not v.local] + [v for v in self.views if v.local]

    @property
    def n_global(self) -> int:
        return sum(not v.local for v in self.views)

    @property
    def n_local(self) -> int:
        return sum(v.local for v in self.views)

    @property
    def needs_proposals(self) -> bool:
        return any(v.policy.needs_proposal for v in self.views)

    def __call__(
        self,
        image_size: Size,
        boxes: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
        key: str | None = None,
        boxes_size: Size | None = None,
    ) -> list[CropWindow]:
        w, h = image_size
        if not (w > 0 and h > 0):
            raise ValueError(f"image size must be positive (width, height), got {image_size!r}")
        rng = np.random.default_rng() if rng is None else rng
        self.fallbacks.add("samples")
        candidates = np.zeros(0, dtype=np.int64)
        b = None
        if self.needs_proposals and not self.scene_only:
            mismatch = None
            if boxes is not None and boxes_size is not None and tuple(boxes_size) != (w, h):
                mismatch = box_ops.size_mismatch(boxes_size, image_size)
                if mismatch is None:  # the same image at another resolution
                    boxes = box_ops.rescale(boxes, boxes_size, image_size)
            if mismatch is not None:
                (bw, bh) = boxes_size
                detail = f"its proposals are for a {bw}x{bh} image but it is {w}x{h}"
                if mismatch == "transposed":
                    detail += " (the stored size is the transpose: an EXIF orientation mismatch)"
                self._fallback("mismatched", key, detail + "; rebuild the proposals "
                               "(`objcrop proposals build`)")
            elif boxes is None:
                self._fallback("missing", key, "no entry in the proposal store")
            else:
                b = box_ops.as_boxes(boxes)
                if scores is not None and len(scores) != len(b):
                    raise ValueError(f"{key or '<no key>'}: {len(b)} boxes but {len(scores)} scores")
                candidates = self.choice.candidates(image_size, b, scores)
                if len(candidates) == 0:
                    self._fallback(
                        "unusable", key, f"none of its {len(b)} proposals is usable"
                    )
        shared = self.choice.draw(candidates, rng) if len(candidates) else None

        windows: list[CropWindow] = []
        for spec in self.views:
            pol = spec.policy
            idx = None
            if pol.needs_proposal and shared is not None:
                idx = self.choice.draw(candidates, rng) if self.proposal_per_view else shared
                box = pol.sample(image_size, b[idx], rng)
                name, fell_back = pol.name, False
            elif pol.needs_proposal:
                box = pol.scene_fallback(image_size, rng)
                name, fell_back = "scene", not self.scene_only
            else:
                box = pol.sample(image_size, None, rng)
                name, fell_back = pol.name, False
            windows.append(
                CropWindow(
                    box=fit_window(box, image_size),
                    size=spec.size,
                    policy=name,
                    proposal=idx,
                    local=spec.local,
                    fallback=fell_back,
                )
            )
        if self.shuffle_globals and self.n_global > 1:
            # the views' order is shuffled, not the slots' sizes (a batch needs each slot's)
            order = rng.permutation(self.n_global)
            slots = windows[: self.n_global]
            windows[: self.n_global] = [dataclasses.replace(slots[i], size=slots[j].size)
                                        for j, i in enumerate(order)]
        return windows

    def _fallback(self, field_name: str, key: str | None, detail: str) -> None:
        if self.strict:
            raise NoProposalError(
                f"{key or '<no key>'}: {detail}. Fix: build proposals for this image, or drop "
                "strict mode to fall back to a scene crop."
            )
        self.fallbacks.fallback(field_name, key, detail)


# --------------------------------------------------------------------------- factories

def _call_with(
    factory: Any, name: str, kwargs: Mapping[str, Any], extra: Sequence[str] = ()
) -> Any:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature
        return factory(**kwargs)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in kwargs if k not in sig.parameters]
    if unknown and not accepts_any:
        allowed = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
        allowed += [p for p in extra if p not in allowed]
        raise TypeError(
            f"'{name}' got unknown parameter(s) {unknown}; it accepts: {', '.join(allowed)}"
        )
    return factory(**kwargs)


def make_policy(spec: str | CropPolicy | Mapping[str, Any], **kwargs: Any) -> CropPolicy:
    """A crop policy from a registered name (plus keyword parameters), a mapping
    ``{"policy": name, **params}``, or an instance (returned as is).

    Example:
        >>> make_policy("object_dilated", dilation=0.2).dilation
        0.2
    """
    if isinstance(spec, CropPolicy):
        return spec
    if isinstance(spec, Mapping):
        spec = dict(spec)
        kwargs = {**spec, **kwargs}
        spec = kwargs.pop("policy")
    factory = load_policy(spec)
    policy = _call_with(factory, spec, kwargs)
    if not isinstance(policy, CropPolicy):
        raise TypeError(
            f"'{spec}' is a view recipe, not a single-view crop policy; use make_recipe('{spec}')"
            if isinstance(policy, ViewRecipe)
            else f"'{spec}' did not produce a CropPolicy (got {type(policy).__name__})"
        )
    return policy


def _recipe_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    choice = ProposalChoice(
        top_k=kwargs.pop("top_k", 10),
        min_area=kwargs.pop("min_area", 0.0),
        max_area=kwargs.pop("max_area", 1.0),
        weighting=kwargs.pop("weighting", "uniform"),
    )
    opts: dict[str, Any] = {"choice": choice}
    for k in ("strict", "shuffle_globals", "proposal_per_view"):
        if k in kwargs:
            opts[k] = bool(kwargs.pop(k))
    return opts


def _views_from_list(items: Sequence[Any], size: Any, local_size: Any) -> list[ViewSpec]:
    views = []
    for item in items:
        if isinstance(item, Mapping):
            item = dict(item)
            local = bool(item.pop("local", False))
            vsize = item.pop("size", local_size if local else size)
            policy = make_policy(item)
        else:
            local, vsize = False, size
            policy = make_policy(item)
        views.append(ViewSpec(policy, _out_size(vsize), local))
    return views


def make_recipe(spec: Any = "obj_obj_dilate", **kwargs: Any) -> ViewRecipe:
    """A view recipe from a registered name, a list of views, or a recipe (returned as is).

    Args:
        spec: a recipe name (``"obj_obj_dilate"``); a single-view policy name (two views of it,
            as lightly's MultiViewTransform does with one transform); or a list whose items are
            policy names, policies, or mappings ``{"policy": name, "size": 224, "local": False,
            **policy_params}``.
        **kwargs: the recipe's parameters (``size``, ``dilation``, ``top_k``, ``strict``, ...).

    Raises:
        TypeError: on a parameter the recipe does not take (the message lists those it does).
        objcrop_plugin.registry.RegistryError: on an unknown name.
    """
    if isinstance(spec, ViewRecipe):
        if kwargs:
            raise TypeError("parameters cannot be applied to an already built ViewRecipe")
        return spec
    if isinstance(spec, (list, tuple)):
        kw = dict(kwargs)
        size = kw.pop("size", 224)
        local_size = kw.pop("local_size", 96)
        opts = _recipe_options(kw)
        if kw:
            raise TypeError(f"unknown view-list parameter(s) {sorted(kw)}")
        return ViewRecipe(_views_from_list(spec, size, local_size), name="custom", **opts)
    factory = load_policy(spec)
    if isinstance(factory, type) and issubclass(factory, CropPolicy):
        kw = dict(kwargs)
        size = _out_size(kw.pop("size", 224))
        n_views = int(kw.pop("n_views", 2))
        opts = _recipe_options(kw)
        policy = _call_with(
            factory, spec, kw,
            extra=("size", "n_views", "top_k", "min_area", "max_area", "weighting", "strict",
                   "shuffle_globals", "proposal_per_view"),
        )
        return ViewRecipe([ViewSpec(policy, size) for _ in range(n_views)], name=spec, **opts)
    recipe = _call_with(factory, spec, kwargs)
    if not isinstance(recipe, ViewRecipe):
        raise TypeError(f"'{spec}' did not produce a ViewRecipe (got {type(recipe).__name__})")
    return recipe


def _two_views(name: str, first: CropPolicy, second: CropPolicy, size: Any, **opts: Any) -> ViewRecipe:
    s = _out_size(size)
    return ViewRecipe([ViewSpec(first, s), ViewSpec(second, s)], name=name, **opts)


_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def scene_scene(
    size: int | Sequence[int] = 224,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = _RATIO,
) -> ViewRecipe:
    """Two scene crops: the usual SSL views and the paper's baseline.

    Output: 2 windows, each a RandomResizedCrop of the whole image (MoCo-v2's scale 0.2-1).
    """
    return _two_views(
        "scene_scene", ScenePolicy(scale, ratio), ScenePolicy(scale, ratio), size,
        choice=ProposalChoice(),
    )


def obj_scene(
    size: int | Sequence[int] = 224,
    object_scale: Sequence[float] = (0.2, 1.0),
    scene_scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = _RATIO,
    min_size: float | None = None,
    min_size_grow: float | None = None,
    top_k: int = 10,
    min_area: float = 0.0,
    max_area: float = 1.0,
    weighting: Literal["uniform", "rank"] = "uniform",
    shuffle_globals: bool = True,
    strict: bool = False,
) -> ViewRecipe:
    """Obj-Scene: one view from a proposal, the other a scene crop (view order shuffled)."""
    return _two_views(
        "obj_scene",
        ObjectPolicy(object_scale, ratio, min_size, min_size_grow),
        ScenePolicy(scene_scale, ratio),
        size,
        choice=ProposalChoice(top_k, min_area, max_area, weighting),
        shuffle_globals=shuffle_globals,
        strict=strict,
    )


def obj_obj(
    size: int | Sequence[int] = 224,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = _RATIO,
    min_size: float | None = None,
    min_size_grow: float | None = None,
    top_k: int = 10,
    min_area: float = 0.0,
    max_area: float = 1.0,
    weighting: Literal["uniform", "rank"] = "uniform",
    strict: bool = False,
) -> ViewRecipe:
    """Obj-Obj: both views are RandomResizedCrops inside the same proposal."""
    pol = ObjectPolicy(scale, ratio, min_size, min_size_grow)
    return _two_views(
        "obj_obj", pol, pol, size, choice=ProposalChoice(top_k, min_area, max_area, weighting),
        strict=strict,
    )


def obj_obj_dilate(
    size: int | Sequence[int] = 224,
    object_scale: Sequence[float] | None = None,
    dilated_scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = _RATIO,
    dilation: float | None = None,
    dilation_mode: Literal["image", "coordinate"] | None = None,
    min_size: float | None = None,
    min_size_grow: float | None = None,
    top_k: int = 10,
    min_area: float = 0.0,
    max_area: float = 1.0,
    weighting: Literal["uniform", "rank"] = "uniform",
    shuffle_globals: bool = True,
    strict: bool = False,
    released_code: bool = False,
) -> ViewRecipe:
    """Obj-Obj+Dilate, the paper's best recipe.

    Input: image size, proposals (K, 4), scores (K,).

    Output: 2 windows from the same proposal, in shuffled order: a RandomResizedCrop inside the
    box (scale ``object_scale``, default 0.2-1) and one inside the box dilated by ``dilation``
    (default 0.1 of the image side per side, scale 0.2-1).

    ``released_code=True`` takes the authors' released code's settings: object scale
    ``(0, 1)``, coordinate-proportional dilation by 0.2, and box sides shorter than 224 px grown
    by 112 px at each end (then clipped to the image; the released code's own handling of boxes
    at the image border and its integer truncation are not copied). Any argument given
    explicitly still wins.

    Reference: Mishra et al., TMLR 2022, Sec. 3 ("Obj-Obj+Dilate").
    """
    if released_code:
        object_scale = (0.0, 1.0) if object_scale is None else object_scale
        dilation = 0.2 if dilation is None else dilation
        dilation_mode = dilation_mode or "coordinate"
        if min_size is None:
            min_size, min_size_grow = 224.0, 112.0 if min_size_grow is None else min_size_grow
    object_scale = (0.2, 1.0) if object_scale is None else object_scale
    dilation = 0.1 if dilation is None else dilation
    dilation_mode = dilation_mode or "image"
    return _two_views(
        "obj_obj_dilate",
        ObjectPolicy(object_scale, ratio, min_size, min_size_grow),
        ObjectDilatedPolicy(dilated_scale, ratio, dilation, dilation_mode, min_size, min_size_grow),
        size,
        choice=ProposalChoice(top_k, min_area, max_area, weighting),
        shuffle_globals=shuffle_globals,
        strict=strict,
    )


def multi_crop(
    n_global: int = 2,
    n_local: int = 6,
    global_size: int | Sequence[int] = 224,
    local_size: int | Sequence[int] = 96,
    global_policy: str | Mapping[str, Any] | CropPolicy = "scene",
    local_policy: str | Mapping[str, Any] | CropPolicy = "object",
    global_scale: Sequence[float] = (0.14, 1.0),
    local_scale: Sequence[float] = (0.05, 0.4),
    top_k: int = 10,
    min_area: float = 0.0,
    max_area: float = 1.0,
    weighting: Literal["uniform", "rank"] = "uniform",
    proposal_per_view: bool = False,
    strict: bool = False,
) -> ViewRecipe:
    """Object-aware multi-crop: ``n_global`` large views then ``n_local`` small ones.

    Each group's crops come from a policy given by name (or mapping with parameters), e.g. 2
    global scene crops + 6 local crops from proposals (the default), or 2 global object crops
    + 6 local object crops. A name's ``scale`` defaults to ``global_scale`` / ``local_scale``
    (DINO's 0.14-1 and 0.05-0.4).

    Output: ``n_global + n_local`` windows, globals first.
    """

    def build(spec: Any, scale: Sequence[float]) -> CropPolicy:
        if isinstance(spec, CropPolicy):
            return spec
        params = dict(spec) if isinstance(spec, Mapping) else {"policy": spec}
        params.setdefault("scale", tuple(scale))
        return make_policy(params)

    gpol, lpol = build(global_policy, global_scale), build(local_policy, local_scale)
    if n_global < 1 or n_local < 0:
        raise ValueError(f"multi_crop needs n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
    views = [ViewSpec(gpol, _out_size(global_size)) for _ in range(n_global)]
    views += [ViewSpec(lpol, _out_size(local_size), local=True) for _ in range(n_local)]
    return ViewRecipe(
        views,
        choice=ProposalChoice(top_k, min_area, max_area, weighting),
        proposal_per_view=proposal_per_view,
        strict=strict,
        name="multi_crop",
    )
