"""The object-aware part of a solo-learn recipe: its keys, how they are read and checked.

Needs neither solo-learn nor its checkout: :func:`parse_object_aware` reads the composed recipe
(an OmegaConf node or a plain mapping), before or after solo-learn's ``parse_cfg``.

Recipe keys (all optional; an entry without ``crop`` keeps solo-learn's RandomResizedCrop):

.. code-block:: yaml

    augmentations:
      - crop: object_aware          # = {policy: object}: RandomResizedCrop inside a proposal
        rrc: {enabled: True, crop_min_scale: 0.2, crop_max_scale: 1.0}   # the crop's scale
        color_jitter: ...            # the rest of the entry stays solo-learn's
        crop_size: 224
        num_crops: 1
      - crop:
          policy: object_dilated     # any registered single-view policy: scene, object, ...
          dilation: 0.1              # policy parameters (scale defaults to the entry's rrc)
          top_k: 10                  # proposal choice, shared by every entry of the recipe
        ...
    data:
      proposals: coco-train.objcrop  # keys: image paths relative to data.train_path
      proposals_root: null           # another folder the keys are relative to (optional)
      sampling: per_image            # or per_box: one sample per stored box (released code)
      max_boxes_per_image: null      # per_box: at most the m best boxes of each image
      max_failure_rate: 0.01         # fraction of unreadable images skipped before the run stops
    crop:                            # optional recipe-wide settings
      engine: cpu                    # cpu (DataLoader workers) or gpu (after transfer)
      top_k: 10
      min_area: 0.0
      max_area: 1.0
      weighting: uniform             # or rank: the box of rank r drawn in proportion to 1/r
      shuffle_views: true            # shuffle the object-aware large views (the paper does)
      proposal_per_view: false       # one proposal per sample (the paper) or per view
      strict: false                  # raise instead of falling back to a scene crop
      canvas: null                   # gpu: images shrunk to this square in the workers
      proposals: null                # online: boxes from the network being trained, refreshed
                                     # (or initial, or {method, warmup_epochs, every_epochs,
                                     # params}); data.proposals is then the warm-up's store
      proposals_dir: null            # online: where the stores go (default:
                                     # <checkpoint.dir>/<method>/objcrop-proposals/<name>-<hash>)

All object-aware views of one sample are cut from the *same* proposal (Obj-Obj+Dilate's two
views come from one box), drawn uniformly among the image's ``top_k`` best (or, with
``weighting: rank``, in proportion to one over the box's rank). With
``data.sampling: per_box`` a sample is one stored box instead (the paper's released code: an
epoch visits every box, ~12 per OpenImages image), and its object-aware views are cut from that
box; images without boxes are not sampled.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...policies import WEIGHTINGS, CropPolicy, ProposalChoice, ViewRecipe, ViewSpec, make_policy
from ...proposals.online import OnlineKeys, OnlineSettings, online_settings
from ...proposals.store import ProposalStore, StoreFormatError
from ...registry import RegistryError, load_policy
from .errors import SoloConfigError

__all__ = ["DEFAULT_MAX_FAILURE_RATE", "EntryCrop", "ObjectAwareConfig", "as_plain", "parse_object_aware", "select"]

log = logging.getLogger("objcrop_plugin")

_FOLDER_DATASETS = ("custom", "imagenet", "imagenet100")
#: recipe-wide settings: in the top-level ``crop`` node or in any entry's ``crop`` mapping
_RECIPE_KEYS = ("top_k", "min_area", "max_area", "weighting", "strict", "shuffle_views",
                "proposal_per_view")
_GLOBAL_KEYS = (*_RECIPE_KEYS, "engine", "canvas", "proposals", "proposals_dir")
#: how online proposals' messages name solo-learn's keys
ONLINE_KEYS = OnlineKeys(
    epochs="max_epochs", backbone="backbone.kwargs.model_name", accelerator="accelerator",
    afresh="start afresh (without resume_from_checkpoint or auto_resume) with "
           "++crop.proposals_dir=A_NEW_FOLDER", elsewhere="")
_ENGINES = ("cpu", "gpu")
_SAMPLINGS = ("per_image", "per_box")
_SOLO_CROP_NAMES = ("rrc", "random_resized_crop")
_SHORT_NAME = "object_aware"
#: the keys of a solo-learn augmentations entry (``solo.args.pretrain`` and its pipelines)
_SOLO_ENTRY_KEYS = ("rrc", "random_resized_crop", "color_jitter", "grayscale", "gaussian_blur",
                    "solarization", "equalization", "horizontal_flip", "crop_size", "num_crops")
#: ``data.max_failure_rate`` when the recipe has none (as ``objcrop train``)
DEFAULT_MAX_FAILURE_RATE = 0.01


@dataclass(frozen=True)
class EntryCrop:
    """How one entry of ``augmentations`` crops.

    Attributes:
        index: position of the entry in ``cfg.augmentations``.
        policy: the object-aware crop policy, or ``None`` for solo-learn's own
            RandomResizedCrop.
        crop_size: the entry's ``crop_size`` (square views).
        num_crops: the entry's ``num_crops``.
        local: a small (multi-crop) entry: its ``crop_size`` differs from the first entry's,
            which is exactly how solo-learn counts large and small crops.
    """

    index: int
    policy: CropPolicy | None
    crop_size: int
    num_crops: int
    local: bool

    @property
    def object_aware(self) -> bool:
        return self.policy is not None


@dataclass
class ObjectAwareConfig:
    """The object-aware part of a solo-learn recipe, as :func:`parse_object_aware` reads it.

    Attributes:
        entries: one :class:`EntryCrop` per ``augmentations`` entry, in order.
        dataset: ``data.dataset``.
        data_format: ``data.format``.
        train_path: ``data.train_path`` (absolute).
        proposals: ``data.proposals`` (absolute), or ``None``.
        proposals_root: the folder store keys are relative to (default ``train_path``).
        choice: how the sample's proposal is chosen (``top_k``, ``min_area``, ``max_area``).
        shuffle_views: shuffle the object-aware large views of a sample among their entries.
        proposal_per_view: draw a proposal per object view instead of one per sample.
        strict: raise on a sample without a usable proposal instead of a scene crop.
        engine: ``"cpu"`` (crops in DataLoader workers) or ``"gpu"`` (after transfer).
        canvas: with ``engine: gpu``, the side of the square canvas images are shrunk to in
            the workers (``None``: twice the largest ``crop_size``).
        sampling: ``data.sampling``: ``"per_image"`` (solo-learn's items) or ``"per_box"``
            (one item per stored box, its object-aware views cut from that box).
        max_boxes_per_image: ``data.max_boxes_per_image``: per-box sampling takes at most the
            ``m`` best boxes of each image (``None``: all).
        max_failure_rate: ``data.max_failure_rate``: the fraction of unreadable images that are
            skipped (each replaced by the next readable one) before the run stops.
        online: ``crop.proposals``: online proposals (``None``: the fixed ``proposals``).
        proposals_dir: ``crop.proposals_dir``: where the online stores are written (``None``:
            ``<checkpoint.dir>/<method>/objcrop-proposals/<name>-<crop setup hash>``, set by
            ``objcrop-solo``).
    """

    entries: list[EntryCrop]
    dataset: str
    data_format: str
    train_path: Path
    proposals: Path | None = None
    proposals_root: Path | None = None
    choice: ProposalChoice = field(default_factory=ProposalChoice)
    shuffle_views: bool = True
    proposal_per_view: bool = False
    strict: bool = False
    engine: str = "cpu"
    canvas: int | None = None
    sampling: str = "per_image"
    max_boxes_per_image: int | None = None
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE
    online: OnlineSettings | None = None
    proposals_dir: Path | None = None

    @property
    def enabled(self) -> bool:
        """Whether any entry crops object-aware (else solo-learn runs untouched)."""
        return any(e.object_aware for e in self.entries)

    @property
    def needs_proposals(self) -> bool:
        return any(e.policy.needs_proposal for e in self.entries if e.policy is not None)

    @property
    def key_root(self) -> Path:
        return self.proposals_root if self.proposals_root is not None else self.train_path

    def recipe(self) -> ViewRecipe:
        """The view recipe of the object-aware entries (one view per entry and crop).

        Large views come first, then small ones, each in entry order; ``shuffle_views``
        shuffles only the large ones (all of one size), so no view changes size.
        """
        views = [
            ViewSpec(e.policy, (e.crop_size, e.crop_size), e.local)
            for e in self.entries
            if e.policy is not None
            for _ in range(e.num_crops)
        ]
        return ViewRecipe(
            views,
            choice=self.choice,
            shuffle_globals=self.shuffle_views,
            proposal_per_view=self.proposal_per_view,
            strict=self.strict,
            name="solo_augmentations",
        )


def as_plain(node: Any) -> Any:
    """An OmegaConf node (or anything else) as plain Python containers."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - solo-learn needs omegaconf anyway
        return node
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def select(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise SoloConfigError(f"{where} must be true or false, got {value!r}")


def _entry_crop_spec(crop: Any, where: str) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """``(policy name or None, policy params, recipe-wide settings)`` of one entry's ``crop``."""
    if crop is None or crop is False:
        return None, {}, {}
    if isinstance(crop, str):
        name = crop.strip()
        if name.lower() in _SOLO_CROP_NAMES:
            return None, {}, {}
        return ("object" if name == _SHORT_NAME else name), {}, {}
    if not isinstance(crop, Mapping):
        raise SoloConfigError(
            f"{where}: expected 'object_aware', a policy name or a mapping "
            f"{{policy: NAME, ...parameters}}, got {crop!r}"
        )
    spec = dict(crop)
    label = spec.pop("name", _SHORT_NAME)
    if label != _SHORT_NAME:
        raise SoloConfigError(
            f"{where}.name: expected '{_SHORT_NAME}' (or leave it out), got {label!r}; the crop "
            "policy goes in 'policy' (scene, object, object_dilated, ...)"
        )
    if "engine" in spec:
        raise SoloConfigError(
            f"{where}.engine: the engine is recipe-wide. Fix: set crop.engine at the top level "
            "of the recipe (or ++crop.engine=gpu on the command line)"
        )
    name = spec.pop("policy", "object")
    if name == _SHORT_NAME:
        name = "object"
    recipe_wide = {k: spec.pop(k) for k in _RECIPE_KEYS if k in spec}
    if not isinstance(name, str):
        raise SoloConfigError(f"{where}.policy must be a policy name, got {name!r}")
    return name, spec, recipe_wide


def _make_entry_policy(name: str, params: dict[str, Any], entry: Mapping[str, Any], where: str) -> CropPolicy:
    params = dict(params)
    rrc = entry.get("rrc")
    if "scale" not in params and isinstance(rrc, Mapping) and rrc.get("enabled", True):
        lo, hi = rrc.get("crop_min_scale"), rrc.get("crop_max_scale")
        if lo is not None and hi is not None:
            params["scale"] = (float(lo), float(hi))
    for k in ("scale", "ratio"):
        if isinstance(params.get(k), list):
            params[k] = tuple(params[k])
    try:
        factory = load_policy(name)
    except RegistryError as exc:
        raise SoloConfigError(f"{where}.policy: {exc}") from None
    if not (isinstance(factory, type) and issubclass(factory, CropPolicy)):
        raise SoloConfigError(
            f"{where}.policy: '{name}' is a view recipe, not a single-view crop policy; in "
            "solo-learn each augmentations entry makes its own views. Fix: give each entry a "
            "policy (Obj-Obj+Dilate: policy object on one entry, object_dilated on the next; "
            "see recipes/solo/augmentations/object_aware.yaml)"
        )
    try:
        return make_policy({"policy": name, **params})
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SoloConfigError):
            raise
        raise SoloConfigError(f"{where}: {exc}") from None


def _merge_recipe_settings(found: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for where, settings in found:
        for k, v in settings.items():
            if k in merged and merged[k] != v:
                raise SoloConfigError(
                    f"{where}.{k}={v!r} disagrees with {origin[k]}.{k}={merged[k]!r}: the "
                    "proposal choice is shared by all entries of a sample. Fix: give it once, "
                    "under the top-level 'crop' node"
                )
            merged[k], origin[k] = v, where
    return merged


def parse_object_aware(cfg: Any, check_paths: bool = True) -> ObjectAwareConfig:
    """Read the object-aware settings of a solo-learn pretraining recipe.

    Needs neither solo-learn nor its checkout: ``cfg`` is the composed recipe (an OmegaConf
    node or a plain mapping), before or after solo-learn's ``parse_cfg``.

    Args:
        cfg: the recipe: ``augmentations`` (list of entries), ``data`` (``dataset``,
            ``train_path``, ``format``, ``proposals``, ``proposals_root``) and the optional
            top-level ``crop`` node.
        check_paths: check that ``data.proposals`` exists and is a proposal store.

    Returns:
        an :class:`ObjectAwareConfig`; ``config.enabled`` is False for a recipe without
        object-aware entries (solo-learn then runs untouched).

    Raises:
        SoloConfigError: an unknown policy or parameter, conflicting proposal-choice settings,
            object-aware entries with ``data.format: dali`` or ``h5`` or a dataset that is not
            a folder of images, no ``data.proposals`` for policies that need one, or a
            ``data.proposals`` path that does not exist or is not a store.

    Example:
        >>> cfg = {"data": {"dataset": "custom", "train_path": "imgs"},
        ...        "augmentations": [{"crop": {"policy": "scene"}, "crop_size": 224, "num_crops": 2}]}
        >>> plan = parse_object_aware(cfg)
        >>> plan.enabled, [e.policy.name for e in plan.entries]
        (True, ['scene'])
    """
    cfg = as_plain(cfg)
    if not isinstance(cfg, Mapping):
        raise SoloConfigError(f"expected a recipe mapping, got {type(cfg).__name__}")
    augmentations = cfg.get("augmentations")
    if not isinstance(augmentations, Sequence) or isinstance(augmentations, str) or not augmentations:
        raise SoloConfigError(
            "augmentations: a solo-learn pretraining recipe needs a non-empty list of "
            "augmentation entries (e.g. '- augmentations: object_aware.yaml' in its defaults)"
        )
    top = cfg.get("crop")
    if top is None:
        top = {}
    if not isinstance(top, Mapping):
        raise SoloConfigError(
            f"crop: the top-level 'crop' node takes recipe-wide settings "
            f"({', '.join(_GLOBAL_KEYS)}); got {top!r}. Per-view crops go in the augmentations "
            "entries"
        )
    unknown = sorted(set(top) - set(_GLOBAL_KEYS))
    if unknown:
        raise SoloConfigError(
            f"crop: unknown key(s) {unknown}; the top-level crop node takes "
            f"{', '.join(_GLOBAL_KEYS)}"
        )

    first_size = None
    entries: list[EntryCrop] = []
    found: list[tuple[str, dict[str, Any]]] = [("crop", {k: top[k] for k in _RECIPE_KEYS if k in top})]
    for i, entry in enumerate(augmentations):
        where = f"augmentations[{i}]"
        if not isinstance(entry, Mapping):
            raise SoloConfigError(f"{where}: expected a mapping (solo-learn's entry), got {entry!r}")
        try:
            crop_size, num_crops = int(entry["crop_size"]), int(entry.get("num_crops", 1))
        except (KeyError, TypeError, ValueError):
            raise SoloConfigError(
                f"{where}: needs an integer crop_size (and num_crops), got "
                f"crop_size={entry.get('crop_size')!r} num_crops={entry.get('num_crops')!r}"
            ) from None
        if first_size is None:
            first_size = crop_size
        name, params, settings = _entry_crop_spec(entry.get("crop"), f"{where}.crop")
        policy = None
        if name is not None:
            policy = _make_entry_policy(name, params, entry, f"{where}.crop")
            found.append((f"{where}.crop", settings))
        entries.append(EntryCrop(i, policy, crop_size, num_crops, crop_size != first_size))

    for where in _crop_like_keys(augmentations):
        log.warning("objcrop: %s is not a key of a solo-learn augmentations entry; did you mean "
                    "'crop'? The entry keeps solo-learn's own crop", where)

    data = cfg.get("data") if isinstance(cfg.get("data"), Mapping) else {}
    dataset = str(data.get("dataset", ""))
    data_format = str(data.get("format") or "image_folder")
    train_path = data.get("train_path")
    train = Path(os.path.abspath(os.fspath(train_path))) if train_path else Path.cwd()
    proposals = data.get("proposals")
    proposals_root = data.get("proposals_root")
    settings = _merge_recipe_settings(found)
    engine = str(top.get("engine", "cpu")).lower()
    if engine not in _ENGINES:
        raise SoloConfigError(f"crop.engine: expected one of {', '.join(_ENGINES)}, got {engine!r}")
    choice = _choice(settings, found)
    plan = ObjectAwareConfig(
        entries=entries,
        dataset=dataset,
        data_format=data_format,
        train_path=train,
        proposals=Path(os.path.abspath(os.fspath(proposals))) if proposals else None,
        proposals_root=Path(os.path.abspath(os.fspath(proposals_root))) if proposals_root else None,
        choice=choice,
        shuffle_views=_bool(settings.get("shuffle_views", True), "crop.shuffle_views"),
        proposal_per_view=_bool(settings.get("proposal_per_view", False), "crop.proposal_per_view"),
        strict=_bool(settings.get("strict", False), "crop.strict"),
        engine=engine,
        canvas=_canvas(top.get("canvas"), entries),
        max_failure_rate=_failure_rate(data),
        **_sampling(data),
    )
    plan.online = _online(top, cfg, plan, settings)
    if plan.sampling == "per_box" and choice.weighting != "uniform":
        raise SoloConfigError(
            "crop.weighting chooses among an image's boxes, but with data.sampling: per_box "
            "each sample is one box already. Fix: data.sampling=per_image, or drop crop.weighting"
        )
    if not plan.enabled:
        if plan.online is not None:
            raise SoloConfigError(
                "crop.proposals: online proposals feed object-aware crops, but no "
                "augmentations entry has 'crop: object_aware'. Fix: add object-aware entries "
                "(augmentations=object_aware.yaml), or drop crop.proposals"
            )
        if plan.sampling == "per_box":
            raise SoloConfigError(
                "data.sampling: per_box cuts each sample's object-aware views from its box, but "
                "no augmentations entry has 'crop: object_aware'. Fix: add object-aware entries "
                "(augmentations=object_aware.yaml), or data.sampling=per_image"
            )
        if plan.proposals is not None:
            typo = _crop_like_keys(augmentations)
            hint = (f" ({typo[0]}: did you mean 'crop'?)" if typo else "")
            log.warning(
                "objcrop: data.proposals is set but no augmentations entry has 'crop: "
                "object_aware'%s: solo-learn's own crops are used", hint
            )
        return plan
    _check_runnable(plan, check_paths)
    return plan


def _online(top: Mapping[str, Any], cfg: Mapping[str, Any], plan: ObjectAwareConfig,
            settings: Mapping[str, Any]) -> OnlineSettings | None:
    """``crop.proposals`` and ``crop.proposals_dir``, checked."""
    folder = top.get("proposals_dir")
    if top.get("proposals") is None:
        if folder is not None:
            raise SoloConfigError("crop.proposals_dir: is where online proposals go, but "
                                  "crop.proposals is not set. Fix: drop it, or "
                                  "++crop.proposals=online")
        return None
    epochs = cfg.get("max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise SoloConfigError(f"max_epochs: online proposals (crop.proposals) refresh on an "
                              f"epoch schedule and need max_epochs >= 1, got {epochs!r}")
    online = online_settings(top["proposals"], epochs, plan.proposals is not None,
                             settings.get("top_k"), SoloConfigError, ONLINE_KEYS)
    backbone = cfg.get("backbone") if isinstance(cfg.get("backbone"), Mapping) else {}
    name = backbone.get("name")
    if name is not None and name != "timm":
        raise SoloConfigError(
            f"backbone.name: online proposals (crop.proposals) read the feature levels of a "
            f"timm backbone, and {name!r} is solo-learn's own. Fix: backbone.name=timm "
            f"++backbone.kwargs.model_name={name} (the same network from timm)"
        )
    if plan.sampling == "per_box":
        raise SoloConfigError(
            "data.sampling: per_box makes one sample per box of a fixed store, but online "
            "proposals (crop.proposals) change the store during training. Fix: "
            "data.sampling=per_image, or drop crop.proposals"
        )
    if folder is not None:
        plan.proposals_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    return online


def _crop_like_keys(augmentations: Sequence[Any]) -> list[str]:
    """``augmentations[i].KEY`` for each entry key that looks like a misspelt ``crop``."""
    found = []
    for i, entry in enumerate(augmentations):
        if not isinstance(entry, Mapping):
            continue
        for key in entry:
            k = str(key)
            if k == "crop" or k in _SOLO_ENTRY_KEYS:
                continue
            if k.lower() == "crop" or difflib.get_close_matches(k.lower(), ["crop"], cutoff=0.75):
                found.append(f"augmentations[{i}].{k}")
    return found


def _number(value: Any) -> Any:
    """``value`` as an int or float where it is one (a numeric string too), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _integer(value: Any, where: str, minimum: int, what: str) -> int:
    """``value`` as an integer ``>= minimum`` (an integral float or a digit string is one)."""
    number = _number(value)
    if not isinstance(number, int) or number < minimum:
        raise SoloConfigError(f"{where}: expected {what}, got {value!r}")
    return number


def _area(value: Any, where: str) -> float:
    """``value`` as a fraction of the image area (a number >= 0)."""
    number = _number(value)
    if number is None or number < 0:
        raise SoloConfigError(
            f"{where}: expected a fraction of the image area (a number from 0 to 1), got {value!r}"
        )
    return float(number)


def _choice(settings: Mapping[str, Any], found: list[tuple[str, dict[str, Any]]]) -> ProposalChoice:
    """The proposal choice, each setting checked under the key it was given as."""

    def where(key: str) -> str:
        origin = next((w for w, s in reversed(found) if key in s), "crop")
        return f"{origin}.{key}"

    top_k = _integer(settings.get("top_k", 10), where("top_k"), 1, "an integer >= 1")
    min_area = _area(settings.get("min_area", 0.0), where("min_area"))
    max_area = _area(settings.get("max_area", 1.0), where("max_area"))
    if min_area > max_area:
        raise SoloConfigError(
            f"{where('min_area')}={min_area!r} is above {where('max_area')}={max_area!r}: no "
            "proposal could be drawn. Fix: min_area <= max_area (fractions of the image area)"
        )
    weighting = settings.get("weighting", "uniform")
    if weighting not in WEIGHTINGS:
        raise SoloConfigError(
            f"{where('weighting')}={weighting!r}: expected one of {', '.join(WEIGHTINGS)} "
            "(uniform: every one of the top_k boxes equally likely, as the paper; rank: the box "
            "of rank r in proportion to 1/r)"
        )
    try:
        return ProposalChoice(top_k=top_k, min_area=min_area, max_area=max_area,
                              weighting=weighting)
    except (TypeError, ValueError) as exc:  # pragma: no cover - checked above
        raise SoloConfigError(f"crop (proposal choice): {exc}") from None


def _canvas(value: Any, entries: Sequence[EntryCrop]) -> int | None:
    """``crop.canvas``: ``None`` or an integer side no smaller than the largest view."""
    if value is None:
        return None
    largest = max(e.crop_size for e in entries)
    side = _integer(value, "crop.canvas", 1, "an integer side in pixels (or null: twice the "
                    f"largest crop_size, {2 * largest})")
    if side < largest:
        raise SoloConfigError(
            f"crop.canvas: {side} px is smaller than the largest crop_size ({largest}), so every "
            f"view would be upsampled. Fix: crop.canvas >= {largest}, or null (twice the "
            "largest crop_size)"
        )
    return side


def _failure_rate(data: Mapping[str, Any]) -> float:
    """``data.max_failure_rate``, checked (default 1%)."""
    rate = data.get("max_failure_rate")
    if rate is None:
        return DEFAULT_MAX_FAILURE_RATE
    number = _number(rate)
    if number is None or not 0 <= number <= 1:
        raise SoloConfigError(
            "data.max_failure_rate: expected the fraction of unreadable images skipped before "
            f"the run stops, from 0 to 1 (e.g. 0.05), got {rate!r}"
        )
    return float(number)


def _sampling(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data.sampling`` and ``data.max_boxes_per_image``, checked."""
    sampling = str(data.get("sampling") or "per_image")
    if sampling not in _SAMPLINGS:
        raise SoloConfigError(
            f"data.sampling: expected one of {', '.join(_SAMPLINGS)}, got {sampling!r}"
        )
    m = data.get("max_boxes_per_image")
    if m is not None:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise SoloConfigError(
                f"data.max_boxes_per_image: expected an integer >= 1 (or null: all), got {m!r}"
            )
        if sampling != "per_box":
            raise SoloConfigError(
                "data.max_boxes_per_image applies to data.sampling: per_box only. Fix: "
                "data.sampling=per_box, or data.max_boxes_per_image=null (per-image sampling "
                "draws among crop.top_k boxes)"
            )
    return {"sampling": sampling, "max_boxes_per_image": m}


def _check_runnable(plan: ObjectAwareConfig, check_paths: bool) -> None:
    first = next(e for e in plan.entries if e.object_aware)
    where = f"augmentations[{first.index}].crop"
    if plan.data_format == "dali":
        raise SoloConfigError(
            f"data.format: dali cannot crop from object proposals ({where} is object-aware): "
            "DALI decodes and crops on the GPU without the image keys. Fix: data.format="
            "image_folder (crops in DataLoader workers), and ++crop.engine=gpu to crop on the GPU"
        )
    if plan.data_format != "image_folder":
        raise SoloConfigError(
            f"data.format: {plan.data_format} is not supported with object-aware crops ({where}): "
            "proposal keys are image paths. Fix: data.format=image_folder"
        )
    if plan.dataset not in _FOLDER_DATASETS:
        raise SoloConfigError(
            f"data.dataset: {plan.dataset or '<unset>'} is not a folder of images, so its images "
            f"have no proposal keys ({where} is object-aware). Fix: use dataset custom, imagenet "
            "or imagenet100 with a proposal store built over data.train_path"
        )
    if plan.proposals is None and plan.online is not None:
        return  # the warm-up takes scene crops; the refreshes write the stores
    if plan.proposals is None:
        if plan.sampling == "per_box":
            raise SoloConfigError(
                "data.proposals: data.sampling per_box makes one sample per stored box but the "
                "recipe names no proposal store. Fix: objcrop proposals build DATA.TRAIN_PATH "
                "--out STORE, then ++data.proposals=STORE"
            )
        if plan.needs_proposals:
            raise SoloConfigError(
                f"data.proposals: {where} crops from object proposals but the recipe names no "
                "proposal store. Fix: objcrop proposals build DATA.TRAIN_PATH --out STORE, then "
                "data.proposals=STORE (++data.proposals=STORE if the recipe lacks the key)"
            )
        return
    if not check_paths:
        return
    if plan.proposals.is_dir():
        raise SoloConfigError(
            f"data.proposals: {plan.proposals} is a folder, not a proposal store file (did you "
            "pass the image folder, data.train_path?). Fix: data.proposals=STORE.objcrop, the "
            f"file `objcrop proposals build {plan.train_path} --out STORE.objcrop` writes"
        )
    if not plan.proposals.exists():
        raise SoloConfigError(
            f"data.proposals: {plan.proposals} does not exist. Fix: build it with `objcrop "
            f"proposals build {plan.train_path} --out {plan.proposals}`, or correct the path "
            "(relative paths are relative to the current directory)"
        )
    try:
        ProposalStore(plan.proposals, verify=False).close()
    except StoreFormatError as exc:
        raise SoloConfigError(f"data.proposals: {exc}") from None
    if plan.proposals_root is not None and not plan.proposals_root.is_dir():
        raise SoloConfigError(f"data.proposals_root: {plan.proposals_root} is not a folder")
