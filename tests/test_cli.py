"""The objcrop command: show on the demo data, policies, proposal import/export/info."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from objcrop_plugin.cli import main
from objcrop_plugin.proposals import ProposalStore


def test_show_runs_on_the_demo_data_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["show", "--data-dir", str(tmp_path / "demo"), "--n-images", "6", "--n", "3",
            "--image-size", "160x120"]
    assert main(args) == 0
    img = Image.open(tmp_path / "crops.png")
    assert img.format == "PNG" and img.size[0] > 4 * 168 and img.size[1] > 3 * 168
    assert "wrote" in capsys.readouterr().out
    # the picture shows the data: rows differ, views are not blank
    arr = np.asarray(img.convert("L")).astype(float)
    assert arr.std() > 20


def test_show_on_a_user_folder_with_a_store_and_three_recipes(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    recs = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        recs.append((f"{i}.png", [[10, 10, 60, 50]], [1.0], (120, 90)))
    ProposalStore.write(tmp_path / "p.objcrop", recs)
    out = tmp_path / "o" / "x.png"
    rc = main(["show", "--root", str(tmp_path / "imgs"), "--proposals", str(tmp_path / "p.objcrop"),
               "--views", "scene_scene", "obj_obj_dilate", "multi_crop", "--out", str(out),
               "--photometrics", "simclr"])
    assert rc == 0 and Image.open(out).size[1] > 2 * 168


def test_show_with_an_object_recipe_and_no_store_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "imgs" / "a.png")
    rc = main(["show", "--root", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "no proposal store" in capsys.readouterr().err


def test_policies_lists_registered_names(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert "obj_obj_dilate" in out and "jsonl" in out


def test_import_export_info_round_trip(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"key": "a.jpg", "width": 10, "height": 8,
                               "boxes": [[1, 1, 5, 5]], "scores": [0.5]}) + "\n")
    assert main(["proposals", "import", str(src), "--out", str(tmp_path / "s.objcrop")]) == 0
    assert main(["proposals", "export", str(tmp_path / "s.objcrop"), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text()) == json.loads(src.read_text())
    assert main(["proposals", "info", str(tmp_path / "s.objcrop")]) == 0
    assert '"images": 1' in capsys.readouterr().out
    assert main(["proposals", "info", str(tmp_path / "missing.objcrop")]) == 2


def test_stats_eval_and_coco_import_commands(tmp_path, capsys):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 10, 30, 20], "category_id": 3,
                         "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    gt = tmp_path / "gt.objcrop"
    assert main(["proposals", "import-coco", str(ann), "--out", str(gt)]) == 0
    assert ProposalStore(gt)["a.jpg"].boxes.tolist() == [[10, 10, 40, 30]]
    ProposalStore.write(tmp_path / "p.objcrop", [("a.jpg", [[11, 10, 40, 30], [0, 0, 5, 5]],
                                                  [0.9, 0.1], (100, 80))])
    capsys.readouterr()
    assert main(["proposals", "stats", str(tmp_path / "p.objcrop"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
    assert main(["proposals", "eval", str(tmp_path / "p.objcrop"), "--gt", str(ann), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["recall"]["0.5"]["1"] == 1.0


def test_eval_command_on_demo_data(tmp_path, capsys):
    from objcrop_plugin.data.synthetic import write_dataset

    demo = write_dataset(tmp_path / "demo", n_images=12, size=(96, 72), seed=0)
    rc = main(["eval", "--root", str(demo.root), "--model", "resnet10t", "--image-size", "64",
               "--epochs", "5", "--k", "3", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) >= {"probe_map", "knn_map", "prevalence_map"}
    assert 0 <= res["probe_map"] <= 100 and res["n_train"] + res["n_test"] == 12


def test_demo_command_quick_budget_writes_results_picture_and_ends_with_result(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--budget", "quick", "--out", str(out), "--data-dir", str(tmp_path / "d")]) == 0
    assert (out / "crops.png").exists()
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"random", "scene_scene", "obj_obj_dilate"}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT scene_map=") and "delta=" in last
