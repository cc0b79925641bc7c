"""objcrop proposals build / merge: resumable after kill -9, sharded, bad images, EXIF."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import warm_python
from PIL import Image, ImageOps

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


def _build_under_way(root: Path, out: Path, workers: int, chunk_size: int):
    """``objcrop proposals build`` started in a session of its own, once two of its chunks
    are written: ``(process, parts folder)``."""
    cmd = [sys.executable, "-m", "objcrop_plugin.cli", "proposals", "build", str(root),
           "--out", str(out), "--method", METHOD, "--workers", str(workers), "--chunk-size",
           str(chunk_size), "--no-progress"]
    proc = warm_python.shared("objcrop").popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out.parent / f".{out.name}.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("chunk-*.jsonl"))) < 2:
        time.sleep(0.005)
    return proc, parts


def test_kill_9_then_same_command_resumes_to_an_identical_store(tmp_path):
    root = make_folder(tmp_path / "imgs", 150)
    ref = tmp_path / "ref" / "p.objcrop"
    build_store(root, ref, METHOD, workers=1, chunk_size=4, progress=False)

    out = tmp_path / "run" / "p.objcrop"
    proc, parts = _build_under_way(root, out, workers=1, chunk_size=4)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("chunk-*.jsonl")))
    assert 2 <= done < 38, "the kill must land mid-build for this test to mean anything"
    assert not out.exists()

    summary = build_store(root, out, METHOD, workers=1, chunk_size=4, progress=False)
    assert summary.resumed_images >= 8
    assert out.read_bytes() == ref.read_bytes()


def test_a_build_killed_by_sigkill_leaves_no_worker_behind(tmp_path):
    """Only the main process gets the SIGKILL (the out-of-memory killer's choice): its pool
    workers end with it instead of holding their memory and its output pipe."""
    root = make_folder(tmp_path / "imgs", 150)
    proc, _ = _build_under_way(root, tmp_path / "p.objcrop", workers=2, chunk_size=2)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)  # is any process of the build's group left?
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            left = subprocess.run(["ps", "-o", "pid,ppid,stat,cmd", "-g", str(proc.pid)],
                                  capture_output=True, text=True).stdout
            pytest.fail(f"the build's workers outlived it:\n{left}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


_KILL_ONE_WORKER = """
import os, sys
import objcrop_plugin.proposals.build as B
root, out, marker = sys.argv[1:4]
real = B.propose_file
def propose_file(gen, path, key, *args, **kwargs):
    if key == "img0004.jpg" and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), 9)  # as the out-of-memory killer would
    return real(gen, path, key, *args, **kwargs)
B.propose_file = propose_file  # forked workers see it
try:
    B.build_store(root, out, "graph_segments", workers=2, chunk_size=2, progress=False,
                  mp_context="fork")
except B.BuildWorkerDied as exc:
    print("DIED", exc)
"""


def test_a_killed_worker_ends_the_build_with_a_resumable_error(tmp_path):
    # multiprocessing.Pool replaced a killed worker and waited forever for its chunk
    root = make_folder(tmp_path / "imgs", 12)
    ref = tmp_path / "ref.objcrop"
    build_store(root, ref, METHOD, workers=1, chunk_size=2, progress=False)
    out = tmp_path / "p.objcrop"
    proc = warm_python.shared("objcrop").run(
        [sys.executable, "-c", _KILL_ONE_WORKER, str(root), str(out), str(tmp_path / "killed")],
        timeout=300)
    assert (tmp_path / "killed").exists(), proc.stderr
    assert proc.stdout.startswith("DIED a worker process died"), proc.stdout + proc.stderr
    assert "Run the same command again to resume" in proc.stdout
    assert not out.exists()
    build_store(root, out, METHOD, workers=2, chunk_size=2, progress=False)
    assert out.read_bytes() == ref.read_bytes()


def test_resume_with_other_settings_is_refused(tmp_path):
    root = make_folder(tmp_path / "imgs", 3)
    out = tmp_path / "p.objcrop"
    parts = tmp_path / ".p.objcrop.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text('{"method": "bing", "images": 99}')
    with pytest.raises(ValueError, match="same command"):
        build_store(root, out, METHOD, progress=False)


def test_a_build_with_tuple_or_nan_parameters_resumes(tmp_path):
    """The manifest is stored as JSON: a tuple reads back as a list and NaN != NaN, which
    refused every resume of such a build (Python API parameters)."""
    from objcrop_plugin.proposals.build import _resumable_chunks

    manifest = {"method": "heatmap", "params": {"thresholds": (0.25, 0.5), "eps": float("nan")}}
    parts = tmp_path / ".p.objcrop.parts"
    _resumable_chunks(parts, manifest, restart=False)
    _resumable_chunks(parts, manifest, restart=False)  # the same command again: resumes
    with pytest.raises(ValueError, match="other settings"):
        _resumable_chunks(parts, {**manifest, "params": {"thresholds": (0.25,)}}, restart=False)


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



def test_max_pixels_above_pils_own_limit_takes_effect(tmp_path, monkeypatch):
    """--max-pixels replaces PIL's decompression-bomb limit; past PIL's limit elsewhere the
    failure says how to raise it."""
    from objcrop_plugin.images import ImageDecodeError, open_image

    root = tmp_path / "imgs"
    root.mkdir()
    scene(0).save(root / "a.png")
    w, h = scene(0).size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses over 2000 pixels
    with pytest.raises(ImageDecodeError, match=r"a\.png: too large to decode.*--max-pixels"):
        open_image(root / "a.png")
    out = tmp_path / "p.objcrop"
    rc = cli_main(["proposals", "build", str(root), "--out", str(out), "--method", METHOD,
                   "--workers", "1", "--max-pixels", str(w * h), "--no-progress"])
    assert rc == 0 and set(ProposalStore(out)) == {"a.png"}
    assert Image.MAX_IMAGE_PIXELS == 1000  # the process-wide setting is left as it was
    rc = cli_main(["proposals", "build", str(root), "--out", str(tmp_path / "q.objcrop"),
                   "--method", METHOD, "--workers", "1", "--max-pixels", str(w * h - 1),
                   "--no-progress", "--max-failure-rate", "1"])
    failures = (tmp_path / "q.objcrop.failures.tsv").read_text()
    assert rc == 0 and f"over the limit of {w * h - 1} (raise it with --max-pixels)" in failures

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
    # the same pixels, stored upright (lossless), give the same boxes
    upright = tmp_path / "upright"
    upright.mkdir()
    with Image.open(root / "rot.jpg") as im:
        ImageOps.exif_transpose(im).save(upright / "rot.png")
    build_store(upright, tmp_path / "u.objcrop", METHOD, progress=False)
    u = ProposalStore(tmp_path / "u.objcrop")["rot.png"]
    assert len(p.boxes) > 0 and u.image_size == p.image_size
    np.testing.assert_array_equal(p.boxes, u.boxes)


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
    with pytest.raises(ValueError, match="shard 0 of 2 is given twice"):
        merge_stores(tmp_path / "dup.objcrop", [shards[0], shards[0]])


def test_merged_failures_are_listed_in_key_order_as_by_one_build(tmp_path):
    root = make_folder(tmp_path / "imgs", 4)
    for name in ("a\tb.jpg", "a b.jpg", "a\\c.jpg" if os.sep == "/" else "a_c.jpg", "z.jpg"):
        (root / name).write_bytes(b"not an image")
    full = tmp_path / "full.objcrop"
    build_store(root, full, METHOD, progress=False)
    out = tmp_path / "s.objcrop"
    for i in range(2):
        build_store(root, out, METHOD, shard=(i, 2), progress=False)
    merged = tmp_path / "merged.objcrop"
    merge_stores(merged, [shard_path(out, i, 2) for i in range(2)])
    assert merged.read_bytes() == full.read_bytes()
    listed = (tmp_path / "merged.objcrop.failures.tsv").read_bytes()
    assert listed == (tmp_path / "full.objcrop.failures.tsv").read_bytes()
    assert listed.count(b"\n") == 4  # the header and the tab's and the space's rows, z.jpg


def test_a_build_killed_while_writing_leaves_no_temporary_and_no_stale_failures(
        tmp_path, monkeypatch):
    """SIGKILL during the store's write leaves ``.NAME.<random>.tmp`` (the atomic write's
    temporary); after the store's rename, the previous build's failures list. The rerun
    removes the first; the second is removed before the store is written."""
    import objcrop_plugin.proposals.build as build

    root = make_folder(tmp_path / "imgs", 3)
    (root / "bad.jpg").write_bytes(b"not an image")
    out = tmp_path / "p.objcrop"
    cli_main(["proposals", "build", str(root), "--out", str(out), "--method", METHOD,
              "--workers", "1", "--no-progress"])
    failures = tmp_path / "p.objcrop.failures.tsv"
    assert "bad.jpg" in failures.read_text()
    scene(9).save(root / "bad.jpg")  # repaired
    left = [tmp_path / ".p.objcrop.k3x_9a0q.tmp", tmp_path / ".p.objcrop.failures.tsv.0abc_xyz.tmp"]
    for f in left:
        f.write_bytes(b"half a store")
    mine = tmp_path / ".p.objcrop.notes.tmp"  # not a name atomic_write makes: the user's
    mine.write_text("keep")

    class Killed(BaseException):
        pass

    writer = build.ProposalStoreWriter

    class DiesAfterTheStore(writer):
        def close(self):
            super().close()
            raise Killed  # as a SIGKILL right after the store's rename

    monkeypatch.setattr(build, "ProposalStoreWriter", DiesAfterTheStore)
    with pytest.raises(Killed):
        build_store(root, out, METHOD, progress=False)
    assert not any(f.exists() for f in left) and mine.read_text() == "keep"
    assert "bad.jpg" in ProposalStore(out)
    assert not failures.exists()  # never the earlier build's list beside the new store


def test_merge_refuses_an_incomplete_set_or_shards_of_other_builds(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", 6)
    out = tmp_path / "sh.objcrop"
    for i in range(3):
        build_store(root, out, METHOD, shard=(i, 3), progress=False)
    sh = [shard_path(out, i, 3) for i in range(3)]
    assert ProposalStore(sh[1]).meta["shard"] == [1, 3]
    merged = tmp_path / "m.objcrop"
    # two of three shards: refused, naming the missing one
    assert cli_main(["proposals", "merge", str(sh[0]), str(sh[1]), "--out", str(merged)]) == 2
    err = capsys.readouterr().err
    assert "1 of 3 missing (shard 2)" in err and "--allow-partial" in err
    assert not merged.exists()
    # ... unless asked for, and then the store says it is partial
    assert cli_main(["proposals", "merge", str(sh[0]), str(sh[1]), "--out", str(merged),
                     "--allow-partial"]) == 0
    meta = ProposalStore(merged).meta
    assert meta["partial_shards"] == {"merged": [0, 1], "of": 3} and "shard" not in meta
    # a shard of a build with other parameters, or split in another number of parts
    other = tmp_path / "other.objcrop"
    build_store(root, other, METHOD, params={"top_k": 3}, shard=(2, 3), progress=False)
    with pytest.raises(ValueError, match=r"different builds \(method 'graph_segments' with "
                       r'params \{\} vs method .graph_segments. with params \{"top_k": 3\}'):
        merge_stores(merged, [sh[0], sh[1], shard_path(other, 2, 3)])
    build_store(root, other, METHOD, shard=(1, 2), progress=False)
    with pytest.raises(ValueError, match=r"holds shard 1 of 2, but .* holds shard 0 of 3"):
        merge_stores(merged, [sh[0], shard_path(other, 1, 2), sh[2]])
    # the same shard twice (an empty shard would slip past the duplicate-key check)
    with pytest.raises(ValueError, match="shard 2 of 3 is given twice"):
        merge_stores(merged, [sh[0], sh[1], sh[2], sh[2]])
    # the same method and parameters over another image list is another build too
    scene(99).save(root / "new.jpg")
    late = tmp_path / "late.objcrop"
    build_store(root, late, METHOD, shard=(2, 3), progress=False)
    with pytest.raises(ValueError, match="same method and params, but another image list"):
        merge_stores(merged, [sh[0], sh[1], shard_path(late, 2, 3)])
    # --allow-mixed joins stores of other builds (the metadata says so)
    assert cli_main(["proposals", "merge", str(sh[0]), str(sh[1]),
                     str(shard_path(other, 2, 3)), "--out", str(merged), "--allow-mixed"]) == 0
    assert "merged_from" in ProposalStore(merged).meta and len(ProposalStore(merged)) == 6
    # the complete set of one build still merges into what a single build writes
    assert merge_stores(merged, sh) == 6
    full = tmp_path / "full.objcrop"
    (root / "new.jpg").unlink()
    build_store(root, full, METHOD, progress=False)
    assert merged.read_bytes() == full.read_bytes()
    # a partial merge counts as the shards it holds: the missing shard completes it later
    part = tmp_path / "part.objcrop"
    merge_stores(part, [sh[0], sh[2]], allow_partial=True)
    assert ProposalStore(part).meta["partial_shards"] == {"merged": [0, 2], "of": 3}
    assert merge_stores(merged, [part, sh[1]]) == 6
    assert merged.read_bytes() == full.read_bytes()
    with pytest.raises(ValueError, match="shard 2 of 3 is given twice"):
        merge_stores(merged, [part, sh[1], sh[2]])
    # a built store with an imported one: two kinds of proposals
    imported = tmp_path / "gt.objcrop"
    ProposalStore.write(imported, [("zz.jpg", [[1, 1, 5, 5]], [1.0], (10, 8))], {"source": "coco"})
    with pytest.raises(ValueError, match=r"full.objcrop was built .*/gt.objcrop was imported "
                                         r".*--allow-mixed"):
        merge_stores(merged, [full, imported])
    assert merge_stores(merged, [full, imported], allow_mixed=True) == 7


def test_stores_without_shard_metadata_still_merge(tmp_path):
    # imports, and stores of earlier versions, carry no shard index: joined as before
    a, b, out = tmp_path / "a.objcrop", tmp_path / "b.objcrop", tmp_path / "m.objcrop"
    ProposalStore.write(a, [("a.jpg", [[1, 1, 5, 5]], [0.5], (10, 8))], {"source": "coco"})
    ProposalStore.write(b, [("b.jpg", [[1, 1, 5, 5]], [0.5], (10, 8))], {"source": "jsonl"})
    assert merge_stores(out, [a, b]) == 2
    assert ProposalStore(out).meta == {"merged_from": [str(a), str(b)]}
    meta = {"method": "heatmap", "online": True, "params": {}}  # an online refresh's ranks
    ProposalStore.write(a, [("a.jpg", [[1, 1, 5, 5]], [0.5], (10, 8))], meta)
    ProposalStore.write(b, [("b.jpg", [[1, 1, 5, 5]], [0.5], (10, 8))], meta)
    assert merge_stores(out, [a, b]) == 2 and ProposalStore(out).meta == meta


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie is gone
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_decode_workers_end_with_a_killed_build(tmp_path):
    """kill -9 of a batched build must not leave its DataLoader workers blocked forever."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(24):
        scene(i, size=(256, 256)).save(root / f"{i:03d}.png")  # big items fill the pipe
    script = (
        "import os, sys, numpy as np\n"
        "from objcrop_plugin.proposals.build import propose_keys\n"
        "class G:\n"
        "    max_side = 256\n"
        "    def propose_working(self, images, sizes):\n"
        "        return [(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))] * len(images)\n"
        "keys = sorted(os.listdir(sys.argv[1]))\n"
        "for chunk in propose_keys(G(), sys.argv[1], keys, workers=2, chunk_size=2):\n"
        "    me = os.getpid()\n"
        "    print(open(f'/proc/{me}/task/{me}/children').read(), flush=True)\n"
        "    os.kill(me, 9)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert proc.wait(timeout=120) == -signal.SIGKILL and len(workers) == 2
    try:
        deadline = time.monotonic() + 15
        while not all(_gone(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in workers), "orphaned decode workers still alive"
    finally:
        for p in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def test_shard_spec_errors_and_slurm():
    assert resolve_shard(None, {}) == (0, 1)
    assert resolve_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    with pytest.raises(ValueError, match="i/N"):
        resolve_shard("2-4")
    with pytest.raises(ValueError, match="0 <= i < N"):
        resolve_shard("4/4")


def test_unknown_method_and_importer_as_method_are_clear_errors(tmp_path):
    root = make_folder(tmp_path / "imgs", 1)
    with pytest.raises(LookupError, match=r"unknown proposal generator 'nope'\. Known: bing, "
                                          r".*graph_segments.* \(`objcrop proposals import` "
                                          r"reads boxes from files: coco, jsonl, openimages\)"):
        build_store(root, tmp_path / "p.objcrop", "nope", progress=False)
    with pytest.raises(LookupError, match=r"Did you mean 'graph_segments'\? Known: (?:(?!coco)[a-z_, ])+ \("):
        build_store(root, tmp_path / "p.objcrop", "graph_segment", progress=False)
    with pytest.raises(ValueError, match="importer"):
        build_store(root, tmp_path / "p.objcrop", "jsonl", progress=False)


def test_shards_run_on_their_own_devices_and_still_merge(tmp_path, monkeypatch):
    """Where a network runs (``device``, ``batch_size``) is no setting of the boxes: shards
    built on different devices merge, and their metadata holds neither. Under a launcher
    that sets ``LOCAL_RANK``, ``device="auto"`` is that rank's GPU."""
    pytest.importorskip("cv2")
    import torch

    from objcrop_plugin.proposals.generators import resolve_device

    root = make_folder(tmp_path / "imgs", 4)
    out = tmp_path / "h.objcrop"
    for i, run in enumerate(({"device": "cpu", "batch_size": 2}, {"device": "cpu:0"})):
        build_store(root, out, "heatmap", params={"model": "test_resnet", **run},
                    shard=(i, 2), progress=False)
    merged = tmp_path / "m.objcrop"
    assert cli_main(["proposals", "merge", str(shard_path(out, 0, 2)),
                     str(shard_path(out, 1, 2)), "--out", str(merged)]) == 0
    store = ProposalStore(merged)
    assert len(store) == 4 and store.meta["params"] == {"model": "test_resnet"}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda")


def test_merging_two_sources_of_boxes_for_the_same_images_says_what_merge_is_for(tmp_path):
    a, b = tmp_path / "gt.objcrop", tmp_path / "mine.objcrop"
    ProposalStore.write(a, [("x.jpg", [[1, 1, 9, 9]], [1.0], (20, 10))], meta={"source": "coco"})
    ProposalStore.write(b, [("x.jpg", [[2, 2, 8, 8]], [1.0], (20, 10))], meta={"source": "jsonl"})
    with pytest.raises(ValueError, match=r"key 'x\.jpg' is in both .*gt\.objcrop and .*mine\."
                                         r"objcrop: merge joins stores of disjoint images.*pick "
                                         r"one per run \(data\.proposals\)"):
        merge_stores(tmp_path / "m.objcrop", [a, b], allow_mixed=True)
    assert not (tmp_path / "m.objcrop").exists()
