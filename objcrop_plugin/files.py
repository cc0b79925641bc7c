"""Files at the bottom of the package: atomic writes and dataset keys.

Nothing here imports another module of the package, so every layer (images, proposals,
engines, training) can use it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "normalize_key"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_umask()


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | memoryview | Iterable[bytes | memoryview] | Callable[[BinaryIO], object],
    durable: bool = True,
) -> Path:
    """Write ``path`` all at once or not at all: a temporary file beside it, renamed over it.

    A kill, a full disk or an exception leaves either the old file or the new one, never a torn
    one, and never a temporary file behind (except after SIGKILL: temporaries are named
    ``.NAME.<random>.tmp``, so callers that resume can recognise and remove them).

    Args:
        path: the file to write; its folder is created.
        data: the bytes, an iterable of byte chunks, or a function that writes into the open
            binary file (e.g. ``lambda f: image.save(f, format="PNG")``).
        durable: ``fsync`` the file and its folder, so the new content survives a power loss
            (cheap for a few large files; pass ``False`` for many small ones).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    The new file keeps the mode of the file it replaces, else the umask's default (``mkstemp``
    alone would make it owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else _NEW_FILE_MODE
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            elif isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                for chunk in data:
                    f.write(chunk)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        with contextlib.suppress(OSError):  # make the rename itself durable (POSIX only)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    return path


def normalize_key(key: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """The store key of an image: its path relative to the dataset root, with ``/`` separators.

    Example:
        >>> normalize_key("/data/coco/train/000001.jpg", root="/data/coco")
        'train/000001.jpg'
        >>> normalize_key("./train\\\\000001.jpg")
        'train/000001.jpg'
    """
    k = os.fspath(key)
    if root is not None:
        k = os.path.relpath(os.path.abspath(k), os.path.abspath(os.fspath(root)))
    k = k.replace("\\", "/")
    k = posixpath.normpath(k) if k else k
    while k.startswith("./"):
        k = k[2:]
    return k
