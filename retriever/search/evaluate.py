"""`retriever eval`: how well an index and its query options serve a set of (image, caption) pairs.

Two kinds of numbers:

- **Retrieval** (the model and index): image→text recall@1/5/10, MRR and median rank of an
  image's true caption among the index's texts, and text→image recall@1/5/10 over the pairs'
  own images. Recall@k follows CLIP_benchmark's zero-shot retrieval definition: an image (or a
  caption) counts as found when at least one of its positives is among the top k.
- **Results** (what a user sees with given query options): for each image's top-k hits, the
  intra-list similarity (mean pairwise cosine of the hit texts: lower is more diverse), mean
  relevance (mean hit score), the share whose first hit is a true caption, and, for metadata
  columns, the mean number of distinct values among the k hits. `sweep` recomputes these for
  each value of one query option, so a user can pick it on their own data.

Plain functions with arrays in and arrays out, in the manner of faiss's contrib modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import RetrieverError

if TYPE_CHECKING:
    import numpy as np

    from retriever.corpus.pairs import Pairs
    from retriever.search.api import Retriever

RECALL_KS = (1, 5, 10)
DEFAULT_RANK_DEPTH = 1000


def recall_metrics(ranks: np.ndarray, prefix: str, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """recall@k, MRR and median rank from 1-based ranks (inf where the positive was not found)."""
    import numpy as np

    ranks = np.asarray(ranks, dtype=float)
    out = {f"{prefix}_recall@{k}": float((ranks <= k).mean()) for k in ks}
    out[f"{prefix}_mrr"] = float(np.where(np.isfinite(ranks), 1.0 / ranks, 0.0).mean())
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def best_positive_rank(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """For each row of `scores` [n, m], the 1-based rank of its best-scoring positive column
    (`positive` [n, m] bool): 1 + the count of negatives scoring strictly higher. inf without positives."""
    import numpy as np

    best = np.where(positive, scores, -np.inf).max(axis=1)
    higher = ((scores > best[:, None]) & ~positive).sum(axis=1)
    return np.where(np.isfinite(best), 1.0 + higher, np.inf)


def ranks_in_index(I: np.ndarray, true_ids: list[set[int]]) -> np.ndarray:
    """1-based rank of the first of each query's true ids in its result list `I` [n, depth]; inf if absent."""
    import numpy as np

    ranks = np.full(len(I), np.inf)
    for q, (row, wanted) in enumerate(zip(I, true_ids)):
        for position, i in enumerate(row):
            if int(i) in wanted:
                ranks[q] = position + 1
                break
    return ranks


def intra_list_similarity(vectors: np.ndarray) -> float:
    """Mean pairwise cosine of normalised row vectors (0.0 for fewer than two)."""
    n = len(vectors)
    if n < 2:
        return 0.0
    sims = vectors @ vectors.T
    return float((sims.sum() - sims.trace()) / (n * (n - 1)))


@dataclass
class EvalResult:
    """The numbers of one evaluation: shared retrieval metrics plus one row per option setting."""

    pairs: str
    index: str
    images: int
    captions: int
    retrieval: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def as_dicts(self) -> list[dict[str, Any]]:
        """One JSON-ready object per row (the `--json` lines)."""
        base = {"pairs": self.pairs, "index": self.index, "images": self.images, "captions": self.captions}
        return [{**base, **self.retrieval, **row} for row in self.rows]


def evaluate(
    retriever: Retriever,
    pairs: Pairs,
    k: int = 10,
    sweep: tuple[str, Sequence[Any]] | None = None,
    query_options: dict[str, Any] | None = None,
    rank_depth: int = DEFAULT_RANK_DEPTH,
    batch_size: int = 64,
    on_progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Score `retriever` (an index and its model) on `pairs`.

    Args:
        retriever: an opened Retriever with an index.
        pairs: (image, caption) pairs, e.g. from `read_pairs`; an image may have several captions.
        k: hits per image for the result metrics.
        sweep: (option name, values): one result row per value of that `Retriever.query_many`
            option (with `query_options` for the rest).
        query_options: other `query_many` options for every row (mode, ...).
        rank_depth: how deep the index is searched for an image's true caption (MRR, median rank).
        batch_size: images per encoding batch.
        on_progress: called with a short message before each stage.

    Raises:
        RetrieverError: no index, no pairs, or an unknown query option.
    """
    import numpy as np

    from retriever.models.images import load_image

    if retriever.index is None or retriever.encoder is None:
        raise RetrieverError("eval needs an index: pass --index")
    if k < 1:
        raise RetrieverError(f"k must be at least 1, got {k}")
    settings = [{}] if sweep is None else [{sweep[0]: value} for value in sweep[1]]
    for setting in settings:  # before the images are encoded, not after
        _check_query_options({**(query_options or {}), **setting})
    say = on_progress or (lambda message: None)
    by_image = pairs.unique_images()
    images = list(by_image)
    if not images:
        raise RetrieverError(f"{pairs.path}: no usable pairs to evaluate")
    say(f"encoding {len(images)} images")
    pil = [load_image(p) for p in images]
    xq = retriever.encoder.encode_image(pil, batch_size=batch_size, show_progress_bar=False)

    say("ranking true captions in the index")
    texts = retriever.index.texts.column("text").to_pylist()
    ids_of: dict[str, set[int]] = {}
    for row, text in enumerate(texts):
        ids_of.setdefault(text, set()).add(row)
    true_ids = [set().union(*(ids_of.get(c, set()) for c in by_image[p])) for p in images]
    _, I = retriever.index.search(xq, min(rank_depth, len(retriever.index)))
    retrieval = recall_metrics(ranks_in_index(I, true_ids), "image_to_text")
    retrieval["captions_in_index"] = float(np.mean([bool(t) for t in true_ids]))

    say("text to image over the pairs' images")
    captions = list(dict.fromkeys(pairs.captions))
    xt = retriever.encoder.encode_text(captions, batch_size=256, show_progress_bar=False)
    positive = np.array([[c in by_image[p] for p in images] for c in captions])
    t2i = recall_metrics(best_positive_rank(xt @ xq.T, positive), "text_to_image")
    retrieval.update({key: value for key, value in t2i.items() if "recall" in key})

    rows = []
    for setting in settings:
        say(f"results with {setting or 'default options'}")
        options = {**(query_options or {}), **setting}
        row_k = int(options.pop("k", k))  # `k` itself can be swept
        shown = {**options, "k": row_k} if "k" in setting else options
        rows.append(
            {"options": shown, **_result_metrics(retriever, pil, xq, images, by_image, row_k, options, batch_size)}
        )
    return EvalResult(str(pairs.path), str(retriever.index.path), len(images), len(captions), retrieval, rows)


def _check_query_options(options: dict[str, Any]) -> None:
    """Raise RetrieverError naming an option `Retriever.query_many` does not take, or a result
    option (diversity, fetch_k, dedupe, where, k) of the wrong kind or range."""
    import inspect
    import numbers

    from retriever.search.api import Retriever
    from retriever.search.options import ResultOptions

    accepted = set(inspect.signature(Retriever.query_many).parameters) - {"self", "images", "batch_size"}
    for name in options:
        if name not in accepted:
            raise RetrieverError(f"unknown query option {name!r}; options: {', '.join(sorted(accepted))}")
    k = options.get("k", 1)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise RetrieverError(f"k must be a whole number of at least 1, got {k!r}")
    fields = ("diversity", "fetch_k", "dedupe", "where")
    ResultOptions(**{name: options[name] for name in fields if name in options}).check()


def _result_metrics(
    retriever: Retriever,
    pil: list,
    xq: np.ndarray,
    images: list[Path],
    by_image: dict[Path, set[str]],
    k: int,
    options: dict[str, Any],
    batch_size: int,
) -> dict[str, Any]:
    """Diversity, relevance, top-1 accuracy and metadata coverage of each image's top-k hits."""
    import numpy as np

    try:
        results = retriever.query_many(pil, k=k, batch_size=batch_size, **options)
    except TypeError as e:  # a value of the wrong kind for an option not checked above (mode, ...)
        raise RetrieverError(f"query options {options}: {e}") from None
    encoder = retriever._require_encoder()
    ils, relevance, top1 = [], [], []
    distinct: dict[str, list[int]] = {}
    for image, hits in zip(images, results):
        if not hits:
            continue
        top1.append(hits[0].text in by_image[image])
        scored = [h.score for h in hits if h.score is not None]
        relevance.append(float(np.mean(scored)) if scored else math.nan)
        ils.append(intra_list_similarity(_hit_vectors(retriever, encoder, hits)))
        for column in {key for h in hits for key, value in h.metadata.items() if _is_attribute(value)}:
            distinct.setdefault(column, []).append(len({h.metadata.get(column) for h in hits}))
    return {
        "k": k,
        "top1_true_caption": float(np.mean(top1)) if top1 else 0.0,
        "intra_list_similarity": float(np.mean(ils)) if ils else 0.0,
        "mean_relevance": float(np.nanmean(relevance)) if relevance else 0.0,
        "distinct_per_list": {column: float(np.mean(counts)) for column, counts in sorted(distinct.items())},
    }


def _hit_vectors(retriever: Retriever, encoder, hits: list) -> np.ndarray:
    """The hits' text vectors: read from their indexes' stored vectors where every hit has one
    (a read, not a re-encode: large evaluations stay fast), else encoded."""
    import numpy as np

    from retriever.search.options import can_rerank, exact_vectors

    by_name: dict[str | None, Any] = {Path(ix.path).name: ix for ix in retriever.indexes}
    if len(retriever.indexes) == 1:
        by_name[None] = retriever.indexes[0]
    sources = [by_name.get(h.index) if h.id is not None else None for h in hits]
    if all(ix is not None and can_rerank(ix) for ix in sources):
        return np.stack([exact_vectors(ix, np.array([h.id]))[0] for ix, h in zip(sources, hits)])  # type: ignore[arg-type]
    return encoder.encode_text([h.text for h in hits], show_progress_bar=False)


def _is_attribute(value: Any) -> bool:
    """Metadata worth counting distinct values of: short strings, ints and bools (not ids or floats)."""
    return isinstance(value, (bool, int)) or (isinstance(value, str) and 0 < len(value) <= 40)
