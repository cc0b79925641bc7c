"""JSON Lines interchange: lossless export/import, and bad lines named by file:line."""

import json

import numpy as np
import pytest

from objcrop_plugin.proposals.importer_base import ProposalImporter, make_importer
from objcrop_plugin.proposals.jsonl import (
    JsonLinesImporter,
    ProposalFileError,
    export_jsonl,
    import_jsonl,
    is_objcrop_export,
    read_jsonl,
)
from objcrop_plugin.proposals.store import ProposalStore
from objcrop_plugin.registry import load_proposal_source


def _store(tmp_path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        size = (int(rng.integers(16, 3000)), int(rng.integers(16, 3000)))
        k = 0 if i == 1 else int(rng.integers(1, 10))
        # arbitrary float32 values, not round numbers: the interchange must not lose them
        xy = rng.uniform(0, 1, size=(k, 2)) * size
        boxes = np.concatenate([xy, xy + rng.uniform(1, 400, size=(k, 2))], axis=1)
        scores = None if i == 2 else rng.uniform(-5, 5, size=k) * 10.0 ** rng.integers(-6, 3)
        if i == 3 and k > 1:
            scores[0] = np.nan
        records.append(
            (f"imgs/{i:04d}/ünï €.jpg" if i == 4 else f"imgs/{i:04d}.jpg", boxes, scores, size)
        )
    path = tmp_path / "src.objcrop"
    ProposalStore.write(path, records)
    return ProposalStore(path)


def _same(a, b):
    assert len(a) == len(b) and list(a) == list(b)
    for ra, rb in zip(a.records(), b.records(), strict=True):
        assert ra.key == rb.key and ra.image_size == rb.image_size
        np.testing.assert_array_equal(ra.boxes, rb.boxes)
        np.testing.assert_array_equal(ra.scores, rb.scores)  # NaN == NaN for this check


def test_export_import_round_trip_is_lossless(tmp_path):
    src = _store(tmp_path)
    jl = tmp_path / "props.jsonl"
    assert export_jsonl(src, jl) == len(src)
    lines = jl.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(src)
    first = json.loads(lines[0])
    assert set(first) == {"key", "width", "height", "boxes", "scores"}
    assert json.loads(lines[2])["scores"] == [None] * len(json.loads(lines[2])["boxes"])
    back = tmp_path / "back.objcrop"
    assert import_jsonl(jl, back) == len(src)
    _same(src, ProposalStore(back))
    assert ProposalStore(back).meta["source"] == "jsonl"
    # and once more: export of the import is byte-identical
    jl2 = tmp_path / "again.jsonl"
    export_jsonl(ProposalStore(back), jl2)
    assert jl2.read_bytes() == jl.read_bytes()


def test_scores_may_be_omitted_or_null_and_blank_lines_skipped(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        '{"key": "a.jpg", "width": 10, "height": 8, "boxes": [[1, 2, 5, 6]]}\n'
        "\n"
        '{"key": "b.jpg", "width": 10, "height": 8, "boxes": [[1, 2, 5, 6]], "scores": null}\n'
        '{"key": "c.jpg", "width": 10, "height": 8, "boxes": [], "scores": []}\n'
    )
    recs = list(read_jsonl(jl))
    assert [r.key for r in recs] == ["a.jpg", "b.jpg", "c.jpg"]
    assert np.isnan(recs[0].scores).all() and np.isnan(recs[1].scores).all()
    assert recs[2].boxes.shape == (0, 4) and recs[0].image_size == (10, 8)


def test_jsonl_is_a_registered_proposal_source(tmp_path):
    jl = tmp_path / "p.jsonl"
    export_jsonl(_store(tmp_path, n=3).records(), jl)
    source = load_proposal_source("jsonl")(jl)
    assert isinstance(source, JsonLinesImporter) and isinstance(source, ProposalImporter)
    assert JsonLinesImporter.name == "jsonl" and JsonLinesImporter.kind == "importer"
    assert [r.key for r in source.records()] == ["imgs/0000.jpg", "imgs/0001.jpg", "imgs/0002.jpg"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        JsonLinesImporter(tmp_path / "missing.jsonl")
    # by name, and written through the importer interface
    out = tmp_path / "s.objcrop"
    assert make_importer("jsonl", jl).write(out, meta={"note": "x"}) == 3
    assert ProposalStore(out).meta == {"source": "jsonl", "path": str(jl), "note": "x"}
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['key_prefix'\]"):
        make_importer("jsonl", jl, key_prefix="a/")


GOOD = '{"key": "ok%d.jpg", "width": 10, "height": 8, "boxes": [[1, 2, 5, 6]], "scores": [0.5]}\n'


@pytest.mark.parametrize(
    "bad,why",
    [
        ('{"key": "x.jpg", "width": 10, ', "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        ('{"key": "x.jpg", "height": 8, "boxes": []}', "width"),
        ('{"key": "x.jpg", "width": 10, "height": 8}', r"missing field\(s\) \['boxes'\]"),
        ('{"key": "x.jpg", "width": 10, "height": 8, "bbox": [[1, 2, 3, 4]]}', "boxes"),
        ('{"width": 10, "height": 8, "boxes": []}', "key"),
        ('{"key": "x.jpg", "width": 10, "height": 8, "boxes": [[1, 2, 3]]}', r"\(K, 4\)"),
        ('{"key": "x.jpg", "width": 10, "height": 8, "boxes": [1, 2, 3, 4, 5]}', r"\(K, 4\)"),
        ('{"key": "x.jpg", "width": 10, "height": 8, "boxes": [[1, 2, 3, "a"]]}', "x.jpg"),
        (
            '{"key": "x.jpg", "width": 10, "height": 8, "boxes": [[1, 2, 3, 4]], "scores": [1, 2]}',
            "1 boxes but 2 scores",
        ),
        ('{"key": "x.jpg", "width": -10, "height": 8, "boxes": []}', "positive"),
        ('{"key": "x.jpg", "width": "wide", "height": 8, "boxes": []}', "width, height"),
        # strict JSON, integer sizes, one line per image
        ('{"key": "x.jpg", "width": 10, "height": 8, "boxes": [[1, 2, 3, NaN]]}',
         "NaN is not a JSON number"),
        ('{"key": "x.jpg", "width": 10, "height": 8, "boxes": [[1, 2, 3, 4]], '
         '"scores": [Infinity]}', "Infinity is not a JSON number"),
        ('{"key": "x.jpg", "width": 10, "height": 8, "boxes": [[-Infinity, 2, 3, 4]]}',
         "-Infinity is not a JSON number"),
        ('{"key": "x.jpg", "width": 10.7, "height": 8, "boxes": []}',
         r"integers, got \(10.7, 8\)"),
        ('{"key": "x.jpg", "width": 10, "height": "12", "boxes": []}',
         r"integers, got \(10, '12'\)"),
        ('{"key": "x.jpg", "width": true, "height": 1, "boxes": []}',
         r"integers, got \(True, 1\)"),
        ('{"key": "./ok1.jpg", "width": 10, "height": 8, "boxes": []}',
         r"key '\./ok1\.jpg' \(normalised 'ok1\.jpg'\) repeats line 1"),
        ('{"key": "ok2.jpg", "width": 10, "height": 8, "boxes": []}',
         "key 'ok2.jpg' repeats line 3"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, why):
    jl = tmp_path / "bad.jsonl"
    jl.write_text(GOOD % 1 + "\n" + GOOD % 2 + bad + "\n" + GOOD % 3, encoding="utf-8")
    with pytest.raises(ProposalFileError, match=why) as info:
        list(read_jsonl(jl))
    assert f"{jl}:4:" in str(info.value)
    store = tmp_path / "out.objcrop"
    with pytest.raises(ProposalFileError):
        import_jsonl(jl, store)
    assert not store.exists()  # nothing half-imported


def test_integral_float_sizes_are_read_as_integers(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"key": "a.jpg", "width": 10.0, "height": 8, "boxes": []}\n')
    (rec,) = read_jsonl(jl)
    assert rec.image_size == (10, 8) and isinstance(rec.image_size[0], int)


def test_only_objcrop_exports_are_recognised_as_its_own_output(tmp_path):
    store = _store(tmp_path, n=3)
    ProposalStore.write(tmp_path / "odd.objcrop", [
        ("caf\u00e9/\u732b.jpg", [[1, 2, 3, 4]], None, (10, 8)),  # non-ASCII key, no scores
        ("b.jpg", [], [], (10, 8)),
    ])
    for source in (store, ProposalStore(tmp_path / "odd.objcrop")):
        out = tmp_path / "out.jsonl"
        export_jsonl(source, out)
        assert is_objcrop_export(out.read_bytes()), out.read_text()[:200]
    # the README's own example line, as a person writes it, and other tools' files
    for line in [
        '{"key": "mine/1.jpg", "width": 640, "height": 480, "boxes": [[12.0, 30.5, 200.0, '
        '310.0]], "scores": [0.93]}',
        '{"key":"a.jpg","width":10,"height":8,"boxes":[[1,2,5,6]],"scores":[0.5]}',
        '{"key":"a.jpg","height":8,"width":10,"boxes":[[1.0,2.0,5.0,6.0]],"scores":[0.5]}',
        '{"key":"a.jpg","width":10,"height":8,"boxes":[[1.0,2.0,5.0,6.0]],"scores":[NaN]}',
        '{"key":"a.jpg","width":10,"height":8,"boxes":[[1.0,2.0,5.0,6.0]],"scores":[0.5],'
        '"label":"cat"}',
    ]:
        assert not is_objcrop_export((line + "\n").encode()), line
    # a first line that does not end within the bytes looked at is not recognised
    assert not is_objcrop_export(b'{"key":"a.jpg","width":10,"height":8,"boxes":[')
