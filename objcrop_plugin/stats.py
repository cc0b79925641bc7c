"""Counters shared between the main process and its DataLoader workers."""

from __future__ import annotations

import logging
import multiprocessing as mp
from multiprocessing import context as mp_context

__all__ = ["FallbackCounter"]

log = logging.getLogger("objcrop_plugin")


class FallbackCounter:
    """Counts samples and scene-crop fallbacks across processes.

    Created in the main process, it is inherited by DataLoader workers (fork, spawn or
    forkserver), which add to the same shared memory, so ``as_dict()`` in the training loop sees
    every worker's fallbacks. Pickled any other way (saved to disk, sent to a stranger) it turns
    into a plain local copy of the current counts.

    Fields:
        samples: samples planned.
        missing: samples whose key had no entry in the proposal store.
        unusable: samples whose proposals were all unusable (NaN, outside the image, too small,
            filtered by area).
    """

    FIELDS = ("samples", "missing", "unusable")
    #: log the first few fallbacks of each process with their keys, then every power of ten
    LOG_FIRST = 5

    def __init__(self, values: dict[str, int] | None = None) -> None:
        self._values = mp.RawArray("q", len(self.FIELDS))
        # a spawn-context lock can be sent to fork, spawn and forkserver workers alike; a
        # fork-context one is refused by spawn/forkserver DataLoaders
        self._lock = mp.get_context("spawn").Lock()
        self._logged = 0
        for name, value in (values or {}).items():
            self._values[self.FIELDS.index(name)] = int(value)

    def add(self, field: str, n: int = 1) -> None:
        i = self.FIELDS.index(field)
        with self._lock:
            self._values[i] += n

    def fallback(self, field: str, key: str | None, detail: str) -> None:
        """Count a fallback and log it (the first few, then every power of ten)."""
        self.add(field)
        self._logged += 1
        n = self._logged
        if n <= self.LOG_FIRST or (n & (n - 1) == 0 and n > 0):
            log.warning(
                "objcrop: scene-crop fallback for %s (%s): %s [%d so far in this process]",
                key if key is not None else "<no key>",
                field,
                detail,
                n,
            )

    def as_dict(self) -> dict[str, int]:
        return {name: int(self._values[i]) for i, name in enumerate(self.FIELDS)}

    @property
    def fallbacks(self) -> int:
        d = self.as_dict()
        return d["missing"] + d["unusable"]

    def __repr__(self) -> str:
        return f"FallbackCounter({self.as_dict()})"

    def __reduce__(self):
        if mp_context.get_spawning_popen() is not None:
            return (_rebuild_shared, (self._values, self._lock))
        return (FallbackCounter, (self.as_dict(),))


def _rebuild_shared(values, lock) -> FallbackCounter:
    counter = FallbackCounter.__new__(FallbackCounter)
    counter._values = values
    counter._lock = lock
    counter._logged = 0
    return counter
