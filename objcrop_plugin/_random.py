"""Seeded random streams that differ across DataLoader workers and DDP ranks.

Host side, ``numpy`` generators: :func:`sample_rng` (one per sample, from ``(seed, epoch,
index, rank)``) and :func:`process_rng` (for code that sees no sample index). Device side,
:func:`counter_uniforms`: uniforms that are a pure function of a per-sample seed (drawn from
the sample's generator, below :data:`SEED_HIGH`) and a counter, so the GPU engine's random
parameters never depend on the batch a sample lands in.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["SEED_HIGH", "counter_uniforms", "distributed_rank", "process_rng", "sample_rng"]

#: Per-sample seeds are drawn in ``[0, SEED_HIGH)``: non-negative int64.
SEED_HIGH = 2**63 - 1


def distributed_rank() -> int:
    """This process's global rank: torch.distributed when initialised, else the environment's.

    A DataLoader worker started with ``spawn`` (or ``forkserver``) has no process group, and
    Lightning's own DDP launcher sets ``LOCAL_RANK`` and ``NODE_RANK`` but not ``RANK``: there
    the rank is ``LOCAL_RANK`` on the first node (exactly the global rank on one machine), and
    a number no other process has on further nodes, so ranks never share a stream.
    """
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # pragma: no cover - torch without distributed support
        pass
    env = os.environ
    if env.get("RANK"):
        return int(env["RANK"])
    local = int(env.get("LOCAL_RANK") or 0)
    node = int(env.get("NODE_RANK") or env.get("GROUP_RANK") or 0)
    if node == 0:
        return local
    per_node = int(env.get("LOCAL_WORLD_SIZE") or 0) or max(int(env.get("WORLD_SIZE") or 1), local + 1)
    return node * per_node + local


def _torch_seed() -> int:
    import torch

    # In a DataLoader worker this is base_seed + worker_id, where base_seed is drawn anew from
    # the main process's generator for every epoch: so workers and epochs get distinct streams,
    # reproducibly when the user seeded torch.
    return int(torch.initial_seed())


def sample_rng(
    seed: int | None, index: int, epoch: int = 0, rank: int | None = None
) -> np.random.Generator:
    """A generator for one sample, seeded by ``(seed, epoch, index, rank)``.

    With ``seed=None`` the worker's torch seed takes the place of ``seed`` (so it changes with the
    worker and the epoch). The DDP rank is always mixed in, so ranks never share a stream.
    """
    rank = distributed_rank() if rank is None else rank
    if seed is None:
        # torch's seed does not change in the main process (num_workers=0) or in persistent
        # workers: a per-process draw counter keeps epochs from repeating their crops
        # (restarted whenever the torch seed changes, so seeding torch with another seed
        # starts a new stream; the same seed set again continues the count)
        global _DRAWS, _LAST_SEED
        torch_seed = _torch_seed()
        if torch_seed != _LAST_SEED:
            _DRAWS, _LAST_SEED = 0, torch_seed
        _DRAWS += 1
        entropy = [torch_seed, int(epoch), int(index), rank, _DRAWS]
    else:
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        entropy = [int(seed), int(epoch), int(index), rank]
    return np.random.default_rng(np.random.SeedSequence(entropy))


_DRAWS = 0
_LAST_SEED: int | None = None


_PROCESS_RNG: dict[tuple[int, int, int, int], np.random.Generator] = {}


def process_rng(seed: int | None = None) -> np.random.Generator:
    """A generator for code that sees no sample index (a collate function).

    It is keyed by the process id and torch's seed of this process (a DataLoader worker's seed),
    so a forked worker never continues its parent's stream, and by the DDP rank.
    """
    pid = os.getpid()
    key = (pid, _torch_seed(), distributed_rank(), -1 if seed is None else int(seed))
    rng = _PROCESS_RNG.get(key)
    if rng is None:
        entropy = [key[1], key[2], 0 if seed is None else int(seed) + 1]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        # one stream per key: users of different seeds in one process (a dataset's views and
        # a collate function) each keep theirs; a forked parent's streams go
        for old in [k for k in _PROCESS_RNG if k[0] != pid]:
            del _PROCESS_RNG[old]
        if len(_PROCESS_RNG) >= 64:  # torch seeds of past epochs' workers
            del _PROCESS_RNG[next(iter(_PROCESS_RNG))]
        _PROCESS_RNG[key] = rng
    return rng


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``x`` in ``[0, 2**32)``, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (C. Wellons, hash-prospector): full avalanche on 32 bits
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, n_slots: int, n_draws: int) -> torch.Tensor:
    """Counter-based uniforms in ``[0, 1)``: a pure function of (seed, slot, draw).

    Input: ``seeds`` int64 ``(B,)`` on any device.

    Output: float32 ``(B, n_slots, n_draws)`` on the same device (24-bit resolution). The same
    seed gives the same numbers on every device and in every batch, which is what makes a
    sample's device-side augmentations independent of batching and resumable. Integer
    arithmetic only: nothing is read back to the host.

    Example:
        >>> import torch
        >>> u = counter_uniforms(torch.tensor([7, 7, 8]), n_slots=2, n_draws=3)
        >>> u.shape, bool((u[0] == u[1]).all()), bool((u[0] == u[2]).all())
        (torch.Size([3, 2, 3]), True, False)
    """
    import torch

    s = seeds.to(torch.int64).reshape(-1)
    lo, hi = s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF
    base = _hash32(_hash32(hi ^ 0x9E3779B9) ^ lo)
    ctr = torch.arange(n_slots * n_draws, device=s.device, dtype=torch.int64)
    x = _hash32(base[:, None] ^ _hash32(ctr + 0x632BE5AB)[None, :])
    return ((x >> 8).to(torch.float32) * (1.0 / 2**24)).view(-1, n_slots, n_draws)
