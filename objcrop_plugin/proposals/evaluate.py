"""Proposal quality: descriptive statistics of a store, and recall against ground-truth boxes.

:func:`proposal_stats` describes a store (how many boxes per image, how big, which scores);
:func:`recall` measures how many ground-truth objects some top-``k`` proposal of the same image
overlaps with IoU at least ``t``, the standard measure of an object-proposal method (the paper
keeps 10 proposals per image, so recall@10 is the number to watch).

Size buckets follow COCO, by box area in pixels of the image the boxes refer to: small
``< 32^2``, medium ``< 96^2``, large otherwise.

Example:
    >>> import os, tempfile
    >>> from objcrop_plugin.proposals import ProposalStore
    >>> d = tempfile.mkdtemp()
    >>> ProposalStore.write(f"{d}/p.objcrop", [("a.jpg", [[0, 0, 50, 50], [0, 0, 10, 6]],
    ...                                          [0.9, 0.8], (100, 100))])
    >>> ProposalStore.write(f"{d}/gt.objcrop", [("a.jpg", [[0, 0, 10, 10]], [1.0], (100, 100))])
    >>> r = recall(ProposalStore(f"{d}/p.objcrop"), ProposalStore(f"{d}/gt.objcrop"),
    ...            iou_thresholds=(0.5, 0.7), ks=(1, 10))
    >>> r["recall"][0.5][1], r["recall"][0.5][10], r["recall"][0.7][10]
    (0.0, 1.0, 0.0)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .. import boxes as box_ops
from .store import ProposalRecord, ProposalStore

__all__ = ["format_recall", "format_stats", "open_ground_truth", "proposal_stats", "recall"]

#: COCO's size buckets by box area in pixels^2: small < 32^2 <= medium < 96^2 <= large.
SIZE_EDGES = (32.0**2, 96.0**2)
SIZE_NAMES = ("small", "medium", "large")

#: Histogram of boxes per image: bin i holds counts in [edges[i], edges[i + 1]).
_COUNT_EDGES = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_QUANTILES = (("min", 0.0), ("p5", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75),
              ("p95", 0.95), ("max", 1.0))


def _bin_labels(edges: Sequence[int]) -> list[str]:
    labels = []
    for lo, hi in zip(edges, (*edges[1:], None)):
        if hi is None:
            labels.append(f"{lo}+")
        elif hi - lo == 1:
            labels.append(f"{lo}")
        else:
            labels.append(f"{lo}-{hi - 1}")
    return labels


def _records_of(source: Any) -> Iterable[ProposalRecord]:
    if isinstance(source, (str, os.PathLike)):
        source = ProposalStore(source)
    if hasattr(source, "records"):
        return source.records()
    return source


def _flat(source: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """counts ``(N,)``, boxes ``(M, 4)`` float64, scores ``(M,)``, sizes ``(N, 2)``."""
    if isinstance(source, (str, os.PathLike)):
        source = ProposalStore(source)
    if isinstance(source, ProposalStore):
        # straight from the mapped sections: no per-image Python work for millions of images
        counts = np.diff(np.asarray(source._box_offsets))
        return (counts, np.asarray(source._boxes, dtype=np.float64),
                np.asarray(source._scores, dtype=np.float64),
                np.asarray(source._sizes, dtype=np.int64).reshape(-1, 2))
    counts, boxes, scores, sizes = [], [], [], []
    for rec in _records_of(source):
        counts.append(len(rec.boxes))
        boxes.append(np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4))
        scores.append(np.asarray(rec.scores, dtype=np.float64).reshape(-1))
        sizes.append(rec.image_size)
    return (np.asarray(counts, dtype=np.int64),
            np.concatenate(boxes) if boxes else np.zeros((0, 4)),
            np.concatenate(scores) if scores else np.zeros(0),
            np.asarray(sizes, dtype=np.int64).reshape(-1, 2))


def proposal_stats(store: Any) -> dict[str, Any]:
    """Descriptive statistics of a proposal store.

    Args:
        store: a :class:`~objcrop_plugin.proposals.store.ProposalStore`, a path to one, or
            anything with ``records()`` (an importer) or an iterable of records.

    Returns:
        A JSON-serialisable dict:

        - ``images``, ``boxes``, ``images_without_proposals``;
        - ``boxes_per_image``: ``mean, median, min, max`` and ``histogram`` (bin label ->
          images, bins ``0, 1, 2-4, 5-9, ..., 1000+``);
        - ``box_area``: over boxes with finite coordinates, clipped to their image:
          ``relative`` quantiles (``min, p5, p25, median, p75, p95, max``) of box area /
          image area, and ``coco_buckets`` (``small, medium, large``: counts by area in
          pixels^2 of the stored image size);
        - ``unusable_boxes``: boxes no engine can crop from (non-finite, or a side under
          :data:`objcrop_plugin.boxes.MIN_WINDOW` px after clipping);
        - ``scores``: ``min, max`` of finite scores and ``nan`` (boxes without a score).

        Statistics of an empty set are ``None``.
    """
    counts, boxes, scores, sizes = _flat(store)
    n, m = len(counts), len(boxes)
    stats: dict[str, Any] = {"images": int(n), "boxes": int(m),
                             "images_without_proposals": int((counts == 0).sum())}
    hist = np.histogram(counts, bins=[*_COUNT_EDGES, np.inf])[0] if n else \
        np.zeros(len(_COUNT_EDGES), dtype=np.int64)
    stats["boxes_per_image"] = {
        "mean": float(counts.mean()) if n else None,
        "median": float(np.median(counts)) if n else None,
        "min": int(counts.min()) if n else None,
        "max": int(counts.max()) if n else None,
        "histogram": dict(zip(_bin_labels(_COUNT_EDGES), (int(c) for c in hist))),
    }
    box_size = np.repeat(sizes, counts, axis=0).astype(np.float64)  # (M, 2) width, height
    finite = np.isfinite(boxes).all(axis=1)
    b, wh = boxes[finite], box_size[finite]
    b = np.stack([np.clip(b[:, 0], 0, wh[:, 0]), np.clip(b[:, 1], 0, wh[:, 1]),
                  np.clip(b[:, 2], 0, wh[:, 0]), np.clip(b[:, 3], 0, wh[:, 1])], axis=1)
    side_w, side_h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    usable = (side_w >= box_ops.MIN_WINDOW) & (side_h >= box_ops.MIN_WINDOW)
    area = box_ops.area(b)
    rel = area / (wh[:, 0] * wh[:, 1])
    bucket = np.digitize(area, SIZE_EDGES)
    stats["box_area"] = {
        "relative": {name: (float(np.quantile(rel, q)) if len(rel) else None)
                     for name, q in _QUANTILES},
        "coco_buckets": {name: int((bucket == i).sum()) for i, name in enumerate(SIZE_NAMES)},
    }
    stats["unusable_boxes"] = int(m - usable.sum())
    fs = scores[np.isfinite(scores)]
    stats["scores"] = {
        "min": float(fs.min()) if len(fs) else None,
        "max": float(fs.max()) if len(fs) else None,
        "nan": int(np.isnan(scores).sum()),
    }
    return stats


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        small_or_big = v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4)
        return f"{v:.{digits}g}" if small_or_big else f"{v:.{digits}f}"
    return str(v)


def format_stats(stats: dict[str, Any]) -> str:
    """A human-readable table of :func:`proposal_stats`."""
    bpi, area, sc = stats["boxes_per_image"], stats["box_area"], stats["scores"]
    lines = [
        f"images                    {stats['images']}",
        f"boxes                     {stats['boxes']}",
        f"images without proposals  {stats['images_without_proposals']}",
        f"unusable boxes            {stats['unusable_boxes']}",
        "boxes per image           "
        + "  ".join(f"{k} {_fmt(bpi[k], 2)}" for k in ("mean", "median", "min", "max")),
        "",
        "boxes per image  images",
    ]
    lines += [f"  {label:>14}  {count}" for label, count in bpi["histogram"].items()]
    lines += ["", "box area / image area (clipped)"]
    lines.append("  " + "  ".join(f"{k} {_fmt(v, 4)}" for k, v in area["relative"].items()))
    buckets = area["coco_buckets"]
    lines += [
        "",
        "COCO size buckets (px^2 at the stored size)",
        f"  small < 32^2  {buckets['small']}",
        f"  medium < 96^2 {buckets['medium']}",
        f"  large         {buckets['large']}",
        "",
        f"scores  min {_fmt(sc['min'], 4)}  max {_fmt(sc['max'], 4)}  without score {sc['nan']}",
    ]
    return "\n".join(lines)


def _first_line(path: str | os.PathLike[str], limit: int = 1 << 20) -> bytes:
    """The file's first line that is not blank (JSON Lines readers skip blank lines), without a
    UTF-8 BOM, or up to ``limit`` bytes of it; a store's first bytes as they are."""
    from .store import MAGIC

    with open(path, "rb") as f:
        head = f.read(limit)
    head = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    if not head.startswith(MAGIC):
        head = head.lstrip()
    return head.split(b"\n", 1)[0]


def open_ground_truth(
    path: str | os.PathLike[str],
    images_json: str | os.PathLike[str] | None = None,
    key_prefix: str = "",
) -> Any:
    """Ground-truth boxes for :func:`recall`, from a file recognised by its content.

    - a proposal store (its magic bytes): a :class:`ProposalStore`;
    - JSON Lines proposals (the first line is a JSON object with ``key`` and ``boxes``): a
      :class:`~objcrop_plugin.proposals.jsonl.JsonLinesImporter`;
    - anything else: a COCO annotations file, or a COCO results list with ``images_json``
      (:class:`~objcrop_plugin.proposals.importers.CocoImporter`, which explains a file that is
      neither).

    ``images_json`` and ``key_prefix`` apply to COCO files only; with a store or JSON Lines
    they are refused rather than silently ignored.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an option that does not apply, or a file of no known kind.
    """
    from .importers import CocoImporter
    from .jsonl import JsonLinesImporter
    from .store import MAGIC

    if not os.path.isfile(path):
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    line = _first_line(path)
    kind = "COCO"
    if line.startswith(MAGIC):
        kind = "proposal store"
    elif line.lstrip().startswith(b"{"):
        try:
            obj = json.loads(line)
        except ValueError:  # a COCO file spread over lines, or one longer than the limit
            obj = None
        if isinstance(obj, dict) and "key" in obj and "boxes" in obj:
            kind = "JSON Lines"
    if kind != "COCO":
        unused = [name for name, value in (("--gt-images-json", images_json),
                                           ("--key-prefix", key_prefix)) if value]
        if unused:
            what = "a proposal store" if kind == "proposal store" else "a JSON Lines file"
            verb = "apply" if len(unused) > 1 else "applies"
            raise ValueError(
                f"{path} is {what}, with keys of its own: {' and '.join(unused)} {verb} to "
                "COCO ground truth only. Fix: leave them out."
            )
        return ProposalStore(path) if kind == "proposal store" else JsonLinesImporter(path)
    if (line.lstrip()[:1] not in (b"{", b"[") and b"ImageID" in line
            and b"XMin" in line):  # an OpenImages boxes CSV's header
        raise ValueError(
            f"{path} looks like an OpenImages boxes CSV "
            f"({line[:60].decode('utf-8', 'replace').strip()!r}), "
            "which needs the images' sizes to give pixel boxes. Fix: import it first "
            f"(`objcrop proposals import-openimages {path} --images-root IMAGES_DIR "
            "-o gt.objcrop`), then --gt gt.objcrop"
        )
    return CocoImporter(path, images_json=images_json, key_prefix=key_prefix)


def recall(
    store: Any,
    gt: Any,
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    ks: Sequence[int | None] = (1, 10, 100),
) -> dict[str, Any]:
    """Recall of ground-truth boxes by the top-``k`` proposals of the same image.

    A ground-truth box is recalled at ``(t, k)`` when one of its image's ``k`` best proposals
    (by score, highest first; proposals without a score keep their stored order, after the
    scored ones) has IoU ``>= t`` with it. Proposals stored at another image size of the same
    aspect ratio are rescaled to the ground truth's size first. An image of ``gt`` that the
    store lacks, or holds at another aspect ratio (another image, or a transposed size: the
    EXIF orientation applied on one side only; see
    :func:`~objcrop_plugin.boxes.size_mismatch`), counts as a miss for each of its boxes
    (and is reported).

    Args:
        store: the proposals: a :class:`~objcrop_plugin.proposals.store.ProposalStore` (or a
            path to one), or anything with ``get(key) -> Proposals | None``.
        gt: the ground truth: a store, a path to one, anything with ``records()`` (e.g.
            :class:`~objcrop_plugin.proposals.importers.CocoImporter`), or an iterable of
            :class:`~objcrop_plugin.proposals.store.ProposalRecord`.
        iou_thresholds: ``(T,)`` IoU thresholds.
        ks: ``(K,)`` numbers of proposals; ``None`` means all of them.

    Returns:
        A dict: ``images`` (of ``gt``), ``images_without_gt`` (gt images with no box; they do
        not count), ``degenerate_gt_boxes`` (ground-truth boxes of no area once clipped to
        the image, left out; the others are clipped to the image, as the proposals are), ``missing_images`` and ``missing_keys`` (the first 20),
        ``mismatched_images`` (stored at another aspect ratio; ``transposed_images`` of them
        with width and height swapped) and ``mismatched_keys`` (the first 20), ``gt_boxes``,
        ``gt_boxes_by_size`` (``small, medium, large``), ``recall[t][k]`` and
        ``recall_by_size[size][t][k]`` (``None`` for a bucket without boxes), and the
        ``iou_thresholds`` and ``ks`` used (``k`` ``None`` is the key ``"all"``).

    Example:
        >>> r = recall("props.objcrop", CocoImporter("instances_val2017.json",  # doctest: +SKIP
        ...                                         key_prefix="val2017/"))
        >>> print(format_recall(r))  # doctest: +SKIP
    """
    if isinstance(store, (str, os.PathLike)):
        store = ProposalStore(store)
    ths = np.asarray([float(t) for t in iou_thresholds], dtype=np.float64)
    if not ((ths > 0) & (ths <= 1)).all():
        raise ValueError(f"recall: IoU thresholds must be in (0, 1], got {list(iou_thresholds)}")
    k_keys: list[int | str] = []
    for k in ks:
        if k is None:
            k_keys.append("all")
        elif int(k) < 1:
            raise ValueError(f"recall: k must be >= 1 or None (all proposals), got {k!r}")
        else:
            k_keys.append(int(k))
    kmax = None if any(k == "all" for k in k_keys) else max(k_keys, default=0)
    n_t, n_k = len(ths), len(k_keys)
    hits = np.zeros((n_t, len(SIZE_NAMES), n_k), dtype=np.int64)
    totals = np.zeros(len(SIZE_NAMES), dtype=np.int64)
    images = without_gt = missing = mismatched = transposed = degenerate = 0
    missing_keys: list[str] = []
    mismatched_keys: list[str] = []
    for rec in _records_of(gt):
        images += 1
        # as the generators clip their boxes: a ground-truth box reaching past the image is
        # clipped, one of no area in it (a zero width, or wholly outside) cannot be found
        g = box_ops.clip(rec.boxes, rec.image_size)
        keep = np.isfinite(g).all(axis=1) & (g[:, 2] > g[:, 0]) & (g[:, 3] > g[:, 1])
        degenerate += int((~keep).sum())
        g = g[keep]
        if len(g) == 0:
            without_gt += 1
            continue
        bucket = np.digitize(box_ops.area(g), SIZE_EDGES)  # (G,) 0 small, 1 medium, 2 large
        totals += np.bincount(bucket, minlength=len(SIZE_NAMES))
        props = store.get(rec.key)
        if props is None:
            missing += 1
            if len(missing_keys) < 20:
                missing_keys.append(rec.key)
            continue
        if tuple(props.image_size) != tuple(rec.image_size):
            why = box_ops.size_mismatch(props.image_size, rec.image_size)
            if why is not None:  # another image, or EXIF applied on one side only
                mismatched += 1
                if len(mismatched_keys) < 20:
                    mismatched_keys.append(rec.key)
                transposed += why == "transposed"
                continue
            props = props.rescaled(rec.image_size)
        order = np.argsort(-np.asarray(props.scores, dtype=np.float64), kind="stable")
        # clipped as the ground truth is, and as the crop policies clip a box before cutting
        # a view from it (imported boxes may reach past the image)
        raw = box_ops.as_boxes(props.boxes)[order[:kmax]]
        p = box_ops.clip(raw, rec.image_size)
        p[~np.isfinite(raw).all(axis=1)] = np.nan  # no view is cut from it: never a hit
        if len(p) == 0:
            continue
        # best IoU among the first j+1 proposals, for every j: one IoU matrix serves every k
        best = np.maximum.accumulate(box_ops.iou(g, p), axis=1)  # (G, P)
        cols = [len(p) - 1 if k == "all" else min(k, len(p)) - 1 for k in k_keys]
        hit = best[None, :, cols] >= ths[:, None, None]  # (T, G, K)
        for i in range(len(SIZE_NAMES)):
            sel = bucket == i
            if sel.any():
                hits[:, i] += hit[:, sel].sum(axis=1)
    all_hits, total = hits.sum(axis=1), int(totals.sum())
    t_keys = [float(t) for t in ths]

    def table(h: np.ndarray, n: int) -> dict[float, dict[int | str, float | None]]:
        return {t: {k: (float(h[a, b]) / n if n else None) for b, k in enumerate(k_keys)}
                for a, t in enumerate(t_keys)}

    return {
        "iou_thresholds": t_keys,
        "ks": k_keys,
        "images": images,
        "images_without_gt": without_gt,
        "degenerate_gt_boxes": degenerate,
        "missing_images": missing,
        "missing_keys": missing_keys,
        "mismatched_images": mismatched,
        "transposed_images": transposed,
        "mismatched_keys": mismatched_keys,
        "gt_boxes": total,
        "gt_boxes_by_size": {name: int(totals[i]) for i, name in enumerate(SIZE_NAMES)},
        "recall": table(all_hits, total),
        "recall_by_size": {name: table(hits[:, i], int(totals[i]))
                           for i, name in enumerate(SIZE_NAMES)},
    }


def format_recall(result: dict[str, Any]) -> str:
    """A human-readable table of :func:`recall`: one row per IoU threshold and size bucket."""
    ks = result["ks"]
    head = f"{'IoU':>5}  {'size':<7}{'boxes':>8}" + "".join(f"{'@' + str(k):>9}" for k in ks)
    lines = [
        f"recall of {result['gt_boxes']} ground-truth boxes in {result['images']} images"
        + (f" ({result['images_without_gt']} without boxes)" if result["images_without_gt"]
           else "")
        + (f"; {result['degenerate_gt_boxes']} ground-truth boxes of no area in their image "
           "left out" if result.get("degenerate_gt_boxes") else ""),
    ]
    if result["missing_images"]:
        lines.append(
            f"{result['missing_images']} images are missing from the store and count as misses "
            f"(first: {', '.join(result['missing_keys'][:3])})"
        )
    if result.get("mismatched_images"):
        n, t = result["mismatched_images"], result.get("transposed_images", 0)
        lines.append(
            f"{n} images are stored at another aspect ratio than the ground truth's"
            + (f" ({t} transposed: EXIF orientation applied on one side only?)" if t else "")
            + f" and count as misses (first: {', '.join(result['mismatched_keys'][:3])}); "
            "rebuild their proposals or check the ground truth's sizes"
        )
    lines += ["", head, "-" * len(head)]
    rows = [("all", result["gt_boxes"], result["recall"])] + [
        (name, result["gt_boxes_by_size"][name], result["recall_by_size"][name])
        for name in SIZE_NAMES
    ]
    for t in result["iou_thresholds"]:
        for name, n, tab in rows:
            cells = "".join(f"{_fmt(tab[t][k]):>9}" for k in ks)
            lines.append(f"{t:>5.2f}  {name:<7}{n:>8}{cells}")
    return "\n".join(lines)
