"""Building a proposal store for a whole image folder: parallel, sharded, resumable.

The images under the root (sorted keys) are split into fixed chunks. Worker processes run the
generator over each chunk and write the chunk's results to ``.<store>.parts/chunk-NNNNNN.jsonl``
atomically; a chunk file either exists complete or not at all. A killed build (``kill -9``,
node preempted) is resumed by running the same command again: finished chunks are skipped.
When every chunk is done they are assembled, in key order, into the store (atomic write), the
failures into ``<store>.failures.tsv``, and the parts folder is removed. The result does not
depend on the number of workers, on interruptions, or on sharding (after ``merge``).

One build at a time per store: a build holds ``.<store>.lock`` (naming its pid and host), and
a second build of the same store is refused. The settings (method, generator parameters with
the effective ``top_k``/``max_side``, image folder, the images, chunk size, shard, pixel
limit) are in ``manifest.json`` and each chunk file's first line carries their digest, so a
build only ever resumes chunks made with its own settings (``restart=True`` starts over).

Sharding across machines: ``shard=(i, n)`` takes every n-th key starting at i; the index and
count come from ``--shard i/N``, or from ``RANK``/``WORLD_SIZE`` (torchrun) or
``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` (SLURM arrays). :func:`merge_stores` joins
the shard stores into one. Each shard's metadata carries its ``shard`` ``[i, N]`` and a
``settings`` digest (method, parameters, the folder's image list, pixel limit), so a merge
refuses shards of different builds and an incomplete set.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data as torch_data

from ..files import atomic_write, output_lock, remove_temporaries
from ..images import draft_factor, list_images, load_rgb, open_image, write_bad_list
from ..registry import RegistryError, did_you_mean, list_proposal_sources, load_proposal_source
from .generators import ProposalGenerator
from .store import (
    FAILURES_KIND,
    ProposalRecord,
    ProposalStore,
    ProposalStoreWriter,
    _record_from,
    failures_path,
    file_sample,
    remove_stale_failures,
)

__all__ = [
    "FAILURES_KIND",
    "BuildInterrupted",
    "BuildWorkerDied",
    "BuildSummary",
    "build_store",
    "failures_path",
    "make_generator",
    "merge_stores",
    "resolve_shard",
    "shard_path",
]

log = logging.getLogger("objcrop_plugin")

#: images above this many pixels are failures, not decoded (PIL's own bomb limit is 89.5 M)
DEFAULT_MAX_PIXELS = 89_478_485


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C during a build; the message says what is saved and how to resume."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "interrupted"


class BuildWorkerDied(ChildProcessError):
    """A build's worker process died (killed, out of memory); the message says what is saved
    and how to resume."""


def make_generator(name: str, **params: Any) -> ProposalGenerator:
    """A registered proposal generator by name, with keyword parameters."""
    try:
        factory = load_proposal_source(name)
    except RegistryError as exc:
        if not str(exc).startswith("unknown"):
            raise
        generators = list_proposal_sources(kind="generator")  # not the importers
        raise RegistryError(
            f"unknown proposal generator '{name}'.{did_you_mean(name, generators)} Known: "
            f"{', '.join(generators)} (`objcrop proposals import` reads boxes from files: "
            f"{', '.join(list_proposal_sources(kind='importer'))})"
        ) from None
    if getattr(factory, "kind", None) != "generator":
        raise ValueError(
            f"proposal source '{name}' is an importer, not a generator: use "
            f"`objcrop proposals import` for it"
        )
    accepted = _options(factory)
    if accepted is not None:
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(
                f"proposal generator '{name}' got unknown parameter(s) {unknown}; it accepts: "
                f"{', '.join(accepted) or 'none'}"
            )
    try:
        return factory(**params)
    except TypeError as exc:  # a value of the wrong type
        raise ValueError(f"proposal generator '{name}': {exc}") from None


def _options(factory: Any) -> list[str] | None:
    """The keyword parameters a generator class takes, or None when it takes any."""
    import inspect

    names: list[str] = []
    for cls in (factory.__mro__ if isinstance(factory, type) else [factory]):
        init = cls.__init__ if isinstance(factory, type) else cls
        if init is object.__init__:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            return None
        params = [p for p in sig.parameters.values() if p.name != "self"]
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def resolve_shard(shard: str | None = None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """``(index, count)`` from ``"i/N"``, else torchrun's or SLURM's environment, else (0, 1)."""
    env = os.environ if env is None else env
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {shard!r}") from None
    elif "WORLD_SIZE" in env and "RANK" in env:
        i, n = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        n = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        i, n = 0, 1
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard index must satisfy 0 <= i < N, got {i}/{n}")
    return i, n


def shard_path(out: str | os.PathLike[str], index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` writes: ``out`` itself when there is one shard."""
    out = Path(out)
    if count == 1:
        return out
    return out.with_name(f"{out.stem}.shard-{index:05d}-of-{count:05d}{out.suffix}")


@dataclass
class BuildSummary:
    """What a build did."""

    out: Path
    images: int = 0
    boxes: int = 0
    empty: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    resumed_images: int = 0
    seconds: float = 0.0

    @property
    def failure_rate(self) -> float:
        return len(self.failures) / self.images if self.images else 0.0

    def format(self) -> str:
        lines = [
            f"store: {self.out}",
            f"images: {self.images} ({self.images - len(self.failures)} in the store)  "
            f"boxes: {self.boxes}  images without proposals: {self.empty}  "
            f"failures: {len(self.failures)}",
        ]
        if self.resumed_images:
            lines.append(f"resumed: {self.resumed_images} images were already done")
        if self.failures:
            lines.append(f"failures listed in: {failures_path(self.out)}")
        return "\n".join(lines)


def _parts_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.parts")


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _block_sigint() -> Any:
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _ignore_sigint() -> Any:
    """Ignore SIGINT (from the main thread only: elsewhere Python cannot set handlers); the
    previous handler, or ``None`` when nothing was changed."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


def _restore_sigmask(old: Any) -> None:
    if old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _run_pool(todo: list[tuple[int, list[str], str]], workers: int, ctx: Any,
              init: tuple[Any, ...], bar: Any) -> None:
    """Run the chunks in ``workers`` processes. A worker that dies (SIGKILL from the
    out-of-memory killer, a crash in native code) raises :class:`BrokenProcessPool` here
    instead of losing its chunk: ``multiprocessing.Pool`` would replace it and wait forever."""
    # workers start with SIGINT ignored (a disposition that survives exec, so Python never
    # installs its KeyboardInterrupt handler there, even while the imports run threads of
    # their own) and blocked, and ignore it from _init_worker on: a Ctrl-C (sent to the whole
    # process group) stops only this process, which terminates them, with no traceback from
    # each worker. The executor starts its processes in submit(): all of them are submitted
    # here, in this window.
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(*init, True, os.getpid()))
    futures = []
    try:
        old = _block_sigint()
        handler = _ignore_sigint()
        try:
            futures = [pool.submit(_run_chunk, task) for task in todo]
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
            _restore_sigmask(old)
        for fut in as_completed(futures):
            _, n = fut.result()
            if bar is not None:
                bar.update(n)
    except BaseException:
        for fut in futures:
            fut.cancel()
        # the executor has no public way to stop running tasks before Python 3.14
        stop = getattr(pool, "terminate_workers", None)
        if stop is not None:
            stop()
        else:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                with contextlib.suppress(Exception):
                    proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(method: str, params: dict[str, Any], root: str, max_pixels: int,
                 settings: str = "", ignore_sigint: bool = False,
                 parent: int | None = None) -> None:
    import torch

    if parent is not None:  # a build killed by SIGKILL leaves no worker behind
        try:
            os.kill(parent, 0)
        except ProcessLookupError:  # killed while this worker started (imports take seconds)
            os._exit(1)
        except OSError:
            pass
        _die_with(parent)
    if ignore_sigint:  # Ctrl-C reaches the whole process group: the main process handles it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    torch.set_num_threads(1)  # parallelism comes from processes
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    _WORKER.update(
        generator=make_generator(method, **params), root=Path(root), max_pixels=max_pixels,
        settings=settings,
    )


def propose_file(
    generator: ProposalGenerator, path: Path, key: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ProposalRecord:
    """Proposals for one image file, in pixels of its displayed (EXIF-rotated) full size.

    Raises:
        OSError / ValueError: the file cannot be used; the message is the failure reason.
    """
    opened = open_image(path, max_pixels)
    w, h = opened.size
    if w * h > max_pixels:
        opened.image.close()
        raise ValueError(f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                         "(raise it with --max-pixels)")
    # JPEG DCT scaling: decode no more than the working resolution (long side max_side) needs
    work = min(1.0, generator.max_side / max(w, h))
    reduce = draft_factor([(0, 0, w, h)], [(h * work, w * work)]) if opened.is_jpeg else 1
    image = load_rgb(opened, reduce)
    boxes, scores = generator(image)
    if image.size != (w, h):
        boxes = boxes * np.array([w / image.size[0], h / image.size[1]] * 2, dtype=np.float32)
    return _record_from(key, boxes, scores, (w, h))


def decode_working(
    root: Path, key: str, max_side: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Image ``key``'s working image (long side at most ``max_side``, JPEG draft-decoded) and
    its displayed full size ``(width, height)``.

    Raises:
        OSError / ValueError: the file cannot be used; the message is the failure reason.
    """
    from .generators import working_resize

    opened = open_image(root / key, max_pixels)
    w, h = opened.size
    if w * h > max_pixels:
        opened.image.close()
        raise ValueError(f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                         "(raise it with --max-pixels)")
    work = min(1.0, max_side / max(w, h))
    reduce = draft_factor([(0, 0, w, h)], [(h * work, w * work)]) if opened.is_jpeg else 1
    return working_resize(load_rgb(opened, reduce), max_side), (w, h)


class _Decoded(torch_data.Dataset):
    """``(key, working image | None, full size, error | None)`` of each key, for DataLoader
    workers: decoding runs in parallel, the network in the main process."""

    def __init__(self, root: Path, keys: Sequence[str], max_side: int, max_pixels: int) -> None:
        self.root, self.keys, self.max_side, self.max_pixels = root, list(keys), max_side, max_pixels

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray | None, tuple[int, int], str | None]:
        key = self.keys[i]
        try:
            work, size = decode_working(self.root, key, self.max_side, self.max_pixels)
            return key, work, size, None
        except Exception as exc:  # one bad image must not stop a million-image build
            return key, None, (0, 0), f"{type(exc).__name__}: {exc}"


def _as_is(item: Any) -> Any:
    return item


def _die_with(parent: int) -> None:
    """End this worker when ``parent`` dies, even by SIGKILL (Linux): a DataLoader worker
    whose parent is gone otherwise blocks forever writing into its result queue, a pool
    worker holds its memory and the parent's output pipe."""
    # only a child of ``parent`` (a forkserver's child has another parent: left alone)
    if not sys.platform.startswith("linux") or os.getppid() != parent:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died between the check and prctl
        os._exit(1)


def _one_thread_worker(parent: int, _: int) -> None:
    import torch

    torch.set_num_threads(1)
    _die_with(parent)


def propose_keys(
    generator: Any,
    root: str | os.PathLike[str],
    keys: Sequence[str],
    workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    chunk_size: int | None = None,
) -> Iterator[list[tuple[str, ProposalRecord | None, str | None]]]:
    """Run a batched generator (:class:`~objcrop_plugin.proposals.generators.
    BatchedProposalGenerator`) over ``keys``: images decoded in ``workers`` DataLoader
    processes (0: in this one), the network run in this process, ``generator.batch_size``
    images at a time.

    Yields, per ``chunk_size`` keys (default: all at once), in key order, the list of
    ``(key, record, None)`` or ``(key, None, failure reason)``. Batches never cross a chunk,
    so the same chunks give the same batches, whatever was done before (exact resume).
    """
    import torch

    root = Path(root)
    keys = list(keys)
    chunk = len(keys) if not chunk_size else int(chunk_size)
    loader = torch.utils.data.DataLoader(
        _Decoded(root, keys, generator.max_side, max_pixels), batch_size=None, collate_fn=_as_is,
        num_workers=workers,
        worker_init_fn=functools.partial(_one_thread_worker, os.getpid()) if workers else None,
        prefetch_factor=4 if workers else None,
    )
    pending: list[tuple[str, np.ndarray | None, tuple[int, int], str | None]] = []

    def finish() -> list[tuple[str, ProposalRecord | None, str | None]]:
        ok = [p for p in pending if p[1] is not None]
        results = iter(generator.propose_working([p[1] for p in ok], [p[2] for p in ok]))
        out: list[tuple[str, ProposalRecord | None, str | None]] = []
        for key, work, size, error in pending:
            if work is None:
                out.append((key, None, (error or "unknown error").replace("\t", " ")
                            .replace("\n", " ")))
            else:
                boxes, scores = next(results)
                out.append((key, _record_from(key, boxes, scores, size), None))
        pending.clear()
        return out

    for item in loader:
        pending.append(item)
        if len(pending) == chunk:
            yield finish()
    if pending:
        yield finish()


def _run_batched(generator: Any, root: Path, todo: list[tuple[int, list[str], str]],
                 workers: int, max_pixels: int, settings: str, bar: Any) -> None:
    """The build loop of a batched generator: one chunk file per chunk, as :func:`_run_chunk`."""
    keys = [k for _, chunk, _ in todo for k in chunk]
    sizes = iter([(len(chunk), f) for _, chunk, f in todo])
    done: list[tuple[str, ProposalRecord | None, str | None]] = []
    n, chunk_file = next(sizes)
    # every todo chunk is a full chunk except possibly the last one: group by the chunk size
    # of the build, then split the (rare) shorter last chunk out of the stream
    for results in propose_keys(generator, root, keys, workers=workers, max_pixels=max_pixels,
                                chunk_size=len(todo[0][1])):
        done += results
        while n is not None and len(done) >= n:
            lines = [json.dumps({"settings": settings})]
            for key, rec, error in done[:n]:
                lines.append(json.dumps(rec.to_json(), separators=(",", ":")) if rec is not None
                             else json.dumps({"key": key, "error": error}))
            atomic_write(chunk_file, [("\n".join(lines) + "\n").encode("utf-8")])
            if bar is not None:
                bar.update(n)
            done = done[n:]
            n, chunk_file = next(sizes, (None, None))


def _run_chunk(task: tuple[int, list[str], str]) -> tuple[int, int]:
    index, keys, chunk_file = task
    gen, root, max_pixels = _WORKER["generator"], _WORKER["root"], _WORKER["max_pixels"]
    lines = [json.dumps({"settings": _WORKER["settings"]})]
    for key in keys:
        try:
            rec = propose_file(gen, root / key, key, max_pixels)
            lines.append(json.dumps(rec.to_json(), separators=(",", ":")))
        except Exception as exc:  # one bad image must not stop a million-image build
            reason = f"{type(exc).__name__}: {exc}".replace("\t", " ").replace("\n", " ")
            lines.append(json.dumps({"key": key, "error": reason}))
    atomic_write(chunk_file, [("\n".join(lines) + "\n").encode("utf-8")])
    return index, len(keys)


# ----------------------------------------------------------------------------- build


def _content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes, in name order)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        if f != path:
            h.update(f.relative_to(path).as_posix().encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


#: parameters that say where and how a generator runs, not which boxes it gives: left out of
#: the settings a resumed build or a merge compares, and of the store's metadata
RUNTIME_PARAMS = ("device", "batch_size", "components")


def _input_contents(params: dict[str, Any]) -> dict[str, str]:
    """The content of every file or folder a parameter names (``checkpoint``, ``model_dir``):
    a resumed build refuses one whose weights changed since its first chunks."""
    out = {}
    for name, value in sorted(params.items()):
        if isinstance(value, (str, os.PathLike)) and str(value):
            path = Path(value).expanduser()
            with contextlib.suppress(OSError):
                if path.is_file() or path.is_dir():
                    out[name] = _content_sha256(path)
    return out


def _manifest(method: str, params: dict[str, Any], generator: ProposalGenerator, root: Path,
              keys: Sequence[str], chunk_size: int, shard: tuple[int, int],
              max_pixels: int) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()
    return {
        "method": method, "params": params, "root": str(root.resolve()),
        "top_k": getattr(generator, "top_k", None), "max_side": getattr(generator, "max_side", None),
        "keys_sha256": digest, "images": len(keys), "chunk_size": chunk_size,
        "shard": list(shard), "max_pixels": max_pixels,
        "inputs_sha256": _input_contents({**_implicit_inputs(generator), **params}),
    }


def _implicit_inputs(generator: ProposalGenerator) -> dict[str, Any]:
    """Files a generator reads that its parameters need not name (BING's model folder from
    ``$OBJCROP_BING_MODEL``): their content joins the settings too."""
    model_dir = getattr(generator, "model_dir", None)
    return {} if model_dir is None else {"model_dir": model_dir}


def _settings_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _chunk_settings(path: Path) -> str | None:
    """The settings digest on a chunk file's first line (None: a file without one)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        return None
    return first.get("settings") if isinstance(first, dict) else None


def _read_chunk(path: Path) -> Iterator[tuple[ProposalRecord | None, str, str | None]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            if "settings" in obj:
                continue
            if "error" in obj:
                yield None, obj["key"], obj["error"]
            else:
                rec = _record_from(obj["key"], obj["boxes"], obj["scores"],
                                   (obj["width"], obj["height"]))
                yield rec, rec.key, None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    said = []
    for k in keys:
        if k == "keys_sha256":
            said.append("the image list")
        elif k == "inputs_sha256":
            a, b = old.get(k) or {}, new.get(k) or {}
            changed = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            said.append("the content of " + ", ".join(
                f"{n} ({(new.get('params') or {}).get(n)})" for n in changed) + " changed")
        else:
            said.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    return ", ".join(said)


def _resumable_chunks(parts: Path, manifest: dict[str, Any], restart: bool) -> None:
    """Make ``parts`` hold only chunks of this build's settings, or refuse (see module doc)."""
    digest = _settings_digest(manifest)
    manifest_file = parts / "manifest.json"
    if restart:
        shutil.rmtree(parts, ignore_errors=True)
    if manifest_file.exists():
        try:
            previous = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {"manifest": "unreadable"}
        # compared as JSON text: a tuple parameter reads back as a list, a NaN as an
        # unequal NaN
        if json.dumps(previous, sort_keys=True) != json.dumps(manifest, sort_keys=True):
            raise ValueError(
                f"{parts} holds an unfinished build with other settings or images "
                f"({_differences(previous, manifest)}). Fix: run the same command as before to "
                "resume it, or add --restart to discard it and start over."
            )
    chunk_files = sorted(parts.glob("chunk-*.jsonl")) if parts.is_dir() else []
    foreign = [f for f in chunk_files if _chunk_settings(f) != digest]
    if foreign:
        raise ValueError(
            f"{parts} holds {len(foreign)} chunk file(s) made with other or unknown settings "
            f"(e.g. {foreign[0].name}), not by this command; resuming would mix them into the "
            "store. Fix: add --restart to discard them and start over."
        )
    if not manifest_file.exists():
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write(manifest_file, [json.dumps(manifest, sort_keys=True).encode()])


def build_store(
    images_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    method: str = "graph_segments",
    params: dict[str, Any] | None = None,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    chunk_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    mp_context: str = "spawn",
    restart: bool = False,
) -> BuildSummary:
    """Run a proposal generator over every image under ``images_dir`` into a store.

    Args:
        images_dir: dataset root; keys are paths relative to it.
        out: the store to write (for a shard of several, :func:`shard_path` of it).
        method: a registered generator (``bing``, ``graph_segments``, ``selective_search``...).
        params: the generator's parameters (``top_k``, ``max_side``, ``model_dir``...).
        workers: processes (each single-threaded), >= 1.
        shard: ``(index, count)``: this process builds every count-th image from index.
        chunk_size: images per resumable unit of work, >= 1.
        max_pixels: larger images are recorded as failures without being decoded.
        restart: discard an unfinished build of ``out`` instead of resuming it.

    Returns:
        a :class:`BuildSummary`; failures are also written to ``<out>.failures.tsv``.

    Raises:
        ValueError: bad arguments, a folder without images, or an unfinished build of ``out``
            with other settings (resume only with the same ones, or ``restart=True``).
        objcrop_plugin.files.OutputLockedError: another build of ``out`` is running.
        BuildInterrupted: Ctrl-C; finished chunks are kept for the next run to resume.
        BuildWorkerDied: a worker process died (killed by the out-of-memory killer, a crash
            in native code); finished chunks are kept for the next run to resume.
    """
    t0 = time.perf_counter()
    for name, value in (("workers", workers), ("chunk_size", chunk_size),
                        ("max_pixels", max_pixels)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    params = dict(params or {})
    root = Path(images_dir)
    out = shard_path(out, *shard)
    all_keys = list_images(root)
    if not all_keys:
        raise ValueError(
            f"no images under {root} (looked for image files, hidden ones excluded); nothing "
            f"to build, {out} was not written. Fix: check the folder."
        )
    keys = all_keys[shard[0] :: shard[1]]
    if not keys:
        log.warning("shard %d/%d of %s has no images (%d in all): writing an empty store",
                    shard[0], shard[1], root, len(all_keys))
    generator = make_generator(method, **params)  # fail fast on a bad method / parameters
    parts = _parts_dir(out)
    # where and in what batches the network runs is no setting of the boxes: each shard of a
    # build may run on its own device, a resumed build on another
    kept = {k: v for k, v in params.items() if k not in RUNTIME_PARAMS}
    manifest = _manifest(method, kept, generator, root, keys, chunk_size, shard, max_pixels)
    settings = _settings_digest(manifest)
    # what every shard of one build shares (not the shard, folder path or chunking)
    build_settings = _settings_digest({
        "method": method, "params": kept, "top_k": manifest["top_k"],
        "max_side": manifest["max_side"], "max_pixels": max_pixels,
        "inputs_sha256": manifest["inputs_sha256"],
        "images_sha256": hashlib.sha256("\n".join(all_keys).encode("utf-8")).hexdigest(),
    })
    batched = getattr(generator, "batched", False)
    if not batched:
        del generator  # worker processes make their own
    with output_lock(out):
        # what a SIGKILLed write of the store or its failures list left behind
        remove_temporaries(out)
        remove_temporaries(failures_path(out))
        _resumable_chunks(parts, manifest, restart)
        chunks = [keys[s : s + chunk_size] for s in range(0, len(keys), chunk_size)]
        files = [parts / f"chunk-{c:06d}.jsonl" for c in range(len(chunks))]
        todo = [(c, chunks[c], str(files[c])) for c in range(len(chunks)) if not files[c].exists()]
        summary = BuildSummary(out=out)
        summary.resumed_images = sum(len(chunks[c]) for c in range(len(chunks))
                                     if files[c].exists())
        init = (method, params, str(root), max_pixels, settings)

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(keys), initial=summary.resumed_images, unit="img",
                       smoothing=0.1, desc=f"proposals ({method})", dynamic_ncols=True)
        try:
            if todo and batched:
                _run_batched(generator, root, todo, workers if workers > 1 else 0, max_pixels,
                             settings, bar)
            elif todo and workers <= 1:
                _init_worker(*init)
                for task in todo:
                    _, n = _run_chunk(task)
                    if bar is not None:
                        bar.update(n)
            elif todo:
                _run_pool(todo, workers, mp.get_context(mp_context), init, bar)
        except KeyboardInterrupt:
            done = [c for c in range(len(chunks)) if files[c].exists()]
            saved = sum(len(chunks[c]) for c in done)
            raise BuildInterrupted(
                f"interrupted: {saved} of {len(keys)} images ({len(done)} of {len(chunks)} "
                f"chunks) are saved in {parts}; {out} was not written. Run the same command "
                "again to resume."
            ) from None
        except BrokenProcessPool:
            done = [c for c in range(len(chunks)) if files[c].exists()]
            saved = sum(len(chunks[c]) for c in done)
            raise BuildWorkerDied(
                "a worker process died (killed, e.g. by the out-of-memory killer, or crashed): "
                f"{saved} of {len(keys)} images ({len(done)} of {len(chunks)} chunks) are "
                f"saved in {parts}; {out} was not written. Run the same command again to "
                "resume (with fewer --workers or a lower --max-pixels if memory ran out)."
            ) from None
        finally:
            if bar is not None:
                bar.close()

        # assemble, in key order, into the store and the failures file
        def records() -> Iterator[ProposalRecord]:
            for f in files:
                for rec, key, error in _read_chunk(f):
                    if rec is None:
                        summary.failures.append((key, error or "unknown error"))
                        continue
                    summary.boxes += len(rec.boxes)
                    summary.empty += len(rec.boxes) == 0
                    yield rec

        meta = {"method": method, "params": kept, "generator": "objcrop_plugin",
                "settings": build_settings,
                # the same in every shard: a sample of the whole folder's image list
                "files": file_sample(root, all_keys)}
        if shard[1] > 1:  # merge checks that it has every shard of one build
            meta["shard"] = list(shard)
        # an earlier build's failures list goes first: a kill between the store and its list
        # leaves the new store without one (the parts remain: rerunning writes both), never
        # beside a list of another build's failures
        remove_stale_failures(out)
        with ProposalStoreWriter(out, meta) as writer:
            for rec in records():
                writer.add_record(rec)
        summary.images = len(keys)
        if summary.failures:
            # tabs, line breaks and backslashes in a key are escaped: one row per image
            write_bad_list(failures_path(out), summary.failures, ("key", "reason"))
        shutil.rmtree(parts, ignore_errors=True)
    summary.seconds = time.perf_counter() - t0
    return summary


def _shard_of(store: ProposalStore) -> tuple[int, int] | None:
    shard = store.meta.get("shard")
    if (isinstance(shard, list) and len(shard) == 2 and all(isinstance(v, int) for v in shard)
            and 0 <= shard[0] < shard[1]):
        return shard[0], shard[1]
    return None


def _shards_held(store: ProposalStore) -> tuple[list[int], int] | None:
    """The shards a store holds and their count: one for a shard, several for the result of a
    ``--allow-partial`` merge (its ``partial_shards``); ``None`` for any other store."""
    shard = _shard_of(store)
    if shard is not None:
        return [shard[0]], shard[1]
    partial = store.meta.get("partial_shards")
    if isinstance(partial, dict):
        held, n = partial.get("merged"), partial.get("of")
        if (isinstance(n, int) and isinstance(held, list) and held
                and all(isinstance(i, int) and 0 <= i < n for i in held)):
            return sorted(set(held)), n
    return None


def _build_of(store: ProposalStore) -> tuple[Any, ...] | None:
    """What a store built by a generator was built with (``None``: an imported store)."""
    meta = store.meta
    if "method" not in meta:
        return None
    return meta.get("method"), json.dumps(meta.get("params"), sort_keys=True), \
        meta.get("settings")


def _check_merge(stores: Sequence[ProposalStore], allow_partial: bool,
                 allow_mixed: bool) -> dict[str, Any]:
    """Refuse shards of different builds, a built store with an imported one, a shard given
    twice, or an incomplete set of shards.

    Returns extra metadata for the merged store (which shards a partial merge holds).
    """
    if allow_mixed:
        return {}
    builds = [(s, b) for s in stores if (b := _build_of(s)) is not None]
    imported = [s for s in stores if _build_of(s) is None]
    if builds and imported:
        raise ValueError(
            f"{builds[0][0].path} was built by `objcrop proposals build` (method "
            f"{builds[0][1][0]!r}) and {imported[0].path} was imported (no build method): "
            "merging them would make one store of two kinds of proposals. Fix: merge stores "
            "of one kind only, or pass --allow-mixed to join them anyway."
        )
    for s, b in builds[1:]:
        s0, b0 = builds[0]
        if b[:2] != b0[:2]:
            what = f"method {b0[0]!r} with params {b0[1]} vs method {b[0]!r} with params {b[1]}"
        elif None not in (b[2], b0[2]) and b[2] != b0[2]:  # older stores have no digest
            what = ("the same method and params, but another image list, top_k/max_side or "
                    "--max-pixels")
        else:
            continue
        raise ValueError(
            f"{s0.path} and {s.path} come from different builds ({what}); merging them would "
            "make one store of two kinds of proposals. Fix: merge the shards of one build "
            "only, rebuild the odd one with the same command, or pass --allow-mixed to join "
            "them anyway."
        )
    shards = [(s, _shards_held(s)) for s in stores]
    first = next(((s, sh) for s, sh in shards if sh is not None), None)
    if first is None:
        return {}

    def held(sh: tuple[list[int], int]) -> str:
        ids, n = sh
        return f"shard {ids[0]} of {n}" if len(ids) == 1 else \
            f"shards {', '.join(map(str, ids))} of {n}"

    for s, sh in shards:
        if sh is not None and sh[1] == first[1][1]:
            continue
        this = "is not a shard" if sh is None else f"holds {held(sh)}"
        raise ValueError(
            f"{s.path} {this}, but {first[0].path} holds {held(first[1])}: they are not "
            "shards of one build. Fix: merge the shards of one build only (or pass "
            "--allow-mixed)."
        )
    n = first[1][1]
    owner: dict[int, ProposalStore] = {}
    for s, sh in shards:
        assert sh is not None
        for i in sh[0]:
            if i in owner:
                raise ValueError(
                    f"shard {i} of {n} is given twice ({owner[i].path} and {s.path}). "
                    "Fix: merge each shard once."
                )
            owner[i] = s
    missing = [i for i in range(n) if i not in owner]
    if missing and not allow_partial:
        names = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"incomplete set of shards: {len(missing)} of {n} missing (shard {names}); the "
            "merged store would silently lack their images. Fix: build the missing shards "
            "(--shard i/N) and merge all of them, or pass --allow-partial to merge these only."
        )
    return {"partial_shards": {"merged": sorted(owner), "of": n}} if missing else {}


def merge_stores(
    out: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    allow_partial: bool = False,
    allow_mixed: bool = False,
) -> int:
    """Join stores (e.g. the shards of a build) into one, keys sorted; returns the image count.

    Shards carry their index, count and a digest of their build's settings in their metadata.
    Merging shards checks that they come from one build and that every shard ``0..N-1`` is
    there (the result of a ``--allow-partial`` merge counts as the shards it holds, so it can
    be completed later); stores made by builds with another method or parameters, or a built
    store with an imported one, are refused too. The
    shards' failure lists are joined into ``<out>.failures.tsv`` (an earlier one is removed
    when they have none).

    Args:
        out: the merged store.
        inputs: the stores to join.
        allow_partial: merge an incomplete set of shards (the merged metadata says which
            shards it holds, under ``partial_shards``).
        allow_mixed: join stores of different builds (the merged metadata is then
            ``{"merged_from": [...]}``).

    Raises:
        ValueError: a key in more than one input (the message names both files), shards of
            different builds, a shard given twice, or missing shards.
    """
    if not inputs:
        raise ValueError("merge needs at least one input store")
    stores = [ProposalStore(p) for p in inputs]
    extra = _check_merge(stores, allow_partial, allow_mixed)
    owner: dict[str, int] = {}
    for si, store in enumerate(stores):
        for key in store:
            if key in owner:
                raise ValueError(
                    f"key '{key}' is in both {stores[owner[key]].path} and {store.path}: merge "
                    "joins stores of disjoint images (the shards of a build, or stores of "
                    "different folders), and each image's boxes come from one store. Fix: "
                    "merge each shard once, and shards of the same build only; for two "
                    "sources of boxes for the same images, pick one per run (data.proposals), "
                    "or export both (`objcrop proposals export`), join each image's boxes in "
                    "one JSON Lines record and import that"
                )
            owner[key] = si
    # what a shard or a partial merge says of itself is not what tells builds apart
    metas = [{k: v for k, v in s.meta.items() if k not in ("shard", "partial_shards")}
             for s in stores]
    meta = metas[0] if all(m == metas[0] for m in metas) else {"merged_from": [str(p) for p in inputs]}
    meta = {**meta, **extra}

    def records() -> Iterator[ProposalRecord]:
        for key in sorted(owner):
            p = stores[owner[key]][key]
            yield ProposalRecord(key, np.array(p.boxes), np.array(p.scores), p.image_size)

    remove_stale_failures(out)  # first: never an earlier list beside the merged store
    ProposalStore.write(out, records(), meta)
    # the shards' failure lists follow their stores
    failures = []
    for p in inputs:
        f = failures_path(Path(p))
        if f.exists():
            # rows end in "\n" only (fields are escaped): not splitlines(), which also
            # splits at \r, \x1c or \u2028 inside a key
            text = f.read_bytes().decode("utf-8")  # no newline translation of a \r
            failures += [row for row in text.split("\n")[1:] if row]
    if failures:
        # in key order, as an unsharded build lists them (the rows' escapes sort otherwise)
        failures.sort(key=lambda row: _unescape(row.split("\t", 1)[0]))
        body = "key\treason\n" + "".join(line + "\n" for line in failures)
        atomic_write(failures_path(Path(out)), [body.encode("utf-8")])
    return len(owner)


def _unescape(field: str) -> str:
    """A field of :func:`~objcrop_plugin.images.write_bad_list` as it was written."""
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n"}.get(m[1], m[1]), field)
