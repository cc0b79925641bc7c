"""Hostile input to the proposal commands: outputs over inputs or devices, builds that mix,
crafted stores, bad arguments, Ctrl-C, broken pipes, strict JSON.

Every test asserts the exit status (or exception), that the message names the file or key, and
that nothing the user owns changed (a snapshot of the folder before and after).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from warm_python import sigint_as_in_a_terminal

from objcrop_plugin.cli import build_parser, main
from objcrop_plugin.files import OutputFileError, atomic_write, output_lock
from objcrop_plugin.proposals import ProposalStore, build
from objcrop_plugin.proposals.store import (
    StoreFormatError,
    _hash,
    _hash_table,
    _write_sections,
)

METHOD = "graph_segments"
needs_cv2 = pytest.mark.skipif(
    importlib.util.find_spec("cv2") is None,
    reason="opencv-contrib-python-headless (the proposals extra) is not installed",
)


# ----------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's SHA-256, a link's target, or its kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(folder))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link->" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = f"mode {stat.S_IFMT(st.st_mode):o}"
    return out


def images(root: Path, n: int = 3, size=(64, 48)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        arr[10:30, 10:40] = (200, 30, 30)
        Image.fromarray(arr).save(root / f"{i:06d}.jpg", quality=90)
    return root


def jsonl(path: Path, *objs: dict) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


REC = {"key": "a.jpg", "width": 10, "height": 8, "boxes": [[1, 1, 5, 5]], "scores": [0.5]}


def store(path: Path, n: int = 2) -> Path:
    ProposalStore.write(path, [(f"{i}.jpg", [[1, 1, 5, 5]], [0.5], (10, 8)) for i in range(n)])
    return path


def err_of(capsys) -> str:
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- 2: --out


@needs_cv2
def test_build_refuses_to_replace_a_labels_file_unless_forced(tmp_path, capsys):
    root = images(tmp_path / "data" / "images")
    labels = tmp_path / "data" / "labels.json"
    labels.write_text('{"classes": ["cat"], "images": []}')
    before = snapshot(tmp_path)
    rc = main(["proposals", "build", str(root), "--out", str(labels), "--workers", "1",
               "--no-progress"])
    assert rc == 2
    err = err_of(capsys)
    assert str(labels) in err and "--force" in err and "not a proposal store" in err
    assert snapshot(tmp_path) == before
    rc = main(["proposals", "build", str(root), "--out", str(labels), "--workers", "1",
               "--no-progress", "--force"])
    assert rc == 0 and len(ProposalStore(labels)) == 3


@needs_cv2
def test_build_never_writes_over_an_input_image_even_forced(tmp_path, capsys):
    root = images(tmp_path / "images")
    before = snapshot(tmp_path)
    for force in ([], ["--force"]):
        rc = main(["proposals", "build", str(root), "--out", str(root / "000001.jpg"),
                   "--workers", "1", "--no-progress", *force])
        assert rc == 2
        err = err_of(capsys)
        assert "000001.jpg" in err and str(root) in err
        assert snapshot(tmp_path) == before


def test_import_export_merge_never_replace_their_own_input(tmp_path, capsys):
    src = jsonl(tmp_path / "in.jsonl", REC)
    s = store(tmp_path / "s.objcrop")
    before = snapshot(tmp_path)
    for argv, name in [
        (["proposals", "import", str(src), "--out", str(src)], src),
        (["proposals", "import", str(src), "--out", str(src), "--force"], src),
        (["proposals", "export", str(s), "--out", str(s), "--force"], s),
        (["proposals", "merge", str(s), "--out", str(s)], s),
        (["proposals", "import-coco", str(src), "--out", str(src), "--force"], src),
    ]:
        assert main(argv) == 2, argv
        err = err_of(capsys)
        assert str(name) in err and "input of this command" in err, argv
        assert snapshot(tmp_path) == before, argv


def test_out_never_replaces_what_an_option_names_even_forced(tmp_path, capsys, monkeypatch):
    """Inputs named by importer options (--param images_json=, images_root=) and by generator
    options (--checkpoint, --bing-model, $OBJCROP_BING_MODEL, a --param path) are inputs too."""
    root = images(tmp_path / "imgs", n=2)
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "000000.jpg", "width": 64,
                                           "height": 48}], "annotations": []}))
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "bbox": [1, 1, 5, 5], "score": 0.9}]))
    oi = tmp_path / "oi.csv"
    oi.write_text("ImageID,XMin,XMax,YMin,YMax\n000000,0.1,0.5,0.2,0.6\n")
    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"PK\x03\x04 a trained checkpoint")
    bing = tmp_path / "bing"
    bing.mkdir()
    (bing / "ObjNessB2W8MAXBGR.idx.yml.gz").write_bytes(b"\x1f\x8b model")
    build = ["proposals", "build", str(root), "--workers", "1", "--no-progress"]
    cases = [
        (["proposals", "import", str(dets), "--source", "coco", "--param",
          f"images_json={ann}", "--out", str(ann)], ann, ann),
        (["proposals", "import", str(oi), "--source", "openimages", "--param",
          f"images_root={root}", "--out", str(root / "000001.jpg")], root / "000001.jpg", root),
        ([*build, "--method", "heatmap", "--model", "resnet18", "--checkpoint", str(ckpt),
          "--out", str(ckpt)], ckpt, ckpt),
        ([*build, "--method", "heatmap", "--param", f"checkpoint={ckpt}", "--out", str(ckpt)],
         ckpt, ckpt),
        ([*build, "--method", "bing", "--bing-model", str(bing), "--out",
          str(bing / "ObjNessB2W8MAXBGR.idx.yml.gz")], bing / "ObjNessB2W8MAXBGR.idx.yml.gz", bing),
    ]
    before = snapshot(tmp_path)
    for argv, out, inp in cases:
        for force in ([], ["--force"]):
            assert main([*argv, *force]) == 2, argv
            err = err_of(capsys)
            assert err.count("\n") == 1 and str(out) in err and str(inp) in err, err
            assert "input of this command" in err or "a folder this command reads" in err, err
            assert snapshot(tmp_path) == before, argv
    monkeypatch.setenv("OBJCROP_BING_MODEL", str(bing))
    out = bing / "ObjNessB2W8MAXBGR.idx.yml.gz"
    assert main([*build, "--method", "bing", "--out", str(out), "--force"]) == 2
    err = err_of(capsys)
    assert str(out) in err and str(bing) in err and snapshot(tmp_path) == before


def test_export_replaces_a_hand_written_jsonl_file_only_with_force(tmp_path, capsys):
    s = store(tmp_path / "s.objcrop")
    mine = tmp_path / "my_boxes.jsonl"  # the README's example line, as a person writes it
    mine.write_text('{"key": "mine/1.jpg", "width": 640, "height": 480, "boxes": '
                    '[[12.0, 30.5, 200.0, 310.0]], "scores": [0.93]}\n')
    before = snapshot(tmp_path)
    assert main(["proposals", "export", str(s), "--out", str(mine)]) == 2
    err = err_of(capsys)
    assert str(mine) in err and "--force" in err and "not a JSON Lines file written by objcrop" in err
    assert snapshot(tmp_path) == before
    assert main(["proposals", "export", str(s), "--out", str(mine), "--force"]) == 0
    assert json.loads(mine.read_text().splitlines()[0])["key"] == "0.jpg"
    # once it is objcrop's export, the next export replaces it without --force
    assert main(["proposals", "export", str(s), "--out", str(mine)]) == 0


def test_merge_and_import_remove_a_stale_failures_list(tmp_path, capsys):
    out = tmp_path / "out.objcrop"
    stale = tmp_path / "out.objcrop.failures.tsv"
    a, b = store(tmp_path / "a.objcrop", 1), tmp_path / "b.objcrop"
    ProposalStore.write(b, [("z.jpg", [[1, 1, 5, 5]], [0.5], (10, 8))])
    src = jsonl(tmp_path / "in.jsonl", REC)
    for argv in (["proposals", "merge", str(a), str(b), "--out", str(out)],
                 ["proposals", "import", str(src), "--out", str(out)]):
        stale.write_text("key\treason\nzero.jpg\tImageDecodeError: an earlier build\n")
        assert main(argv) == 0, argv
        assert not stale.exists(), argv
    # a shard's own failures still follow it into the merged store's list
    (tmp_path / "b.objcrop.failures.tsv").write_text("key\treason\ny.jpg\tbroken\n")
    assert main(["proposals", "merge", str(a), str(b), "--out", str(out)]) == 0
    assert stale.read_text() == "key\treason\ny.jpg\tbroken\n"


def test_a_store_replaces_a_store_and_an_export_an_export(tmp_path, capsys):
    src = jsonl(tmp_path / "in.jsonl", REC)
    out, exp = tmp_path / "s.objcrop", tmp_path / "o.jsonl"
    for _ in range(2):
        assert main(["proposals", "import", str(src), "--out", str(out)]) == 0
        assert main(["proposals", "export", str(out), "--out", str(exp)]) == 0
    # another kind: refused, then --force
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert main(["proposals", "export", str(out), "--out", str(notes)]) == 2
    assert str(notes) in err_of(capsys) and notes.read_text() == "my notes"
    assert main(["proposals", "export", str(out), "--out", str(notes), "--force"]) == 0
    assert json.loads(notes.read_text())["key"] == "a.jpg"


@pytest.mark.parametrize("make", ["symlink_to_device", "fifo", "symlink_to_file"])
def test_out_never_replaces_a_device_pipe_or_link(tmp_path, capsys, make):
    s = store(tmp_path / "s.objcrop")
    out = tmp_path / "out.jsonl"
    if make == "symlink_to_device":
        os.symlink("/dev/null", out)
    elif make == "fifo":
        os.mkfifo(out)
    else:
        (tmp_path / "target.jsonl").write_text("")
        os.symlink(tmp_path / "target.jsonl", out)
    before = snapshot(tmp_path)
    assert main(["proposals", "export", str(s), "--out", str(out), "--force"]) == 2
    assert str(out) in err_of(capsys)
    assert snapshot(tmp_path) == before


def test_atomic_write_refuses_folders_and_devices_and_leaves_no_temporary(tmp_path):
    (tmp_path / "dir").mkdir()
    os.symlink("/dev/null", tmp_path / "devlink")
    before = snapshot(tmp_path)
    for name in ("dir", "devlink"):
        with pytest.raises(OutputFileError, match=re.escape(str(tmp_path / name))):
            atomic_write(tmp_path / name, b"x")
    assert snapshot(tmp_path) == before


def _show_inputs(tmp_path: Path) -> tuple[Path, Path]:
    root = images(tmp_path / "imgs", n=2)
    s = tmp_path / "p.objcrop"
    ProposalStore.write(s, [(f"{i:06d}.jpg", [[5, 5, 40, 30]], [1.0], (64, 48)) for i in range(2)])
    return root, s


def test_show_out_a_folder_is_a_clear_error_and_leaves_nothing(tmp_path, capsys):
    root, s = _show_inputs(tmp_path)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "mine.png").write_bytes(b"\x89PNG mine")
    before = snapshot(tmp_path)
    rc = main(["show", "--root", str(root), "--proposals", str(s), "--out",
               str(tmp_path / "pics"), "--n", "1"])
    assert rc == 2
    err = err_of(capsys)
    assert str(tmp_path / "pics") in err and "folder" in err and ".tmp" not in err
    assert snapshot(tmp_path) == before  # no .pics.*.tmp


def test_show_replaces_its_own_picture_only(tmp_path, capsys):
    root, s = _show_inputs(tmp_path)
    out = tmp_path / "crops.png"
    argv = ["show", "--root", str(root), "--proposals", str(s), "--out", str(out), "--n", "1"]
    assert main(argv) == 0 and main(argv) == 0  # over its own picture
    photo = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(photo)
    before = snapshot(tmp_path)
    assert main(argv[:-4] + ["--out", str(photo), "--n", "1"]) == 2
    assert str(photo) in err_of(capsys)
    # an image the command reads: refused even with --force
    assert main(argv[:-4] + ["--out", str(root / "000000.jpg"), "--n", "1", "--force"]) == 2
    assert "000000.jpg" in err_of(capsys)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 3: mixing


@needs_cv2
def test_a_second_build_of_the_same_store_is_refused_naming_the_holder(tmp_path, capsys):
    root = images(tmp_path / "imgs")
    out = tmp_path / "p.objcrop"
    with output_lock(out) as lock:
        before = snapshot(tmp_path)
        rc = main(["proposals", "build", str(root), "--out", str(out), "--workers", "1",
                   "--no-progress"])
        assert rc == 2
        err = err_of(capsys)
        assert f"pid {os.getpid()}" in err and socket.gethostname() in err and str(lock) in err
        assert snapshot(tmp_path) == before
    assert not lock.exists()
    assert main(["proposals", "build", str(root), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0


@needs_cv2
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    root = images(tmp_path / "imgs")
    out = tmp_path / "p.objcrop"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".p.objcrop.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    assert main(["proposals", "build", str(root), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0
    assert len(ProposalStore(out)) == 3 and not lock.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_child_left_by_a_killed_holder_does_not_keep_the_lock(tmp_path):
    """kill -9 of a build whose DataLoader workers (forked) live on must not block the rerun."""
    out = tmp_path / "p.objcrop"
    script = (
        "import os, sys, time\n"
        "from objcrop_plugin.files import output_lock\n"
        "with output_lock(sys.argv[1]):\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    print(child, flush=True)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE)
    child = int(holder.stdout.readline())
    try:
        assert holder.wait(timeout=60) == -signal.SIGKILL
        os.kill(child, 0)  # the orphan is still alive
        with output_lock(out) as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()
    finally:
        os.kill(child, signal.SIGKILL)


def _interrupted_build(root: Path, out: Path, monkeypatch, method: str = METHOD) -> None:
    """A build stopped by Ctrl-C after its first chunk (chunks of 1 image)."""
    real = build._run_chunk
    calls = []

    def run_then_interrupt(task):
        if calls:
            raise KeyboardInterrupt
        calls.append(task)
        return real(task)

    monkeypatch.setattr(build, "_run_chunk", run_then_interrupt)
    with pytest.raises(build.BuildInterrupted, match="Run the same command again"):
        build.build_store(root, out, method, workers=1, chunk_size=1, progress=False)
    monkeypatch.setattr(build, "_run_chunk", real)


@needs_cv2
def test_chunks_without_their_settings_are_never_resumed(tmp_path, monkeypatch, capsys):
    root = images(tmp_path / "imgs")
    out = tmp_path / "p.objcrop"
    parts = tmp_path / ".p.objcrop.parts"
    _interrupted_build(root, out, monkeypatch)
    (parts / "manifest.json").unlink()  # what a concurrent build's cleanup left behind
    before = snapshot(tmp_path)
    argv = ["proposals", "build", str(root), "--out", str(out), "--method", "selective_search",
            "--workers", "1", "--chunk-size", "1", "--no-progress"]
    assert main(argv) == 2
    err = err_of(capsys)
    assert str(parts) in err and "--restart" in err and "chunk-000000.jsonl" in err
    assert snapshot(tmp_path) == before
    assert main([*argv, "--restart"]) == 0
    assert "resumed" not in capsys.readouterr().out
    assert ProposalStore(out).meta["method"] == "selective_search"


@needs_cv2
def test_an_unfinished_build_of_another_folder_is_not_resumed(tmp_path, monkeypatch, capsys):
    a, b = images(tmp_path / "a"), images(tmp_path / "b")  # same file names
    out = tmp_path / "p.objcrop"
    _interrupted_build(a, out, monkeypatch)
    before = snapshot(tmp_path)
    argv = ["proposals", "build", str(b), "--out", str(out), "--workers", "1", "--chunk-size",
            "1", "--no-progress"]
    assert main(argv) == 2
    err = err_of(capsys)
    assert "root" in err and str(tmp_path / "b") in err and "--restart" in err
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 7: crafted stores


def _crafted(path: Path, **override) -> Path:
    """A store of 2 images whose sections are replaced by ``override``, checksums valid."""
    keys = [b"a.jpg", b"b.jpg"]
    hashes = np.array([_hash(k) for k in keys], dtype=np.uint64)
    sections = {
        "key_hash": hashes.astype("<u8"),
        "key_offsets": np.array([0, 5, 10], "<i8"),
        "keys": np.frombuffer(b"".join(keys), np.uint8),
        "box_offsets": np.array([0, 1, 2], "<i8"),
        "boxes": np.array([[1, 1, 5, 5], [2, 2, 6, 6]], "<f4"),
        "scores": np.array([0.5, 0.4], "<f4"),
        "sizes": np.array([[10, 8], [10, 8]], "<i4"),
        "table": _hash_table(hashes).astype("<i8"),
    }
    sections.update({k: np.asarray(v, dtype=sections[k].dtype) for k, v in override.items()})
    _write_sections(path, sections, 2, {})
    return path


@pytest.mark.parametrize("override, why", [
    ({"table": [0, 1] * 8}, "holds 16 entries for 2 images"),  # full: no empty slot
    ({"table": [7] * 16}, "outside [-1, 2)"),
    ({"table": [-5] * 16}, "outside [-1, 2)"),
    ({"box_offsets": [0, 2, 1]}, "box_offsets"),
    ({"key_offsets": [0, 5, 99]}, "key_offsets"),
    ({"sizes": [[10, 8], [0, -3]]}, "size is not positive"),
    ({"key_hash": [1, 2, 3]}, "key_hash"),
    ({"table": [-1] * 2}, "hash table"),  # no slot left for a miss
])
def test_a_crafted_store_with_valid_checksums_is_refused_naming_it(tmp_path, capsys,
                                                                     override, why):
    path = _crafted(tmp_path / "evil.objcrop", **override)
    before = snapshot(tmp_path)
    with pytest.raises(StoreFormatError, match=re.escape(why)) as info:
        ProposalStore(path)
    assert str(path) in str(info.value)
    assert main(["proposals", "info", str(path)]) == 2
    assert str(path) in err_of(capsys)
    assert snapshot(tmp_path) == before


def _alarm(seconds: int):
    def handler(signum, frame):
        raise TimeoutError("lookup did not return")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    return old


def test_lookups_in_a_full_table_end_and_bad_entries_name_the_store(tmp_path):
    full = _crafted(tmp_path / "full.objcrop", table=[0, 1] * 8)
    bad = _crafted(tmp_path / "bad.objcrop", table=[7] * 16)
    old = _alarm(20)
    try:
        s = ProposalStore(full, verify=False)  # a worker's open: no content scan
        assert "missing.jpg" not in s and s.get("a.jpg") is not None
        with pytest.raises(StoreFormatError, match=re.escape(str(bad))):
            ProposalStore(bad, verify=False).get("a.jpg")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_the_written_stores_pass_the_checks(tmp_path):
    path = _crafted(tmp_path / "ok.objcrop")
    s = ProposalStore(path)
    assert s["b.jpg"].boxes.tolist() == [[2, 2, 6, 6]] and "c.jpg" not in s
    ProposalStore.write(tmp_path / "empty.objcrop", [])
    assert len(ProposalStore(tmp_path / "empty.objcrop")) == 0


# ----------------------------------------------------------------------------- 12: tracebacks


def test_jsonl_width_too_large_names_file_line_and_key(tmp_path, capsys):
    src = jsonl(tmp_path / "in.jsonl", REC, {**REC, "key": "big.jpg", "width": 3e9})
    out = tmp_path / "s.objcrop"
    before = snapshot(tmp_path)
    assert main(["proposals", "import", str(src), "--out", str(out)]) == 2
    err = err_of(capsys)
    assert f"{src}:2" in err and "big.jpg" in err and "too large" in err
    assert snapshot(tmp_path) == before


@needs_cv2
def test_an_unknown_generator_parameter_lists_the_accepted_ones(tmp_path, capsys):
    root = images(tmp_path / "imgs")
    before = snapshot(tmp_path)
    assert main(["proposals", "build", str(root), "--out", str(tmp_path / "p.objcrop"),
                 "--param", "foo=1", "--no-progress"]) == 2
    err = err_of(capsys)
    assert "graph_segments" in err and "['foo']" in err and "top_k" in err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


@needs_cv2
def test_ctrl_c_during_a_build_says_what_was_saved_and_resumes(tmp_path, monkeypatch, capsys):
    root = images(tmp_path / "imgs", n=4)
    out = tmp_path / "p.objcrop"
    real = build._run_chunk

    def interrupt_second(task):
        if task[0] == 1:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(build, "_run_chunk", interrupt_second)
    argv = ["proposals", "build", str(root), "--out", str(out), "--workers", "1",
            "--chunk-size", "2", "--no-progress"]
    before = snapshot(root)
    assert main(argv) == 130
    err = err_of(capsys)
    assert "2 of 4 images" in err and ".p.objcrop.parts" in err and "same command" in err
    assert not out.exists() and not (tmp_path / ".p.objcrop.lock").exists()
    monkeypatch.setattr(build, "_run_chunk", real)
    assert main(argv) == 0
    assert "resumed: 2 images" in capsys.readouterr().out
    assert snapshot(root) == before


@needs_cv2
def test_sigint_to_a_parallel_build_exits_130_without_tracebacks(tmp_path):
    root = images(tmp_path / "imgs", n=60)
    out = tmp_path / "p.objcrop"
    cmd = [sys.executable, "-m", "objcrop_plugin.cli", "proposals", "build", str(root),
           "--out", str(out), "--workers", "2", "--chunk-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=sigint_as_in_a_terminal)
    parts = tmp_path / ".p.objcrop.parts"
    deadline = time.time() + 120
    while time.time() < deadline and not list(parts.glob("chunk-*.jsonl")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    if proc.returncode == 0:
        pytest.skip("the build finished before the interrupt landed")
    assert proc.returncode == 130, err
    assert "saved in" in err and "Traceback" not in err
    assert not out.exists()


# ----------------------------------------------------------------------------- 13: messages


def _command(parser: argparse.ArgumentParser, tokens: list[str]):
    """The (sub)parser a command line reaches, and the tokens left for it."""
    while tokens:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or tokens[0] not in subs[0].choices:
            break
        parser, tokens = subs[0].choices[tokens[0]], tokens[1:]
    return parser, tokens


def test_every_command_suggested_in_a_message_uses_options_that_exist():
    """Hints like `objcrop proposals build DIR -o STORE` in messages and docstrings."""
    pkg = Path(__file__).resolve().parents[2] / "objcrop_plugin"
    hints = set()
    for py in pkg.rglob("*.py"):
        # one string literal each (a hint split over two literals is skipped)
        for m in re.finditer(r"`(objcrop [^`\n\"]*)`", py.read_text(encoding="utf-8")):
            hints.add(re.sub(r"\{[^}]*\}", "X", m.group(1)))
    assert any(" -o " in h for h in hints)
    for hint in sorted(hints):
        parser, rest = _command(build_parser(), shlex.split(hint.replace("...", ""))[1:])
        if parser.prog == "objcrop":
            assert all(t.startswith("-") for t in rest), f"`{hint}`: no such command"
        for tok in rest:
            if tok.startswith("-"):
                opt = tok.strip("[]").split("=")[0]
                assert opt in parser._option_string_actions, f"`{hint}`: no option {opt}"


@pytest.mark.parametrize("argv, option", [
    (["--chunk-size", "0"], "--chunk-size"),
    (["--workers", "-1"], "--workers"),
    (["--max-failure-rate", "-1"], "--max-failure-rate"),
    (["--max-failure-rate", "1.5"], "--max-failure-rate"),
])
def test_bad_build_numbers_are_refused_naming_the_option(tmp_path, capsys, argv, option):
    root = images(tmp_path / "imgs", n=1)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["proposals", "build", str(root), "--out", str(tmp_path / "p.objcrop"), *argv])
    assert info.value.code == 2
    err = err_of(capsys)
    assert option in err and "range()" not in err
    assert snapshot(tmp_path) == before


def test_build_store_refuses_zero_chunk_size_and_workers(tmp_path):
    root = images(tmp_path / "imgs", n=1)
    for kw in ({"chunk_size": 0}, {"workers": -1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            build.build_store(root, tmp_path / "p.objcrop", METHOD, progress=False, **kw)
    assert not (tmp_path / "p.objcrop").exists()


def test_a_non_utf8_jsonl_file_names_file_and_line(tmp_path, capsys):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(json.dumps(REC).encode() + b"\n" + '{"key": "café.jpg"}\n'.encode("latin-1"))
    before = snapshot(tmp_path)
    assert main(["proposals", "import", str(src), "--out", str(tmp_path / "s.objcrop")]) == 2
    err = err_of(capsys)
    assert f"{src}:2" in err and "UTF-8" in err
    assert snapshot(tmp_path) == before


def test_piping_into_head_exits_quietly(tmp_path):
    s = store(tmp_path / "s.objcrop")
    proc = subprocess.Popen(
        [sys.executable, "-m", "objcrop_plugin.cli", "proposals", "info", str(s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line (like `| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_export_writes_strict_json_and_import_reads_it_back(tmp_path, caplog):
    s = tmp_path / "s.objcrop"
    ProposalStore.write(s, [
        ("a.jpg", [[1, 1, 5, 5], [np.nan, 1, 5, 5], [1, 1, np.inf, 5]], [np.nan, 0.5, 0.4],
         (10, 8)),
        ("b.jpg", [[2, 2, 6, 6]], [0.9], (10, 8)),
    ])
    out = tmp_path / "o.jsonl"
    before = snapshot(tmp_path)
    assert main(["proposals", "export", str(s), "--out", str(out)]) == 0
    assert "a.jpg (2)" in caplog.text and "NaN" in caplog.text

    def strict(name):
        raise ValueError(f"bare {name} in the export")

    lines = [json.loads(line, parse_constant=strict) for line in out.read_text().splitlines()]
    assert lines[0]["boxes"] == [[1, 1, 5, 5]] and lines[0]["scores"] == [None]
    back = tmp_path / "back.objcrop"
    assert main(["proposals", "import", str(out), "--out", str(back)]) == 0
    assert ProposalStore(back)["a.jpg"].boxes.tolist() == [[1, 1, 5, 5]]
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before


# ----------------------------------------------------------------------------- 14: silence


def test_building_an_empty_folder_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    before = snapshot(tmp_path)
    assert main(["proposals", "build", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "p.objcrop"), "--no-progress"]) == 2
    err = err_of(capsys)
    assert str(tmp_path / "empty") in err and "no images" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_importing_an_empty_jsonl_file_is_refused(tmp_path, capsys, content):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    before = snapshot(tmp_path)
    assert main(["proposals", "import", str(src), "--out", str(tmp_path / "s.objcrop")]) == 2
    err = err_of(capsys)
    assert str(src) in err and "nothing to import" in err
    assert snapshot(tmp_path) == before


@needs_cv2
def test_failures_lists_keep_one_row_per_image_whatever_its_name(tmp_path, capsys):
    root = images(tmp_path / "imgs", n=2)
    odd = ["bad\nname.jpg", "tab\tname.jpg", "cr\rname.jpg", "sep\u2028name.jpg"]
    for name in odd:
        (root / name).write_bytes(b"")  # unreadable: a failure row each
    for i in range(2):
        assert main(["proposals", "build", str(root), "--out", str(tmp_path / "s.objcrop"),
                     "--shard", f"{i}/2", "--workers", "1", "--no-progress",
                     "--max-failure-rate", "1"]) == 0
        # each shard's run says where the shards are and how to merge them
        said = capsys.readouterr().out
        assert (f"shard {i} of 0-1; once every shard is built: objcrop proposals merge "
                f"{tmp_path / 's.shard-*-of-00002.objcrop'} -o {tmp_path / 's.objcrop'}") in said
    merged = tmp_path / "m.objcrop"
    assert main(["proposals", "merge", *(str(build.shard_path(tmp_path / "s.objcrop", i, 2))
                                         for i in range(2)), "--out", str(merged)]) == 0
    rows = build.failures_path(merged).read_bytes().decode().split("\n")
    assert rows[0] == "key\treason" and rows[-1] == "" and len(rows) == 2 + len(odd)
    keys = sorted(row.split("\t")[0] for row in rows[1:-1])
    assert keys == sorted(["bad\\nname.jpg", "tab\\tname.jpg", "cr\rname.jpg",
                           "sep\u2028name.jpg"])
