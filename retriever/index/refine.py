"""Exact re-ranking of a compressed index's candidates with the stored fp16 vectors.

IVF-PQ ranks by 1-byte codes, so the true neighbours are usually among its top few hundred but
out of order. Searching `k * k_factor` candidates and re-scoring them with the exact vectors
(vectors.f16.npy, memory-mapped) recovers recall@10 without holding the vectors in RAM.

faiss's `IndexRefineFlat` does the same, but keeps a float32 copy of every vector in memory
(4·d bytes per caption), which is what IVF-PQ exists to avoid; here only the candidates' rows
are read from the mapped file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

K_FACTORS = (1, 2, 4, 8, 16, 32, 64)  # tried by `ann.tune`; 1 re-orders the top k without widening it
_QUERY_BLOCK = 256  # queries re-scored at once: bounds the gathered [block, k·k_factor, d] array


def rerank(xq: np.ndarray, I: np.ndarray, vectors: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each query's candidate ids `I` by exact inner product with `vectors`.

    Args:
        xq: [nq, d] normalised queries.
        I: [nq, c] candidate row ids, -1 for none (faiss's padding).
        vectors: anything indexable by a sorted id array to [len(ids), d] rows: a memory-mapped
            fp16 array, or the shards of a build in progress.
        k: hits to keep per query.

    Returns (D, I) of shape [nq, min(k, c)], best first, -inf / -1 where there are fewer.
    """
    import numpy as np

    keep = min(k, I.shape[1])
    D_out = np.full((len(I), keep), -np.inf, dtype=np.float32)
    I_out = np.full((len(I), keep), -1, dtype=np.int64)
    for lo in range(0, len(I), _QUERY_BLOCK):
        ids = I[lo : lo + _QUERY_BLOCK]
        valid = ids >= 0
        if not valid.any():
            continue
        rows, where = np.unique(ids[valid], return_inverse=True)  # sorted: mapped pages read in order
        xb = np.asarray(vectors[rows], dtype=np.float32)
        query_of = np.nonzero(valid)[0]
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        scores[valid] = np.einsum("ij,ij->i", xb[where], xq[lo + query_of])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
        D_out[lo : lo + len(ids)] = np.take_along_axis(scores, order, axis=1)
        I_out[lo : lo + len(ids)] = np.where(
            np.isfinite(D_out[lo : lo + len(ids)]), np.take_along_axis(ids, order, axis=1), -1
        )
    return D_out, I_out


def refined_search(search, xq: np.ndarray, k: int, vectors: Any, k_factor: int, ntotal: int):
    """`search(xq, k * k_factor)` (a faiss-style search), re-ranked exactly down to `k`."""
    _, I = search(xq, min(k * k_factor, ntotal))
    return rerank(xq, I, vectors, k)
