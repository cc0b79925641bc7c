"""Run ``python ...`` command lines in processes forked from an interpreter that has already
imported the heavy modules (torch, torchvision, Lightning, lightly, solo-learn).

A fresh interpreter spends about 10 s of this suite's 2-core machine importing them before
``objcrop train`` or ``objcrop-solo`` does anything, and the kill/resume, DDP and solo-learn
tests start dozens of such processes. Here a server process (``python warm_python.py SOCKET
MODULE...``) imports the modules once; for each command it forks a supervisor, which forks the
command's process and reports its exit status. The command's process is a real process of
its own: it gets the caller's pipes as its stdin, stdout and stderr, its own working
directory, environment and ``sys.argv``, can be sent any signal (SIGKILL included; its pid
stays its own until the caller has read its exit status), runs the command as ``python -m``,
``python -c`` or ``python script`` would (``__main__``, ``__spec__``, ``sys.path[0]``), and
ends with the command's exit status (atexit handlers and non-daemon threads included; an
uncaught KeyboardInterrupt ends it by SIGINT, as Python does).

What it shares with the server is what fork shares, and tests must not depend on it:
- the string hash seed (``PYTHONHASHSEED``) of the server; numpy's global random state is
  reseeded from the OS in each command, as a fresh import would seed it;
- the modules as import left them: a logger configured at import (Lightning adds its own
  handler when the root logger has none) keeps that configuration, where a fresh command
  that configures logging first and imports Lightning later would see it otherwise.
So an identity test compares a warm run with a reference run in a fresh interpreter
(:meth:`WarmPython.run` with ``cold=True``), which has its own hash seed and random state.

Commands run by :mod:`subprocess` instead: any whose interpreter is not ``sys.executable``,
any with interpreter options (``python -W error ...``), and any whose environment changes a
variable read at interpreter start (``PYTHON*`` but ``PYTHONUNBUFFERED``, ``OMP_*``,
``MKL_*``). Use it where the process's own start is not what a test is about: tests of the
console scripts, of imports and of start-up behaviour run a real ``subprocess``. Where
Lightning's DDP launcher relaunches ``sys.argv``, rank 0 runs here and the other ranks in
fresh interpreters. ``OBJCROP_TEST_COLD=1`` runs every command in a fresh interpreter.
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
_START_TIMEOUT = 300.0  # the server's imports; a reply to a request comes in milliseconds
_STARTUP_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "OPENBLAS_")


def sigint_as_in_a_terminal() -> None:
    """A ``preexec_fn`` for processes that a test interrupts: SIGINT at its default, which
    Python turns into KeyboardInterrupt, even where this test session was started with it
    ignored (a background job of a non-interactive shell; that disposition survives exec, and
    Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _reads_at_start(key: str) -> bool:
    return key.startswith(_STARTUP_ENV) and key != "PYTHONUNBUFFERED"


class WarmProcess:
    """The handle of a command run by :class:`WarmPython`: the part of
    :class:`subprocess.Popen` the tests use (``pid``, ``stdout``, ``stderr``, ``poll``,
    ``wait``, ``send_signal``, ``kill``, ``communicate``, ``returncode``)."""

    def __init__(self, conn: socket.socket, stdout: TextIO | None,
                 stderr: TextIO | None) -> None:
        self._conn = conn
        # unbuffered: the exit status is never read ahead of ``select`` seeing it
        self._reply = conn.makefile("rb", buffering=0)
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        line = self._line(_START_TIMEOUT)
        if not line:
            raise RuntimeError("the warm python server did not start the command")
        self.pid: int = json.loads(line)["pid"]

    def _line(self, timeout: float | None) -> bytes | None:
        """The server's next line; ``None`` if none came within ``timeout``."""
        if not select.select([self._conn], [], [], timeout)[0]:
            return None
        return self._reply.readline()

    def poll(self) -> int | None:
        if self.returncode is None:
            line = self._line(0)
            if line is not None:
                self._finish(line)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired("warm python", timeout)
            self._finish(line)
        assert self.returncode is not None
        return self.returncode

    def _finish(self, line: bytes) -> None:
        if not line:
            raise RuntimeError("the warm python server ended before the command did")
        self.returncode = int(json.loads(line)["returncode"])
        self._reply.close()
        self._conn.close()  # the supervisor reaps the command only now: its pid stays its own

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
    ``[sys.executable, "-m" | "-c" | script, ...]`` command lines (see the module's
    docstring for those run by :mod:`subprocess`). The server starts at the first command."""

    def __init__(self, folder: Path, preload: list[str]) -> None:
        self.cold = os.environ.get("OBJCROP_TEST_COLD") == "1"
        self._server: subprocess.Popen | None = None
        self._address = str(folder / "warm.sock")
        self._preload = list(preload)
        self._env: dict[str, str] = {}

    def _start(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._address)  # a dead server's
        self._env = dict(os.environ)
        self._server = subprocess.Popen(
            [sys.executable, str(_HERE), self._address, *self._preload],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None, cwd=_HERE.parent,
            preexec_fn=sigint_as_in_a_terminal)  # its commands: as started from a terminal
        assert self._server.stdout is not None
        ready = b""
        if select.select([self._server.stdout], [], [], _START_TIMEOUT)[0]:
            ready = self._server.stdout.readline()
        if ready != _READY:
            self.close()
            raise RuntimeError(f"the warm python server did not start: {ready!r}")

    def close(self) -> None:
        if self._server is not None:
            self._server.kill()
            self._server.wait()
            if self._server.stdout is not None:
                self._server.stdout.close()
            self._server = None

    def _is_warm(self, cmd: list[str], env: dict[str, str]) -> bool:
        if self.cold or len(cmd) < 2 or cmd[0] != sys.executable:
            return False
        if cmd[1].startswith("-") and cmd[1] not in ("-m", "-c"):
            return False  # interpreter options
        server_env = self._env if self._server is not None else os.environ
        keys = {k for k in (*env, *server_env) if _reads_at_start(k)}
        return all(env.get(k) == server_env.get(k) for k in keys)

    def popen(self, cmd: list[Any], *, stdout: Any = None, stderr: Any = None,
              cwd: Any = None, env: dict[str, str] | None = None, text: bool = True,
              start_new_session: bool = False,
              cold: bool = False) -> WarmProcess | subprocess.Popen:
        """As ``subprocess.Popen(cmd, stdin=DEVNULL, stdout=..., stderr=..., text=True,
        start_new_session=...)``; ``stdout``/``stderr``: ``None`` (inherit), ``PIPE``,
        ``DEVNULL`` or ``STDOUT``. ``cold``: in a fresh interpreter."""
        if not text:
            raise ValueError("warm python commands take text=True only")
        cmd = [os.fspath(c) for c in cmd]
        env = dict(os.environ if env is None else env)
        if cold or not self._is_warm(cmd, env):
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                    cwd=cwd, env=env, text=True,
                                    start_new_session=start_new_session)
        cwd = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
        if not os.path.isdir(cwd):
            raise FileNotFoundError(f"no such directory: {cwd!r}")
        request = json.dumps({"argv": cmd[1:], "cwd": cwd, "env": env,
                              "new_session": start_new_session}).encode() + b"\n"
        if self._server is None or self._server.poll() is not None:
            self._start()
        if not self._is_warm(cmd, env):  # the server started with another environment
            return self.popen(cmd, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
                              start_new_session=start_new_session, cold=True)
        opened: list[int] = []
        readers: dict[str, TextIO] = {}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            null = os.open(os.devnull, os.O_RDWR)
            opened.append(null)
            fds = [null]  # stdin
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
            conn.connect(self._address)
            socket.send_fds(conn, [request], fds)
            return WarmProcess(conn, readers.get("stdout"), readers.get("stderr"))
        except BaseException:
            conn.close()
            for reader in readers.values():
                reader.close()
            raise
        finally:
            for fd in opened:
                os.close(fd)

    def run(self, cmd: list[Any], *, cwd: Any = None, env: dict[str, str] | None = None,
            timeout: float | None = None, check: bool = False,
            cold: bool = False) -> subprocess.CompletedProcess:
        """As ``subprocess.run(cmd, capture_output=True, text=True, ...)``; ``cold``: in a
        fresh interpreter."""
        proc = self.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                          cold=cold)
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

_INTERRUPTED = object()  # an uncaught KeyboardInterrupt: the process ends by SIGINT


def _run_command(argv: list[str]) -> Any:
    """Run ``python *argv`` in this (forked) process: its exit status, as Python gives it,
    or :data:`_INTERRUPTED`."""
    import runpy
    import types

    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path.insert(0, "")
            main = types.ModuleType("__main__")  # __spec__ None, as for python -c
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)  # noqa: S102
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
        sys.excepthook(*sys.exc_info())
        return _INTERRUPTED
    except BaseException:  # noqa: BLE001 - as the interpreter: the hook prints it, exit 1
        sys.excepthook(*sys.exc_info())
        return 1


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """The command's process: never returns."""
    code: Any = 1
    try:
        import atexit

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
        if "numpy.random" in sys.modules:  # seeded from the OS, as a fresh import seeds it
            sys.modules["numpy.random"].seed()
        # the standard streams as the interpreter makes them (buffered; stderr line-buffered;
        # PYTHONUNBUFFERED: written through)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                          errors="backslashreplace", closefd=False)
        if os.environ.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)
            sys.stderr.reconfigure(write_through=True)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        code = _run_command(request["argv"])
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads, as exit does
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing left to say
                stream.flush()
        with contextlib.suppress(Exception):  # C stdio (printf), which os._exit skips
            import ctypes

            ctypes.CDLL(None).fflush(None)
        if code is _INTERRUPTED:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            code = 130
        os._exit(code & 0xFF)


def _supervise(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """Fork the command, send its pid, then its return code; reap it only when the caller
    closes the connection (until then its pid cannot be reused). Never returns."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _child(request, fds)
        for fd in fds:
            os.close(fd)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        done = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        code = done.si_status if done.si_code == os.CLD_EXITED else -done.si_status
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
            conn.recv(1)  # the caller closes the connection once it has the code
        os.waitpid(pid, 0)
    finally:
        os._exit(0)


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
        fds: list[int] = []
        try:
            conn.settimeout(10.0)  # a request is sent at once, or never
            message, fds, _, _ = socket.recv_fds(conn, 1 << 24, 3)
            while message and not message.endswith(b"\n"):
                more = conn.recv(1 << 24)
                if not more:
                    break
                message += more
            if len(fds) != 3 or not message.endswith(b"\n"):
                continue  # an aborted request
            request = json.loads(message)
            conn.settimeout(None)
            if os.fork() == 0:
                server.close()
                _supervise(conn, request, fds)
        except (OSError, ValueError) as exc:
            print(f"warm python: a request failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2:])
