"""The memory-mapped proposal store: round trip, lookup, corruption, pickling, atomic writes."""

import ast
import inspect
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from objcrop_plugin.proposals import store as store_module
from objcrop_plugin.proposals.store import (
    MissingProposalsError,
    ProposalRecord,
    ProposalStore,
    ProposalStoreWriter,
    StoreFormatError,
    normalize_key,
)

UNICODE_KEYS = ["图片/猫.jpg", "café/crème brûlée.png", "emoji/🦊 fox.jpeg", "ñandú/Ärger ß.JPG"]


def _records(n, seed=0):
    """n records with random boxes and sizes; one image with 0 boxes, one without scores."""
    rng = np.random.default_rng(seed)
    keys = [f"train/{i:06d}.jpg" for i in range(n - len(UNICODE_KEYS))] + UNICODE_KEYS
    out = []
    for i, key in enumerate(keys):
        size = (int(rng.integers(16, 4000)), int(rng.integers(16, 4000)))
        k = 0 if i == 3 else int(rng.integers(1, 12))
        xy = rng.uniform(0, 1, size=(k, 2)) * size
        boxes = np.concatenate([xy, xy + rng.uniform(1, 300, size=(k, 2))], axis=1)
        scores = None if i == 5 else rng.uniform(0, 1, size=k)
        out.append((key, boxes, scores, size))
    return out


def _assert_record_equal(got, key, boxes, scores, size):
    assert got is not None, key
    assert got.image_size == tuple(size)
    np.testing.assert_array_equal(got.boxes, np.asarray(boxes, np.float32).reshape(-1, 4))
    if scores is None:
        assert np.isnan(got.scores).all() and len(got.scores) == len(got.boxes)
    else:
        np.testing.assert_array_equal(got.scores, np.asarray(scores, np.float32))


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "props.objcrop"
    records = _records(300)
    ProposalStore.write(path, records, meta={"generator": "test"})
    return path, records


def test_round_trip_every_key(written):
    path, records = written
    store = ProposalStore(path)
    assert len(store) == len(records)
    assert list(store) == [r[0] for r in records]  # iteration keeps the written order
    assert store.n_boxes == sum(len(r[1]) for r in records)
    assert store.meta == {"generator": "test"}
    for key, boxes, scores, size in records:
        assert key in store
        _assert_record_equal(store.lookup(key), key, boxes, scores, size)
        _assert_record_equal(store[key], key, boxes, scores, size)
        _assert_record_equal(store.get(key), key, boxes, scores, size)
    assert store["train/000003.jpg"].boxes.shape == (0, 4)  # an image with no boxes is stored
    assert "train/999999.jpg" not in store and 42 not in store
    for rec, (key, boxes, _, size) in zip(store.records(), records, strict=True):
        assert isinstance(rec, ProposalRecord) and rec.key == key and rec.image_size == size
        np.testing.assert_array_equal(rec.boxes, np.asarray(boxes, np.float32).reshape(-1, 4))


def test_empty_store_round_trips(tmp_path):
    path = tmp_path / "empty.objcrop"
    ProposalStore.write(path, [])
    store = ProposalStore(path)
    assert len(store) == 0 and list(store) == [] and store.lookup("a.jpg") is None
    # images whose proposal generator found nothing: an empty boxes section
    ProposalStore.write(path, [("a.jpg", [], None, (10, 10)), ("b.jpg", [], [], (20, 10))])
    store = ProposalStore(path)
    assert store.n_boxes == 0 and list(store) == ["a.jpg", "b.jpg"]
    assert store["b.jpg"].boxes.shape == (0, 4) and store["b.jpg"].image_size == (20, 10)


def test_missing_key(written):
    path, _ = written
    store = ProposalStore(path)
    assert store.lookup("train/nope.jpg") is None
    with pytest.raises(MissingProposalsError) as info:
        store["train/nope.jpg"]
    assert "train/nope.jpg" in str(info.value) and str(path) in str(info.value)
    assert isinstance(info.value, KeyError)
    strict = ProposalStore(path, strict=True)
    with pytest.raises(MissingProposalsError) as info:
        strict.lookup("val/other.jpg")
    assert "val/other.jpg" in str(info.value) and str(path) in str(info.value)


def test_lookup_rescales_to_the_decoded_image(tmp_path):
    path = tmp_path / "p.objcrop"
    ProposalStore.write(path, [("a.jpg", [[10, 5, 50, 25]], [0.5], (100, 50))])
    store = ProposalStore(path)
    got = store.lookup("a.jpg", image_size=(200, 150))
    assert got.image_size == (200, 150)
    np.testing.assert_allclose(got.boxes, [[20.0, 15.0, 100.0, 75.0]])
    np.testing.assert_array_equal(got.scores, np.float32([0.5]))
    same = store.lookup("a.jpg", image_size=(100, 50))
    np.testing.assert_array_equal(same.boxes, [[10.0, 5.0, 50.0, 25.0]])
    np.testing.assert_array_equal(store.lookup("a.jpg").boxes, [[10.0, 5.0, 50.0, 25.0]])


def test_normalize_key():
    assert normalize_key("train\\sub\\001.jpg") == "train/sub/001.jpg"
    assert normalize_key("./train/001.jpg") == "train/001.jpg"
    assert normalize_key(".\\train\\001.jpg") == "train/001.jpg"
    assert normalize_key("train//a/../001.jpg") == "train/001.jpg"
    assert normalize_key("/data/coco/train/001.jpg", root="/data/coco") == "train/001.jpg"
    assert normalize_key("/data/coco/train/001.jpg", root="/data/coco/") == "train/001.jpg"


def test_lookup_normalizes_keys(tmp_path):
    path = tmp_path / "p.objcrop"
    ProposalStore.write(path, [(".\\train\\001.jpg", [[1, 2, 3, 4]], None, (10, 10))])
    store = ProposalStore(path)
    assert list(store) == ["train/001.jpg"]
    for k in ("train/001.jpg", "./train/001.jpg", "train\\001.jpg"):
        assert k in store and store.lookup(k) is not None


def test_lookup_matches_a_name_in_either_unicode_normal_form(tmp_path):
    """`café.jpg` composed (NFC, as annotation files write it) and decomposed (NFD, as files
    copied from macOS are named) is one image to a lookup; an exact match wins."""
    nfc, nfd = "photos/caf\u00e9.jpg", "photos/cafe\u0301.jpg"
    path = tmp_path / "p.objcrop"
    ProposalStore.write(path, [(nfc, [[1, 2, 3, 4]], None, (10, 10))])
    store = ProposalStore(path)
    for key in (nfc, nfd):
        assert key in store and store.get(key) is not None and store.lookup(key) is not None
        assert store[key].boxes.tolist() == [[1, 2, 3, 4]]
    assert "photos/cafe.jpg" not in store
    both = tmp_path / "both.objcrop"  # two files whose names differ only so: each its own
    ProposalStore.write(both, [(nfc, [[1, 2, 3, 4]], None, (10, 10)),
                               (nfd, [[5, 6, 7, 8]], None, (10, 10))])
    store = ProposalStore(both)
    assert store[nfc].boxes.tolist() == [[1, 2, 3, 4]] and store[nfd].boxes.tolist() == [[5, 6, 7, 8]]


def test_duplicate_keys_are_rejected(tmp_path):
    path = tmp_path / "p.objcrop"
    with pytest.raises(ValueError, match="duplicate key 'a/b.jpg'"):
        ProposalStore.write(
            path, [("a/b.jpg", [], None, (10, 10)), ("./a\\b.jpg", [], None, (10, 10))]
        )
    assert not path.exists()


def test_bad_records_are_rejected_with_the_key(tmp_path):
    w = ProposalStoreWriter(tmp_path / "p.objcrop")
    with pytest.raises(ValueError, match="k1.jpg"):
        w.add("k1.jpg", [[1, 2, 3]], None, (10, 10))
    with pytest.raises(ValueError, match="k2.jpg: 2 boxes but 1 scores"):
        w.add("k2.jpg", [[1, 2, 3, 4], [1, 2, 3, 4]], [0.5], (10, 10))
    with pytest.raises(ValueError, match="k3.jpg"):
        w.add("k3.jpg", [[1, 2, 3, 4]], None, (0, 10))
    with pytest.raises(ValueError, match="non-empty string"):
        w.add("", [[1, 2, 3, 4]], None, (10, 10))
    # records passed as ProposalRecord are checked and normalised the same way
    from objcrop_plugin.boxes import ImageSize
    from objcrop_plugin.proposals.store import ProposalRecord

    with pytest.raises(ValueError, match="k4.jpg: 2 boxes but 1 scores"):
        w.add_record(ProposalRecord("k4.jpg", np.zeros((2, 4), np.float32),
                                    np.zeros(1, np.float32), ImageSize(10, 10)))
    ProposalStore.write(tmp_path / "n.objcrop", [ProposalRecord(
        "./sub/b.jpg", np.array([[1, 2, 5, 6]], np.float32), np.ones(1, np.float32),
        ImageSize(10, 10))])
    assert list(ProposalStore(tmp_path / "n.objcrop")) == ["sub/b.jpg"]


def test_a_close_that_failed_can_be_retried(tmp_path, monkeypatch):
    from objcrop_plugin.proposals import store as store_mod

    w = ProposalStoreWriter(tmp_path / "p.objcrop")
    w.add("a.jpg", [[1, 2, 3, 4]], [0.5], (10, 10))
    real = store_mod._write_sections

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod, "_write_sections", full_disk)
    with pytest.raises(OSError, match="No space"):
        w.close()
    assert not (tmp_path / "p.objcrop").exists()
    monkeypatch.setattr(store_mod, "_write_sections", real)
    w.close()  # space freed: the same records are written
    assert ProposalStore(tmp_path / "p.objcrop")["a.jpg"].boxes.tolist() == [[1, 2, 3, 4]]


# ----------------------------------------------------------------------------- bad files


def _corrupt_at(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _header(path):
    raw = path.read_bytes()
    _, _, hlen, _, _ = struct.unpack_from("<8sIIII", raw, 0)
    return json.loads(raw[24 : 24 + hlen])


@pytest.mark.parametrize("keep", [0, 10, 30, 200, "half", "minus1"])
def test_truncated_file_is_a_format_error(written, keep):
    path, _ = written
    raw = path.read_bytes()
    n = {"half": len(raw) // 2, "minus1": len(raw) - 1}.get(keep, keep)
    path.write_bytes(raw[:n])
    with pytest.raises(StoreFormatError) as info:
        ProposalStore(path)
    assert str(path) in str(info.value)


def test_flipped_bytes_in_boxes_section_are_detected(written):
    path, _ = written
    section = _header(path)["sections"]["boxes"]
    _corrupt_at(path, section["offset"] + 37)
    with pytest.raises(StoreFormatError, match="'boxes' is corrupted") as info:
        ProposalStore(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("offset", [0, 9, 13, 18, 30, 100])
def test_flipped_header_bytes_are_detected(written, offset):
    path, _ = written
    _corrupt_at(path, offset)
    with pytest.raises(StoreFormatError) as info:
        ProposalStore(path)
    assert str(path) in str(info.value)


def test_zero_byte_and_foreign_files_are_format_errors(tmp_path):
    empty = tmp_path / "empty.objcrop"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.objcrop"
    foreign.write_bytes(np.random.default_rng(0).bytes(4096))
    text = tmp_path / "boxes.json"
    text.write_text(json.dumps({"key": "a.jpg", "boxes": [[1, 2, 3, 4]]}))
    for path, why in (
        (empty, "too short"),
        (foreign, "not an objcrop proposal store"),
        (text, "not an objcrop proposal store"),
    ):
        with pytest.raises(StoreFormatError, match=why) as info:
            ProposalStore(path)
        assert str(path) in str(info.value) and "Fix" in str(info.value)
    with pytest.raises(FileNotFoundError, match="nothere"):
        ProposalStore(tmp_path / "nothere.objcrop")


def test_no_pickle_magic_and_json_header(written):
    path, records = written
    tree = ast.parse(inspect.getsource(store_module))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"pickle", "cPickle", "dill", "cloudpickle", "joblib"}
    raw = path.read_bytes()
    assert raw[:8] == b"OBJCROPS"
    head = _header(path)
    assert head["format"] == "objcrop-proposals"
    assert head["n_images"] == len(records)
    assert head["file_size"] == len(raw)
    assert all(not s["dtype"].startswith("|O") for s in head["sections"].values())


# ----------------------------------------------------------------------------- pickling


def test_pickle_is_small_and_reopens_the_same_store(tmp_path):
    small, big = tmp_path / "small.objcrop", tmp_path / "big.objcrop"
    ProposalStore.write(small, _records(10))
    big_records = _records(3000, seed=1)
    ProposalStore.write(big, big_records)
    assert big.stat().st_size > 100_000
    payloads = [pickle.dumps(ProposalStore(p)) for p in (small, big)]
    assert all(len(p) < 1024 for p in payloads)
    copy = pickle.loads(payloads[1])
    assert len(copy) == len(big_records)
    for key, boxes, scores, size in big_records[::97]:
        _assert_record_equal(copy.lookup(key), key, boxes, scores, size)
    assert pickle.loads(pickle.dumps(ProposalStore(big, strict=True))).strict


@pytest.mark.parametrize("change", ["other_keys", "same_keys_other_boxes"])
def test_unpickling_after_the_file_was_replaced_is_an_error(tmp_path, change):
    path = tmp_path / "p.objcrop"
    records = _records(50)
    ProposalStore.write(path, records)
    payload = pickle.dumps(ProposalStore(path))
    if change == "other_keys":
        ProposalStore.write(path, _records(60, seed=3))
    else:  # a rebuild with another generator: same keys and box counts, other boxes
        ProposalStore.write(path, [(k, b + 1.0, s, sz) for k, b, s, sz in records])
    with pytest.raises(StoreFormatError, match="changed on disk") as info:
        pickle.loads(payload)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_existing_store_and_no_temp_files(written):
    path, records = written
    before = path.read_bytes()
    with pytest.raises(ValueError, match="bad.jpg"), ProposalStoreWriter(path) as writer:
        writer.add("good.jpg", [[1, 2, 3, 4]], [0.5], (10, 10))
        writer.add("bad.jpg", [[1, 2, 3]], None, (10, 10))  # raises mid-way
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]

    def records_then_crash():
        yield from records[:10]
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        ProposalStore.write(path, records_then_crash())
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]
    assert len(ProposalStore(path)) == len(records)


def test_crash_while_writing_the_file_removes_the_temp_file(written, monkeypatch):
    path, records = written
    before = path.read_bytes()

    def disk_gone(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(store_module.os, "fsync", disk_gone)
    with pytest.raises(OSError, match="disk gone"):
        ProposalStore.write(path, records[:5])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


def test_writer_close_writes_and_is_idempotent(tmp_path):
    path = tmp_path / "sub" / "p.objcrop"  # missing folders are created
    writer = ProposalStoreWriter(path)
    writer.add("a.jpg", [[1, 2, 3, 4]], [0.5], (10, 10))
    assert len(writer) == 1 and not path.exists()
    writer.close()
    written = path.read_bytes(), path.stat().st_mtime_ns
    writer.close()
    assert (path.read_bytes(), path.stat().st_mtime_ns) == written
    got = ProposalStore(path).lookup("a.jpg")
    assert got.boxes.tolist() == [[1, 2, 3, 4]] and got.scores.tolist() == [0.5]
    assert tuple(got.image_size) == (10, 10)
    assert os.listdir(path.parent) == [path.name]


# ----------------------------------------------------------------------------- workers


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store, keys):
        self.store, self.keys = store, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        p = self.store.lookup(self.keys[i])
        return i, torch.from_numpy(np.array(p.boxes)), torch.from_numpy(np.array(p.scores))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_store_is_read_by_dataloader_workers(written, context):
    path, records = written
    keys = [r[0] for r in records][::7]
    loader = torch.utils.data.DataLoader(
        _StoreDataset(ProposalStore(path), keys),
        batch_size=None,
        num_workers=2,
        multiprocessing_context=context,
    )
    seen = 0
    for i, boxes, scores in loader:
        key, want_boxes, want_scores, _ = records[[r[0] for r in records].index(keys[i])]
        np.testing.assert_array_equal(
            boxes.numpy(), np.asarray(want_boxes, np.float32).reshape(-1, 4)
        )
        if want_scores is not None:
            np.testing.assert_array_equal(scores.numpy(), np.asarray(want_scores, np.float32))
        seen += 1
    assert seen == len(keys)


def test_lookup_after_close_is_a_clear_error(tmp_path):
    ProposalStore.write(tmp_path / "s.objcrop", [("a.jpg", [[0, 0, 4, 4]], [1.0], (8, 8))])
    store = ProposalStore(tmp_path / "s.objcrop")
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.lookup("a.jpg")


def test_a_missing_store_or_a_folder_says_which(tmp_path):
    with pytest.raises(FileNotFoundError, match="proposal store not found: .*nope.objcrop"):
        ProposalStore(tmp_path / "nope.objcrop")
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a proposal store .*Fix: "
                                                r"`objcrop proposals build .* -o STORE\.objcrop`"):
        ProposalStore(tmp_path)
