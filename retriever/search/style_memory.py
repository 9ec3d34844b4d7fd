"""An index as a style decoder's projection memory (DeCap's, for corpora too large to store).

A style folder stores at most `--memory-size` text embeddings. With `style:PATH?memory=index`
and an index built with the same CLIP model, each image is instead projected onto its `fetch_k`
nearest indexed texts: the same softmax-weighted sum, over the neighbours that carry nearly all
of its weight at DeCap's temperature, at the cost of one search.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from retriever.search.options import exact_vectors

if TYPE_CHECKING:
    import numpy as np

    from retriever.index.store import TextIndex


def index_memory(index: TextIndex) -> Callable[[np.ndarray, int], np.ndarray]:
    """`lookup(xq, k)`: the exact vectors of each query row's k nearest texts, [n, k, d] float32."""

    def lookup(xq: np.ndarray, k: int) -> np.ndarray:
        import numpy as np

        k = min(k, len(index))
        _, ids = index.search(xq, k)
        # Fewer than k hits (an ANN index may return -1): repeat the best one, which the softmax
        # already weighs most.
        ids = np.where(ids >= 0, ids, ids[:, :1])
        return exact_vectors(index, ids.reshape(-1)).reshape(len(xq), k, -1)

    return lookup
