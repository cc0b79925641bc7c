"""The objcrop command: show on the demo data, policies, proposal import (any registered
importer)/export/info."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def test_show_passes_over_images_it_cannot_read(tmp_path, capsys):
    """One corrupt file in a folder costs its row, not the picture; images the user names with
    ``--keys`` are shown or the error names them."""
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("b.jpg", "c.jpg", "d.jpg"):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(imgs / name)
    (imgs / "a.jpg").write_bytes((imgs / "b.jpg").read_bytes()[:300])  # truncated
    common = ["show", "--root", str(imgs), "--views", "scene_scene"]
    assert main([*common, "--n", "2", "--out", str(tmp_path / "two.png")]) == 0
    err = capsys.readouterr().err
    assert "skipped a.jpg" in err and "b.jpg" not in err
    one = main([*common, "--n", "1", "--out", str(tmp_path / "one.png")])
    assert one == 0
    h1, h2 = Image.open(tmp_path / "one.png").size[1], Image.open(tmp_path / "two.png").size[1]
    assert h2 > h1  # two rows: b.jpg and c.jpg
    assert main([*common, "--keys", "a.jpg", "--out", str(tmp_path / "named.png")]) == 2
    assert "a.jpg" in capsys.readouterr().err and not (tmp_path / "named.png").exists()
    # a key that is no file under the folder: said so, with the closest key (not "remove or
    # replace the file")
    assert main([*common, "--keys", "c.jpeg", "--out", str(tmp_path / "named.png")]) == 2
    err = capsys.readouterr().err
    assert "--keys: c.jpeg is not under" in err and "Did you mean 'c.jpg'?" in err
    assert main([*common, "--first", "1", "--n", "3", "--out", str(tmp_path / "x.png")]) == 0
    (imgs / "b.jpg").write_bytes(b"not an image")
    (imgs / "c.jpg").unlink()
    (imgs / "d.jpg").unlink()
    assert main([*common, "--out", str(tmp_path / "none.png")]) == 2
    assert "no image of" in capsys.readouterr().err


def test_show_with_an_object_recipe_and_no_store_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "imgs" / "a.png")
    rc = main(["show", "--root", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "obj_obj_dilate crop from proposals, but no proposal store" in err
    assert "--proposals STORE" in err and "--views scene_scene" in err
    # --first past the end is said so (not "could not be read")
    rc = main(["show", "--root", str(tmp_path / "imgs"), "--views", "scene_scene", "--first",
               "5", "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "--first 5 is past the last image" in capsys.readouterr().err


def test_demo_data_options_are_checked_and_other_data_is_replaced_on_request(tmp_path, capsys):
    import pytest

    common = ["demo-data", "--data-dir", str(tmp_path / "d"), "--n-images", "3"]
    for bad in (["--image-size", "640"], ["--image-size", "64x48x9"], ["--data-seed", "-1"],
                ["--n-images", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main([*common, *bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and bad[0] in err, err  # argparse names the option
    for bad in (["--n", "0"], ["--n", "-1"], ["--first", "-1"]):
        with pytest.raises(SystemExit):
            main(["show", *bad])
        assert bad[0] in capsys.readouterr().err
    assert main([*common, "--image-size", "64x48"]) == 0
    assert main([*common, "--image-size", "80x48"]) == 2
    err = capsys.readouterr().err
    assert "differs in: width" in err and "--overwrite" in err and "overwrite=True" in err
    assert main([*common, "--image-size", "80x48", "--overwrite"]) == 0
    assert Image.open(tmp_path / "d" / "images" / "000000.jpg").size == (80, 48)


def test_policies_lists_registered_names_by_kind(capsys):
    assert main(["policies"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert "object_dilated" in lines["crop policies"].split(", ")
    assert "obj_obj_dilate" in lines["view recipes"].split(", ")
    generators = lines["proposal generators (proposals build --method NAME)"].split(", ")
    importers = lines["proposal importers (proposals import --source NAME)"].split(", ")
    assert {"bing", "graph_segments", "selective_search"} <= set(generators)
    assert {"jsonl", "coco", "openimages"} <= set(importers)
    assert not set(generators) & set(importers)


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
    capsys.readouterr()
    # to standard output (a pipe), the summary to stderr; no file named "-"
    assert main(["proposals", "export", str(tmp_path / "s.objcrop"), "--out", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads(src.read_text()) and "wrote 1 images" in err
    assert not Path("-").exists()


def test_info_counts_a_builds_file_entries_unless_asked(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(root / f"{i}.jpg")
    assert main(["proposals", "build", str(root), "--method", "graph_segments", "--workers", "1",
                 "--no-progress", "--out", str(tmp_path / "b.objcrop")]) == 0
    capsys.readouterr()
    assert main(["proposals", "info", str(tmp_path / "b.objcrop")]) == 0
    short = json.loads(capsys.readouterr().out)
    assert short["meta"]["files"].startswith("3 entries")
    assert main(["proposals", "info", "--files", str(tmp_path / "b.objcrop")]) == 0
    assert [k for k, _ in json.loads(capsys.readouterr().out)["meta"]["files"]] == [
        "0.jpg", "1.jpg", "2.jpg"]


def test_import_resolves_the_source_through_the_registry_with_params(tmp_path, capsys):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 10, 30, 20], "category_id": 3,
                         "iscrowd": 0}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "gt.objcrop"
    assert main(["proposals", "import", str(ann), "--source", "coco", "--out", str(out),
                 "--param", "key_prefix=train2017/"]) == 0
    store = ProposalStore(out)
    assert store["train2017/a.jpg"].boxes.tolist() == [[10, 10, 40, 30]]
    assert len(store["train2017/b.jpg"].boxes) == 0
    assert store.meta["source"] == "coco" and store.meta["key_prefix"] == "train2017/"
    # the same store as the dedicated command's
    alias = tmp_path / "alias.objcrop"
    assert main(["proposals", "import-coco", str(ann), "--out", str(alias),
                 "--key-prefix", "train2017/"]) == 0
    assert ProposalStore(alias).meta == store.meta

    csv = tmp_path / "boxes.csv"
    csv.write_text("ImageID,XMin,XMax,YMin,YMax,Confidence\nx,0.1,0.5,0.25,0.75,0.9\n")
    Image.new("RGB", (200, 100)).save(tmp_path / "x.jpg")
    oi = tmp_path / "oi.objcrop"
    assert main(["proposals", "import", str(csv), "--source", "openimages", "--out", str(oi),
                 "--param", f"images_root={tmp_path}"]) == 0
    np.testing.assert_allclose(ProposalStore(oi)["x.jpg"].boxes, [[20, 25, 100, 75]], rtol=1e-6)
    capsys.readouterr()


def test_import_with_an_unknown_source_or_option_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    out = tmp_path / "s.objcrop"
    assert main(["proposals", "import", str(src), "--source", "cocoo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown proposal importer 'cocoo'" in err and "coco, jsonl, openimages" in err
    assert main(["proposals", "import", str(src), "--source", "graph_segments", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a generator, not an importer" in err and "--method graph_segments" in err
    assert main(["proposals", "import", str(src), "--source", "coco", "--out", str(out),
                 "--param", "key_prefx=a/"]) == 2
    err = capsys.readouterr().err
    assert "['key_prefx']" in err and "key_prefix" in err
    assert main(["proposals", "import", str(src), "--param", "oops", "--out", str(out)]) == 2
    assert "key=value" in capsys.readouterr().err
    assert not out.exists()


def test_stats_eval_and_coco_import_commands(tmp_path, capsys):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 10, 30, 20], "category_id": 3,
                         "iscrowd": 0},
                        {"id": 2, "image_id": 1, "bbox": [0, 0, 90, 70], "category_id": 3,
                         "iscrowd": 1}],
        "categories": [{"id": 3, "name": "cat"}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    gt = tmp_path / "gt.objcrop"
    capsys.readouterr()
    assert main(["proposals", "import-coco", str(ann), "--out", str(gt)]) == 0
    assert ProposalStore(gt)["a.jpg"].boxes.tolist() == [[10, 10, 40, 30]]
    assert "left out: 1 crowd annotations (--include-crowd keeps them)" in capsys.readouterr().out
    ProposalStore.write(tmp_path / "p.objcrop", [("a.jpg", [[11, 10, 40, 30], [0, 0, 5, 5]],
                                                  [0.9, 0.1], (100, 80))])
    capsys.readouterr()
    assert main(["proposals", "stats", str(tmp_path / "p.objcrop"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1
    assert main(["proposals", "eval", str(tmp_path / "p.objcrop"), "--gt", str(ann), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["recall"]["0.5"]["1"] == 1.0
    assert main(["proposals", "eval", str(tmp_path / "p.objcrop"), "--gt", str(ann), "--json",
                 "--k", "1", "all"]) == 0
    assert set(json.loads(capsys.readouterr().out)["recall"]["0.5"]) == {"1", "all"}
    with pytest.raises(SystemExit) as exit_info:
        main(["proposals", "eval", str(tmp_path / "p.objcrop"), "--gt", str(ann), "--k", "0"])
    assert exit_info.value.code == 2 and "a count >= 1, or 'all'" in capsys.readouterr().err


def test_eval_command_on_demo_data(tmp_path, capsys, demo_data, monkeypatch, caplog):
    demo = demo_data(n_images=12, size=(96, 72), seed=0)
    rc = main(["eval", "--root", str(demo.root), "--model", "resnet10t", "--image-size", "64",
               "--epochs", "5", "--k", "3", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) >= {"probe_map", "knn_map", "prevalence_map"}
    assert 0 <= res["probe_map"] <= 100 and res["n_train"] + res["n_test"] == 12

    # the demo's protocol from the command line: reaches evaluate_backbone unchanged
    import objcrop_plugin.eval as ev

    seen = {}
    real = ev.evaluate_backbone

    def spy(*args, **kwargs):
        seen.update(pooling=kwargs["pooling"], scale=kwargs["scale"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_backbone", spy)
    assert main(["eval", "--root", str(demo.root), "--model", "resnet10t", "--image-size", "32",
                 "--pooling", "avgmax", "--scale", "2", "--epochs", "2", "--k", "3"]) == 0
    assert seen == {"pooling": "avgmax", "scale": 2.0}
    monkeypatch.undo()

    # labels with no positive at all: no mAP, said, and the JSON stays JSON (null, not NaN)
    labels = json.loads((demo.root / "labels.json").read_text())
    for image in labels["images"]:
        image["labels"] = []
    (tmp_path / "none.json").write_text(json.dumps(labels))
    capsys.readouterr()
    assert main(["eval", "--root", str(demo.root), "--labels", str(tmp_path / "none.json"),
                 "--model", "resnet10t", "--image-size", "32", "--epochs", "2", "--k", "3",
                 "--json", str(tmp_path / "none-r.json")]) == 0
    res = json.loads((tmp_path / "none-r.json").read_text())
    assert res["probe_map"] is None and res["classes_evaluated"] == 0
    assert "no class has a positive" in caplog.text

    # --labels takes a COCO instances file as data.labels does (by its content)
    demo_labels = json.loads((demo.root / "labels.json").read_text())
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(demo_labels["classes"])]}
    for i, image in enumerate(demo_labels["images"]):
        coco["images"].append({"id": i, "file_name": image["key"], "width": image["width"],
                               "height": image["height"]})
        for c in image["labels"]:
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": i,
                                        "category_id": c + 1, "bbox": [1, 1, 8, 8],
                                        "iscrowd": 0, "area": 64})
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert main(["eval", "--root", str(demo.root), "--labels", str(tmp_path / "coco.json"),
                 "--model", "resnet10t", "--image-size", "32", "--epochs", "2", "--k", "3",
                 "--json", str(tmp_path / "coco-r.json")]) == 0
    res = json.loads((tmp_path / "coco-r.json").read_text())
    assert res["n_train"] + res["n_test"] == 12 and res["probe_map"] is not None


def test_demo_command_quick_budget_writes_results_picture_and_ends_with_result(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--budget", "quick", "--out", str(out), "--data-dir", str(tmp_path / "d")]) == 0
    assert (out / "crops.png").exists()
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"random", "scene_scene", "obj_obj_dilate"}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT scene_map=") and "delta=" in last


def test_demo_and_eval_never_write_over_the_users_files(tmp_path, capsys, demo_data):
    """`objcrop demo --out` over a folder holding the user's results.json or crops.png, and
    `objcrop eval --json` over its own labels or a folder: refused before any work, the files
    unchanged, --force named; eval's own JSON is replaced on a rerun."""
    for name, content in (("results.json", b'{"mine": 1}\n'), ("crops.png", b"\x89PNG\r\n\x1a\nmine")):
        out = tmp_path / f"project-{name}"
        out.mkdir()
        (out / name).write_bytes(content)
        assert main(["demo", "--budget", "quick", "--out", str(out),
                     "--data-dir", str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err
        assert str(out / name) in err and "--force" in err
        assert (out / name).read_bytes() == content and not (tmp_path / "d").exists()
    demo = demo_data(n_images=12, size=(96, 72), seed=0)
    labels = demo.root / "labels.json"
    before = labels.read_bytes()
    common = ["eval", "--root", str(demo.root), "--model", "resnet10t", "--image-size", "32",
              "--epochs", "2", "--k", "3"]
    for target in (labels, tmp_path):
        assert main([*common, "--json", str(target)]) == 2
        assert "objcrop: error:" in capsys.readouterr().err
    assert labels.read_bytes() == before
    result = tmp_path / "r.json"
    assert main([*common, "--json", str(result)]) == 0
    assert main([*common, "--json", str(result)]) == 0  # its own file: replaced
    assert json.loads(result.read_text())["n_train"] > 0


def test_demo_data_with_worker_processes_writes_the_same_files(tmp_path):
    common = ["--n-images", "5", "--image-size", "96x64"]
    assert main(["demo-data", "--data-dir", str(tmp_path / "one"), *common]) == 0
    assert main(["demo-data", "--data-dir", str(tmp_path / "two"), *common, "--workers", "2"]) == 0
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and len(one) == 5 + 3
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_verbose_flag_before_or_after_the_command(monkeypatch):
    """`-v` is taken before the command, after it, and after a recipe's overrides; a
    subcommand's own default never resets the one given before it."""
    import logging

    from objcrop_plugin.cli import build_parser

    parser = build_parser()
    for argv, verbose in ((["-v", "check", "d"], True), (["check", "d", "-v"], True),
                          (["check", "d"], False), (["proposals", "info", "s", "-v"], True),
                          (["-v", "proposals", "info", "s"], True)):
        assert parser.parse_args(argv).verbose is verbose, argv
    seen = {}

    def fake_train(args):
        seen.update(overrides=args.overrides, verbose=args.verbose)
        return 0

    monkeypatch.setattr("objcrop_plugin.cli.cmd_train", fake_train)
    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    assert main(["train", "r.yaml", "trainer.epochs=1", "-v"]) == 0
    assert seen == {"overrides": ["trainer.epochs=1"], "verbose": True}
    assert levels == [logging.INFO]


def test_show_writes_png_only(tmp_path, capsys):
    assert main(["show", "--out", str(tmp_path / "x.jpg")]) == 2
    assert "a name ending in .png" in capsys.readouterr().err and not (tmp_path / "x.jpg").exists()


def test_a_caption_in_a_script_the_font_lacks_stays_readable(monkeypatch):
    """A file name with CJK characters: drawn with a CJK font of the system where there is
    one, else those characters as escapes (not a row of empty boxes)."""
    from objcrop_plugin import viz

    font = viz._font(11)
    assert viz._caption("été.jpg", 11, font) == ("été.jpg", font)  # DejaVu draws it
    monkeypatch.setattr(viz, "_CJK_FONTS", ("no-such-font-objcrop.ttc",))
    assert viz._caption("my photo 日本.jpg", 11, font) == ("my photo \\u65e5\\u672c.jpg", font)
    if _has_dejavu():  # a font file the system has stands in for a CJK one
        monkeypatch.setattr(viz, "_CJK_FONTS", ("no-such-font-objcrop.ttc", "DejaVuSans.ttf"))
        text, used = viz._caption("日本.jpg", 11, font)
        assert text == "日本.jpg" and used is not font


def _has_dejavu() -> bool:
    from PIL import ImageFont

    try:
        ImageFont.truetype("DejaVuSans.ttf", 11)
        return True
    except OSError:
        return False
