"""The proposal store: per-image boxes, scores and image size in one memory-mapped file.

Layout (little-endian; no pickle anywhere, so a store from a stranger cannot run code)::

    0   8 bytes   magic b"OBJCROPS"
    8   u32       format version (1)
    12  u32       length of the JSON header
    16  u32       CRC-32 of the JSON header
    20  u32       reserved (0)
    24  ...       JSON header: counts, section offsets/dtypes/shapes/CRC-32s, user metadata
    (64-byte aligned) sections:
        key_hash    u64[N]     64-bit BLAKE2b of each key
        key_offsets i64[N+1]   into `keys`
        keys        u8[...]    UTF-8 keys, concatenated
        box_offsets i64[N+1]   into `boxes` / `scores`
        boxes       f32[M, 4]  xyxy pixels of the image the boxes were computed on
        scores      f32[M]     NaN where the source gave no scores (the order is the ranking)
        sizes       i32[N, 2]  (width, height) the boxes refer to
        table       i64[C]     open-addressing hash table (linear probing), record index or -1

Lookup hashes the key and probes the table: O(1), a few microseconds, touching a handful of
pages. DataLoader workers share the mapping (fork) or reopen the file by path (spawn), so no
worker loads or copies the store. Writes go to a temporary file in the same folder that is
renamed over the target only when complete (atomic on POSIX and Windows).

Example:
    >>> import numpy as np, tempfile, os
    >>> from objcrop_plugin.proposals import ProposalStore
    >>> path = os.path.join(tempfile.mkdtemp(), "p.objcrop")
    >>> ProposalStore.write(path, [("a.jpg", [[1, 2, 30, 40]], [0.9], (64, 48))])
    >>> store = ProposalStore(path)
    >>> store["a.jpg"].boxes.tolist(), store["a.jpg"].image_size
    ([[1.0, 2.0, 30.0, 40.0]], (64, 48))
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import stat
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import boxes as box_ops
from ..files import OutputKind, atomic_write, normalize_key, other_unicode_forms

_log = logging.getLogger(__name__)

__all__ = [
    "STORE_KIND",
    "MissingProposalsError",
    "ProposalRecord",
    "ProposalStore",
    "ProposalStoreWriter",
    "Proposals",
    "StoreFormatError",
    "normalize_key",
]

MAGIC = b"OBJCROPS"
VERSION = 1
_PREAMBLE = struct.Struct("<8sIIII")
_ALIGN = 64
_LITTLE = sys.byteorder == "little"
_MAX_SIDE = 2**31 - 1  # sizes are stored as int32

#: what the store-writing commands (proposals build, import, merge) may replace with --out
STORE_KIND = OutputKind("proposal store", lambda head: head.startswith(MAGIC))

#: what a build or merge may replace beside the store: its own failures list
FAILURES_KIND = OutputKind("failures list", lambda head: head.startswith(b"key\treason\n"))


def failures_path(out: str | os.PathLike[str]) -> Path:
    """The failures list beside a store: ``<out>.failures.tsv``."""
    out = Path(out)
    return out.with_name(out.name + ".failures.tsv")


#: how many images a store's ``files`` sample names (spread over the folder's image list)
FILE_SAMPLE = 16


def file_sample(root: str | os.PathLike[str], keys: Sequence[str], n: int = FILE_SAMPLE
                ) -> list[list[Any]]:
    """``[[key, bytes], ...]`` of ``n`` images spread evenly over ``keys`` (``-1``: the file
    cannot be read): written into a built store's metadata, so that a store is recognised
    when used with another folder of the same file names and image sizes (a regenerated
    dataset, another split named alike)."""
    if not keys:
        return []
    step = max(1, len(keys) // n)
    out = []
    for key in list(keys)[::step][:n]:
        try:
            size = os.stat(os.path.join(root, key)).st_size
        except OSError:
            size = -1
        out.append([key, int(size)])
    return out


def files_changed(store: ProposalStore, root: str | os.PathLike[str]) -> tuple[int, int, str]:
    """How many of the images a store's metadata names (``files``, see :func:`file_sample`)
    now have another file size under ``root``: ``(changed, compared, example)``; ``(0, 0, "")``
    for a store without the sample (imported, or built before it was recorded)."""
    sample = store.meta.get("files")
    if not isinstance(sample, list):
        return 0, 0, ""
    changed, compared, example = 0, 0, ""
    for item in sample:
        if not (isinstance(item, list) and len(item) == 2 and item[1] != -1):
            continue
        key, size = item
        try:
            now = os.stat(os.path.join(root, key)).st_size
        except (OSError, TypeError, ValueError):
            continue  # not in this folder (a subset, or renamed): nothing to compare
        compared += 1
        if now != size:
            changed += 1
            example = example or f"'{key}': {size} bytes when the store was built, {now} now"
    return changed, compared, example


def sizes_fit_none(store: ProposalStore, pairs: Iterable[tuple[str, str | os.PathLike[str]]],
                   limit: int = 32) -> str | None:
    """Whether ``store`` was built for other images: of up to ``limit`` ``(key, path)`` with
    an entry and a readable header, every stored size has another aspect ratio than the
    image (every sample would take scene crops). ``None`` when one agrees or none could be
    checked, else an example for the error message."""
    from ..images import upright_size

    checked, example = 0, None
    for key, path in pairs:
        if checked >= limit:
            break
        props = store.get(key)
        if props is None:
            continue
        size = upright_size(path)
        if size is None:
            continue
        checked += 1
        if box_ops.size_mismatch(props.image_size, size) is None:
            return None
        if example is None:
            (sw, sh), (w, h) = props.image_size, size
            example = f"'{key}': stored {sw}x{sh}, image {w}x{h}"
    return None if not checked else f"{checked} of {checked} images checked (e.g. {example})"


def warn_if_files_changed(store: ProposalStore, root: str | os.PathLike[str]) -> int:
    """Log a warning when images a store's build recorded (:func:`file_sample`) have another
    file size under ``root`` now; the number changed."""
    changed, compared, example = files_changed(store, root)
    if changed:
        _log.warning(
            "%s: %d of the %d images it recorded at its build have another file size in %s "
            "(e.g. %s): %s. Fix: rebuild the store if these are other images",
            store.path, changed, compared, root, example,
            "the store was built for other images of the same names (a regenerated dataset, "
            "another split named alike), whose boxes would land on other objects"
            if changed == compared else "those images changed since the store was built")
    return changed


def remove_stale_failures(out: str | os.PathLike[str]) -> None:
    """Remove ``<out>.failures.tsv`` when it is a failures list objcrop wrote (one left by an
    earlier build of ``out`` would describe another store); leave any other file alone."""
    path = failures_path(out)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # a link, FIFO or folder: not ours
            return
        with open(path, "rb") as f:
            ours = FAILURES_KIND.matches(f.read(FAILURES_KIND.head_bytes))
        if ours:
            path.unlink()
    except OSError:  # absent, or not ours to read
        pass


# every section a store has: (dtype, shape as a function of n_images N and n_boxes M)
_SECTIONS: dict[str, tuple[str, Any]] = {
    "key_hash": ("<u8", lambda n, m: [n]),
    "key_offsets": ("<i8", lambda n, m: [n + 1]),
    "keys": ("|u1", None),
    "box_offsets": ("<i8", lambda n, m: [n + 1]),
    "boxes": ("<f4", lambda n, m: [m, 4]),
    "scores": ("<f4", lambda n, m: [m]),
    "sizes": ("<i4", lambda n, m: [n, 2]),
    "table": ("<i8", None),
}


class StoreFormatError(ValueError):
    """The file is not a proposal store, or it is truncated or corrupted."""


class MissingProposalsError(KeyError):
    """A key has no entry in the store (raised in strict mode, or by ``store[key]``)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _hash(key_bytes: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key_bytes, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Proposals:
    """The proposals of one image.

    Attributes:
        boxes: ``(K, 4)`` float xyxy pixels of an image of ``image_size``.
        scores: ``(K,)`` float; NaN when the source gave none (then the order is the ranking).
        image_size: ``(width, height)`` of the image the boxes refer to.
    """

    boxes: np.ndarray
    scores: np.ndarray
    image_size: box_ops.ImageSize

    def rescaled(self, to_size: tuple[int, int]) -> Proposals:
        """The same proposals in pixels of the image resized to ``to_size`` (width, height).

        Each axis is scaled on its own. That is right for the same image at another resolution;
        for another aspect ratio (see :func:`~objcrop_plugin.boxes.size_mismatch`) it is
        another image, or the same one turned by an EXIF orientation mismatch, and the view
        engines do not use its boxes (scene crops, counted as ``mismatched``).
        """
        to_size = box_ops.ImageSize(int(to_size[0]), int(to_size[1]))
        if to_size == self.image_size:
            return Proposals(self.boxes.astype(np.float64), self.scores, to_size)
        return Proposals(box_ops.rescale(self.boxes, self.image_size, to_size), self.scores, to_size)


@dataclass(frozen=True)
class ProposalRecord:
    """One image's entry, as written to or read from a store or a JSON Lines file."""

    key: str
    boxes: np.ndarray
    scores: np.ndarray
    image_size: box_ops.ImageSize

    def to_json(self) -> dict[str, Any]:
        """The JSON Lines object: strict JSON, so boxes with a NaN or infinite coordinate (no
        crop policy can use them) are left out and a NaN score is ``null``."""
        # str() of a float32 is the shortest decimal that reads back as the same float32, so an
        # export -> import round trip is exact (rounding to a few decimals merged close scores)
        boxes, scores = _f32(self.boxes), _f32(self.scores)
        keep = np.isfinite(boxes).all(axis=1) if boxes.size else np.ones(len(boxes), bool)
        return {
            "key": self.key,
            "width": int(self.image_size[0]),
            "height": int(self.image_size[1]),
            "boxes": [[float(str(v)) for v in b] for b in boxes[keep]],
            "scores": [None if not np.isfinite(s) else float(str(s)) for s in scores[keep]],
        }


def _f32(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _as_record(item: Any) -> ProposalRecord:
    if isinstance(item, ProposalRecord):  # checked too: it is a plain named tuple
        return _record_from(item.key, item.boxes, item.scores, item.image_size)
    if isinstance(item, dict):
        return _record_from(
            item.get("key"), item.get("boxes"), item.get("scores"),
            (item.get("width"), item.get("height")),
        )
    key, boxes, scores, size = item
    return _record_from(key, boxes, scores, size)


def _side(v: Any) -> int:
    """An image side: an integer, or an integral float (not a bool, a string or 10.7)."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    raise TypeError(v)


def _record_from(key: Any, boxes: Any, scores: Any, image_size: Any) -> ProposalRecord:
    if not isinstance(key, str) or not key:
        raise ValueError(f"a proposal key must be a non-empty string, got {key!r}")
    key = normalize_key(key)
    try:
        b = box_ops.as_boxes(boxes if boxes is not None else [])
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    if scores is None:
        s = np.full(len(b), np.nan)
    else:
        s = np.asarray([np.nan if v is None else v for v in scores], dtype=np.float64).reshape(-1)
        if s.shape[0] != b.shape[0]:
            raise ValueError(f"{key}: {b.shape[0]} boxes but {s.shape[0]} scores")
    try:
        w, h = (_side(v) for v in image_size)
    except Exception:
        raise ValueError(
            f"{key}: image size must be (width, height) integers, got {image_size!r}"
        ) from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{key}: image size must be positive, got {(w, h)}")
    if w > _MAX_SIDE or h > _MAX_SIDE:
        raise ValueError(f"{key}: image size {(w, h)} is too large (at most {_MAX_SIDE} a side)")
    return ProposalRecord(key, b.astype(np.float32), s.astype(np.float32), box_ops.ImageSize(w, h))


def _hash_table(hashes: np.ndarray) -> np.ndarray:
    """Open addressing with linear probing, built vectorised (one round per probe step)."""
    n = len(hashes)
    cap = 1 << max(4, int(np.ceil(np.log2(max(2 * n, 1)))))
    mask = np.uint64(cap - 1)
    table = np.full(cap, -1, dtype=np.int64)
    pending = np.arange(n, dtype=np.int64)
    pos = (hashes & mask).astype(np.int64)
    while pending.size:
        free = table[pos] == -1
        cand, cpos = pending[free], pos[free]
        slots, first = np.unique(cpos, return_index=True)
        table[slots] = cand[first]
        placed = np.zeros(pending.size, dtype=bool)
        placed[np.flatnonzero(free)[first]] = True
        pending, pos = pending[~placed], (pos[~placed] + 1) & (cap - 1)
    return table


class ProposalStoreWriter:
    """Collects records and writes a store atomically on :meth:`close` (or leaving ``with``).

    Leaving the ``with`` block on an exception writes nothing and leaves any existing file at
    ``path`` untouched.
    """

    def __init__(self, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta = dict(meta or {})
        self._keys: list[bytes] = []
        self._seen: set[str] = set()
        self._boxes: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._sizes: list[tuple[int, int]] = []
        self._sections: dict[str, np.ndarray] | None = None
        self._closed = False

    def add(
        self,
        key: str,
        boxes: Any,
        scores: Any = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        """Add one image: ``boxes`` (K, 4) xyxy pixels of an image of ``image_size`` (w, h)."""
        self._append(_record_from(key, boxes, scores, image_size))

    def add_record(self, rec: ProposalRecord) -> None:
        """Add one image's :class:`ProposalRecord` (checked and its key normalised as by
        :meth:`add`)."""
        self._append(_as_record(rec))

    def _append(self, rec: ProposalRecord) -> None:
        if rec.key in self._seen:
            raise ValueError(f"duplicate key '{rec.key}' in proposal store {self.path}")
        self._seen.add(rec.key)
        self._keys.append(rec.key.encode("utf-8"))
        self._boxes.append(rec.boxes)
        self._scores.append(rec.scores)
        self._sizes.append(rec.image_size)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        """Write the store (atomically); a no-op once written. After a failed write (a full
        disk) calling it again retries with the same records."""
        if self._closed:
            return
        n = len(self._keys)
        if self._sections is None:
            self._sections = self._build_sections(n)
        _write_sections(self.path, self._sections, n, self.meta)
        self._sections = None
        self._closed = True

    def _build_sections(self, n: int) -> dict[str, np.ndarray]:
        key_lens = np.fromiter((len(k) for k in self._keys), dtype=np.int64, count=n)
        box_lens = np.fromiter((len(b) for b in self._boxes), dtype=np.int64, count=n)
        hashes = np.fromiter((_hash(k) for k in self._keys), dtype=np.uint64, count=n)
        sections = {
            "key_hash": hashes.astype("<u8"),
            "key_offsets": np.concatenate([[0], np.cumsum(key_lens)]).astype("<i8"),
            "keys": np.frombuffer(b"".join(self._keys), dtype=np.uint8),
            "box_offsets": np.concatenate([[0], np.cumsum(box_lens)]).astype("<i8"),
            "boxes": (np.concatenate(self._boxes) if n else np.zeros((0, 4))).astype("<f4"),
            "scores": (np.concatenate(self._scores) if n else np.zeros(0)).astype("<f4"),
            "sizes": np.asarray(self._sizes, dtype="<i4").reshape(n, 2),
            "table": _hash_table(hashes).astype("<i8"),
        }
        self._boxes, self._scores = [], []  # the sections hold them now
        return sections

    def __enter__(self) -> ProposalStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True


def _write_sections(path: Path, sections: dict[str, np.ndarray], n: int, meta: dict) -> None:
    def header_for(start: int) -> tuple[dict, list[tuple[int, np.ndarray]]]:
        layout, placed, off = {}, [], start
        for name, arr in sections.items():
            off = -(-off // _ALIGN) * _ALIGN
            arr = np.ascontiguousarray(arr)
            layout[name] = {
                "offset": off,
                "dtype": arr.dtype.str,
                "shape": list(arr.shape),
                "crc32": zlib.crc32(arr.data) & 0xFFFFFFFF,
            }
            placed.append((off, arr))
            off += arr.nbytes
        head = {
            "format": "objcrop-proposals",
            "version": VERSION,
            "n_images": n,
            "n_boxes": int(sections["boxes"].shape[0]),
            "table_size": int(sections["table"].shape[0]),
            "file_size": off,
            "sections": layout,
            "meta": meta,
        }
        return head, placed

    # The header's length fixes where the data starts: iterate until it is stable.
    start = -(-(_PREAMBLE.size + 512) // _ALIGN) * _ALIGN
    while True:
        head, placed = header_for(start)
        blob = json.dumps(head, sort_keys=True).encode("utf-8")
        need = -(-(_PREAMBLE.size + len(blob)) // _ALIGN) * _ALIGN
        if need <= start:
            break
        start = need

    def chunks() -> Iterator[bytes | memoryview]:
        pre = _PREAMBLE.pack(MAGIC, VERSION, len(blob), zlib.crc32(blob) & 0xFFFFFFFF, 0)
        written = len(pre) + len(blob)
        yield pre
        yield blob
        for off, arr in placed:
            yield b"\0" * (off - written)
            if arr.nbytes:  # memoryview cannot cast an empty array (a store with no boxes)
                yield memoryview(arr).cast("B")
            written = off + arr.nbytes

    atomic_write(path, chunks())


class ProposalStore:
    """Read-only, memory-mapped proposal store with O(1) lookup by key.

    Args:
        path: the store file.
        strict: a missing key raises :class:`MissingProposalsError` from :meth:`lookup`
            instead of returning ``None``.
        verify: check every section's CRC-32 on opening (reads the whole file once). The file
            size and header are always checked. Workers that receive a store from the main
            process skip this (the main process checked it) and instead check that the file
            is the one the main process opened.

    Raises:
        FileNotFoundError: no file at ``path``.
        StoreFormatError: not a store, truncated, or corrupted (the message says which).
    """

    def __init__(
        self, path: str | os.PathLike[str], strict: bool = False, verify: bool = True
    ) -> None:
        self.path = Path(path)
        self.strict = strict
        self._mm: mmap.mmap | None = None
        self._fingerprint: tuple[int, int] | None = None
        self._open(verify=verify)

    # -- opening ---------------------------------------------------------------------------
    def _fail(self, why: str) -> StoreFormatError:
        return StoreFormatError(
            f"{self.path}: {why}. Fix: rebuild the store (`objcrop proposals build ...`) or "
            "re-import it from JSON Lines (`objcrop proposals import ...`)."
        )

    def _open(self, verify: bool) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"proposal store not found: {self.path}")
        if self.path.is_dir():
            raise IsADirectoryError(
                f"{self.path} is a folder, not a proposal store (one .objcrop file). Fix: "
                f"`objcrop proposals build {self.path} -o STORE.objcrop` makes one for its images"
            )
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _PREAMBLE.size:
                raise self._fail(f"file is {size} bytes, too short to be a proposal store")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, version, hlen, hcrc, _ = _PREAMBLE.unpack_from(mm, 0)
        if magic != MAGIC:
            mm.close()
            raise self._fail(f"not an objcrop proposal store (magic {magic!r})")
        if version != VERSION:
            mm.close()
            raise self._fail(f"store format version {version}, this objcrop-plugin reads {VERSION}")
        blob = mm[_PREAMBLE.size : _PREAMBLE.size + hlen]
        if len(blob) != hlen or zlib.crc32(blob) & 0xFFFFFFFF != hcrc:
            mm.close()
            raise self._fail("header is truncated or corrupted (CRC-32 mismatch)")
        try:
            head = json.loads(blob)
            layout = self._check_layout(head, size, _PREAMBLE.size + hlen)
        except StoreFormatError:
            mm.close()
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            mm.close()
            raise self._fail(f"header is malformed ({type(exc).__name__}: {exc})") from None
        self._mm = mm
        self._head = head
        self.meta: dict[str, Any] = head.get("meta", {})
        arrays = {}
        for name, (dtype, shape, offset) in layout.items():
            count = int(np.prod(shape))
            arr = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
            if verify and zlib.crc32(arr.data) & 0xFFFFFFFF != head["sections"][name]["crc32"]:
                raise self._fail(f"section '{name}' is corrupted (CRC-32 mismatch)")
            arrays[name] = arr
        if verify:
            self._check_content(arrays)
        self._n = int(head["n_images"])
        self._key_hash = arrays["key_hash"]
        self._keys = arrays["keys"]
        self._boxes = arrays["boxes"]
        self._scores = arrays["scores"]
        self._sizes = arrays["sizes"]
        self._key_offsets = arrays["key_offsets"]
        self._box_offsets = arrays["box_offsets"]
        self._table = arrays["table"]
        self._mask = len(self._table) - 1
        # memoryview casts index ~3x faster than numpy scalars on the lookup path
        if _LITTLE:
            self._t = memoryview(self._table).cast("B").cast("q")
            self._kh = memoryview(self._key_hash).cast("B").cast("Q")
            self._ko = memoryview(self._key_offsets).cast("B").cast("q")
            self._bo = memoryview(self._box_offsets).cast("B").cast("q")
        else:  # pragma: no cover - big-endian hosts
            self._t, self._kh = self._table, self._key_hash
            self._ko, self._bo = self._key_offsets, self._box_offsets
        self._keys_off = head["sections"]["keys"]["offset"]
        # the header holds every section's CRC-32: a rebuild with the same keys but other boxes
        # changes it, where the table's CRC alone would not
        self._fingerprint = (size, int(hcrc))

    def _check_layout(
        self, head: Any, size: int, data_start: int
    ) -> dict[str, tuple[str, list[int], int]]:
        """Sections' dtypes, shapes and extents against the counts, before mapping any."""
        if not isinstance(head, dict) or not isinstance(head.get("sections"), dict):
            raise self._fail("header is malformed (no sections)")
        if head.get("file_size") != size:
            raise self._fail(
                f"file is {size} bytes but its header says {head.get('file_size')}: truncated "
                "or appended to"
            )
        n, m = head.get("n_images"), head.get("n_boxes")
        if not (isinstance(n, int) and isinstance(m, int) and n >= 0 and m >= 0):
            raise self._fail(f"header counts are invalid (n_images={n!r}, n_boxes={m!r})")
        layout = {}
        for name, (dtype, expect) in _SECTIONS.items():
            spec = head["sections"].get(name)
            if not isinstance(spec, dict):
                raise self._fail(f"section '{name}' is missing from the header")
            shape, offset = spec.get("shape"), spec.get("offset")
            if not isinstance(spec.get("crc32"), int):
                raise self._fail(f"section '{name}' has no CRC-32 in the header")
            if spec.get("dtype") != dtype:
                raise self._fail(f"section '{name}' has dtype {spec.get('dtype')!r}, not {dtype}")
            if not (isinstance(shape, list) and all(isinstance(v, int) and v >= 0 for v in shape)):
                raise self._fail(f"section '{name}' has an invalid shape {shape!r}")
            if expect is not None and shape != expect(n, m):
                raise self._fail(
                    f"section '{name}' has shape {shape}, expected {expect(n, m)} for {n} images "
                    f"and {m} boxes"
                )
            nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
            if not (isinstance(offset, int) and offset >= data_start and offset + nbytes <= size):
                raise self._fail(
                    f"section '{name}' ({nbytes} bytes at offset {offset!r}) lies outside the "
                    f"file ({size} bytes)"
                )
            layout[name] = (dtype, shape, offset)
        keys_shape, table_shape = layout["keys"][1], layout["table"][1]
        if len(keys_shape) != 1:
            raise self._fail(f"section 'keys' has shape {keys_shape}, expected one dimension")
        c = table_shape[0] if len(table_shape) == 1 else 0
        # a power of two with at least one empty slot, or a probe for a missing key never ends
        if not (c > n and c & (c - 1) == 0):
            raise self._fail(
                f"hash table has shape {table_shape}; it needs a power-of-two size above the "
                f"{n} images"
            )
        return layout

    def _check_content(self, a: dict[str, np.ndarray]) -> None:
        """Values the lookups index with: vectorised, O(file) once on opening."""
        n, m = len(a["key_hash"]), len(a["boxes"])
        table = a["table"]
        if ((table < -1) | (table >= n)).any():
            bad = table[(table < -1) | (table >= n)][0]
            raise self._fail(f"hash table entry {int(bad)} is outside [-1, {n})")
        used = table[table >= 0]
        if used.size != n or (n and np.bincount(used, minlength=n).max() != 1):
            raise self._fail(f"hash table holds {used.size} entries for {n} images (each once)")
        for name, end in (("key_offsets", len(a["keys"])), ("box_offsets", m)):
            off = a[name]
            if off[0] != 0 or off[-1] != end or (np.diff(off) < 0).any():
                raise self._fail(
                    f"section '{name}' does not rise from 0 to {end} (entries out of order or "
                    "out of bounds)"
                )
        if (a["sizes"] <= 0).any():
            raise self._fail("an image size is not positive")

    # -- pickling: by path, so workers map the file instead of copying it --------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "strict": self.strict, "fingerprint": self._fingerprint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.strict = state["strict"]
        self._mm = None
        self._open(verify=False)
        if state["fingerprint"] is not None and self._fingerprint != tuple(state["fingerprint"]):
            raise StoreFormatError(
                f"{self.path}: the store changed on disk after the main process opened it. "
                "Fix: do not rebuild a store while a job reads it."
            )

    def close(self) -> None:
        for name in ("_t", "_kh", "_ko", "_bo"):
            view = self.__dict__.pop(name, None)
            if isinstance(view, memoryview):
                view.release()
        self.__dict__.pop("_table", None)
        for name in ("_key_hash", "_keys", "_boxes", "_scores", "_sizes", "_key_offsets",
                     "_box_offsets"):
            self.__dict__.pop(name, None)
        # np.frombuffer views keep the mmap alive until they are collected; let GC close it
        self._mm = None

    def __enter__(self) -> ProposalStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- lookup ------------------------------------------------------------------------------
    def _index(self, key: str) -> int:
        kb = key.encode("utf-8")
        h = _hash(kb)
        try:
            t, kh, ko, mm, base = self._t, self._kh, self._ko, self._mm, self._keys_off
        except AttributeError:
            raise ValueError(f"{self.path}: lookup in a closed proposal store") from None
        i = h & self._mask
        try:
            for _ in range(self._mask + 1):  # bounded: a crafted full table must not hang
                r = t[i]
                if r < 0:
                    return -1
                if kh[r] == h and mm[base + ko[r] : base + ko[r + 1]] == kb:
                    return r
                i = (i + 1) & self._mask
        except IndexError:
            raise self._fail(f"hash table entry {r} is outside [-1, {self._n})") from None
        return -1

    def _find(self, key: str) -> int:
        """:meth:`_index` of ``key``, else of its other Unicode normal form: a name written
        composed (NFC, as most tools write ``café.jpg``) finds the entry of the same name
        decomposed (NFD, as macOS file systems hand it over), and the other way round."""
        r = self._index(key)
        for other in other_unicode_forms(key) if r < 0 else ():
            if (r := self._index(other)) >= 0:
                break
        return r

    def _record(self, r: int) -> Proposals:
        a, b = self._bo[r], self._bo[r + 1]
        w, h = self._sizes[r]
        return Proposals(self._boxes[a:b], self._scores[a:b], box_ops.ImageSize(int(w), int(h)))

    def get(self, key: str | os.PathLike[str]) -> Proposals | None:
        """The proposals of ``key`` (boxes in the stored image size), or ``None``."""
        r = self._find(normalize_key(key))
        return None if r < 0 else self._record(r)

    def lookup(
        self, key: str | os.PathLike[str], image_size: tuple[int, int] | None = None
    ) -> Proposals | None:
        """The proposals of ``key``, rescaled to ``image_size`` (width, height) when given.

        Returns ``None`` for a missing key, or raises :class:`MissingProposalsError` when the
        store was opened with ``strict=True``. The view engines take the stored proposals
        (:meth:`get`) and leave rescaling to the view recipe, which refuses another aspect
        ratio (see :meth:`Proposals.rescaled`).
        """
        k = normalize_key(key)
        r = self._find(k)
        if r < 0:
            if self.strict:
                raise MissingProposalsError(self._missing_message(k))
            return None
        props = self._record(r)
        return props if image_size is None else props.rescaled(image_size)

    def _missing_message(self, key: str) -> str:
        return (
            f"no proposals for '{key}' in {self.path} ({self._n} images). Keys are paths "
            "relative to the dataset root; fix: build proposals for this image, or check that "
            "the dataset root is the one the store was built with."
        )

    def __getitem__(self, key: str | os.PathLike[str]) -> Proposals:
        k = normalize_key(key)
        r = self._find(k)
        if r < 0:
            raise MissingProposalsError(self._missing_message(k))
        return self._record(r)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, os.PathLike)) and self._find(normalize_key(key)) >= 0

    def __len__(self) -> int:
        return self._n

    def key(self, r: int) -> str:
        return bytes(self._keys[self._ko[r] : self._ko[r + 1]]).decode("utf-8")

    def keys(self) -> Iterator[str]:
        return (self.key(r) for r in range(self._n))

    __iter__ = keys

    def records(self) -> Iterator[ProposalRecord]:
        """Every entry, in the order it was written."""
        for r in range(self._n):
            p = self._record(r)
            yield ProposalRecord(self.key(r), np.array(p.boxes), np.array(p.scores), p.image_size)

    @property
    def n_boxes(self) -> int:
        return int(self._head["n_boxes"])

    def __repr__(self) -> str:
        return f"ProposalStore('{self.path}', images={self._n}, boxes={self.n_boxes})"

    # -- writing -----------------------------------------------------------------------------
    @staticmethod
    def write(
        path: str | os.PathLike[str],
        records: Iterable[Any],
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Write a store atomically from records: :class:`ProposalRecord`, mappings with
        ``key, boxes, scores, width, height``, or tuples ``(key, boxes, scores, (w, h))``."""
        with ProposalStoreWriter(path, meta) as writer:
            for item in records:
                writer.add_record(item)
