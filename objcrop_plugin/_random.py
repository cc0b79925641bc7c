"""Seeded random streams that differ across DataLoader workers and DDP ranks."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["distributed_rank", "sample_rng", "process_rng"]


def distributed_rank() -> int:
    """This process's global rank: torch.distributed when initialised, else ``RANK``, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # pragma: no cover - torch without distributed support
        pass
    return int(os.environ.get("RANK", "0") or 0)


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
        # (restarted whenever the torch seed changes, so re-seeding torch replays the stream)
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
    key = (os.getpid(), _torch_seed(), distributed_rank(), -1 if seed is None else int(seed))
    rng = _PROCESS_RNG.get(key)
    if rng is None:
        entropy = [key[1], key[2], 0 if seed is None else int(seed) + 1]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        _PROCESS_RNG.clear()
        _PROCESS_RNG[key] = rng
    return rng
