import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from retriever.cli import app
from retriever.corpus.coco import clean_caption, convert_coco
from retriever.corpus.reader import read_corpus
from retriever.errors import CorpusError


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, ["corpus", "coco", *[str(a) for a in args]], catch_exceptions=False)

    return invoke


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)


def _name(split, cocoid):
    return f"COCO_{split}_{cocoid:012d}.jpg"


@pytest.fixture
def coco(tmp_path):
    """A COCO captions file for 4 images (3 on disk under train2014/, 1 missing), with messy captions."""
    images = tmp_path / "coco"
    for cocoid in (1, 2, 3):
        _png(images / "train2014" / _name("train2014", cocoid))
    data = {
        "info": {"year": 2014},
        "images": [{"id": i, "file_name": _name("train2014", i), "width": 4, "height": 4} for i in (1, 2, 3, 4)],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A red square\ton a\nwhite table. "},
            {"image_id": 1, "id": 11, "caption": "  a red   square  "},
            {"image_id": 2, "id": 12, "caption": 'Two "quoted" cats.\r\n'},
            {"image_id": 2, "id": 13, "caption": " \t\n "},
            {"image_id": 3, "id": 14, "caption": "a red square"},
            {"image_id": 4, "id": 15, "caption": "an image nobody downloaded"},
            {"image_id": 4, "id": 16, "caption": "its second caption"},
            {"image_id": 99, "id": 17, "caption": "a caption of no listed image"},
        ],
    }
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps(data))
    return path, images


def _rows(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0], [line.split("\t") for line in lines[1:]]


def test_annotations_to_tsv_one_row_per_caption(run, coco, tmp_path):
    annotations, images = coco
    out = tmp_path / "out" / "train.tsv"
    result = run("--annotations", annotations, "--images", images, "--out", out)
    assert result.exit_code == 0, result.output
    header, rows = _rows(out)
    assert header == "filepath\ttitle"
    assert all(len(row) == 2 for row in rows)
    assert [caption for _, caption in rows] == [
        "A red square on a white table.",
        "a red square",
        'Two "quoted" cats.',
        "a red square",
    ]
    for filepath, _ in rows:  # relative to the TSV's folder, found under DIR/train2014/
        assert not filepath.startswith("/")
        assert (out.parent / filepath).resolve() == (images / "train2014" / filepath.rsplit("/", 1)[1]).resolve()
        assert (out.parent / filepath).is_file()
    assert "1 images referenced by the annotations are not in" in result.stderr
    assert "2 captions skipped" in result.stderr
    assert "1 empty captions dropped" in result.stderr
    assert "wrote 4 captions of 3 images" in result.stderr
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_tsv_reads_back_as_a_corpus(run, coco, tmp_path):
    annotations, images = coco
    out = tmp_path / "train.tsv"
    assert run("--annotations", annotations, "--images", images, "--out", out).exit_code == 0
    corpus = read_corpus(out)
    assert corpus.column == "title"
    assert corpus.texts == ["A red square on a white table.", "a red square", 'Two "quoted" cats.']
    assert corpus.report.duplicates == 1 and corpus.report.bad_rows == []
    assert (out.parent / corpus.metadata[0]["filepath"]).is_file()


def test_json_summary_and_keep_missing(run, coco, tmp_path):
    annotations, images = coco
    out = tmp_path / "all.tsv"
    result = run("--annotations", annotations, "--images", images, "--out", out, "--keep-missing", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["captions"], summary["missing_images"], summary["skipped_captions"]) == (
        4,
        6,
        1,
        0,
    )
    assert (summary["empty_captions"], summary["unmatched_captions"]) == (1, 1)
    assert summary["splits"]["all"]["path"] == str(out)
    _, rows = _rows(out)
    assert len(rows) == 6
    missing = [filepath for filepath, caption in rows if caption == "its second caption"]
    assert missing == [f"coco/{_name('train2014', 4)}"]  # where it was looked for first: DIR/FILE_NAME


def test_library_call_and_caption_cleaning(coco, tmp_path):
    annotations, images = coco
    report = convert_coco(tmp_path / "lib.tsv", annotations=[annotations], images=images)
    assert report.totals["captions"] == 4 and report.totals["missing_images"] == 1
    assert report.images_checked
    assert clean_caption(" a\tb\n\nc\x00d\u2028e  ") == "a b c d e"


@pytest.fixture
def karpathy(tmp_path):
    """A Karpathy file: 2 train, 1 restval, 1 val, 2 test images; one test image is missing and
    one val image sits directly in DIR instead of DIR/val2014/."""
    images = tmp_path / "coco"
    spec = [
        (1, "train2014", "train"),
        (2, "train2014", "train"),
        (3, "val2014", "restval"),
        (4, "val2014", "val"),
        (5, "val2014", "test"),
        (6, "val2014", "test"),
    ]
    entries = []
    for cocoid, folder, split in spec:
        if cocoid == 4:
            _png(images / _name(folder, cocoid))
        elif cocoid != 6:
            _png(images / folder / _name(folder, cocoid))
        sentences = [{"raw": f"karpathy caption {j} of image {cocoid}", "tokens": ["x"]} for j in range(cocoid)]
        entries.append(
            {
                "filepath": folder,
                "filename": _name(folder, cocoid),
                "cocoid": cocoid,
                "imgid": cocoid - 1,
                "split": split,
                "sentences": sentences,
            }
        )
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path, images


def test_karpathy_splits_restval_goes_to_train(run, karpathy, tmp_path):
    path, images = karpathy
    out = tmp_path / "splits"
    result = run("--karpathy", path, "--images", images, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["test.tsv", "train.tsv", "val.tsv"]
    counts = {split: (s["images"], s["captions"], s["missing_images"]) for split, s in summary["splits"].items()}
    assert counts == {"train": (3, 1 + 2 + 3, 0), "val": (1, 4, 0), "test": (1, 5, 1)}
    for split in ("train", "val", "test"):
        header, rows = _rows(out / f"{split}.tsv")
        assert header == "filepath\ttitle" and len(rows) == counts[split][1]
        assert all((out / filepath).is_file() for filepath, _ in rows)
    _, val = _rows(out / "val.tsv")
    assert val[0][0] == f"../coco/{_name('val2014', 4)}"  # DIR/FILENAME when DIR/FILEPATH/FILENAME is absent
    assert read_corpus(out / "train.tsv", column="title").texts[0] == "karpathy caption 0 of image 1"


def test_karpathy_with_annotations_prefers_the_annotations(run, karpathy, tmp_path):
    path, images = karpathy
    annotations = tmp_path / "captions_val2014.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": _name("val2014", i)} for i in (3, 4, 5, 6)],
                "annotations": [
                    {"image_id": i, "id": 100 + i, "caption": f"official caption of {i}"} for i in (3, 4, 5, 6)
                ],
            }
        )
    )
    out = tmp_path / "splits"
    result = run("--karpathy", path, "--annotations", annotations, "--images", images, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["karpathy_captions_used"] == 1 + 2  # images 1 and 2 are not in the annotations
    _, train = _rows(out / "train.tsv")
    assert [c for _, c in train] == [
        "karpathy caption 0 of image 1",
        "karpathy caption 0 of image 2",
        "karpathy caption 1 of image 2",
        "official caption of 3",
    ]
    _, test = _rows(out / "test.tsv")
    assert [c for _, c in test] == ["official caption of 5"]


def test_captions_only_feeds_build_index(run, karpathy, tmp_path, toy_model):
    from retriever.index.build import build_index

    path, _ = karpathy
    out = tmp_path / "captions"
    result = run("--karpathy", path, "--out", out, "--captions-only")  # no --images needed
    assert result.exit_code == 0, result.output
    assert "not checked" in result.stderr
    lines = (out / "train.tsv").read_text().splitlines()
    assert lines[0] == "caption" and len(lines) == 1 + 6
    assert read_corpus(out / "test.tsv").texts == [
        f"karpathy caption {j} of image {i}" for i in (5, 6) for j in range(i)
    ]
    result = build_index(out / "train.tsv", tmp_path / "index", toy_model, show_progress_bar=False)
    assert result.as_dict()["kept"] == 6


def test_captions_only_txt_is_deduplicated(run, coco, tmp_path):
    annotations, _ = coco
    data = json.loads(annotations.read_text())
    data["annotations"].append({"image_id": 2, "id": 18, "caption": 'Two "quoted"  cats.'})  # a repeat within one image
    annotations.write_text(json.dumps(data))
    out = tmp_path / "captions.txt"
    result = run("--annotations", annotations, "--out", out, "--captions-only", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["duplicates"] == 2
    assert out.read_text().splitlines() == [
        "A red square on a white table.",
        "a red square",
        'Two "quoted" cats.',
        "an image nobody downloaded",
        "its second caption",
    ]
    assert read_corpus(out).texts == out.read_text().splitlines()


def test_malformed_json_names_file_and_line(run, tmp_path):
    bad = tmp_path / "captions_bad.json"
    bad.write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    result = run("--annotations", bad, "--images", tmp_path, "--out", tmp_path / "o.tsv")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {bad}:3:")
    assert "invalid JSON" in result.stderr and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.tsv").exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {
                "images": [{"id": 1, "file_name": "a.jpg"}],
                "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 1}],
            },
            "annotations[1] has no 'caption'",
        ),
        ({"images": [{"id": 1}], "annotations": []}, "images[0] has no 'file_name'"),
        ({"annotations": []}, "the top level has no 'images'"),
        ([{"id": 1}], "the top level should be a JSON object, found an array"),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": 7}]},
            "annotations[0]['caption'] should be a string, found a number",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []},
            "images[1] repeats image id 1",
        ),
    ],
)
def test_bad_annotations_name_the_entry(run, tmp_path, data, message):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    result = run("--annotations", path, "--images", tmp_path, "--out", tmp_path / "o.tsv")
    assert result.exit_code == 1
    assert result.stderr == f"error: {path}: {message}\n"


def test_bad_karpathy_entries(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "holdout", "sentences": []}]}))
    with pytest.raises(CorpusError, match=r"images\[0\] has split 'holdout'; expected one of train, restval"):
        convert_coco(tmp_path / "out", karpathy=path, captions_only=True)
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "val", "sentences": [{"tokens": []}]}]}))
    with pytest.raises(CorpusError, match=r"images\[0\]\['sentences'\]\[0\] has no 'raw'"):
        convert_coco(tmp_path / "out", karpathy=path, captions_only=True)
    with pytest.raises(CorpusError, match="no such file"):
        convert_coco(tmp_path / "out", karpathy=tmp_path / "nope.json", captions_only=True)


def test_output_rules(run, coco, karpathy, tmp_path):
    annotations, images = coco
    out = tmp_path / "train.tsv"
    assert run("--annotations", annotations, "--images", images, "--out", out).exit_code == 0
    result = run("--annotations", annotations, "--images", images, "--out", out)
    assert result.exit_code == 1 and "already exists (use --overwrite" in result.stderr
    assert run("--annotations", annotations, "--images", images, "--out", out, "--overwrite").exit_code == 0
    result = run("--karpathy", karpathy[0], "--images", images, "--out", tmp_path / "k.tsv")
    assert result.exit_code == 1 and "the output is a directory" in result.stderr
    result = run("--annotations", annotations, "--images", images, "--out", tmp_path / "x.csv")
    assert result.exit_code == 1 and "should end in .tsv" in result.stderr
    # usage errors exit 2
    assert run("--annotations", annotations, "--out", tmp_path / "y.tsv").exit_code == 2
    assert run("--images", images, "--out", tmp_path / "y.tsv").exit_code == 2


def test_no_images_found_is_an_error(run, coco, tmp_path):
    annotations, _ = coco
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("--annotations", annotations, "--images", empty, "--out", tmp_path / "o.tsv")
    assert result.exit_code == 1
    assert "no captions to write: 4 images not found" in result.stderr
    assert not (tmp_path / "o.tsv").exists()
