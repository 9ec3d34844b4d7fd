"""Hybrid mode (retrieve, generate when retrieval is weak, rerank) and generation from the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from retriever.cli import app
from retriever.errors import ModelError, RetrieverError
from retriever.index.build import build_index
from retriever.models import toyworld
from retriever.search.api import Retriever

MISSING_SHAPE = "star"  # every star caption is left out of the partial index


@pytest.fixture(scope="module")
def partial_index(tmp_path_factory, toy_model):
    path = tmp_path_factory.mktemp("partial") / "corpus.txt"
    path.write_text("\n".join(c for c in toyworld.all_captions() if MISSING_SHAPE not in c) + "\n")
    out = path.parent / "idx"
    build_index(path, out, toy_model, show_progress_bar=False)
    return out


@pytest.fixture(scope="module")
def hybrid(partial_index):
    return Retriever.open(partial_index, generator="toyworld-coca")


@pytest.fixture(scope="module")
def heldout():
    return list(toyworld.sample(96, seed=4242))


def test_missing_captions_come_back_generated_and_first(hybrid, heldout):
    stars = [(im, cap) for im, cap in heldout if MISSING_SHAPE in cap]
    assert len(stars) >= 15
    results = hybrid.query_many([im for im, _ in stars], k=5, mode="hybrid")
    right = [hits[0].text == cap and hits[0].source == "generated" for hits, (_, cap) in zip(results, stars)]
    assert np.mean(right) >= 0.85  # the v2 toy models: 16 of 18 (CoCa errs on two small stars)
    top = results[0][0]
    assert top.id is None and top.score is not None and top.metadata == {}


def test_hybrid_is_never_worse_than_retrieval(hybrid, heldout):
    images, truth = [im for im, _ in heldout], [cap for _, cap in heldout]
    retrieved = hybrid.query_many(images, k=5)
    mixed = hybrid.query_many(images, k=5, mode="hybrid")
    r = np.mean([h[0].text == t for h, t in zip(retrieved, truth)])
    m = np.mean([h[0].text == t for h, t in zip(mixed, truth)])
    print(f"exact match: retrieve {r:.3f}, hybrid {m:.3f}")
    assert m >= r and m >= 0.9
    # present captions keep their retrieved hit on top: generation only fills the gaps
    kept = [h[0].source for h, t in zip(mixed, truth) if MISSING_SHAPE not in t]
    assert kept.count("retrieved") / len(kept) >= 0.9


def test_hybrid_merges_sorted_by_score_with_sources(hybrid, heldout):
    hits = hybrid.query(heldout[0][0], k=4, mode="hybrid", always_generate=True, n_generate=3)
    assert len(hits) == 4 and {h.source for h in hits} <= {"retrieved", "generated"}
    assert "generated" in {h.source for h in hits} or len({h.text for h in hits}) == 4
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert len({h.text for h in hits}) == len(hits)


def test_generate_mode_needs_no_index(heldout):
    retriever = Retriever.open(generator="toyworld-coca")
    (hits,) = retriever.query_many([heldout[1][0]], mode="generate")
    assert hits[0].text == heldout[1][1] and hits[0].source == "generated" and hits[0].score is None
    with pytest.raises(RetrieverError, match="needs an index"):
        retriever.query(heldout[1][0])


def test_generator_must_be_coca(partial_index):
    with pytest.raises(ModelError, match="needs a CoCa model"):
        Retriever.open(partial_index, generator="toyworld")
    with pytest.raises(RetrieverError, match="unknown mode"):
        Retriever.open(partial_index).query_many([np.zeros((1,))], mode="poetry")


def _write(tmp_path, pairs):
    paths = []
    for i, (image, _) in enumerate(pairs):
        paths.append(tmp_path / f"i{i}.png")
        image.save(paths[-1])
    return paths


def test_cli_generate_hybrid_and_caption(tmp_path, partial_index, heldout):
    runner = CliRunner()
    star = next(p for p in heldout if MISSING_SHAPE in p[1])
    (path,) = _write(tmp_path, [star])
    result = runner.invoke(
        app,
        [
            "query",
            str(path),
            "--mode",
            "hybrid",
            "--generator",
            "toyworld-coca",
            "--index",
            str(partial_index),
            "-k",
            "3",
            "--json",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout.splitlines()[0])
    assert first["text"] == star[1] and first["source"] == "generated" and first["id"] is None
    result = runner.invoke(
        app,
        ["caption", str(path), str(tmp_path / "missing.png"), "--generator", "toyworld-coca", "--beams", "4", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 1 and "missing.png" in result.stderr
    line = json.loads(result.stdout)
    assert line["text"] == star[1] and line["image"] == str(path)
    result = runner.invoke(
        app,
        ["query", str(path), "--mode", "generate", "--generator", "toyworld-coca", "--decoding", "greedy"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0 and star[1] in result.stdout and "generated" in result.stdout


def test_cli_generation_errors(tmp_path, partial_index, heldout):
    runner = CliRunner()
    (path,) = _write(tmp_path, heldout[:1])
    result = runner.invoke(app, ["caption", str(path), "--generator", "toyworld"], catch_exceptions=False)
    assert result.exit_code == 1 and "needs a CoCa model" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["caption", str(path)], catch_exceptions=False)  # the hub default, offline
    assert result.exit_code == 1 and "HF_HUB_OFFLINE" in result.stderr
    result = runner.invoke(app, ["query", str(path), "--mode", "nonsense", "--index", str(partial_index)])
    assert result.exit_code == 2
