"""Run ``python ...`` command lines in processes forked from an interpreter that has already
imported the heavy modules (torch, torchvision, Lightning, lightly, solo-learn).

A fresh interpreter spends about 10 s of this suite's 2-core machine importing them before
``objcrop train`` or ``objcrop-solo`` does anything, and the kill/resume and solo-learn tests
start dozens of such processes. Here a server process (``python warm_python.py SOCKET
MODULE...``) imports the modules once; for each command it forks a supervisor, which forks the
command's process and reports its exit status. The command's process is a real process of
its own: it gets the caller's pipes as its stdin, stdout and stderr, its own working
directory, environment and ``sys.argv``, can be sent any signal (SIGKILL included), runs the
command as ``python -m``, ``python -c`` or ``python script`` would, and ends with the command's
exit status (atexit handlers and non-daemon threads included). What it shares with the
server is only what fork shares: the imported modules, in the state import left them.

Use it where the process's own start is not what a test is about; tests of the console
scripts, of ``sys.argv`` relaunches (Lightning's DDP launcher) and of start-up behaviour run
a real ``subprocess``. ``OBJCROP_TEST_COLD=1`` runs every command in a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

_HERE = Path(__file__).resolve()
_READY = b"ready\n"


class WarmProcess:
    """The handle of a command run by :class:`WarmPython`: the part of
    :class:`subprocess.Popen` the tests use (``pid``, ``stdout``, ``stderr``, ``poll``,
    ``wait``, ``send_signal``, ``kill``, ``communicate``, ``returncode``)."""

    def __init__(self, conn: socket.socket, stdout: TextIO | None,
                 stderr: TextIO | None) -> None:
        self._conn = conn
        # unbuffered: the exit status is never read ahead of ``select`` (poll) seeing it
        self._reply = conn.makefile("rb", buffering=0)
        self.pid: int = json.loads(self._reply.readline())["pid"]
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._finish(self._reply.readline())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                line = self._reply.readline()
            except TimeoutError:
                raise subprocess.TimeoutExpired("warm python", timeout) from None
            finally:
                self._conn.settimeout(None)
            self._finish(line)
        assert self.returncode is not None
        return self.returncode

    def _finish(self, line: bytes) -> None:
        if not line:
            raise RuntimeError("the warm python server ended before the command did")
        status = json.loads(line)["status"]
        self.returncode = os.waitstatus_to_exitcode(status)
        self._reply.close()
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Read both pipes to their end (in threads, as ``Popen.communicate``), then wait."""
        results: dict[str, str] = {}

        def drain(name: str, stream: TextIO) -> None:
            results[name] = stream.read()
            stream.close()

        threads = [threading.Thread(target=drain, args=(name, stream), daemon=True)
                   for name, stream in (("stdout", self.stdout), ("stderr", self.stderr))
                   if stream is not None]
        for t in threads:
            t.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired("warm python", timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return results.get("stdout"), results.get("stderr")


class WarmPython:
    """A server that has imported ``preload`` (module names, or ``"module:function"`` to
    call a function after the import); :meth:`popen` and :meth:`run` take
    ``[sys.executable, "-m" | "-c" | script, ...]`` command lines (any other is run by
    :mod:`subprocess`). The server starts at the first command."""

    def __init__(self, folder: Path, preload: list[str]) -> None:
        self.cold = os.environ.get("OBJCROP_TEST_COLD") == "1"
        self._server: subprocess.Popen | None = None
        self._address = str(folder / "warm.sock")
        self._preload = list(preload)

    def _start(self) -> None:
        self._server = subprocess.Popen(
            [sys.executable, str(_HERE), self._address, *self._preload],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None, cwd=_HERE.parent)
        assert self._server.stdout is not None
        ready = self._server.stdout.readline()
        if ready != _READY:
            raise RuntimeError(f"the warm python server did not start: {ready!r}")

    def close(self) -> None:
        if self._server is not None:
            self._server.kill()
            self._server.wait()
            self._server = None

    def popen(self, cmd: list[str], *, stdout: Any = None, stderr: Any = None,
              cwd: Any = None, env: dict[str, str] | None = None, text: bool = True,
              start_new_session: bool = False) -> WarmProcess | subprocess.Popen:
        """As ``subprocess.Popen(cmd, stdin=DEVNULL, stdout=..., stderr=..., text=True,
        start_new_session=...)``; ``stdout``/``stderr``: ``None`` (inherit), ``PIPE``,
        ``DEVNULL`` or ``STDOUT``."""
        if not text:
            raise ValueError("warm python commands take text=True only")
        if self.cold or cmd[0] != sys.executable:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                    cwd=cwd, env=env, text=True,
                                    start_new_session=start_new_session)
        if self._server is None or self._server.poll() is not None:
            self._start()
        opened: list[int] = []
        fds: list[int] = []
        readers: dict[str, TextIO] = {}
        null = os.open(os.devnull, os.O_RDWR)
        opened.append(null)
        fds.append(null)  # stdin
        for name, want in (("stdout", stdout), ("stderr", stderr)):
            if want is None:
                fds.append(1 if name == "stdout" else 2)
            elif want == subprocess.DEVNULL:
                fds.append(null)
            elif want == subprocess.STDOUT and name == "stderr":
                fds.append(fds[1])
            elif want == subprocess.PIPE:
                r, w = os.pipe()
                opened.append(w)
                fds.append(w)
                readers[name] = open(r, encoding="utf-8", errors="replace")  # noqa: SIM115
            else:
                fds.append(want.fileno())
        request = {"argv": cmd[1:], "cwd": os.fspath(cwd or os.getcwd()),
                   "env": dict(os.environ if env is None else env),
                   "new_session": start_new_session}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self._address)
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
        finally:
            for fd in opened:
                os.close(fd)
        return WarmProcess(conn, readers.get("stdout"), readers.get("stderr"))

    def run(self, cmd: list[str], *, cwd: Any = None, env: dict[str, str] | None = None,
            timeout: float | None = None, check: bool = False) -> subprocess.CompletedProcess:
        """As ``subprocess.run(cmd, capture_output=True, text=True, ...)``."""
        proc = self.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done


# What each kind of command imports before it starts. The module a command runs with ``-m``
# is never preloaded (runpy would warn that it is already imported).
PRELOADS = {
    "objcrop": ["objcrop_plugin.train.runner", "objcrop_plugin.proposals.build", "cv2", "timm",
                "pytorch_lightning", "lightly.loss", "lightly.models"],
    "solo": ["objcrop_plugin.integrations.solo",
             "objcrop_plugin.integrations.solo.patch:import_solo", "objcrop_plugin.proposals.build",
             "cv2", "lightning.pytorch", "hydra", "omegaconf"],
}
_SHARED: dict[str, WarmPython] = {}


def shared(kind: str) -> WarmPython:
    """The process-wide server for ``kind`` (a key of :data:`PRELOADS`), closed at exit."""
    if kind not in _SHARED:
        import atexit
        import shutil
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="objcrop-warm-"))
        _SHARED[kind] = warm = WarmPython(folder, PRELOADS[kind])

        def close() -> None:
            warm.close()
            shutil.rmtree(folder, ignore_errors=True)

        atexit.register(close)
    return _SHARED[kind]


# ----------------------------------------------------------------------------- the server side


def _run_command(argv: list[str]) -> int:
    """Run ``python *argv`` in this (forked) process; the exit status as Python gives it
    (-1: an uncaught KeyboardInterrupt, which ends the process by SIGINT as Python does)."""
    import runpy
    import traceback

    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path.insert(0, "")
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -1
    except BaseException:  # noqa: BLE001 - as the interpreter, print it and exit 1
        traceback.print_exc()
        return 1


def _child(request: dict[str, Any], fds: list[int]) -> None:
    import atexit
    import io

    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
    code = _run_command(request["argv"])
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads, as exit does
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing left to say
                stream.flush()
        if code == -1:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


def _serve(address: str, preload: list[str]) -> None:
    import importlib

    if sys.path and Path(sys.path[0]).resolve() == _HERE.parent:
        del sys.path[0]  # the commands see the path a fresh interpreter would give them
    for item in preload:  # "module" or "module:function" (called with no arguments)
        name, _, function = item.partition(":")
        try:
            module = importlib.import_module(name)
            if function:
                getattr(module, function)()
        except Exception as exc:  # noqa: BLE001 - the command imports it again and says why
            print(f"warm python: {item} not preloaded ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(8)
    server.settimeout(1.0)
    parent = os.getppid()
    sys.stdout.buffer.write(_READY)
    sys.stdout.flush()
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test session ended without closing the server
                with contextlib.suppress(OSError):
                    os.unlink(address)
                    os.rmdir(os.path.dirname(address))
                os._exit(0)
            continue
        conn.settimeout(None)
        message, fds, _, _ = socket.recv_fds(conn, 1 << 24, 3)
        while not message.endswith(b"\n"):
            message += conn.recv(1 << 24)
        request = json.loads(message)
        if os.fork() == 0:  # the supervisor
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            pid = os.fork()
            if pid == 0:
                conn.close()
                _child(request, fds)
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            _, status = os.waitpid(pid, 0)
            try:
                conn.sendall(json.dumps({"status": status}).encode() + b"\n")
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)
        conn.close()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2:])
