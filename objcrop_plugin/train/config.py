"""Recipe files for ``objcrop train``: schema, validation, dotted overrides, saving.

A recipe is a YAML mapping with the sections below; every key has a default except
``data.train_path``. Unknown keys and values of the wrong type are errors that name the key,
the file, what was expected and (for misspellings) the closest known key.

The example below is a MoCo-v2 recipe (ResNet-50, 200 epochs), with the main keys: its values
are that recipe's, not the defaults. The dataclasses of this module hold every key and its
default, and ``objcrop train RECIPE --print-config`` prints a recipe with all of them.

.. code-block:: yaml

    data:
      train_path: data/train          # folder of images (any depth); keys are relative paths
      proposals: data/train.objcrop   # proposal store (`objcrop proposals build`)
      labels: null                    # labels for evaluation after training (demo labels
                                      # file or COCO instances JSON); null: no evaluation
      num_workers: 4
      persistent_workers: false       # keep workers between epochs
      sampling: per_image             # or per_box: one sample per stored box (released code)
      max_boxes_per_image: null       # per_box / epoch_length boxes: the m best boxes per image
      epoch_length: images            # or boxes (a per_box run's steps: matched compute), or N
    crop:
      type: object_aware              # or "scene"; `crop: object_aware` alone is shorthand
      views: obj_obj_dilate           # view recipe (registered name)
      size: 224                       # view size (global views)
      params: {dilation: 0.1, top_k: 10}  # the view recipe's parameters
      photometrics: null              # preset; null: the method's own (lightly's defaults)
      jitter: exact                   # or fast: one fused colour matrix per view (CPU engine)
      proposals: null                 # or online / initial: boxes from the model being trained
      engine: cpu                     # or gpu (crops on the device after transfer)
    method:
      name: mocov2                    # simclr | mocov2 | byol | vicreg
      params: {temperature: 0.2, memory_bank_size: 65536}
    backbone:
      name: resnet50                  # any timm model (pretrained=False)
      checkpoint: null                # local weights to start from
      kwargs: {}                      # extra timm.create_model arguments
    optimizer: {name: sgd, lr: 0.03, weight_decay: 1.0e-4, momentum: 0.9}
    schedule: {warmup_epochs: 0, scheduler: cosine}
    trainer:
      epochs: 200
      batch_size: 256                 # per device
      devices: auto
      num_nodes: 1
      strategy: auto                  # "ddp" when several devices
      precision: 32-true              # "16-mixed", "bf16-mixed" on GPUs
      out_dir: runs/mocov2_obj_obj_dilate
      seed: 0

Example:
    >>> from objcrop_plugin.train.config import load_recipe
    >>> cfg = load_recipe("recipes/lightly/demo_simclr.yaml", ["trainer.epochs=2"])  # doctest: +SKIP
    >>> cfg.trainer.epochs  # doctest: +SKIP
    2
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "METHODS",
    "METHOD_DEFAULTS",
    "BackboneConfig",
    "CropConfig",
    "DataConfig",
    "EvalConfig",
    "MethodConfig",
    "OptimizerConfig",
    "RecipeConfig",
    "RecipeError",
    "ScheduleConfig",
    "TrainerConfig",
    "apply_overrides",
    "load_recipe",
    "parse_recipe",
    "save_recipe",
    "to_dict",
]

#: The SSL methods of ``objcrop train`` and the defaults of their ``method.params``: the one
#: place where method names are defined. :mod:`objcrop_plugin.train.methods` implements them
#: (``SimCLR.defaults is METHOD_DEFAULTS["simclr"]`` ...); being plain data here, recipes are
#: validated without importing lightly.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "simclr": {"temperature": 0.5, "proj_hidden_dim": None, "proj_dim": 128},
    "mocov2": {
        "temperature": 0.2,
        "memory_bank_size": 65536,
        "proj_hidden_dim": 2048,
        "proj_dim": 128,
        "momentum": 0.999,
        "momentum_end": None,
        "symmetric": False,
    },
    "byol": {
        "proj_hidden_dim": 4096,
        "proj_dim": 256,
        "pred_hidden_dim": 4096,
        "momentum": 0.99,
        "momentum_end": 1.0,
    },
    "vicreg": {
        "proj_hidden_dim": 2048,
        "proj_dim": 2048,
        "proj_layers": 2,
        "lambda_param": 25.0,
        "mu_param": 25.0,
        "nu_param": 1.0,
    },
}
#: the method names; each is also the name of its photometric preset (lightly's defaults for
#: that method), used when ``crop.photometrics`` is null
METHODS: tuple[str, ...] = tuple(METHOD_DEFAULTS)
MethodName = Literal[METHODS]  # type: ignore[valid-type]


class RecipeError(ValueError):
    """A recipe file or override that does not fit the schema (the message says how to fix it)."""


@dataclass
class DataConfig:
    """Where the images, proposals and (optional) evaluation labels are."""

    train_path: str = ""
    proposals: str | None = None
    labels: str | None = None
    num_workers: int = 4
    # keep the DataLoader workers between epochs (resume stays exact either way)
    persistent_workers: bool = False
    limit: int | None = None  # use the first N images (sorted keys); handy for smoke runs
    # unreadable images are skipped (replaced by the next readable one, listed in
    # out_dir/bad_images.tsv); the run stops when more than this fraction of the images is bad
    max_failure_rate: float = 0.01
    # relative paths resolve against the recipe file's folder when True, else the current one
    paths_relative_to_recipe: bool = False
    # what a sample is: an image (its object views share a proposal drawn among its best), or
    # one stored box of data.proposals, its object views cut from that box: the paper's
    # released code, whose epochs visit every box (~12 per OpenImages image, so ~12x the steps)
    sampling: Literal["per_image", "per_box"] = "per_image"
    # per_box (and epoch_length: boxes): take at most the m best boxes of each image
    max_boxes_per_image: int | None = None
    # samples per epoch: images (one per image, or per box with per_box), boxes (the number
    # of boxes in data.proposals, capped by max_boxes_per_image: a scene run with the steps
    # of a per_box run, matched compute) or a number; images are cycled in a per-epoch order
    epoch_length: Literal["images", "boxes"] | int = "images"


@dataclass
class CropConfig:
    """How views are cut: from object proposals (``object_aware``) or the scene.

    ``object_aware`` means, here as in solo-learn recipes, "views cut from the sample's
    proposal"; this section covers all of the recipe's views (``views``, default
    ``obj_obj_dilate``), whereas a solo-learn augmentation entry's ``crop: object_aware`` covers
    that entry's views only (the policy ``object``). See docs/solo-learn.md.
    """

    type: Literal["object_aware", "scene"] = "object_aware"
    views: str | list[Any] | None = None  # default: obj_obj_dilate / scene_scene
    size: int | list[int] = 224
    params: dict[str, Any] = field(default_factory=dict)
    photometrics: str | None = None
    # colour-jitter kernel of the CPU engine: torchvision's PIL kernels, or one fused colour
    # matrix per view (objcrop_plugin.engine.photometric); the GPU engine has its own kernels
    jitter: Literal["exact", "fast"] = "exact"
    engine: Literal["cpu", "gpu"] = "cpu"
    canvas: int | list[int] | None = None  # gpu engine: decoded canvas size (default 2 x size)
    draft: bool = True
    seed: int | None = None  # crops from (seed, epoch, index, rank); null: trainer.seed
    # online proposals: "online", "initial" (boxes from the initial weights, kept), or
    # {method, warmup_epochs, every_epochs, params}; boxes from the backbone being trained
    # (see objcrop_plugin.train.online)
    proposals: str | dict[str, Any] | None = None


@dataclass
class MethodConfig:
    """The SSL method and its parameters (see :mod:`objcrop_plugin.train.methods`)."""

    name: MethodName = "simclr"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackboneConfig:
    """A timm model, created with ``pretrained=False, num_classes=0``."""

    name: str = "resnet50"
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.03
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scale_lr_with_batch: bool = False  # lr * total_batch / 256 (the linear scaling rule)


@dataclass
class ScheduleConfig:
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_fraction: float = 0.0  # of all steps; the larger of the two warm-ups is used
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 100
    max_steps: int = -1
    batch_size: int = 256
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | int = "32-true"
    out_dir: str = "runs/objcrop"
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 0  # also every n steps (0: at the end of every epoch only)
    resume: Literal["auto", "never"] = "auto"
    limit_train_batches: int | float | None = None
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1


@dataclass
class EvalConfig:
    """Linear probe + kNN after training (needs ``data.labels``)."""

    enabled: bool = True
    image_size: int | list[int] = 224
    train_fraction: float = 0.7
    batch_size: int = 64
    probe: dict[str, Any] = field(default_factory=dict)
    knn: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str | None = None  # a label for logs and the results file

    @property
    def views(self) -> Any:
        if self.crop.views is not None:
            return self.crop.views
        return "obj_obj_dilate" if self.crop.type == "object_aware" else "scene_scene"


# ------------------------------------------------------------------------------------- checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to ``tp`` (only int -> float), or a :class:`RecipeError`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, where)
            except RecipeError as exc:
                errors.append(exc)
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise RecipeError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{where}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise TypeError(f"unsupported schema type {tp!r} at {where}")  # pragma: no cover


def _unknown(key: str, known: Sequence[str], where: str) -> RecipeError:
    close = difflib.get_close_matches(key, list(known), n=1)
    path = f"{where}.{key}" if where else key
    hint = f" Did you mean '{where + '.' if where else ''}{close[0]}'?" if close else ""
    return RecipeError(
        f"unknown key '{path}'.{hint} Known keys{' of ' + where if where else ''}: "
        f"{', '.join(known)}"
    )


def _build(cls: type, value: Any, where: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, v in value.items():
        if key not in hints:
            raise _unknown(str(key), fields, where)
        kwargs[key] = _check(v, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def parse_recipe(raw: Mapping[str, Any] | None, source: str = "<recipe>") -> RecipeConfig:
    """Validate a recipe mapping (as loaded from YAML) into a :class:`RecipeConfig`.

    ``crop: object_aware`` / ``crop: scene`` (a string) is shorthand for ``crop: {type: ...}``.

    Raises:
        RecipeError: naming ``source`` and the offending key.
    """
    raw = dict(raw or {})
    for section, key in _SHORTHAND.items():
        if isinstance(raw.get(section), str):
            raw[section] = {key: raw[section]}
    try:
        cfg = _build(RecipeConfig, raw, "")
        _semantic_checks(cfg)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return cfg


def _semantic_checks(cfg: RecipeConfig) -> None:
    if not cfg.data.train_path:
        raise RecipeError("data.train_path is required: the folder of training images")
    t = cfg.trainer
    if t.epochs < 1 and t.max_steps < 1:
        raise RecipeError("trainer.epochs must be >= 1 (or set trainer.max_steps)")
    if t.batch_size < 1:
        raise RecipeError(f"trainer.batch_size must be >= 1, got {t.batch_size}")
    if cfg.data.num_workers < 0:
        raise RecipeError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if not 0.0 <= cfg.data.max_failure_rate <= 1.0:
        raise RecipeError(
            f"data.max_failure_rate must be a fraction in [0, 1], got {cfg.data.max_failure_rate}"
        )
    if cfg.optimizer.lr <= 0:
        raise RecipeError(f"optimizer.lr must be > 0, got {cfg.optimizer.lr}")
    _check_params(cfg)
    from .online import parse_online

    online = parse_online(cfg)
    if cfg.crop.type == "object_aware" and not cfg.data.proposals and online is None:
        raise RecipeError(
            "crop.type is object_aware but data.proposals is not set. Fix: build a store "
            "with `objcrop proposals build IMAGES -o STORE.objcrop` and set data.proposals, "
            "or use `crop: scene`."
        )
    _check_sampling(cfg, online is not None)


def _check_sampling(cfg: RecipeConfig, online: bool) -> None:
    """``data.sampling``, ``data.max_boxes_per_image`` and ``data.epoch_length`` together."""
    d = cfg.data
    counted = [k for k, on in (("data.sampling: per_box", d.sampling == "per_box"),
                               ("data.epoch_length: boxes", d.epoch_length == "boxes")) if on]
    for what in counted:
        if not d.proposals:
            raise RecipeError(
                f"{what} needs data.proposals: its boxes are the samples (or are counted). "
                "Fix: set data.proposals to a store (`objcrop proposals build IMAGES -o "
                "STORE.objcrop`), or data.sampling: per_image and data.epoch_length: images"
            )
        if online:
            raise RecipeError(
                f"{what} needs a fixed proposal store, but crop.proposals is online (the boxes "
                "change during training). Fix: crop.proposals: null, or data.sampling: "
                "per_image and data.epoch_length: images"
            )
    if d.sampling == "per_box" and (cfg.crop.params or {}).get("weighting", "uniform") != "uniform":
        raise RecipeError(
            "crop.params.weighting chooses among an image's boxes, but with data.sampling: "
            "per_box each sample is one box already. Fix: data.sampling: per_image, or drop "
            "crop.params.weighting"
        )
    if isinstance(d.epoch_length, int) and d.epoch_length < 1:
        raise RecipeError(f"data.epoch_length must be images, boxes or an integer >= 1, got "
                          f"{d.epoch_length}")
    if d.max_boxes_per_image is not None:
        if d.max_boxes_per_image < 1:
            raise RecipeError(
                f"data.max_boxes_per_image must be >= 1 (or null: all), got {d.max_boxes_per_image}"
            )
        if not counted:
            raise RecipeError(
                "data.max_boxes_per_image applies to data.sampling: per_box and "
                "data.epoch_length: boxes only. Fix: set one of them, or "
                "data.max_boxes_per_image: null (per_image sampling draws among crop.params."
                "top_k boxes)"
            )


def recipe_params(cfg: RecipeConfig) -> dict[str, Any]:
    """The view recipe's parameters: ``crop.params`` plus ``crop.size`` as its view size."""
    params = dict(cfg.crop.params)
    size = tuple(cfg.crop.size) if isinstance(cfg.crop.size, list) else cfg.crop.size
    params.setdefault("global_size" if cfg.views == "multi_crop" else "size", size)
    return params


def _check_params(cfg: RecipeConfig) -> None:
    """Free-form parameter mappings checked against what they parametrise."""
    from ..policies import make_recipe
    from ..registry import RegistryError

    try:
        recipe = make_recipe(cfg.views, **recipe_params(cfg))
    except RegistryError as exc:
        raise RecipeError(f"crop.views: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"crop.params (view recipe '{cfg.views}'): {exc}") from None
    if cfg.crop.type == "scene" and recipe.needs_proposals:
        raise RecipeError(
            f"crop.type is scene but the view recipe '{recipe.name}' crops from proposals. "
            "Fix: crop.type: object_aware (with data.proposals), or a scene recipe "
            "(crop.views: scene_scene)"
        )
    if cfg.crop.type == "object_aware" and not recipe.needs_proposals:
        raise RecipeError(
            f"crop.type is object_aware but the view recipe '{recipe.name}' never uses "
            "proposals. Fix: crop.views: obj_obj_dilate (or obj_scene, obj_obj, multi_crop "
            "with an object policy), or crop: scene"
        )
    known = METHOD_DEFAULTS[cfg.method.name]
    for key in cfg.method.params:
        if key not in known:
            raise _unknown(str(key), sorted(known), "method.params")


# ------------------------------------------------------------------------------ overrides


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw recipe mapping.

    ``key=null`` sets ``None``; a missing intermediate mapping is created, so
    ``crop.params.top_k=5`` works on a recipe without ``crop.params``. ``method=byol`` and
    ``backbone=resnet18`` change only the name of an existing section; ``crop=scene`` its type,
    and its views to their scene crops (:func:`scene_counterpart`: the recipe's baseline;
    with ``data.sampling: per_box``, images sampled as many times as the boxes,
    ``epoch_length: boxes``, as ``released_mocov2_scene_matched.yaml``);
    ``crop.proposals.warmup_epochs=0`` on ``crop.proposals: online`` (or ``initial``) sets the
    key in the mapping the mode stands for.

    Raises:
        RecipeError: an override without ``=``, one that walks into a non-mapping, or a
            scalar that replaces a whole mapping an earlier override set a key in
            (``crop.proposals.params.max_side=256 crop.proposals=online``: the other order
            sets the key in the mapping ``online`` stands for; ``null`` or a mapping replaces
            it on purpose).
    """
    out = dict(raw)
    earlier: list[tuple[list[str], str]] = []  # (key path, override) of the overrides applied
    for item in overrides:
        if "=" not in item:
            raise RecipeError(
                f"override '{item}' is not of the form dotted.key=value "
                "(e.g. trainer.epochs=10)"
            )
        path, text = item.split("=", 1)
        parts = [p for p in path.strip().lstrip("+").split(".") if p]
        if not parts:
            raise RecipeError(f"override '{item}' has an empty key")
        value = _parse_value(text)
        inside = [o for keys, o in earlier if len(keys) > len(parts) and keys[: len(parts)] == parts]
        merged = len(parts) == 1 and parts[0] in _SHORTHAND and isinstance(value, str)
        if inside and value is not None and not isinstance(value, Mapping) and not merged:
            # a scalar (a mode such as `online`) replaces the mapping that an earlier override
            # set a key in; null or a mapping replaces it on purpose, a section's shorthand
            # keeps the rest of the section
            raise RecipeError(
                f"override '{item}' replaces {'.'.join(parts)}, which the earlier override "
                f"'{inside[-1]}' set a key inside: that setting would be lost. Fix: put "
                f"'{item}' before '{inside[-1]}'"
            )
        earlier.append((parts, item))
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif isinstance(child, str) and part in _SHORTHAND and i == 0:
                child = {_SHORTHAND[part]: child}
            elif isinstance(child, str) and parts[: i + 1] == ["crop", "proposals"]:
                from .online import MODES  # `online` / `initial` stand for a mapping

                if child not in MODES:
                    raise RecipeError(f"override '{item}': crop.proposals is {child!r}, not "
                                      f"a mode ({', '.join(MODES)}) or a mapping")
                child = dict(MODES[child])
            elif not isinstance(child, Mapping):
                raise RecipeError(
                    f"override '{item}': '{'.'.join(parts[: i + 1])}' is {child!r}, not a mapping"
                )
            child = dict(child)
            node[part] = child
            node = child
        short = _SHORTHAND.get(parts[0]) if len(parts) == 1 else None
        if short and isinstance(value, str) and isinstance(node.get(parts[0]), Mapping):
            # `crop=scene` on a recipe with a crop section: change its type, keep the rest
            # (the scene crops of its view recipe: the recipe's baseline)
            node[parts[0]] = {**node[parts[0]], short: value}
            if parts[0] == "crop" and value == "scene":
                node["crop"] = scene_counterpart(node["crop"])
                data = node.get("data")
                if isinstance(data, Mapping) and data.get("sampling") == "per_box":
                    # per-box sampling of scene crops would see an image once per box: the
                    # matched baseline samples images, as many as the per-box run's boxes
                    node["data"] = {**data, "sampling": "per_image", "epoch_length": "boxes"}
        else:
            node[parts[-1]] = value
    return out


def scene_counterpart(crop: Mapping[str, Any]) -> dict[str, Any]:
    """A crop section's scene-crop baseline (what the override ``crop=scene`` makes of it).

    The same view size, photometrics and engine, with scene crops where the view recipe cuts
    from proposals: a two-view object recipe (``obj_obj_dilate``, ``obj_obj``, ``obj_scene``)
    becomes ``scene_scene``, keeping the parameters that ``scene_scene`` takes (``size``,
    ``scale``, ``ratio``; ``obj_scene``'s ``scene_scale`` as ``scale``) and dropping the
    object ones; ``object`` / ``object_dilated`` (``n_views`` of one policy) become as many
    ``scene`` views; ``multi_crop`` keeps its views and counts and draws both groups from the
    scene. Other views (a list, a plugin's recipe) are left as they are. ``crop.proposals``
    (online or initial boxes) is dropped. (The override also turns per-box sampling into
    ``epoch_length: boxes``: see :func:`apply_overrides`.)

    Example:
        >>> scene_counterpart({"type": "scene", "views": "obj_obj_dilate", "size": 224,
        ...                    "params": {"top_k": 10, "dilation": 0.1}})
        {'type': 'scene', 'views': 'scene_scene', 'size': 224, 'params': {}}
    """
    out = dict(crop)
    out.pop("proposals", None)  # online / initial boxes: no proposals for scene crops
    views = out.get("views")
    params = out.get("params")
    params = dict(params) if isinstance(params, Mapping) else {}
    if views in ("object", "object_dilated"):  # n views of one policy: n scene crops
        out["views"] = "scene"
        out["params"] = {k: v for k, v in params.items()
                         if k in ("n_views", "size", "scale", "ratio")}
    elif views == "multi_crop":
        for group in ("global_policy", "local_policy"):
            spec = params.get(group, "scene" if group == "global_policy" else "object")
            if isinstance(spec, Mapping):
                spec = {k: v for k, v in spec.items() if k in ("scale", "ratio")}
                params[group] = {**spec, "policy": "scene"}
            else:
                params[group] = "scene"
        out["params"] = params
    elif views is None or views in _OBJECT_RECIPES:
        if views is not None and "scene_scale" in params:
            params.setdefault("scale", params["scene_scale"])
        kept = {k: v for k, v in params.items() if k in ("size", "scale", "ratio")}
        if views is not None:
            out["views"] = "scene_scene"
        if "params" in out:
            out["params"] = kept
    return out


#: the built-in view recipes and policies that cut from proposals (see scene_counterpart)
_OBJECT_RECIPES = ("obj_obj_dilate", "obj_obj", "obj_scene", "object", "object_dilated")

#: sections that a plain string stands for: ``crop: scene`` is ``crop: {type: scene}``
_SHORTHAND = {"crop": "type", "method": "name", "backbone": "name"}


def load_recipe(
    path: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> RecipeConfig:
    """Read, override and validate a recipe file.

    Relative ``data.*`` paths resolve against the current directory (like every command-line
    tool), or against the recipe's folder when ``data.paths_relative_to_recipe: true``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{p}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        cfg = parse_recipe(raw, "")
    except RecipeError as exc:
        raise RecipeError(f"{_blamed(str(exc)[2:], overrides, p)}: {str(exc)[2:]}") from None
    if cfg.data.paths_relative_to_recipe:
        base = p.resolve().parent
        for name in ("train_path", "proposals", "labels"):
            v = getattr(cfg.data, name)
            if v and not os.path.isabs(v):
                setattr(cfg.data, name, str(base / v))
    return cfg


def _blamed(message: str, overrides: Sequence[str], path: Path) -> str:
    """Where a recipe error comes from: the command-line override that set the key the
    message names (``unknown key 'trainer.epoch'``, ``trainer.epochs: expected ...``), else
    the recipe file."""
    for item in reversed(overrides):  # the last override of a key wins
        key = item.split("=", 1)[0].strip().lstrip("+")
        if key and (f"'{key}'" in message or message.startswith(f"{key}:")):
            return f"{path}, override '{item}'"
    return str(path)


def to_dict(cfg: Any) -> Any:
    """A plain mapping (YAML-safe) of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    return cfg


def save_recipe(cfg: RecipeConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved recipe atomically (a later ``load_recipe`` gives the same config)."""
    from ..files import atomic_write

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write(path, text.encode())
