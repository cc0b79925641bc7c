"""Fixtures shared by the whole suite.

- ``demo_data``: a session-scoped factory for the embedded synthetic dataset. Each distinct set
  of arguments is written once per session (the generator is deterministic), so test modules
  that want the same scenes share one folder instead of regenerating it.
- ``one_thread``: torch with one intra-op thread for the duration of a test: the tensors in
  these tests are tiny, and on a busy 2-core machine extra threads only add synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from objcrop_plugin.data.synthetic import SyntheticDataset, write_dataset


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SyntheticDataset]:
    """``demo_data(n_images=12, size=(96, 72), seed=0)`` -> a written
    :class:`~objcrop_plugin.data.synthetic.SyntheticDataset` (read-only: do not modify it;
    copy it to ``tmp_path`` first when a test writes into the folder)."""
    cache: dict[tuple[Any, ...], SyntheticDataset] = {}

    def make(n_images: int = 12, size: tuple[int, int] = (96, 72), seed: int = 0) -> SyntheticDataset:
        key = (int(n_images), tuple(size), int(seed))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"demo_{n_images}_{size[0]}x{size[1]}_s{seed}")
            cache[key] = write_dataset(root, n_images=n_images, size=tuple(size), seed=seed,
                                       workers=1)
        return cache[key]

    return make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with ``torch.set_num_threads(1)``, restoring the previous count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def kill_and_resume() -> Callable[..., Any]:
    """``kill_and_resume(cmd, out, ref_out)``: run ``cmd`` (an ``objcrop train`` command line)
    to the end into ``ref_out``; start it again into its own ``trainer.out_dir`` ``out``, SIGKILL
    it once ``out/checkpoints/last.ckpt`` exists, and rerun it. Returns the rerun's completed
    process (asserted to have resumed and succeeded) and its ``results.json``."""
    import json
    import os
    import signal
    import subprocess
    import time

    import warm_python

    def run(cmd: list[str], out: Any, ref_out: Any, kill_when: Any = None) -> tuple[Any, dict[str, Any]]:
        """``kill_when``: kill as soon as the run prints a line holding this text instead
        (it must come after the first checkpoint)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        warm = warm_python.shared("objcrop")  # the killed and resumed runs skip the imports
        # the reference runs in a fresh interpreter (its own hash seed and random state), with
        # the same torch thread count as the others (float sums in another order would differ
        # in the last bits)
        warm.run(cmd + [f"trainer.out_dir={ref_out}"], check=True, env=env, timeout=300,
                 cold=True)
        proc = warm.popen(cmd, stdout=subprocess.PIPE if kill_when else subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=env)
        last = out / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 120
        if kill_when:
            for line in proc.stdout:
                if kill_when in line or time.monotonic() > deadline:
                    break
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
        assert last.exists(), "the run ended before writing a checkpoint"
        assert not (out / "results.json").exists(), "the run finished before it was killed"
        done = warm.run(cmd, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "resuming from" in done.stdout
        return done, json.loads((out / "results.json").read_text())

    return run
