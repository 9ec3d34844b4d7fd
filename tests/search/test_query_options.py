"""Steering, blends, more-like-this, filters and several indexes through the Retriever API and CLI."""

import json

import pytest

from retriever.errors import RetrieverError
from retriever.models import toyworld
from retriever.search.api import Retriever


@pytest.fixture(scope="module")
def retriever(toy_index):
    return Retriever.open(toy_index, device="cpu")


@pytest.fixture(scope="module")
def second_index(tmp_path_factory, toy_model):
    """Another index from the same model: lines no toy caption contains."""
    from retriever.index.build import build_index

    corpus = tmp_path_factory.mktemp("second") / "extra.txt"
    corpus.write_text("a photograph of a cat\nan oil painting of a harbour\nmy own line about a red star\n")
    out = corpus.parent / "extra"
    build_index(corpus, out, toy_model, show_progress_bar=False)
    return out


@pytest.fixture(scope="module")
def red_star(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "star.png"
    toyworld.render(toyworld.Scene("large", "red", "star", "left"), seed=3).save(path)
    return path


def test_plain_query_names_its_index(retriever, red_star, toy_index):
    hits = retriever.query(red_star, k=3)
    assert hits[0].text == "a large red star on the left" and hits[0].index == toy_index.name


def test_where_keeps_only_matching_rows(retriever, red_star):
    hits = retriever.query(red_star, k=5, where='shape = "circle"')
    assert len(hits) == 5 and all(h.metadata["shape"] == "circle" for h in hits)
    # No circle is in the image: the nearest circle keeps its colour and place (its size is a toss-up).
    assert hits[0].metadata["colour"] == "red" and hits[0].text.endswith("on the left")
    narrow = retriever.query(red_star, k=5, where='shape = "circle" and colour = "red" and len <= 30')
    assert all(h.metadata["colour"] == "red" and h.metadata["shape"] == "circle" and len(h.text) <= 30 for h in narrow)
    assert narrow[0].text.endswith("on the left")


def test_a_where_mask_is_computed_once_per_expression(toy_index, red_star, monkeypatch):
    import retriever.search.filters as filters

    fresh = Retriever.open(toy_index, device="cpu")
    calls = []
    real = filters.where_rows
    monkeypatch.setattr(filters, "where_rows", lambda *a: calls.append(a[1]) or real(*a))
    first = fresh.query(red_star, k=3, where='colour = "blue"')
    again = fresh.query(red_star, k=3, where='colour = "blue"')
    other = fresh.query(red_star, k=3, where='colour = "green"')
    assert calls == ['colour = "blue"', 'colour = "green"']
    assert [h.text for h in first] == [h.text for h in again] and all(h.metadata["colour"] == "blue" for h in again)
    assert all(h.metadata["colour"] == "green" for h in other)
    with pytest.raises(ValueError):  # a cached mask cannot be changed by a caller
        next(iter(fresh._masks.values())).words[0] = 0


def test_minus_pushes_away_and_plus_pushes_towards(retriever, red_star):
    pushed = retriever.query(red_star, k=1, plus=["a large blue star on the left:2"])[0]
    assert pushed.text == "a large blue star on the left"
    away = retriever.query(red_star, k=1, minus=[("a large red star on the left", 0.9)])[0]
    assert away.text != "a large red star on the left"


def test_text_combines_with_the_image(retriever, red_star):
    both = retriever.query(red_star, k=1, text="a large red circle on the left")[0]
    assert both.text in ("a large red star on the left", "a large red circle on the left")


def test_blend_of_two_images(retriever, red_star, tmp_path):
    blue = tmp_path / "blue.png"
    toyworld.render(toyworld.Scene("large", "blue", "star", "left"), seed=4).save(blue)
    one = retriever.query_blend([red_star, blue], weights=[1, 0.0001], k=1)[0]
    assert one.text == "a large red star on the left"
    other = retriever.query_blend([red_star, blue], weights=[0.0001, 1], k=1)[0]
    assert other.text == "a large blue star on the left"


def test_more_like_this_starts_with_itself(retriever):
    row = retriever.query_text("a small green square on the top", k=1)[0]
    like = retriever.more_like(row.id, k=3)
    assert like[0].id == row.id and like[0].score == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(RetrieverError, match="no row"):
        retriever.more_like(10**6)


def test_diversity_keeps_the_first_hit_and_spreads_the_rest(retriever, red_star):
    plain = retriever.query(red_star, k=8)
    diverse = retriever.query(red_star, k=8, diversity=0.7)
    assert diverse[0].text == plain[0].text
    assert len({h.metadata["colour"] for h in diverse}) >= len({h.metadata["colour"] for h in plain})
    assert [h.text for h in diverse] != [h.text for h in plain]


def test_several_indexes_merge_by_score(toy_index, second_index, red_star):
    both = Retriever.open([toy_index, second_index], device="cpu")
    hits = both.query_text("my own line about a red star", k=3)
    assert hits[0].text == "my own line about a red star" and hits[0].index == second_index.name
    assert {h.index for h in both.query(red_star, k=300)} == {toy_index.name, second_index.name}
    scores = [h.score for h in both.query(red_star, k=20)]
    assert scores == sorted(scores, reverse=True)


def test_an_index_of_another_model_is_refused(toy_index, tmp_path):
    import shutil

    from retriever.index.store import MANIFEST

    other = tmp_path / "other"
    shutil.copytree(toy_index, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["model"]["fingerprint"] = "sha256:" + "0" * 64
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RetrieverError, match="share one model"):
        Retriever.open([toy_index, other], device="cpu")


def test_the_same_index_twice_is_refused(toy_index):
    again = toy_index.parent / ".." / toy_index.parent.name / toy_index.name  # another spelling
    with pytest.raises(RetrieverError, match="the same index as"):
        Retriever.open([toy_index, again], device="cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"diversity": 2.0}, "diversity"),
        ({"diversity": "0.5"}, "diversity must be a number, got '0.5'"),
        ({"fetch_k": 100.0}, "fetch_k must be a whole number"),
        ({"dedupe": True}, "dedupe must be a number"),
        ({"dedupe": 0.0}, "dedupe"),
        ({"where": "nope = 1"}, "no column"),
        ({"plus": [":0.5"]}, "empty modifier"),
        ({"text": "  "}, "empty"),
    ],
)
def test_bad_options_are_clear(retriever, red_star, kwargs, message):
    with pytest.raises(RetrieverError, match=message):
        retriever.query(red_star, k=3, **kwargs)


def test_cli_steering_filter_and_diversity(run, toy_index, red_star):
    result = run(
        "query", red_star, "--index", toy_index, "-k", "3", "--plus", "a large blue star on the left:2", "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["text"] == "a large blue star on the left"
    result = run(
        "query",
        red_star,
        "--index",
        toy_index,
        "-k",
        "4",
        "--where",
        'shape = "square"',
        "--diversity",
        "0.5",
        "--json",
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4 and all(r["metadata"]["shape"] == "square" for r in rows)
    assert rows[0]["text"] == "a large red square on the left"


def test_cli_where_with_few_matches_says_so(run, toy_index, red_star):
    result = run("query", red_star, "--index", toy_index, "-k", "5", "--where", 'text = "a small red star on the top"')
    assert result.exit_code == 0 and "only 1 indexed texts match --where" in result.stderr


def test_cli_like_blend_and_several_indexes(run, toy_index, second_index, red_star, tmp_path):
    result = run("query", "--like", "0", "--index", toy_index, "-k", "2", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout.splitlines()[0])["id"] == 0
    blue = tmp_path / "blue.png"
    toyworld.render(toyworld.Scene("large", "blue", "star", "left"), seed=4).save(blue)
    result = run("query", f"{red_star}:1", f"{blue}:0.0001", "--blend", "--index", toy_index, "-k", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["text"] == "a large red star on the left"
    result = run(
        "query",
        "--text",
        "my own line about a red star",
        "--index",
        toy_index,
        "--index",
        second_index,
        "-k",
        "2",
        "--json",
    )
    first = json.loads(result.stdout.splitlines()[0])
    assert first["text"] == "my own line about a red star" and first["index"] == second_index.name


@pytest.mark.parametrize(
    "args, hint",
    [
        (["--dedupe", "2"], "--dedupe"),
        (["--dedupe", "lots"], "--dedupe"),
        (["--blend"], "--blend"),
        (["--like", "1"], "--like"),
        (["--diversity", "1.5"], "--diversity"),
    ],
)
def test_cli_usage_errors(run, toy_index, red_star, args, hint):
    result = run("query", red_star, "--index", toy_index, *args)
    assert result.exit_code == 2 and hint in result.stderr


def test_cli_dedupe_off_keeps_near_copies(run, tmp_path, toy_model):
    from retriever.index.build import build_index

    corpus = tmp_path / "c.txt"
    corpus.write_text(
        "a large red star on the left\na large red star on the left side\na large red star to the left\n"
        "a small blue circle on the top\n"
    )
    build_index(corpus, tmp_path / "i", toy_model, show_progress_bar=False)
    image = tmp_path / "s.png"
    toyworld.render(toyworld.Scene("large", "red", "star", "left"), seed=1).save(image)
    collapsed = run(
        "query", image, "--index", tmp_path / "i", "-k", "4", "--dedupe", "0.9", "--json"
    ).stdout.splitlines()
    kept = run("query", image, "--index", tmp_path / "i", "-k", "4", "--dedupe", "off", "--json").stdout.splitlines()
    assert len(kept) == 4 and len(collapsed) < 4
