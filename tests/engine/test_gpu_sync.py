"""No device-to-host synchronisation in a GPU engine call, and the blur that makes it so.

A read-back (``.item()``, ``.tolist()``, the truth value or ``int``/``float`` of a tensor,
``.cpu()``, ``.numpy()``) of a CUDA tensor waits for all queued work: once per batch, it
keeps the host from queueing the next batch while the device works. On the CPU every tensor
is "on the device", so the engine code must contain none: the test counts them (Python-level
calls, patched on ``torch.Tensor``). On CUDA, ``torch.cuda.set_sync_debug_mode("error")``
also catches synchronisations inside torch's kernels (``nonzero``, boolean indexing, ...).

The blur is :func:`~objcrop_plugin.engine.device_photometric.gaussian_blur` (Kornia's
``gaussian_blur2d`` checks its sigmas on the host); oracle: Kornia itself, < 1e-5.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from objcrop_plugin.engine.datasets import CanvasDataset, collate_canvas
from objcrop_plugin.engine.device_photometric import gaussian_blur
from objcrop_plugin.engine.gpu import GPUViewEngine

pytestmark = pytest.mark.usefixtures("one_thread")

#: the tensor methods that read a tensor back to the host
READ_BACKS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@pytest.mark.parametrize("border", ["replicate", "reflect"])
@pytest.mark.parametrize("kernel_size", [3, 13, 23])
def test_blur_matches_kornias_gaussian_blur2d(kernel_size, border):
    kornia = pytest.importorskip("kornia")
    gen = torch.Generator().manual_seed(kernel_size)
    x = torch.rand(7, 3, 24, 29, generator=gen)
    sigma = torch.cat([torch.rand(5, generator=gen) * 3.9 + 0.1, torch.tensor([1e-3, 2.0])])
    ours = gaussian_blur(x, sigma, kernel_size, border)
    ref = kornia.filters.gaussian_blur2d(x, (kernel_size, kernel_size),
                                         sigma[:, None].expand(-1, 2), border_type=border)
    assert ours.shape == x.shape and ours.dtype == x.dtype
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()


def test_blur_with_a_zero_sigma_or_a_one_tap_kernel_is_the_identity():
    x = torch.rand(2, 3, 8, 9)
    assert torch.allclose(gaussian_blur(x, torch.zeros(2), 5), x)
    assert torch.equal(gaussian_blur(x, torch.ones(2), 1), x)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(x, torch.ones(2), 4)


@contextmanager
def count_read_backs() -> Iterator[list[str]]:
    """Patch :data:`READ_BACKS` on ``torch.Tensor`` with counting wrappers; yields the list of
    calls (the method and the innermost frame outside torch), restored on exit."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            calls.append(f"{name} at {where}")
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_counter_sees_read_backs():
    t = torch.ones(3)
    with count_read_backs() as calls:
        bool(t.sum() > 0), float(t[0]), t.tolist(), int(t[1]), t[0].item()
    assert [c.split(" ")[0] for c in calls] == ["__bool__", "__float__", "tolist", "__int__", "item"]
    assert torch.Tensor.item is not None and bool(t[0])  # restored


def canvas_batch(demo_data):
    demo = demo_data()  # 12 scenes of 96 x 72 with proposals (shared with other tests)
    ds = CanvasDataset(demo.root, demo.proposals_path, views="multi_crop", canvas=64, seed=5,
                       keys=list(demo.keys[:8]), n_global=2, n_local=2, global_size=32,
                       local_size=16)
    return ds, collate_canvas([ds[i] for i in range(8)])


@pytest.mark.parametrize(("preset", "antialias"),
                         [("byol", True), ("simclr", True), ("byol", False), ("mocov2", False)])
def test_an_engine_call_reads_nothing_back(demo_data, preset, antialias):
    """Blur (BYOL's first view always blurs), solarisation, jitter, grayscale, both
    resampling paths (antialias=False: the Kornia backend where installed)."""
    ds, batch = canvas_batch(demo_data)
    engine = GPUViewEngine.from_recipe(ds.recipe, photometrics=preset, antialias=antialias)
    assert any("blur" in p.ops for p in engine.draw(batch["seed"]))
    engine.transform_batch(batch)  # warm-up: lazy imports (kornia) happen outside the count
    with count_read_backs() as calls:
        views, targets, keys = engine.transform_batch(batch)
        engine(batch["canvas"], batch["windows"], valid=batch["valid"])  # seeds drawn here
    assert calls == []
    assert len(views) == 4 and all(torch.isfinite(v).all() for v in views)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("antialias", [True, False])
def test_a_cuda_engine_call_does_not_synchronise(demo_data, antialias):
    ds, batch = canvas_batch(demo_data)
    cuda = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    engine = GPUViewEngine.from_recipe(ds.recipe, photometrics="byol", antialias=antialias)
    engine.transform_batch(cuda)  # warm-up (lazy imports, cuDNN/cuBLAS handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views, _, _ = engine.transform_batch(cuda)
        engine(cuda["canvas"], cuda["windows"], valid=cuda["valid"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda for v in views)
