"""Hostile input files: corpora, COCO JSON, pair files, images, model configs and checkpoints.

Each case asserts the exact outcome: the clean one-line error (naming the file and the fix), the
rows reported bad, or the value that comes back.
"""

import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hostile_checks import assert_clean_error  # noqa: E402
from PIL import Image

from retriever.corpus.coco import convert_coco
from retriever.corpus.pairs import read_pairs
from retriever.corpus.reader import check_corpus_file, read_corpus
from retriever.errors import CorpusError, ImageError, ModelError
from retriever.models import toyworld
from retriever.models.images import load_image
from retriever.models.loading import BUNDLED_DIR, load_model

# --- corpus paths: refused by stat and a 64 KiB sniff, before hashing or a model load -------------


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe.txt")
    return d / "pipe.txt"


def _dev_zero_link(d: Path) -> Path:
    (d / "zero.txt").symlink_to("/dev/zero")
    return d / "zero.txt"


def _directory(d: Path) -> Path:
    (d / "corpus.txt").mkdir()
    return d / "corpus.txt"


def _dangling(d: Path) -> Path:
    (d / "gone.tsv").symlink_to(d / "nowhere.tsv")
    return d / "gone.tsv"


def _write(name: str, data: bytes):
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name

    return make


PATH_CASES = {
    "fifo": (_fifo, "is a FIFO (named pipe), not an ordinary file"),
    "dev-zero-symlink": (_dev_zero_link, "(a symlink to /dev/zero): is a character device"),
    "directory": (_directory, "is a directory; give the corpus file inside it"),
    "missing": (lambda d: d / "typo.tsv", "no such file; check the path"),
    "dangling-symlink": (_dangling, "broken symlink"),
    "empty": (_write("e.txt", b""), "empty file (0 bytes)"),
    "gzip-as-txt": (_write("c.txt", gzip.compress(b"a red star\n")), "gzip-compressed; decompress it first"),
    "utf16": (_write("c.tsv", "caption\na red star\n".encode("utf-16")), "is UTF-16 text; save it as UTF-8"),
    "utf16-no-bom": (_write("c.txt", "a red star\nblue\n".encode("utf-16-le")), "looks binary"),
    "png-as-csv": (_write("c.csv", b"\x89PNG\r\n\x1a\n" + bytes(40)), "a PNG image, not text"),
    "json-array-as-jsonl": (
        _write("c.jsonl", b'[{"caption": "a"}, {"caption": "b"}]\n'),
        "is a JSON array of objects, not JSON Lines",
    ),
    "pretty-json-as-jsonl": (_write("c.jsonl", b'[\n  {"caption": "a"}\n]\n'), "one JSON document over several lines"),
    "text-as-parquet": (_write("c.parquet", b"caption\na red star\n"), "not a readable parquet file (no PAR1 header)"),
    "unknown-suffix": (_write("c.xlsx", b"caption\n"), "unknown format '.xlsx' for a corpus"),
}


@pytest.mark.parametrize("case", PATH_CASES, ids=list(PATH_CASES))
def test_bad_corpus_path_is_one_clean_line_before_the_model(run, tmp_path, case):
    make, fragment = PATH_CASES[case]
    path = make(tmp_path)
    with pytest.raises(CorpusError, match=None) as info:
        check_corpus_file(path)
    assert str(path) in str(info.value) and fragment in str(info.value)
    # --model names weights that do not exist: reaching load_model would be a different error.
    result = run(
        "build-index",
        path,
        "--model",
        "ViT-B-32",
        "--pretrained",
        tmp_path / "no-weights.pt",
        "--out",
        tmp_path / "idx",
    )
    assert_clean_error(result, str(path), fragment)
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero-symlink", "directory"])
def test_read_corpus_and_pairs_refuse_non_files(tmp_path, kind):
    path = tmp_path / "pairs.tsv"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    fragment = {"fifo": "is a FIFO", "dev-zero-symlink": "is a character device", "directory": "is a directory"}[kind]
    for read in (read_corpus, read_pairs):
        with pytest.raises(CorpusError, match=None) as info:
            read(path)
        assert str(path) in str(info.value) and fragment in str(info.value)


def test_typo_in_build_index_never_imports_torch(tmp_path):
    """A FIFO corpus (which would hang a hash) fails in a fresh process without torch or open_clip."""
    os.mkfifo(tmp_path / "pipe.txt")
    code = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from retriever.cli import app
        r = CliRunner().invoke(app, ["build-index", {str(tmp_path / "pipe.txt")!r}, "--model", "toyworld"])
        print(r.exit_code, "torch" in sys.modules, "open_clip" in sys.modules)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.stdout.split() == ["1", "False", "False"], out.stderr


@pytest.mark.parametrize("case", ["fifo", "dev-zero-symlink", "directory", "missing"])
def test_coco_inputs_are_checked_before_reading(tmp_path, case):
    make, fragment = PATH_CASES[case]
    path = make(tmp_path)
    with pytest.raises(CorpusError, match=None) as info:
        convert_coco(tmp_path / "out.tsv", annotations=[path], captions_only=True)
    assert str(path) in str(info.value) and fragment.split(" (")[0].split(";")[0] in str(info.value)


# --- corpus values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,kind",
    [
        ({"en": "a cat"}, "an object"),
        (["a", "cat"], "a list"),
        (True, "a boolean"),
        (42, "a number"),
        (1.5, "a number"),
    ],
)
def test_jsonl_non_string_text_is_a_bad_row_not_its_repr(tmp_path, value, kind):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"caption": "a red star"}) + "\n" + json.dumps({"caption": value}) + "\n")
    corpus = read_corpus(path)
    assert corpus.texts == ["a red star"]
    assert [(b.line, b.reason) for b in corpus.report.bad_rows] == [(2, f"text is {kind}, not a string")]


def test_parquet_text_columns_of_other_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"caption": pa.array([b"a red star", b"\xff\xfe", b"blue circle"], pa.binary()), "n": [1, 2, 3]}),
        tmp_path / "b.parquet",
    )
    corpus = read_corpus(tmp_path / "b.parquet")
    assert corpus.texts == ["a red star", "blue circle"] and corpus.metadata == [{"n": 1}, {"n": 3}]
    assert [(b.line, b.reason.split(" (")[0]) for b in corpus.report.bad_rows] == [
        (2, "text is bytes that are not UTF-8")
    ]
    pq.write_table(pa.table({"caption": [7, 8]}), tmp_path / "i.parquet")
    with pytest.raises(CorpusError, match=r"i\.parquet:1: text is a number, not a string"):
        read_corpus(tmp_path / "i.parquet", strict=True)


def test_nul_and_control_only_lines_are_empty_not_texts(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"a red star\n\x00\n\x00\x00 \x01\nblue\x00circle\n")
    corpus = read_corpus(path)
    assert corpus.texts == ["a red star", "blue circle"]
    assert (corpus.report.empty, corpus.report.kept) == (2, 2)


def test_surrogates_text_is_a_bad_row_metadata_is_replaced(tmp_path, toy_model):
    from retriever.index.build import build_index
    from retriever.index.store import read_index

    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"caption": "a red star", "note": "x\\ud800y", "\\udfff": 1}\n'
        '{"caption": "bad \\ud800 text"}\n{"caption": "a blue circle", "note": "fine"}\n'
    )
    corpus = read_corpus(path)
    assert corpus.texts == ["a red star", "a blue circle"]
    assert corpus.metadata[0] == {"note": "x\ufffdy", "\ufffd": 1}
    assert [(b.line, b.reason.split(" (")[0]) for b in corpus.report.bad_rows] == [(2, "text holds a lone surrogate")]
    index = read_index(build_index(path, tmp_path / "idx", toy_model, show_progress_bar=False).path)
    assert [r["note"] for r in index.rows([0, 1])] == ["x\ufffdy", "fine"]


def test_metadata_changing_type_across_chunks_builds(tmp_path, toy_model):
    from retriever.index.build import build_index
    from retriever.index.store import read_index

    values = [1, 2, {"a": [1, 2]}, {"b": None}, [3, "x"], "text", 2**70, None]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"caption": f"caption {i}", "m": v}) + "\n" for i, v in enumerate(values)))
    index = read_index(build_index(path, tmp_path / "idx", toy_model, chunk_size=2, show_progress_bar=False).path)
    got = [r["m"] for r in index.rows(list(range(len(values))))]
    assert got == ["1", "2", '{"a": [1, 2]}', '{"b": null}', '[3, "x"]', "text", str(2**70), None]


def test_id_and_corpus_id_are_both_kept(tmp_path, toy_model):
    from retriever.index.build import build_index
    from retriever.index.store import read_index

    path = tmp_path / "c.tsv"
    path.write_text("caption\tid\tcorpus_id\na red star\tu-1\tc-1\na blue circle\tu-2\tc-2\n")
    index = read_index(build_index(path, tmp_path / "idx", toy_model, show_progress_bar=False).path)
    rows = index.rows([0, 1])
    assert [(r["id"], r["corpus_id"], r["corpus_corpus_id"]) for r in rows] == [(0, "c-1", "u-1"), (1, "c-2", "u-2")]


def test_jsonl_text_key_is_chosen_from_a_sample(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [{"title": "only a title", "n": 0}] + [{"caption": f"caption {i}", "n": i} for i in range(1, 6)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    corpus = read_corpus(path)
    assert corpus.column == "caption" and len(corpus.texts) == 5
    assert [(b.line, b.reason) for b in corpus.report.bad_rows] == [(1, "no 'caption' key")]


def test_deeply_nested_json_line_and_coco_file(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    path = tmp_path / "c.jsonl"
    path.write_text('{"caption": "a red star"}\n{"caption": ' + deep + "}\n")
    corpus = read_corpus(path)
    assert corpus.texts == ["a red star"]
    assert [(b.line, b.reason) for b in corpus.report.bad_rows] == [(2, "JSON nested too deeply to read")]
    coco = tmp_path / "captions_val2014.json"
    coco.write_text('{"images": ' + deep + "}")
    with pytest.raises(CorpusError, match=r"captions_val2014\.json: JSON nested too deeply to read"):
        convert_coco(tmp_path / "out.tsv", annotations=[coco], captions_only=True)


def test_coco_caption_surrogate_is_cleaned(tmp_path):
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(
        '{"images": [{"id": 1, "file_name": "a.jpg"}], '
        '"annotations": [{"image_id": 1, "caption": "a \\ud800 cat\\u0000"}]}'
    )
    convert_coco(tmp_path / "out.tsv", annotations=[coco], captions_only=True)
    assert (tmp_path / "out.tsv").read_text(encoding="utf-8") == "caption\na \ufffd cat\n"


def test_pairs_non_string_caption_and_path(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    path = tmp_path / "p.jsonl"
    rows = [
        {"filepath": "a.png", "title": "a red star"},
        {"filepath": "a.png", "title": {"x": 1}},
        {"filepath": 5, "title": "five"},
        {"filepath": "a.png", "title": "\u0000"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_pairs(path)
    assert pairs.captions == ["a red star"]
    assert [(b.line, b.reason) for b in pairs.report.bad_rows] == [
        (2, "text is an object, not a string"),
        (3, "image path is 5, not a string"),
        (4, "empty caption"),
    ]


# --- images -------------------------------------------------------------------------------------


def _scene_image():
    scene = next(s for s in toyworld.all_scenes() if s.size == "large" and "left" in s.caption)
    return toyworld.render(scene, seed=7), scene.caption


def _cos(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_exif_orientation_is_applied(tmp_path, toy_model):
    from retriever.models.encoder import Encoder

    upright, _ = _scene_image()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "photo.png", exif=exif.tobytes())
    loaded = load_image(tmp_path / "photo.png")
    assert np.array_equal(np.asarray(loaded), np.asarray(upright.convert("RGB")))
    enc = Encoder(toy_model)
    assert _cos(enc.encode_image(loaded), enc.encode_image(upright)) > 0.9999
    assert _cos(enc.encode_image(stored), enc.encode_image(upright)) < 0.99  # the check can fail


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_is_scaled_not_clipped(tmp_path, toy_model, mode):
    from retriever.models.encoder import Encoder

    grey = _scene_image()[0].convert("L")
    a = np.asarray(grey).astype(np.float64)
    if mode == "F":
        image, path = Image.fromarray((a / 255).astype(np.float32)), tmp_path / "float.tiff"
    elif mode == "I":
        image, path = Image.fromarray((a * 257).astype(np.int32)), tmp_path / "int32.tiff"
    else:
        image, path = Image.fromarray((a * 257).astype(np.uint16)), tmp_path / "deep.png"
    image.save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I") or raw.mode == "F"
    loaded = load_image(path)
    assert np.abs(np.asarray(loaded.convert("L"), dtype=int) - np.asarray(grey, dtype=int)).max() <= 1
    enc = Encoder(toy_model)
    assert _cos(enc.encode_image(loaded), enc.encode_image(grey.convert("RGB"))) > 0.999


@pytest.mark.parametrize("size", [(100_000, 1), (1, 1_000_000), (4000, 2)])
def test_extreme_aspect_ratio_refused_before_resizing(run, tmp_path, toy_index, size):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (200, 20, 20)).save(path, optimize=True)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.kind == "too_large" and f"{size[0]}x{size[1]} is too elongated" in str(info.value)
    assert_clean_error(run("query", path, "--index", toy_index), str(path), "too elongated")


def test_elongated_in_memory_image_refused_by_the_model_preprocess(toy_model):
    from retriever.models.encoder import Encoder

    with pytest.raises(ImageError) as info:
        Encoder(toy_model).encode_image(Image.new("RGB", (100_000, 1)))
    assert info.value.kind == "too_large" and "too elongated" in info.value.reason
    # a 20:1 banner is an ordinary image and still encodes
    assert Encoder(toy_model).encode_image(Image.new("RGB", (2000, 100))).shape == (toy_model.embed_dim,)


def test_normal_image_vectors_unchanged(tmp_path, toy_model, toy_images):
    from retriever.models.encoder import Encoder

    enc = Encoder(toy_model)
    for path, _ in toy_images[:3]:
        with Image.open(path) as raw:
            plain = enc.encode_image(raw.convert("RGB"))
        assert np.array_equal(enc.encode_image(load_image(path)), plain)


def test_eps_is_never_handed_to_ghostscript(tmp_path):
    path = tmp_path / "evil.png"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(x) print\n")
    with Image.open(path) as im:  # Pillow alone would take it as EPS and run gs on load
        assert im.format == "EPS"
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.kind == "not_image" and "formats read: PNG, JPEG" in info.value.reason


def test_fifo_image_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "q.png")
    with pytest.raises(ImageError, match="not an ordinary file") as info:
        load_image(tmp_path / "q.png")
    assert info.value.kind == "not_image"


# --- model configs and checkpoints ----------------------------------------------------------------


def _model_dir(tmp_path: Path, edit) -> Path:
    d = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR / "toyworld", d)
    cfg = json.loads((d / "open_clip_config.json").read_text())
    edit(cfg)
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    return d


CONFIG_CASES = {
    "100k-layers": (
        lambda c: c["model_cfg"]["vision_cfg"].update(layers=100_000, width=1_000_000),
        "parameters (limit 5e+09)",
    ),
    "wide-text": (lambda c: c["model_cfg"]["text_cfg"].update(width=10**6), "parameters (limit 5e+09)"),
    "long-context": (
        lambda c: c["model_cfg"]["text_cfg"].update(context_length=10**6),
        "text_cfg.context_length is 1000000",
    ),
    "huge-image": (lambda c: c["model_cfg"]["vision_cfg"].update(image_size=10**6), "vision_cfg.image_size is 1000000"),
    "huge-preprocess": (lambda c: c["preprocess_cfg"].update(size=10**7), "preprocess_cfg.size is 10000000"),
    "string-layers": (
        lambda c: c["model_cfg"]["text_cfg"].update(layers="many"),
        "text_cfg.layers should be a positive integer",
    ),
    "negative-width": (
        lambda c: c["model_cfg"]["vision_cfg"].update(width=-5),
        "vision_cfg.width should be a positive integer",
    ),
    "coca-decoder": (lambda c: c["model_cfg"].update(multimodal_cfg={"width": 10**6, "layers": 1000}), "parameters"),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_absurd_local_dir_config_refused_before_building(run, tmp_path, case):
    edit, fragment = CONFIG_CASES[case]
    d = _model_dir(tmp_path, edit)
    with pytest.raises(ModelError) as info:
        load_model(f"local-dir:{d}", device="cpu")
    assert str(d / "open_clip_config.json") in str(info.value) and fragment in str(info.value)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n")
    assert_clean_error(run("build-index", corpus, "--model", f"local-dir:{d}", "--out", tmp_path / "idx"), fragment)


def test_downloaded_index_naming_an_absurd_model_is_refused(run, tmp_path, toy_index, toy_images):
    d = _model_dir(tmp_path, CONFIG_CASES["100k-layers"][0])
    index = tmp_path / "index"
    shutil.copytree(toy_index, index)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["model"]["name"] = f"local-dir:{d}"
    (index / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run("query", toy_images[0][0], "--index", index), str(d / "open_clip_config.json"), "parameters")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_file(kind: str, path: Path, marker: Path) -> None:
    import torch

    if kind == "torch-save":
        torch.save({"state_dict": _Evil(marker)}, path)
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps({"weight": _Evil(marker)}, protocol=2))
    else:
        path.write_bytes(b"\x80\x04garbage that is not a checkpoint" * 10)


@pytest.mark.parametrize("kind", ["torch-save", "raw-pickle", "garbage"])
def test_pickled_pretrained_is_refused_and_runs_nothing(run, tmp_path, kind):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "weights.pt"
    _pickle_file(kind, ckpt, marker)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n")
    result = run("build-index", corpus, "--model", "ViT-B-32", "--pretrained", ckpt, "--out", tmp_path / "idx")
    assert_clean_error(result, str(ckpt), "refused as a checkpoint", "never pickled code")
    assert not marker.exists()


def test_pickled_weights_in_a_local_dir_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    d = _model_dir(tmp_path, lambda c: None)
    (d / "open_clip_model.safetensors").unlink()
    _pickle_file("torch-save", d / "open_clip_pytorch_model.bin", marker)
    with pytest.raises(ModelError, match="refused as a checkpoint"):
        load_model(f"local-dir:{d}", device="cpu")
    assert not marker.exists()


def test_garbage_safetensors_is_a_clean_error(run, tmp_path):
    d = _model_dir(tmp_path, lambda c: None)
    (d / "open_clip_model.safetensors").write_bytes(b"\xff" * 64)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n")
    assert_clean_error(
        run("build-index", corpus, "--model", f"local-dir:{d}", "--out", tmp_path / "idx"), "cannot load local-dir:"
    )


def test_image_source_name_survives_for_errors(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    from retriever.models.images import SOURCE_KEY, image_from_bytes

    assert image_from_bytes(buf.getvalue(), "upload.png").info[SOURCE_KEY] == "upload.png"
