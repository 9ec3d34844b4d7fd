"""IVF-PQ candidates re-ranked exactly with the stored fp16 vectors (retriever/index/refine.py)."""

import numpy as np
from test_ann import clustered

from retriever.index.ann import IndexPlan, exact_neighbors, new_index, perturbed_queries, recall_at_k, tune
from retriever.index.refine import rerank


def test_rerank_orders_candidates_by_exact_score_and_keeps_padding():
    xb = clustered(50, 16)
    xq = xb[:2] + 0.01
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    candidates = np.array([[7, 0, 3, -1], [-1, -1, 1, 9]])
    D, I = rerank(xq, candidates, xb.astype(np.float16), 3)
    assert I[0, 0] == 0 and I[1, 0] == 1  # the query's own row wins, wherever the codes put it
    assert I[1, 2] == -1 and D[1, 2] == -np.inf  # two real candidates: the third slot stays empty
    exact = xq[0] @ xb[[7, 0, 3]].T
    np.testing.assert_allclose(D[0], np.sort(exact)[::-1], atol=2e-3)


def _ivfpq(n=10_000, d=32):
    xb = clustered(n, d)
    plan = IndexPlan("ivfpq", "IVF128,PQ4x8", "nprobe", 0)  # 4-byte codes: too coarse for recall alone
    index = new_index(plan, d)
    index.train(xb)
    index.add(xb)
    return xb, plan, index


def test_tuning_with_vectors_reaches_the_target_that_codes_alone_cannot():
    xb, plan, index = _ivfpq()
    xq = perturbed_queries(xb, 300, seed=1)
    gt = exact_neighbors([xb], xq, 10)
    codes_only = tune(index, plan, xq, gt, target=0.95)
    refined = tune(index, plan, xq, gt, target=0.95, vectors=xb.astype(np.float16))
    assert codes_only.recall_at_10 < 0.9 and set(codes_only.params) == {"nprobe"}
    assert refined.recall_at_10 >= 0.95 and set(refined.params) == {"nprobe", "k_factor"}
    assert refined.params["k_factor"] > 1
    fresh = perturbed_queries(xb, 300, seed=7)  # the tuned depth generalises to other queries
    from retriever.index.refine import refined_search

    _, I = refined_search(index.search, fresh, 10, xb.astype(np.float16), refined.params["k_factor"], len(xb))
    assert recall_at_k(I, exact_neighbors([xb], fresh, 10)) >= 0.9


def test_built_ivfpq_index_reranks_with_its_stored_vectors(toy_model, tmp_path):
    from retriever.index.build import build_index
    from retriever.index.store import read_index
    from retriever.models.toyworld import all_captions

    corpus = tmp_path / "c.txt"
    texts = [f"{c} number {i}" for i in range(4) for c in all_captions()]
    corpus.write_text("\n".join(texts) + "\n")
    small = {"index_type": "ivfpq", "max_memory": 28_000, "show_progress_bar": False}  # PQ8: quick to train
    result = build_index(corpus, tmp_path / "idx", toy_model, **small)
    index = read_index(result.path)
    params = index.manifest["search_params"]
    assert "k_factor" in params and index.k_factor == params["k_factor"] and index.refine_vectors is not None
    assert index.manifest["format_version"] == 3  # releases that would ignore k_factor refuse it instead
    vectors = np.asarray(index.refine_vectors, dtype=np.float32)
    xq = perturbed_queries(vectors, 50, seed=3)
    D, I = index.search(xq, 10)
    np.testing.assert_allclose(D, np.einsum("qd,qkd->qk", xq, vectors[I]), atol=1e-4)  # exact scores, not codes
    assert recall_at_k(I, exact_neighbors([vectors], xq, 10)) >= 0.9

    plain = build_index(corpus, tmp_path / "plain", toy_model, store_vectors=False, **small)
    plain_manifest = read_index(plain.path).manifest
    assert "k_factor" not in plain_manifest["search_params"] and plain_manifest["format_version"] == 1
