"""COCO JSON and OpenImages CSV importers: exact boxes, empty images, crowds, detection results,
EXIF-rotated sizes, and errors that name the file, the entry and the fix."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from objcrop_plugin.proposals.importer_base import ProposalImporter, make_importer
from objcrop_plugin.proposals.importers import (
    CocoImporter,
    OpenImagesImporter,
    coco_labels,
    import_to_store,
)
from objcrop_plugin.proposals.store import ProposalStore
from objcrop_plugin.registry import list_proposal_sources, load_proposal_source


def _coco(**overrides):
    data = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 640, "height": 480},
            {"id": 3, "file_name": "b.jpg", "width": 100, "height": 200},  # no annotations
            {"id": 9, "file_name": "c.jpg", "width": 50, "height": 60},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "bbox": [10, 20, 30, 40], "category_id": 1, "iscrowd": 0},
            {"id": 2, "image_id": 9, "bbox": [1.5, 2.25, 3, 4], "category_id": 2, "iscrowd": 0},
            {"id": 3, "image_id": 7, "bbox": [0, 0, 640, 480], "category_id": 2, "iscrowd": 1},
            {"id": 4, "image_id": 7, "bbox": [100, 50, 0.5, 8], "category_id": 3},  # no iscrowd
        ],
        "categories": [
            {"id": 3, "name": "three"}, {"id": 1, "name": "one"}, {"id": 2, "name": "two"},
        ],
    }
    data.update(overrides)
    return data


def _write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _by_key(records):
    return {r.key: r for r in records}


# -- COCO ground truth ---------------------------------------------------------------------------
def test_coco_ground_truth_boxes_keys_sizes_and_empty_images(tmp_path):
    path = _write(tmp_path / "ann.json", _coco())
    imp = CocoImporter(path, key_prefix="train2017/")
    assert imp.kind == "importer"
    recs = list(imp.records())
    # one record per image, in the order of `images`, including the image without annotations
    assert [r.key for r in recs] == ["train2017/a.jpg", "train2017/b.jpg", "train2017/c.jpg"]
    a, b, c = recs
    assert a.image_size == (640, 480) and b.image_size == (100, 200) and c.image_size == (50, 60)
    # xywh -> xyxy, file order kept (all ground truth scores are 1.0), crowd dropped
    np.testing.assert_array_equal(a.boxes, [[10, 20, 40, 60], [100, 50, 100.5, 58]])
    np.testing.assert_array_equal(a.scores, [1.0, 1.0])
    assert b.boxes.shape == (0, 4) and b.scores.shape == (0,)
    np.testing.assert_array_equal(c.boxes, [[1.5, 2.25, 4.5, 6.25]])


def test_a_key_prefix_without_its_slash_is_warned_about(tmp_path, caplog):
    """Keys are plain concatenations: `--key-prefix train2017` makes `train2017a.jpg`."""
    path = _write(tmp_path / "ann.json", _coco())
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        keys = [r.key for r in CocoImporter(path, key_prefix="train2017").records()]
        labels = coco_labels(path, "train2017")[0]
    assert keys == labels == ["train2017a.jpg", "train2017b.jpg", "train2017c.jpg"]
    warned = [r.getMessage() for r in caplog.records if "trailing '/'" in r.getMessage()]
    assert len(warned) == 2 and "'train2017a.jpg'" in warned[0] and "'train2017/'" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="objcrop_plugin"):
        list(CocoImporter(path, key_prefix="train2017/").records())
        list(CocoImporter(path).records())
    assert not caplog.records


def test_coco_crowd_is_kept_on_request(tmp_path):
    path = _write(tmp_path / "ann.json", _coco())
    a = next(CocoImporter(path, include_crowd=True).records())
    assert a.key == "a.jpg"
    np.testing.assert_array_equal(
        a.boxes, [[10, 20, 40, 60], [0, 0, 640, 480], [100, 50, 100.5, 58]]
    )


def test_coco_images_root_finds_a_name_stored_in_the_other_unicode_form(tmp_path):
    """The annotations write `café.jpg` composed; the file on disk is named decomposed."""
    data = _coco(images=[{"id": 7, "file_name": "caf\u00e9.jpg", "width": 640, "height": 480}],
                 annotations=[])
    path = _write(tmp_path / "ann.json", data)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (640, 480)).save(tmp_path / "imgs" / "cafe\u0301.jpg")
    importer = CocoImporter(path, images_root=tmp_path / "imgs")
    assert [r.key for r in importer.records()] == ["caf\u00e9.jpg"] and importer.missing == []


def test_coco_images_root_finds_a_name_written_with_backslashes(tmp_path):
    """A COCO file written on Windows names `sub\\a.jpg`: the store's key is `sub/a.jpg`,
    and that file is what --images-root must find (it was skipped as missing)."""
    data = _coco(images=[{"id": 7, "file_name": "sub\\a.jpg", "width": 64, "height": 48}],
                 annotations=[])
    path = _write(tmp_path / "ann.json", data)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(tmp_path / "imgs" / "sub" / "a.jpg")
    importer = CocoImporter(path, images_root=tmp_path / "imgs")
    assert [r.key for r in importer.records()] == ["sub/a.jpg"] and importer.missing == []
    data["categories"] = [{"id": 1, "name": "x"}]
    keys, _, _ = coco_labels(_write(tmp_path / "labels.json", data))  # the evaluation's keys
    assert keys == ["sub/a.jpg"]


def test_coco_annotation_scores_are_used_and_sorted(tmp_path):
    data = _coco()
    data["annotations"][0]["score"] = 0.2
    data["annotations"][3]["score"] = 0.9
    path = _write(tmp_path / "ann.json", data)
    a = next(CocoImporter(path).records())
    np.testing.assert_array_equal(a.boxes, [[100, 50, 100.5, 58], [10, 20, 40, 60]])
    np.testing.assert_allclose(a.scores, [0.9, 0.2])
    a = next(CocoImporter(path, min_score=0.5).records())
    np.testing.assert_array_equal(a.boxes, [[100, 50, 100.5, 58]])


def test_coco_images_root_skips_and_lists_missing_files(tmp_path, caplog):
    path = _write(tmp_path / "ann.json", _coco())
    root = tmp_path / "root"
    (root / "train2017").mkdir(parents=True)
    (root / "train2017" / "a.jpg").write_bytes(b"x")
    (root / "train2017" / "c.jpg").write_bytes(b"x")
    imp = CocoImporter(path, images_root=root, key_prefix="train2017/")
    with caplog.at_level(logging.WARNING):
        keys = [r.key for r in imp.records()]
    assert keys == ["train2017/a.jpg", "train2017/c.jpg"]
    assert imp.missing == ["train2017/b.jpg"]
    assert "1 of 3 images" in caplog.text and "train2017/b.jpg" in caplog.text


# -- COCO detection results ----------------------------------------------------------------------
def test_coco_results_need_images_json_and_explain_the_fix(tmp_path):
    res = _write(tmp_path / "dets.json", [{"image_id": 7, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(ValueError, match=r"--images-json \(objcrop proposals import-coco\), "
                                         r"--gt-images-json \(proposals eval\), images_json= "
                                         r"\(Python\)") as info:
        CocoImporter(res)
    assert str(res) in str(info.value)


def test_coco_results_sorted_best_first_with_min_score(tmp_path):
    ann = _write(tmp_path / "ann.json", _coco())
    dets = [
        {"image_id": 7, "bbox": [0, 0, 10, 10], "score": 0.3, "category_id": 1},
        {"image_id": 9, "bbox": [1, 1, 2, 2], "score": 0.05, "category_id": 1},
        {"image_id": 7, "bbox": [5, 5, 10, 20], "score": 0.9, "category_id": 2},
        {"image_id": 7, "bbox": [1, 2, 3, 4], "score": 0.3, "category_id": 1},  # tie: file order
    ]
    res = _write(tmp_path / "dets.json", dets)
    recs = _by_key(CocoImporter(res, images_json=ann, key_prefix="val/").records())
    assert list(recs) == ["val/a.jpg", "val/b.jpg", "val/c.jpg"]
    a = recs["val/a.jpg"]
    np.testing.assert_array_equal(a.boxes, [[5, 5, 15, 25], [0, 0, 10, 10], [1, 2, 4, 6]])
    np.testing.assert_allclose(a.scores, [0.9, 0.3, 0.3])
    assert a.image_size == (640, 480)
    assert len(recs["val/b.jpg"].boxes) == 0
    np.testing.assert_array_equal(recs["val/c.jpg"].boxes, [[1, 1, 3, 3]])

    recs = _by_key(CocoImporter(res, images_json=ann, min_score=0.1).records())
    assert len(recs["c.jpg"].boxes) == 0 and len(recs["a.jpg"].boxes) == 3


def test_import_to_store_writes_atomically_with_source_meta(tmp_path):
    ann = _write(tmp_path / "ann.json", _coco())
    out = tmp_path / "gt.objcrop"
    assert import_to_store(CocoImporter(ann, key_prefix="t/"), out, meta={"note": "x"}) == 3
    store = ProposalStore(out)
    assert list(store) == ["t/a.jpg", "t/b.jpg", "t/c.jpg"]
    np.testing.assert_array_equal(store["t/c.jpg"].boxes, [[1.5, 2.25, 4.5, 6.25]])
    assert store.meta["source"] == "coco" and store.meta["note"] == "x"
    assert store.meta["path"] == str(ann)

    # a failing import leaves the existing store untouched
    bad = _write(tmp_path / "bad.json", _coco(annotations=[{"image_id": 7, "bbox": [1, 2]}]))
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"bad\.json: annotations\[0\].*\(4 numbers\)"):
        import_to_store(CocoImporter(bad), out)
    assert out.read_bytes() == before


# -- COCO errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "where", "why"),
    [
        (_coco(annotations=[{"id": 5, "image_id": 7, "bbox": [1, 2, 3]}]),
         "annotations[0]", "4 numbers"),
        (_coco(annotations=[{"id": 1, "image_id": 7, "bbox": [1, 2, 3, 4]},
                            {"id": 5, "image_id": 7, "bbox": [1, 2, 3, 4, 5]}]),
         "annotations[1]", "4 numbers"),
        (_coco(annotations=[{"id": 5, "image_id": 7, "bbox": [1, 2, -3, 4]}]),
         "annotations[0]", ">= 0"),
        (_coco(annotations=[{"id": 5, "image_id": 7, "bbox": [1, "2", 3, 4]}]),
         "annotations[0]", "finite numbers"),
        (_coco(annotations=[{"id": 5, "image_id": 7}]), "annotations[0]", "'bbox'"),
        (_coco(annotations=[{"id": 5, "bbox": [1, 2, 3, 4]}]), "annotations[0]", "'image_id'"),
        (_coco(annotations=[{"id": 5, "image_id": 42, "bbox": [1, 2, 3, 4]}]),
         "annotations[0]", "image_id 42"),
        (_coco(annotations=["nope"]), "annotations[0]", "not a JSON object"),
        (_coco(images=[{"id": 1, "file_name": "a.jpg", "width": 3}]), "images[0]", "'height'"),
        (_coco(images=[{"id": 1, "file_name": "a.jpg", "width": 3, "height": 0}]),
         "images[0]", "positive integers"),
        (_coco(images=[{"id": 1, "file_name": "a.jpg", "width": 3, "height": 4},
                       {"id": 1, "file_name": "b.jpg", "width": 3, "height": 4}]),
         "images[1]", "listed twice"),
        (_coco(images=[{"id": 1, "file_name": "a.jpg", "width": 3, "height": 4},
                       {"id": 2, "file_name": "a.jpg", "width": 3, "height": 4}]),
         "images[1]", "listed twice"),
        ({"annotations": []}, "", "no 'images'"),
    ],
)
def test_coco_errors_name_the_file_and_entry(tmp_path, data, where, why):
    path = _write(tmp_path / "ann.json", data)
    with pytest.raises(ValueError) as info:
        list(CocoImporter(path).records())
    msg = str(info.value)
    assert str(path) in msg and where in msg and why in msg, msg
    assert "Fix" in msg or "must" in msg


def _one_image(**fields):
    return _coco(images=[{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48, **fields}],
                 annotations=[])


@pytest.mark.parametrize(
    ("data", "where", "why"),
    [
        # Python's json writes these as bare Infinity / NaN, which json.load reads back
        (_one_image(width=float("inf")), "images[0] (id 1, a.jpg)", "width/height inf/48"),
        (_one_image(height=float("nan")), "images[0] (id 1, a.jpg)", "width/height 64/nan"),
        (_one_image(width=3e9), "images[0] (id 1, a.jpg)", "at most 2147483647"),
        (_one_image(width=10.5), "images[0] (id 1, a.jpg)", "positive integers"),
        (_one_image(id=[1]), "images[0]", "has id [1]; an image id must be an integer"),
        (_one_image(id={"a": 1}), "images[0]", "an image id must be an integer or a string"),
        (_one_image(id=1.5), "images[0]", "an image id must be an integer or a string"),
        (_coco(images=[{"id": 1, "file_name": "a.jpg", "width": 3, "height": 4}],
               annotations=[{"id": 8, "image_id": [1], "bbox": [1, 2, 3, 4]}]),
         "annotations[0] (id 8)", "image_id [1]"),
    ],
)
def test_coco_sizes_and_ids_of_the_wrong_type_are_one_line_errors(tmp_path, data, where, why,
                                                                   capsys):
    from objcrop_plugin.cli import main

    path = _write(tmp_path / "ann.json", data)
    with pytest.raises(ValueError) as info:
        list(CocoImporter(path).records())
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and where in msg and why in msg, msg
    # the command: exit 2, one line naming the file and the entry, no traceback, no store
    out = tmp_path / "out.objcrop"
    assert main(["proposals", "import-coco", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("objcrop: error: ") and err.count("\n") == 1 and where in err, err
    assert not out.exists()


@pytest.mark.parametrize(("flag", "kept"), [("0", True), ("1", False), (" 1 ", False), (0, True),
                                            (1, False), (False, True), (True, False),
                                            (0.0, True)])
def test_coco_iscrowd_as_a_string_or_number_is_read_as_its_value(tmp_path, flag, kept):
    ann = {"id": 5, "image_id": 1, "bbox": [2, 4, 10, 20], "category_id": 1, "iscrowd": flag}
    path = _write(tmp_path / "ann.json", _coco(
        images=[{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}], annotations=[ann]))
    (rec,) = CocoImporter(path).records()
    assert len(rec.boxes) == (1 if kept else 0)
    (rec,) = CocoImporter(path, include_crowd=True).records()
    assert rec.boxes.tolist() == [[2, 4, 12, 24]]
    assert coco_labels(path, include_crowd=False)[1].sum() == (1 if kept else 0)


@pytest.mark.parametrize("flag", ["yes", "true", "", 2, -1, 0.5, None, [0], {"v": 0}])
def test_coco_iscrowd_of_another_value_names_the_file_and_annotation(tmp_path, flag):
    ann = {"id": 5, "image_id": 1, "bbox": [2, 4, 10, 20], "category_id": 1, "iscrowd": flag}
    path = _write(tmp_path / "ann.json", _coco(
        images=[{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
        annotations=[{**ann, "id": 4, "iscrowd": 0}, ann]))
    with pytest.raises(ValueError) as info:
        list(CocoImporter(path).records())
    msg = str(info.value)
    assert msg.startswith(f"{path}: annotations[1] (id 5, image_id 1) has iscrowd "), msg
    assert "it must be 0 or 1" in msg


def test_coco_file_names_that_normalise_to_one_key_name_both_entries(tmp_path):
    path = _write(tmp_path / "ann.json", _coco(annotations=[], images=[
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "./a.jpg", "width": 64, "height": 48}]))
    with pytest.raises(ValueError) as info:
        list(CocoImporter(path).records())
    msg = str(info.value)
    assert msg.startswith(f"{path}: images[1]: file_name './a.jpg' (as 'a.jpg') is listed "
                          "twice (ids 1 and 2)"), msg


def test_coco_results_errors_name_the_results_file(tmp_path):
    ann = _write(tmp_path / "ann.json", _coco())
    res = _write(tmp_path / "dets.json", [{"image_id": 7, "bbox": [0, 0, 1, 1], "score": 1},
                                          {"image_id": 7, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"dets\.json: results\[1\].*lacks 'score'"):
        list(CocoImporter(res, images_json=ann).records())
    res = _write(tmp_path / "dets.json", [{"image_id": 99, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(ValueError, match=r"results\[0\].*image_id 99.*ann\.json.*images_json"):
        list(CocoImporter(res, images_json=ann).records())


def test_coco_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON.*line 1"):
        list(CocoImporter(bad).records())
    bad.write_text("images,annotations\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: not a COCO JSON file"):
        CocoImporter(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoImporter(tmp_path / "nope.json")
    ok = _write(tmp_path / "dets.json", [])
    with pytest.raises(FileNotFoundError, match="images_json not found"):
        CocoImporter(ok, images_json=tmp_path / "nope.json")


def test_coco_labels_multi_hot(tmp_path):
    path = _write(tmp_path / "ann.json", _coco())
    keys, y, names = coco_labels(path, key_prefix="t/")
    assert keys == ["t/a.jpg", "t/b.jpg", "t/c.jpg"]
    assert names == ["one", "two", "three"]  # sorted by category id
    assert y.dtype == np.float32
    # a: cat 1, crowd of cat 2, cat 3; b: none; c: cat 2
    np.testing.assert_array_equal(y, [[1, 1, 1], [0, 0, 0], [0, 1, 0]])
    _, y, _ = coco_labels(path, include_crowd=False)
    np.testing.assert_array_equal(y, [[1, 0, 1], [0, 0, 0], [0, 1, 0]])

    data = _coco()
    data["annotations"][1]["category_id"] = 77
    with pytest.raises(ValueError, match=r"annotations\[1\] has category_id 77"):
        coco_labels(_write(tmp_path / "bad.json", data))
    with pytest.raises(ValueError, match="no 'categories'"):
        coco_labels(_write(tmp_path / "bad.json", _coco(categories=None)))


# -- OpenImages ----------------------------------------------------------------------------------
_OI_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,"
              "IsGroupOf,IsDepiction,IsInside\n")


def _oi_images(root):
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20)).save(root / "img1.jpg")
    # stored 40x20 with EXIF orientation 6 (rotate 90 degrees): displayed 20x40
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(root / "rot.jpg", exif=exif)
    Image.new("RGB", (8, 10)).save(root / "empty.jpg")


def test_openimages_boxes_sizes_exif_and_missing(tmp_path, caplog):
    root = tmp_path / "train"
    _oi_images(root)
    csv = tmp_path / "boxes.csv"
    csv.write_text(
        _OI_HEADER
        + "img1,xclick,/m/01,1,0.25,0.75,0.1,0.5,0,0,0,0,0\n"
        + "rot,xclick,/m/01,1,0.0,0.5,0.25,1.0,0,0,0,0,0\n"
        + "gone,xclick,/m/01,1,0.0,0.5,0.25,1.0,0,0,0,0,0\n"
        + "img1,activemil,/m/02,0.4,0.0,1.0,0.0,1.0,0,0,1,0,0\n"
        + "img1,xclick,/m/03,0.9,0.5,1.0,0.5,1.0,0,0,0,0,0\n",
        encoding="utf-8",
    )
    imp = OpenImagesImporter(csv, tmp_path, key_format="train/{image_id}.jpg")
    assert imp.kind == "importer"
    with caplog.at_level(logging.WARNING):
        recs = list(imp.records())
    assert [r.key for r in recs] == ["train/img1.jpg", "train/rot.jpg"]
    assert imp.missing == ["train/gone.jpg"]
    assert "train/gone.jpg" in caplog.text
    img1, rot = recs
    assert img1.image_size == (40, 20)
    # best confidence first; normalised xmin, ymin, xmax, ymax times (w, h, w, h)
    np.testing.assert_array_equal(img1.boxes, [[10, 2, 30, 10], [20, 10, 40, 20], [0, 0, 40, 20]])
    np.testing.assert_allclose(img1.scores, [1.0, 0.9, 0.4], rtol=1e-6)
    assert rot.image_size == (20, 40)  # the displayed size, EXIF orientation applied
    np.testing.assert_array_equal(rot.boxes, [[0, 10, 10, 40]])

    recs = list(OpenImagesImporter(csv, tmp_path, "train/{image_id}.jpg",
                                   include_group_of=False).records())
    np.testing.assert_array_equal(recs[0].boxes, [[10, 2, 30, 10], [20, 10, 40, 20]])


def test_openimages_import_says_how_many_images_it_could_not_read(tmp_path, caplog):
    from objcrop_plugin.proposals.importer_base import import_to_store

    root = tmp_path / "train"
    _oi_images(root)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    csv = tmp_path / "boxes.csv"
    csv.write_text(_OI_HEADER + "img1,xclick,/m/01,1,0.25,0.75,0.1,0.5,0,0,0,0,0\n"
                   + "broken,xclick,/m/01,1,0.0,0.5,0.25,1.0,0,0,0,0,0\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        n = import_to_store(OpenImagesImporter(csv, tmp_path, "train/{image_id}.jpg"),
                            tmp_path / "p.objcrop")
    assert n == 1
    assert "1 images skipped as unreadable (first: train/broken.jpg)" in caplog.text
    only_broken = tmp_path / "broken.csv"
    only_broken.write_text(_OI_HEADER + "broken,xclick,/m/01,1,0.0,0.5,0.25,1.0,0,0,0,0,0\n",
                           encoding="utf-8")
    with pytest.raises(ValueError, match=r"all 1 images it lists cannot be read \(first: "
                                         r"train/broken\.jpg\)"):
        import_to_store(OpenImagesImporter(only_broken, tmp_path, "train/{image_id}.jpg"),
                        tmp_path / "q.objcrop")


def test_openimages_without_confidence_and_with_sizes(tmp_path):
    csv = tmp_path / "boxes.csv"
    # columns found by name, in any order; no Confidence column: scores 1.0
    csv.write_text("XMin,YMin,XMax,YMax,ImageID\n0.5,0.5,1,1,a\n0,0,0.5,0.5,b\n",
                   encoding="utf-8")
    imp = OpenImagesImporter(csv, None, sizes={"a": (100, 50), "b": (10, 10)})
    recs = list(imp.records())
    assert [r.key for r in recs] == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(recs[0].boxes, [[50, 25, 100, 50]])
    np.testing.assert_array_equal(recs[0].scores, [1.0])
    assert recs[0].image_size == (100, 50)
    with pytest.raises(ValueError, match="images_root is None"):
        list(OpenImagesImporter(csv, None, sizes={"a": (100, 50)}).records())


def test_openimages_csv_that_is_not_utf8_names_the_file(tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_bytes("ImageID,XMin,XMax,YMin,YMax\ncaf\u00e9,0,1,0,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"boxes\.csv: not UTF-8 text.*Fix: convert"):
        list(OpenImagesImporter(csv, None, sizes={"a": (10, 10)}).records())


def test_openimages_to_store(tmp_path):
    root = tmp_path / "train"
    _oi_images(root)
    csv = tmp_path / "boxes.csv"
    csv.write_text(_OI_HEADER + "rot,x,/m/1,1,0,0.5,0.25,1,0,0,0,0,0\n", encoding="utf-8")
    out = tmp_path / "oi.objcrop"
    n = import_to_store(OpenImagesImporter(csv, tmp_path, "train/{image_id}.jpg"), out)
    assert n == 1
    store = ProposalStore(out)
    assert store["train/rot.jpg"].image_size == (20, 40)
    assert store.meta["source"] == "openimages"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("ImageID,XMin,XMax,YMin\na,0,1,0\n", r"missing column\(s\) \['YMax'\]"),
        ("ImageID,XMin,XMax,YMin,YMax\na,0,1,0,1\nb,0,oops,0,1\n",
         r":3: column 'XMax' is 'oops'"),
        ("ImageID,XMin,XMax,YMin,YMax\na,0,1,0\n", r":2: the row has 4 fields, no 'YMax'"),
        ("ImageID,XMin,XMax,YMin,YMax,Confidence\na,0,1,0,1,1\na,0,1,0,nan,1\n",
         r":3: column 'YMax' is 'nan'"),
        ("", "empty file"),
    ],
)
def test_openimages_errors_name_the_file_line_and_column(tmp_path, text, match):
    csv = tmp_path / "boxes.csv"
    csv.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        list(OpenImagesImporter(csv, None, sizes={"a": (1, 1), "b": (1, 1)}).records())
    assert str(csv) in str(info.value)


def test_openimages_constructor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        OpenImagesImporter(tmp_path / "nope.csv", tmp_path)
    csv = tmp_path / "b.csv"
    csv.write_text("ImageID,XMin,XMax,YMin,YMax\n", encoding="utf-8")
    with pytest.raises(ValueError, match="key_format"):
        OpenImagesImporter(csv, tmp_path, key_format="{id}.jpg")


@pytest.mark.parametrize(("name", "cls"), [("coco", CocoImporter), ("openimages", OpenImagesImporter)])
def test_importers_are_registered_proposal_sources(name, cls):
    assert name in list_proposal_sources(kind="importer")
    assert load_proposal_source(name) is cls
    assert issubclass(cls, ProposalImporter) and cls.kind == "importer" and cls.name == name


def test_make_importer_passes_options_and_names_unknown_ones(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_coco()))
    imp = make_importer("coco", ann, key_prefix="t/", include_crowd=True)
    assert isinstance(imp, CocoImporter) and imp.key_prefix == "t/" and imp.include_crowd
    with pytest.raises(TypeError, match="include_crowds") as info:
        make_importer("coco", ann, include_crowds=True)
    assert "images_json, images_root, key_prefix, include_crowd, min_score" in str(info.value)
    # OpenImages with sizes only: no image folder is needed
    csv = tmp_path / "b.csv"
    csv.write_text("ImageID,XMin,XMax,YMin,YMax\na,0,0.5,0,0.5\n", encoding="utf-8")
    rec = next(make_importer("openimages", csv, sizes={"a": [10, 20]}).records())
    assert rec.key == "a.jpg" and rec.boxes.tolist() == [[0, 0, 5, 10]]


def test_an_import_says_what_its_boxes_suggest_about_the_files_format(tmp_path, caplog):
    """Boxes are stored as given; inverted ones (x, y, w, h read as corners), ones far past
    the image (pixels where fractions were meant) and absolute keys are counted and said."""
    rows = [
        {"key": "a.jpg", "width": 96, "height": 64,
         "boxes": [[30, 2, 3, 4], [10, 10, 150, 40], [1, 1, 10, 10], [-200, 0, 20, 20]],
         "scores": [1, 1, 1, 1]},
        {"key": "/data/b.jpg", "width": 96, "height": 64, "boxes": [[1, 1, 9, 9]], "scores": [1]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        assert import_to_store(make_importer("jsonl", src), tmp_path / "s.objcrop") == 2
    said = caplog.text
    assert "1 of 5 boxes are inverted, not finite or of no area in their image (e.g. a.jpg " \
           "[30.0, 2.0, 3.0, 4.0]; inverted ones are often x, y, w, h read as corners)" in said
    assert "1 boxes reach past their image by more than its size (e.g. a.jpg " \
           "[-200.0, 0.0, 20.0, 20.0] in 96x64; pixel and normalised" in said
    assert "1 keys are absolute paths (e.g. /data/b.jpg)" in said
    assert len(ProposalStore(tmp_path / "s.objcrop")["a.jpg"].boxes) == 4  # stored as given
    caplog.clear()
    rows[0]["boxes"], rows[0]["scores"], rows[1]["key"] = [[1, 1, 10, 10]], [1], "b.jpg"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        import_to_store(make_importer("jsonl", src), tmp_path / "t.objcrop")
    assert "boxes are" not in caplog.text and "absolute" not in caplog.text


def test_coco_images_root_says_when_files_have_another_size_than_the_annotations(tmp_path, caplog):
    """An image turned by its EXIF orientation (or another copy of the images): the
    annotations' size is not the upright image's, and its boxes would land elsewhere."""
    data = _coco(images=[{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                         {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}],
                 annotations=[])
    path = _write(tmp_path / "ann.json", data)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (48, 64)).save(tmp_path / "imgs" / "a.jpg")  # turned
    Image.new("RGB", (128, 96)).save(tmp_path / "imgs" / "b.jpg")  # the same aspect: rescaled
    with caplog.at_level(logging.WARNING):
        keys = [r.key for r in CocoImporter(path, images_root=tmp_path / "imgs").records()]
    assert keys == ["a.jpg", "b.jpg"]
    assert ("1 of 2 images checked have another size than the annotations give (e.g. a.jpg: "
            "annotations 64x48, image 48x64 upright)") in caplog.text
    caplog.clear()
    Image.new("RGB", (64, 48)).save(tmp_path / "imgs" / "a.jpg")
    with caplog.at_level(logging.WARNING):
        list(CocoImporter(path, images_root=tmp_path / "imgs").records())
    assert "another size" not in caplog.text
