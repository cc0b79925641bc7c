"""Images at the bottom of the package: listing a folder, opening, decoding.

Boxes in a proposal store refer to the *displayed* image: the decoded pixels with the EXIF
orientation applied (what every image viewer shows and what the proposal build sees). This
module is the one place that defines those pixels, the one JPEG draft-mode rule
(:func:`draft_factor`) and the one open -> plan -> decode walk (:func:`decode_planned`) that
every engine, dataset and proposal generator uses.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from .boxes import ImageSize, size_mismatch
from .files import atomic_write, normalize_key

_log = logging.getLogger("objcrop_plugin")

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "OpenedImage",
    "decode_planned",
    "draft_factor",
    "list_images",
    "load_rgb",
    "open_image",
    "opened_from",
    "png_significant_bits",
    "read_image",
    "scan_images",
    "to_rgb",
    "upright_size",
    "write_bad_list",
]

#: File name endings listed as images (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")

# EXIF orientation -> the PIL transpose that shows the image upright (as ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112


class ImageDecodeError(OSError):
    """An image file that cannot be read; the message names the file."""


@dataclass
class OpenedImage:
    """A lazily opened image: the header is read, the pixels are not yet decoded.

    Attributes:
        image: the PIL image (not loaded).
        orientation: EXIF orientation, 1..8 (1 = as stored).
        size: ``(width, height)`` of the *displayed* image (after the EXIF orientation).
        path: where it came from, for error messages.
    """

    image: Image.Image
    orientation: int
    size: ImageSize
    path: str

    @property
    def is_jpeg(self) -> bool:
        return self.image.format == "JPEG"


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block is not worth failing a sample for
        return 1
    return value if value in _TRANSPOSE else 1


def opened_from(img: Image.Image, path: str | os.PathLike[str]) -> OpenedImage:
    """Wrap an image that someone else opened (e.g. lightly's dataset) without decoding it.

    Its EXIF orientation is read from the header, so :func:`load_rgb` shows it upright.
    """
    orientation = _orientation(img)
    w, h = img.size
    size = ImageSize(h, w) if orientation in (5, 6, 7, 8) else ImageSize(w, h)
    return OpenedImage(img, orientation, size, os.fspath(path))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "another kind of file"


#: PIL's size check reads a process-wide setting; opens that replace it hold this lock
_PIL_LIMIT_LOCK = threading.Lock()


def _open_unchecked(path: str | os.PathLike[str]) -> Image.Image:
    """``Image.open`` without PIL's decompression-bomb check (the caller checks the size)."""
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def open_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> OpenedImage:
    """Open an image and read its displayed size without decoding the pixels.

    Args:
        max_pixels: the caller's own size limit, checked by the caller on the returned size:
            PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is then not
            applied, so a limit above it takes effect. ``None``: PIL's limit applies.

    Raises:
        ImageDecodeError: the file is missing, not a regular file (a FIFO would block the
            open forever, a device would never end), not an image PIL can open, or over
            PIL's pixel limit (the message says how to raise it).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ImageDecodeError(
            f"{path}: cannot open as an image ({type(exc).__name__}: {exc}). "
            "Fix: remove or replace the file."
        ) from exc
    if not stat.S_ISREG(mode):
        raise ImageDecodeError(
            f"{path}: not a regular file but {_kind(mode)}; only regular files are read as "
            "images. Fix: remove it from the image folder."
        )
    try:
        if max_pixels is not None:
            img = _open_unchecked(path)
        else:
            # up to twice its limit PIL only warns and the image opens; past it, the error below
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"{path}: too large to decode ({exc}). Fix: raise the limit (`objcrop proposals "
            "build --max-pixels N`; in Python, `PIL.Image.MAX_IMAGE_PIXELS = N`) or shrink the "
            "image."
        ) from exc
    except Exception as exc:
        raise ImageDecodeError(
            f"{path}: cannot open as an image ({type(exc).__name__}: {exc}). "
            "Fix: remove or replace the file."
        ) from exc
    return opened_from(img, path)


#: bit depths an integer image's values are assumed to fill (the smallest that holds them)
_CONTAINER_BITS = (8, 10, 12, 14, 16)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_significant_bits(path: str | os.PathLike[str]) -> int | None:
    """The significant bits of a grayscale PNG's samples from its ``sBIT`` chunk, or ``None``.

    A 12-bit sensor image saved as a 16-bit PNG may say so in ``sBIT`` (PIL does not read that
    chunk). Only the chunks before the image data are read; an unreadable file, a file that is
    not a PNG, or one without ``sBIT`` gives ``None``.
    """
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return None
            for _ in range(256):  # sBIT must come before PLTE and IDAT
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind == b"sBIT":
                    data = f.read(length)
                    bits = data[0] if data else 0
                    return bits if 1 <= bits <= 16 else None
                if kind in (b"IDAT", b"PLTE", b"IEND"):
                    return None
                f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    except OSError:
        return None
    return None


def _sixteen_bit_to_l(img: Image.Image, significant_bits: int | None = None) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        hi = float(np.nanmax(arr)) if arr.size else 1.0
        scale = 255.0 if hi <= 1.0 else 255.0 / max(hi, 1e-12) if hi > 255 else 1.0
        return Image.fromarray(np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8))
    arr = np.clip(arr.astype(np.int64), 0, None)
    hi = int(arr.max()) if arr.size else 0
    if significant_bits is not None and hi < 1 << significant_bits:
        bits = significant_bits
    elif hi > 65535:  # 32-bit data: no container depth to assume, use its own range
        return Image.fromarray((arr * (255.0 / hi)).astype(np.uint8))
    else:
        bits = next(b for b in _CONTAINER_BITS if hi < 1 << b)
    top = (1 << bits) - 1
    return Image.fromarray(((arr * 255 + top // 2) // top).astype(np.uint8))  # rounded


def to_rgb(img: Image.Image, significant_bits: int | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Integer images of more than 8 bits (``I;16`` and the other 16-bit modes, ``I``) are
    scaled from their bit depth ``b`` to 8 bits, ``v8 = round(v * 255 / (2**b - 1))``
    (negative values are 0). ``b`` is ``significant_bits`` when given (a PNG's ``sBIT``
    chunk, which :func:`load_rgb` reads) and the values fit in it; otherwise the smallest of
    8, 10, 12, 14 and 16 bits that holds the image's largest value. So 8-bit data saved in a
    16-bit file is kept as is (as PIL's own conversion does), 12-bit sensor data maps 4095 to
    255, and full-range 16-bit data is divided by 257 (as OpenCV's ``imread`` does, up to
    rounding). Values above 16 bits (32-bit ``I``) are scaled by the image's own maximum.
    Float images (``F``) map [0, 1], or [0, max] when the maximum is above 255. Modes with
    alpha drop it, as torchvision's and lightly's loaders do; palette and CMYK images are
    converted by PIL. Every decode of the package (training views, proposal builds,
    evaluation, pictures) goes through this function, so boxes and pixels agree.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _sixteen_bit_to_l(img, significant_bits)
    return img.convert("RGB")


def draft_factor(
    windows: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], max_factor: int = 8
) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) that upsamples no view.

    A view cut from window ``(x1, y1, x2, y2)`` (pixels of the full image) to ``(height,
    width)`` output pixels can be decoded at ``1/r`` resolution without losing detail when the
    window is still at least ``r`` times the output size on both axes. For a whole image of
    ``(w, h)`` shrunk to ``(w', h')`` pass ``[(0, 0, w, h)], [(h', w')]``. This is the only
    draft rule of the package: the CPU and GPU engines, the solo-learn datasets, the
    evaluation loader and the proposal build all call it.

    Example:
        >>> draft_factor([(0, 0, 640, 480)], [(120, 160)])
        4
        >>> draft_factor([(0, 0, 640, 480), (10, 10, 90, 70)], [(120, 160), (224, 224)])
        1
    """
    slack = math.inf
    for (x1, y1, x2, y2), (oh, ow) in zip(windows, sizes):
        slack = min(slack, (x2 - x1) / ow, (y2 - y1) / oh)
    factor = 1
    while factor * 2 <= min(slack, max_factor):
        factor *= 2
    return factor


def load_rgb(opened: OpenedImage, reduce: int = 1) -> Image.Image:
    """Decode to displayed RGB pixels; JPEGs may be decoded at ``1/reduce`` via draft mode.

    Returns the image in the displayed orientation. Its size may be smaller than
    ``opened.size`` by up to ``reduce`` (rounded up); callers scale their windows by the ratio.
    """
    img = opened.image
    try:
        if reduce > 1 and opened.is_jpeg:
            w, h = img.size
            # PIL picks the largest DCT scale s with w // request >= s: request floor(w / r)
            img.draft(None, (max(1, w // reduce), max(1, h // reduce)))
        # the file PIL read (opened.path may be a dataset key, relative to another folder)
        source = getattr(img, "filename", "")
        bits = (png_significant_bits(source)
                if source and img.format == "PNG" and img.mode.startswith("I") else None)
        img.load()
        img = to_rgb(img, bits)
    except Exception as exc:
        raise ImageDecodeError(
            f"{opened.path}: cannot decode ({type(exc).__name__}: {exc}). "
            "Fix: remove or replace the file."
        ) from exc
    method = _TRANSPOSE.get(opened.orientation)
    return img.transpose(method) if method is not None else img


T = TypeVar("T")
Box = Sequence[float]


def decode_planned(
    source: str | os.PathLike[str] | OpenedImage,
    plan: Callable[[tuple[int, int]], tuple[T, Sequence[Box], Sequence[Sequence[int]]]],
    draft: bool = True,
) -> tuple[Image.Image, tuple[int, int], T]:
    """Open an image, plan from its header, decode it once as small as the plan allows.

    The walk every sample takes: read the header (displayed size, EXIF orientation) without
    decoding, let ``plan(size)`` choose what to cut (crop windows, a canvas fit...), decode the
    pixels at the largest JPEG draft reduction that still covers what the plan needs, and close
    the file on any error.

    Args:
        source: an image path, or an :class:`OpenedImage` (see :func:`opened_from`).
        plan: ``plan((width, height)) -> (result, regions, out_sizes)``: ``regions`` are xyxy
            boxes in pixels of the displayed full-size image and ``out_sizes`` the ``(height,
            width)`` each is resampled to (see :func:`draft_factor`).
        draft: allow JPEG draft decoding.

    Returns:
        ``(image, size, result)``: the upright RGB image (possibly smaller than ``size`` by
        the draft factor), the displayed full size ``(width, height)``, and ``plan``'s result.
    """
    opened = source if isinstance(source, OpenedImage) else open_image(source)
    try:
        result, regions, out_sizes = plan(opened.size)
        reduce = draft_factor(regions, out_sizes) if draft and opened.is_jpeg else 1
        image = load_rgb(opened, reduce)  # PIL closes the file once the pixels are loaded
    except BaseException:
        opened.image.close()
        raise
    return image, opened.size, result


def list_images(root: str | os.PathLike[str]) -> list[str]:
    """All image files under ``root``, as sorted keys (paths relative to ``root``, ``/``-separated).

    Links to folders are followed, but each real folder is entered once: a link back up the
    tree (``self -> .``) or a second link to the same folder adds nothing, so a link can never
    lead into a cycle. Each real file is listed once too (symbolic and hard links to a listed
    file are left out), under its real name where the tree holds one: the real folders and
    files are walked first, links after. Only regular files are listed (a FIFO, socket or
    device named ``*.jpg`` would block or never end a read), with an image extension
    (:data:`IMAGE_EXTENSIONS`) and a name not starting with a dot; hidden folders are skipped.

    Where ``\\`` is not the folder separator (Linux, macOS), a file whose path below ``root``
    holds a backslash is left out with a warning naming it: keys read ``\\`` as a folder
    separator (a key written on Windows names the same image), so such a file has no key.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    top = os.stat(root)
    seen_dirs = {(top.st_dev, top.st_ino)}
    seen_files: set[tuple[int, int]] = set()
    keys: list[str] = []
    linked_dirs: list[str] = []  # followed once the real tree is listed
    linked_files: list[str] = []
    unkeyable: list[str] = []  # paths holding a backslash where it is not the separator
    undecodable: list[str] = []  # names that are not UTF-8 (no key can hold them)
    unreadable: list[str] = []  # folders (or entries) that could not be listed

    duplicates: list[str] = []  # other names (hard or symbolic links) of listed files

    def add(path: str, ident: tuple[int, int]) -> None:
        if ident in seen_files:
            duplicates.append(os.path.relpath(path, root))
        else:
            seen_files.add(ident)
            rel = os.path.relpath(path, root)
            if os.sep != "\\" and "\\" in rel:
                unkeyable.append(rel)
            elif not _is_utf8(rel):
                undecodable.append(rel)
            else:
                keys.append(normalize_key(rel))

    def walk(folder: str, dev: int) -> None:
        stack = [(folder, dev)]
        while stack:
            here, here_dev = stack.pop()
            try:
                entries = sorted(os.scandir(here), key=lambda e: e.name)
            except OSError as exc:  # an unreadable folder: nothing to list there
                unreadable.append(f"{here} ({exc.strerror or exc})")
                continue
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_symlink():
                        if entry.is_dir():
                            linked_dirs.append(entry.path)
                        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                            linked_files.append(entry.path)
                    elif entry.is_dir():
                        st = entry.stat()
                        ident = (st.st_dev, st.st_ino)
                        if ident not in seen_dirs:  # a bind mount can repeat a folder
                            seen_dirs.add(ident)
                            subdirs.append((entry.path, st.st_dev))
                    elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                        add(entry.path, (here_dev, entry.inode()))
                except OSError as exc:
                    unreadable.append(f"{entry.path} ({exc.strerror or exc})")
                    continue
            stack.extend(reversed(subdirs))

    walk(os.fspath(root), top.st_dev)
    while linked_dirs:
        path = linked_dirs.pop(0)
        try:
            st = os.stat(path)
        except OSError:  # a broken link
            continue
        if (st.st_dev, st.st_ino) not in seen_dirs:
            seen_dirs.add((st.st_dev, st.st_ino))
            walk(path, st.st_dev)
    for path in linked_files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):  # not a FIFO, device, folder or broken link
            add(path, (st.st_dev, st.st_ino))
    if unkeyable:
        _log.warning(
            "%d image file(s) under %s left out: a backslash in a file or folder name cannot be "
            "part of a key (keys read it as a folder separator, as on Windows): %s. Fix: rename "
            "them.", len(unkeyable), root, _some(sorted(unkeyable), repr))
    if undecodable:
        _log.warning(
            "%d image file(s) under %s left out: their names are not valid UTF-8, which keys "
            "and stores need: %s. Fix: rename them (e.g. convmv -f latin1 -t utf8 -r --notest "
            "FOLDER).", len(undecodable), root, _some(sorted(undecodable), ascii))
    if duplicates:
        _log.warning(
            "%d image name(s) under %s are hard or symbolic links to files listed under "
            "another name, and are left out (each file is listed once): %s. A library that "
            "lists every name (torchvision's ImageFolder) finds no proposals under these and "
            "takes scene crops for them. Fix: keep one name per file, or copy the files.",
            len(duplicates), root, _some(sorted(duplicates), repr))
    if unreadable:
        _log.warning(
            "%d folder(s) or file(s) under %s could not be read and were left out of the image "
            "list: %s. Fix: check their permissions or the file system, then rerun (a resumed "
            "run needs the same image list).", len(unreadable), root, _some(unreadable, str, "; "))
    keys.sort()
    return keys


def _some(names: list[str], show: Callable[[str], str], sep: str = ", ") -> str:
    """The first five of ``names`` for a message, then ``...`` when there are more."""
    return sep.join(show(k) for k in names[:5]) + (sep + "..." if len(names) > 5 else "")


def _is_utf8(name: str) -> bool:
    """Whether a file name (decoded by Python with surrogate escapes) was valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def upright_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The displayed ``(width, height)`` of an image from its header (EXIF orientation
    applied, nothing decoded), or ``None`` when the file cannot be opened as an image."""
    try:
        opened = open_image(path)
    except ImageDecodeError:
        return None
    opened.image.close()
    return opened.size


def read_image(path: str | os.PathLike[str]) -> OpenedImage:
    """Open and fully decode an image, to check that it can be read (pixels discarded).

    Returns the :class:`OpenedImage` (closed) with its displayed size and EXIF orientation.

    Raises:
        ImageDecodeError: the file cannot be opened or decoded (the message names it).
    """
    opened = open_image(path)
    try:
        load_rgb(opened)
    finally:
        opened.image.close()
    return opened


def scan_images(
    root: str | os.PathLike[str],
    keys: Sequence[str] | None = None,
    stored_size: Callable[[str], tuple[int, int] | None] | None = None,
    progress: bool = False,
) -> list[tuple[str, str, str]]:
    """Check every image of a folder up front: what training would stumble on.

    Each image is opened and fully decoded; with ``stored_size`` (a key's image size in the
    proposal store, ``None`` when the store has no entry) its key must be in the store and the
    stored size must have the image's aspect ratio (:func:`~objcrop_plugin.boxes.size_mismatch`;
    a transposed size says the EXIF orientation was applied on one side only).

    Args:
        root: the image folder; keys are paths relative to it.
        keys: the images to check (default :func:`list_images`).
        stored_size: the proposal store's size lookup, or ``None`` to check images only.
        progress: show a tqdm progress bar.

    Returns:
        one ``(key, problem, detail)`` row per problem found, ``problem`` one of
        ``unreadable``, ``no_proposals``, ``size_transposed``, ``size_mismatch``.
    """
    root = Path(root)
    keys = list_images(root) if keys is None else list(keys)
    rows: list[tuple[str, str, str]] = []
    it: Iterable[str] = keys
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(keys, desc=f"checking {root}", unit="img")
    for key in it:
        try:
            opened = read_image(root / key)
        except ImageDecodeError as exc:
            rows.append((key, "unreadable", str(exc)))
            continue
        if stored_size is None:
            continue
        stored = stored_size(key)
        if stored is None:
            rows.append((key, "no_proposals", "no entry in the proposal store (scene crops)"))
            continue
        why = size_mismatch(stored, opened.size)
        if why is not None:
            (sw, sh), (w, h) = stored, opened.size
            detail = f"stored size {sw}x{sh}, image {w}x{h} (EXIF orientation {opened.orientation})"
            if why == "transposed":
                detail += ": the stored size is the transpose, an EXIF orientation mismatch"
            rows.append((key, f"size_{why}" if why == "transposed" else "size_mismatch",
                         detail + "; rebuild its proposals"))
    return rows


def write_bad_list(
    path: str | os.PathLike[str], rows: Iterable[Sequence[str]], header: Sequence[str]
) -> Path:
    """Write a tab-separated list atomically (:func:`~objcrop_plugin.files.atomic_write`).

    Tabs and line breaks inside a field are written as ``\\t`` and ``\\n``, so each row
    stays one line.
    """

    def clean(field: object) -> str:
        return str(field).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")

    lines = ["\t".join(clean(f) for f in header)]
    lines += ["\t".join(clean(f) for f in row) for row in rows]
    return atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
