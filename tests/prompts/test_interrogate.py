"""`retriever interrogate`: clip-interrogator's prompt modes over label tables built with build_index.

The toy model's text tower was trained on whole captions and on partial ones from fixed templates
(`toyworld.PARTIAL_TEMPLATES`), so the test tables use two of those templates: a colours table
("a red shape") and a shapes table ("a star on the left"), against 100 of clip-interrogator's
flavors as distractors.
"""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from retriever.errors import IndexFormatError, MissingExtraError, RetrieverError
from retriever.models import toyworld
from retriever.models.encoder import Encoder
from retriever.prompts.interrogate import Interrogator
from retriever.prompts.label_tables import (
    BUILTIN_TABLES,
    builtin_labels,
    data_dir,
    ensure_builtin_tables,
    ensure_table,
    list_hash,
    load_table,
    parse_builtin,
    rank_tables,
    read_list,
)

COLOUR_LABELS = [f"a {c} shape" for c in toyworld.COLOURS]
SHAPE_LABELS = [f"a {s} on the {p}" for s in toyworld.SHAPES for p in toyworld.POSITIONS]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test touches ~/.cache: the default cache root is a fresh temp dir."""
    monkeypatch.setenv("RETRIEVER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def table_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tables")


@pytest.fixture(scope="module")
def toy_tables(toy_model, table_root):
    lists = {"colours": COLOUR_LABELS, "shapes": SHAPE_LABELS, "flavors": read_list(data_dir() / "flavors.txt")[:100]}
    return [
        load_table(name, ensure_table(name, labels, toy_model, table_root, show_progress_bar=False).path, toy_model)
        for name, labels in lists.items()
    ]


@pytest.fixture(scope="module")
def interrogator(toy_model, toy_tables):
    return Interrogator(toy_model, toy_tables)


@pytest.fixture(scope="module")
def large_images(tmp_path_factory):
    """The `toy_images` images (large shapes, same seeds), shared by this module's tests."""
    rng = np.random.default_rng(123)
    large = [s for s in toyworld.all_scenes() if s.size == "large"]
    root = tmp_path_factory.mktemp("images")
    pairs = []
    for i in range(8):
        scene = large[int(rng.integers(len(large)))]
        toyworld.render(scene, seed=1000 + i).save(root / f"img{i}.png")
        pairs.append((root / f"img{i}.png", scene))
    return pairs


@pytest.fixture(scope="module")
def best_prompts(interrogator, large_images):
    return interrogator.interrogate_many([p for p, _ in large_images], mode="best", caption="")


def _names(words: list[str], terms: list[dict]) -> list[str]:
    """The words of `words` that the terms name, in prompt order."""
    return [w for t in terms for w in t["text"].split() if w in words]


def test_best_prompt_names_the_colour_and_shape(interrogator, large_images, best_prompts):
    """No base caption: the greedy chain picks, out of 124 terms, the image's colour and shape first
    (chance: 1 image in 32). The v3 toy model chains "a green shape, a star on the bottom" for one
    of these squares (its plain retrieval reads it right), so 7 of 8 must be right."""
    right = []
    for result, (path, scene) in zip(best_prompts, large_images):
        colours = _names(list(toyworld.COLOURS), result.terms.get("colours", []))
        shapes = _names(list(toyworld.SHAPES), result.terms.get("shapes", []))
        right.append(colours[:1] == [scene.colour] and shapes[:1] == [scene.shape])
        assert result.image == str(path) and result.caption == "" and result.mode == "best"
        assert interrogator.fits(result.prompt)
        # The reported similarity is the prompt's cosine to the image.
        xq = interrogator.encoder.encode_image(Image.open(path))
        assert result.similarity == pytest.approx(float(interrogator.encoder.encode_text(result.prompt) @ xq), abs=1e-5)
    assert sum(right) >= 7, [r.prompt for r in best_prompts]


def test_classic_and_fast_pick_the_colour_and_shape(interrogator, large_images):
    """Classic takes each table's top term; fast the top terms of all tables together. Chance
    would get both right for 1 image in 32; the toy model reads one of these squares as a
    circle given only "... on the bottom", and lone fragments rank below some distractors."""
    images = [p for p, _ in large_images]
    scenes = [s for _, s in large_images]
    for mode, at_least in (("classic", 6), ("fast", 5)):
        right = 0
        for result, scene in zip(interrogator.interrogate_many(images, mode=mode, caption=""), scenes):
            colours = _names(list(toyworld.COLOURS), result.terms.get("colours", []))
            shapes = _names(list(toyworld.SHAPES), result.terms.get("shapes", []))
            right += colours[:1] == [scene.colour] and shapes[:1] == [scene.shape]
            assert interrogator.fits(result.prompt)
        assert right >= at_least, mode


def test_negative_prompt_avoids_the_image(interrogator, large_images, best_prompts):
    images = [p for p, _ in large_images]
    negative = interrogator.interrogate_many(images, mode="negative", caption="a large red star")
    for neg, pos, (_, scene) in zip(negative, best_prompts, large_images):
        named = _names([scene.colour, scene.shape], [t for terms in neg.terms.values() for t in terms])
        assert named == [], (scene.caption, neg.prompt)
        assert neg.caption == "" and neg.similarity < pos.similarity
        assert interrogator.fits(neg.prompt)


def _reference_chain(encoder, xq, phrases, best_prompt, min_count, max_count):
    """clip-interrogator 0.6.0's `chain` (positive, from a caption), transcribed with this encoder."""
    phrases = list(dict.fromkeys(phrases))
    best_sim = float(encoder.encode_text(best_prompt) @ xq)
    curr_prompt, curr_sim = best_prompt, best_sim
    for idx in range(max_count):
        candidates = [f"{curr_prompt}, {f}" for f in phrases]
        sims = encoder.encode_text(candidates, show_progress_bar=False) @ xq
        flave, sim = phrases[int(sims.argmax())], float(sims.max())
        if sim > best_sim:
            best_prompt, best_sim = f"{curr_prompt}, {flave}", sim
        if sim > curr_sim or idx < min_count:
            curr_prompt, curr_sim = f"{curr_prompt}, {flave}", sim
        else:
            break
        phrases.remove(flave)
    return best_prompt


def test_chain_matches_clip_interrogator(interrogator, toy_model, toy_tables, large_images):
    """Where prompts stay inside the context, the chain is clip-interrogator's, step for step."""
    encoder = Encoder(toy_model)
    short = [t for t in toy_tables[2].labels if len(t.split()) <= 2][:20]
    for path, _ in large_images[:3]:
        xq = encoder.encode_image(Image.open(path))
        terms = [t for t in rank_tables(interrogator.tables, xq, 200) if t.category != "flavors" or t.text in short]
        for min_count, max_count in ((0, 4), (3, 4)):
            ours = interrogator.builder.chain(xq, terms, "a large", None, min_count, max_count)
            expected = _reference_chain(encoder, xq, [t.text for t in terms], "a large", min_count, max_count)
            assert ", ".join(p.text for p in ours) == expected
            assert interrogator.fits(expected)


def test_chain_never_exceeds_the_context(interrogator, large_images):
    """min_flavors forces additions; the toy context (32 tokens) stops the chain, not truncation."""
    result = interrogator.interrogate(large_images[0][0], mode="best", caption="a large shape", min_flavors=32)
    assert interrogator.fits(result.prompt)
    assert len(result.prompt.split(", ")) > 3


@pytest.fixture(scope="module")
def classic_tables(toy_model, table_root):
    """Small versions of clip-interrogator's tables, under its names."""
    artists = read_list(data_dir() / "artists.txt")[:30]
    lists = {
        "mediums": builtin_labels("mediums"),
        "artists": [f"by {a}" for a in artists],
        "trendings": builtin_labels("trendings"),
        "movements": builtin_labels("movements"),
        "flavors": read_list(data_dir() / "flavors.txt")[:100],
    }
    return {
        name: load_table(
            name, ensure_table(name, labels, toy_model, table_root, show_progress_bar=False).path, toy_model
        )
        for name, labels in lists.items()
    }


def test_classic_prompt_format(toy_model, classic_tables, large_images):
    it = Interrogator(toy_model, list(classic_tables.values()))
    xq = it.encoder.encode_image(Image.open(large_images[0][0]))
    top = {name: table.rank(xq, 3) for name, table in classic_tables.items()}
    medium, artist, trending, movement = (top[n][0].text for n in ("mediums", "artists", "trendings", "movements"))
    flavors = [t.text for t in top["flavors"]]
    full = f"a photo, {medium} {artist}, {trending}, {movement}, {', '.join(flavors)}"
    result = it.interrogate(large_images[0][0], mode="classic", caption="a photo")
    assert full.startswith(result.prompt) and it.fits(result.prompt)
    rest = full[len(result.prompt) :]
    assert rest == "" or (rest.startswith(", ") and not it.fits(result.prompt + ", " + rest[2:].split(", ")[0]))
    assert result.terms["mediums"][0]["text"] == medium and result.terms["artists"][0]["text"] == artist
    # A caption that already names the medium gets the artist straight after it.
    result = it.interrogate(large_images[0][0], mode="classic", caption=f"{medium} of a star")
    assert result.prompt.startswith(f"{medium} of a star {artist}, ") and "mediums" not in result.terms


def test_best_keeps_the_most_similar_candidate(toy_model, classic_tables, large_images):
    it = Interrogator(toy_model, list(classic_tables.values()))
    path = large_images[1][0]
    best = it.interrogate(path, mode="best", caption="a photo")
    # best's candidates: the caption alone, fast and classic (both with best's 32 terms), and the chain.
    candidates = [
        it.interrogate(path, mode=m, caption="a photo", max_flavors=n)
        for m, n in (("fast", 0), ("fast", 32), ("classic", 32))
    ]
    assert candidates[0].prompt == "a photo"
    assert best.similarity >= max(c.similarity for c in candidates) - 1e-5
    assert best.prompt.startswith("a photo")


def test_builtin_tables_are_formed_like_clip_interrogator():
    raw = read_list(data_dir() / "artists.txt")
    artists = builtin_labels("artists")
    assert (
        len(artists) == 2 * len(raw) and artists[0] == f"by {raw[0]}" and artists[len(raw)] == f"inspired by {raw[0]}"
    )
    trendings = builtin_labels("trendings")
    assert len(trendings) == 72
    assert {"Artstation", "trending on Artstation", "featured on pixiv", "zbrush central contest winner"} <= set(
        trendings
    )
    assert len(builtin_labels("flavors")) > 100_000
    assert parse_builtin("all") == BUILTIN_TABLES and parse_builtin("none") == ()
    assert parse_builtin("mediums, movements") == ("mediums", "movements")
    with pytest.raises(RetrieverError, match="unknown built-in table 'colours'"):
        parse_builtin("mediums,colours")


def test_missing_clip_interrogator_names_the_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingExtraError, match=r"pip install --no-deps clip-interrogator==0\.6\.0"):
        builtin_labels("mediums")


def test_tables_are_cached_per_model_and_list(toy_model, private_cache):
    """The first call embeds; the second finds the same index directory and embeds nothing."""
    first = ensure_builtin_tables(toy_model, ["mediums", "movements"], show_progress_bar=False)
    assert [s.built for s in first] == [True, True]
    assert all(str(s.path).startswith(str(private_cache / "tables" / "toyworld-")) for s in first)
    assert first[0].path.name == f"mediums-{list_hash(builtin_labels('mediums'))[:16]}"
    stamps = [((s.path / "index.faiss").stat().st_mtime_ns, (s.path / "manifest.json").read_text()) for s in first]
    start = time.perf_counter()
    second = ensure_builtin_tables(toy_model, ["mediums", "movements"], show_progress_bar=False)
    assert [s.built for s in second] == [False, False] and [s.path for s in second] == [s.path for s in first]
    assert [s.count for s in second] == [len(builtin_labels("mediums")), len(builtin_labels("movements"))]
    assert stamps == [
        ((s.path / "index.faiss").stat().st_mtime_ns, (s.path / "manifest.json").read_text()) for s in second
    ]
    assert time.perf_counter() - start < 1.0
    # Another list under the same name is another entry.
    changed = ensure_table("mediums", builtin_labels("mediums")[:10], toy_model, show_progress_bar=False)
    assert changed.built and changed.path != first[0].path and changed.path.parent == first[0].path.parent


def test_xdg_cache_home_is_respected(monkeypatch, tmp_path):
    from retriever.prompts.label_tables import cache_dir

    monkeypatch.delenv("RETRIEVER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "retriever"
    assert cache_dir(tmp_path / "mine") == tmp_path / "mine"


@pytest.fixture(scope="module")
def coca_colours(tmp_path_factory):
    """A colours table built by another model (the toy CoCa) with build_index."""
    from retriever.index.build import build_index
    from retriever.models.loading import load_model

    root = tmp_path_factory.mktemp("coca")
    (root / "colours.txt").write_text("\n".join(COLOUR_LABELS) + "\n")
    return build_index(
        root / "colours.txt", root / "colours", load_model("toyworld-coca", device="cpu"), show_progress_bar=False
    ).path


def test_table_from_another_model_is_an_error(toy_model, coca_colours):
    with pytest.raises(IndexFormatError, match="built with toyworld-coca, not toyworld"):
        load_table("colours", coca_colours, toy_model)


TOY = ("--model", "toyworld", "--builtin", "mediums,movements")


def test_cli_json_schema_with_generated_caption(run, tmp_path, toy_images, private_cache):
    colours = tmp_path / "colours.txt"
    colours.write_text("\n".join(COLOUR_LABELS) + "\n")
    paths = [p for p, _ in toy_images[:2]]
    result = run(
        "interrogate",
        *paths,
        *TOY,
        "--table",
        f"colours={colours}",
        "--caption-model",
        "toyworld-coca",
        "--mode",
        "fast",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert "embedding the mediums table (95 labels)" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in paths]
    for line, (_, caption) in zip(lines, toy_images):
        assert set(line) == {"image", "mode", "prompt", "caption", "similarity", "terms"}
        assert line["mode"] == "fast" and line["caption"] == caption  # toy CoCa writes the true caption
        assert line["prompt"].startswith(caption + ", ") and -1 <= line["similarity"] <= 1
        assert set(line["terms"]) <= {"mediums", "movements", "colours"} and line["terms"]
        for terms in line["terms"].values():
            assert all(set(t) == {"text", "score"} and t["text"] in line["prompt"] for t in terms)
    # Tables are now cached: the second run embeds nothing.
    stamp = {p: p.stat().st_mtime_ns for p in private_cache.rglob("index.faiss")}
    assert len(stamp) == 3
    again = run(
        "interrogate", paths[0], *TOY, "--table", f"colours={colours}", "--caption", "a photo", "--mode", "classic"
    )
    assert again.exit_code == 0 and "embedding" not in again.stderr
    assert again.stdout.startswith("a photo, ") and again.stdout.count("\n") == 1
    assert stamp == {p: p.stat().st_mtime_ns for p in private_cache.rglob("index.faiss")}


def test_cli_bad_image_is_reported_and_others_answered(run, tmp_path, toy_images):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    result = run("interrogate", toy_images[0][0], bad, *TOY, "--no-caption", "--mode", "classic")
    assert result.exit_code == 1
    assert f"error: {bad}: not an image" in result.stderr
    assert result.stdout.startswith(f"{toy_images[0][0]}\t") and result.stdout.count("\n") == 1


def test_cli_caption_from_index(run, toy_index, toy_images):
    path, caption = toy_images[2]
    result = run("interrogate", path, *TOY, "--index", toy_index, "--mode", "best", "--json")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    assert line["caption"] == caption and line["prompt"].startswith(caption)


def test_cli_table_from_another_model_is_a_clear_error(run, toy_images, coca_colours):
    result = run("interrogate", toy_images[0][0], *TOY, "--no-caption", "--table", f"colours={coca_colours}")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "built with toyworld-coca, not toyworld" in result.stderr
    assert "embedding" not in result.stderr  # found before any built-in table is embedded
    assert "Traceback" not in result.output


def test_cli_usage_errors(run, toy_images, tmp_path):
    image = toy_images[0][0]
    for args, hint in (
        (("--mode", "weird"), "--mode"),
        (("--caption", "x", "--no-caption"), "--caption-model"),
        (("--table", "nopath"), "--table"),
    ):
        result = run("interrogate", image, *TOY, *args)
        assert result.exit_code == 2 and hint in result.output
    result = run("interrogate", image, *TOY, "--no-caption", "--table", f"colours={tmp_path / 'missing'}")
    assert result.exit_code == 1 and "does not exist" in result.stderr
    result = run("interrogate", image, "--model", "toyworld", "--builtin", "mediums,colours")
    assert result.exit_code == 2 and "unknown built-in table 'colours'" in result.output


def test_cli_interrogate_tables(run, private_cache):
    result = run("interrogate-tables", "--model", "toyworld", "--builtin", "trendings,negative", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["table"], r["built"]) for r in rows] == [("trendings", True), ("negative", True)]
    assert rows[0]["count"] == 72 and rows[0]["path"].startswith(str(private_cache))
    result = run("interrogate-tables", "--model", "toyworld", "--builtin", "trendings,negative")
    assert result.exit_code == 0 and "trendings: 72 labels, cached" in result.stderr


@pytest.mark.slow
def test_full_builtin_tables_with_toy_model(toy_model, toy_images):
    """Every clip-interrogator table (~116k labels) embedded with the toy model; then every mode."""
    start = time.perf_counter()
    statuses = ensure_builtin_tables(toy_model, show_progress_bar=False)
    built = time.perf_counter() - start
    assert [s.name for s in statuses] == list(BUILTIN_TABLES) and all(s.built for s in statuses)
    start = time.perf_counter()
    it = Interrogator.open(toy_model)
    reopened = time.perf_counter() - start
    print(f"built all tables in {built:.1f}s ({sum(s.count for s in statuses)} labels); reopened in {reopened:.2f}s")
    for mode in ("best", "fast", "classic", "negative"):
        result = it.interrogate(toy_images[0][0], mode=mode, caption="a photo")
        assert result.prompt and it.fits(result.prompt)
    assert os.environ["RETRIEVER_CACHE"]


def test_chinese_chain_scores_the_prompt_it_writes(toy_model, large_images):
    """Next to Chinese the prompt joins with `，`; each chain step's score is that text's."""
    from retriever.corpus.cjk import join_phrases
    from retriever.prompts.label_tables import Term
    from retriever.prompts.modes import PromptBuilder

    builder = PromptBuilder(toy_model, [])
    xq = Encoder(toy_model).encode_image(Image.open(large_images[0][0]))
    terms = [Term(text, "zh", 0.0) for text in ("红色", "星形", "on the left", "a large star")]
    chosen = builder.chain(xq, terms, "一张图片", None, 2, 3)
    prompt = join_phrases([p.text for p in chosen])
    assert "，" in prompt
    steps = []
    builder.on_step = lambda i, n, best: steps.append(best)
    builder.chain(xq, terms, "一张图片", None, 3, 3)
    # The first step's best score is a prompt's as written (with `，`), not one joined by ", ".
    first = max(float(Encoder(toy_model).encode_text([join_phrases(["一张图片", t.text])])[0] @ xq) for t in terms)
    assert steps[0] == pytest.approx(first, abs=1e-4)


def test_fit_test_uses_the_tokenizers_own_padding(toy_model):
    """XLM-R towers pad with id 1, not 0: "fits" must look for their padding."""
    import dataclasses

    from retriever.prompts.modes import PromptBuilder

    class PadsWithOne:
        pad_token_id = 1
        context_length = toy_model.tokenizer.context_length

        def __call__(self, texts):
            tokens = toy_model.tokenizer(texts)
            return tokens.masked_fill(tokens == 0, 1)

    padded = dataclasses.replace(toy_model, tokenizer=PadsWithOne())
    builder = PromptBuilder(padded, [])
    assert padded.pad_token_id == 1 and toy_model.pad_token_id == 0
    assert builder.fits("a large red star")
    assert not builder.fits(", ".join(["a large red star"] * 20))
