"""Diverse results: maximal marginal relevance and near-duplicate collapse over exact vectors.

Plain functions with arrays in and arrays out. `xb` holds the candidates' normalised vectors
(rows), `scores` their similarity to the query, best first or not; results are positions into
those arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def mmr(scores: np.ndarray, xb: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """Maximal marginal relevance (Carbonell & Goldstein, 1998): pick `k` candidates, each time
    the one maximising (1 - diversity) * score - diversity * (max cosine to those already picked).

    `diversity` 0 gives the plain nearest order; 1 ignores relevance after the first pick, which
    is always the best-scoring candidate.
    """
    import numpy as np

    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be in [0, 1], got {diversity}")
    n = len(scores)
    k = min(k, n)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    # value = (1 - diversity) * score - diversity * closest, kept as relevance - penalty: one
    # matrix-vector product and three vector passes per pick (numpy's per-call cost is most of it)
    relevance = (1.0 - diversity) * np.asarray(scores, dtype=np.float32)
    xb = np.asarray(xb, dtype=np.float32)
    scaled = diversity * xb
    picked = [int(np.argmax(scores))]
    penalty = scaled @ xb[picked[0]]  # diversity x each candidate's max cosine to the picked set
    relevance[picked[0]] = -np.inf
    while len(picked) < k:
        best = int(np.argmax(relevance - penalty))
        picked.append(best)
        relevance[best] = -np.inf
        np.maximum(penalty, scaled @ xb[best], out=penalty)
    return np.array(picked, dtype=np.int64)


def collapse_near_duplicates(scores: np.ndarray, xb: np.ndarray, threshold: float) -> np.ndarray:
    """Positions of the candidates to keep: walking from the best score down, a candidate whose
    cosine to one already kept is at least `threshold` is dropped (the best of a group stays).
    Returned in descending score order."""
    import numpy as np

    order = np.argsort(-np.asarray(scores), kind="stable")
    xb = np.asarray(xb, dtype=np.float32)
    kept: list[int] = []
    for i in order:
        if kept and float((xb[kept] @ xb[i]).max()) >= threshold:
            continue
        kept.append(int(i))
    return np.array(kept, dtype=np.int64)
