"""GPU view engine throughput against the CPU engine and torchvision, and its share of a step.

    python bench/gpu_views.py [--batch 256] [--iters 20] [--workers 8] [--device auto]
    python bench/gpu_views.py --batch 32 --iters 3     # a quick run on a CPU

Views: object-aware multi-crop, 2 global views of 224 px (scene crops) + 6 local views of
96 px (object crops), MoCo-v2 photometrics, on JPEGs of 640x480 from the embedded demo
generator (canvas 448 px). Measures, at batch ``--batch``:

1. the GPU engine's device stage (canvases already on the device): views/s, with PIL-style
   antialiasing (the default) and with plain bilinear sampling;
1b. the crop-and-resize alone, for the same windows (both view sizes, no flips, no
   photometrics), by five implementations: (a) the engine's antialiased matmul resampler;
   (b) Kornia's ``crop_by_transform_mat`` (the engine's ``antialias=False`` backend);
   (c) ``grid_sample`` (the other ``antialias=False`` backend); (d) torchvision's
   ``roi_align`` (all boxes of one size in one kernel, adaptive sampling ratio, aligned
   pixel centres; it neither clamps to the image nor antialiases beyond its bin averaging);
   (e) torchvision v2's ``resized_crop(antialias=True)``, view by view (integer boxes);
1c. the device stage by part, on the same batch: the parameter draw, the crop-and-resize of
   every view slot (flips folded in), and the photometric stage with normalisation alone and
   with each operation alone (colour jitter, grayscale, blur, solarisation; each timed on all
   rows, as the engine runs them) and all together; with ``--compile`` (default on CUDA) also
   the whole photometric stage under ``torch.compile`` (skipped, with the reason, when it
   cannot compile);
2. the GPU engine end to end: ``DeviceViewLoader`` over ``CanvasDataset`` with ``--workers``
   DataLoader workers (decoding to the canvas is then the part that runs on the CPU);
3. the CPU engine (``ObjectCropDataset`` in ``--workers`` DataLoader workers), the same views;
4. torchvision transforms v2 on the device, sample by sample (RandomResizedCrop, flip,
   ColorJitter, grayscale, blur, normalisation on each canvas tensor);
5. one ResNet-50 forward + backward + SGD step on the same views (timm, random init;
   bfloat16 autocast and channels-last on CUDA), and the engine's device time as a fraction
   of it.

The device is CUDA when available, else the CPU: then batch and iterations are shrunk (unless
given) and the run says so. The goal on an H100 is a device stage under 10% of the ResNet-50
step and at least 20,000 views/s. Prints a table, then the last line ``RESULT device=<name>
gpu_views_per_s=<x> cpu_views_per_s=<x> step_fraction=<x> matmul_views_per_s=<x>
kornia_views_per_s=<x> grid_views_per_s=<x> roi_align_views_per_s=<x>
tv2_loop_views_per_s=<x> stage_ms=<part>:<ms>,...`` (gpu_views_per_s: the device stage with
antialiasing; cpu_views_per_s: the CPU engine in workers; the next five: 1b's crop-and-resize
paths, ``nan`` when skipped; stage_ms: 1c's parts, ms per batch). Measures only; asserts
nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from objcrop_plugin.engine.datasets import (
    CanvasDataset,
    DeviceViewLoader,
    ObjectCropDataset,
    collate_canvas,
)
from objcrop_plugin.engine.device_photometric import PhotometricBatch, apply_photometric
from objcrop_plugin.engine.gpu import GPUViewEngine
from objcrop_plugin.engine.photometric import make_photometrics
from objcrop_plugin.engine.resample import default_backend, resample_windows

N_GLOBAL, N_LOCAL, GLOBAL, LOCAL = 2, 6, 224, 96
RECIPE = dict(views="multi_crop", n_global=N_GLOBAL, n_local=N_LOCAL, global_size=GLOBAL,
              local_size=LOCAL)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Seconds per call (mean over ``iters`` after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / max(iters, 1)


def loader_views_per_s(loader, n_views: int, batches: int) -> float:
    """views/s over ``batches`` batches, after the first (worker start-up is not throughput)."""
    it = iter(loader)
    next(it)
    count, start = 0, time.perf_counter()
    for i, (views, _, _) in enumerate(it):
        if views[0].is_cuda:
            torch.cuda.synchronize(views[0].device)
        count += views[0].shape[0] * n_views
        if i + 1 >= batches:
            break
    return count / (time.perf_counter() - start)


def torchvision_peer(canvas: torch.Tensor, valid: list[tuple[int, int]]) -> Callable[[], list]:
    """Lightly-style MoCo-v2 multi-crop with torchvision v2, one sample at a time, on the device."""
    from torchvision.transforms import v2

    p = make_photometrics("mocov2").globals_[0]
    ks = 2 * math.ceil(3 * p.blur_sigma[1]) + 1

    def pipeline(size: int, scale: tuple[float, float]) -> v2.Compose:
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomHorizontalFlip(p.hflip),
            v2.RandomApply([v2.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)],
                           p=p.jitter),
            v2.RandomGrayscale(p.grayscale),
            v2.RandomApply([v2.GaussianBlur(ks, sigma=p.blur_sigma)], p=p.blur),
            v2.Normalize(p.mean, p.std),
        ])

    glob, loc = pipeline(GLOBAL, (0.14, 1.0)), pipeline(LOCAL, (0.05, 0.4))

    def run() -> list:
        views: list[list[torch.Tensor]] = [[] for _ in range(N_GLOBAL + N_LOCAL)]
        for b, (w, h) in enumerate(valid):
            image = canvas[b, :, :h, :w]
            for v in range(N_GLOBAL + N_LOCAL):
                views[v].append((glob if v < N_GLOBAL else loc)(image))
        return [torch.stack(v) for v in views]

    return run


def resamplers(
    on_device: dict, batch_cpu: dict, device: torch.device
) -> dict[str, Callable[[], object]]:
    """The crop-and-resize of 1b: name -> a call making all ``N_GLOBAL + N_LOCAL`` views of the
    batch (uint8 canvases on the device; float conversion included where a path needs it)."""
    from torchvision.ops import roi_align
    from torchvision.transforms.v2 import functional as tvf

    canvas, windows, valid = on_device["canvas"], on_device["windows"], on_device["valid"]
    b = canvas.shape[0]
    groups = [((GLOBAL, GLOBAL), slice(0, N_GLOBAL)), ((LOCAL, LOCAL), slice(N_GLOBAL, None))]

    def ours(**kw) -> Callable[[], list]:
        return lambda: [resample_windows(canvas, windows[:, sl], size, valid, **kw)
                        for size, sl in groups]

    # roi_align's boxes: (K, 5) rows (batch index, x1, y1, x2, y2), view-major per size group
    index = torch.arange(b, device=device, dtype=torch.float32)
    rois = [torch.cat([index[None, :, None].expand(sl_n, b, 1),
                       windows[:, sl].transpose(0, 1)], -1).reshape(-1, 5)
            for sl_n, (_, sl) in zip((N_GLOBAL, N_LOCAL), groups)]

    def roi() -> list:
        src = canvas.to(torch.float32)
        return [roi_align(src, r, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
                for r, (size, _) in zip(rois, groups)]

    # torchvision v2 takes integer boxes: rounded on the host beforehand (not timed)
    boxes = [[(int(round(y1)), int(round(x1)), max(1, int(round(y2 - y1))),
               max(1, int(round(x2 - x1)))) for x1, y1, x2, y2 in row]
             for row in batch_cpu["windows"].tolist()]

    def loop() -> list:
        return [tvf.resized_crop(canvas[i], *box, [GLOBAL if v < N_GLOBAL else LOCAL] * 2,
                                 antialias=True)
                for i, row in enumerate(boxes) for v, box in enumerate(row)]

    return {
        "matmul": ours(antialias=True),
        "kornia": ours(antialias=False, backend="kornia"),
        "grid": ours(antialias=False, backend="grid"),
        "roi_align": roi,
        "tv2_loop": loop,
    }


def resnet_step(device: torch.device, views: list[torch.Tensor]) -> Callable[[], None]:
    import timm

    model = timm.create_model("resnet50", pretrained=False, num_classes=0).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    groups = [torch.cat(views[:N_GLOBAL]), torch.cat(views[N_GLOBAL:])]
    if cuda:
        groups = [g.contiguous(memory_format=torch.channels_last) for g in groups]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = sum(model(g).float().pow(2).mean() for g in groups)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def stage_parts(engine: GPUViewEngine, batch: dict, device: torch.device, iters: int,
                warmup: int, compile_photometric: bool) -> dict[str, float]:
    """Seconds per batch of each part of the engine's device stage (1c), on ``batch``. The
    parts need not add up to the stage: the photometric parameters of each view size are
    concatenated once, outside every part, and each operation is timed alone."""
    canvas, windows, valid = batch["canvas"], batch["windows"], batch.get("valid")
    seeds = batch.get("seed")
    if seeds is None:
        seeds = engine.new_seeds(canvas.shape[0], device)
    params = engine.draw(seeds)
    b = canvas.shape[0]
    groups = []  # (windows, size, photometric parameters) per output size, as render() makes them
    for size, idx in engine.groups.items():
        p = PhotometricBatch.cat([params[i] for i in idx])
        groups.append((torch.stack([windows[:, i] for i in idx], 1), size, p, len(idx)))

    def resample() -> list[torch.Tensor]:
        with torch.no_grad():
            return [resample_windows(canvas, w, size, valid, flip=p.flip.view(n, b),
                                     antialias=engine.antialias, dtype=engine._dtype)
                    for w, size, p, n in groups]

    views = resample()
    out = {"draw": timed(lambda: engine.draw(seeds), device, iters, warmup),
           "resample": timed(resample, device, iters, warmup)}

    def photometric(ops: frozenset[str] | None, fn=apply_photometric) -> Callable[[], list]:
        ps = [p if ops is None else dataclasses.replace(p, ops=ops) for _, _, p, _ in groups]

        def run() -> list[torch.Tensor]:
            with torch.no_grad():
                return [fn(v, q, flip=False) for v, q in zip(views, ps)]
        return run

    out["normalise"] = timed(photometric(frozenset()), device, iters, warmup)
    for op in ("jitter", "grayscale", "blur", "solarize"):
        present = frozenset().union(*(p.ops for _, _, p, _ in groups))
        ops = frozenset({op} | ({"hue"} & present if op == "jitter" else set()))
        if op in present:
            out[op] = timed(photometric(ops), device, iters, warmup)
    out["photometric"] = timed(photometric(None), device, iters, warmup)
    if compile_photometric:
        try:
            compiled = torch.compile(apply_photometric, dynamic=False)
            run = photometric(None, compiled)
            for _ in range(2):  # compile (once per view size), outside the timing
                run()
            out["photometric_compiled"] = timed(run, device, iters, warmup)
        except Exception as e:  # a missing compiler or backend: say so, measure the rest
            print(f"torch.compile of the photometric stage failed, not timed: "
                  f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 256 (CUDA) / 8 (CPU)")
    parser.add_argument("--iters", type=int, default=None, help="default 20 (CUDA) / 3 (CPU)")
    parser.add_argument("--step-iters", type=int, default=None,
                        help="ResNet-50 steps timed; default 10 (CUDA) / 1 (CPU)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--images", type=int, default=None,
                        help="distinct demo images, reused as needed; default 128 (CUDA) / 32 (CPU)")
    parser.add_argument("--canvas", type=int, default=2 * GLOBAL)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in this process (default: torch's)")
    parser.add_argument("--skip-torchvision", action="store_true",
                        help="skip the per-sample torchvision v2 pipeline (4)")
    parser.add_argument("--skip-resamplers", action="store_true",
                        help="skip the crop-and-resize comparison (1b)")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the photometric stage under torch.compile (1c); "
                             "default: on CUDA only")
    parser.add_argument("--work-dir", default=None, help="keep data here (default: a temp dir)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    want = args.device
    device = torch.device("cuda" if want == "auto" and torch.cuda.is_available() else
                          ("cpu" if want == "auto" else want))
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 8)
    iters = args.iters or (20 if cuda else 3)
    step_iters = args.step_iters or (10 if cuda else 1)
    warmup = 3 if cuda else 1
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device: {name}" + ("" if cuda else
          f" (no CUDA device: running on the CPU, batch {batch}, {iters} iterations, "
          f"{torch.get_num_threads()} threads; the goals are for an H100)"))

    from objcrop_plugin.data.synthetic import write_dataset

    tmp = tempfile.TemporaryDirectory(prefix="objcrop-bench-")
    work = Path(args.work_dir or tmp.name)
    t0 = time.perf_counter()
    demo = write_dataset(work / "demo", n_images=args.images or (128 if cuda else 32),
                         size=(640, 480), seed=0,
                         workers=min(2, os.cpu_count() or 1))
    print(f"demo data: {len(demo.keys)} JPEGs 640x480 ({time.perf_counter() - t0:.1f}s)")
    n_batches = iters + 1
    keys = (list(demo.keys) * math.ceil(batch * n_batches / len(demo.keys)))[: batch * n_batches]
    n_views = N_GLOBAL + N_LOCAL
    rows: list[tuple[str, float | None, float]] = []

    # 1. device stage: canvases already on the device
    ds = CanvasDataset(demo.root, demo.proposals_path, canvas=args.canvas, seed=0, keys=keys,
                       **RECIPE)
    batch_cpu = collate_canvas([ds[i] for i in range(batch)])
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch_cpu.items()}
    engines = {}
    for antialias in (True, False):
        engine = GPUViewEngine.from_recipe(ds.recipe, photometrics="mocov2", antialias=antialias,
                                             seed=0)
        engines[antialias] = engine
        sec = timed(lambda e=engine: e.transform_batch(on_device), device, iters, warmup)
        label = "antialias" if antialias else "bilinear"
        rows.append((f"GPU engine, device stage ({label})", sec, batch * n_views / sec))
    engine_sec = rows[0][1]
    assert engine_sec is not None

    # 1b. crop-and-resize alone, the same windows, five implementations
    per_path: dict[str, float] = {}
    if not args.skip_resamplers:
        labels = {
            "matmul": "resize only: matmul (antialias, engine)",
            "kornia": "resize only: Kornia crop_by_transform_mat",
            "grid": "resize only: grid_sample (clamped)",
            "roi_align": "resize only: torchvision roi_align",
            "tv2_loop": "resize only: tv v2 resized_crop, per view",
        }
        for key, fn in resamplers(on_device, batch_cpu, device).items():
            if key == "kornia" and default_backend() != "kornia":
                print("kornia is not installed: no Kornia row")
                continue
            loop = key == "tv2_loop"
            sec = timed(fn, device, max(1, iters // 4) if loop else iters, 1 if loop else warmup)
            per_path[key] = batch * n_views / sec
            rows.append((labels[key], sec, per_path[key]))

    # 1c. the device stage by part
    compile_photometric = cuda if args.compile is None else args.compile
    parts = stage_parts(engines[True], on_device, device, iters, warmup, compile_photometric)
    for key, sec in parts.items():
        rows.append((f"device stage part: {key}", sec, batch * n_views / sec))

    # 2. end to end through the workers
    loader = DataLoader(ds, batch_size=batch, num_workers=args.workers, collate_fn=collate_canvas,
                        pin_memory=cuda, prefetch_factor=4 if args.workers else None,
                        persistent_workers=False)
    vps = loader_views_per_s(DeviceViewLoader(loader, engines[True], device), n_views, iters)
    rows.append((f"GPU engine + loader ({args.workers} workers)", None, vps))

    # 3. the CPU engine in workers
    cpu_ds = ObjectCropDataset(demo.root, demo.proposals_path, photometrics="mocov2", seed=0,
                               keys=keys, **RECIPE)
    cpu_loader = DataLoader(cpu_ds, batch_size=batch, num_workers=args.workers,
                            prefetch_factor=4 if args.workers else None)
    cpu_vps = loader_views_per_s(cpu_loader, n_views, iters)
    rows.append((f"CPU engine ({args.workers} workers)", None, cpu_vps))

    # 4. torchvision v2, per sample on the device
    if not args.skip_torchvision:
        valid = [tuple(int(x) for x in v) for v in batch_cpu["valid"].tolist()]
        peer = torchvision_peer(on_device["canvas"], valid)
        sec = timed(peer, device, max(1, iters // 4), 1)
        rows.append(("torchvision v2 on the device, per sample", sec, batch * n_views / sec))

    # 5. ResNet-50 step on the same views
    step_sec = math.nan
    if not args.skip_step:
        views = engines[True].transform_batch(on_device)[0]
        try:
            step_sec = timed(resnet_step(device, views), device, step_iters, 1 if cuda else 0)
            rows.append(("ResNet-50 forward+backward step", step_sec, batch * n_views / step_sec))
        except torch.OutOfMemoryError:
            print("ResNet-50 step: out of memory at this batch; use --batch to lower it")

    print(f"\nbatch {batch}: {N_GLOBAL} x {GLOBAL} + {N_LOCAL} x {LOCAL} views = "
          f"{batch * n_views} views per batch, canvas {args.canvas}")
    print(f"{'':<44}{'ms/batch':>10}{'views/s':>12}")
    for label, sec, rate in rows:
        ms = f"{sec * 1e3:>10.1f}" if sec is not None else f"{'-':>10}"
        print(f"{label:<44}{ms}{rate:>12.0f}")
    fraction = engine_sec / step_sec if step_sec == step_sec else math.nan
    print(f"engine device time / ResNet-50 step: {fraction:.3f} "
          "(goal on an H100: < 0.10, and >= 20,000 views/s)")
    paths = " ".join(f"{key}_views_per_s={per_path.get(key, math.nan):.0f}"
                     for key in ("matmul", "kornia", "grid", "roi_align", "tv2_loop"))
    print(
        f"RESULT device={name.replace(' ', '_')} gpu_views_per_s={rows[0][2]:.0f} "
        f"cpu_views_per_s={cpu_vps:.0f} step_fraction={fraction:.3f} {paths} "
        "stage_ms=" + ",".join(f"{k}:{v * 1e3:.2f}" for k, v in parts.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
