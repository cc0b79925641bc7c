"""What does `objcrop train`'s data loader deliver on its own, without a model?

    python bench/train_loader.py RECIPE [key=value ...] [--batches 40] [--warmup 5]

Builds the training dataset and DataLoader exactly as ``objcrop train RECIPE key=value ...``
does (:func:`~objcrop_plugin.train.runner.build_dataset`,
:func:`~objcrop_plugin.train.runner.build_loader`: same workers, batch size, prefetch, pinned
memory) twice, with ``crop.engine=gpu`` (workers decode into canvases; the views are made on
the device, not timed here) and with ``crop.engine=cpu`` (workers make every view: the peer),
and times ``--batches`` batches after ``--warmup`` (the workers' start). Against a training
run's images/s (``results.json``), it says whether the loader or the step limits training.
Prints one line per engine and

    RESULT loader_gpu_engine_ips=<x> loader_cpu_engine_ips=<x> gpu_over_cpu=<x> workers=<n>
           batch=<n>
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch


def images_per_s(recipe: str, overrides: list[str], batches: int, warmup: int) -> tuple[float, Any]:
    from objcrop_plugin.train.config import load_recipe
    from objcrop_plugin.train.runner import build_dataset, build_loader

    cfg = load_recipe(recipe, overrides)
    dataset = build_dataset(cfg)
    loader = build_loader(cfg, dataset)
    it = iter(loader)
    n = 0
    t0 = time.perf_counter()
    for i in range(warmup + batches):
        if i == warmup:
            t0, n = time.perf_counter(), 0
        try:
            batch = next(it)
        except StopIteration:  # a short epoch: the next one
            it = iter(loader)
            batch = next(it)
        n += cfg.trainer.batch_size
    del batch
    return n / (time.perf_counter() - t0), cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value, as objcrop train takes them")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    if args.batches < 1 or args.warmup < 0:
        p.error("need --batches >= 1 and --warmup >= 0")
    keep = [o for o in args.overrides if not o.startswith("crop.engine=")]
    rates = {}
    cfg = None
    for engine in ("gpu", "cpu"):
        rates[engine], cfg = images_per_s(args.recipe, [*keep, f"crop.engine={engine}"],
                                          args.batches, args.warmup)
        print(f"crop.engine={engine}: {rates[engine]:.1f} images/s "
              f"({args.batches} batches of {cfg.trainer.batch_size}, "
              f"{cfg.data.num_workers} workers)", flush=True)
    print(f"RESULT loader_gpu_engine_ips={rates['gpu']:.1f} loader_cpu_engine_ips="
          f"{rates['cpu']:.1f} gpu_over_cpu={rates['gpu'] / rates['cpu']:.2f} "
          f"workers={cfg.data.num_workers} batch={cfg.trainer.batch_size} "
          f"torch_threads={torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
