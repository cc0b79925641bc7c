"""Proposal generators: speed per process, scaling over 2 processes, recall against ground truth.

    python bench/proposals.py [--images 80] [--bing-model DIR] [--methods bing bing_opencv ...]
                              [--heatmap-model resnet18]

On the demo generator's scenes (640x480, ground-truth boxes known), for each generator:
images/s in one process at 512 px (single-threaded, as in ``objcrop proposals build``), the
speed-up with 2 processes, and recall at IoU 0.5 of the top 10 proposals. OpenCV's own BING
(``bing_opencv``) runs in the same process as the reference for ``bing``. ``heatmap`` runs
``--heatmap-model`` with its initial weights (no checkpoint: the one-round route), on the CPU
unless a GPU is there (its own column). Prints a table and a
last line ``RESULT <method>_ips=<x> ... scaling=<x> <method>_recall10=<x> ...``. Measures only.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from objcrop_plugin import boxes as box_ops

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BING = Path(os.environ.get("OBJCROP_BING_MODEL", REPO.parent / "shared" / "models" / "bing"))


def _params(method: str, bing_model: Path, heatmap_model: str) -> dict:
    p = {"top_k": 10, "max_side": 512}
    if method.startswith("bing"):
        p["model_dir"] = str(bing_model)
    if method in ("heatmap", "token_cut"):
        p.update(model=heatmap_model, device="cpu")
    return p


def _load_images(root: Path, keys: list[str]):
    from objcrop_plugin.images import load_rgb, open_image

    return [load_rgb(open_image(root / k)) for k in keys]


_G = {}


def _init(method: str, params: dict) -> None:
    import cv2
    import torch

    from objcrop_plugin.proposals.build import make_generator

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    _G["gen"] = make_generator(method, **params)


def _run(image) -> tuple[np.ndarray, np.ndarray]:
    return _G["gen"](image)


def measure(method: str, params: dict, images, budget_s: float) -> tuple[float, list]:
    """images/s in this process (single thread) and the outputs."""
    _init(method, params)
    _run(images[0])  # warm-up (model load, first-call costs)
    outs, start = [], time.perf_counter()
    for img in images:
        outs.append(_run(img))
        if time.perf_counter() - start > budget_s and len(outs) >= 8:
            break
    return len(outs) / (time.perf_counter() - start), outs


def measure_pool(method: str, params: dict, images, n: int) -> float:
    ctx = mp.get_context("fork")
    with ctx.Pool(2, _init, (method, params)) as pool:
        pool.map(_run, images[:2], chunksize=1)  # both workers warm
        start = time.perf_counter()
        pool.map(_run, images[:n], chunksize=2)
        return n / (time.perf_counter() - start)


def recall_at(outs, gts, k: int = 10, t: float = 0.5) -> float:
    hit = total = 0
    for (boxes, _), gt in zip(outs, gts):
        total += len(gt)
        if len(boxes) and len(gt):
            hit += int((box_ops.iou(gt, boxes[:k]).max(axis=1) >= t).sum())
    return hit / max(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--bing-model", type=Path, default=DEFAULT_BING)
    parser.add_argument("--methods", nargs="+",
                        default=["bing", "bing_opencv", "graph_segments", "selective_search",
                                 "heatmap"])
    parser.add_argument("--heatmap-model", default="resnet18",
                        help="timm model of the heatmap (and token_cut) generator, initial weights")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per measurement")
    args = parser.parse_args()

    from objcrop_plugin.data.synthetic import write_dataset
    from objcrop_plugin.proposals import ProposalStore
    from objcrop_plugin.registry import list_proposal_sources

    tmp = tempfile.TemporaryDirectory(prefix="objcrop-bench-")
    demo = write_dataset(Path(tmp.name) / "demo", n_images=args.images, size=(640, 480), seed=1,
                         workers=2)
    keys = list(demo.keys)
    images = _load_images(demo.root, keys)
    gt_store = ProposalStore(demo.proposals_path)
    gts = [np.asarray(gt_store[k].boxes, dtype=np.float64) for k in keys]
    print(f"{len(images)} demo scenes 640x480, {sum(len(g) for g in gts)} ground-truth objects")

    installed = set(list_proposal_sources())
    rows, result = [], []
    scalings = []
    for method in args.methods:
        if method not in installed:
            print(f"skip {method}: not installed")
            continue
        if method.startswith("bing") and not args.bing_model.is_dir():
            print(f"skip {method}: no BING model folder at {args.bing_model}")
            continue
        params = _params(method, args.bing_model, args.heatmap_model)
        ips, outs = measure(method, params, images, args.budget)
        n_pool = max(8, min(len(images), int(ips * args.budget * 1.5)))
        ips2 = measure_pool(method, params, images, n_pool)
        all_outs = outs
        if len(outs) < len(images):  # recall on every scene, untimed
            all_outs = outs + [_run(img) for img in images[len(outs):]]
        rec = recall_at(all_outs, gts)
        gpu = ""
        try:
            import torch

            if torch.cuda.is_available() and "device" in _G["gen"].params():
                gips, _ = measure(method, {**params, "device": "cuda"}, images, args.budget)
                gpu = f"{gips:.1f}"
                result.append(f"{method}_gpu_ips={gips:.1f}")
        except Exception as exc:  # a GPU that fails must not hide the CPU numbers
            gpu = f"failed: {exc}"
        scale = ips2 / ips
        scalings.append(scale)
        rows.append((method, ips, ips2, scale, rec, gpu))
        result += [f"{method}_ips={ips:.1f}", f"{method}_recall10={rec:.3f}"]

    print(f"\n{'method':<18}{'img/s 1 proc':>14}{'img/s 2 proc':>14}{'scaling':>9}"
          f"{'recall@0.5 k=10':>17}{'GPU img/s':>11}")
    for method, ips, ips2, scale, rec, gpu in rows:
        print(f"{method:<18}{ips:>14.1f}{ips2:>14.1f}{scale:>9.2f}{rec:>17.3f}{gpu or '-':>11}")
    if scalings:
        result.insert(len(result), f"scaling={min(scalings):.2f}")
    print("RESULT " + " ".join(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
