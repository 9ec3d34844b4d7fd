"""Chinese end to end with the bundled toyworld-zh: build, query, tables, JSON, the server."""

import json
from pathlib import Path

import pytest

from retriever.models import toyworld
from retriever.models.loading import BUNDLED_DIR, bundled_models, list_models, load_model

EXAMPLE = Path(__file__).parents[1] / "examples" / "toyworld-zh.tsv"


@pytest.fixture(scope="module")
def zh_model():
    return load_model("toyworld-zh", device="cpu")


@pytest.fixture(scope="module")
def zh_index(tmp_path_factory, zh_model):
    from retriever.index.build import build_index

    return build_index(EXAMPLE, tmp_path_factory.mktemp("zh") / "idx", zh_model, show_progress_bar=False).path


def test_toyworld_zh_is_bundled_small_and_a_chinese_clip(zh_model):
    assert "toyworld-zh" in bundled_models()
    assert next(r for r in list_models() if r["model"] == "toyworld-zh")["available_offline"]
    assert any(r["model"] == "cn-clip:ViT-B-16" for r in list_models())
    size = sum(p.stat().st_size for p in (BUNDLED_DIR / "toyworld-zh").iterdir())
    assert size <= 16 * 2**20
    assert zh_model.extra["family"] == "cn-clip" and zh_model.fingerprint.startswith("sha256:")
    config = json.loads((BUNDLED_DIR / "toyworld-zh" / "cn_clip_config.json").read_text(encoding="utf-8"))
    assert config["training"]["script"] == "scripts/train_toyworld_zh.py"


def test_example_corpus_is_the_256_chinese_captions():
    rows = EXAMPLE.read_text(encoding="utf-8").splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == toyworld.all_captions("zh")
    assert "左边有一个大的红色五角星" in toyworld.all_captions("zh")


def test_toy_images_lang_zh_then_build_and_query_in_chinese(run, tmp_path):
    result = run("toy-images", tmp_path / "imgs", "-n", "4", "--lang", "zh", "--seed", "3")
    assert result.exit_code == 0, result.output
    rows = [
        line.split("\t") for line in (tmp_path / "imgs" / "captions.tsv").read_text(encoding="utf-8").splitlines()[1:]
    ]
    assert all(caption in toyworld.all_captions("zh") for _, caption in rows)
    assert run("toy-images", tmp_path / "x", "--lang", "fr").exit_code == 2

    out = tmp_path / "idx"
    result = run("build-index", EXAMPLE, "--model", "toyworld-zh", "--out", out)
    assert result.exit_code == 0, result.output
    images = [str(tmp_path / "imgs" / name) for name, _ in rows]
    result = run("query", *images, "-k", "1", "--index", out, "--json")
    assert result.exit_code == 0, result.output
    assert "\\u" not in result.stdout  # UTF-8, not escapes a user must undo
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert sum(h["text"] == caption for h, (_, caption) in zip(hits, rows)) >= 3

    result = run("query", "--text", "红色五角星", "-k", "3", "--index", out)
    assert result.exit_code == 0, result.output
    assert "五角星" in result.stdout


def test_table_columns_line_up_with_wide_characters(run, zh_index):
    from rich.cells import cell_len

    result = run("query", "--text", "左边有一个大的红色五角星", "-k", "3", "--index", zh_index)
    assert result.exit_code == 0
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert "左边有一个大的红色五角星" in result.stdout
    widths = {cell_len(line) for line in lines}
    assert len(widths) == 1, lines  # every row and border has the same display width
    bar = next(line for line in lines if "┃" in line or "│" in line)
    for line in lines:  # the column separators sit at the same display columns
        if "│" in line or "┃" in line:
            cols = [cell_len(line[:i]) for i, ch in enumerate(line) if ch in "│┃"]
            assert cols == [cell_len(bar[:i]) for i, ch in enumerate(bar) if ch in "│┃"]


def test_server_answers_in_utf8_and_dedupes_width_forms(zh_index):
    from fastapi.testclient import TestClient

    from retriever.search.api import Retriever
    from retriever.serve.app import ServerSettings, create_app
    from retriever.serve.query import _dedupe

    with TestClient(
        create_app({"zh": Retriever.open(zh_index)}, ServerSettings()), base_url="http://127.0.0.1"
    ) as client:
        r = client.post("/v1/query", json={"text": "左边有一个大的红色五角星", "k": 2, "dedupe": True})
        assert r.status_code == 200, r.text
        assert "左边有一个大的红色五角星".encode() in r.content and b"\\u" not in r.content
        assert r.json()["hits"][0]["text"] == "左边有一个大的红色五角星"
        page = client.get("/")
        assert "charset=utf-8" in page.headers["content-type"]
        hit = r.json()["hits"][0]
    # The server's dedupe of hits: full-/half-width forms and spaces between ideographs are one text.
    from types import SimpleNamespace

    kept = _dedupe([SimpleNamespace(text=t) for t in ("红色五角星，ＡＢＣ", "红色 五角星,abc", "蓝色圆形")])
    assert [h.text for h in kept] == ["红色五角星，ＡＢＣ", "蓝色圆形"] and hit["rank"] == 1


def test_toyworld_zh_quality_on_held_out_renders_with_10k_unseen_distractors(zh_model, tmp_path):
    """Issue 14's target: R@1 >= 0.95 on held-out renders against the 256 Chinese captions plus
    10,000 lines that describe no scene, half of them captions with one attribute swapped for a
    word training never showed (梯形, 银色, 右上角, ...), half random characters. Held out means
    rendering styles training never drew; the classic look (new images of a training-like style)
    gets a floor: there the shared English image tower itself scores about 0.95, so the Chinese
    model, which keeps that tower, cannot do better (bench/toy_zh.py)."""
    import sys

    import numpy as np

    from retriever.index.build import build_index
    from retriever.search.api import Retriever

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from train_toyworld_zh import distractor_lines

    corpus = tmp_path / "corpus.txt"
    lines = toyworld.all_captions("zh") + distractor_lines(10_000, seed=31, words="test")
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = build_index(corpus, tmp_path / "idx", zh_model, show_progress_bar=False)
    assert out.report.kept == 10_256
    retriever = Retriever.open(out.path)
    scores = {}
    for style in [None, *toyworld.HELD_OUT_STYLES]:
        pairs = list(toyworld.sample(256, seed=77, style=style, lang="zh"))  # the English test's images
        results = retriever.query_many([im for im, _ in pairs], k=1)
        scores[style or "classic"] = np.mean([hits[0].text == caption for hits, (_, caption) in zip(results, pairs)])
    sys.path.insert(0, str(Path(__file__).parent / "models"))
    from alt_toyworld import sample as alt_sample  # another renderer of the same world, English captions

    chinese = {scene.caption: scene.caption_zh for scene in toyworld.all_scenes()}
    pairs = [(image, chinese[caption]) for image, caption in alt_sample(256, seed=77)]
    results = retriever.query_many([im for im, _ in pairs], k=1)
    scores["alt-renderer"] = np.mean([hits[0].text == caption for hits, (_, caption) in zip(results, pairs)])
    print(f"toyworld-zh R@1 with 10,000 distractors: {scores}")
    assert min(scores[style] for style in [*toyworld.HELD_OUT_STYLES, "alt-renderer"]) >= 0.95, scores
    assert scores["classic"] >= 0.93, scores
