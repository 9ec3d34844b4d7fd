import json

from PIL import Image


def test_build_index_then_query_table(run, tmp_path, toy_corpus, toy_images):
    out = tmp_path / "idx"
    result = run("build-index", toy_corpus, "--model", "toyworld", "--out", out)
    assert result.exit_code == 0, result.output
    assert "indexed 256 texts" in result.stderr
    path, caption = toy_images[0]
    result = run("query", path, "-k", "3", "--index", out)
    assert result.exit_code == 0
    assert caption in result.stdout and "rank" in result.stdout


def test_build_index_json_summary_counts_duplicates_and_bad_rows(run, tmp_path):
    corpus = tmp_path / "c.tsv"
    corpus.write_text("title\textra\na red star\t1\na red star\t2\nbroken row\n\t3\nblue circle\t4\n")
    result = run("build-index", corpus, "--model", "toyworld", "--out", tmp_path / "i", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert (summary["kept"], summary["duplicates"], summary["empty"], summary["bad_rows"]) == (2, 1, 1, 1)
    assert f"{corpus}:4: expected 2 fields, found 1" in result.stderr


def test_strict_makes_bad_rows_fatal(run, tmp_path):
    corpus = tmp_path / "c.tsv"
    corpus.write_text("title\textra\nok\t1\nbroken\n")
    result = run("build-index", corpus, "--model", "toyworld", "--out", tmp_path / "i", "--strict")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "c.tsv:3" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "i").exists()


def test_query_json_schema(run, toy_index, toy_images):
    result = run("query", toy_images[0][0], toy_images[1][0], "-k", "2", "--index", toy_index, "--json")
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4
    assert set(lines[0]) == {"image", "rank", "text", "score", "id", "metadata", "source", "index"}
    assert [l["rank"] for l in lines] == [1, 2, 1, 2]
    assert lines[0]["text"] == toy_images[0][1] and lines[2]["text"] == toy_images[1][1]


def test_query_folder_and_glob(run, toy_index, toy_images):
    folder = toy_images[0][0].parent
    for target in (folder, f"{folder}/img[0-2].png"):
        result = run("query", target, "-k", "1", "--index", toy_index, "--json")
        assert result.exit_code == 0
        images = [json.loads(line)["image"] for line in result.stdout.splitlines()]
        assert len(images) == (8 if target == folder else 3)


def test_query_text(run, toy_index):
    result = run("query", "--text", "a small green square on the top", "-k", "1", "--index", toy_index, "--json")
    hit = json.loads(result.stdout)
    assert hit["query_text"] == "a small green square on the top" and hit["text"] == "a small green square on the top"


def test_bad_images_are_named_and_the_rest_answered(run, toy_index, toy_images, tmp_path, monkeypatch):
    good, caption = toy_images[0]
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not a picture")
    raw = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    Image.new("RGB", (300, 300)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 90,000 px is then a "bomb" (> 2x the limit)
    Image.new("RGB", (250, 250)).save(tmp_path / "nearbomb.png")  # 62,500 px: only Pillow's warning zone
    bad = ["missing.png", "zero.png", "text.jpg", "truncated.png", "bomb.png", "nearbomb.png"]
    result = run("query", good, *[tmp_path / b for b in bad], "-k", "1", "--index", toy_index, "--json")
    assert result.exit_code == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == len(bad)
    for name, line in zip(bad, errors):
        assert line.startswith("error: ") and name in line
    assert "no such file" in errors[0] and "0 bytes" in errors[1] and "not an image" in errors[2]
    assert "truncated" in errors[3] and "decompression bomb" in errors[4] and "decompression bomb" in errors[5]
    assert "Traceback" not in result.output
    assert json.loads(result.stdout)["text"] == caption


def test_usage_errors_exit_2(run, toy_index):
    assert run("query", "--index", toy_index).exit_code == 2
    assert run("query", "x.png", "-k", "0", "--index", toy_index).exit_code == 2


def test_missing_index_and_model_errors_are_one_line(run, tmp_path, toy_corpus):
    result = run("query", "x.png", "--index", tmp_path / "nope")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "no such index" in result.stderr
    result = run("build-index", toy_corpus, "--out", tmp_path / "i")  # default hub model, offline
    assert result.exit_code == 1 and "HF_HUB_OFFLINE" in result.stderr and "--model toyworld" in result.stderr


def test_info_and_models(run, toy_index):
    result = run("info", toy_index, "--json")
    assert json.loads(result.stdout)["count"] == 256
    result = run("models", "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {"model": "toyworld", "pretrained": None, "source": "bundled", "available_offline": True} in rows


def test_toy_images_command(run, tmp_path):
    result = run("toy-images", tmp_path / "imgs", "-n", "3")
    assert result.exit_code == 0
    lines = (tmp_path / "imgs" / "captions.tsv").read_text().splitlines()
    assert lines[0] == "filepath\ttitle" and len(lines) == 4
    assert (tmp_path / "imgs" / lines[1].split("\t")[0]).is_file()
