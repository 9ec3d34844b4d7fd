"""`retriever eval`: recall, MRR and rank against brute force and against CLIP_benchmark."""

import json

import numpy as np
import pytest

from retriever.models import toyworld
from retriever.search.evaluate import best_positive_rank, intra_list_similarity, ranks_in_index, recall_metrics


@pytest.fixture(scope="module")
def unique_pairs(tmp_path_factory, toy_model):
    """64 toy images, each with its own caption, an index of exactly those captions, and the pairs file."""
    from retriever.index.build import build_index

    root = tmp_path_factory.mktemp("eval")
    scenes = toyworld.all_scenes()[::4]
    lines = ["filepath\ttitle"]
    for i, scene in enumerate(scenes):
        toyworld.render(scene, seed=900 + i).save(root / f"{i}.png")
        lines.append(f"{i}.png\t{scene.caption}")
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n")
    corpus = root / "corpus.tsv"
    corpus.write_text("caption\tshape\tcolour\n" + "".join(f"{s.caption}\t{s.shape}\t{s.colour}\n" for s in scenes))
    build_index(corpus, root / "idx", toy_model, show_progress_bar=False)
    return root


def test_recall_metrics_by_hand():
    m = recall_metrics(np.array([1, 2, 7, np.inf]), "x")
    assert m["x_recall@1"] == 0.25 and m["x_recall@5"] == 0.5 and m["x_recall@10"] == 0.75
    assert m["x_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 7) / 4)
    assert m["x_median_rank"] == 4.5


def test_ranks_against_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 30))
    positive = rng.random((50, 30)) < 0.1
    ranks = best_positive_rank(scores, positive)
    for row, pos, rank in zip(scores, positive, ranks):
        order = np.argsort(-row)
        first = next((i + 1 for i, c in enumerate(order) if pos[c]), np.inf)
        assert rank == first
    I = np.argsort(-scores, axis=1)
    wanted = [set(np.flatnonzero(p).tolist()) for p in positive]
    assert np.array_equal(ranks_in_index(I, wanted), ranks)


def test_intra_list_similarity():
    v = np.eye(3, dtype=np.float32)
    assert intra_list_similarity(v) == 0.0
    assert intra_list_similarity(np.ones((4, 2)) / np.sqrt(2)) == pytest.approx(1.0)
    assert intra_list_similarity(v[:1]) == 0.0


def test_recall_equals_clip_benchmark(unique_pairs, toy_model):
    """Our recall@k is CLIP_benchmark's zero-shot retrieval recall@k (its names: `text_retrieval`
    is image->text, `image_retrieval` is text->image) when every image has its own caption."""
    import torch
    from clip_benchmark.metrics import zeroshot_retrieval
    from PIL import Image

    from retriever.corpus.pairs import read_pairs
    from retriever.search.api import Retriever
    from retriever.search.evaluate import evaluate

    pairs = read_pairs(unique_pairs / "pairs.tsv")
    ours = evaluate(Retriever.open(unique_pairs / "idx", device="cpu"), pairs, k=10).retrieval

    images = torch.stack([toy_model.preprocess(Image.open(p).convert("RGB")) for p in pairs.images])
    loader = [(images[i : i + 16], [[c] for c in pairs.captions[i : i + 16]]) for i in range(0, len(images), 16)]
    theirs = zeroshot_retrieval.evaluate(
        toy_model.model, loader, toy_model.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
    )
    for k in (1, 5, 10):
        assert ours[f"image_to_text_recall@{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"])
        assert ours[f"text_to_image_recall@{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"])
    assert ours["image_to_text_recall@1"] > 0.9  # the toy model finds its captions


def test_eval_cli_sweep_and_json(unique_pairs, run):
    result = run("eval", unique_pairs / "pairs.tsv", "--index", unique_pairs / "idx", "--sweep", "k=1,5", "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["options"] for r in rows] == [{"k": 1}, {"k": 5}]
    assert rows[0]["intra_list_similarity"] == 0.0  # one hit: no pairs to compare
    assert 0 < rows[1]["intra_list_similarity"] < 1
    assert rows[0]["image_to_text_recall@1"] == rows[0]["top1_true_caption"]
    assert rows[1]["distinct_per_list"]["colour"] > 1


@pytest.mark.parametrize("sweep", ["diversity", "=1,2", "no such=1"])
def test_eval_rejects_a_malformed_sweep(unique_pairs, run, sweep):
    result = run("eval", unique_pairs / "pairs.tsv", "--index", unique_pairs / "idx", "--sweep", sweep)
    assert result.exit_code == 2 and "NAME=V1,V2" in result.stderr


def test_eval_unknown_option_is_one_line(unique_pairs, run):
    result = run("eval", unique_pairs / "pairs.tsv", "--index", unique_pairs / "idx", "--sweep", "colourfulness=1")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown query option")


@pytest.mark.parametrize(
    ("sweep", "says"),
    [
        ("diversity=a", "error: diversity must be a number, got 'a'"),
        ("diversity=0,2", "error: diversity must be between 0 and 1, got 2"),
        ("fetch_k=0.5", "error: fetch_k must be a whole number, got 0.5"),
        ("k=0", "error: k must be a whole number of at least 1, got 0"),
    ],
)
def test_eval_checks_swept_values_before_encoding(unique_pairs, run, sweep, says):
    result = run("eval", unique_pairs / "pairs.tsv", "--index", unique_pairs / "idx", "--sweep", sweep)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [says]  # one line, and no stage had started
