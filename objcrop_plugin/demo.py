"""``objcrop demo``: scene crops vs object-aware crops, end to end, on a laptop CPU.

The demo reproduces the paper's comparison in miniature (Mishra et al., TMLR 2022, Table 1):

1. write the embedded synthetic dataset (:mod:`objcrop_plugin.data.synthetic`) with its
   ground-truth boxes as the proposal store (oracle boxes: what an annotated dataset gives);
2. pretrain the same small timm backbone with SimCLR twice, from the same initialisation,
   seed and budget: views ``scene_scene`` (the usual random resized crops) and
   ``obj_obj_dilate`` (view 1 inside a proposal, view 2 inside the dilated proposal);
3. evaluate both, and the randomly initialised network, with a multi-label linear probe on
   frozen features of the whole scene (mAP over classes, in percent);
4. print a table, write ``results.json``, and end with one line
   ``RESULT scene_map=<x> obj_obj_dilate_map=<x> random_map=<x> delta=<x>``.

Budgets (:data:`BUDGETS`): ``"quick"`` (seconds, for tests), ``"default"`` (under 10 minutes on
a 2-core CPU, data generation included) and ``"full"`` (longer pretraining, more data). Every
setting is a plain keyword, so ``run_demo(..., epochs=5)`` overrides one of them.

Example:
    >>> from objcrop_plugin.demo import run_demo
    >>> res = run_demo("demo_out", budget="quick")  # doctest: +SKIP
    >>> sorted(res["runs"])  # doctest: +SKIP
    ['obj_obj_dilate', 'random', 'scene_scene']
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .files import OutputKind, atomic_write, check_output

__all__ = ["BUDGETS", "RESULTS_KIND", "run_demo"]

#: what ``run_demo`` may replace in its folder: a ``results.json`` it wrote
RESULTS_KIND = OutputKind("demo results.json", lambda head: head.startswith(b'{\n  "budget": '))

#: Settings of each budget. See docs/demo-design.md for how they were chosen (measured on a
#: 2-core CPU).
BUDGETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        n_train=48, n_test=32, image_size=(96, 72), view_size=32, model="test_efficientnet",
        epochs=1, batch_size=16, lr=1e-2, weight_decay=1e-4, optimizer="adamw",
        temperature=0.2, photometrics="simclr", num_workers=0, eval_scale=1.0,
        pooling="avgmax", probe_epochs=100, dilation=0.1, scene_scale=(0.2, 1.0),
        object_scale=(0.2, 1.0), dilated_scale=(0.2, 1.0), proj_dim=64, threads=2,
    ),
    "default": dict(
        n_train=2000, n_test=1000, image_size=(128, 96), view_size=48,
        model="test_efficientnet", epochs=25, batch_size=128, lr=1e-2, weight_decay=1e-4,
        optimizer="adamw", temperature=0.2, photometrics="simclr", num_workers=1,
        eval_scale=2.0, pooling="avgmax", probe_epochs=100, dilation=0.1,
        scene_scale=(0.2, 1.0), object_scale=(0.2, 1.0), dilated_scale=(0.2, 1.0),
        proj_dim=128, threads=2,
    ),
}
BUDGETS["full"] = dict(BUDGETS["default"], n_train=4000, n_test=2000, epochs=50)

RUNS = ("random", "scene_scene", "obj_obj_dilate")
VIEWS = ("random", "scene_scene", "obj_scene", "obj_obj_dilate")


# --------------------------------------------------------------------------------------------
# pretraining
# --------------------------------------------------------------------------------------------


def _backbone(model: str, seed: int) -> nn.Module:
    from .backbones import create_backbone

    torch.manual_seed(seed)
    return create_backbone(model).to(memory_format=torch.channels_last)


def _crop_params(views: str, cfg: dict[str, Any]) -> dict[str, Any]:
    if views == "scene_scene":
        return {"scale": list(cfg["scene_scale"])}
    if views in ("obj_obj_dilate", "obj_scene"):
        params: dict[str, Any] = {"object_scale": list(cfg["object_scale"])}
        if views == "obj_obj_dilate":
            params.update(dilated_scale=list(cfg["dilated_scale"]), dilation=cfg["dilation"])
        else:
            params["scene_scale"] = list(cfg["scene_scale"])
        return params
    return {}


def online_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The demo's online proposals with a warm-up (run ``VIEWS@online``): scene crops for the
    first 10% of the epochs (``crop.proposals: online``'s default before twelve photo seeds
    favoured no warm-up: :func:`online_no_warmup_settings`), then heat-map boxes from the
    backbone being trained, refreshed every 20% of the epochs.

    A short warm-up is enough: the whitened heat map of a barely trained network already finds
    objects (recall@10 on seed 0's demo scenes: 0.84 from a randomly initialised backbone, 0.86
    from a fully trained ``scene_scene`` one; on the photo domain 0.47 and 0.41), and on photos
    the boxes improve as the backbone learns from object crops (0.58 from an
    ``obj_obj_dilate`` backbone). Over seeds 0-2 these runs kept 1.26 of the oracle boxes'
    gain on the demo domain and 0.88 on the photo domain (boxes of 8 px a side or more, the
    map thresholded at nine levels); with five levels 1.16 and 0.88; with boxes down to 4 px
    1.03 and 0.40; with a 1-epoch warm-up 0.99 and 0.96; with none (``warmup_epochs: 0``,
    boxes from the initial weights) 1.36 and 0.85; with a 40% warm-up (and the contrast map)
    0.77 and 0.28. Over seeds 0-5 these runs kept 1.12 and 0.69, and with no warm-up 1.14
    and 1.09; over seeds 0-11 0.96 and 0.70, and with no warm-up 0.88 and 1.05."""
    epochs = int(cfg["epochs"])
    return {"method": "heatmap", "warmup_epochs": max(1, round(epochs * 0.1)),
            "every_epochs": max(1, round(epochs * 0.2)), "params": dict(ONLINE_HEATMAP_PARAMS)}


def initial_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``VIEWS@initial``: one store of heat-map boxes from the initial weights, computed
    before the first epoch, for the whole run (``crop.proposals`` with ``warmup_epochs: 0``
    and ``every_epochs: 0``: no stage of its own, no scene-crop warm-up, no
    refresh). The whitened map of a randomly initialised network already finds objects by how
    unusual their features are in the image; over seeds 0-2 these runs kept 1.48 of the
    oracle boxes' gain on the demo domain and 1.07 on the photo domain, over seeds 0-5 1.20
    and 1.07, against 1.12 and 0.69 for the refreshed online runs after a 2-epoch warm-up;
    on the demo over seeds 0-5 and 9-11 0.91, on photos over seeds 0-8 1.18."""
    from .train.online import MODES

    return {**online_settings(cfg), **MODES["initial"]}


def online_no_warmup_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``VIEWS@online_no_warmup``: :func:`online_settings` with ``warmup_epochs: 0``
    (``crop.proposals: online``'s default start when no ``data.proposals`` is given), so the
    first store comes from the initial weights before the first epoch (the store of
    ``@initial``) and is refreshed as in ``@online``. Over seeds 0-5 these runs kept 1.14 of
    the oracle boxes' gain on the demo domain and 1.09 on the photo domain; over seeds 0-11
    0.88 and 1.05, against 0.96 and 0.70 with the warm-up."""
    return {**online_settings(cfg), "warmup_epochs": 0}


#: the runs whose boxes come from the network being trained, and their ``crop.proposals``
SELF_SOURCES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "online": online_settings, "initial": initial_settings,
    "online_no_warmup": online_no_warmup_settings,
}


#: the heat-map generator's settings for the demo's 128x96 scenes: the network sees them at
#: 2x (as the probe does) and ``level="auto"`` picks the stride-2 level (96 cells along 192 px);
#: boxes under 8 px a side are dropped (blobs of a few cells, rarely an object); the colour
#: segments at two scales join the heat map's blobs as candidates, ranked by features and heat
HEATMAP_PARAMS: dict[str, Any] = {
    "scale": 2.0, "max_side": 128, "min_cells": 64, "min_side": 8.0,
    "segments": [100.0, 300.0], "score": "feature*heat",
}

#: the online runs' settings: the heat map's blobs alone (no colour segments, the feature
#: score). On the demo domain online runs kept more of the oracle's gain without the segments
#: on four of six seeds (+1.01 +- 0.52 mAP, seeds 0-5), and a refresh costs less
ONLINE_HEATMAP_PARAMS: dict[str, Any] = {
    k: v for k, v in HEATMAP_PARAMS.items() if k not in ("segments", "score")
}


def demo_recipe(
    views: str,
    cfg: dict[str, Any],
    root: str | os.PathLike[str],
    proposals: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    online: dict[str, Any] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The demo's SimCLR run as a recipe for :func:`objcrop_plugin.train.train` (the same
    recipe as ``recipes/lightly/demo_simclr.yaml`` at the default budget); ``online``: the
    ``crop.proposals`` mapping of online proposals (``proposals`` may then be ``None``);
    ``extra``: keys merged into the recipe's sections (e.g. ``{"data": {"sampling":
    "per_box"}}``)."""
    from .train.config import parse_recipe

    raw: dict[str, Any] = {
            "name": views,
            "data": {"train_path": str(root), "proposals": None if views == "scene_scene"
                     or proposals is None else str(proposals),
                     "num_workers": int(cfg["num_workers"])},
            "crop": {"type": "scene" if views == "scene_scene" else "object_aware",
                     "views": views, "size": int(cfg["view_size"]),
                     "params": _crop_params(views, cfg), "photometrics": cfg["photometrics"],
                     "proposals": online},
            "method": {"name": "simclr", "params": {
                "temperature": cfg["temperature"], "proj_dim": cfg["proj_dim"]}},
            "backbone": {"name": cfg["model"]},
            "optimizer": {"name": cfg["optimizer"], "lr": cfg["lr"],
                          "weight_decay": cfg["weight_decay"]},
            "schedule": {"scheduler": "cosine", "warmup_fraction": 0.1},
            "trainer": {"epochs": int(cfg["epochs"]), "batch_size": int(cfg["batch_size"]),
                        "accelerator": "cpu", "devices": 1, "out_dir": str(out_dir),
                        "seed": seed, "progress_bar": False, "resume": "never"},
        }
    for section, values in (extra or {}).items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_recipe(raw, source=f"demo recipe {views}")


def pretrain_simclr(
    backbone: nn.Module,
    root: str | os.PathLike[str],
    proposals: str | os.PathLike[str],
    keys: Sequence[str],
    views: str,
    cfg: dict[str, Any],
    seed: int = 0,
    log: Callable[[str], None] = print,
    out_dir: str | os.PathLike[str] | None = None,
    online: dict[str, Any] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """SimCLR on ``views`` crops through the recipe runner; trains ``backbone`` in place.

    Crops depend only on ``(seed, epoch, index)`` and the batch order on ``(seed, epoch)``,
    so two runs with the same arguments see the same data regardless of ``num_workers``.

    Returns:
        ``{"seconds", "images_per_s", "final_loss"}``.
    """
    import tempfile

    from .train.runner import train

    with tempfile.TemporaryDirectory(prefix="objcrop-demo-") as tmp:
        recipe = demo_recipe(views, cfg, root, proposals, out_dir or tmp, seed, online, extra)
        res = train(recipe, keys=keys, backbone=backbone, echo=log)
    return {
        "seconds": res["train_seconds"],
        "images_per_s": res["images_per_s"],
        "final_loss": res["final_loss"],
    }


# --------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (``0``: left alone), restored afterwards.

    On the CPU, convolution backward passes and reductions split their sums by thread, so the
    float results -- and, amplified over thousands of SGD steps, the probe mAP -- depend on the
    thread count: a seed only reproduces its numbers at a fixed count (``torch.get_num_threads``
    defaults to the number of cores, which differs between machines)."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_dir(out_dir: str | os.PathLike[str], name: str) -> Path:
    """Where :func:`run_demo` writes run ``name``'s training output (``runs/obj_obj_dilate_online``
    for ``obj_obj_dilate@online``)."""
    return Path(out_dir) / "runs" / name.replace("@", "_").replace(":", "_")


def _earlier_runs(
    out: Path, seed: int, config: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """The runs of ``out/results.json`` when it was written with this seed and settings."""
    path = out / "results.json"
    try:
        earlier = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log(f"cannot read {path} ({exc}); nothing is reused")
        return {}
    if earlier.get("seed") != seed or earlier.get("config") != config:
        return {}
    return dict(earlier.get("runs", {}))


def run_demo(
    out_dir: str | os.PathLike[str],
    budget: str = "default",
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
    quick: bool = False,
    runs: Sequence[str] = RUNS,
    proposal_params: dict[str, dict[str, Any]] | None = None,
    domain: str = "demo",
    reuse: Sequence[str] = (),
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Pretrain with scene and object-aware crops, probe both and a random init; write results.

    Args:
        out_dir: where ``results.json`` goes (created if needed).
        budget: ``"default"`` (< 10 min on 2 CPU cores), ``"full"``, or ``"quick"`` (seconds).
        seed: seeds the data, the initialisation (shared by all runs), the crops, the batch
            order and the probe.
        data_dir: where the synthetic dataset is written (default ``out_dir/data``); an
            existing dataset with the same parameters is reused.
        log: called with each progress line.
        quick: shorthand for ``budget="quick"``.
        runs: what to run: ``random`` (no pretraining), a view recipe (``scene_scene``,
            ``obj_scene``, ``obj_obj_dilate``) cropped from the ground-truth boxes, or
            ``VIEWS@SOURCE`` with proposals from a generator (``obj_obj_dilate@bing``,
            ``@graph_segments``, ``@selective_search``; built once into the data folder),
            ``@heatmap`` (two rounds: heat-map boxes from this seed's ``scene_scene`` run,
            which must come first), ``@online`` (online proposals: :func:`online_settings`),
            ``@online_no_warmup`` (the same with no warm-up) or ``@initial`` (boxes from the
            initial weights, fixed: :func:`initial_settings`);
            ``VIEWS:per_box`` (optionally with ``@SOURCE``) samples one item per box, as the
            paper's released code, for the per-image runs' number of steps; ``VIEWS:rank``
            draws each sample's box with probability proportional to one over its rank
            (``crop.params.weighting: rank``) instead of uniformly among the top 10.
        proposal_params: a generator's parameters by name (e.g.
            ``{"bing": {"model_dir": ...}}``).
        domain: the synthetic data's domain (see ``render_scene``): ``"demo"`` or
            ``"photo"`` (flat shapes on photo crops; needs scikit-image). A non-demo domain
            is part of the data folder's name (``synthetic_photo_128x96_n3000_s0``); recorded
            in ``config["domain"]``.
        reuse: runs to take from an earlier ``out_dir/results.json`` instead of running them
            again, when that file has the same seed and settings (budget, overrides, domain)
            and, for a pretrained run, its ``backbone.pth`` is still there; a run with nothing
            to reuse is run. Reused entries carry ``"reused": true``. The settings of the
            code itself are not compared: reuse only runs that a change has not touched.
        force: replace ``out_dir/results.json`` even when it is not a file this function
            wrote (never without: it may be the user's own).
        overrides: any key of :data:`BUDGETS` entries (e.g. ``epochs=5``).

    Returns:
        the results dictionary written to ``out_dir/results.json``: ``runs[name]`` has
        ``map`` (percent), ``pretrain_seconds`` and (pretrained runs) ``images_per_s``,
        ``final_loss``; plus ``delta`` (obj_obj_dilate minus scene_scene mAP), ``config``,
        ``data_seconds``, ``total_seconds``.
    """
    from .data.synthetic import load_labels, write_dataset

    if quick:
        budget = "quick"
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    unknown = set(overrides) - set(BUDGETS[budget])
    if unknown:
        raise TypeError(f"unknown demo settings {sorted(unknown)}; known: {sorted(BUDGETS[budget])}")
    for name in runs:
        views, _, source = name.partition("@")
        views, _, variant = views.partition(":")
        if variant not in ("", "per_box", "rank") or (variant and views in ("random",
                                                                            "scene_scene")):
            raise ValueError(f"unknown run {name!r}: ':per_box' and ':rank' are the only "
                             "suffixes, for object-aware views (e.g. obj_obj_dilate:per_box)")
        if views not in VIEWS or (views in ("random", "scene_scene") and source):
            raise ValueError(
                f"unknown run {name!r}; choose among {VIEWS}, object-aware ones optionally "
                "with @SOURCE (a proposal generator, e.g. obj_obj_dilate@graph_segments)"
            )
    cfg = dict(BUDGETS[budget], **overrides)
    out = Path(out_dir)
    # before any work: the folder's results.json may be the user's own file
    check_output(out / "results.json", RESULTS_KIND, [data_dir], force)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    n_total = cfg["n_train"] + cfg["n_test"]
    w, h = cfg["image_size"]
    data_root = Path(data_dir) if data_dir is not None else out / "data"
    tag = "" if domain == "demo" else f"{domain}_"
    log(f"objcrop demo: budget={budget} seed={seed}; writing {n_total} scenes {w}x{h} "
        f"(domain {domain}) to {data_root}")
    ds = write_dataset(
        data_root / f"synthetic_{tag}{w}x{h}_n{n_total}_s{seed}", n_total, size=(w, h),
        seed=seed, workers=min(2, os.cpu_count() or 1), domain=domain,
    )
    keys, multi_hot, classes = load_labels(ds.labels_path)
    y = torch.as_tensor(np.asarray(multi_hot), dtype=torch.float32)
    keys = list(keys)
    n_train = int(cfg["n_train"])
    train_keys = keys[:n_train]  # the first n_train images pretrain and fit the probe
    data_secs = time.perf_counter() - t_start
    log(f"data ready in {data_secs:.1f}s ({len(classes)} classes, "
        f"{y.sum(1).mean():.1f} classes per image)")

    def probe(net: nn.Module) -> tuple[float, float]:
        # objcrop eval's protocol (objcrop_plugin.eval), with the demo's split, scale, pooling
        from .eval import evaluate_backbone

        res = evaluate_backbone(
            net, ds.root, keys, y, split=(range(n_train), range(n_train, len(keys))),
            seed=seed, image_size=(h, w), scale=cfg["eval_scale"], pooling=cfg["pooling"],
            batch_size=128, probe={"epochs": cfg["probe_epochs"]},
        )
        return float(res["probe_map"]), float(res["knn_map"])

    stores: dict[str, Path] = {"gt": Path(ds.proposals_path)}
    scene_weights = out / "runs" / "scene_scene" / "backbone.pth"

    def store_for(source: str) -> Path | None:
        if source in SELF_SOURCES:
            return None  # the run's own boxes (scene crops in an online run's warm-up)
        if source == "heatmap" and source not in stores:
            # two rounds: boxes from this seed's scene_scene run
            from .proposals.build import build_store

            if not scene_weights.is_file():
                raise ValueError("run VIEWS@heatmap needs the scene_scene run before it (its "
                                 "backbone gives the boxes): list scene_scene first")
            path = out / "proposals_heatmap.objcrop"
            t = time.perf_counter()
            log(f"building heatmap proposals for {len(keys)} images from {scene_weights}")
            build_store(ds.root, path, method="heatmap", params={
                "model": cfg["model"], "checkpoint": str(scene_weights), "device": "cpu",
                **HEATMAP_PARAMS, **(proposal_params or {}).get("heatmap", {})},
                workers=min(2, os.cpu_count() or 1), progress=False, restart=True)
            log(f"  {path.name} in {time.perf_counter() - t:.1f}s")
            stores[source] = path
        if source not in stores:
            from .proposals.build import build_store

            path = Path(ds.root) / f"proposals_{source}.objcrop"
            t = time.perf_counter()
            log(f"building {source} proposals for {len(keys)} images")
            build_store(ds.root, path, method=source, params=(proposal_params or {}).get(source),
                        workers=min(2, os.cpu_count() or 1), progress=False)
            log(f"  {path.name} in {time.perf_counter() - t:.1f}s")
            stores[source] = path
        return stores[source]

    def per_box_budget(store: Path) -> dict[str, dict[str, Any]]:
        # one sample per box, at the per-image runs' number of steps (matched compute)
        from .proposals.store import ProposalStore

        st = ProposalStore(store)
        boxes = sum(len(st[k].boxes) for k in train_keys if k in st)
        batch = int(cfg["batch_size"])
        steps = (len(train_keys) // batch) * int(cfg["epochs"])
        per_epoch = max(1, boxes // batch)
        log(f"per-box sampling: {boxes} boxes of {len(train_keys)} images, {steps} steps "
            f"(the per-image runs'), {-(-steps // per_epoch)} epochs")
        return {"data": {"sampling": "per_box"},
                "trainer": {"epochs": -(-steps // per_epoch), "max_steps": steps}}

    def ranked(views: str) -> dict[str, dict[str, Any]]:
        # the box of rank r drawn in proportion to 1/r instead of uniformly among the top-k
        return {"crop": {"params": {**_crop_params(views, cfg), "weighting": "rank"}}}

    def _run(name: str) -> dict[str, Any]:
        views, _, source = name.partition("@")
        views, _, variant = views.partition(":")
        net = _backbone(cfg["model"], seed)  # same initialisation for every run
        info: dict[str, Any] = {"pretrain_seconds": 0.0}
        if views != "random":
            store = store_for(source or "gt")
            log(f"pretraining {cfg['model']} with SimCLR, views={views}, "
                f"proposals={source or 'oracle (ground-truth) boxes'}"
                + (", sampling=per_box" if variant == "per_box" else "")
                + (", proposal choice weighted by rank" if variant == "rank" else ""))
            tr = pretrain_simclr(net, ds.root, store, train_keys, views, cfg, seed, log,
                                 out_dir=run_dir(out, name),
                                 online=SELF_SOURCES[source](cfg) if source in SELF_SOURCES
                                 else None,
                                 extra=per_box_budget(store) if variant == "per_box"
                                 else ranked(views) if variant == "rank" else None)
            info.update(
                pretrain_seconds=round(tr["seconds"], 1),
                images_per_s=round(tr["images_per_s"], 1),
                final_loss=tr["final_loss"],
            )
        t = time.perf_counter()
        linear, nn_map = probe(net)
        info.update(map=round(linear, 2), knn_map=round(nn_map, 2))
        info["probe_seconds"] = round(time.perf_counter() - t, 1)
        log(f"{name}: probe mAP {info['map']:.2f}, kNN mAP {info['knn_map']:.2f}")
        return info

    config = {**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
              "domain": domain}
    earlier = _earlier_runs(out, seed, config, log) if reuse else {}
    results: dict[str, Any] = {}
    with _torch_threads(int(cfg["threads"])):
        for name in runs:
            weights = run_dir(out, name) / "backbone.pth"
            if name in reuse and name in earlier and (name == "random" or weights.is_file()):
                results[name] = dict(earlier[name], reused=True)
                log(f"{name}: probe mAP {results[name]['map']:.2f} (reused from "
                    f"{out / 'results.json'})")
                continue
            if name in reuse:
                log(f"{name}: no earlier result with these settings to reuse; running it")
            results[name] = _run(name)

    total = time.perf_counter() - t_start

    def _map(name: str) -> float | None:
        return results[name]["map"] if name in results else None

    s, o, r = _map("scene_scene"), _map("obj_obj_dilate"), _map("random")
    delta = round(o - s, 2) if s is not None and o is not None else None
    summary = {
        "budget": budget,
        "seed": seed,
        "config": config,
        "data_root": str(ds.root),
        "classes": list(classes),
        "runs": results,
        "delta": delta,
        "data_seconds": round(data_secs, 1),
        "total_seconds": round(total, 1),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    atomic_write(out / "results.json", [(json.dumps(summary, indent=2) + "\n").encode()])

    log("")
    width = max(16, *(len(n) + 2 for n in results))
    log(f"{'run':<{width}}{'probe mAP':>10}{'kNN mAP':>10}{'pretrain s':>12}")
    for name, info in results.items():
        log(f"{name:<{width}}{info['map']:>10.2f}{info['knn_map']:>10.2f}"
            f"{info['pretrain_seconds']:>12.1f}")
    log(f"total {total:.0f}s; results in {out / 'results.json'}")

    def fmt(v: float | None) -> str:
        return "nan" if v is None else f"{v:.2f}"

    log(f"RESULT scene_map={fmt(s)} obj_obj_dilate_map={fmt(o)} random_map={fmt(r)} "
        f"delta={fmt(delta)}")
    return summary
