"""Proposal statistics and recall against ground truth, checked on hand-built stores."""

import json

import pytest

from objcrop_plugin.proposals.evaluate import format_recall, format_stats, proposal_stats, recall
from objcrop_plugin.proposals.importers import CocoImporter
from objcrop_plugin.proposals.store import ProposalStore

NAN = float("nan")


def _store(tmp_path, name, records):
    path = tmp_path / f"{name}.objcrop"
    ProposalStore.write(path, records)
    return ProposalStore(path)


# -- statistics ----------------------------------------------------------------------------------
def _stats_records():
    return [
        ("a.jpg", [[0, 0, 10, 10],        # 100 px^2: small, 1% of the image
                   [0, 0, 50, 50],        # 2500: medium, 25%
                   [0, 0, 100, 100],      # 10000: large, 100%
                   [-10, -10, 20, 20]],   # clipped to 20x20 = 400: small, 4%
         [0.9, 0.5, 0.125, 0.25], (100, 100)),
        ("b.jpg", [], None, (200, 100)),
        ("c.jpg", [[0, 0, 1, 50],         # 1 px wide: unusable, small, 50 / 20000
                   [NAN, 0, 10, 10]],     # non-finite: unusable, not in the area statistics
         None, (200, 100)),
    ]


def test_proposal_stats_values(tmp_path):
    stats = proposal_stats(_store(tmp_path, "p", _stats_records()))
    assert stats["images"] == 3 and stats["boxes"] == 6
    assert stats["images_without_proposals"] == 1
    bpi = stats["boxes_per_image"]
    assert (bpi["mean"], bpi["median"], bpi["min"], bpi["max"]) == (2.0, 2.0, 0, 4)
    hist = bpi["histogram"]
    assert list(hist)[:4] == ["0", "1", "2-4", "5-9"] and list(hist)[-1] == "1000+"
    assert hist["0"] == 1 and hist["2-4"] == 2 and sum(hist.values()) == 3
    area = stats["box_area"]
    assert area["coco_buckets"] == {"small": 3, "medium": 1, "large": 1}
    rel = area["relative"]
    assert rel["min"] == pytest.approx(50 / 20000)
    assert rel["median"] == pytest.approx(0.04)
    assert rel["max"] == pytest.approx(1.0)
    assert rel["p25"] == pytest.approx(0.01)
    assert stats["unusable_boxes"] == 2
    assert stats["scores"]["min"] == pytest.approx(0.125)
    assert stats["scores"]["max"] == pytest.approx(0.9)
    assert stats["scores"]["nan"] == 2
    json.dumps(stats)  # JSON-serialisable, for --json output

    # any records source gives the same numbers as the memory-mapped fast path
    store = ProposalStore(tmp_path / "p.objcrop")
    assert proposal_stats(list(store.records())) == stats
    assert proposal_stats(str(tmp_path / "p.objcrop")) == stats

    text = format_stats(stats)
    assert "images without proposals  1" in text
    assert "unusable boxes            2" in text
    assert "small < 32^2  3" in text


def test_proposal_stats_of_an_empty_store(tmp_path):
    stats = proposal_stats(_store(tmp_path, "e", []))
    assert stats["images"] == 0 and stats["boxes"] == 0
    assert stats["boxes_per_image"]["mean"] is None
    assert stats["box_area"]["relative"]["median"] is None
    assert stats["scores"] == {"min": None, "max": None, "nan": 0}
    assert "images" in format_stats(stats)
    stats = proposal_stats(_store(tmp_path, "z", [("a.jpg", [], None, (4, 4))]))
    assert stats["images_without_proposals"] == 1 and stats["boxes_per_image"]["max"] == 0


# -- recall --------------------------------------------------------------------------------------
def _gt(tmp_path):
    return _store(tmp_path, "gt", [
        ("x.jpg", [[0, 0, 10, 10],      # small
                   [0, 0, 50, 50],      # medium
                   [0, 0, 100, 100]],   # large
         None, (100, 100)),
        ("y.jpg", [[10, 10, 20, 20]], None, (100, 100)),  # small; not in the proposal store
        ("z.jpg", [], None, (100, 100)),                   # no ground truth
    ])


def _props(tmp_path):
    # stored out of score order: ranking must follow the scores
    return _store(tmp_path, "props", [
        ("x.jpg", [[0, 0, 10, 6],        # IoU 0.6 with the small box
                   [0, 0, 50, 40],       # IoU 0.8 with the medium box
                   [0, 0, 100, 100]],    # IoU 1 with the large box, 0.25 with the medium
         [0.8, 0.7, 0.9], (100, 100)),
        ("z.jpg", [[0, 0, 5, 5]], [1.0], (100, 100)),
        ("extra.jpg", [[0, 0, 5, 5]], [1.0], (100, 100)),  # not in gt: ignored
    ])


def test_recall_exact_by_threshold_k_and_size(tmp_path):
    r = recall(_props(tmp_path), _gt(tmp_path), iou_thresholds=(0.5, 0.7), ks=(1, 2, 10))
    assert r["images"] == 3 and r["images_without_gt"] == 1
    assert r["missing_images"] == 1 and r["missing_keys"] == ["y.jpg"]
    assert r["gt_boxes"] == 4
    assert r["gt_boxes_by_size"] == {"small": 2, "medium": 1, "large": 1}
    assert r["iou_thresholds"] == [0.5, 0.7] and r["ks"] == [1, 2, 10]
    # @1: the 0.9 proposal (the large box) only; @2 adds the IoU-0.6 box (counts at 0.5 only);
    # @10 adds the IoU-0.8 box; y.jpg's box is a miss throughout
    assert r["recall"] == {0.5: {1: 0.25, 2: 0.5, 10: 0.75}, 0.7: {1: 0.25, 2: 0.25, 10: 0.5}}
    assert r["recall_by_size"]["small"] == {0.5: {1: 0.0, 2: 0.5, 10: 0.5},
                                            0.7: {1: 0.0, 2: 0.0, 10: 0.0}}
    assert r["recall_by_size"]["medium"] == {0.5: {1: 0.0, 2: 0.0, 10: 1.0},
                                             0.7: {1: 0.0, 2: 0.0, 10: 1.0}}
    assert r["recall_by_size"]["large"] == {0.5: {1: 1.0, 2: 1.0, 10: 1.0},
                                            0.7: {1: 1.0, 2: 1.0, 10: 1.0}}
    json.dumps(r)

    text = format_recall(r)
    assert "4 ground-truth boxes in 3 images" in text
    assert "1 images are missing from the store" in text and "y.jpg" in text
    row = next(line for line in text.splitlines() if line.startswith(" 0.50  all"))
    assert row.split()[-3:] == ["0.250", "0.500", "0.750"]


def test_recall_default_arguments_and_all(tmp_path):
    r = recall(_props(tmp_path), _gt(tmp_path))
    assert r["iou_thresholds"] == [0.5, 0.7] and r["ks"] == [1, 10, 100]
    assert r["recall"][0.5] == {1: 0.25, 10: 0.75, 100: 0.75}
    r = recall(str(tmp_path / "props.objcrop"), _gt(tmp_path), ks=(None,))
    assert r["ks"] == ["all"] and r["recall"][0.7]["all"] == 0.5
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall(_props(tmp_path), _gt(tmp_path), ks=(0,))


def test_recall_without_scores_uses_the_stored_order(tmp_path):
    gt = _store(tmp_path, "gt", [("a.jpg", [[0, 0, 10, 10]], None, (64, 64))])
    miss_first = _store(tmp_path, "p1", [("a.jpg", [[30, 30, 40, 40], [0, 0, 10, 10]], None,
                                          (64, 64))])
    hit_first = _store(tmp_path, "p2", [("a.jpg", [[0, 0, 10, 10], [30, 30, 40, 40]], None,
                                         (64, 64))])
    assert recall(miss_first, gt, ks=(1, 2))["recall"][0.5] == {1: 0.0, 2: 1.0}
    assert recall(hit_first, gt, ks=(1, 2))["recall"][0.5] == {1: 1.0, 2: 1.0}
    # scored proposals rank before unscored ones
    mixed = _store(tmp_path, "p3", [("a.jpg", [[0, 0, 10, 10], [30, 30, 40, 40]], [NAN, 0.1],
                                     (64, 64))])
    assert recall(mixed, gt, ks=(1, 2))["recall"][0.5] == {1: 0.0, 2: 1.0}


def test_recall_rescales_proposals_of_the_same_aspect_only(tmp_path):
    gt = _store(tmp_path, "gt", [("a.jpg", [[0, 0, 10, 10]], None, (100, 100)),
                                 ("b.jpg", [[20, 40, 60, 80]], None, (100, 100))])
    # the same boxes, stored for the image at half size and at (50 wide, 200 high): the
    # second is another image (or a mismatch) to every other part of the package, so no
    # stretching onto the ground truth; it counts as a miss and is reported
    props = _store(tmp_path, "p", [("a.jpg", [[0, 0, 5, 5]], [1.0], (50, 50)),
                                   ("b.jpg", [[10, 80, 30, 160]], [1.0], (50, 200))])
    r = recall(props, gt, iou_thresholds=(0.99,), ks=(1,))
    assert r["recall"][0.99][1] == 0.5
    assert r["mismatched_images"] == 1 and r["mismatched_keys"] == ["b.jpg"]
    assert r["transposed_images"] == 0


def test_recall_size_bucket_edges(tmp_path):
    # COCO: small < 32^2 <= medium < 96^2 <= large, by area at the ground truth's image size
    gt = _store(tmp_path, "gt", [("a.jpg", [[0, 0, 31, 32], [0, 0, 32, 32], [0, 0, 96, 95],
                                            [0, 0, 96, 96]], None, (200, 200))])
    props = _store(tmp_path, "p", [("a.jpg", [[0, 0, 32, 32]], [1.0], (200, 200))])
    r = recall(props, gt, iou_thresholds=(0.5,), ks=(1,))
    assert r["gt_boxes_by_size"] == {"small": 1, "medium": 2, "large": 1}
    assert r["recall_by_size"]["small"][0.5][1] == 1.0       # 31x32 vs 32x32: IoU 0.97
    assert r["recall_by_size"]["medium"][0.5][1] == 0.5      # 32x32 yes, 96x95 no
    assert r["recall_by_size"]["large"][0.5][1] == 0.0


def test_recall_against_a_coco_importer_and_an_empty_bucket(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "x.jpg", "width": 100, "height": 100}],
        "annotations": [{"image_id": 1, "bbox": [0, 0, 100, 100], "category_id": 1},
                        {"image_id": 1, "bbox": [0, 0, 100, 100], "category_id": 1,
                         "iscrowd": 1}],  # crowd: not counted
    }), encoding="utf-8")
    r = recall(_props(tmp_path), CocoImporter(ann), ks=(1,))
    assert r["gt_boxes"] == 1 and r["recall"][0.7][1] == 1.0
    assert r["recall_by_size"]["small"][0.5][1] is None  # no small boxes at all
    assert " -" in format_recall(r)


def test_recall_counts_an_iou_equal_to_the_threshold(tmp_path):
    gt = _store(tmp_path, "gt", [("a.jpg", [[0, 0, 10, 10]], None, (64, 64))])
    props = _store(tmp_path, "p", [("a.jpg", [[0, 0, 10, 5]], [1.0], (64, 64))])  # IoU 0.5
    assert recall(props, gt, iou_thresholds=(0.5, 0.51), ks=(1,))["recall"] == {
        0.5: {1: 1.0}, 0.51: {1: 0.0}
    }


def test_recall_reports_transposed_sizes_and_format_says_so(tmp_path):
    # the store's own box, but the ground truth gives the size before the EXIF rotation
    gt = _store(tmp_path, "gt", [("exif6.jpg", [[10, 20, 50, 90]], None, (600, 400))])
    props = _store(tmp_path, "p", [("exif6.jpg", [[10, 20, 50, 90]], [1.0], (400, 600))])
    r = recall(props, gt, iou_thresholds=(0.5,), ks=(1,))
    assert r["recall"][0.5][1] == 0.0
    assert (r["mismatched_images"], r["transposed_images"], r["mismatched_keys"]) == (
        1, 1, ["exif6.jpg"])
    text = format_recall(r)
    assert "1 images are stored at another aspect ratio" in text and "1 transposed" in text
    assert "exif6.jpg" in text


def test_eval_recognises_the_ground_truth_by_content(tmp_path, capsys):
    from objcrop_plugin.cli import main

    props = _store(tmp_path, "p", [("a.jpg", [[10, 10, 60, 60]], [1.0], (100, 100))]).path
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 10, 50, 50],
                             "category_id": 1}],
            "categories": [{"id": 1, "name": "x"}]}
    upper = tmp_path / "GT.JSON"
    upper.write_text(json.dumps(coco, indent=1))  # spread over lines, upper-case suffix
    plain = tmp_path / "gt_annotations"  # no suffix at all
    plain.write_text(json.dumps(coco))
    lines = tmp_path / "gt.jsonl"
    lines.write_text('{"key": "a.jpg", "width": 100, "height": 100, "boxes": [[10, 10, 60, 60]]}\n')
    gt_store = _store(tmp_path, "gt", [("a.jpg", [[10, 10, 60, 60]], None, (100, 100))]).path
    for gt in (upper, plain, lines, gt_store):
        assert main(["proposals", "eval", str(props), "--gt", str(gt), "--json"]) == 0, gt
        result = json.loads(capsys.readouterr().out)
        assert result["gt_boxes"] == 1 and result["recall"]["0.5"]["1"] == 1.0, gt
    # COCO-only options are refused where they would be ignored
    for gt in (lines, gt_store):
        assert main(["proposals", "eval", str(props), "--gt", str(gt), "--key-prefix", "nope/",
                     "--gt-images-json", str(upper)]) == 2
        err = capsys.readouterr().err
        assert str(gt) in err and "--gt-images-json and --key-prefix apply to COCO" in err
    # a file of no known kind: COCO's own message names it
    junk = tmp_path / "gt.txt"
    junk.write_text("key,boxes\n")
    assert main(["proposals", "eval", str(props), "--gt", str(junk)]) == 2
    assert f"{junk}: not a COCO JSON file" in capsys.readouterr().err


def test_ground_truth_is_clipped_to_its_image_and_boxes_of_no_area_left_out(tmp_path):
    """As the generators clip their boxes: a ground-truth box reaching past the image could
    never be found by IoU with the proposal that covers what of it is visible, and one of no
    width could never be found at all."""
    gt = _store(tmp_path, "gt", [("a.jpg", [[10, 10, 50, 40], [90, 70, 120, 100],
                                            [50, 50, 50, 60], [200, 10, 220, 30]],
                                  None, (100, 80))])
    props = _store(tmp_path, "p", [("a.jpg", [[10, 10, 50, 40], [90, 70, 100, 80]],
                                    [0.9, 0.8], (100, 80))])
    r = recall(props, gt, iou_thresholds=(0.5,), ks=(10,))
    assert r["degenerate_gt_boxes"] == 2 and r["gt_boxes"] == 2
    assert r["recall"] == {0.5: {10: 1.0}}
    assert "2 ground-truth boxes of no area in their image left out" in format_recall(r)


def test_boxes_evaluated_against_themselves_have_recall_one(tmp_path):
    """Stored boxes reaching past the image (imported ones are not clipped) are clipped as
    the ground truth is: the same boxes on both sides are found at any threshold."""
    records = [("e.jpg", [[70, 40, 120, 90], [-10, -5, 20, 15], [5, 5, 30, 30]], [1.0, 1.0, 1.0],
                (96, 64))]
    same = _store(tmp_path, "same", records)
    r = recall(same, same, iou_thresholds=(0.5, 0.7, 0.95), ks=(10,))
    assert r["recall"] == {0.5: {10: 1.0}, 0.7: {10: 1.0}, 0.95: {10: 1.0}}
    # a box with an infinite side is no box a view is cut from: clipped, it would cover the
    # whole image and be found
    inf = _store(tmp_path, "inf", [("e.jpg", [[float("-inf"), 0, float("inf"), 64]], [1.0],
                                    (96, 64))])
    whole = _store(tmp_path, "whole", [("e.jpg", [[0, 0, 96, 64]], None, (96, 64))])
    assert recall(inf, whole, iou_thresholds=(0.5,), ks=(10,))["recall"] == {0.5: {10: 0.0}}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"IoU thresholds must be in \(0, 1\]"):
            recall(same, same, iou_thresholds=(bad,))


def test_json_lines_ground_truth_may_start_with_a_blank_line(tmp_path):
    from objcrop_plugin.proposals.evaluate import open_ground_truth
    from objcrop_plugin.proposals.jsonl import JsonLinesImporter

    path = tmp_path / "gt.jsonl"
    path.write_text('\n{"key": "a.jpg", "width": 10, "height": 10, "boxes": [[1, 1, 5, 5]]}\n')
    assert isinstance(open_ground_truth(path), JsonLinesImporter)


def test_an_openimages_csv_as_ground_truth_is_told_to_be_imported_first(tmp_path):
    from objcrop_plugin.proposals.evaluate import open_ground_truth

    csv = tmp_path / "boxes.csv"
    csv.write_text("ImageID,XMin,XMax,YMin,YMax\nabc,0.1,0.5,0.1,0.5\n")
    with pytest.raises(ValueError, match=r"looks like an OpenImages boxes CSV \('ImageID,XMin.*Fix: import it first "
                                         r"\(`objcrop proposals import-openimages .*boxes\.csv "
                                         r"--images-root IMAGES_DIR -o gt\.objcrop`\)"):
        open_ground_truth(csv)
