"""The suite's warm interpreter (``tests/warm_python.py``) runs commands as a fresh
``python`` would: argv, cwd, environment, pipes, exit status, signals, atexit, sessions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from warm_python import WarmPython, sigint_as_in_a_terminal


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    server = WarmPython(tmp_path_factory.mktemp("warm"), ["json"])
    yield server
    server.close()


def both(warm, cmd, **kw):
    cold = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    hot = warm.run(cmd, timeout=60, **kw)
    return cold, hot


def test_code_script_and_module_see_what_a_fresh_python_gives_them(warm, tmp_path):
    code = ("import os, sys; print(sys.argv, os.getcwd(), os.environ.get('WARM_TEST'), "
            "sys.stdin.read() == '', __name__); print('err', file=sys.stderr)")
    env = {**os.environ, "WARM_TEST": "x"}
    cold, hot = both(warm, [sys.executable, "-c", code, "a", "b"], cwd=tmp_path, env=env)
    assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert hot.stdout == f"['-c', 'a', 'b'] {tmp_path} x True __main__\n"
    script = tmp_path / "s.py"
    script.write_text("import sys, atexit\natexit.register(print, 'bye')\n"
                      "print(sys.argv[1:], sys.path[0])\nsys.exit(3)\n")
    cold, hot = both(warm, [sys.executable, str(script), "z"], cwd=tmp_path)
    assert (hot.returncode, hot.stdout) == (cold.returncode, cold.stdout)
    assert hot.returncode == 3 and hot.stdout == f"['z'] {tmp_path}\nbye\n"
    (tmp_path / "mod_w.py").write_text(
        "import sys\nprint(__name__, sys.argv[1:])\nraise SystemExit('no')\n")
    cold, hot = both(warm, [sys.executable, "-m", "mod_w", "q"], cwd=tmp_path)
    assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr)
    assert (hot.returncode, hot.stdout, hot.stderr) == (1, "__main__ ['q']\n", "no\n")
    cold, hot = both(warm, [sys.executable, "-c", "raise ValueError('bad')"])
    assert hot.returncode == cold.returncode == 1
    assert hot.stderr.splitlines()[-1] == cold.stderr.splitlines()[-1] == "ValueError: bad"


def test_signals_reach_the_command_and_new_sessions_are_their_own_group(warm):
    proc = warm.popen([sys.executable, "-c", "import os, time; print(os.getpid(), os.getpgid(0), "
                       "flush=True); time.sleep(60)"], stdout=subprocess.PIPE,
                      start_new_session=True)
    pid, group = map(int, proc.stdout.readline().split())
    assert pid == group == proc.pid and proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()
    # SIGINT: Python's handler raises KeyboardInterrupt, which ends the process by SIGINT
    cmd = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    for proc in (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=sigint_as_in_a_terminal),
                 warm.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)):
        assert proc.stdout.readline() == "up\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGINT and err.endswith("KeyboardInterrupt\n")


def test_semantics_a_fresh_python_has(warm, tmp_path):
    cases = [
        # sys.exit(-1) is 255, not an interrupt
        [sys.executable, "-c", "import sys; sys.exit(-1)"],
        # -c code runs in a real __main__ module: its functions pickle, __spec__ is None
        [sys.executable, "-c", "import pickle, __main__\ndef f(): pass\n"
         "print(len(pickle.dumps(f)) > 0, __main__.f is f, __spec__)"],
        # a hook the command sets prints its uncaught exception
        [sys.executable, "-c", "import sys\nsys.excepthook = lambda *a: print('hooked')\n"
         "raise RuntimeError('x')"],
        # interpreter options are the interpreter's (these run in a fresh one)
        [sys.executable, "-W", "error", "-c", "import warnings; warnings.warn('w')"],
    ]
    for cmd in cases:
        cold, hot = both(warm, cmd, cwd=tmp_path)
        assert (hot.returncode, hot.stdout) == (cold.returncode, cold.stdout), cmd
    # numpy's global random state is seeded anew in each command, as in fresh interpreters
    code = "import numpy as np; print(np.random.randint(1 << 30))"
    draws = {warm.run([sys.executable, "-c", code]).stdout for _ in range(3)}
    assert len(draws) == 3
    with pytest.raises(FileNotFoundError, match="no such directory"):
        warm.popen([sys.executable, "-c", "pass"], cwd=tmp_path / "missing")


def test_waits_time_out_and_the_server_survives_aborted_requests_and_restarts(tmp_path):
    import socket

    server = WarmPython(tmp_path, [])
    try:
        proc = server.popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
        assert proc.poll() is None
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
        # a client that connects and goes away without a request
        with socket.socket(socket.AF_UNIX) as bare:
            bare.connect(server._address)
        assert server.run([sys.executable, "-c", "print(2)"], timeout=30).stdout == "2\n"
        server._server.kill()  # the server dies: the next command starts another
        server._server.wait()
        assert server.run([sys.executable, "-c", "print(3)"], timeout=60).stdout == "3\n"
    finally:
        server.close()
