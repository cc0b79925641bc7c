"""The GPU view engine: canvases + crop windows -> object-aware views, batched on the device.

The CPU engine (:mod:`objcrop_plugin.engine.cpu`) cuts, resizes and augments every view in the
DataLoader workers, which is where SSL training usually runs out of CPU. This engine splits the
work: the workers only decode each image onto a fixed canvas and plan the windows
(:class:`~objcrop_plugin.engine.datasets.CanvasDataset`, the same windows as the CPU engine);
after the batch reached the device, :class:`GPUViewEngine` makes the views. For each group of
view slots of one output size:

1. one batched crop-and-resize of all ``B x V`` windows
   (:func:`~objcrop_plugin.engine.resample.resample_windows`: PIL's antialiased bilinear
   ``resize(box=...)`` as two matrix products, horizontal flips folded into the weights;
   with ``antialias=False``, Kornia's box cropping ``crop_by_transform_mat``, clamped to the
   image);
2. the method's photometric augmentations with per-sample parameters drawn from each sample's
   seed (:mod:`objcrop_plugin.engine.device_photometric`), then normalisation.

A sample's views depend only on ``(seed, epoch, index, rank)``, never on the batch it landed
in. Host synchronisation: none. Nothing is read back from the device in the resampling, the
parameter draws or the photometrics (tested: no ``.item()``, ``.tolist()`` or truth value of a
tensor during an engine call, and on CUDA under ``torch.cuda.set_sync_debug_mode("error")``),
so the host can queue the next batch while the device works.

Agreement with the CPU engine (photometrics off, same windows, image no larger than the canvas):
within PIL's 8-bit rounding, about 1/255 (tested: mean absolute difference < 0.5/255, maximum
<= 3/255). When the canvas is smaller than the image the views are cut from the shrunk canvas:
sharper detail than the canvas holds is lost (choose the canvas about twice the global view
size, the default).

Wiring:

- plain PyTorch or lightly loops: :class:`~objcrop_plugin.engine.datasets.DeviceViewLoader`
  wraps the DataLoader and yields ``(views, targets, filenames)`` already on the device;
- Lightning: :func:`apply_gpu_views` (or :class:`GPUViewsMixin`) in the module's
  ``on_after_batch_transfer``; ``objcrop train`` with ``crop.engine: gpu`` and
  ``objcrop-solo`` use it that way.

This module also re-exports the worker-side names of the README's example
(``CanvasDataset``, ``DeviceViewLoader``, ``collate_canvas``), so one import gives the pipeline.

Example:
    >>> from torch.utils.data import DataLoader
    >>> from objcrop_plugin.engine.gpu import (
    ...     CanvasDataset, DeviceViewLoader, GPUViewEngine, collate_canvas)
    >>> ds = CanvasDataset("images/", "train.objcrop", views="obj_obj_dilate")  # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=256, num_workers=8, pin_memory=True,
    ...                     collate_fn=collate_canvas)  # doctest: +SKIP
    >>> engine = GPUViewEngine.from_recipe(ds.recipe, photometrics="mocov2")  # doctest: +SKIP
    >>> for views, targets, keys in DeviceViewLoader(loader, engine, "cuda"):  # doctest: +SKIP
    ...     x0, x1 = views

References:
    - Mishra et al., "Object-aware Cropping for Self-Supervised Learning", TMLR 2022,
      https://arxiv.org/abs/2112.00319
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._random import SEED_HIGH, counter_uniforms, distributed_rank
from ..policies import ViewRecipe, make_recipe
from .datasets import CANVAS_KEYS, CanvasDataset, DeviceViewLoader, collate_canvas, is_canvas_batch
from .device_photometric import N_DRAWS, PhotometricBatch, apply_photometric, draw_photometric
from .photometric import Photometric, PhotometricSet, make_photometrics
from .resample import resample_windows

__all__ = [
    "GPUViewEngine",
    "GPUViewsMixin",
    "apply_gpu_views",
    # the worker side (objcrop_plugin.engine.datasets), under the README's import path
    "CanvasDataset",
    "DeviceViewLoader",
    "collate_canvas",
]

_PRECISIONS = {"auto": None, "float32": torch.float32, "float16": torch.float16,
               "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class _Slot:
    index: int
    size: tuple[int, int]
    local: bool
    photometric: Photometric


def _view_size(size: Any) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, both at least 1."""
    try:
        h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(s) for s in size)
        h, w = int(h), int(w)
    except Exception as exc:
        raise ValueError(f"a view size is an int or (height, width), got {size!r}") from exc
    if h < 1 or w < 1:
        raise ValueError(f"view sizes must be at least 1 x 1 pixels, got {size!r}")
    return h, w


class GPUViewEngine:
    """Turns a batch of canvases and crop windows into views, on the device.

    The engine needs only each view slot's output size and whether it is a global or a local
    view (which photometrics it gets); the windows come from
    :class:`~objcrop_plugin.engine.datasets.CanvasDataset`, which planned them with the
    recipe. :meth:`from_recipe` builds the engine from that recipe.

    Args:
        view_sizes: ``(height, width)`` (or one int) per view slot, in the windows' order
            (globals first, as recipes order them).
        local: per slot, whether it is a local view; default: all global.
        photometrics: preset name, :class:`Photometric` or :class:`PhotometricSet` (as the
            CPU engine). Global slot ``g`` gets the set's ``g``-th global augmentation (BYOL's
            asymmetric pair), local slots the local one.
        antialias: PIL ``BILINEAR`` crop-and-resize semantics (the CPU engine's); ``False``:
            plain bilinear sampling (Kornia's ``crop_by_transform_mat`` when kornia is
            installed, else ``grid_sample``), faster on large canvases, aliased when shrinking
            a lot.
        seed: seeds the engine's own generator, used only for batches without per-sample
            seeds; ``None``: torch's default generator of the device.
        precision: ``"auto"`` (float16 matmuls on CUDA, float32 elsewhere), ``"float32"``,
            ``"float16"`` or ``"bfloat16"``. Photometrics always run in float32.

    Input to this engine (``__call__``):
        canvas ``uint8 (B, 3, H, W)`` on the device, windows ``(B, V, 4)`` in canvas pixels,
        optionally per-sample ``seeds`` int64 ``(B,)`` and ``valid`` ``(B, 2)``.

    Output of this engine:
        a list of ``V`` float32 tensors ``(B, 3, h_v, w_v)``, in slot order, normalised.

    Applies by default: the MoCo-v2 photometrics (flip, colour jitter 0.4/0.4/0.4/0.1 p=0.8,
    grayscale 0.2, blur p=0.5) and ImageNet normalisation.

    Example:
        >>> engine = GPUViewEngine([(32, 32), (32, 32)], photometrics="none")
        >>> canvas = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
        >>> windows = torch.tensor([0.0, 0.0, 48.0, 40.0]).expand(4, 2, 4)
        >>> [tuple(v.shape) for v in engine(canvas, windows, seeds=torch.arange(4))]
        [(4, 3, 32, 32), (4, 3, 32, 32)]
        >>> GPUViewEngine.from_recipe("multi_crop", n_local=2, photometrics="byol")
        GPUViewEngine(view_sizes=[(224, 224), (224, 224), (96, 96), (96, 96)], local=[False, False, True, True], photometrics='byol', antialias=True)
    """

    def __init__(
        self,
        view_sizes: Sequence[int | Sequence[int]],
        local: Sequence[bool] | None = None,
        photometrics: str | Photometric | PhotometricSet = "mocov2",
        antialias: bool = True,
        seed: int | None = None,
        precision: str = "auto",
    ) -> None:
        if isinstance(view_sizes, (str, ViewRecipe)):
            raise TypeError(
                f"GPUViewEngine takes view sizes, got the recipe {view_sizes!r}. Fix: "
                "GPUViewEngine.from_recipe(recipe, photometrics=...)"
            )
        sizes = [_view_size(s) for s in view_sizes]
        if not sizes:
            raise ValueError("GPUViewEngine needs at least one view size")
        flags = [False] * len(sizes) if local is None else [bool(v) for v in local]
        if len(flags) != len(sizes):
            raise ValueError(f"{len(sizes)} view sizes but {len(flags)} local flags")
        self.photometrics = make_photometrics(photometrics)
        self.antialias = bool(antialias)
        if seed is not None and int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self._dtype = _PRECISIONS[precision]
        slots, g = [], 0
        for i, (size, is_local) in enumerate(zip(sizes, flags)):
            slots.append(_Slot(i, size, is_local, self.photometrics.for_view(g, is_local)))
            g += 0 if is_local else 1
        self.slots: list[_Slot] = slots
        groups: dict[tuple[int, int], list[int]] = {}
        for s in slots:
            groups.setdefault(s.size, []).append(s.index)
        self.groups = groups
        self._generators: dict[torch.device, torch.Generator] = {}

    @classmethod
    def from_recipe(
        cls,
        views: Any = "obj_obj_dilate",
        photometrics: str | Photometric | PhotometricSet = "mocov2",
        antialias: bool = True,
        seed: int | None = None,
        precision: str = "auto",
        **recipe_kwargs: Any,
    ) -> GPUViewEngine:
        """The engine for a view recipe's slots: its view sizes and global/local split.

        ``views``: a :class:`~objcrop_plugin.policies.ViewRecipe` (e.g. ``dataset.recipe``),
        or anything :func:`~objcrop_plugin.policies.make_recipe` takes with ``recipe_kwargs``
        (``"multi_crop", n_local=6``). The other arguments are :class:`GPUViewEngine`'s.
        """
        recipe = make_recipe(views, **recipe_kwargs)
        return cls(
            [v.size for v in recipe.views], [v.local for v in recipe.views],
            photometrics=photometrics, antialias=antialias, seed=seed, precision=precision,
        )

    @property
    def view_sizes(self) -> list[tuple[int, int]]:
        return [s.size for s in self.slots]

    @property
    def local(self) -> list[bool]:
        return [s.local for s in self.slots]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(view_sizes={self.view_sizes}, local={self.local}, "
                f"photometrics={self.photometrics.name!r}, antialias={self.antialias})")

    # -- randomness

    def new_seeds(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Per-sample seeds for a batch that brings none (the engine's or torch's generator)."""
        device = torch.device(device)
        if self.seed is None:
            return torch.randint(0, SEED_HIGH, (n,), device=device, dtype=torch.int64)
        gen = self._generators.get(device)
        if gen is None:
            entropy = np.random.SeedSequence([self.seed, distributed_rank()]).generate_state(2)
            gen = torch.Generator(device=device)
            gen.manual_seed(int(entropy[0]) << 31 ^ int(entropy[1]))
            self._generators[device] = gen
        return torch.randint(0, SEED_HIGH, (n,), device=device, dtype=torch.int64, generator=gen)

    def draw(self, seeds: torch.Tensor) -> list[PhotometricBatch]:
        """Each view slot's photometric parameters for samples with these seeds ``(B,)``."""
        u = counter_uniforms(seeds, len(self.slots), N_DRAWS)
        return [draw_photometric(s.photometric, u[:, s.index]) for s in self.slots]

    # -- kernels

    def render(
        self,
        canvas: torch.Tensor,
        windows: torch.Tensor,
        params: Sequence[PhotometricBatch],
        valid: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The views for given photometric parameters (deterministic); see :meth:`__call__`."""
        n_slots = len(self.slots)
        if windows.dim() != 3 or windows.shape[1] != n_slots:
            raise ValueError(
                f"this engine has {n_slots} view slots but the windows have shape "
                f"{tuple(windows.shape)} (need (B, {n_slots}, 4)). Fix: build the canvas dataset "
                "and this engine from the same recipe (GPUViewEngine.from_recipe(dataset.recipe))"
            )
        if len(params) != n_slots:
            raise ValueError(f"{len(params)} photometric parameter sets for {n_slots} views")
        out: list[torch.Tensor | None] = [None] * n_slots
        b = canvas.shape[0]
        with torch.no_grad(), torch.autocast(canvas.device.type, enabled=False):
            for size, idx in self.groups.items():
                p = PhotometricBatch.cat([params[i] for i in idx])
                # a stack of basic indexing: indexing a CUDA tensor with a list would copy the
                # list to the device and wait for the queued work
                group = torch.stack([windows[:, i] for i in idx], 1)
                views = resample_windows(
                    canvas, group, size, valid,
                    flip=p.flip.view(len(idx), b), antialias=self.antialias, dtype=self._dtype,
                )
                views = apply_photometric(views, p, flip=False)
                for j, tensor in zip(idx, views.split(b)):
                    out[j] = tensor
        return out  # type: ignore[return-value]

    def __call__(
        self,
        canvas: torch.Tensor,
        windows: torch.Tensor,
        seeds: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Views of a canvas batch: one ``(B, 3, h, w)`` float32 tensor per view, globals first.

        Args:
            canvas: ``uint8 (B, 3, H, W)`` (float canvases are taken as ``[0, 1]``).
            windows: ``(B, V, 4)`` xyxy in canvas pixels.
            seeds: int64 ``(B,)`` per-sample photometric seeds (:class:`CanvasDataset` gives
                them); ``None``: drawn with :meth:`new_seeds`.
            valid: ``(B, 2)`` width/height of each image in its canvas (default: all).
        """
        if canvas.dim() != 4 or canvas.shape[1] != 3:
            raise ValueError(f"canvas must be (B, 3, H, W), got {tuple(canvas.shape)}")
        if seeds is None:
            seeds = self.new_seeds(canvas.shape[0], canvas.device)
        return self.render(canvas, windows, self.draw(seeds.to(canvas.device)), valid)

    def transform_batch(self, batch: Mapping[str, Any]) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
        """A collated canvas batch on the device -> lightly's ``(views, targets, filenames)``."""
        if not is_canvas_batch(batch):
            raise TypeError(
                f"expected a canvas batch (a dict with {CANVAS_KEYS}), got {type(batch).__name__}. "
                "Fix: load CanvasDataset with collate_fn=collate_canvas"
            )
        canvas = batch["canvas"]
        views = self(canvas, batch["windows"], seeds=batch.get("seed"), valid=batch.get("valid"))
        targets = batch.get("target")
        if not isinstance(targets, torch.Tensor):
            targets = torch.as_tensor(
                targets if targets is not None else [0] * canvas.shape[0], dtype=torch.int64
            )
        return views, targets.to(canvas.device), list(batch.get("key", []))


def apply_gpu_views(engine: GPUViewEngine, batch: Any) -> Any:
    """Canvas batches become ``(views, targets, filenames)``; any other batch passes through.

    For a LightningModule's ``on_after_batch_transfer(batch, dataloader_idx)``, which Lightning
    calls once the batch is on the device: ``objcrop train`` (``crop.engine: gpu``) sets its
    module's ``batch_transform`` to ``lambda batch: apply_gpu_views(engine, batch)``, and
    ``objcrop-solo`` overrides the solo-learn method's hook with it.
    """
    return engine.transform_batch(batch) if is_canvas_batch(batch) else batch


class GPUViewsMixin:
    """Mixin for a LightningModule: views made on the device after each batch transfer.

    List it before the LightningModule base and set ``self.gpu_views`` to a
    :class:`GPUViewEngine`; canvas batches then reach ``training_step`` as lightly's
    ``(views, targets, filenames)``, other batches unchanged.

    Example:
        >>> import pytorch_lightning as pl  # doctest: +SKIP
        >>> class Model(GPUViewsMixin, pl.LightningModule):  # doctest: +SKIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gpu_views = GPUViewEngine.from_recipe("obj_obj_dilate", photometrics="mocov2")
    """

    gpu_views: GPUViewEngine | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        parent = getattr(super(), "on_after_batch_transfer", None)
        if parent is not None:
            batch = parent(batch, dataloader_idx)
        return apply_gpu_views(self.gpu_views, batch) if self.gpu_views is not None else batch
