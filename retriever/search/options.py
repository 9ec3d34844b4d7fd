"""Searching one index with result options: pre-filtering, exact re-ranking, near-duplicate
collapse and maximal marginal relevance.

The path of one query vector:
1. `--where` becomes a row mask and a FAISS id selector, so the index itself skips rows that
   do not match (pre-filtering: a selective filter still yields k hits where k rows match).
2. The index returns `fetch_k` candidates (k when no option needs more).
3. Candidates are re-scored exactly with the index's stored vectors (`vectors.f16.npy`, or
   the FAISS storage of flat and HNSW indexes): approximate (IVF-PQ) scores are replaced.
4. `dedupe` collapses near-duplicates, keeping the best of each group; `diversity` re-ranks the
   rest with MMR. The first hit is always the nearest candidate.

Several indexes are searched in parallel threads and their candidates pooled before step 4, so
they act as one corpus.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import RetrieverError
from retriever.index.store import VECTORS_FILE, map_vectors
from retriever.search.derived import DerivedValues
from retriever.search.diversity import collapse_near_duplicates, mmr
from retriever.search.rowmask import RowMask

if TYPE_CHECKING:
    import numpy as np

    from retriever.index.store import TextIndex

# A filter matching at most this many rows is answered by exact brute force over those rows
# (a few milliseconds), which always finds k when k rows match; larger ones search the index
# with an id selector.
BRUTE_FORCE_ROWS = 65_536
# clip-retrieval's dedupe threshold. `query`'s default (the library's is off) was measured with
# bench/toy_diversity.py (docs/search.md): at 0.95, 72% of rewordings of one toy caption merge with
# it and no two captions that differ in one attribute do (those stay below 0.77), so intra-list
# similarity drops from 0.81 to 0.67 with top-1 unchanged. Lower thresholds merge more rewordings
# there, but real CLIP text spaces are far more crowded than the toy one (clip-retrieval settled on
# 0.94 for them), so the default stays just above clip-retrieval's.
CLIP_RETRIEVAL_DEDUPE = 0.94
DEFAULT_QUERY_DEDUPE = 0.95


def _require_kind(name: str, value: Any, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):  # True is an int to Python, not here
        what = "a whole number" if kind is numbers.Integral else "a number"
        raise RetrieverError(f"{name} must be {what}, got {value!r}")


@dataclass
class ResultOptions:
    """How a result list is made from an index's nearest neighbours.

    Attributes:
        diversity: MMR trade-off in [0, 1]: 0 is plain nearest order, 1 the most diverse.
        fetch_k: candidates taken from each index before re-ranking (default max(10 k, 100)
            when diversity or dedupe is on).
        dedupe: collapse candidates whose texts' cosine is at least this (None: off).
        where: a filter over the metadata columns (see `filters.py`).
    """

    diversity: float = 0.0
    fetch_k: int | None = None
    dedupe: float | None = None
    where: str | None = None

    def check(self) -> None:
        from retriever.search.filters import parse_where

        _require_kind("diversity", self.diversity, numbers.Real)
        if self.fetch_k is not None:
            _require_kind("fetch_k", self.fetch_k, numbers.Integral)
        if self.dedupe is not None:
            _require_kind("dedupe", self.dedupe, numbers.Real)
        if self.where is not None and self.where != "":  # "" is no filter
            parse_where(self.where)  # its type and syntax; columns are checked against each index
        if not 0.0 <= self.diversity <= 1.0 or self.diversity != self.diversity:
            raise RetrieverError(f"diversity must be between 0 and 1, got {self.diversity}")
        if self.fetch_k is not None and not 1 <= self.fetch_k <= 100_000:
            raise RetrieverError(f"fetch_k must be between 1 and 100000, got {self.fetch_k}")
        if self.dedupe is not None and not 0.0 < self.dedupe <= 1.0:
            raise RetrieverError(f"dedupe is a cosine in (0, 1], got {self.dedupe}")

    @property
    def reranks(self) -> bool:
        return self.diversity > 0 or self.dedupe is not None

    def candidates(self, k: int) -> int:
        if self.fetch_k is not None:
            return max(k, self.fetch_k)
        return max(10 * k, 100) if self.reranks else k


def stored_vectors(index: TextIndex) -> Any | None:
    """The index's exact vectors as an fp16 array [count, d] (memory-mapped), or None when the
    index was built without them (`--no-vectors`)."""
    if index.refine_vectors is not None:
        return index.refine_vectors
    if index.mapped_vectors is None:  # mapped once per index: opening the file costs more than a search
        mapped = map_vectors(Path(index.path), len(index), int(index.faiss_index.d))
        index.mapped_vectors = False if mapped is None else mapped
    return None if index.mapped_vectors is False else index.mapped_vectors


def _holds_vectors(index: TextIndex) -> bool:
    """Whether the FAISS index itself holds the exact vectors (flat, and HNSW over flat storage)."""
    factory = str(index.manifest.get("faiss_factory", ""))
    return factory == "Flat" or (factory.startswith("HNSW") and factory.endswith(",Flat"))


def can_rerank(index: TextIndex) -> bool:
    """Whether exact vectors are available: stored, or held by a flat or HNSW index."""
    return (Path(index.path) / VECTORS_FILE).is_file() or _holds_vectors(index)


def exact_vectors(index: TextIndex, ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """Exact float32 vectors of rows `ids`: stored ones, or reconstructed from a flat or HNSW
    index. Raises RetrieverError saying what is needed when neither is possible."""
    import numpy as np

    if _holds_vectors(index):  # float32 in memory: 10x faster than gathering rows of the fp16 file
        return index.faiss_index.reconstruct_batch(np.asarray(ids, dtype=np.int64))
    vectors = stored_vectors(index)
    if vectors is not None:
        ids = np.asarray(ids)
        order = np.argsort(ids, kind="stable")  # read the mapped file in order, not at random
        out = np.empty((len(ids), vectors.shape[1]), dtype=np.float32)
        out[order] = vectors[ids[order]]
        return out
    factory = str(index.manifest.get("faiss_factory", ""))
    raise RetrieverError(
        f"{index.path}: this {factory or 'approximate'} index has no stored vectors "
        f"({VECTORS_FILE}), which diversity, dedupe and --like need; rebuild it with "
        "build-index (without --no-vectors)"
    )


_AS_ROWS = DerivedValues()


def as_rows(mask: RowMask | np.ndarray) -> RowMask:
    """A filter's rows as a RowMask; a numpy bool mask is packed once while it is cached (a caller
    may pass the same one query after query)."""
    if isinstance(mask, RowMask):
        return mask
    return _AS_ROWS.get(mask, lambda: RowMask.from_bools(mask))


def search_parameters(index: TextIndex, rows: RowMask | None) -> tuple[Any, Any]:
    """FAISS search parameters with an id selector for `rows` and the index's tuned nprobe or
    efSearch (a parameters object replaces them, so they are set again here). Returns
    (parameters or None, what must outlive the search)."""

    from retriever.index.faiss_import import import_faiss

    if rows is None:
        return None, None
    faiss = import_faiss()
    kept = rows.count
    selector = faiss.IDSelectorBitmap(rows.size, faiss.swig_ptr(rows.bitmap))
    tuned = index.manifest.get("search_params") or {}
    factory = str(index.manifest.get("faiss_factory", ""))
    # Only a share of the rows match, so a search must look further to find as many.
    widen = rows.size / max(kept, 1)
    if factory.startswith("HNSW"):
        # The graph walk already goes on until efSearch *matching* rows are found, and what a filter
        # costs it is a short walk's: measured on B7's 1M toyworld captions (recall@10 of the
        # filtered search / unfiltered), filters keeping 10% / 20% / 50% of rows gave at efSearch
        # 32: 0.828 / 0.870 / 0.899 (0.902), at 64: 0.917 / 0.940 / 0.948 (0.941), and at 128:
        # 0.970 / 0.976 / 0.971 (0.963), already as good as unfiltered. An efSearch of at least
        # 64 (1 + 0.75 log10(1/share)) (112 / 97 / 78) gives 0.963 / 0.968 / 0.954 from 32 or 64,
        # so only walks shorter than that are lengthened (widening by 1/share cost 6x the time).
        ef = int(tuned.get("efSearch", 16))
        floor = 64 * (1 + 0.75 * math.log10(widen))
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(min(max(ef, floor), 4096)))
    elif factory.startswith("IVF"):
        # An inverted list holds matching and other rows alike: probing `widen` times as many
        # lists finds about as many matching rows as the tuned nprobe finds unfiltered.
        nprobe = int(tuned.get("nprobe", 1))
        nlist = int(faiss.extract_index_ivf(index.faiss_index).nlist)
        params = faiss.SearchParametersIVF(sel=selector, nprobe=int(min(max(nprobe, nprobe * widen), nlist)))
    else:
        params = faiss.SearchParameters(sel=selector)
    return params, (rows, selector)


def search_index(
    index: TextIndex, xq: np.ndarray, k: int, options: ResultOptions, mask: RowMask | np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each row of `xq`, (scores, row ids) of at most `k` hits under `options`.

    `mask` is a precomputed --where filter: a RowMask or a bool per row (None: every row).
    """
    import numpy as np

    options.check()
    xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
    fetch = min(options.candidates(k), len(index))
    D, I = _candidates(index, xq, fetch, None if mask is None else as_rows(mask))
    out = []
    for q, scores, ids in zip(xq, D, I):
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        if options.reranks and len(ids):
            order, scores = _rerank(q, exact_vectors(index, ids), k, options)
            ids = ids[order]
        out.append((scores[:k], ids[:k]))
    return out


def _rerank(q: np.ndarray, xb: np.ndarray, k: int, options: ResultOptions) -> tuple[np.ndarray, np.ndarray]:
    """(positions into the candidates `xb`, their exact scores) in the order `options` choose."""
    scores = xb @ q
    kept = None
    if options.dedupe is not None:
        kept = collapse_near_duplicates(scores, xb, options.dedupe)
        scores, xb = scores[kept], xb[kept]
    order = mmr(scores, xb, k, options.diversity)
    return (order if kept is None else kept[order]), scores[order]


def _candidates(index: TextIndex, xq: np.ndarray, fetch: int, rows: RowMask | None) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) of the `fetch` nearest of `rows` (None: all); -1 ids pad rows with fewer."""
    import numpy as np

    if rows is not None and rows.size != len(index):
        raise RetrieverError(f"{index.path}: a filter over {rows.size} rows cannot select among {len(index)}")
    if rows is not None and rows.count <= BRUTE_FORCE_ROWS:
        allowed = rows.rows()
        try:
            xb = exact_vectors(index, allowed) if len(allowed) else np.empty((0, xq.shape[1]), np.float32)
        except RetrieverError:
            xb = None  # no exact vectors: let the index filter
        if xb is not None:
            scores = xq @ xb.T
            take = min(fetch, len(allowed))
            D = np.full((len(xq), fetch), -np.inf, dtype=np.float32)
            I = np.full((len(xq), fetch), -1, dtype=np.int64)
            if take:
                top = np.argsort(-scores, axis=1, kind="stable")[:, :take]
                D[:, :take] = np.take_along_axis(scores, top, axis=1)
                I[:, :take] = allowed[top]
            return D, I
    params, keep_alive = search_parameters(index, rows)
    if params is None:
        return index.faiss_search(xq, fetch)
    D, I = index.faiss_search(xq, fetch, params=params)
    del keep_alive  # the bitmap and selector must live until the search has run
    return D, I


_POOL: Any = None


def _threads() -> Any:
    """One thread pool for the process: starting threads per query would cost more than a search."""
    global _POOL
    if _POOL is None:
        import os
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="retriever-search")
    return _POOL


def _in_parallel(
    indexes: list[TextIndex], xq: np.ndarray, fetch: int, masks: Sequence[RowMask | None]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`_candidates` of each index at once: the first in this thread, the others in the pool.

    Each search gets its share of the cores: OpenMP's thread count is per calling thread, and
    every search starting a team on every core trips over the others (2x slower: B7's two flat
    indexes took 1.93x the slower alone that way). The calling thread's own setting is put back
    afterwards. An HNSW search of one query starts no team (FAISS parallelises its walks over
    queries), and setting the count costs about 0.1 ms of a 0.4 ms walk (measured: 1.51x against
    1.23x the slower index alone), so it is left alone then.
    FAISS's IndexShards was slower still (1.42 against 1.16 ms on B7's two 1M-row HNSW indexes):
    it hands every index to a worker thread, so it waits for an idle core even for the first.
    """
    import os

    from retriever.index.faiss_import import import_faiss

    faiss = import_faiss()
    one_walk = len(xq) == 1 and all(str(i.manifest.get("faiss_factory", "")).startswith("HNSW") for i in indexes)
    teams = not one_walk  # whether the searches start OpenMP teams
    share = max(1, (os.cpu_count() or 1) // len(indexes)) if teams else 0  # cpu_count reads a file

    def one(n: int) -> tuple[np.ndarray, np.ndarray]:
        if teams:
            faiss.omp_set_num_threads(share)
        return _candidates(indexes[n], xq, min(fetch, len(indexes[n])), masks[n])

    others = [_threads().submit(one, n) for n in range(1, len(indexes))]
    before = faiss.omp_get_max_threads() if teams else 0
    try:
        first = one(0)
    finally:
        if teams:
            faiss.omp_set_num_threads(before)
    return [first] + [future.result() for future in others]


def search_indexes(
    indexes: list[TextIndex],
    xq: np.ndarray,
    k: int,
    options: ResultOptions,
    masks: Sequence[RowMask | np.ndarray | None] | None = None,
) -> list[list[tuple[int, float, int]]]:
    """Search several indexes built with one model as one corpus: for each row of `xq`, the `k`
    best (index position, score, row id) under `options`. Each index gives its `fetch_k` best
    candidates, and those are ranked (by score, or exact scores, dedupe and MMR) as one list."""
    import numpy as np

    options.check()
    rows = [None if m is None else as_rows(m) for m in masks] if masks else [None] * len(indexes)
    if len(indexes) == 1:  # already in the order the options chose: MMR's order is not by score
        results = search_index(indexes[0], xq, k, options, rows[0])
        return [[(0, float(s), int(i)) for s, i in zip(scores, ids)] for scores, ids in results]
    xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
    per_index = _in_parallel(indexes, xq, options.candidates(k), rows)
    merged = []
    for r, q in enumerate(xq):
        # (score, index position, row id) of every index's candidates; -1 ids pad. Plain Python:
        # sorting a few dozen of them costs less than numpy's per-call overhead (0.03 ms).
        pooled = [
            (score, n, i)
            for n, (D, I) in enumerate(per_index)
            for score, i in zip(D[r].tolist(), I[r].tolist())
            if i >= 0
        ]
        if options.reranks and pooled:
            ns = np.array([n for _, n, _ in pooled])
            ids = np.array([i for _, _, i in pooled], dtype=np.int64)
            xb = np.empty((len(ids), xq.shape[1]), dtype=np.float32)
            for n in np.unique(ns):
                xb[ns == n] = exact_vectors(indexes[n], ids[ns == n])
            order, scores = _rerank(q, xb, k, options)
            best = [(float(score), pooled[p][1], pooled[p][2]) for p, score in zip(order.tolist(), scores.tolist())]
        else:
            best = sorted(pooled, key=lambda c: -c[0])  # stable: ties keep the indexes' order
        merged.append([(n, score, i) for score, n, i in best[:k]])
    return merged
