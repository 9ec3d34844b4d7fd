"""Chinese end to end with the bundled toyworld-zh: build, query, tables, JSON, the server, quality."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from retriever.models import toyworld
from retriever.models.loading import BUNDLED_DIR, bundled_models, list_models, load_model

EXAMPLE = Path(__file__).parents[1] / "examples" / "toyworld-zh.tsv"


def distractor_lines(n: int, seed: int) -> list[str]:
    """The training script's generator of non-captions, with the words training never saw."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    try:
        from train_toyworld_zh import distractor_lines as lines
    finally:
        sys.path.pop(0)
    return lines(n, seed=seed, words="test")


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
    rows = [line.split("\t") for line in (tmp_path / "imgs" / "captions.tsv").read_text(encoding="utf-8").splitlines()[1:]]
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
    from retriever.serve.app import ServerSettings, _dedupe, create_app

    with TestClient(create_app({"zh": Retriever.open(zh_index)}, ServerSettings())) as client:
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


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="issue 14's target (R@1 >= 0.95) is not reached yet: the bundled toyworld-zh "
                   "measures 0.36 (random styles) / 0.57 (classic) with these distractors; it trains 250 CPU steps "
                   "from the v1 English image tower; needs a longer run or a v2 image tower")
def test_toyworld_zh_quality_with_10k_chinese_distractors(zh_model, tmp_path):
    """Held-out renders (other seeds, random training-like styles) against the 256 Chinese captions
    plus 10,000 Chinese lines that describe no scene (near-misses with unseen words, random text)."""
    from retriever.index.build import build_index
    from retriever.search.api import Retriever

    distractors = distractor_lines(10_000, seed=777)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(toyworld.all_captions("zh") + distractors) + "\n", encoding="utf-8")
    out = build_index(corpus, tmp_path / "idx", zh_model, show_progress_bar=False)
    assert out.report.kept >= 256 + 10_000
    retriever = Retriever.open(out.path)
    pairs = list(toyworld.sample(400, seed=2024, style="random", lang="zh"))
    results = retriever.query_many([im for im, _ in pairs], k=1)
    r_at_1 = np.mean([hits[0].text == caption for hits, (_, caption) in zip(results, pairs)])
    print(f"toyworld-zh R@1 with {out.report.kept - 256} distractors: {r_at_1:.3f}")
    assert r_at_1 >= 0.95
