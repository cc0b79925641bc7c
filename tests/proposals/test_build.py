"""objcrop proposals build / merge: resumable after kill -9, sharded, bad images, EXIF."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from objcrop_plugin.cli import main as cli_main
from objcrop_plugin.proposals import ProposalStore
from objcrop_plugin.proposals.build import build_store, merge_stores, resolve_shard, shard_path

pytest.importorskip("cv2", reason="opencv-contrib-python-headless (the proposals extra) is not installed")

METHOD = "graph_segments"


def scene(i: int, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = np.full((size[1], size[0], 3), 90, np.uint8) + rng.integers(0, 20, (size[1], size[0], 1), dtype=np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, size[0] - 40), rng.integers(0, size[1] - 40)
        arr[y : y + rng.integers(15, 40), x : x + rng.integers(15, 40)] = rng.integers(0, 256, 3)
    return Image.fromarray(arr)


def make_folder(root: Path, n: int) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        folder = root / "sub" if i % 3 == 0 else root
        scene(i).save(folder / f"img{i:04d}.jpg", quality=90)
    return root


def test_build_then_rebuild_with_other_worker_count_is_identical(tmp_path):
    root = make_folder(tmp_path / "imgs", 12)
    a = build_store(root, tmp_path / "a.objcrop", METHOD, workers=1, chunk_size=5, progress=False)
    build_store(root, tmp_path / "b.objcrop", METHOD, workers=2, chunk_size=5, progress=False)
    assert a.images == 12 and not a.failures and a.boxes > 0
    assert (tmp_path / "a.objcrop").read_bytes() == (tmp_path / "b.objcrop").read_bytes()
    store = ProposalStore(tmp_path / "a.objcrop")
    assert len(store) == 12 and "sub/img0000.jpg" in store
    assert not (tmp_path / ".a.objcrop.parts").exists()
    p = store["img0001.jpg"]
    assert p.image_size == (160, 120) and 0 < len(p.boxes) <= 10


def test_kill_9_then_same_command_resumes_to_an_identical_store(tmp_path):
    root = make_folder(tmp_path / "imgs", 150)
    ref = tmp_path / "ref" / "p.objcrop"
    build_store(root, ref, METHOD, workers=1, chunk_size=4, progress=False)

    out = tmp_path / "run" / "p.objcrop"
    cmd = [sys.executable, "-m", "objcrop_plugin.cli", "proposals", "build", str(root),
           "--out", str(out), "--method", METHOD, "--workers", "1", "--chunk-size", "4",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = out.parent / ".p.objcrop.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("chunk-*.jsonl"))) < 2:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("chunk-*.jsonl")))
    assert 2 <= done < 38, "the kill must land mid-build for this test to mean anything"
    assert not out.exists()

    summary = build_store(root, out, METHOD, workers=1, chunk_size=4, progress=False)
    assert summary.resumed_images >= 8
    assert out.read_bytes() == ref.read_bytes()


def test_resume_with_other_settings_is_refused(tmp_path):
    root = make_folder(tmp_path / "imgs", 3)
    out = tmp_path / "p.objcrop"
    parts = tmp_path / ".p.objcrop.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text('{"method": "bing", "images": 99}')
    with pytest.raises(ValueError, match="same command"):
        build_store(root, out, METHOD, progress=False)


def test_bad_images_are_listed_and_the_run_goes_on(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        scene(i).save(root / f"ok{i}.jpg")
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    good = (root / "ok0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (400, 300), (200, 10, 10)).save(root / "huge.png")
    Image.fromarray(np.asarray(scene(7).convert("L")).astype(np.uint16) * 257).save(root / "deep16.png")
    scene(8).convert("CMYK").save(root / "cmyk.jpg")
    out = tmp_path / "p.objcrop"
    rc = cli_main(["proposals", "build", str(root), "--out", str(out), "--method", METHOD,
                   "--workers", "1", "--max-pixels", "100000", "--no-progress"])
    assert rc == 3  # 4 failures of 12 images is over the default 1% threshold
    store = ProposalStore(out)
    assert {"deep16.png", "cmyk.jpg", "ok0.jpg"} <= set(store)
    failures = dict(line.split("\t") for line in (tmp_path / "p.objcrop.failures.tsv").read_text().splitlines()[1:])
    assert set(failures) == {"zero.jpg", "text.png", "truncated.jpg", "huge.png"}
    assert "over the limit" in failures["huge.png"]
    assert "truncated" in failures["truncated.jpg"].lower()
    rc = cli_main(["proposals", "build", str(root), "--out", str(out), "--method", METHOD,
                   "--workers", "1", "--max-pixels", "100000", "--no-progress",
                   "--max-failure-rate", "0.5"])
    assert rc == 0


def test_exif_orientation_is_applied_like_the_view_engine(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    scene(1, size=(160, 120)).save(root / "rot.jpg", exif=exif.tobytes())
    build_store(root, tmp_path / "p.objcrop", METHOD, progress=False)
    p = ProposalStore(tmp_path / "p.objcrop")["rot.jpg"]
    assert p.image_size == (120, 160)
    assert (p.boxes[:, 2] <= 120).all() and (p.boxes[:, 3] <= 160).all()


def test_shards_merge_into_the_unsharded_store(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", 9)
    full = tmp_path / "full.objcrop"
    build_store(root, full, METHOD, progress=False)
    out = tmp_path / "s.objcrop"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert resolve_shard() == (1, 2)
    build_store(root, out, METHOD, shard=resolve_shard(), progress=False)
    build_store(root, out, METHOD, shard=resolve_shard("0/2"), progress=False)
    shards = [shard_path(out, i, 2) for i in range(2)]
    assert all(s.exists() for s in shards) and not out.exists()
    assert len(ProposalStore(shards[0])) == 5 and len(ProposalStore(shards[1])) == 4
    merged = tmp_path / "merged.objcrop"
    assert cli_main(["proposals", "merge", *map(str, shards), "--out", str(merged)]) == 0
    assert merged.read_bytes() == full.read_bytes()
    with pytest.raises(ValueError, match="in both"):
        merge_stores(tmp_path / "dup.objcrop", [shards[0], shards[0]])


def test_shard_spec_errors_and_slurm():
    assert resolve_shard(None, {}) == (0, 1)
    assert resolve_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    with pytest.raises(ValueError, match="i/N"):
        resolve_shard("2-4")
    with pytest.raises(ValueError, match="0 <= i < N"):
        resolve_shard("4/4")


def test_unknown_method_and_importer_as_method_are_clear_errors(tmp_path):
    root = make_folder(tmp_path / "imgs", 1)
    with pytest.raises(LookupError, match="unknown proposal source"):
        build_store(root, tmp_path / "p.objcrop", "nope", progress=False)
    with pytest.raises(ValueError, match="importer"):
        build_store(root, tmp_path / "p.objcrop", "jsonl", progress=False)
