import faiss
import numpy as np
import pytest

from retriever.errors import RetrieverError
from retriever.index.ann import (
    exact_neighbors,
    new_index,
    parse_bytes,
    perturbed_queries,
    plan_index,
    recall_at_k,
    train_sample_size,
    tune,
)


def clustered(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d))
    x = centres[rng.integers(64, size=n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_parse_bytes():
    assert parse_bytes("4G") == 4 * 2**30 and parse_bytes("512M") == 512 * 2**20
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30) and parse_bytes("123") == 123 and parse_bytes(None) is None
    with pytest.raises(RetrieverError, match="memory size"):
        parse_bytes("lots")


def test_auto_plan_exact_for_small_ann_for_large_and_fits_memory():
    assert plan_index(10_000, 512).index_type == "flat"
    assert plan_index(5_000_000, 512).index_type == "hnsw"
    assert plan_index(5_000_000, 512, max_memory=parse_bytes("10G")).index_type == "ivf"  # HNSW's links do not fit
    tight = plan_index(5_000_000, 512, max_memory=parse_bytes("1G"))
    assert tight.index_type == "ivfpq" and tight.estimated_bytes <= parse_bytes("1G")
    assert plan_index(10_000, 512, max_memory=1_000_000).index_type == "ivfpq"  # flat would not fit
    with pytest.raises(RetrieverError, match="over --max-memory"):
        plan_index(5_000_000, 512, "flat", max_memory=parse_bytes("1G"))
    with pytest.raises(RetrieverError, match="unknown index type"):
        plan_index(10, 8, "lsh")


def test_exact_neighbors_over_chunks_equals_brute_force():
    xb, xq = clustered(3000, 32), clustered(20, 32, seed=1)
    gt = exact_neighbors([xb[:1000], xb[1000:2500], xb[2500:]], xq, 10)
    assert np.array_equal(gt, np.argsort(-(xq @ xb.T), axis=1)[:, :10])


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_tuning_reaches_recall_target_against_brute_force(kind):
    xb = clustered(20_000, 32)
    plan = plan_index(len(xb), 32, kind)
    index = new_index(plan, 32)
    if train_sample_size(plan, len(xb)):
        index.train(xb)
    index.add(xb)
    xq = perturbed_queries(xb, 300, seed=1)
    gt = exact_neighbors([xb], xq, 10)
    result = tune(index, plan, xq, gt, target=0.9)
    assert result.params and set(result.params) == {plan.tune}
    fresh = perturbed_queries(xb, 300, seed=7)  # other queries: the tuned setting generalises
    _, I = index.search(fresh, 10)
    recall = recall_at_k(I, exact_neighbors([xb], fresh, 10))
    if kind == "ivfpq":
        assert result.recall_at_10 > 0.5  # PQ codes cap recall; tuning reports what it reached
    else:
        assert result.recall_at_10 >= 0.9 and recall >= 0.85


def test_ann_index_end_to_end(toy_model, tmp_path):
    from retriever.index.build import build_index
    from retriever.index.store import read_index

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"{c} number {i}" for i, c in enumerate(["a red star", "a blue circle"] * 1500)) + "\n")
    result = build_index(corpus, tmp_path / "idx", toy_model, index_type="ivf", show_progress_bar=False)
    index = read_index(result.path)
    assert index.manifest["index_type"] == "ivf" and index.manifest["tuning"]["recall_at_10"] >= 0.95
    assert faiss.extract_index_ivf(index.faiss_index).nprobe == index.manifest["search_params"]["nprobe"]
    mmapped = read_index(result.path, mmap=True)
    xq = np.ascontiguousarray(np.eye(128, dtype=np.float32)[:3])
    assert np.array_equal(mmapped.search(xq, 5)[1], index.search(xq, 5)[1])
