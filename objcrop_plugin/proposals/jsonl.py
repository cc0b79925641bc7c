"""JSON Lines interchange for proposal stores: one JSON object per image and line.

Each line::

    {"key": "train/000001.jpg", "width": 640, "height": 480,
     "boxes": [[x1, y1, x2, y2], ...], "scores": [0.93, ...]}

``boxes`` are float xyxy pixels of an image of ``width`` x ``height``; ``scores`` may be omitted
or ``null`` (then the order of ``boxes`` is the ranking). Blank lines are skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ..files import OutputKind, atomic_write
from .importer_base import ProposalImporter
from .store import ProposalRecord, ProposalStore, _as_record

__all__ = [
    "JSONL_KIND",
    "JsonLinesImporter",
    "ProposalFileError",
    "export_jsonl",
    "import_jsonl",
    "read_jsonl",
]

log = logging.getLogger(__name__)

_EXPORT_FIELDS = ["key", "width", "height", "boxes", "scores"]


def is_objcrop_export(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts with a line :func:`export_jsonl` wrote.

    objcrop writes compact JSON (no spaces), the fields in the order key, width, height,
    boxes, scores, and every coordinate as a float: the first line must read back and
    re-serialise to the same bytes. A hand-written file or another tool's (spaces after the
    separators, another field order, integer coordinates, a first line longer than ``head``)
    is not recognised, so ``export`` replaces it only with ``--force``.
    """
    line, newline, _ = head.partition(b"\n")
    if not newline:
        return False
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    if not isinstance(obj, dict) or list(obj) != _EXPORT_FIELDS:
        return False
    boxes = obj["boxes"]
    if not (isinstance(boxes, list) and all(
            isinstance(b, list) and all(isinstance(v, float) for v in b) for b in boxes)):
        return False
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() == line
    except ValueError:  # NaN or Infinity: objcrop writes strict JSON
        return False


#: what ``objcrop proposals export --out`` may replace: a JSON Lines file objcrop exported
JSONL_KIND = OutputKind("JSON Lines file", is_objcrop_export, head_bytes=1 << 20)


class ProposalFileError(ValueError):
    """A line of a proposals file that cannot be read; the message names the file and line."""


class _NonStrict(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NonStrict(name)


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[ProposalRecord]:
    """Yield the records of a JSON Lines proposals file (UTF-8), checking every line.

    Strict JSON (a bare ``NaN`` or ``Infinity`` is an error), integer ``width``/``height``,
    and each key once (after :func:`~objcrop_plugin.files.normalize_key`); an error names the
    file and line.
    """
    path = Path(path)
    seen: dict[str, int] = {}  # normalised key -> line
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ProposalFileError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}). Fix: convert the file to UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as exc:
                raise ProposalFileError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            except _NonStrict as exc:
                raise ProposalFileError(
                    f"{path}:{lineno}: {exc.args[0]} is not a JSON number (strict JSON has no "
                    "NaN or Infinity). Fix: leave out the box, or write null for a missing score."
                ) from None
            if not isinstance(obj, dict):
                raise ProposalFileError(f"{path}:{lineno}: expected a JSON object per line")
            missing = [k for k in ("key", "width", "height", "boxes") if k not in obj]
            if missing:
                raise ProposalFileError(
                    f"{path}:{lineno}: missing field(s) {missing}; each line needs key, width, "
                    "height, boxes and optionally scores"
                )
            try:
                rec = _as_record(obj)
            except (ValueError, TypeError) as exc:
                raise ProposalFileError(f"{path}:{lineno}: {exc}") from None
            if rec.key in seen:
                as_ = "" if rec.key == obj["key"] else f" (normalised '{rec.key}')"
                raise ProposalFileError(
                    f"{path}:{lineno}: key '{obj['key']}'{as_} repeats line {seen[rec.key]}. "
                    "Fix: one line per image."
                )
            seen[rec.key] = lineno
            yield rec


def import_jsonl(
    src: str | os.PathLike[str], store_path: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> int:
    """Convert a JSON Lines file into a store (written atomically). Returns the image count."""
    return JsonLinesImporter(src).write(store_path, meta)


def export_jsonl(
    records: ProposalStore | Iterable[ProposalRecord], path: str | os.PathLike[str] | BinaryIO
) -> int:
    """Write records (or a whole store) to a JSON Lines file, atomically. Returns the count.

    ``path`` may also be an open binary stream (``sys.stdout.buffer``): the lines are written
    to it as they are made (not atomically: a stream has no rename).

    The file is strict JSON: a NaN score is written as ``null``, and a box with a NaN or
    infinite coordinate is left out (logged as a warning naming the keys).
    """
    items = records.records() if isinstance(records, ProposalStore) else records
    count = 0
    dropped: list[tuple[str, int]] = []

    def lines() -> Iterator[bytes]:
        nonlocal count
        for rec in items:
            count += 1
            obj = rec.to_json()
            if len(obj["boxes"]) != len(rec.boxes):
                dropped.append((rec.key, len(rec.boxes) - len(obj["boxes"])))
            line = json.dumps(obj, separators=(",", ":"), allow_nan=False)
            yield (line + "\n").encode("utf-8")

    if hasattr(path, "write"):
        for line in lines():
            path.write(line)  # type: ignore[union-attr]
        path.flush()  # type: ignore[union-attr]
    else:
        atomic_write(path, lines())
    if dropped:
        names = ", ".join(f"{k} ({n})" for k, n in dropped[:10])
        more = f" and {len(dropped) - 10} more images" if len(dropped) > 10 else ""
        log.warning(
            "%s: left out %d boxes with a NaN or infinite coordinate (strict JSON has no NaN): "
            "%s%s", path, sum(n for _, n in dropped), names, more,
        )
    return count


class JsonLinesImporter(ProposalImporter):
    """Proposal importer ``jsonl``: the records of a JSON Lines file (see the module doc).

    Args:
        path: the JSON Lines file. It takes no options.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ProposalFileError: (from :meth:`records`) a bad line, named by file and line number.
    """

    name: ClassVar[str] = "jsonl"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        if not self.path.exists():
            raise FileNotFoundError(f"proposals file not found: {self.path}")

    def records(self) -> Iterator[ProposalRecord]:
        return read_jsonl(self.path)
