"""Proposal importers for annotation formats: COCO JSON and OpenImages box CSVs.

An importer turns someone else's boxes into :class:`~objcrop_plugin.proposals.store.ProposalRecord`
s: one per image, ``boxes`` ``(K, 4)`` float xyxy pixels of an image of ``image_size``
``(width, height)``, ``scores`` ``(K,)`` best first. Keys are image paths relative to the
dataset root (the folder the training dataset reads), so the store built from an importer is
looked up with the same keys the data loader uses.

Both are :class:`~objcrop_plugin.proposals.importer_base.ProposalImporter` subclasses,
registered as ``coco`` and ``openimages`` in the entry-point group ``objcrop_plugin.proposals``
(``objcrop proposals import FILE --source coco --param key_prefix=train2017/ --out STORE``);
:meth:`~objcrop_plugin.proposals.importer_base.ProposalImporter.write` (or
:func:`import_to_store`) writes an importer's records to a store atomically.

Ground-truth boxes give the paper's upper bound ("GT boxes as proposals"); detector outputs in
COCO results format give learned proposals.

Example:
    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
    ...        "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 4, 10, 20],
    ...                         "category_id": 3, "iscrowd": 0}],
    ...        "categories": [{"id": 3, "name": "cat"}]}
    >>> with open(os.path.join(d, "ann.json"), "w") as f:
    ...     json.dump(ann, f)
    >>> rec = next(CocoImporter(os.path.join(d, "ann.json"), key_prefix="train/").records())
    >>> rec.key, rec.boxes.tolist(), rec.image_size
    ('train/a.jpg', [[2.0, 4.0, 12.0, 24.0]], (64, 48))
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..files import other_unicode_forms
from .importer_base import ProposalImporter, import_to_store
from .jsonl import ProposalFileError
from .store import _MAX_SIDE, ProposalRecord, _record_from, normalize_key

__all__ = ["CocoImporter", "OpenImagesImporter", "coco_labels", "import_to_store"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_id(v: Any) -> bool:
    """A COCO id: an integer or a string (not a bool, float, list or object)."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _is_side(v: Any) -> bool:
    """An image side in pixels: a positive integral number that fits the store (int32)."""
    return (_is_number(v) and math.isfinite(v) and v == int(v) and 0 < v <= _MAX_SIDE)


def _short(v: Any, limit: int = 60) -> str:
    """``repr(v)``, cut to ``limit`` characters for a one-line message."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _crowd(v: Any) -> bool | None:
    """A COCO ``iscrowd`` flag: 0 or 1 as a number, a JSON bool or a string ("0", "1");
    ``None`` for anything else."""
    if isinstance(v, str):
        return {"0": False, "1": True}.get(v.strip())
    if isinstance(v, bool):
        return v
    if _is_number(v) and v in (0, 1):
        return bool(v)
    return None


def _peek(path: Path) -> str:
    """The first non-whitespace character of a file (``""`` if none), without reading it all."""
    with open(path, "rb") as f:
        first = True
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            if first and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
            first = False
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0])


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ProposalFileError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            "Fix: check that the download or export finished; the file may be truncated."
        ) from None
    except UnicodeDecodeError as exc:
        raise ProposalFileError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}). "
            "Fix: pass a COCO JSON file."
        ) from None


def _key(prefix: str, name: str) -> str:
    return f"{prefix}{name}"


def _image_file(root: Path, key: str) -> Path | None:
    """The file of ``key`` under ``root``, or ``None``; a name the annotations write composed
    (NFC) is found decomposed (NFD, as files copied from macOS keep it), and the other way
    round (the store's lookups match both forms too). The key is looked up as the store
    will hold it (:func:`~objcrop_plugin.files.normalize_key`: ``sub\\a.jpg``, as a COCO file
    written on Windows names it, is ``sub/a.jpg``)."""
    key = normalize_key(key)
    for name in (key, *other_unicode_forms(key)):
        if (file := root / name).is_file():
            return file
    return None


def _check_sizes(source: Path, sampled: list[tuple[str, Path, tuple[int, int]]]) -> None:
    """Warn when images' files have another upright size than the annotations give (EXIF
    orientation the annotations ignored, or another copy of the images): their boxes would
    land elsewhere, so such images get scene crops (counted as mismatched)."""
    from .. import boxes as box_ops
    from ..images import upright_size

    wrong: list[str] = []
    checked = 0
    for key, file, size in sampled:
        upright = upright_size(file)
        if upright is None:
            continue
        checked += 1
        if box_ops.size_mismatch(size, upright) is not None:
            wrong.append(f"{key}: annotations {size[0]}x{size[1]}, image {upright[0]}x"
                         f"{upright[1]} upright")
    if wrong:
        log.warning("%s: %d of %d images checked have another size than the annotations give "
                    "(e.g. %s): boxes refer to the upright image, so these images would get "
                    "scene crops (counted as mismatched). Fix: width and height of the upright "
                    "image in the annotations (EXIF orientation applied), or the images they "
                    "were made for", source, len(wrong), checked, wrong[0])


def _check_prefix(prefix: str, example: str) -> None:
    """Warn about a key prefix without its trailing slash: the keys are plain concatenations,
    so ``train2017`` makes ``train2017000000000139.jpg``, which names no image."""
    if prefix and not prefix.endswith(("/", "\\")):
        log.warning("key prefix %r has no trailing '/': keys are the prefix and file_name joined "
                    "as they are (e.g. %r). Fix: --key-prefix %r if %r is the image folder",
                    prefix, _key(prefix, example), prefix + "/", prefix)


class _CocoImages:
    """The ``images`` table of a COCO file: id -> index, file names, sizes."""

    def __init__(self, path: Path, data: Any) -> None:
        if not isinstance(data, dict) or "images" not in data:
            raise ProposalFileError(
                f"{path}: no 'images' list. Fix: pass a COCO annotations file (a JSON object with "
                "'images' entries {id, file_name, width, height})."
            )
        images = data["images"]
        if not isinstance(images, list):
            raise ProposalFileError(
                f"{path}: 'images' must be a list, got {type(images).__name__}. Fix: pass a "
                "COCO annotations file."
            )
        self.path = path
        self.index: dict[Any, int] = {}
        self.file_names: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        seen_names: dict[str, tuple[str, Any]] = {}
        for i, img in enumerate(images):
            where = f"images[{i}]"
            if not isinstance(img, dict):
                raise ProposalFileError(
                    f"{path}: {where} is not a JSON object. Fix: each image is "
                    "{id, file_name, width, height}."
                )
            missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
            if missing:
                raise ProposalFileError(
                    f"{path}: {where} (id {img.get('id')!r}) lacks field(s) {missing}. Fix: every "
                    "image needs id, file_name, width and height."
                )
            iid, name, w, h = img["id"], img["file_name"], img["width"], img["height"]
            if not _is_id(iid):
                raise ProposalFileError(
                    f"{path}: {where} has id {_short(iid)}; an image id must be an integer or a "
                    "string. Fix: give every image a unique integer id."
                )
            if not isinstance(name, str) or not name:
                raise ProposalFileError(
                    f"{path}: {where} (id {iid!r}) has file_name {_short(name)}; it must be a "
                    "non-empty string (the image's path relative to its folder)."
                )
            if not (_is_side(w) and _is_side(h)):
                raise ProposalFileError(
                    f"{path}: {where} (id {iid!r}, {name}) has width/height "
                    f"{_short(w)}/{_short(h)}; they must be positive integers (pixels) of at "
                    f"most {_MAX_SIDE}."
                )
            if iid in self.index:
                raise ProposalFileError(
                    f"{path}: {where}: image id {iid!r} is listed twice. Fix: image ids must be "
                    "unique."
                )
            norm = normalize_key(name)  # "./a.jpg" and "a.jpg" are one key in a store
            if norm in seen_names:
                first_name, first_id = seen_names[norm]
                same = f"'{name}'" if name == first_name else f"'{name}' (as '{first_name}')"
                raise ProposalFileError(
                    f"{path}: {where}: file_name {same} is listed twice (ids "
                    f"{first_id!r} and {iid!r}). Fix: one entry per image file."
                )
            seen_names[norm] = (name, iid)
            self.index[iid] = len(self.file_names)
            self.file_names.append(name)
            self.sizes.append((int(w), int(h)))

    def __len__(self) -> int:
        return len(self.file_names)


def _bad_bbox(b: Any) -> str | None:
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        n = len(b) if isinstance(b, (list, tuple)) else type(b).__name__
        return f"bbox must be [x, y, width, height] (4 numbers), got {n!r} value(s): {b!r}"
    if not all(_is_number(v) and math.isfinite(v) for v in b):
        return f"bbox must hold 4 finite numbers, got {b!r}"
    if b[2] < 0 or b[3] < 0:
        return f"bbox width and height must be >= 0, got {b!r}"
    return None


def _coco_annotations(
    path: Path, anns: Any, images: _CocoImages, results: bool, images_path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate and vectorise annotations in one pass.

    Returns:
        image index ``(M,)`` int64, boxes ``(M, 4)`` xyxy float64, scores ``(M,)`` float64,
        crowd ``(M,)`` bool, category ids ``(M,)`` object (may be ``None``).
    """
    name = "results" if results else "annotations"
    if not isinstance(anns, list):
        raise ProposalFileError(
            f"{path}: '{name}' must be a list, got {type(anns).__name__}. Fix: pass a COCO "
            "annotations file or a COCO results list."
        )
    n = len(anns)
    idx = np.empty(n, dtype=np.int64)
    bbox: list[Any] = [None] * n
    score = np.ones(n, dtype=np.float64)
    crowd = np.zeros(n, dtype=bool)
    cats: list[Any] = [None] * n
    index = images.index
    for i, a in enumerate(anns):
        where = f"{name}[{i}]"
        if not isinstance(a, dict):
            raise ProposalFileError(
                f"{path}: {where} is not a JSON object. Fix: each entry is "
                "{image_id, bbox, ...}."
            )
        try:
            iid = a["image_id"]
            bbox[i] = a["bbox"]
        except KeyError as exc:
            raise ProposalFileError(
                f"{path}: {where} (id {a.get('id')!r}) lacks the field '{exc.args[0]}'. Fix: every "
                f"entry needs image_id and bbox [x, y, width, height]"
                + (" and score" if results else "")
                + "."
            ) from None
        j = index.get(iid) if _is_id(iid) else None
        if j is None:
            raise ProposalFileError(
                f"{path}: {where} (id {a.get('id')!r}) refers to image_id {_short(iid)}, which "
                f"{images_path} does not list. Fix: "
                + ("pass images_json= the annotations file of the split these results were "
                   "computed on." if results or images_path != path else
                   "add the image to 'images' or drop the annotation.")
            )
        idx[i] = j
        if "score" in a:
            s = a["score"]
            if not (_is_number(s) and not math.isnan(s)):
                raise ProposalFileError(
                    f"{path}: {where} (image_id {iid!r}) has score {s!r}; it must be a number."
                )
            score[i] = s
        elif results:
            raise ProposalFileError(
                f"{path}: {where} (image_id {iid!r}) lacks 'score'. Fix: a COCO results file "
                "lists {image_id, bbox, score, category_id} per detection."
            )
        flag = _crowd(a.get("iscrowd", 0))
        if flag is None:
            raise ProposalFileError(
                f"{path}: {where} (id {a.get('id')!r}, image_id {iid!r}) has iscrowd "
                f"{_short(a.get('iscrowd'))}; it must be 0 or 1. Fix: repair the annotation."
            )
        crowd[i] = flag
        cats[i] = a.get("category_id")
    try:
        raw = np.asarray(bbox)
        # no dtype= here: numpy would quietly turn "2" into 2.0
        ok = raw.dtype.kind in "iuf" or n == 0
        xywh = raw.astype(np.float64).reshape(n, 4)
        ok = ok and bool(np.isfinite(xywh).all() and (xywh[:, 2:] >= 0).all())
    except (ValueError, TypeError):
        ok = False
    if not ok:  # the slow path only runs to name the offending entry
        for i, b in enumerate(bbox):
            why = _bad_bbox(b)
            if why is not None:
                raise ProposalFileError(
                    f"{path}: {name}[{i}] (id {anns[i].get('id')!r}, image_id "
                    f"{anns[i].get('image_id')!r}): {why}. Fix: COCO boxes are [x, y, width, "
                    "height] in pixels."
                )
        raise ProposalFileError(f"{path}: unreadable bbox values")  # pragma: no cover
    boxes = xywh.copy()
    boxes[:, 2:] += boxes[:, :2]
    return idx, boxes, score, crowd, np.asarray(cats, dtype=object)


def _group(
    image_index: np.ndarray, scores: np.ndarray, n_images: int
) -> tuple[np.ndarray, np.ndarray]:
    """Order entries by image, then best score first (stable), and the per-image offsets."""
    order = np.lexsort((-scores, image_index))
    offsets = np.zeros(n_images + 1, dtype=np.int64)
    np.cumsum(np.bincount(image_index, minlength=n_images), out=offsets[1:])
    return order, offsets


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
class CocoImporter(ProposalImporter):
    """Proposal importer ``coco``: boxes from a COCO annotations file or a COCO results file.

    Two kinds of input:

    - **Ground truth** (``instances_*.json``): a JSON object with ``images`` (``id``,
      ``file_name``, ``width``, ``height``) and ``annotations`` (``image_id``, ``bbox``
      ``[x, y, w, h]``, ``category_id``, ``iscrowd``). One record per image in ``images``
      (an image without annotations gets 0 boxes), scores 1.0 (or an annotation's own
      ``score`` when it has one), boxes in file order.
    - **Detection results** (what a COCO detector writes): a JSON *list* of
      ``{image_id, bbox, score, category_id}``. These carry no image table, so pass
      ``images_json=`` the annotations file of the split they were computed on; one record per
      image listed there, boxes sorted best score first.

    Boxes become xyxy pixels (``x2 = x + w``, ``y2 = y + h``) of an image of ``(width,
    height)`` as the image table gives it.

    Args:
        path: the annotations or results JSON.
        images_json: a COCO annotations file whose ``images`` give id -> file_name/width/height.
            Required for a results list; for an annotations file it replaces the file's own
            ``images``.
        images_root: the dataset root. When given, images whose file ``images_root / key`` does
            not exist are skipped, listed in :attr:`missing` and logged (useful for a partial
            download). ``None`` (default): no file-system access.
        key_prefix: prepended to ``file_name`` to make the key, by plain concatenation: the
            path of the image folder relative to the dataset root *with* its trailing slash,
            e.g. ``"train2017/"``.
        include_crowd: keep ``iscrowd=1`` annotations (a box around a crowd of objects).
            Default ``False``, as COCO evaluation ignores them.
        min_score: drop boxes scoring below this (``None``: keep all).

    Attributes:
        missing: keys skipped because their file is absent from ``images_root`` (filled while
            :meth:`records` runs).

    Raises:
        FileNotFoundError: ``path`` or ``images_json`` does not exist.
        ValueError: a results list without ``images_json`` (raised here), or, from
            :meth:`records`, a malformed file (a :class:`ProposalFileError` naming the file,
            the entry and the fix).
    """

    name: ClassVar[str] = "coco"

    def __init__(
        self,
        path: PathLike,
        images_json: PathLike | None = None,
        images_root: PathLike | None = None,
        key_prefix: str = "",
        include_crowd: bool = False,
        min_score: float | None = None,
    ) -> None:
        super().__init__(path)
        self.images_json = Path(images_json) if images_json is not None else None
        self.images_root = Path(images_root) if images_root is not None else None
        self.key_prefix = key_prefix
        self.include_crowd = include_crowd
        self.min_score = min_score
        for p, what in ((self.path, "COCO file"), (self.images_json, "images_json")):
            if p is not None and not p.is_file():
                raise FileNotFoundError(f"{what} not found: {p}")
        first = _peek(self.path)
        if first not in ("{", "["):
            raise ProposalFileError(
                f"{self.path}: not a COCO JSON file (it starts with {first!r}, expected '{{' for "
                "an annotations file or '[' for detection results)."
            )
        self.is_results = first == "["
        if self.is_results and self.images_json is None:
            raise ValueError(
                f"{self.path} is a COCO detection-results list ({{image_id, bbox, score, ...}} "
                "per box), which has no image file names or sizes. Fix: also pass the COCO "
                "annotations file of the same split (e.g. instances_val2017.json), which maps "
                "image_id to file_name, width and height: --images-json (objcrop proposals "
                "import-coco), --gt-images-json (proposals eval), images_json= (Python)."
            )

    @property
    def meta(self) -> dict[str, Any]:
        """What a store built from this importer records about its source."""
        return {
            "source": "coco",
            "path": str(self.path),
            "images_json": str(self.images_json) if self.images_json else None,
            "kind": "results" if self.is_results else "annotations",
            "key_prefix": self.key_prefix,
            "include_crowd": self.include_crowd,
            "min_score": self.min_score,
        }

    def _load(self) -> tuple[_CocoImages, tuple[np.ndarray, ...]]:
        data = _load_json(self.path)
        if self.is_results:
            anns = data
        else:
            if not isinstance(data, dict):
                raise ProposalFileError(
                    f"{self.path}: expected a JSON object (annotations) or list (results)"
                )
            anns = data.get("annotations", [])
        if self.images_json is not None:
            images_path = self.images_json
            images = _CocoImages(images_path, _load_json(images_path))
        else:
            images_path = self.path
            images = _CocoImages(images_path, data)
        del data
        arrays = _coco_annotations(self.path, anns, images, self.is_results, images_path)
        return images, arrays

    def records(self) -> Iterator[ProposalRecord]:
        """One record per image of the image table, in its order.

        Yields:
            :class:`ProposalRecord`: ``boxes`` ``(K, 4)`` float32 xyxy pixels, ``scores``
            ``(K,)`` best first, ``image_size`` ``(width, height)`` from the image table.
        """
        self.missing = []
        self.left_out: dict[str, int] = {}  # annotations not imported, by why
        images, (idx, boxes, scores, crowd, _) = self._load()
        keep = np.ones(len(idx), dtype=bool)
        if not self.include_crowd:
            keep &= ~crowd
            self.left_out["crowd"] = int(crowd.sum())
        if self.min_score is not None:
            self.left_out["below min_score"] = int((keep & (scores < self.min_score)).sum())
            keep &= scores >= self.min_score
        idx, boxes, scores = idx[keep], boxes[keep], scores[keep]
        order, offsets = _group(idx, scores, len(images))
        boxes, scores = boxes[order], scores[order]
        if images.file_names:
            _check_prefix(self.key_prefix, images.file_names[0])
        step = -(-len(images.file_names) // 64) or 1  # the sizes of up to 64 files are checked
        sampled: list[tuple[str, Path, tuple[int, int]]] = []
        for j, name in enumerate(images.file_names):
            key = _key(self.key_prefix, name)
            file = None
            if self.images_root is not None:
                file = _image_file(self.images_root, key)
                if file is None:
                    self.missing.append(normalize_key(key))  # as the store would hold it
                    continue
            a, b = offsets[j], offsets[j + 1]
            try:
                rec = _record_from(key, boxes[a:b], scores[a:b], images.sizes[j])
            except ValueError as exc:
                raise ProposalFileError(f"{images.path}: images[{j}] ({name}): {exc}") from None
            if file is not None and j % step == 0:
                sampled.append((rec.key, file, tuple(rec.image_size)))
            yield rec
        _check_sizes(images.path, sampled)
        if self.missing:
            log.warning(
                "%s: %d of %d images are not in %s and were skipped (first: %s)",
                self.path, len(self.missing), len(images), self.images_root, self.missing[0],
            )


def coco_labels(
    annotations_json: PathLike, key_prefix: str = "", include_crowd: bool = True
) -> tuple[list[str], np.ndarray, list[str]]:
    """Multi-hot image labels from a COCO annotations file (for multi-label evaluation).

    Args:
        annotations_json: a COCO annotations file with ``images``, ``annotations`` and
            ``categories``.
        key_prefix: prepended to ``file_name`` (see :class:`CocoImporter`).
        include_crowd: count ``iscrowd=1`` annotations (a crowd of people still shows people).

    Returns:
        ``keys`` (N,) in the order of ``images``; ``multi_hot`` ``(N, C)`` float32, 1 where the
        image has at least one annotation of the category; ``names`` (C,), the category names
        in column order (categories sorted by id).

    Example:
        >>> keys, y, names = coco_labels("instances_val2017.json", "val2017/")  # doctest: +SKIP
        >>> y.shape, names[:2]  # doctest: +SKIP
        ((5000, 80), ['person', 'bicycle'])
    """
    path = Path(annotations_json)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations file not found: {path}")
    data = _load_json(path)
    images = _CocoImages(path, data)
    cats = data.get("categories")
    if not isinstance(cats, list):
        raise ProposalFileError(
            f"{path}: no 'categories' list. Fix: pass a COCO annotations file (instances_*.json) "
            "with categories [{id, name}]."
        )
    col: dict[Any, int] = {}
    entries = []
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c:
            raise ProposalFileError(
                f"{path}: categories[{i}] lacks 'id'. Fix: each category is {{id, name}}."
            )
        if c["id"] in col:
            raise ProposalFileError(
                f"{path}: categories[{i}]: category id {c['id']!r} is listed twice"
            )
        col[c["id"]] = -1
        entries.append(c)
    entries.sort(key=lambda c: c["id"])
    for j, c in enumerate(entries):
        col[c["id"]] = j
    names = [str(c.get("name", c["id"])) for c in entries]
    idx, _, _, crowd, cat_ids = _coco_annotations(
        path, data.get("annotations", []), images, False, path
    )
    cols = np.empty(len(idx), dtype=np.int64)
    for i, cid in enumerate(cat_ids):
        j = col.get(cid)
        if j is None:
            raise ProposalFileError(
                f"{path}: annotations[{i}] has category_id {cid!r}, which 'categories' does not "
                "list. Fix: add the category or drop the annotation."
            )
        cols[i] = j
    keep = np.ones(len(idx), dtype=bool) if include_crowd else ~crowd
    y = np.zeros((len(images), len(names)), dtype=np.float32)
    y[idx[keep], cols[keep]] = 1.0
    if images.file_names:
        _check_prefix(key_prefix, images.file_names[0])
    keys = [normalize_key(_key(key_prefix, n)) for n in images.file_names]  # as a store's
    return keys, y, names


# --------------------------------------------------------------------------------------------
# OpenImages
# --------------------------------------------------------------------------------------------
_OI_REQUIRED = ("ImageID", "XMin", "XMax", "YMin", "YMax")


class OpenImagesImporter(ProposalImporter):
    """Proposal importer ``openimages``: boxes from an OpenImages box CSV.

    The CSV (``oidv6-train-annotations-bbox.csv``, ``validation-annotations-bbox.csv``, ...)
    has one row per box with columns ``ImageID, Source, LabelName, Confidence, XMin, XMax,
    YMin, YMax, IsOccluded, IsTruncated, IsGroupOf, ...``; columns are found by header name,
    only ``ImageID, XMin, XMax, YMin, YMax`` are required. Coordinates are normalised to
    [0, 1] of the *displayed* image (the EXIF orientation applied, as annotators saw it), so
    the pixel size of every image is read from its header with
    :func:`objcrop_plugin.images.open_image` (which applies the EXIF orientation: a
    4000x3000 JPEG with orientation 6 is 3000x4000), once per image.

    One record per image in the CSV, in order of first appearance; boxes ``(K, 4)`` xyxy
    pixels, best ``Confidence`` first (1.0 for every box when the column is absent).

    Args:
        boxes_csv: the box CSV.
        images_root: the dataset root; an image's file is ``images_root / key``. May be
            ``None`` (the default) when ``sizes`` covers every image.
        key_format: the key of an image, formatted with ``image_id``, e.g.
            ``"train/{image_id}.jpg"``.
        sizes: ``ImageID -> (width, height)`` of the displayed image, to skip reading headers
            (for the images it covers).
        include_group_of: keep ``IsGroupOf=1`` boxes (a box around a group of objects, the
            analogue of COCO's crowd). Default ``True``.

    Attributes:
        missing: keys of images in the CSV whose file is absent from ``images_root``; they are
            skipped and logged (filled while :meth:`records` runs).
        unreadable: keys of images whose header could not be read; skipped and logged.

    Raises:
        FileNotFoundError: ``boxes_csv`` does not exist.
        ProposalFileError: (a ``ValueError``, from :meth:`records`) a missing required column
            or a malformed row, naming the file, line and column.
    """

    name: ClassVar[str] = "openimages"

    def __init__(
        self,
        boxes_csv: PathLike,
        images_root: PathLike | None = None,
        key_format: str = "{image_id}.jpg",
        sizes: Mapping[str, Sequence[int]] | None = None,
        include_group_of: bool = True,
    ) -> None:
        super().__init__(boxes_csv)
        if not self.path.is_file():
            raise FileNotFoundError(f"OpenImages box CSV not found: {self.path}")
        self.images_root = Path(images_root) if images_root is not None else None
        try:
            key_format.format(image_id="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"key_format {key_format!r} cannot be formatted with image_id ({exc!r}). Fix: use "
                "a pattern like 'train/{image_id}.jpg'."
            ) from None
        self.key_format = key_format
        self.sizes = dict(sizes or {})
        self.include_group_of = include_group_of
        self.unreadable: list[str] = []

    @property
    def meta(self) -> dict[str, Any]:
        """What a store built from this importer records about its source."""
        return {
            "source": "openimages",
            "path": str(self.path),
            "key_format": self.key_format,
            "include_group_of": self.include_group_of,
        }

    def _read_csv(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        ids: dict[str, int] = {}
        order: list[str] = []
        img = array("q")
        coords = array("d")
        conf = array("d")
        path = self.path
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ProposalFileError(f"{path}: empty file, expected a header row")
            col = {name.strip(): i for i, name in enumerate(header)}
            absent = [c for c in _OI_REQUIRED if c not in col]
            if absent:
                raise ProposalFileError(
                    f"{path}: missing column(s) {absent} (header: {header}). Fix: pass an "
                    "OpenImages box CSV with columns ImageID, XMin, XMax, YMin, YMax (and "
                    "optionally Confidence, IsGroupOf)."
                )
            ci = col["ImageID"]
            cx0, cx1, cy0, cy1 = col["XMin"], col["XMax"], col["YMin"], col["YMax"]
            cc = col.get("Confidence")
            cg = col.get("IsGroupOf") if not self.include_group_of else None
            for lineno, row in enumerate(reader, 2):
                if not row:
                    continue
                try:
                    if cg is not None and row[cg].strip() == "1":
                        # still list the image, with its other boxes
                        iid = row[ci]
                        if iid not in ids:
                            ids[iid] = len(order)
                            order.append(iid)
                        continue
                    x0, x1 = float(row[cx0]), float(row[cx1])
                    y0, y1 = float(row[cy0]), float(row[cy1])
                    s = float(row[cc]) if cc is not None else 1.0
                    iid = row[ci]
                except (ValueError, IndexError):
                    raise self._row_error(lineno, row, col) from None
                j = ids.get(iid)
                if j is None:
                    j = ids[iid] = len(order)
                    order.append(iid)
                img.append(j)
                coords.extend((x0, y0, x1, y1))
                conf.append(s)
        idx = np.frombuffer(img, dtype=np.int64) if len(img) else np.zeros(0, dtype=np.int64)
        boxes = np.frombuffer(coords, dtype=np.float64).reshape(-1, 4) if len(coords) else \
            np.zeros((0, 4))
        scores = np.frombuffer(conf, dtype=np.float64) if len(conf) else np.zeros(0)
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise self._non_finite_error()
        return order, idx, boxes, scores

    def _non_finite_error(self) -> ProposalFileError:
        # the error path reads the file again rather than keep a line number per box
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            col = {name.strip(): i for i, name in enumerate(next(reader))}
            names = [c for c in ("XMin", "XMax", "YMin", "YMax", "Confidence") if c in col]
            for lineno, row in enumerate(reader, 2):
                for name in names:
                    if row and not math.isfinite(float(row[col[name]])):
                        return ProposalFileError(
                            f"{self.path}:{lineno}: column '{name}' is {row[col[name]]!r}; it "
                            "must be a finite number. Fix: repair or drop the row."
                        )
        return ProposalFileError(f"{self.path}: a non-finite value")  # pragma: no cover

    def _row_error(self, lineno: int, row: list[str], col: dict[str, int]) -> ProposalFileError:
        for name in (*_OI_REQUIRED, "Confidence", "IsGroupOf"):
            if name not in col:
                continue
            i = col[name]
            if i >= len(row):
                return ProposalFileError(
                    f"{self.path}:{lineno}: the row has {len(row)} fields, no '{name}' column. "
                    "Fix: repair or drop the truncated row."
                )
            if name not in ("ImageID", "IsGroupOf"):
                try:
                    float(row[i])
                except ValueError:
                    return ProposalFileError(
                        f"{self.path}:{lineno}: column '{name}' is {row[i]!r}, not a number. "
                        "Fix: repair or drop the row."
                    )
        # pragma: no cover - every failing conversion is named above
        return ProposalFileError(f"{self.path}:{lineno}: unreadable row {row!r}")

    def _size(self, image_id: str, key: str) -> tuple[int, int] | None:
        if image_id in self.sizes:
            w, h = self.sizes[image_id]
            return int(w), int(h)
        if self.images_root is None:
            raise ValueError(
                f"no size for OpenImages image {image_id}: images_root is None and sizes= does "
                "not list it. Fix: pass images_root= the dataset root (image headers are read), "
                "or sizes= for every image."
            )
        from ..images import ImageDecodeError, open_image

        file = _image_file(self.images_root, key)
        if file is None:
            self.missing.append(key)
            return None
        try:
            opened = open_image(file)
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", key, exc)
            self.unreadable.append(key)
            return None
        try:
            return opened.size
        finally:
            opened.image.close()

    def records(self) -> Iterator[ProposalRecord]:
        """One record per image in the CSV (present in ``images_root``), in first-seen order.

        Yields:
            :class:`ProposalRecord`: ``boxes`` ``(K, 4)`` float32 xyxy pixels of the displayed
            image, ``scores`` ``(K,)`` best first, ``image_size`` ``(width, height)``.
        """
        self.missing, self.unreadable = [], []
        try:
            order, idx, boxes, scores = self._read_csv()
        except UnicodeDecodeError as exc:
            raise ProposalFileError(
                f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a read "
                "block). Fix: convert the file to UTF-8."
            ) from None
        perm, offsets = _group(idx, scores, len(order))
        boxes, scores = boxes[perm], scores[perm]
        for j, image_id in enumerate(order):
            key = self.key_format.format(image_id=image_id)
            size = self._size(image_id, key)
            if size is None:
                continue
            w, h = size
            a, b = offsets[j], offsets[j + 1]
            yield _record_from(key, boxes[a:b] * (w, h, w, h), scores[a:b], (w, h))
        if self.missing:
            log.warning(
                "%s: %d of %d images are not in %s and were skipped (first: %s)",
                self.path, len(self.missing), len(order), self.images_root, self.missing[0],
            )
