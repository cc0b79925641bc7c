"""solo-learn adapter: object-aware crops in solo-learn's own YAML recipes and ``main_pretrain.py``.

A solo-learn user keeps their checkout, recipes and habits. They add ``crop: object_aware`` to
entries of a recipe's ``augmentations`` list and ``data.proposals: PATH`` to its ``data``
node, and run ``objcrop-solo`` with solo-learn's own arguments::

    objcrop-solo --config-path recipes/solo --config-name mocov2plus.yaml \\
        data.train_path=datasets/coco/train2017 data.proposals=coco-train.objcrop

``objcrop-solo`` runs the ``main_pretrain.py`` of the user's checkout unchanged (found from
``--solo-root``, ``$SOLO_ROOT``, or the editable install of ``solo``), after patching these
module attributes in memory (nothing is edited or copied; :func:`uninstall` undoes them):

- ``solo.args.pretrain.parse_cfg``: reads the object-aware settings and refuses recipes it
  cannot run (DALI, h5, CIFAR/STL, a missing proposal store) with a message naming the key and
  the fix; smooths solo-learn's CPU quirks (``devices`` must be a string for the CPU
  accelerator, ``strategy: None`` is refused by Lightning 2).
- ``solo.data.pretrain_dataloader.prepare_datasets``: takes the dataset solo-learn built and
  the per-entry pipelines ``build_transform_pipeline`` made, and returns a module-level
  (picklable under ``spawn``) dataset that hands each image *and its key* to
  :class:`ObjectAwareTransform`. Items keep solo-learn's format ``(index, [views], target)``.
- ``solo.methods.base.BaseMethod._BACKBONES["timm"]``: ``backbone.name: timm`` with
  ``backbone.kwargs.model_name: <any timm model>``.
- with ``crop.engine: gpu`` only, ``solo.methods.METHODS[method]``: a subclass of the method
  whose ``on_after_batch_transfer`` cuts and augments the views on the device
  (:func:`gpu_method`); the dataset then yields canvases (:class:`ObjectAwareCanvasDataset`).

``build_transform_pipeline`` needs no wrapper: ``prepare_datasets`` receives its per-entry
pipelines, and the object-aware transform keeps each one minus its first step (solo-learn's
RandomResizedCrop), so colour jitter, blur, solarisation, flip and normalisation stay solo-learn's.

Importing ``solo`` re-registers timm's ``convnext_*`` and ``poolformer_*`` names with
solo-learn's versions; :func:`import_solo` puts timm's own back.

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
    crop:                            # optional recipe-wide settings
      engine: cpu                    # cpu (DataLoader workers) or gpu (after transfer)
      top_k: 10
      min_area: 0.0
      max_area: 1.0
      shuffle_views: true            # shuffle the object-aware large views (the paper does)
      proposal_per_view: false       # one proposal per sample (the paper) or per view
      strict: false                  # raise instead of falling back to a scene crop
      canvas: null                   # gpu: images shrunk to this square in the workers

All object-aware views of one sample are cut from the *same* proposal (Obj-Obj+Dilate's two
views come from one box), drawn uniformly among the image's ``top_k`` best.

Reference:
    Mishra et al., "Object-aware Cropping for Self-Supervised Learning", TMLR 2022,
    https://arxiv.org/abs/2112.00319
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
import runpy
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .._random import process_rng, sample_rng
from ..engine.decode import load_rgb, open_image
from ..policies import (
    CropPolicy,
    CropWindow,
    ProposalChoice,
    ScenePolicy,
    ViewRecipe,
    ViewSpec,
    make_policy,
)
from ..proposals.store import ProposalStore, StoreFormatError, normalize_key
from ..registry import RegistryError, load_policy

__all__ = [
    "INSTALL_HINT",
    "EntryCrop",
    "IndexedDataset",
    "ObjectAwareConfig",
    "ObjectAwareSoloDataset",
    "ObjectAwareTransform",
    "SoloConfigError",
    "SoloNotFoundError",
    "find_solo_root",
    "GPUViews",
    "ObjectAwareCanvasDataset",
    "SlotPlanner",
    "fix_solo_quirks",
    "gpu_method",
    "gpu_views",
    "gpu_engine_available",
    "import_solo",
    "install",
    "main",
    "parse_object_aware",
    "restore_timm_registry",
    "split_args",
    "timm_backbone",
    "uninstall",
]

log = logging.getLogger("objcrop_plugin")

INSTALL_HINT = (
    "solo-learn is not installed: check out github.com/vturrisi/solo-learn and pip install "
    "--no-deps --build-constraint <file with setuptools<82> <checkout> (see README)"
)

_INSTALL_STEPS = (
    "Fix: git clone https://github.com/vturrisi/solo-learn && "
    "printf 'setuptools<82\\n' > solo-build-constraints.txt && "
    "pip install --no-deps --build-constraint solo-build-constraints.txt -e solo-learn "
    "(older pip: PIP_CONSTRAINT=solo-build-constraints.txt pip install --no-deps -e solo-learn), "
    'then pip install "objcrop-plugin[solo]"; or pass --solo-root DIR / set SOLO_ROOT to a '
    "checkout."
)

#: solo-learn datasets whose training images are files in a folder (keys = relative paths)
_FOLDER_DATASETS = ("custom", "imagenet", "imagenet100")
#: recipe-wide settings: in the top-level ``crop`` node or in any entry's ``crop`` mapping
_RECIPE_KEYS = ("top_k", "min_area", "max_area", "strict", "shuffle_views", "proposal_per_view")
_GLOBAL_KEYS = (*_RECIPE_KEYS, "engine", "canvas")
_ENGINES = ("cpu", "gpu")
_SOLO_CROP_NAMES = ("rrc", "random_resized_crop")
_SHORT_NAME = "object_aware"


class SoloConfigError(ValueError):
    """A recipe the adapter cannot run; the message names the key and the fix."""


class SoloNotFoundError(ImportError):
    """No solo-learn checkout could be found; the message says how to install one."""


# --------------------------------------------------------------------------- recipe parsing

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


def _plain(node: Any) -> Any:
    """An OmegaConf node (or anything else) as plain Python containers."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - solo-learn needs omegaconf anyway
        return node
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _select(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
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
    cfg = _plain(cfg)
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
    try:
        choice = ProposalChoice(
            top_k=settings.get("top_k", 10),
            min_area=settings.get("min_area", 0.0),
            max_area=settings.get("max_area", 1.0),
        )
    except (TypeError, ValueError) as exc:
        raise SoloConfigError(f"crop (proposal choice): {exc}") from None
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
        canvas=None if top.get("canvas") is None else int(top["canvas"]),
    )
    if not plan.enabled:
        if plan.proposals is not None:
            log.warning(
                "objcrop: data.proposals is set but no augmentations entry has 'crop: "
                "object_aware': solo-learn's own crops are used"
            )
        return plan
    _check_runnable(plan, check_paths)
    return plan


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
    if plan.proposals is None:
        if plan.needs_proposals:
            raise SoloConfigError(
                f"data.proposals: {where} crops from object proposals but the recipe names no "
                "proposal store. Fix: objcrop proposals build DATA.TRAIN_PATH --out STORE, then "
                "data.proposals=STORE (++data.proposals=STORE if the recipe lacks the key)"
            )
        return
    if not check_paths:
        return
    if not plan.proposals.is_file():
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


# --------------------------------------------------------------------------- the transform

def _split_crop(pipeline: Any, where: str) -> tuple[Callable, Callable]:
    """solo-learn's entry pipeline as ``(its crop, everything after it)``."""
    steps = getattr(pipeline, "transforms", None)
    if not steps or not isinstance(steps[0], (T.RandomResizedCrop, T.Resize)):
        raise SoloConfigError(
            f"{where}: expected solo-learn's pipeline to start with RandomResizedCrop or Resize, "
            f"got {pipeline!r}. This solo-learn version builds its augmentations differently; "
            "please report it with the solo-learn commit"
        )
    return steps[0], T.Compose(list(steps[1:]))


class SlotPlanner:
    """Where each of solo-learn's views of a sample is cut from, in solo-learn's view order.

    solo-learn's views are its ``augmentations`` entries in order, ``num_crops`` each (its
    "slots"). The object-aware slots are the views of one :class:`ViewRecipe` (so they share
    the sample's proposal, fall back and count fallbacks together, and its large ones may be
    shuffled); the other slots are left to solo-learn's own RandomResizedCrop (``None``).

    Args:
        config: the parsed recipe.
        store: the proposal store (default: ``config.proposals``, opened by path; pickles by
            path, so DataLoader workers map the file instead of copying it).
    """

    def __init__(self, config: ObjectAwareConfig, store: ProposalStore | None = None) -> None:
        self.config = config
        self.recipe = config.recipe()
        if store is None and config.proposals is not None:
            store = ProposalStore(config.proposals, verify=False)
        self.store = store
        # slot -> (entry, position in the recipe's windows or None); the recipe orders its
        # views large first then small, each in entry order
        n_large = sum(e.num_crops for e in config.entries if e.object_aware and not e.local)
        large = small = 0
        self.slots: list[tuple[int, int | None]] = []
        for k, entry in enumerate(config.entries):
            for _ in range(entry.num_crops):
                if not entry.object_aware:
                    self.slots.append((k, None))
                elif entry.local:
                    self.slots.append((k, n_large + small))
                    small += 1
                else:
                    self.slots.append((k, large))
                    large += 1

    def windows(
        self,
        image_size: tuple[int, int],
        key: str | None,
        rng: np.random.Generator,
    ) -> list[CropWindow | None]:
        """One window per slot (``None`` for solo-learn's own crops), for an image of
        ``image_size`` (width, height) whose proposals are stored under ``key``."""
        boxes = scores = None
        if self.store is not None and key is not None:
            props = self.store.lookup(key, image_size)
            if props is not None:
                boxes, scores = props.boxes, props.scores
        planned = self.recipe(image_size, boxes, scores, rng=rng, key=key)
        return [None if pos is None else planned[pos] for _, pos in self.slots]


class ObjectAwareTransform:
    """solo-learn's ``FullTransformPipeline`` with object-aware crops.

    Input to this transform:
        one PIL image (upright RGB), its key (path relative to the proposal root) and its
        dataset index.

    Output of this transform:
        a list of ``sum(num_crops)`` float tensors ``(3, crop_size, crop_size)``, in solo-learn's
        order: entry by entry, ``num_crops`` views each, exactly as ``FullTransformPipeline``
        returns them, so solo-learn's large/small crop counting holds.

    Applies the following:
        - once per sample: the proposal, drawn among the image's ``top_k`` best usable boxes
          (shared by every object-aware view, unless ``proposal_per_view``)
        - per object-aware entry and crop: the entry's policy draws a window (inside the box,
          the dilated box, or the scene), resampled once to ``crop_size`` (bicubic, as
          solo-learn's RandomResizedCrop); the object-aware large views are shuffled among
          their entries when ``shuffle_views``
        - per entry without ``crop``: solo-learn's own RandomResizedCrop
        - then the rest of the entry's solo-learn pipeline: colour jitter, grayscale, blur,
          solarisation, equalisation, flip, normalisation

    Images without a usable proposal get a scene crop instead, counted in
    ``transform.recipe.fallbacks`` across DataLoader workers.

    Args:
        config: the parsed recipe (:func:`parse_object_aware`).
        pipelines: solo-learn's per-entry pipelines (``build_transform_pipeline``'s output,
            one per ``augmentations`` entry).
        store: the proposal store (default: ``config.proposals``).
    """

    def __init__(
        self,
        config: ObjectAwareConfig,
        pipelines: Sequence[Callable],
        store: ProposalStore | None = None,
    ) -> None:
        if len(pipelines) != len(config.entries):
            raise SoloConfigError(
                f"augmentations: {len(config.entries)} entries but solo-learn built "
                f"{len(pipelines)} pipelines"
            )
        self.config = config
        self.planner = SlotPlanner(config, store)
        self.full: list[Callable] = list(pipelines)
        self.rest: list[Callable | None] = []
        for entry, pipeline in zip(config.entries, pipelines):
            if entry.object_aware:
                self.rest.append(_split_crop(pipeline, f"augmentations[{entry.index}]")[1])
            else:
                self.rest.append(None)

    @property
    def recipe(self) -> ViewRecipe:
        """The object-aware views' recipe; ``recipe.fallbacks`` counts across workers."""
        return self.planner.recipe

    @property
    def store(self) -> ProposalStore | None:
        return self.planner.store

    def __call__(
        self, image: Image.Image, key: str | None = None, index: int | None = None
    ) -> list[torch.Tensor]:
        rng = process_rng() if index is None else sample_rng(None, index)
        windows = self.planner.windows(image.size, key, rng)
        out = []
        for (k, _), w in zip(self.planner.slots, windows):
            if w is None:
                out.append(self.full[k](image))
                continue
            view = image.resize((w.size[1], w.size[0]), Image.Resampling.BICUBIC, box=w.box)
            out.append(self.rest[k](view))
        return out

    def __repr__(self) -> str:
        lines = []
        for entry, full, rest in zip(self.config.entries, self.full, self.rest):
            if entry.object_aware:
                lines.append(f"{entry.num_crops} x [{entry.policy!r} -> {entry.crop_size} px, {rest}]")
            else:
                lines.append(f"{entry.num_crops} x [{full}]")
        return "\n".join(lines)


# --------------------------------------------------------------------------- datasets

class IndexedDataset(torch.utils.data.Dataset):
    """solo-learn's ``dataset_with_index`` as a module-level class: items ``(index, *item)``.

    solo-learn makes its dataset classes inside a factory function, so DataLoader workers
    started with ``spawn`` (macOS, Windows, or ``multiprocessing_context="spawn"``) cannot
    pickle them; this wrapper can. Attributes (``samples``, ``classes``, ...) are the wrapped
    dataset's.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return (index, *self.dataset[index])

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ObjectAwareSoloDataset(IndexedDataset):
    """solo-learn's training dataset with object-aware views: items ``(index, [views], target)``.

    Input to this dataset:
        the dataset solo-learn's ``prepare_datasets`` built (an ImageFolder for ``custom`` with
        labels, ``imagenet`` and ``imagenet100``; solo-learn's ``CustomDatasetWithoutLabels``
        for ``no_labels``), with its listing, ``data.fraction`` subset and targets.

    Output of this dataset:
        ``(index, views, target)`` exactly as solo-learn's: ``views`` a list of float tensors
        ``(3, crop_size, crop_size)`` (see :class:`ObjectAwareTransform`), ``target`` the
        class index (``-1`` without labels).

    Each image is decoded upright (EXIF orientation applied), since proposal boxes refer to
    the displayed image, and passed with its key (path relative to ``key_root``).

    Args:
        dataset: solo-learn's dataset (unwrapped from its index factory).
        transform: the object-aware transform.
        key_root: the folder store keys are relative to (``data.train_path`` by default).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        transform: ObjectAwareTransform,
        key_root: str | os.PathLike[str],
    ) -> None:
        super().__init__(dataset)
        self.transform = transform
        self.key_root = os.path.abspath(os.fspath(key_root))

    def item(self, index: int) -> tuple[str, int]:
        """``(path, target)`` of item ``index``, from solo-learn's listing."""
        ds = self.dataset
        samples = getattr(ds, "samples", None)
        if samples is not None:
            path, target = samples[index]
            target_transform = getattr(ds, "target_transform", None)
            if target_transform is not None:
                target = target_transform(target)
            return os.fspath(path), target
        images = getattr(ds, "images", None)
        if images is not None:
            return os.path.join(os.fspath(ds.root), images[index]), -1
        raise TypeError(
            f"{type(ds).__name__}: expected solo-learn's ImageFolder (samples) or "
            "CustomDatasetWithoutLabels (images) listing"
        )

    def key(self, index: int) -> str:
        return normalize_key(self.item(index)[0], self.key_root)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], int]:
        path, target = self.item(index)
        image = load_rgb(open_image(path))
        views = self.transform(image, key=normalize_key(path, self.key_root), index=index)
        return index, views, target


def _unwrap_solo_dataset(dataset: Any) -> Any:
    """solo-learn's ``DatasetWithIndex`` instance turned back into its (picklable) base class."""
    cls = type(dataset)
    if cls.__name__ == "DatasetWithIndex" and len(cls.__bases__) == 1:
        dataset.__class__ = cls.__bases__[0]
        return dataset
    return None


def check_keys(dataset: ObjectAwareSoloDataset, store: ProposalStore, strict: bool, n: int = 2000) -> float:
    """The fraction of (up to ``n`` evenly spaced) dataset images the store has proposals for.

    Raises:
        SoloConfigError: none of them has proposals (the store was built over another folder),
            or some have none in strict mode.
    """
    total = len(dataset)
    if total == 0:
        return 1.0
    step = max(1, total // n)
    probe = list(range(0, total, step))[:n]
    keys = [dataset.key(i) for i in probe]
    missing = [k for k in keys if k not in store]
    if not missing:
        return 1.0
    found = 1.0 - len(missing) / len(keys)
    example_store = next(iter(store.keys()), "<empty store>")
    if found == 0.0:
        raise SoloConfigError(
            f"data.proposals: none of the {len(keys)} images checked has proposals in "
            f"{store.path}: the dataset's key '{missing[0]}' (path relative to "
            f"{dataset.key_root}) is not in the store, whose keys look like '{example_store}'. "
            "Fix: point data.train_path at the folder the store was built over, set "
            "data.proposals_root to the folder its keys are relative to, or rebuild the store "
            "with `objcrop proposals build DATA.TRAIN_PATH --out STORE`"
        )
    if strict:
        raise SoloConfigError(
            f"data.proposals: {len(missing)} of {len(keys)} images checked have no proposals in "
            f"{store.path} (e.g. '{missing[0]}') and crop.strict is true. Fix: build proposals "
            "for every image, or set crop.strict=false to fall back to scene crops"
        )
    log.warning(
        "objcrop: %.1f%% of the images checked have no proposals in %s (e.g. '%s'); they get "
        "scene crops",
        100 * (1 - found), store.path, missing[0],
    )
    return found


# --------------------------------------------------------------------------- timm backbones

def timm_backbone(
    method: str,
    model_name: str | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """solo-learn backbone factory for any timm model: ``backbone.name: timm``.

    Recipe:

    .. code-block:: yaml

        backbone:
          name: timm
          kwargs:
            model_name: resnet50        # any name in timm.list_models()
            checkpoint: null            # a local weights file (timm's pretrained loading)
            drop_path_rate: 0.1         # anything else goes to timm.create_model

    Returns ``timm.create_model(model_name, num_classes=0, **kwargs)``: pooled features of
    ``model.num_features`` (solo-learn's ``features_dim``). Weights are random unless
    ``checkpoint`` names a local file; nothing is downloaded. ViTs take small multi-crop views
    with ``dynamic_img_size: true``.
    """
    import timm

    del method  # solo-learn passes the method name to its own backbones; timm needs none
    if not model_name:
        raise SoloConfigError(
            "backbone.kwargs.model_name: backbone.name timm needs a timm model name. Fix: "
            "backbone.kwargs.model_name=resnet50 (any name in timm.list_models())"
        )
    _check_timm_name(str(model_name))
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
    kwargs.pop("num_classes", None)
    if checkpoint:
        path = Path(os.fspath(checkpoint))
        if not path.is_file():
            raise SoloConfigError(f"backbone.kwargs.checkpoint: {path} does not exist")
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay["file"] = str(path)
        return timm.create_model(
            str(model_name), pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
        )
    if pretrained:
        raise SoloConfigError(
            "backbone.kwargs.pretrained: weights are only loaded from a local file. Fix: "
            "backbone.kwargs.checkpoint=PATH (a timm or torchvision state dict), or drop "
            "pretrained"
        )
    return timm.create_model(str(model_name), pretrained=False, num_classes=0, **kwargs)


def _check_timm_name(name: str) -> None:
    import timm

    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise SoloConfigError(
        f"backbone.kwargs.model_name: '{name}' is not a timm model.{hint} See "
        "timm.list_models()"
    )


# --------------------------------------------------------------------------- solo-learn

def restore_timm_registry() -> list[str]:
    """Give timm back the model names solo-learn's import registered over timm's own.

    solo-learn's ``convnext`` and ``poolformer`` modules decorate their factories with timm's
    ``register_model``, which replaces timm's ``convnext_tiny`` and friends (and drops their
    pretrained configs) in the whole process. Re-registering timm's own factories restores
    them; solo-learn's backbones call their factories directly and keep working.

    Returns:
        the names restored.
    """
    from timm.models import _registry as registry

    restored = []
    for name, fn in list(registry._model_entrypoints.items()):
        if not getattr(fn, "__module__", "").startswith("solo."):
            continue
        original = None
        for modname, module in list(sys.modules.items()):
            if not modname.startswith("timm.models.") or module is None:
                continue
            candidate = getattr(module, name, None)
            if callable(candidate) and getattr(candidate, "__module__", None) == modname:
                original = candidate
                break
        if original is None:
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*in registry.*")
            registry.register_model(original)
        restored.append(name)
    return restored


def import_solo(root: str | os.PathLike[str] | None = None) -> Any:
    """Import solo-learn (from ``root`` first when given) with timm's registry left intact.

    Raises:
        SoloNotFoundError: solo-learn cannot be imported; the message says how to install it.
    """
    if root is not None and "solo" not in sys.modules:
        root = os.path.abspath(os.fspath(root))
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        import timm.models  # noqa: F401  (timm's own names registered before solo's)

        with warnings.catch_warnings():
            # solo-learn's import of timm's deprecated paths and its registry overrides (undone
            # below) are not the user's to fix
            warnings.filterwarnings("ignore", message="Overwriting .* in registry")
            warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
            solo = importlib.import_module("solo")
            importlib.import_module("solo.args.pretrain")
            importlib.import_module("solo.data.pretrain_dataloader")
            importlib.import_module("solo.methods")
    except ImportError as exc:
        if getattr(exc, "name", None) == "solo" or "solo" not in sys.modules:
            raise SoloNotFoundError(f"{INSTALL_HINT}. {_INSTALL_STEPS}") from exc
        raise SoloNotFoundError(
            f"solo-learn is installed but cannot be imported ({type(exc).__name__}: {exc}). "
            'Fix: pip install "objcrop-plugin[solo]" (lightning, hydra-core, omegaconf<2.4, '
            "timm, einops, scipy, scikit-learn, torchmetrics)"
        ) from exc
    restore_timm_registry()
    return solo


def find_solo_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The solo-learn checkout whose ``main_pretrain.py`` to run.

    Looked up in order: ``explicit`` (``--solo-root``), ``$SOLO_ROOT``, then the folder above
    the ``solo`` package when it is an editable install of a checkout.

    Raises:
        SoloNotFoundError: none found; the message says how to install solo-learn.
    """
    for origin, value in (("--solo-root", explicit), ("SOLO_ROOT", os.environ.get("SOLO_ROOT"))):
        if value:
            root = Path(os.path.abspath(os.path.expanduser(os.fspath(value))))
            if not (root / "main_pretrain.py").is_file():
                raise SoloNotFoundError(
                    f"{origin}={value}: {root} is not a solo-learn checkout (no main_pretrain.py "
                    f"there). {_INSTALL_STEPS}"
                )
            return root
    try:
        spec = importlib.util.find_spec("solo")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise SoloNotFoundError(f"{INSTALL_HINT}. {_INSTALL_STEPS}")
    package = Path(spec.origin).resolve().parent
    root = package.parent
    if not (root / "main_pretrain.py").is_file():
        raise SoloNotFoundError(
            f"solo-learn is installed at {package}, but not as an editable install of a "
            "checkout: its main_pretrain.py is not beside it. Fix: pass --solo-root DIR or set "
            "SOLO_ROOT to a checkout, or reinstall it with pip install --no-deps -e <checkout> "
            "(with the setuptools<82 build constraint, see README)"
        )
    return root


@dataclass
class _State:
    """What the wrapped solo-learn functions share within one run."""

    config: ObjectAwareConfig | None = None
    planner: SlotPlanner | None = None
    gpu: GPUViews | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)
    cli: bool = False  # report recipe errors as one line and exit 2, not a hydra traceback


_STATE = _State()


def _reported(fn: Callable) -> Callable:
    """In ``objcrop-solo``, a recipe error ends the run with its message, not a traceback."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SoloConfigError as exc:
            if not _STATE.cli:
                raise
            print(f"objcrop-solo: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return call


def fix_solo_quirks(cfg: Any) -> None:
    """Make a recipe that works on solo-learn's intended setup also work on this one.

    - ``devices``: solo-learn computes ``len(cfg.devices)``, so an integer fails; Lightning's
      CPU accelerator refuses a list. On CPU an int or list becomes a string (``"1"``); on a
      GPU an int ``n`` becomes the list of the first ``n`` devices.
    - ``strategy``: solo-learn defaults it to ``None``, which Lightning 2 refuses; ``auto``.
    """
    accelerator = str(cfg.get("accelerator") or "auto").lower()
    devices = _plain(cfg.get("devices"))
    if accelerator == "cpu":
        if devices is None or isinstance(devices, int):
            cfg["devices"] = str(devices or 1)
        elif isinstance(devices, (list, tuple)):
            cfg["devices"] = str(max(1, len(devices)))
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        cfg["devices"] = list(range(devices))
    if "strategy" in cfg and cfg.get("strategy") is None:
        cfg["strategy"] = "auto"


def _check_backbone(cfg: Any, backbones: Mapping[str, Any]) -> None:
    name = _select(_plain(cfg), "backbone.name")
    if name is None or name in backbones:
        if name == "timm":
            kwargs = _select(_plain(cfg), "backbone.kwargs", {}) or {}
            if not kwargs.get("model_name"):
                raise SoloConfigError(
                    "backbone.kwargs.model_name: backbone.name timm needs a timm model name. "
                    "Fix: backbone.kwargs.model_name=resnet50 (any name in timm.list_models())"
                )
            _check_timm_name(str(kwargs["model_name"]))
            checkpoint = kwargs.get("checkpoint")
            if checkpoint and not Path(os.fspath(checkpoint)).is_file():
                raise SoloConfigError(f"backbone.kwargs.checkpoint: {checkpoint} does not exist")
        return
    raise SoloConfigError(
        f"backbone.name: '{name}' is not a solo-learn backbone ({', '.join(sorted(backbones))}). "
        "Fix: one of those, or backbone.name=timm with backbone.kwargs.model_name=<timm model>"
    )


def _wrap_parse_cfg(original: Callable, backbones: Mapping[str, Any]) -> Callable:
    def parse_cfg(cfg: Any) -> Any:
        fix_solo_quirks(cfg)
        plan = parse_object_aware(cfg)
        _check_backbone(cfg, backbones)
        views = gpu_views(cfg, plan) if plan.enabled and plan.engine == "gpu" else None
        cfg = original(cfg)
        if cfg.get("strategy") is None:
            cfg.strategy = "auto"
        _STATE.config, _STATE.gpu = plan, views
        if views is not None:
            _install_gpu_method(cfg, views)
        return cfg

    parse_cfg.__doc__ = f"objcrop-plugin: {original.__name__} with object-aware recipe checks."
    wrapped = _reported(parse_cfg)
    wrapped.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapped


def _wrap_prepare_datasets(original: Callable) -> Callable:
    import inspect

    signature = inspect.signature(original)

    def prepare_datasets(*args: Any, **kwargs: Any) -> Any:
        dataset = original(*args, **kwargs)
        plan = _STATE.config
        base = _unwrap_solo_dataset(dataset)
        if base is None:
            if plan is not None and plan.enabled:
                raise SoloConfigError(
                    f"data: solo-learn built a {type(dataset).__name__} dataset, which the "
                    "object-aware crops do not know; this solo-learn version is not supported"
                )
            return dataset
        if plan is None or not plan.enabled:
            return IndexedDataset(base)
        bound = signature.bind(*args, **kwargs)
        transform = bound.arguments.get("transform")
        pipelines = [getattr(p, "transform", None) for p in getattr(transform, "transforms", [])]
        entries_crops = [getattr(p, "num_crops", None) for p in getattr(transform, "transforms", [])]
        if not pipelines or entries_crops != [e.num_crops for e in plan.entries]:
            raise SoloConfigError(
                "augmentations: solo-learn's transform does not have one NCropAugmentation per "
                f"entry (got {transform!r}); this solo-learn version is not supported"
            )
        if _STATE.gpu is not None:
            out = ObjectAwareCanvasDataset(base, _STATE.gpu, plan.key_root)
            planner = _STATE.gpu.planner
        else:
            out = ObjectAwareSoloDataset(base, ObjectAwareTransform(plan, pipelines), plan.key_root)
            planner = out.transform.planner
        if planner.store is not None and plan.needs_proposals:
            check_keys(out, planner.store, plan.strict)
        _STATE.planner = planner
        return out

    prepare_datasets.__doc__ = f"objcrop-plugin: {original.__name__} with object-aware views."
    wrapped = _reported(prepare_datasets)
    wrapped.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapped


def gpu_engine_available() -> bool:
    """Whether this objcrop-plugin has the GPU view engine (``objcrop_plugin.engine.gpu``)."""
    try:
        gpu = importlib.import_module("objcrop_plugin.engine.gpu")
    except ImportError:
        return False
    return all(
        hasattr(gpu, name)
        for name in ("CanvasDataset", "collate_canvas", "GPUViewEngine", "apply_gpu_views")
    )


def _entry_photometric(entry: Mapping[str, Any], dataset: str, where: str) -> Any:
    """The :class:`~objcrop_plugin.engine.photometric.Photometric` equal to the rest of a
    solo-learn entry's pipeline (after its crop): the same probabilities, ranges and order."""
    from ..engine.photometric import IMAGENET_MEAN, IMAGENET_STD, Photometric

    def node(name: str) -> Mapping[str, Any]:
        value = entry.get(name)
        return value if isinstance(value, Mapping) else {}

    def prob(name: str) -> float:
        return float(node(name).get("prob") or 0.0)

    if prob("equalization") > 0:
        raise SoloConfigError(
            f"{where}.equalization: crop.engine gpu has no histogram equalisation. Fix: "
            "equalization.prob=0, or crop.engine=cpu"
        )
    if dataset in ("imagenet", "imagenet100"):  # solo-learn's build_transform_pipeline rule
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = entry.get("mean", IMAGENET_MEAN), entry.get("std", IMAGENET_STD)
    jitter = node("color_jitter")
    return Photometric(
        hflip=prob("horizontal_flip"),
        jitter=prob("color_jitter"),
        brightness=float(jitter.get("brightness") or 0.0),
        contrast=float(jitter.get("contrast") or 0.0),
        saturation=float(jitter.get("saturation") or 0.0),
        hue=float(jitter.get("hue") or 0.0),
        grayscale=prob("grayscale"),
        blur=prob("gaussian_blur"),  # solo-learn's GaussianBlur: sigma uniform in (0.1, 2)
        solarize=prob("solarization"),  # solo-learn solarises after the blur, threshold 128
        solarize_before_blur=False,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(v) for v in std),
    )


@dataclass
class GPUViews:
    """``crop.engine: gpu``: what the workers plan and what the device renders.

    The workers (:class:`ObjectAwareCanvasDataset`) decode each image, shrink it onto a
    ``canvas``, and plan one window per solo-learn view: the object-aware ones with the
    :class:`SlotPlanner`, solo-learn's own RandomResizedCrops with a scene policy of the entry's
    ``rrc`` scale (torchvision's RandomResizedCrop distribution). After the transfer, the method's
    ``on_after_batch_transfer`` (see :func:`gpu_method`) has ``engine`` cut, resize and augment
    every view on the device, with each entry's photometrics.

    Attributes:
        planner: the object-aware slots' planner.
        scenes: entry index -> scene policy, for the entries without ``crop``.
        canvas: ``(height, width)`` of the canvases.
        engine: the :class:`~objcrop_plugin.engine.gpu.GPUViewEngine`, one view per slot.
    """

    planner: SlotPlanner
    scenes: dict[int, ScenePolicy]
    canvas: tuple[int, int]
    engine: Any


def gpu_views(cfg: Any, config: ObjectAwareConfig) -> GPUViews:
    """The GPU mode of a recipe (``crop.engine: gpu``).

    Raises:
        SoloConfigError: no GPU engine in this objcrop-plugin, small entries before large ones,
            small entries with different photometrics, an entry without ``crop`` whose ``rrc``
            is disabled, or equalisation (which the GPU engine lacks).
    """
    if not gpu_engine_available():
        raise SoloConfigError(
            "crop.engine: gpu needs objcrop_plugin.engine.gpu, which this objcrop-plugin lacks. "
            "Fix: crop.engine=cpu (the default), or update objcrop-plugin"
        )
    from ..engine.gpu import GPUViewEngine
    from ..engine.photometric import PhotometricSet

    entries = _plain(cfg)["augmentations"]
    globals_, locals_, views = [], [], []
    scenes: dict[int, ScenePolicy] = {}
    seen_small = False
    for entry, raw in zip(config.entries, entries):
        where = f"augmentations[{entry.index}]"
        if entry.local:
            seen_small = True
        elif seen_small:
            raise SoloConfigError(
                f"{where}: crop.engine gpu needs the large entries before the small ones (as "
                "solo-learn's own crop counting does). Fix: reorder the augmentations list"
            )
        photometric = _entry_photometric(raw, config.dataset, where)
        if not entry.object_aware:
            rrc = raw.get("rrc") if isinstance(raw.get("rrc"), Mapping) else {}
            if not rrc.get("enabled", False):
                raise SoloConfigError(
                    f"{where}.rrc.enabled: crop.engine gpu crops every view on the device and "
                    "needs a RandomResizedCrop for entries without 'crop'. Fix: rrc.enabled=True, "
                    "or crop.engine=cpu"
                )
            scale = (float(rrc.get("crop_min_scale", 0.08)), float(rrc.get("crop_max_scale", 1.0)))
            scenes[entry.index] = ScenePolicy(scale=scale)
        size = (entry.crop_size, entry.crop_size)
        for _ in range(entry.num_crops):
            views.append(ViewSpec(ScenePolicy(), size, entry.local))
            (locals_ if entry.local else globals_).append(photometric)
    if len(set(locals_)) > 1:
        raise SoloConfigError(
            "augmentations: crop.engine gpu gives every small view the same photometrics, but "
            "the small entries differ. Fix: the same color_jitter/grayscale/blur/solarization/"
            "flip on every small entry, or crop.engine=cpu"
        )
    photometrics = PhotometricSet(
        "solo-learn", tuple(globals_), locals_[0] if locals_ else globals_[0]
    )
    side = config.canvas or 2 * max(e.crop_size for e in config.entries)
    try:
        engine = GPUViewEngine(ViewRecipe(views, name="solo_views"), photometrics=photometrics)
    except ImportError as exc:  # kornia, for the blur and hue kernels
        raise SoloConfigError(f"crop.engine: gpu: {exc}") from None
    return GPUViews(SlotPlanner(config), scenes, (side, side), engine)


def _draft_reduce(opened: Any, canvas: tuple[int, int]) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) whose image still covers its canvas fit."""
    if not opened.is_jpeg:
        return 1
    w, h = opened.size
    s = min(1.0, canvas[1] / w, canvas[0] / h)
    r = 1
    while r < 8 and w // (2 * r) >= w * s and h // (2 * r) >= h * s:
        r *= 2
    return r


class ObjectAwareCanvasDataset(ObjectAwareSoloDataset):
    """solo-learn's training dataset for ``crop.engine: gpu``: canvases and crop windows.

    Input to this dataset: as :class:`ObjectAwareSoloDataset`.

    Output of this dataset: one dict per item, the GPU engine's canvas item
    (:data:`objcrop_plugin.engine.gpu.CANVAS_KEYS`) plus the dataset ``index`` that
    solo-learn's methods need: ``canvas`` ``uint8 (3, H, W)``, ``windows`` ``float32 (V, 4)``
    (one per solo-learn view, in solo-learn's order, canvas pixels), ``valid``, ``seed``,
    ``target``, ``key``, ``index``. The default collate function stacks them; the method's
    ``on_after_batch_transfer`` turns the batch into solo-learn's ``[index, views, target]``.
    """

    def __init__(
        self, dataset: torch.utils.data.Dataset, gpu: GPUViews, key_root: str | os.PathLike[str]
    ) -> None:
        IndexedDataset.__init__(self, dataset)
        self.planner = gpu.planner
        self.scenes = gpu.scenes
        self.canvas = gpu.canvas
        self.key_root = os.path.abspath(os.fspath(key_root))

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        from ..engine.gpu import canvas_item

        path, target = self.item(index)
        key = normalize_key(path, self.key_root)
        rng = sample_rng(None, index)
        opened = open_image(path)
        try:
            planned = self.planner.windows(opened.size, key, rng)
            boxes = [
                w.box if w is not None else self.scenes[k].sample(opened.size, None, rng)
                for (k, _), w in zip(self.planner.slots, planned)
            ]
            image = load_rgb(opened, _draft_reduce(opened, self.canvas))
        except BaseException:
            opened.image.close()
            raise
        item = canvas_item(image, opened.size, boxes, self.canvas, rng, target, key)
        item["index"] = index
        return item


def gpu_method(base: type, engine: Any) -> type:
    """A subclass of the solo-learn method class ``base`` that cuts its views on the device.

    Only ``on_after_batch_transfer`` is overridden: a canvas batch (see
    :class:`ObjectAwareCanvasDataset`) becomes solo-learn's ``[index, views, targets]`` via
    ``engine`` (:class:`~objcrop_plugin.engine.gpu.GPUViewEngine`); every other batch
    (validation) passes through. The method's own code (losses, training step) is untouched.
    """
    from ..engine.gpu import is_canvas_batch

    class ObjectAwareGPUMethod(base):  # type: ignore[misc, valid-type]
        objcrop_engine = engine

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            batch = super().on_after_batch_transfer(batch, dataloader_idx)
            if not is_canvas_batch(batch):
                return batch
            views, targets, _keys = self.objcrop_engine.transform_batch(batch)
            return [batch["index"], views, targets]

    ObjectAwareGPUMethod.__name__ = ObjectAwareGPUMethod.__qualname__ = f"ObjectAwareGPU{base.__name__}"
    return ObjectAwareGPUMethod


def _install_gpu_method(cfg: Any, views: GPUViews) -> None:
    """Swap ``solo.methods.METHODS[cfg.method]`` for its GPU-view subclass (undone by
    :func:`uninstall`)."""
    from solo.methods import METHODS

    name = cfg.get("method")
    if name not in METHODS:
        return  # main_pretrain.py reports an unknown method itself
    original = METHODS[name]
    METHODS[name] = gpu_method(original, views.engine)

    def undo() -> None:
        METHODS[name] = original

    _STATE.undo.append(undo)


def install(root: str | os.PathLike[str] | None = None) -> Callable[[], None]:
    """Wrap solo-learn's ``parse_cfg`` and ``prepare_datasets`` and register the timm backbone.

    Patches the module attributes that ``main_pretrain.py`` imports by name, so call it before
    the script runs. Idempotent.

    Returns:
        a function that undoes the patches.
    """
    import_solo(root)
    import solo.args.pretrain as args_pretrain
    import solo.data.pretrain_dataloader as dataloader
    from solo.methods.base import BaseMethod

    if _STATE.undo:
        return uninstall
    backbones = BaseMethod._BACKBONES
    original_parse, original_prepare = args_pretrain.parse_cfg, dataloader.prepare_datasets
    args_pretrain.parse_cfg = _wrap_parse_cfg(original_parse, backbones)
    dataloader.prepare_datasets = _wrap_prepare_datasets(original_prepare)
    had_timm = "timm" in backbones
    previous = backbones.get("timm")
    backbones["timm"] = timm_backbone

    def undo() -> None:
        args_pretrain.parse_cfg = original_parse
        dataloader.prepare_datasets = original_prepare
        if had_timm:
            backbones["timm"] = previous
        else:
            backbones.pop("timm", None)

    _STATE.undo.append(undo)
    return uninstall


def uninstall() -> None:
    """Undo :func:`install`."""
    while _STATE.undo:
        _STATE.undo.pop()()
    _STATE.config = None
    _STATE.planner = None
    _STATE.gpu = None


# --------------------------------------------------------------------------- command line

USAGE = """\
usage: objcrop-solo [--solo-root DIR] --config-path DIR --config-name NAME.yaml [key=value ...]

Runs solo-learn's own main_pretrain.py (from --solo-root, $SOLO_ROOT, or the editable install
of solo) with object-aware crops: entries of the recipe's augmentations list may carry
'crop: object_aware' (or a mapping {policy: object_dilated, dilation: 0.1, ...}), and
data.proposals names the proposal store (keys relative to data.train_path). Every other
argument is solo-learn's (hydra's): --config-path, --config-name, key=value, ++key=value.
Relative --config-path values are relative to the current directory.
"""

_CONFIG_PATH = ("--config-path", "-cp")
_CONFIG_NAME = ("--config-name", "-cn")


def split_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(solo_root, hydra arguments)`` with ``--config-path`` made absolute.

    hydra resolves a relative ``--config-path`` against the directory of
    ``main_pretrain.py``; a user expects the current directory.

    Raises:
        SoloConfigError: no ``--config-path``/``--config-name``, a config folder that does not
            exist, or a recipe that is not in it.
    """
    solo_root = None
    out: list[str] = []
    config_dir = config_name = None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        takes = flag in ("--solo-root", *_CONFIG_PATH, *_CONFIG_NAME) and arg.startswith("-")
        if takes and not eq:
            if i + 1 >= len(args):
                raise SoloConfigError(f"{flag} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if not takes:
            out.append(arg)
        elif flag == "--solo-root":
            solo_root = value
        elif flag in _CONFIG_PATH:
            config_dir = os.path.abspath(os.path.expanduser(value))
            out += ["--config-path", config_dir]
        else:
            config_name = value
            out += ["--config-name", value]
    if config_dir is None or config_name is None:
        raise SoloConfigError(
            "objcrop-solo takes solo-learn's own arguments: --config-path DIR --config-name "
            "NAME.yaml [key=value ...] (both are needed)"
        )
    if not os.path.isdir(config_dir):
        raise SoloConfigError(f"--config-path: {config_dir} is not a folder")
    candidates = [config_name] if config_name.endswith((".yaml", ".yml")) else [
        config_name, f"{config_name}.yaml"]
    if not any(os.path.isfile(os.path.join(config_dir, c)) for c in candidates):
        raise SoloConfigError(f"--config-name: no recipe {config_name} in {config_dir}")
    return solo_root, out


def _report_fallbacks() -> None:
    planner = _STATE.planner
    if planner is None:
        return
    counts = planner.recipe.fallbacks.as_dict()
    fallbacks = counts["missing"] + counts["unusable"]
    if counts["samples"]:
        print(
            f"objcrop: {counts['samples']} samples cropped from proposals, {fallbacks} fell back "
            f"to scene crops (no entry: {counts['missing']}, no usable box: "
            f"{counts['unusable']})",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``objcrop-solo``: run solo-learn's ``main_pretrain.py`` with object-aware crops."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        solo_root, hydra_args = split_args(argv)
        root = find_solo_root(solo_root)
        install(root)
    except (SoloConfigError, SoloNotFoundError) as exc:
        print(f"objcrop-solo: error: {exc}", file=sys.stderr)
        return 2
    script = root / "main_pretrain.py"
    saved_argv = sys.argv
    sys.argv = [str(script), *hydra_args]
    _STATE.cli = True
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv
        _STATE.cli = False
        _report_fallbacks()
        uninstall()
    return 0


if __name__ == "__main__":
    # run the importable module's main, so the dataset classes pickle under their real name
    from objcrop_plugin.integrations.solo import main as _main

    sys.exit(_main())
