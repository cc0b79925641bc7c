"""Files at the bottom of the package: atomic writes, output checks, locks and dataset keys.

Nothing here imports another module of the package, so every layer (images, proposals,
engines, training) can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import socket
import stat
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "OutputFileError",
    "OutputKind",
    "OutputLockedError",
    "atomic_write",
    "check_output",
    "normalize_key",
    "output_lock",
]


class OutputFileError(ValueError):
    """An output path this tool must not write: an input, a folder or device, a foreign file."""


class OutputLockedError(OutputFileError):
    """Another live process holds the output's lock (the message names it and the lock file)."""


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

    Raises:
        OutputFileError: ``path`` is a folder, device, pipe or socket (the rename would replace
            it, or a symbolic link to it, with a regular file); nothing is created.
    """
    path = Path(path)
    _refuse_non_regular(path)
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


def _refuse_non_regular(path: Path) -> None:
    try:
        st = os.stat(path)  # follows links: a link to /dev/stdout is a device here
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputFileError(f"{path} is a folder. Fix: give a file path to write.")
    if not stat.S_ISREG(st.st_mode):
        raise OutputFileError(
            f"{path} is not a regular file (a device, pipe or socket); objcrop writes files by "
            "renaming a finished temporary file over the target, which would replace it. "
            "Fix: give a file path to write."
        )


@dataclass(frozen=True)
class OutputKind:
    """A kind of file a command writes, and how to recognise one that this tool made.

    Attributes:
        name: what the file is, for messages ("proposal store").
        matches: ``matches(head) -> bool`` on the file's first ``head_bytes`` bytes.
        head_bytes: how many bytes ``matches`` needs.
    """

    name: str
    matches: Callable[[bytes], bool]
    head_bytes: int = 4096


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    path: str | os.PathLike[str],
    kind: OutputKind,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    force: bool = False,
) -> Path:
    """May a command write ``path``? Return it if so; raise :class:`OutputFileError` if not.

    Writes go to a new path, or over a regular file of the same ``kind`` made by this tool (a
    store over a store), or over an empty file. Never over an input of the same command (a
    file in ``inputs``, or a file inside a folder in ``inputs`` that is not of ``kind``), a
    folder, a device, pipe or socket, or a symbolic link (the atomic rename would replace the
    link, not write through it). Over any other regular file only with ``force``.

    Args:
        path: the output the command is about to write.
        kind: what the command writes.
        inputs: the files and folders the command reads (``None`` entries are ignored).
        force: allow replacing a regular file of another kind (``--force``).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> src = os.path.join(d, "in.txt")
        >>> _ = open(src, "w").write("mine")
        >>> check_output(src, OutputKind("text", lambda h: False), inputs=[src])
        Traceback (most recent call last):
        ...
        objcrop_plugin.files.OutputFileError: ...is also an input of this command...
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except NotADirectoryError:
        raise OutputFileError(f"{path}: a parent of this path is a file, not a folder") from None
    ins = [Path(p) for p in inputs if p is not None]
    for inp in ins:
        if _same_file(path, inp):
            raise OutputFileError(
                f"{path} is also an input of this command ({inp}); writing it would destroy "
                "the input. Fix: write to another path."
            )
    if stat.S_ISLNK(st.st_mode):
        raise OutputFileError(
            f"{path} is a symbolic link (to {os.readlink(path)}); writing replaces the link "
            "itself, not the file it points to. Fix: give the target's path, or another path."
        )
    _refuse_non_regular(path)
    if st.st_size == 0:
        return path  # nothing to lose
    try:
        with open(path, "rb") as f:
            head = f.read(kind.head_bytes)
    except OSError as exc:
        raise OutputFileError(f"{path} exists and cannot be read ({exc.strerror})") from None
    if kind.matches(head):
        return path
    resolved = path.resolve()
    for inp in ins:
        if inp.is_dir() and inp.resolve() in resolved.parents:
            raise OutputFileError(
                f"{path} is inside {inp}, a folder this command reads, and is not a "
                f"{kind.name}. Fix: write the output outside {inp}."
            )
    if force:
        return path
    raise OutputFileError(
        f"{path} exists and is not a {kind.name} written by objcrop; refusing to replace it. "
        "Fix: choose another output path, or pass --force to overwrite it."
    )


_HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or we cannot tell: assume alive)
    return True


def _holder(lock: Path) -> dict:
    try:
        info = json.loads(lock.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _locked_error(lock: Path, what: str, holder: dict) -> OutputLockedError:
    who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
           f"{holder.get('since', '?')}") if holder else "another process"
    pid = holder.get("pid")
    if holder.get("host") == _HOST and isinstance(pid, int) and not _pid_alive(pid):
        who += (f" (pid {pid} is gone, but a process it started still holds the lock: "
                "stop that process first)")
    return OutputLockedError(
        f"{what} is being written by {who} (lock file {lock}). Fix: wait for that run to end, "
        f"or write to another path; if that process is gone, delete {lock}."
    )


#: lock file descriptors this process holds: closed in a forked child (a DataLoader or Pool
#: worker), so the lock goes with its holder and never outlives it in an orphaned child
_HELD_LOCK_FDS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in list(_HELD_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


def remove_temporaries(path: str | os.PathLike[str]) -> int:
    """Remove the temporaries a SIGKILLed :func:`atomic_write` of ``path`` left beside it
    (``.NAME.<8 random characters>.tmp``); the number removed. Call it only while no other
    writer of ``path`` can be running (e.g. under :func:`output_lock`)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of ``target`` (the file ``.NAME.lock`` beside it) for a block.

    The lock file names the holder's pid and host. A second holder is refused at once with
    :class:`OutputLockedError`. A lock left by a dead process is taken over: with ``fcntl``
    (POSIX) the kernel drops a dead holder's lock on any host that shares the lock; without it,
    a lock naming a dead pid on this host is taken over. Processes forked while the lock is
    held (worker pools, DataLoader workers) do not keep it: a child left behind by a killed
    holder cannot block the next run. The lock file is removed on release, by the holder only.

    Yields:
        the lock file's path.
    """
    target = Path(target)
    lock = target.with_name(f".{target.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    info = json.dumps({"pid": os.getpid(), "host": _HOST,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %z")})
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is None:  # pragma: no cover - Windows
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = _holder(lock)
                if holder.get("host") == _HOST and not _pid_alive(int(holder.get("pid", -1))):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock)
                    continue
                raise _locked_error(lock, str(target), holder) from None
        else:
            raise _locked_error(lock, str(target), _holder(lock))
        os.write(fd, info.encode())
        os.close(fd)
        try:
            yield lock
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
        return
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _locked_error(lock, str(target), _holder(lock)) from None
        try:  # the holder before us may have removed the file between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD_LOCK_FDS.add(fd)
    owner = os.getpid()
    try:
        os.ftruncate(fd, 0)
        os.write(fd, info.encode())
        yield lock
    finally:
        if os.getpid() == owner:  # not in a forked child leaving the block
            _HELD_LOCK_FDS.discard(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            os.close(fd)


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


def other_unicode_forms(name: str) -> list[str]:
    """``name`` in the other Unicode normal forms (NFC, NFD) where they differ from it: a
    file name written composed (``café.jpg`` as most tools write it) is stored decomposed by
    file systems such as macOS's, and a name copied from one side must still find the other.

    Example:
        >>> other_unicode_forms("caf\\u00e9.jpg") == ["cafe\\u0301.jpg"]
        True
    """
    if name.isascii():
        return []
    forms = (unicodedata.normalize(form, name) for form in ("NFC", "NFD"))
    return list(dict.fromkeys(other for other in forms if other != name))
