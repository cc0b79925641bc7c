"""Checks of a recipe against the machine it is about to run on, before anything starts.

A view size that cannot fit in memory, more device processes than the machine has, or an
accelerator that is not there would otherwise surface minutes later as a ``MemoryError``, an
allocation traceback or a hang. :func:`check_machine` refuses them up front with a
:class:`~objcrop_plugin.train.config.RecipeError` that names the key, the limit and the fix.

Example:
    >>> from objcrop_plugin.train.config import load_recipe
    >>> from objcrop_plugin.train.resources import check_machine
    >>> check_machine(load_recipe("recipes/lightly/demo_simclr.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import RecipeConfig, RecipeError, recipe_params

__all__ = ["PREFETCH_FACTOR", "check_machine", "memory_available", "requested_devices"]

#: batches each DataLoader worker prepares ahead (the runner's ``prefetch_factor``)
PREFETCH_FACTOR = 4
#: share of the available memory that the batches in flight may take (the rest is for the
#: model, its activations and the operating system)
_MEMORY_SHARE = 0.5

_GB = 1024**3


def memory_available() -> int:
    """Bytes of memory this process can still use: ``MemAvailable``, capped by a cgroup limit
    (containers); the physical memory where neither is readable."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
            return 1 << 62
    for limit_file, used_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(used_file, encoding="ascii") as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            avail = min(avail, max(int(limit) - used, 0))
        break
    return int(avail)


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _accelerator(cfg: RecipeConfig) -> str:
    """``cuda``, ``mps``, ``cpu``, or the recipe's own name for anything else."""
    name = str(cfg.trainer.accelerator).lower()
    if name in ("auto", "gpu"):
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu" if name == "auto" else "gpu"
    return name


def requested_devices(devices: Any) -> int | None:
    """The number of devices ``trainer.devices`` asks for; ``None`` for ``auto`` / ``-1`` (all)."""
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text.lstrip("-").isdigit():
            devices = int(text)
        else:
            return None
    if isinstance(devices, int):
        return None if devices == -1 else devices
    return None


def _check_devices(cfg: RecipeConfig) -> str:
    t = cfg.trainer
    acc = _accelerator(cfg)
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RecipeError(
            f"trainer.accelerator: {t.accelerator!r} but torch sees no GPU on this machine "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). Fix: "
            "trainer.accelerator=cpu, or auto (a GPU when there is one, else the CPU)"
        )
    if acc == "mps" and not _mps_available():
        raise RecipeError(
            f"trainer.accelerator: {t.accelerator!r} but this machine has no Apple GPU (MPS). "
            "Fix: trainer.accelerator=cpu, or auto"
        )
    n = requested_devices(t.devices)
    if n is not None and n < 1:
        raise RecipeError(f"trainer.devices must be >= 1 (or auto), got {t.devices!r}")
    limits = {"cuda": (torch.cuda.device_count, "GPUs"), "mps": (lambda: 1, "Apple GPU"),
              "cpu": (_cpu_cores, "CPU cores")}
    if n is not None and acc in limits:
        count, what = limits[acc]
        have = int(count())
        if n > have:
            per = "one process per device" if acc == "cpu" else "one device per process"
            raise RecipeError(
                f"trainer.devices: {t.devices!r} asks for {n} {acc.upper()} devices ({per}) "
                f"but this machine has {have} {what}. Fix: trainer.devices={have} or fewer "
                "(or auto)"
            )
    return acc


def _views(cfg: RecipeConfig) -> list[tuple[int, int]]:
    from ..policies import make_recipe

    recipe = make_recipe(cfg.views, **recipe_params(cfg))
    return [(int(v.size[0]), int(v.size[1])) for v in recipe.views]


def _size_text(views: list[tuple[int, int]]) -> str:
    sizes = sorted(set(views), reverse=True)
    return " + ".join(
        f"{sum(1 for v in views if v == s)} x {s[0]}x{s[1]}" for s in sizes
    )


def _check_memory(cfg: RecipeConfig, acc: str, views: list[tuple[int, int]]) -> None:
    t, workers = cfg.trainer, cfg.data.num_workers
    view_bytes = sum(3 * h * w * 4 for h, w in views)  # float32 views of one sample
    batch = t.batch_size * view_bytes
    if cfg.crop.engine == "gpu":  # workers send uint8 canvases; views are cut on the device
        c = cfg.crop.canvas
        ch, cw = ((c, c) if isinstance(c, int) else tuple(c)) if c is not None else (
            2 * max(h for h, _ in views), 2 * max(w for _, w in views))
        host_batch = t.batch_size * 3 * int(ch) * int(cw)
    else:
        host_batch = batch
    in_flight = workers * PREFETCH_FACTOR + 2  # prefetched batches + the one being trained on
    need = host_batch * in_flight + (batch if acc == "cpu" and cfg.crop.engine == "gpu" else 0)
    avail = memory_available()
    if need > _MEMORY_SHARE * avail:
        key = "crop.canvas" if cfg.crop.engine == "gpu" and cfg.crop.canvas is not None else "crop.size"
        value = cfg.crop.canvas if key == "crop.canvas" else cfg.crop.size
        raise RecipeError(
            f"{key}: {value!r} is too large for this machine: one batch of views "
            f"({t.batch_size} x [{_size_text(views)}] px, float32) takes "
            f"{host_batch / _GB:.2f} GB, and with data.num_workers {workers} x "
            f"{PREFETCH_FACTOR} batches prefetched about {need / _GB:.1f} GB are in flight, "
            f"more than half of the {avail / _GB:.1f} GB of memory available. Fix: lower "
            f"{key} (or crop.params' local_size), trainer.batch_size or data.num_workers"
        )
    if acc == "cuda":
        total = min(torch.cuda.get_device_properties(i).total_memory
                    for i in range(torch.cuda.device_count()))
        if 2 * batch > total:  # the views and the first layer's output alone
            raise RecipeError(
                f"crop.size: {cfg.crop.size!r} is too large for the GPU: one batch of views "
                f"({t.batch_size} x [{_size_text(views)}] px, float32) takes "
                f"{batch / _GB:.2f} GB of the GPU's {total / _GB:.1f} GB before the network "
                "runs. Fix: lower crop.size or trainer.batch_size"
            )


def check_machine(cfg: RecipeConfig) -> str:
    """Refuse a recipe this machine cannot run: an accelerator that is not there, more devices
    than it has (``trainer.devices`` on a CPU is a process count, limited to the CPU cores),
    or views whose batches cannot fit in memory (``crop.size`` with ``trainer.batch_size`` and
    ``data.num_workers``; on a GPU also its memory).

    Returns:
        the accelerator the run will use (``cuda``, ``mps``, ``cpu`` or the recipe's name).

    Raises:
        RecipeError: naming the key, the machine's limit and the fix.
    """
    acc = _check_devices(cfg)
    _check_memory(cfg, acc, _views(cfg))
    return acc
