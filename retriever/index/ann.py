"""Choosing, training and tuning a FAISS index under a memory budget and a recall target.

Plain functions, arrays in and arrays out, faiss names (xb, xq, k, D, I). `auto` keeps exact
search for small corpora; for large ones it picks the fastest approximate index that fits
`max_memory`, then raises nprobe / efSearch until recall@10 against exact search reaches the
target on held-out queries (perturbed corpus vectors, ground truth by brute force).

autofaiss does a similar selection, but tunes for query time rather than a recall target, pins
numpy<2 and pandas<3, and depends on faiss-cpu, which would break a faiss-gpu environment; so
this module does the (small) part we need with faiss itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from retriever.errors import RetrieverError
from retriever.index.faiss_import import import_faiss

if TYPE_CHECKING:
    import numpy as np

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
EXACT_UP_TO = 200_000  # below this, `auto` keeps exact search: it is fast enough and perfect
HNSW_M = 32
PQ_MIN_TRAIN = 256  # 8-bit PQ codes: k-means into 256 centroids per sub-vector needs 256 points


@dataclass
class IndexPlan:
    """What to build: a faiss factory string and the parameter to tune (if any)."""

    index_type: str
    factory: str
    tune: str | None
    estimated_bytes: int


@dataclass
class TuneResult:
    """The search parameters chosen and the recall they measured."""

    params: dict = field(default_factory=dict)
    recall_at_10: float = 1.0
    queries: int = 0


def parse_bytes(text: str | int | None) -> int | None:
    """'4G', '512M', '1.5GB', '123' -> bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise RetrieverError(f"cannot read memory size {text!r}; write it like 4G or 512M")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _nlist(n: int) -> int:
    """About 4 sqrt(n) lists (a power of two), with at least 39 training points per centroid."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return int(min(65536, nlist))


def _pq_m(d: int, budget_per_vector: float) -> int | None:
    """The largest PQ code size (bytes) dividing d that fits the per-vector budget."""
    for m in sorted((m for m in range(1, d + 1) if d % m == 0 and m <= 64), reverse=True):
        if m + 8 <= budget_per_vector:  # 8: the id stored with each code in the inverted lists
            return m
    return None


def plan_index(
    n: int, d: int, index_type: str = "auto", max_memory: int | None = None, *, at_most: bool = False
) -> IndexPlan:
    """Pick the index for `n` vectors of dimension `d` within `max_memory` bytes.

    `at_most` says `n` is an upper bound (a corpus's row count before reading it), for messages.
    """
    if index_type not in INDEX_TYPES:
        raise RetrieverError(f"unknown index type {index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    nlist = _nlist(n)
    sizes = {
        "flat": n * d * 4,
        "hnsw": n * (d * 4 + HNSW_M * 2 * 4 + 16),
        "ivf": n * (d * 4 + 8) + nlist * d * 4,
    }
    plans = {
        "flat": IndexPlan("flat", "Flat", None, sizes["flat"]),
        "hnsw": IndexPlan("hnsw", f"HNSW{HNSW_M},Flat", "efSearch", sizes["hnsw"]),
        "ivf": IndexPlan("ivf", f"IVF{nlist},Flat", "nprobe", sizes["ivf"]),
    }
    budget = max_memory if max_memory is not None else math.inf
    m = _pq_m(d, (budget - nlist * d * 4) / max(n, 1)) if budget != math.inf else min(64, d // 2 or 1)
    if m is None and index_type in ("auto", "ivfpq"):
        raise RetrieverError(f"{n} vectors of dimension {d} do not fit in {max_memory} bytes even as 1-byte codes")
    if index_type == "ivfpq" and n < PQ_MIN_TRAIN:
        raise RetrieverError(
            f"--index-type ivfpq needs at least {PQ_MIN_TRAIN} texts to train its codes, and the "
            f"corpus has {'at most ' if at_most else ''}{n}; use --index-type flat (exact) or auto"
        )
    if m is not None and n >= PQ_MIN_TRAIN:
        plans["ivfpq"] = IndexPlan("ivfpq", f"IVF{nlist},PQ{m}x8", "nprobe", n * (m + 8) + nlist * d * 4)
    if index_type != "auto":
        plan = plans[index_type]
        if plan.estimated_bytes > budget:
            raise RetrieverError(
                f"a {index_type} index of {n} vectors needs about {plan.estimated_bytes / 2**30:.2f} GiB, "
                f"over --max-memory; try --index-type ivfpq or auto"
            )
        return plan
    if n <= EXACT_UP_TO and sizes["flat"] <= budget:
        return plans["flat"]
    # HNSW gave the most queries/s at the recall target in bench/b3_ann.py (31x exact at
    # recall 0.976 on 1M vectors, vs 9x for IVF-Flat); its slower build is small next to embedding.
    for kind in ("hnsw", "ivf", "ivfpq"):
        if kind in plans and plans[kind].estimated_bytes <= budget:
            return plans[kind]
    raise RetrieverError(f"no index type fits {n} vectors of dimension {d} in {max_memory} bytes")


def train_sample_size(plan: IndexPlan, n: int) -> int:
    """How many vectors to train the quantizers on (0 for indexes that need no training)."""
    match = re.match(r"IVF(\d+)", plan.factory)
    if not match:
        return 0
    return min(n, max(64 * int(match.group(1)), 100_000))


def new_index(plan: IndexPlan, d: int):
    """An empty inner-product index for `plan`."""
    faiss = import_faiss()

    return faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)


def exact_neighbors(xb_chunks: Iterable[np.ndarray], xq: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k ids of `xq` over the database given chunk by chunk (fits any size)."""
    faiss = import_faiss()
    import numpy as np

    heap_D = np.full((len(xq), k), -np.inf, dtype=np.float32)
    heap_I = np.full((len(xq), k), -1, dtype=np.int64)
    offset = 0
    for xb in xb_chunks:
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        D, I = faiss.knn(xq, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
        D = np.concatenate([heap_D, D], axis=1)
        I = np.concatenate([heap_I, I + offset], axis=1)
        order = np.argsort(-D, axis=1)[:, :k]
        heap_D, heap_I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
        offset += len(xb)
    return heap_I


def perturbed_queries(xb: np.ndarray, n: int, seed: int = 0, cosine: float = 0.7) -> np.ndarray:
    """`n` tuning queries: random database vectors moved to about `cosine` similarity from where they were.

    Queries at database points would be too easy (each finds itself first); CLIP image queries
    sit well away from their nearest captions, so tuning queries do too.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    x = xb[rng.choice(len(xb), size=min(n, len(xb)), replace=False)].astype(np.float32)
    sigma = math.sqrt(1 / cosine**2 - 1)
    q = x / np.linalg.norm(x, axis=1, keepdims=True) + sigma * rng.normal(size=x.shape).astype(np.float32) / math.sqrt(
        x.shape[1]
    )
    return np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)


def recall_at_k(I: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    """|I[:, :k] ∩ gt[:, :k]| over the true neighbours there are: where the database holds fewer
    than `k` vectors, the -1 padding of `gt` is not a neighbour to find (exact search scores 1)."""
    found = sum(len((set(a[:k].tolist()) & set(b[:k].tolist())) - {-1}) for a, b in zip(I, gt))
    possible = sum(int((b[:k] >= 0).sum()) for b in gt)
    return float(found / possible) if possible else 1.0


def tune(
    index, plan: IndexPlan, xq: np.ndarray, gt: np.ndarray, target: float, k: int = 10, vectors: Any = None
) -> TuneResult:
    """Set the smallest nprobe / efSearch whose recall@k on `xq` reaches `target`.

    If none does, the most accurate setting tried is kept and its recall reported. With the
    exact `vectors` of an IVF-PQ index, its candidates are re-ranked exactly (refine.py) and
    the re-ranking depth `k_factor` is tuned too: first the smallest nprobe that reaches the
    target at the widest depth, then the shallowest depth that still does at that nprobe.
    """
    faiss = import_faiss()
    from retriever.index.refine import K_FACTORS, refined_search

    if plan.tune is None:
        return TuneResult({}, 1.0, len(xq))
    if plan.tune == "nprobe":
        nlist = faiss.extract_index_ivf(index).nlist
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v <= nlist] + [nlist]
    else:
        values = [16, 32, 64, 128, 256, 512, 1024, 2048]
    refine = vectors is not None and plan.index_type == "ivfpq"

    def recall(k_factor: int) -> float:
        if refine:
            _, I = refined_search(index.search, xq, k, vectors, k_factor, index.ntotal)
        else:
            _, I = index.search(xq, k)
        return recall_at_k(I, gt, k)

    space = faiss.ParameterSpace()
    best = TuneResult({}, -1.0, len(xq))
    for value in sorted(set(values)):
        space.set_index_parameter(index, plan.tune, value)
        measured = recall(K_FACTORS[-1])
        if measured > best.recall_at_10:
            best = TuneResult({plan.tune: value}, measured, len(xq))
        if measured >= target:
            break
    space.set_index_parameter(index, plan.tune, best.params[plan.tune])
    if refine:
        for k_factor in K_FACTORS:
            measured = recall(k_factor)
            if measured >= min(target, best.recall_at_10):
                best = TuneResult({**best.params, "k_factor": k_factor}, measured, len(xq))
                break
    return best


def apply_search_params(index, params: dict) -> None:
    """Set recorded search parameters (nprobe, efSearch) on a loaded index; `k_factor` is not
    faiss's to set (the re-ranking is ours, see refine.py)."""
    faiss = import_faiss()

    on_gpu = type(index).__name__.startswith("Gpu") and hasattr(faiss, "GpuParameterSpace")
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    for name, value in faiss_params(params).items():
        space.set_index_parameter(index, name, value)


def faiss_params(params: dict) -> dict:
    """The recorded search parameters faiss sets (nprobe, efSearch): `k_factor` is the exact
    re-ranking depth, applied by refine.py."""
    return {name: value for name, value in params.items() if name != "k_factor"}
