"""What does an online proposal refresh cost, as a fraction of a training epoch?

    python bench/online_refresh.py [--device cpu|cuda] [--images 32] [--batch 8]

Per image, on the same device and in the same run: one training step of the method (forward
and backward of every view, the momentum encoder's forward where there is one) against one
refresh (the heat-map generator's forward at its working resolution, upsampling, connected
components, scoring, NMS). An epoch and a refresh both see every training image once, so the
ratio of the two per-image times is the refresh's share of an epoch; decoding is left out of
both (DataLoader workers do it in parallel, and a refresh decodes at a lower resolution). The
refresh runs on the demo's synthetic scenes (objects on a cluttered background) rendered at
its working size, with an untrained network.

Three settings:

- ``paper``: MoCo-v2, ResNet-50, 2 views of 224 px (the paper's); the refresh runs ResNet-50
  on 4:3 photos at ``--max-side`` (default 256) long side, ``level: auto``;
- ``paper+seg``: the same with the demo's colour segments as extra candidates and its
  ``feature*heat`` score (``segments``, segmented at the working size);
- ``demo``: SimCLR, ``test_efficientnet``, 2 views of 48 px, batch 128 (``objcrop demo``); the
  refresh runs at 2x the 128x96 scenes (the demo's online runs' ``ONLINE_HEATMAP_PARAMS``).

With segments, a run's first refresh segments every image and the later ones reuse the boxes
(the generator's segment cache): both are timed (``, 2nd`` row, ``*_later_fraction``).

The refresh's host part (the segmentation, and the connected components of the heat maps
where they run on the host: ``--components``, by default on the device when it is a GPU; the
network, the whitening and the box scores run on the device) is also timed alone: on a GPU it
is the floor of the refresh's cost. On a GPU the paper's setting is also timed with the
components on the host (``paper_host_components_fraction``), the peer of the device's. The
training step runs as ``objcrop train`` runs it on that device (bf16 autocast and channels-last
on a GPU, float32 on a CPU; ``--precision``). Prints per-image milliseconds and one line

    RESULT paper_refresh_fraction=<x> paper_segments_fraction=<x> demo_refresh_fraction=<x>
           paper_host_fraction=<x> paper_segments_host_fraction=<x> demo_host_fraction=<x>
           paper_host_components_fraction=<x> paper_segments_later_fraction=<x> device=<d>
           components=<where> precision=<p>
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _timed(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def train_ms_per_image(method: str, model: str, view: int, batch: int, device: str,
                       repeat: int, bf16: bool = False) -> float:
    from objcrop_plugin.backbones import create_backbone
    from objcrop_plugin.train.methods import make_method

    torch.manual_seed(0)
    net = create_backbone(model)
    params = {"memory_bank_size": 1024} if method == "mocov2" else {}
    module = make_method(method, net, params, n_global=2, batch_size=batch).to(device)
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)
    views = [torch.randn(batch, 3, view, view, device=device) for _ in range(2)]
    if bf16:  # as objcrop train with precision bf16-mixed and backbone.channels_last
        module = module.to(memory_format=torch.channels_last)
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    module.train()

    def step() -> None:  # training_step without Lightning's logging: the method's loss
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            loss = module.ssl_loss(list(views))
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return 1000 * _timed(step, repeat) / batch


def refresh_ms_per_image(model: str, work_hw: tuple[int, int], params: dict, n: int,
                         device: str, repeat: int) -> tuple[float, float]:
    """Milliseconds per image of a whole refresh, and of its host-side part: the connected
    components of the heat maps and, with ``segments``, the colour segmentation (everything
    else runs on ``device``; on a GPU the host part is what remains of the refresh's cost)."""
    from objcrop_plugin.backbones import create_backbone
    from objcrop_plugin.data.synthetic import render_scene
    from objcrop_plugin.proposals.heatmap import (
        SEGMENT_CACHE,
        HeatmapGenerator,
        cached_segment_boxes,
        candidate_boxes,
    )

    torch.manual_seed(0)
    net = create_backbone(model).to(device)
    gen = HeatmapGenerator(module=net, batch_size=n, **params)
    # the demo's scenes (objects on a cluttered background) at the working size: pixel noise
    # would give the connected components and the scores several times a scene's boxes
    works = [np.asarray(render_scene(i, size=(work_hw[1], work_hw[0])).image) for i in range(n)]
    sizes = [(work_hw[1] * 4, work_hw[0] * 4)] * n

    SEGMENT_CACHE.clear()  # with segment_cache, the warm-up fills it: a later refresh's cost

    def run() -> None:
        gen.propose_working(works, sizes)
        if device == "cuda":
            torch.cuda.synchronize()

    maps = gen.heat_maps(works)

    def host() -> None:
        for m, work in zip(maps, works):
            if not gen.components_on_device:
                candidate_boxes(m, gen.thresholds, gen.min_area)
            if gen.segments:
                cached_segment_boxes(work, gen.segments, gen.segment_side, gen._segment_cache)

    return 1000 * _timed(run, repeat) / n, 1000 * _timed(host, repeat) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=16, help="images per refresh batch")
    p.add_argument("--batch", type=int, default=8, help="training batch (paper setting)")
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--components", default="auto", choices=("auto", "host", "device"),
                   help="where the heat maps' connected components run (default: the device "
                        "when it is a GPU)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "32"),
                   help="the training step's: bf16 autocast + channels-last, or float32 "
                        "(default: bf16 on a GPU)")
    args = p.parse_args(argv)
    dev = args.device
    bf16 = args.precision == "bf16" or (args.precision == "auto" and dev.startswith("cuda"))
    on = {"components": args.components}

    side = args.max_side
    paper_train = train_ms_per_image("mocov2", "resnet50", 224, args.batch, dev, args.repeat,
                                     bf16)
    paper_refresh, paper_host = refresh_ms_per_image(
        "resnet50", (side * 3 // 4, side), {"max_side": side, **on}, args.images, dev,
        args.repeat)
    on_device = args.components == "device" or (args.components == "auto"
                                                 and dev.startswith("cuda"))
    paper_hostcc = paper_refresh  # the peer: the same refresh with the components on the host
    if on_device:
        paper_hostcc, _ = refresh_ms_per_image(
            "resnet50", (side * 3 // 4, side), {"max_side": side, "components": "host"},
            args.images, dev, args.repeat)
    from objcrop_plugin.demo import HEATMAP_PARAMS, ONLINE_HEATMAP_PARAMS

    seg = {k: HEATMAP_PARAMS[k] for k in ("segments", "score")}
    cold = {"segment_cache": False}  # the first refresh of a run: every image segmented
    paper_seg, paper_seg_host = refresh_ms_per_image(
        "resnet50", (side * 3 // 4, side), {"max_side": side, **seg, **on, **cold}, args.images,
        dev, args.repeat)
    paper_seg_warm, _ = refresh_ms_per_image(
        "resnet50", (side * 3 // 4, side), {"max_side": side, **seg, **on}, args.images, dev,
        args.repeat)

    demo_train = train_ms_per_image("simclr", "test_efficientnet", 48, 128, dev, args.repeat,
                                    bf16)
    demo_refresh, demo_host = refresh_ms_per_image(
        "test_efficientnet", (96, 128), {**ONLINE_HEATMAP_PARAMS, **on}, 128, dev, args.repeat)
    where = "device" if on_device else "host"
    print(f"device {dev}, torch threads {torch.get_num_threads()}, training step "
          f"{'bf16' if bf16 else 'float32'}, connected components on the {where}")
    print(f"{'setting':<16}{'train ms/img':>12}{'refresh ms/img':>16}{'of it host':>12}"
          f"{'fraction':>10}")
    rows = [("paper", paper_train, paper_refresh, paper_host),
            ("paper+seg", paper_train, paper_seg, paper_seg_host),
            ("paper+seg, 2nd", paper_train, paper_seg_warm, float("nan")),
            ("demo", demo_train, demo_refresh, demo_host)]
    if on_device:
        rows.insert(1, ("paper, host cc", paper_train, paper_hostcc, float("nan")))
    for name, t, r, h in rows:
        print(f"{name:<16}{t:>12.2f}{r:>16.2f}{h:>12.2f}{r / t:>10.3f}")
    print(f"RESULT paper_refresh_fraction={paper_refresh / paper_train:.3f} "
          f"paper_segments_fraction={paper_seg / paper_train:.3f} "
          f"demo_refresh_fraction={demo_refresh / demo_train:.3f} "
          f"paper_host_fraction={paper_host / paper_train:.3f} "
          f"paper_segments_host_fraction={paper_seg_host / paper_train:.3f} "
          f"demo_host_fraction={demo_host / demo_train:.3f} "
          f"paper_host_components_fraction={paper_hostcc / paper_train:.3f} "
          f"paper_segments_later_fraction={paper_seg_warm / paper_train:.3f} device={dev} "
          f"components={where} precision={'bf16' if bf16 else '32'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
