"""Hostile image folders: link cycles, FIFOs, proposals of another aspect ratio, corrupt images.

Each test states what a user relies on: every real image listed once, no read that blocks
forever, no box on the wrong object, and one bad file never ending a run (within the failure
rate), with the file named and the user's files left as they were.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from objcrop_plugin import boxes as box_ops
from objcrop_plugin.cli import main
from objcrop_plugin.engine import ViewEngine
from objcrop_plugin.engine.datasets import CanvasDataset, ObjectCropDataset
from objcrop_plugin.images import ImageDecodeError, list_images, open_image
from objcrop_plugin.proposals import ProposalStore
from objcrop_plugin.stats import BadImages, FallbackCounter, TooManyBadImagesError

W, H = 160, 120
SQUARE = (100, 20, 140, 60)  # a red square on blue, xyxy in the image as displayed


def scene(shift: int = 0) -> Image.Image:
    img = Image.new("RGB", (W, H), (0, 0, 255))
    x1, y1, x2, y2 = SQUARE
    img.paste(Image.new("RGB", (x2 - x1, y2 - y1), (255, 0, 0)), (x1 - shift, y1))
    return img


def write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{i:03d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        scene(i).save(folder / name, quality=95)
    return names


def corrupt(path: Path) -> None:
    """The first half of the file: the header opens, the pixels cannot be decoded (a
    truncated download)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def fifo_supported() -> bool:
    return hasattr(os, "mkfifo")


# ------------------------------------------------------------ item 4: directory link cycles

def test_a_link_back_up_the_tree_lists_each_image_once(tmp_path, caplog):
    root = tmp_path / "data"
    write_images(root, 4)
    write_images(root / "sub", 4)
    os.symlink(".", root / "self")  # the case: 8 images became 328 keys
    os.symlink("..", root / "sub" / "up")
    os.symlink("sub", root / "again")  # the same folder twice
    os.symlink("000.jpg", root / "link.jpg")  # the same file twice
    os.link(root / "001.jpg", root / "hard.jpg")  # a second name (walked after 001.jpg)
    with caplog.at_level(logging.WARNING):
        keys = list_images(root)
    assert len(keys) == 8 and len(set(keys)) == 8
    # the other names are said (an ImageFolder lists them, and finds no proposals there)
    said = [r.getMessage() for r in caplog.records if "links to files listed" in r.getMessage()]
    assert len(said) == 1 and "2 image name(s)" in said[0]
    assert "'hard.jpg', 'link.jpg'" in said[0]
    assert keys == [f"{i:03d}.jpg" for i in range(4)] + [f"sub/{i:03d}.jpg" for i in range(4)]
    ds = ObjectCropDataset(root, None, views="scene_scene", size=16, seed=0)
    assert len(ds) == 8  # so an epoch sees each image once


def test_a_link_to_a_folder_elsewhere_is_still_followed(tmp_path):
    write_images(tmp_path / "data", 2)
    write_images(tmp_path / "elsewhere", 3)
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "more")
    assert list_images(tmp_path / "data") == [
        "000.jpg", "001.jpg", "more/000.jpg", "more/001.jpg", "more/002.jpg"]


# ---------------------------------------------------------------- item 10: FIFOs and devices


@pytest.mark.skipif(os.sep == "\\", reason="a backslash is the folder separator here")
def test_a_backslash_in_a_name_is_left_out_named_and_the_build_goes_on(tmp_path, caplog):
    """Keys read ``\\`` as a folder separator, so ``a\\b.jpg`` would be looked for as
    ``a/b.jpg`` (another file, or none): it is left out, with a warning naming it."""
    root = tmp_path / "imgs"
    write_images(root, 2)
    (root / "a").mkdir()
    scene(2).save(root / "a" / "b.jpg")
    scene(3).save(root / "a\\b.jpg")
    (root / "x\\y").mkdir()
    scene(4).save(root / "x\\y" / "c.jpg")
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        assert list_images(root) == ["000.jpg", "001.jpg", "a/b.jpg"]
    assert "2 image file(s)" in caplog.text and "'a\\\\b.jpg'" in caplog.text
    assert "Fix: rename them" in caplog.text
    out = tmp_path / "p.objcrop"
    assert main(["proposals", "build", str(root), "--out", str(out), "--method",
                 "graph_segments", "--workers", "1", "--no-progress"]) == 0
    assert set(ProposalStore(out)) == {"000.jpg", "001.jpg", "a/b.jpg"}
    assert (root / "a\\b.jpg").exists()  # the user's files are left alone


@pytest.mark.skipif(os.name != "posix", reason="file names are bytes on POSIX only")
def test_a_name_that_is_not_utf8_is_left_out_named_and_the_build_goes_on(tmp_path, caplog):
    """A Latin-1 name (bytes that are not UTF-8) has no key a store can hold: left out with
    a warning naming it, instead of a UnicodeEncodeError ending the build or the run."""
    root = tmp_path / "imgs"
    write_images(root, 2)
    latin1 = os.path.join(os.fsencode(root), b"caf\xe9.jpg")
    with open(latin1, "wb") as f:
        scene(2).save(f, format="JPEG")
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        assert list_images(root) == ["000.jpg", "001.jpg"]
    assert "1 image file(s)" in caplog.text and "not valid UTF-8" in caplog.text
    assert "'caf\\udce9.jpg'" in caplog.text and "Fix: rename them" in caplog.text
    out = tmp_path / "p.objcrop"
    assert main(["proposals", "build", str(root), "--out", str(out), "--method",
                 "graph_segments", "--workers", "1", "--no-progress"]) == 0
    assert set(ProposalStore(out)) == {"000.jpg", "001.jpg"}
    assert os.path.exists(latin1)


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, caplog, monkeypatch):
    """An unreadable folder (permissions, an I/O error, a stale network mount) leaves its
    images out of the list: said, with the folder and the reason, not silently."""
    root = tmp_path / "imgs"
    write_images(root, 2)
    write_images(root / "cats", 2)
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("cats"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        assert list_images(root) == ["000.jpg", "001.jpg"]
    assert "1 folder(s) or file(s)" in caplog.text and "Permission denied" in caplog.text
    assert str(root / "cats") in caplog.text


@pytest.mark.skipif(not fifo_supported(), reason="no FIFOs on this system")
def test_a_fifo_named_jpg_is_not_listed_and_not_opened(tmp_path):
    write_images(tmp_path, 2)
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("pipe.jpg", tmp_path / "to_pipe.jpg")
    assert list_images(tmp_path) == ["000.jpg", "001.jpg"]
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            open_image(tmp_path / "pipe.jpg")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "open_image blocked on a FIFO"
    (exc,) = outcome
    assert isinstance(exc, ImageDecodeError)
    assert "pipe.jpg" in str(exc) and "FIFO" in str(exc)
    assert (tmp_path / "pipe.jpg").exists()  # the user's file is left alone


@pytest.mark.skipif(not fifo_supported(), reason="no FIFOs on this system")
def test_check_finishes_on_a_folder_with_a_fifo(tmp_path, capsys):
    write_images(tmp_path / "data", 2)
    os.mkfifo(tmp_path / "data" / "pipe.jpg")
    assert main(["check", str(tmp_path / "data"), "--out", str(tmp_path / "bad.tsv"),
                 "--no-progress"]) == 0
    assert "all 2 images" in capsys.readouterr().out


# ------------------------------------------------- item 5: a stored size of another aspect

def test_size_mismatch_tells_rescale_from_transpose_from_other_aspect():
    assert box_ops.size_mismatch((640, 480), (320, 240)) is None
    assert box_ops.size_mismatch((640, 481), (320, 240)) is None  # rounding
    assert box_ops.size_mismatch((640, 480), (480, 640)) == "transposed"
    assert box_ops.size_mismatch((640, 480), (640, 360)) == "aspect"
    assert box_ops.size_mismatch((500, 500), (250, 250)) is None


def _store(tmp_path: Path, size: tuple[int, int], box) -> Path:
    path = tmp_path / "p.objcrop"
    ProposalStore.write(path, [("000.jpg", [box], [1.0], size)])
    return path


def _windows(tmp_path, size, box, caplog):
    write_images(tmp_path, 1)
    ds = ObjectCropDataset(tmp_path, _store(tmp_path, size, box), views="obj_obj", size=16,
                           photometrics="none", seed=0)
    engine = ds.engine
    s = ds.source.sample(0)
    with caplog.at_level(logging.INFO, logger="objcrop_plugin"):
        windows = engine.windows((W, H), s.proposals, s.rng, s.key)
    return ds, windows


def test_same_aspect_is_rescaled(tmp_path, caplog):
    half = [v / 2 for v in SQUARE]
    ds, windows = _windows(tmp_path, (W // 2, H // 2), half, caplog)
    counts = ds.recipe.fallbacks.as_dict()
    assert counts["mismatched"] == 0 and counts["missing"] == 0
    for w in windows:
        assert not w.fallback
        x1, y1, x2, y2 = w.box
        assert x1 >= SQUARE[0] - 1e-6 and y1 >= SQUARE[1] - 1e-6
        assert x2 <= SQUARE[2] + 1e-6 and y2 <= SQUARE[3] + 1e-6


@pytest.mark.parametrize("size, transposed", [((H, W), True), ((W, 90), False)])
def test_another_aspect_falls_back_to_scene_crops_counted_and_logged(tmp_path, caplog, size,
                                                                      transposed):
    ds, windows = _windows(tmp_path, size, [10, 10, 60, 60], caplog)
    counts = ds.recipe.fallbacks.as_dict()
    assert counts == {"samples": 1, "missing": 0, "unusable": 0, "mismatched": 1}
    assert ds.recipe.fallbacks.fallbacks == 1
    assert all(w.fallback and w.policy == "scene" for w in windows)
    text = caplog.text
    assert "000.jpg" in text and "mismatched" in text and f"{size[0]}x{size[1]}" in text
    assert ("transpose" in text) == transposed and "objcrop proposals build" in text
    # the canvas dataset plans the same windows from the same stream
    canvas = CanvasDataset(tmp_path, tmp_path / "p.objcrop", views="obj_obj", size=16, seed=0)
    item = canvas[0]
    assert canvas.recipe.fallbacks.as_dict()["mismatched"] == 1
    scale = item["valid"][0].item() / W
    want = torch.tensor([w.box for w in windows], dtype=torch.float32) * scale
    assert torch.allclose(item["windows"], want, atol=1e-4)


def test_a_recipe_given_the_stored_size_refuses_another_aspect_and_rescales_the_same():
    from objcrop_plugin.policies import make_recipe

    recipe = make_recipe("obj_obj", size=16)
    rng = np.random.default_rng(0)
    half = np.array([[v / 2 for v in SQUARE]])
    same = recipe((W, H), half, None, rng=rng, key="a.jpg", boxes_size=(W // 2, H // 2))
    turned = recipe((W, H), half, None, rng=rng, key="b.jpg", boxes_size=(H // 2, W // 2))
    assert not any(w.fallback for w in same) and all(w.fallback for w in turned)
    assert recipe.fallbacks.as_dict()["mismatched"] == 1


def test_verbose_names_every_fallback_key(caplog):
    counter = FallbackCounter()
    with caplog.at_level(logging.INFO, logger="objcrop_plugin"):
        for i in range(FallbackCounter.LOG_FIRST + 4):
            counter.fallback("mismatched", f"img{i}.jpg", "other size")
    assert all(f"img{i}.jpg" in caplog.text for i in range(FallbackCounter.LOG_FIRST + 4))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        FallbackCounter().fallback("missing", "quiet.jpg", "x")
    assert "quiet.jpg" in caplog.text  # the first ones are warnings


# ------------------------------------------------------------ item 8: one corrupt image

def _folder_with_bad(tmp_path: Path, n: int = 10, bad=(3,)) -> tuple[Path, Path]:
    root = tmp_path / "data"
    names = write_images(root, n)
    for i in bad:
        corrupt(root / names[i])
    store = tmp_path / "p.objcrop"
    ProposalStore.write(store, [(k, [SQUARE], [1.0], (W, H)) for k in names])
    return root, store


@pytest.mark.parametrize("kind", ["views", "canvas"])
def test_a_corrupt_image_is_replaced_by_the_next_readable_one(tmp_path, caplog, kind):
    root, store = _folder_with_bad(tmp_path, bad=(3, 4))

    def make():
        if kind == "views":
            return ObjectCropDataset(root, store, size=16, seed=1, max_failure_rate=0.5)
        return CanvasDataset(root, store, size=16, seed=1, max_failure_rate=0.5)

    ds = make()
    before = snapshot(root)
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        item = ds[3]
    key = item[2] if kind == "views" else item["key"]
    assert key == "005.jpg"  # 3 and 4 do not decode: the next readable index
    assert ds.bad.count == 2 and ds.bad.indices() == [3, 4]
    assert str(root / "003.jpg") in caplog.text and str(root / "004.jpg") in caplog.text
    # deterministic: another dataset (a resumed run) serves the same sample
    again = make()[3]
    if kind == "views":
        assert all(torch.equal(a, b) for a, b in zip(item[0], again[0]))
        # drawn from index 3's stream, so not a duplicate of item 5 in the same batch
        assert not all(torch.equal(a, b) for a, b in zip(item[0], ds[5][0]))
    else:
        assert torch.equal(item["windows"], again["windows"]) and item["seed"] == again["seed"]
    rows = ds.bad_images()
    assert [r[:2] for r in rows] == [("003.jpg", str(root / "003.jpg")),
                                     ("004.jpg", str(root / "004.jpg"))]
    assert all("cannot" in r[2] and "Fix" in r[2] for r in rows)
    assert snapshot(root) == before


@pytest.mark.parametrize("kind", ["views", "canvas"])
def test_a_corrupt_image_counts_no_sample_and_no_fallback(tmp_path, caplog, kind):
    # the crops are planned from the header before the pixels fail to decode; that sample is
    # never served, so it must not count, nor warn of a scene-crop fallback for the image
    # (as a store built over the folder, which has no entry for it, would otherwise say)
    root = tmp_path / "data"
    names = write_images(root, 6)
    corrupt(root / names[2])
    store = tmp_path / "p.objcrop"
    ProposalStore.write(store, [(k, [SQUARE], [1.0], (W, H)) for k in names if k != names[2]])
    cls = ObjectCropDataset if kind == "views" else CanvasDataset
    ds = cls(root, store, size=16, seed=0, max_failure_rate=0.5)
    with caplog.at_level(logging.INFO, logger="objcrop_plugin"):
        for i in range(len(ds)):
            ds[i]
    assert ds.bad.indices() == [2]
    assert ds.recipe.fallbacks.as_dict() == {"samples": 6, "missing": 0, "unusable": 0,
                                             "mismatched": 0}
    assert "scene-crop fallback" not in caplog.text
    # an image that reads and has no entry is still counted and named
    (root / "extra.jpg").write_bytes((root / names[0]).read_bytes())
    ds = cls(root, store, size=16, seed=0, max_failure_rate=0.5)
    with caplog.at_level(logging.INFO, logger="objcrop_plugin"):
        for i in range(len(ds)):
            ds[i]
    assert ds.recipe.fallbacks.as_dict()["samples"] == 7
    assert ds.recipe.fallbacks.fallbacks == 1 and "extra.jpg (missing)" in caplog.text


def test_held_counts_are_dropped_on_an_error_and_kept_otherwise():
    from objcrop_plugin.stats import counts_held

    counter = FallbackCounter()
    with pytest.raises(ImageDecodeError), counts_held():
        counter.add("samples")
        counter.fallback("missing", "a.jpg", "no entry")
        raise ImageDecodeError("a.jpg: cannot decode")
    assert counter.as_dict()["samples"] == 0 and counter.fallbacks == 0
    with counts_held():
        with counts_held():
            counter.add("samples")
        assert counter.as_dict()["samples"] == 0  # held by the outer block
        counter.fallback("unusable", "b.jpg", "none usable")
    assert counter.as_dict() == {"samples": 1, "missing": 0, "unusable": 1, "mismatched": 0}


def test_bad_images_are_counted_once_across_workers_and_epochs(tmp_path):
    root, store = _folder_with_bad(tmp_path, n=12, bad=(2, 9))
    ds = ObjectCropDataset(root, store, size=16, seed=0, max_failure_rate=0.2)
    for epoch in range(2):
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                             multiprocessing_context="fork")
        shapes = [tuple(v.shape) for batch in loader for v in batch[0]]
        assert shapes == [(4, 3, 16, 16)] * 6  # 3 batches x 2 views: batch shapes hold
    assert ds.bad.count == 2 and ds.bad.indices() == [2, 9] and ds.bad.failed_reads == 4
    out = tmp_path / "run" / "bad_images.tsv"
    assert ds.write_bad_images(out) == 2
    lines = out.read_text().splitlines()
    assert lines[0] == "key\tpath\treason" and lines[1].startswith(f"002.jpg\t{root / '002.jpg'}\t")


def test_above_the_failure_rate_the_run_stops_naming_the_file(tmp_path):
    root, store = _folder_with_bad(tmp_path, n=10, bad=(3, 6))
    ds = ObjectCropDataset(root, store, size=16, seed=0, max_failure_rate=0.1)
    ds[3]  # one of ten is within 10%
    with pytest.raises(TooManyBadImagesError, match=r"2 of 10 images.*006\.jpg.*objcrop check"):
        ds[6]
    strict = ObjectCropDataset(root, store, size=16, seed=0, max_failure_rate=0.0)
    with pytest.raises(TooManyBadImagesError, match="003.jpg"):
        strict[3]


def test_bad_image_counter_pickles_as_a_copy_outside_workers():
    import pickle

    bad = BadImages(5, 0.5)
    bad.record(1, "x.jpg", "broken")
    copy = pickle.loads(pickle.dumps(bad))
    assert copy.indices() == [1] and copy.count == 1 and copy.max_failure_rate == 0.5
    with pytest.raises(ValueError, match="max_failure_rate"):
        BadImages(5, 1.5)


# ------------------------------------------------------------------- objcrop check

def test_check_lists_unreadable_missing_and_mismatched_images(tmp_path, capsys):
    root = tmp_path / "data"
    names = write_images(root, 5)
    corrupt(root / names[1])
    store = tmp_path / "p.objcrop"
    ProposalStore.write(store, [
        (names[0], [SQUARE], [1.0], (W, H)),
        (names[1], [SQUARE], [1.0], (W, H)),
        (names[2], [SQUARE], [1.0], (H, W)),  # transposed: an EXIF mismatch
        (names[3], [SQUARE], [1.0], (W // 2, H // 2)),  # the same aspect: fine
    ])  # names[4] has no entry
    before = snapshot(root)
    out = tmp_path / "bad.tsv"
    assert main(["check", str(root), "--proposals", str(store), "--out", str(out),
                 "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "3 of 5 images" in err and str(out) in err
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["key", "problem", "detail"]
    assert [r[:2] for r in rows[1:]] == [
        ["001.jpg", "unreadable"], ["002.jpg", "size_transposed"], ["004.jpg", "no_proposals"]]
    assert "EXIF" in rows[2][2]
    assert snapshot(root) == before

    clean = tmp_path / "clean"
    write_images(clean, 2)
    assert main(["check", str(clean), "--out", str(tmp_path / "none.tsv"), "--no-progress"]) == 0
    assert not (tmp_path / "none.tsv").exists()


def test_check_never_writes_its_list_over_what_it_reads_or_a_foreign_file(tmp_path, capsys):
    root = tmp_path / "data"
    names = write_images(root, 3)
    corrupt(root / names[0])
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    before, notes_before = snapshot(root), notes.read_bytes()
    # over an image of the folder it scans: refused even with --force
    assert main(["check", str(root), "--out", str(root / names[1]), "--no-progress",
                 "--force"]) == 2
    # over a file of another kind: refused, named, --force suggested
    assert main(["check", str(root), "--out", str(notes), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(notes) in err and "--force" in err
    assert snapshot(root) == before and notes.read_bytes() == notes_before
    # its own list is replaced on a rerun
    out = tmp_path / "bad.tsv"
    assert main(["check", str(root), "--out", str(out), "--no-progress"]) == 3
    assert main(["check", str(root), "--out", str(out), "--no-progress"]) == 3
    assert out.read_text().startswith("key\tproblem\tdetail\n")
    # the bad image removed: a clean rerun removes its stale list, never another file
    (root / names[0]).unlink()
    assert main(["check", str(root), "--out", str(out), "--no-progress"]) == 0
    assert not out.exists() and "removed the earlier list" in capsys.readouterr().out
    assert main(["check", str(root), "--out", str(notes), "--no-progress", "--force"]) == 0
    assert notes.read_bytes() == notes_before


def test_check_of_a_folder_without_images_is_an_error(tmp_path, capsys):
    """A wrong folder (or one of .heic files only) is not "all 0 images are readable"."""
    (tmp_path / "heic").mkdir()
    (tmp_path / "heic" / "a.heic").write_bytes(b"not listed")
    assert main(["check", str(tmp_path / "heic"), "--out", str(tmp_path / "b.tsv"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"no image under {tmp_path / 'heic'}" in err and ".jpg" in err and "Fix:" in err


# ------------------------------------------------------------------- objcrop train

def _train_recipe(tmp_path: Path, root: Path, store: Path, rate: float) -> Path:
    import yaml

    raw = {
        "data": {"train_path": str(root), "proposals": str(store), "num_workers": 0,
                 "max_failure_rate": rate},
        "crop": {"type": "object_aware", "views": "obj_obj_dilate", "size": 32},
        "method": {"name": "simclr", "params": {"proj_dim": 32}},
        "backbone": {"name": "test_efficientnet"},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "trainer": {"epochs": 1, "batch_size": 4, "accelerator": "cpu", "devices": 1,
                    "out_dir": str(tmp_path / "run"), "progress_bar": False},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_skips_a_corrupt_image_and_lists_it_beside_the_run(tmp_path):
    pytest.importorskip("lightly")
    pytest.importorskip("pytorch_lightning")
    pytest.importorskip("timm")
    from objcrop_plugin.train import load_recipe, train

    root, store = _folder_with_bad(tmp_path, n=8, bad=(5,))
    before = snapshot(root)
    res = train(load_recipe(_train_recipe(tmp_path, root, store, 0.2)), echo=lambda s: None)
    assert res["steps"] == 2 and res["bad_images"]["bad_images"] == 1
    listed = (tmp_path / "run" / "bad_images.tsv").read_text().splitlines()
    assert len(listed) == 2 and listed[1].startswith("005.jpg\t")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["bad_images"][
        "bad_images"] == 1
    assert snapshot(root) == before

    # the finished run rerun (nothing left to train) and extended: the checkpoint carries the
    # unreadable image, the list stays, and the rerun keeps the first session's timing
    again = train(load_recipe(_train_recipe(tmp_path, root, store, 0.2)), echo=lambda s: None)
    assert again["resumed_from"] and again["bad_images"] == res["bad_images"]
    assert {k: again[k] for k in ("train_seconds", "images_per_s", "final_loss")} == {
        k: res[k] for k in ("train_seconds", "images_per_s", "final_loss")}
    more = train(load_recipe(_train_recipe(tmp_path, root, store, 0.2), ["trainer.epochs=2"]),
                 echo=lambda s: None)
    assert more["steps"] == 4 and more["bad_images"]["bad_images"] == 1
    assert (tmp_path / "run" / "bad_images.tsv").read_text().splitlines() == listed

    # above the rate the run stops, naming the list
    (tmp_path / "run2").mkdir()
    path = _train_recipe(tmp_path / "run2", root, store, 0.0)
    with pytest.raises(TooManyBadImagesError, match="bad_images.tsv"):
        train(load_recipe(path), echo=lambda s: None)
    listed = (tmp_path / "run2" / "run" / "bad_images.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed[1:]] == ["005.jpg"]

    # the file replaced, a fresh run: no list is left that its counts contradict
    shutil.copyfile(root / "004.jpg", root / "005.jpg")
    fresh = train(load_recipe(_train_recipe(tmp_path, root, store, 0.2),
                              ["trainer.resume=never"]), echo=lambda s: None)
    assert fresh["bad_images"]["bad_images"] == 0
    assert not (tmp_path / "run" / "bad_images.tsv").exists()


def test_recipe_refuses_a_failure_rate_outside_zero_one(tmp_path):
    from objcrop_plugin.train import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="data.max_failure_rate"):
        parse_recipe({"data": {"train_path": "x", "max_failure_rate": 1.5}, "crop": "scene"})
    cfg = parse_recipe({"data": {"train_path": "x"}, "crop": "scene"})
    assert cfg.data.max_failure_rate == 0.01


def test_view_engine_scene_recipe_ignores_sizes(tmp_path, caplog):
    # a scene-only recipe never looks at proposals, mismatched or not
    from objcrop_plugin.proposals import Proposals

    engine = ViewEngine("scene_scene", photometrics="none", size=16)
    turned = Proposals(np.array([SQUARE], np.float32), np.array([1.0], np.float32), (H, W))
    with caplog.at_level(logging.INFO, logger="objcrop_plugin"):
        windows = engine.windows((W, H), lambda _size: turned, np.random.default_rng(0), "a.jpg")
    assert [w.policy for w in windows] == ["scene", "scene"]
    assert not any(w.fallback for w in windows)
    assert engine.recipe.fallbacks.as_dict()["mismatched"] == 0 and "mismatched" not in caplog.text


# ------------------------------------------------------------ 16-bit images: bit depth

def gray_scene() -> np.ndarray:
    """The scene in 8-bit gray with every value 0..255 present (a gradient in the corner)."""
    arr = np.asarray(scene().convert("L")).copy()
    arr[:16, :16] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return arr


def decoded(path: Path) -> np.ndarray:
    from objcrop_plugin.images import load_rgb

    return np.asarray(load_rgb(open_image(path)))


@pytest.mark.parametrize(("factor", "bits"), [(1, 8), (4, 10), (16, 12), (257, 16)])
def test_a_16_bit_png_is_scaled_from_the_bit_depth_its_values_fill(tmp_path, factor, bits):
    """8-bit data in a 16-bit PNG stays as it is (PIL's own conversion does so too), 10- and
    12-bit sensor data map their top value to 255, full-range data divides by 257."""
    gray = gray_scene().astype(np.uint16)
    top = (1 << bits) - 1
    data = np.minimum(gray * factor, top)
    Image.fromarray(data).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = decoded(tmp_path / "deep.png")
    expect = np.floor(data.astype(np.float64) * 255 / top + 0.5).astype(np.uint8)
    assert (rgb == expect[..., None]).all()
    assert rgb.max() >= 254  # never black or dim
    if factor in (1, 257):  # the same pixels as the 8-bit image
        Image.fromarray(gray_scene()).save(tmp_path / "l8.png")
        assert (rgb == decoded(tmp_path / "l8.png")).all()


def test_the_png_sbit_chunk_sets_the_bit_depth(tmp_path):
    from PIL import PngImagePlugin

    from objcrop_plugin.images import png_significant_bits

    data = np.full((8, 8), 1000, np.uint16)  # a dark 12-bit image: its values fit 10 bits
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12]))
    Image.fromarray(data).save(tmp_path / "sbit.png", pnginfo=info)
    Image.fromarray(data).save(tmp_path / "plain.png")
    assert png_significant_bits(tmp_path / "sbit.png") == 12
    assert png_significant_bits(tmp_path / "plain.png") is None
    assert decoded(tmp_path / "sbit.png").max() == round(1000 * 255 / 4095)  # 62: dark
    assert decoded(tmp_path / "plain.png").max() == round(1000 * 255 / 1023)  # 249
    (tmp_path / "x.jpg").write_bytes(b"not a png")
    assert png_significant_bits(tmp_path / "x.jpg") is None


def test_proposals_and_training_views_decode_a_16_bit_png_alike(tmp_path):
    """The proposal build and the view engines use the one conversion: a 16-bit PNG holding
    8-bit values gets the boxes of its 8-bit twin, and the same pixels on both paths."""
    pytest.importorskip("cv2")
    from objcrop_plugin.images import decode_planned, load_rgb
    from objcrop_plugin.proposals.build import build_store, decode_working
    from objcrop_plugin.proposals.generators import working_resize

    root = tmp_path / "imgs"
    root.mkdir()
    gray = gray_scene()
    Image.fromarray(gray.astype(np.uint16)).save(root / "i16.png")
    Image.fromarray(gray).save(root / "l8.png")
    build_store(root, tmp_path / "p.objcrop", "graph_segments", workers=1, progress=False)
    store = ProposalStore(tmp_path / "p.objcrop")
    assert len(store["i16.png"].boxes) > 0
    np.testing.assert_array_equal(store["i16.png"].boxes, store["l8.png"].boxes)
    path = root / "i16.png"
    view_pixels, size, _ = decode_planned(path, lambda s: (None, [(0, 0, *s)], [s[::-1]]))
    np.testing.assert_array_equal(np.asarray(view_pixels), np.asarray(load_rgb(open_image(path))))
    work, _ = decode_working(root, "i16.png", max_side=64)
    np.testing.assert_array_equal(work, working_resize(Image.open(root / "l8.png"), 64))
    # a 16-bit image handed to a generator directly is scaled, not clipped to white
    np.testing.assert_array_equal(working_resize(Image.open(path), 64), work)
