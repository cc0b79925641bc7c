"""Does object-aware cropping help, and how much of it survives unsupervised proposals?

    python bench/quality.py [--seeds 0 1] [--budget default] [--domain demo|photo] [--recall]
                            [--sources graph_segments bing heatmap online] [--out bench_out/quality]

The demo's comparison (``objcrop demo``: SimCLR on the embedded synthetic scenes, a
multi-label linear probe on frozen features, mAP in percent), for several seeds and more
runs per seed: a randomly initialised network, ``scene_scene``, ``obj_scene`` and
``obj_obj_dilate`` with oracle (ground-truth) boxes, and ``obj_obj_dilate`` with boxes that need
no annotation: each unsupervised generator's proposals (built once per dataset), ``heatmap``
(two rounds: heat-map boxes from the same seed's ``scene_scene`` checkpoint) and ``online``
(scene crops for the first 10% of the epochs, then heat-map boxes from the backbone being
trained, refreshed every 20%: the same total budget as every other run); ``--sources ...
initial`` adds ``obj_obj_dilate@initial`` (heat-map boxes from the initial weights, computed
before the first epoch and kept for the whole run), ``online_no_warmup`` the online run with
no warm-up (the initial weights' boxes, then refreshed; how ``crop.proposals: online`` starts
by default when no ``data.proposals`` is given). ``obj_obj_dilate:rank@SOURCE`` draws each
sample's box with probability proportional to one over its rank instead of uniformly among the
top 10 (``crop.params.weighting: rank``; reported as ``<source>_rank_...``). Every run of a
seed starts from the same initialisation and sees the same batches.

Prints one table per seed, a summary (mean and standard deviation over seeds) and a last line

    RESULT scene_map=<x> obj_obj_dilate_map=<x> random_map=<x> delta=<x> delta_std=<x>
           [obj_scene_map=<x>] <source>_map=<x> <source>_gain_kept=<x> [<source>_gain_kept_std=<x>
           <source>_minus_gt=<x> <source>_minus_gt_se=<x>]
           ... seeds=<n> domain=<d>
           [gt_recall10=<x> <source>_recall10=<x> ...]

(one line) where ``<source>_gain_kept`` is ``(map(source) - scene) / (map(gt) - scene)`` with
each term averaged over seeds: the share of the oracle (ground-truth) boxes' gain that the
source's boxes keep (``_gain_kept_std``: the standard deviation of each seed's own ratio;
``_minus_gt`` and ``_minus_gt_se``: the mean and standard error over seeds of the run's mAP
minus the same seed's oracle run, 0 for a gain kept of 1.0). ``--domain photo`` runs it on the
second synthetic domain (flat shapes on photo crops, needs scikit-image); ``--recall`` adds each
box store's recall@10 at IoU 0.5 of the ground-truth boxes (``objcrop proposals eval``'s),
averaged over seeds. Measures only; asserts nothing. The default (2 seeds, 7 pretraining runs
each) takes about 55 minutes on 2 cores; add ``--seeds 0 1 2`` for a third seed (~80 min). The
network sources alone over three seeds, ``--seeds 0 1 2 --recall --runs random scene_scene
obj_obj_dilate obj_obj_dilate@heatmap obj_obj_dilate@online``, take about 45 minutes per domain;
``--reuse random scene_scene obj_obj_dilate`` takes those runs from each seed's earlier
``results.json`` in ``--out`` (same settings only), for about 25 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from objcrop_plugin.demo import BUDGETS, SELF_SOURCES, run_demo, run_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BING = Path(os.environ.get("OBJCROP_BING_MODEL", REPO.parent / "shared" / "models" / "bing"))
#: proposal generators whose recall ``--recall`` reports even when no run uses their boxes
REFERENCE_SOURCES = ("graph_segments", "bing")


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def paired(runs: list[float], oracle: list[float]) -> tuple[float, float] | None:
    """Mean and standard error of ``runs[i] - oracle[i]`` over seeds (``None`` below two
    seeds or when the lists differ in length): seeds share data, initialisation and batches,
    so the paired difference is far less noisy than the difference of the two means. A gain
    kept of 1.0 is a difference of 0."""
    if len(runs) != len(oracle) or len(runs) < 2:
        return None
    d = [r - o for r, o in zip(runs, oracle)]
    return statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5


def _recall10(res: dict, seed_out: Path, sources: list[str], params: dict) -> dict[str, float]:
    """Recall@10 at IoU 0.5 of the ground-truth boxes by each box store of one seed's run,
    and by the proposal generators' stores (``REFERENCE_SOURCES``) even when no run used
    them (built here when missing: seconds each). ``online`` and ``initial``: the run's last
    store, which covers the training images only, against their ground truth."""
    from objcrop_plugin.proposals.build import build_store
    from objcrop_plugin.proposals.evaluate import recall
    from objcrop_plugin.proposals.store import ProposalStore

    data = Path(res["data_root"])
    gt = data / "proposals_gt.objcrop"
    out = {}
    for s in ["gt", *sources, *(r for r in REFERENCE_SOURCES if r in params and r not in sources)]:
        gt_records = gt
        if s == "gt":
            path = gt
        elif s == "heatmap":
            path = seed_out / f"proposals_{s}.objcrop"
        elif s in SELF_SOURCES:
            refreshes = sorted((run_dir(seed_out, f"obj_obj_dilate@{s}") / "proposals")
                               .glob("epoch-*.objcrop"))
            if not refreshes:
                continue
            path = refreshes[-1]
            keys = set(ProposalStore(path).keys())
            gt_records = [r for r in ProposalStore(gt).records() if r.key in keys]
        else:
            path = data / f"proposals_{s}.objcrop"
        if s in REFERENCE_SOURCES and not path.is_file():
            build_store(data, path, method=s, params=params[s], workers=min(2, os.cpu_count() or 1),
                        progress=False)
        if path.is_file():
            out[s] = recall(path, gt_records, (0.5,), (10,))["recall"][0.5][10]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", default="default", choices=sorted(BUDGETS))
    parser.add_argument("--sources", nargs="*",
                        default=["graph_segments", "bing", "heatmap", "online"],
                        help="boxes without annotation to compare with the oracle boxes: "
                        "proposal generators, heatmap (two rounds), online, initial (heat-map "
                        "boxes from the initial weights, fixed), online_no_warmup")
    parser.add_argument("--per-box", action="store_true",
                        help="also run obj_obj_dilate:per_box (oracle boxes, one sample per "
                        "box as the released code, at the per-image runs' number of steps)")
    parser.add_argument("--runs", nargs="+", default=None,
                        help="run only these (demo run names, e.g. obj_obj_dilate@heatmap or "
                        "obj_obj_dilate:rank@heatmap; default: the full comparison)")
    parser.add_argument("--domain", default="demo", choices=["demo", "photo"],
                        help="synthetic data domain (photo: flat shapes on photo crops)")
    parser.add_argument("--recall", action="store_true",
                        help="also report each box source's recall@10 at IoU 0.5 of the "
                        "ground-truth boxes")
    parser.add_argument("--bing-model", type=Path, default=DEFAULT_BING)
    parser.add_argument("--out", type=Path, default=Path("bench_out") / "quality")
    parser.add_argument("--reuse", nargs="*", default=[], metavar="RUN",
                        help="take these runs from each seed's earlier results.json in --out "
                        "when it has the same settings (only for runs no code change touched)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the synthetic data sets go (default OUT/data)")
    args = parser.parse_args(argv)

    sources = list(args.sources)
    if "bing" in sources and not args.bing_model.is_dir():
        print(f"note: BING model folder {args.bing_model} not found; skipping bing "
              "(pass --bing-model)", file=sys.stderr)
        sources.remove("bing")
    runs = ["random", "scene_scene", "obj_scene", "obj_obj_dilate"]
    runs += [f"obj_obj_dilate@{s}" for s in sources]
    if args.per_box:
        runs.append("obj_obj_dilate:per_box")
    if args.runs:
        runs = list(args.runs)
        sources = [s for s in sources if any(r.partition("@")[2] == s for r in runs)]
    params = {s: {"top_k": 10} for s in sources if s not in SELF_SOURCES}
    if "bing" in params:
        params["bing"]["model_dir"] = str(args.bing_model)
    recall_params = {"graph_segments": {"top_k": 10}}
    if args.bing_model.is_dir():
        recall_params["bing"] = {"top_k": 10, "model_dir": str(args.bing_model)}
    recall_params.update(params)

    t0 = time.perf_counter()
    per_seed: list[dict] = []
    for seed in args.seeds:
        res = run_demo(
            args.out / f"seed{seed}", budget=args.budget, seed=seed,
            data_dir=args.data_dir or args.out / "data", runs=runs, proposal_params=params,
            log=lambda line: print(line, flush=True), domain=args.domain, reuse=args.reuse,
        )
        if args.recall:
            res["recall10"] = _recall10(res, args.out / f"seed{seed}", sources, recall_params)
            print(f"recall@10 (IoU 0.5): {res['recall10']}", flush=True)
        per_seed.append(res)
        print(f"-- seed {seed} done ({time.perf_counter() - t0:.0f}s so far)", flush=True)

    def maps(run: str, field: str = "map") -> list[float]:
        return [r["runs"][run][field] for r in per_seed if run in r["runs"]]

    scene, gt = maps("scene_scene"), maps("obj_obj_dilate")
    deltas = [o - s for o, s in zip(gt, scene)]
    print()
    print(f"{args.budget} budget, domain {args.domain}, seeds {args.seeds}, "
          "mean ± std over seeds (mAP %)")
    print(f"{'run':<32}{'probe mAP':>18}{'kNN mAP':>18}{'gain kept':>12}{'minus oracle':>16}")
    summary: dict[str, dict] = {}
    for run in runs:
        m = maps(run)
        kept = None
        if "@" in run and scene and gt:
            gt_gain = statistics.mean(gt) - statistics.mean(scene)
            if abs(gt_gain) > 1e-9:
                kept = (statistics.mean(m) - statistics.mean(scene)) / gt_gain
        # the spread: each seed's own gain kept (noisy where a seed's oracle gain is small)
        per_seed_kept = [(x - sc) / (g - sc) for x, sc, g in zip(m, scene, gt)
                         if "@" in run and len(m) == len(gt) and abs(g - sc) > 1e-9]
        # paired by seed (same data, initialisation and batches): the run minus the oracle run
        vs_gt = paired(m, gt) if "@" in run else None
        summary[run] = {"map": m, "knn_map": maps(run, "knn_map"), "gain_kept": kept,
                        "gain_kept_per_seed": per_seed_kept, "minus_gt": vs_gt}
        k = "-" if kept is None else f"{kept:.2f}"
        d = "-" if vs_gt is None else f"{vs_gt[0]:+.2f} ± {vs_gt[1]:.2f}"
        print(f"{run:<32}{_fmt(m):>18}{_fmt(maps(run, 'knn_map')):>18}{k:>12}{d:>16}")
    print(f"{'delta (obj_obj_dilate - scene)':<32}{_fmt(deltas):>18}")
    total = time.perf_counter() - t0
    print(f"total {total / 60:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(
        {"seeds": args.seeds, "budget": args.budget, "domain": args.domain, "runs": summary, "delta": deltas,
         "minutes": round(total / 60, 1)}, indent=2) + "\n")

    def mean(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f}" if v else "nan"

    parts = [
        f"scene_map={mean(scene)}", f"obj_obj_dilate_map={mean(gt)}",
        f"random_map={mean(maps('random'))}", f"delta={mean(deltas)}",
        f"delta_std={statistics.stdev(deltas) if len(deltas) > 1 else 0.0:.2f}",
    ]
    if "obj_scene" in runs:
        parts.append(f"obj_scene_map={mean(maps('obj_scene'))}")
    for run in runs:
        views, _, s = run.partition("@")
        views, _, variant = views.partition(":")
        if not s or views != "obj_obj_dilate" or variant == "per_box":
            continue
        s = f"{s}_{variant}" if variant else s  # heatmap_rank for obj_obj_dilate:rank@heatmap
        kept = summary[run]["gain_kept"]
        spread = summary[run]["gain_kept_per_seed"]
        parts += [f"{s}_map={mean(maps(run))}",
                  f"{s}_gain_kept={'nan' if kept is None else f'{kept:.2f}'}"]
        if len(spread) > 1:
            parts.append(f"{s}_gain_kept_std={statistics.stdev(spread):.2f}")
        if summary[run]["minus_gt"] is not None:
            d, se = summary[run]["minus_gt"]
            parts += [f"{s}_minus_gt={d:.2f}", f"{s}_minus_gt_se={se:.2f}"]
    if "obj_obj_dilate:per_box" in runs:
        pb = maps("obj_obj_dilate:per_box")
        diff = [p - g for p, g in zip(pb, gt)] if len(gt) == len(pb) else []
        parts += [f"per_box_map={mean(pb)}", f"per_box_minus_per_image={mean(diff)}"]
    parts += [f"seeds={len(args.seeds)}", f"domain={args.domain}"]
    if args.recall:
        names = [n for n in ["gt", *sources, *REFERENCE_SOURCES]
                 if all(n in r["recall10"] for r in per_seed)]
        names = list(dict.fromkeys(names))
        parts += [f"{n}_recall10={statistics.mean(r['recall10'][n] for r in per_seed):.3f}"
                  for n in names]
    print("RESULT " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
