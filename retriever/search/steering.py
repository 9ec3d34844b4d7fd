"""Steering a query in the model's space: text modifiers with weights, and blends of queries.

A steered query is normalise(base + sum(w * plus) - sum(w * minus)), where every vector is a
normalised CLIP embedding. This is the arithmetic clip-retrieval's maintainer reports working
for safety filtering, used here as a push towards ideas.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from retriever.errors import RetrieverError

if TYPE_CHECKING:
    import numpy as np

# A trailing ":number" is a weight ("autumn:0.5"); anything else after a colon is text.
_WEIGHT = re.compile(r"^(?P<text>.*?):(?P<weight>[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)$", re.DOTALL)
DEFAULT_WEIGHT = 1.0


def parse_weighted(spec: str, default: float = DEFAULT_WEIGHT) -> tuple[str, float]:
    """ "film noir" -> ("film noir", 1.0); "autumn:0.5" -> ("autumn", 0.5); "a.jpg:2" -> ("a.jpg", 2.0)."""
    match = _WEIGHT.match(spec)
    text, weight = (match["text"], float(match["weight"])) if match else (spec, default)
    text = text.strip()
    if not text:
        raise RetrieverError(f"empty modifier in {spec!r}: write TEXT or TEXT:WEIGHT")
    if not 0 < weight < 1e6 or weight != weight:
        raise RetrieverError(f"weight in {spec!r} must be a positive number")
    return text, weight


def normalise(v: np.ndarray) -> np.ndarray:
    """`v` scaled to unit length (rows, when 2-D); an all-zero vector is an error, not NaN."""
    import numpy as np

    v = np.asarray(v, dtype=np.float32)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(norm < 1e-6):
        raise RetrieverError("the modifiers cancel the query out (its vector is zero); lower their weights")
    return v / norm


def blend(vectors: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """The normalised weighted sum of normalised query vectors (rows of `vectors`)."""
    import numpy as np

    vectors = np.atleast_2d(vectors)
    w = np.ones(len(vectors), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    if len(w) != len(vectors):
        raise RetrieverError(f"{len(w)} weights for {len(vectors)} queries")
    return normalise((w[:, None] * vectors).sum(axis=0))


def steer(
    xq: np.ndarray,
    plus: np.ndarray | None = None,
    plus_weights: Sequence[float] = (),
    minus: np.ndarray | None = None,
    minus_weights: Sequence[float] = (),
) -> np.ndarray:
    """normalise(xq + sum(w * plus) - sum(w * minus)) for one query `xq` (1-D) or each row of a 2-D `xq`."""
    import numpy as np

    xq = np.asarray(xq, dtype=np.float32)
    push = np.zeros(xq.shape[-1], dtype=np.float32)
    if plus is not None and len(plus):
        push += (np.asarray(plus_weights, dtype=np.float32)[:, None] * np.atleast_2d(plus)).sum(axis=0)
    if minus is not None and len(minus):
        push -= (np.asarray(minus_weights, dtype=np.float32)[:, None] * np.atleast_2d(minus)).sum(axis=0)
    return normalise(xq + push)
