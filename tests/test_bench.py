"""The prepared device check (bench/device_check.sh) fails fast, before any part runs, when a
module it needs cannot be imported, and it runs this checkout's package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_names_a_missing_module_before_any_part(tmp_path):
    broken = tmp_path / "site" / "kornia"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('kornia is broken here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "kornia (ImportError: kornia is broken here)" in done.stderr
    assert "Fix: pip install" in done.stderr
    assert "== 1." not in done.stdout  # no part started


def test_device_check_imports_this_checkout(tmp_path):
    """An installed copy elsewhere (here: a decoy earlier on the path) is not what runs."""
    decoy = tmp_path / "site" / "objcrop_plugin"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy ran')\n")
    (decoy / "cli.py").write_text("")
    script = ROOT / "bench" / "device_check.sh"
    head = script.read_text().split('CUDA=$(python3', 1)[0]  # up to the first part's set-up
    probe = tmp_path / "bench" / "probe.sh"
    probe.parent.mkdir()
    # run as the parts run their benchmarks: a script in bench/, which puts bench/ (not the
    # root) first on its path
    probe.write_text(head + "python3 bench/probe.py\n")
    (probe.parent / "probe.py").write_text("import objcrop_plugin\nprint(objcrop_plugin.__file__)\n")
    # the probe sits in a copy of the layout: bench/ under the checkout's root
    link = tmp_path / "root"
    link.mkdir()
    (link / "objcrop_plugin").symlink_to(ROOT / "objcrop_plugin")
    (link / "bench").symlink_to(probe.parent)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(link / "bench" / "probe.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(link / "objcrop_plugin" / "__init__.py")
