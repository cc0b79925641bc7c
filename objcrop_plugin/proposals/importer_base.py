"""Proposal importers: a file of someone else's boxes in, proposal records out.

:class:`ProposalImporter` is the base class of the importers (``jsonl``, ``coco``,
``openimages``, and third-party ones), as
:class:`~objcrop_plugin.proposals.generators.ProposalGenerator` is of the generators. An
importer is a proposal source of kind ``"importer"`` in the entry-point group
``objcrop_plugin.proposals``; :func:`make_importer` builds one by its registered name and
``objcrop proposals import INPUT --source NAME --param key=value --out STORE`` runs it.

Example (a third-party importer; register it in the package's ``pyproject.toml`` with
``[project.entry-points."objcrop_plugin.proposals"] csv_xyxy = "my_pkg:CsvImporter"``):
    >>> import csv
    >>> class CsvImporter(ProposalImporter):
    ...     '''Rows ``key,width,height,x1,y1,x2,y2``, one box each.'''
    ...     name = "csv_xyxy"
    ...     def __init__(self, path, key_prefix=""):
    ...         super().__init__(path)
    ...         self.key_prefix = key_prefix
    ...     def records(self):
    ...         with open(self.path, newline="") as f:
    ...             for key, w, h, *box in csv.reader(f):
    ...                 yield (self.key_prefix + key, [[float(v) for v in box]], [1.0],
    ...                        (int(w), int(h)))
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from ..registry import RegistryError, list_proposal_sources, load_proposal_source
from .store import ProposalRecord, ProposalStoreWriter, _as_record, remove_stale_failures

__all__ = ["ProposalImporter", "import_to_store", "make_importer"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class ProposalImporter:
    """Base class of proposal importers.

    A subclass sets :attr:`name` (the name it is registered under), takes the input file as
    its first constructor argument and its options as keyword arguments with defaults and plain
    values (``str``, ``int``, ``float``, ``bool``, ``None``, lists, mappings: what
    ``--param key=value`` passes, the value parsed as JSON when it is JSON, else a string), calls
    ``super().__init__(path)``, and implements :meth:`records`.

    Args:
        path: the input file.

    Output of :meth:`records`: one :class:`~objcrop_plugin.proposals.store.ProposalRecord`
    per image (or a tuple ``(key, boxes, scores, (width, height))``): ``key`` the image's path
    relative to the dataset root, ``boxes`` ``(K, 4)`` float xyxy pixels of an image of
    ``(width, height)``, ``scores`` ``(K,)`` best first (``None``: the order is the ranking).

    Attributes:
        path: the input file.
        missing: keys skipped because their image is absent (filled by :meth:`records`, for
            importers that check the image folder).
    """

    kind: ClassVar[str] = "importer"
    name: ClassVar[str] = "importer"

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.missing: list[str] = []

    def records(self) -> Iterator[ProposalRecord]:
        """One record per image of the input (see the class doc)."""
        raise NotImplementedError

    @property
    def meta(self) -> dict[str, Any]:
        """What a store built from this importer records about its source."""
        return {"source": self.name, "path": str(self.path)}

    def write(self, out_path: PathLike, meta: dict[str, Any] | None = None) -> int:
        """Write the records to a proposal store, atomically; returns the image count."""
        return import_to_store(self, out_path, meta)


def import_to_store(importer: Any, out_path: PathLike, meta: dict[str, Any] | None = None) -> int:
    """Write an importer's records to a proposal store, atomically.

    Args:
        importer: anything with ``records() -> Iterator[ProposalRecord]`` (an importer, a
            :class:`~objcrop_plugin.proposals.store.ProposalStore`); its ``meta`` attribute,
            when it has one, is recorded in the store's metadata.
        out_path: the store file; written only if every record was read without error.
        meta: more metadata (overrides the importer's keys).

    Returns:
        The number of images written.

    Raises:
        ValueError: the input holds no records (an empty file, or every image it lists is
            missing); nothing is written.
    """
    src_meta = getattr(importer, "meta", None)
    merged = {**(src_meta if isinstance(src_meta, dict) else {}), **(meta or {})}
    check = BoxCheck()
    with ProposalStoreWriter(out_path, merged) as writer:
        for item in importer.records():
            rec = _as_record(item)
            check.add(rec)
            try:
                writer.add_record(rec)
            except ValueError:  # a repeated key: name the input, not the store being written
                raise ValueError(
                    f"{getattr(importer, 'path', importer)}: key '{rec.key}' is listed twice "
                    f"(keys are compared normalised); {out_path} was not written. Fix: one "
                    "entry per image."
                ) from None
        if not len(writer):
            missing = getattr(importer, "missing", None) or []
            unreadable = getattr(importer, "unreadable", None) or []
            why = (f"{len(missing)} of the images it lists are missing and {len(unreadable)} "
                   "cannot be read" if missing and unreadable
                   else f"all {len(missing)} images it lists are missing" if missing
                   else f"all {len(unreadable)} images it lists cannot be read (first: "
                        f"{unreadable[0]})" if unreadable
                   else "no records: is it empty?")
            raise ValueError(
                f"{getattr(importer, 'path', importer)}: nothing to import ({why}); {out_path} "
                "was not written."
            )
        count = len(writer)
    remove_stale_failures(out_path)  # a build's list beside an earlier store of this name
    check.warn(getattr(importer, "path", importer))
    missing = getattr(importer, "missing", None)
    if missing:
        log.info("%s: %d images skipped as missing", out_path, len(missing))
    unreadable = getattr(importer, "unreadable", None)
    if unreadable:
        log.warning("%s: %d images skipped as unreadable (first: %s); they get no proposals",
                    out_path, len(unreadable), unreadable[0])
    return count


class BoxCheck:
    """What an import's boxes say about the file's format, counted over every record.

    Imported boxes are stored as the file gives them (pixel ``x1, y1, x2, y2`` of the upright
    image); a file in another convention imports without an error and would give views from
    the wrong places. Counted: boxes no view can be cut from (not finite, inverted, or of no
    area in the image: often ``x, y, w, h`` read as corners), boxes reaching past the image
    by more than its own size (often normalised and pixel coordinates mixed up, or the
    image's size wrong), and keys that are absolute paths (keys are relative to the image
    folder). :meth:`warn` logs one warning with the counts and an example of each.
    """

    #: records checked together (one vectorised pass: an import may hold millions)
    CHUNK = 4096

    def __init__(self) -> None:
        self.boxes = 0
        self.unusable = self.far_outside = self.absolute = 0
        self.examples: dict[str, str] = {}
        self._pending: list[ProposalRecord] = []

    def add(self, rec: ProposalRecord) -> None:
        key = rec.key
        if key.startswith("/") or (len(key) > 2 and key[1:3] in (":/", ":\\")):
            self.absolute += 1
            self.examples.setdefault("absolute", key)
        self._pending.append(rec)
        if len(self._pending) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        import numpy as np

        recs = [r for r in self._pending if len(r.boxes)]
        self._pending = []
        if not recs:
            return
        counts = np.array([len(r.boxes) for r in recs])
        b = np.concatenate([np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4) for r in recs])
        wh = np.repeat(np.array([r.image_size for r in recs], dtype=np.float64), counts, axis=0)
        owner = np.repeat(np.arange(len(recs)), counts)
        self.boxes += len(b)
        finite = np.isfinite(b).all(axis=1)
        c = np.where(finite[:, None], b, 0.0)
        x = np.clip(c[:, 0::2], 0.0, wh[:, :1])  # clipped to each box's own image
        y = np.clip(c[:, 1::2], 0.0, wh[:, 1:])
        bad = ~finite | (x[:, 1] <= x[:, 0]) | (y[:, 1] <= y[:, 0])  # no view from it
        far = ~bad & ((c[:, 0::2] < -wh[:, :1]) | (c[:, 0::2] > 2 * wh[:, :1])
                      | (c[:, 1::2] < -wh[:, 1:]) | (c[:, 1::2] > 2 * wh[:, 1:])).any(axis=1)

        def example(i: int, with_size: bool = False) -> str:
            w, h = recs[owner[i]].image_size
            return (f"{recs[owner[i]].key} {[round(v, 1) for v in b[i].tolist()]}"
                    + (f" in {int(w)}x{int(h)}" if with_size else ""))

        if bad.any():
            self.unusable += int(bad.sum())
            self.examples.setdefault("unusable", example(int(np.flatnonzero(bad)[0])))
        if far.any():
            self.far_outside += int(far.sum())
            self.examples.setdefault("far_outside", example(int(np.flatnonzero(far)[0]), True))

    def warn(self, source: Any) -> None:
        self._flush()
        said = []
        if self.unusable:
            said.append(f"{self.unusable} of {self.boxes} boxes are inverted, not finite or of "
                        f"no area in their image (e.g. {self.examples['unusable']}; inverted ones "
                        "are often x, y, w, h read as corners)")
        if self.far_outside:
            said.append(f"{self.far_outside} boxes reach past their image by more than its "
                        f"size (e.g. {self.examples['far_outside']}; pixel and normalised "
                        "coordinates mixed up, or the image sizes wrong?)")
        if self.absolute:
            said.append(f"{self.absolute} keys are absolute paths (e.g. "
                        f"{self.examples['absolute']}), which match no image: keys are paths "
                        "relative to the image folder")
        if said:
            log.warning("%s: %s. Boxes are stored as given: pixel x1, y1, x2, y2 of the upright "
                        "image (`objcrop proposals stats STORE` counts the unusable ones)",
                        source, "; ".join(said))


def _options(factory: Any) -> list[str]:
    try:
        params = list(inspect.signature(factory).parameters.values())[1:]  # after the path
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def make_importer(name: str, path: PathLike, **params: Any) -> ProposalImporter:
    """A registered proposal importer by name, reading ``path``, with keyword options.

    Example:
        >>> make_importer("coco", "instances_val2017.json", key_prefix="val2017/")  # doctest: +SKIP

    Raises:
        objcrop_plugin.registry.RegistryError: an unknown name (the message lists the known
            importers), or a generator's name.
        TypeError: an option the importer does not take (the message lists those it does).
        FileNotFoundError: ``path`` does not exist (from the importer).
    """
    if name not in list_proposal_sources():
        known = ", ".join(list_proposal_sources(kind="importer"))
        raise RegistryError(
            f"unknown proposal importer '{name}'. Known importers: {known}. A third-party "
            "importer is found when its distribution declares a ProposalImporter subclass in "
            "the entry-point group 'objcrop_plugin.proposals'."
        )
    factory = load_proposal_source(name)
    if getattr(factory, "kind", None) != "importer":
        raise RegistryError(
            f"proposal source '{name}' is a {getattr(factory, 'kind', 'non-importer')}, not an "
            f"importer: use `objcrop proposals build IMAGES_DIR --method {name}` for it. "
            f"Importers: {', '.join(list_proposal_sources(kind='importer'))}."
        )
    accepted = _options(factory)
    try:
        sig = inspect.signature(factory)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    except (TypeError, ValueError):
        takes_any = True
    unknown = [k for k in params if k not in accepted]
    if unknown and not takes_any:
        raise TypeError(
            f"proposal importer '{name}' got unknown option(s) {unknown}; it accepts: "
            f"{', '.join(accepted) or 'none'}"
        )
    return factory(path, **params)
