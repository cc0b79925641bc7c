"""JSON Lines interchange for proposal stores: one JSON object per image and line.

Each line::

    {"key": "train/000001.jpg", "width": 640, "height": 480,
     "boxes": [[x1, y1, x2, y2], ...], "scores": [0.93, ...]}

``boxes`` are float xyxy pixels of an image of ``width`` x ``height``; ``scores`` may be omitted
or ``null`` (then the order of ``boxes`` is the ranking). Blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from ..files import atomic_write
from .importer_base import ProposalImporter
from .store import ProposalRecord, ProposalStore, _as_record

__all__ = ["JsonLinesImporter", "ProposalFileError", "export_jsonl", "import_jsonl", "read_jsonl"]


class ProposalFileError(ValueError):
    """A line of a proposals file that cannot be read; the message names the file and line."""


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[ProposalRecord]:
    """Yield the records of a JSON Lines proposals file, checking every line."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ProposalFileError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ProposalFileError(f"{path}:{lineno}: expected a JSON object per line")
            missing = [k for k in ("key", "width", "height", "boxes") if k not in obj]
            if missing:
                raise ProposalFileError(
                    f"{path}:{lineno}: missing field(s) {missing}; each line needs key, width, "
                    "height, boxes and optionally scores"
                )
            try:
                yield _as_record(obj)
            except (ValueError, TypeError) as exc:
                raise ProposalFileError(f"{path}:{lineno}: {exc}") from None


def import_jsonl(
    src: str | os.PathLike[str], store_path: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> int:
    """Convert a JSON Lines file into a store (written atomically). Returns the image count."""
    return JsonLinesImporter(src).write(store_path, meta)


def export_jsonl(
    records: ProposalStore | Iterable[ProposalRecord], path: str | os.PathLike[str]
) -> int:
    """Write records (or a whole store) to a JSON Lines file, atomically. Returns the count."""
    items = records.records() if isinstance(records, ProposalStore) else records
    count = 0

    def lines() -> Iterator[bytes]:
        nonlocal count
        for rec in items:
            count += 1
            yield (json.dumps(rec.to_json(), separators=(",", ":")) + "\n").encode("utf-8")

    atomic_write(path, lines())
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
