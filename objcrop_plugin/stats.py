"""Counters shared between the main process and its DataLoader workers."""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import threading
from collections.abc import Iterator, Sequence
from multiprocessing import context as mp_context

from .images import ImageDecodeError

__all__ = ["BadImages", "FallbackCounter", "TooManyBadImagesError", "counts_held"]

log = logging.getLogger("objcrop_plugin")

_held = threading.local()


@contextlib.contextmanager
def counts_held() -> Iterator[None]:
    """Hold back what any :class:`FallbackCounter` counts in this thread inside the block:
    counted (and logged) when the block ends normally, dropped when it raises.

    A sample is planned from its image's header before the pixels are decoded; when they then
    fail to decode, the sample is not served (the next readable image takes its place), so
    neither it nor its fallback may be counted. Blocks nest: an inner block's counts join the
    outer one's.
    """
    outer = getattr(_held, "events", None)
    events: list[tuple[FallbackCounter, tuple]] = []
    _held.events = events
    try:
        yield
    finally:
        _held.events = outer
    for counter, args in events:
        counter._record(*args)


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
        mismatched: samples whose stored image size has another aspect ratio than the image
            (width and height swapped by an EXIF orientation mismatch, or another image under
            the same key): the boxes would land on other objects, so they are not used.

    Logging: the first few fallbacks of each process are warnings naming the key, then every
    power of two; every fallback is logged with its key at INFO level (``objcrop -v``).
    """

    FIELDS = ("samples", "missing", "unusable", "mismatched")
    #: log the first few fallbacks of each process with their keys, then every power of two
    LOG_FIRST = 5

    def __init__(self, values: dict[str, int] | None = None) -> None:
        self._values = mp.RawArray("q", len(self.FIELDS))
        # a spawn-context lock can be sent to fork, spawn and forkserver workers alike; a
        # fork-context one is refused by spawn/forkserver DataLoaders
        self._lock = mp.get_context("spawn").Lock()
        self._logged = 0
        for name, value in (values or {}).items():
            if name in self.FIELDS:  # counts pickled by an older version may lack a field
                self._values[self.FIELDS.index(name)] = int(value)

    def add(self, field: str, n: int = 1) -> None:
        """Count ``n`` in ``field`` (held back inside :func:`counts_held`)."""
        self._record(field, n)

    def fallback(self, field: str, key: str | None, detail: str) -> None:
        """Count a fallback and log it (the first few, then every power of two; held back
        inside :func:`counts_held`)."""
        self._record(field, 1, key, detail)

    def _record(self, field: str, n: int, key: str | None = None, detail: str | None = None) -> None:
        events = getattr(_held, "events", None)
        if events is not None:
            events.append((self, (field, n, key, detail)))
            return
        i = self.FIELDS.index(field)
        with self._lock:
            self._values[i] += n
        if detail is None:
            return
        self._logged += 1
        logged = self._logged
        level = (logging.WARNING if logged <= self.LOG_FIRST or logged & (logged - 1) == 0
                 else logging.INFO)
        log.log(
            level,
            "objcrop: scene-crop fallback for %s (%s): %s [%d so far in this process]",
            key if key is not None else "<no key>",
            field,
            detail,
            logged,
        )

    def as_dict(self) -> dict[str, int]:
        return {name: int(self._values[i]) for i, name in enumerate(self.FIELDS)}

    @property
    def fallbacks(self) -> int:
        d = self.as_dict()
        return d["missing"] + d["unusable"] + d["mismatched"]

    def __repr__(self) -> str:
        return f"FallbackCounter({self.as_dict()})"

    def __reduce__(self):
        if mp_context.get_spawning_popen() is not None:
            return (_rebuild_shared, (self._values, self._lock))
        return (FallbackCounter, (self.as_dict(),))


class SharedEpoch:
    """An epoch number that DataLoader workers see change: set in the main process (by
    ``set_epoch``), read in workers of any start method, persistent ones too (a worker's own
    copy of a plain attribute keeps the epoch it started with). Pickled other than to a new
    process it becomes a plain copy of the current value."""

    def __init__(self, value: int = 0) -> None:
        self._value = mp.RawValue("q", int(value))

    @property
    def value(self) -> int:
        return int(self._value.value)

    @value.setter
    def value(self, value: int) -> None:
        self._value.value = int(value)

    def __reduce__(self):
        if mp_context.get_spawning_popen() is not None:
            return (_rebuild_epoch, (self._value,))
        return (SharedEpoch, (self.value,))


def _rebuild_epoch(value) -> SharedEpoch:
    epoch = SharedEpoch.__new__(SharedEpoch)
    epoch._value = value
    return epoch


def _rebuild_shared(values, lock) -> FallbackCounter:
    counter = FallbackCounter.__new__(FallbackCounter)
    counter._values = values
    counter._lock = lock
    counter._logged = 0
    return counter


class TooManyBadImagesError(ImageDecodeError):
    """More images could not be read than the failure rate allows (the message says which).

    An :class:`~objcrop_plugin.images.ImageDecodeError`, so code that stopped on the first
    unreadable image stops here too."""


class BadImages:
    """Unreadable images met while training, counted across DataLoader workers.

    Created in the main process and inherited by DataLoader workers as
    :class:`FallbackCounter` is (shared memory). A dataset calls :meth:`record` for each image
    it could not read (and then serves a replacement, see
    :class:`~objcrop_plugin.engine.datasets.ObjectCropDataset`); each image counts once
    however many epochs meet it, the first meeting is logged as a warning naming its file.

    Args:
        n: the dataset's length: one shared flag per index, and the denominator of the failure
            rate. ``None`` where indices are unknown (a collate function): then every unreadable
            item counts, over the items seen (:meth:`seen`).
        max_failure_rate: :meth:`record` raises :class:`TooManyBadImagesError` once more than
            this fraction of the ``n`` images is bad (``n=None``: of the items seen, judged
            from ``1 / max_failure_rate`` items on).

    Example:
        >>> bad = BadImages(200, max_failure_rate=0.01)
        >>> bad.record(7, "a/x.jpg", "cannot decode")
        >>> bad.indices(), bad.count
        ([7], 1)
    """

    def __init__(self, n: int | None, max_failure_rate: float = 0.01) -> None:
        rate = float(max_failure_rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"max_failure_rate must be in [0, 1], got {max_failure_rate!r}")
        self.n = None if n is None else int(n)
        self.max_failure_rate = rate
        self._flags = mp.RawArray("b", max(self.n or 0, 1))
        self._counts = mp.RawArray("q", 3)  # bad images, failed reads, items seen
        self._lock = mp.get_context("spawn").Lock()

    @property
    def count(self) -> int:
        """Distinct bad images (``n=None``: bad items)."""
        return int(self._counts[0])

    @property
    def failed_reads(self) -> int:
        """Reads that failed, all epochs and retries together."""
        return int(self._counts[1])

    def add_failed_reads(self, n: int) -> None:
        """Count ``n`` failed reads of an earlier part of the run (a resumed run's)."""
        with self._lock:
            self._counts[1] += int(n)

    def restore(self, indices: Sequence[int]) -> None:
        """Mark ``indices`` bad, as an earlier part of the run found them (a resumed run's),
        without logging them again; their failed reads come with :meth:`add_failed_reads`."""
        if self.n is None:
            return
        with self._lock:
            for i in indices:
                if 0 <= i < self.n and not self._flags[i]:
                    self._flags[i] = 1
                    self._counts[0] += 1

    def seen(self, k: int = 1) -> None:
        """Count ``k`` items met (``n=None`` only: the failure rate's denominator)."""
        with self._lock:
            self._counts[2] += int(k)

    @property
    def limit(self) -> int:
        """How many bad images are tolerated."""
        total = self.n if self.n is not None else int(self._counts[2])
        return math.floor(self.max_failure_rate * total + 1e-9)

    def record(self, index: int | None, where: str, detail: object) -> None:
        """Count item ``index`` (of file ``where``) as unreadable; raise above the rate."""
        with self._lock:
            first = True
            if self.n is not None and index is not None:
                first = not self._flags[index]
                self._flags[index] = 1
            if first:
                self._counts[0] += 1
            self._counts[1] += 1
            count = int(self._counts[0])
            seen = int(self._counts[2])
        if first:
            log.warning("objcrop: skipping unreadable image %s (%s); a readable one takes its "
                        "place [%d bad so far]", where, detail, count)
        judged = self.n is not None or (
            self.max_failure_rate > 0 and seen >= 1 / self.max_failure_rate
        ) or self.max_failure_rate == 0
        if judged and count > self.limit:
            raise TooManyBadImagesError(self.message(f"{where} ({detail})"))

    #: how :meth:`message` ends: where the rate is set (a host library names its own key)
    FIX = ("`objcrop check DATA` lists them all), or raise max_failure_rate (objcrop train: "
           "data.max_failure_rate)")

    def rate_said(self) -> str:
        """The tolerated rate as :meth:`message` names it."""
        return f"max_failure_rate {self.max_failure_rate:.2%}"

    def message(self, example: str | None = None, listed_in: object = None) -> str:
        """Why :class:`TooManyBadImagesError` stopped the run, with an example and the list."""
        total = f"{self.n} images" if self.n is not None else f"{int(self._counts[2])} items seen"
        text = f"{self.count} of {total} could not be read, more than {self.rate_said()} allows"
        if example:
            text += f"; e.g. {example}"
        if listed_in:
            text += f"; the list is in {listed_in}"
        return text + ". Fix: remove or replace the files (" + self.FIX

    def indices(self) -> list[int]:
        """The indices recorded as bad, in order (``n=None``: always empty)."""
        if self.n is None:
            return []
        flags = bytes(self._flags)[: self.n]
        found, i = [], flags.find(1)
        while i >= 0:
            found.append(i)
            i = flags.find(1, i + 1)
        return found

    def as_dict(self) -> dict[str, int]:
        return {"bad_images": self.count, "failed_reads": self.failed_reads}

    def __repr__(self) -> str:
        return f"BadImages(n={self.n}, {self.as_dict()})"

    def __reduce__(self):
        if mp_context.get_spawning_popen() is not None:
            return (_rebuild_bad, (type(self), self.n, self.max_failure_rate, self._flags,
                                   self._counts, self._lock))
        return (_copy_bad, (type(self), self.n, self.max_failure_rate, bytes(self._flags),
                            list(self._counts[:])))


def _rebuild_bad(cls, n, rate, flags, counts, lock) -> BadImages:
    bad = cls.__new__(cls)
    bad.n, bad.max_failure_rate = n, rate
    bad._flags, bad._counts, bad._lock = flags, counts, lock
    return bad


def _copy_bad(cls, n, rate, flags, counts) -> BadImages:
    bad = cls(n, rate)
    bad._flags[: len(flags)] = list(flags)
    bad._counts[:] = counts
    return bad
