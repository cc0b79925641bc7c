"""The suite's warm interpreter (``tests/warm_python.py``) runs commands as a fresh
``python`` would: argv, cwd, environment, pipes, exit status, signals, atexit, sessions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from warm_python import WarmPython


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
    for proc in (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                 warm.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)):
        assert proc.stdout.readline() == "up\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGINT and err.endswith("KeyboardInterrupt\n")
