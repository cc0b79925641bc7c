"""Benchmark: BING proposals per second, torch re-implementation vs OpenCV (one process).

Not a test (pytest does not collect it): it measures and asserts nothing about speed.

    python bench/bing.py [--threads 1] [--images 12] [--repeats 5] [--side 512]

Both generators see the same working images (longest side ``--side``) and run interleaved, so a
busy machine slows both alike; per image, the fastest of ``--repeats`` runs is kept and the
throughput is ``images / sum(fastest)``. Only ``raw()`` is timed (no final box NMS). The model
folder is ``$OBJCROP_BING_MODEL`` or ``<repo>/../shared/models/bing``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from objcrop_plugin.proposals.bing import BingGenerator, OpenCVBingGenerator


def _images(n: int, side: int) -> list[np.ndarray]:
    try:
        from objcrop_plugin.data.synthetic import render_scene

        return [np.asarray(render_scene(i, size=(side * 5 // 4, side)).image) for i in range(n)]
    except Exception:  # the demo data module is optional here
        rng = np.random.default_rng(0)
        out = []
        for _ in range(n):
            img = np.full((side, side * 5 // 4, 3), rng.integers(0, 255, 3), np.uint8)
            for _ in range(6):
                x, y = rng.integers(0, side, 2)
                img[y : y + side // 4, x : x + side // 3] = rng.integers(0, 255, 3)
            out.append(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--color-space", default="MAXBGR")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import cv2

        cv2.setNumThreads(args.threads)
    except ImportError:
        cv2 = None
    root = Path(__file__).resolve().parents[1]
    model = os.environ.get("OBJCROP_BING_MODEL") or str(root / ".." / "shared" / "models" / "bing")
    ours = BingGenerator(
        model, max_side=args.side, color_space=args.color_space, device=args.device,
        num_threads=args.threads,
    )
    gens = {"torch": ours}
    if cv2 is not None:
        gens["opencv"] = OpenCVBingGenerator(model, max_side=args.side, color_space=args.color_space)
    work = [ours.working_image(im) for im in _images(args.images, args.side)]
    runs = {(k, f): [float("inf")] * len(work) for k in gens for f in ("raw", "call")}
    for g in gens.values():  # warm-up: layouts, model loading
        g.raw(work[0])
    for _ in range(args.repeats):
        for i, w in enumerate(work):
            for (k, f), best in runs.items():
                fn = gens[k].raw if f == "raw" else gens[k]
                t = time.perf_counter()
                fn(w)
                best[i] = min(best[i], time.perf_counter() - t)
    shape = work[0].shape
    print(f"{len(work)} images {shape[1]}x{shape[0]}, {args.threads} thread(s), "
          f"colour space {args.color_space}, device {args.device}")
    for (k, f), v in runs.items():
        what = "raw() " if f == "raw" else "__call__ (raw + clip, box NMS, top-k)"
        print(f"{k:>7} {what}: {len(v) / sum(v):6.1f} images/s  ({1e3 * np.mean(v):.1f} ms/image)")


if __name__ == "__main__":
    main()
