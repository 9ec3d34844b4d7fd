"""The Python API: open an index (and optionally a caption generator), query with images or text.

Modes: `retrieve` (nearest indexed texts), `generate` (captions written by a CoCa model, no
index needed) and `hybrid` (retrieve; when the best match is weak, also generate; rank
everything by the index model's image-text similarity).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import RetrieverError
from retriever.index.store import TextIndex, check_built_with, read_index, read_manifest
from retriever.index.verify import check_scores
from retriever.models.encoder import Encoder
from retriever.models.images import load_image
from retriever.models.loading import LoadedModel, load_model, split_model_ref

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from retriever.generate.decoding import DecodeOptions
    from retriever.search.rowmask import RowMask

MODES = ("retrieve", "generate", "hybrid")
# Hybrid mode generates when the best retrieved score is below this. Measured on the toy world
# (bench/hybrid_threshold.py, v3 toyworld): the true caption's score has 5th percentile 0.85,
# the best wrong one's (true caption missing) median 0.71 and 95th percentile 0.81; 0.80 leaves
# 2.5% of images on the wrong side, the fewest of the thresholds tried. For hub CLIP models a
# fitting caption's cosine is around 0.3 (not measurable offline here); pass --min-score to tune.
DEFAULT_MIN_SCORE = {"toyworld": 0.80}
FALLBACK_MIN_SCORE = 0.3
MASKS_KEPT = 8  # --where filters' rows kept per Retriever (1 bit per row each)


@dataclass
class Hit:
    """One caption idea: `score` is its cosine to the query under the index model (None when no
    index model scored it), `id` its row in the index (None when generated), `source` where it
    came from (`retrieved` or `generated`), `index` which index it came from."""

    text: str
    score: float | None
    id: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "retrieved"
    index: str | None = None  # the index directory's name (several can be searched at once)

    def to_dict(self) -> dict:
        return asdict(self)


class Retriever:
    """Caption ideas for images: nearest texts of an index, and/or captions from a generator.

    Example:
        >>> r = Retriever.open("indexes/toyworld", generator="toyworld-coca")
        >>> [(h.text, h.source) for h in r.query("cat.png", k=3, mode="hybrid")]
    """

    def __init__(
        self,
        index: TextIndex | None,
        model: LoadedModel | None,
        generator: Any = None,
        more_indexes: Sequence[TextIndex] = (),
    ):
        self.indexes = ([index] if index is not None else []) + list(more_indexes)
        for i, opened in enumerate(self.indexes):
            assert model is not None
            check_built_with(
                opened.manifest,
                model,
                opened.path,
                "query it with the model that built it, or rebuild the index"
                if i == 0
                else f"indexes searched together must share one model (the first, {self.indexes[0].path}, "
                f"was built with {model.spec})",
            )
        self.index = index
        self.model = model
        self._masks: OrderedDict[tuple[int, str], RowMask] = OrderedDict()
        self._mask_lock = threading.Lock()
        self.encoder = Encoder(model) if model is not None else None
        if model is not None and hasattr(generator, "folder"):  # a style decoder knows one CLIP model only
            from retriever.generate.style import check_same_clip

            check_same_clip(generator.folder.clip, model, generator.path)
        self.generator = generator
        # A style decoder (`style:PATH`) arrives as its ready captioner; a CoCa as a LoadedModel.
        self._captioner = generator if hasattr(generator, "caption_candidates") else None

    @classmethod
    def open(
        cls,
        index: str | Path | Sequence[str | Path] | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        device: str | None = None,
        precision: str = "fp32",
        generator: str | LoadedModel | None = None,
        generator_pretrained: str | None = None,
    ) -> Retriever:
        """Open an index with the model recorded in its manifest (or `model`/`pretrained`, which
        must be the same weights, e.g. a checkpoint that has moved), and optionally a generator.

        `index` may also be a list of index directories built with one model: queries search
        them all and merge the hits by score (each hit names its index).

        `generator` is a CoCa model: `toyworld-coca`, `NAME:TAG` (e.g.
        `coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k`), a name with `generator_pretrained`,
        or an already loaded model (to share one between several indexes).
        """
        if index is None and generator is None:
            raise RetrieverError("give an index to retrieve from, or a generator to write captions")
        loaded_gen: Any = generator if not isinstance(generator, str) else None
        style = isinstance(generator, str) and generator.startswith("style:")
        if isinstance(generator, str) and not style:
            name, tag = split_model_ref(generator)
            loaded_gen = load_model(name, generator_pretrained or tag, device=device, precision=precision)
        if isinstance(loaded_gen, LoadedModel):
            from retriever.generate.captioner import Captioner

            Captioner(loaded_gen)  # fail now, not at the first query, if it cannot write
        paths = [] if index is None else [index] if isinstance(index, (str, Path)) else list(index)
        given: dict[Path, str | Path] = {}
        for path in paths:  # searched twice, every hit would come back twice
            earlier = given.setdefault(Path(path).resolve(), path)
            if earlier is not path:
                twice = "given twice" if str(earlier) == str(path) else f"the same index as {earlier}"
                raise RetrieverError(f"{path}: {twice}; give each index once")
        if not paths:
            if style:
                from retriever.generate.style import load_generator

                loaded_gen = load_generator(str(generator), device=device, precision=precision)
            return cls(None, None, loaded_gen)
        manifest = read_manifest(paths[0])
        recorded = manifest["model"]
        if model is None:
            model, pretrained = recorded["name"], pretrained or recorded["pretrained"]
        loaded = load_model(model, pretrained, device=device, precision=precision)
        use_gpu = None if device in (None, "cuda") else False
        first, *rest = [read_index(path, use_gpu=use_gpu) for path in paths]
        if style:  # shares the index's CLIP model, and must have been trained with it
            from retriever.generate.style import load_generator

            loaded_gen = load_generator(str(generator), device=device, precision=precision, clip=loaded)
        if getattr(loaded_gen, "wants_index_memory", False):
            from retriever.search.style_memory import index_memory

            loaded_gen.memory_lookup = index_memory(first)
        return cls(first, loaded, loaded_gen, rest)

    @property
    def captioner(self):
        if self.generator is None:
            raise RetrieverError("this mode writes captions: open the Retriever with a generator (a CoCa model)")
        if self._captioner is None:
            from retriever.generate.captioner import Captioner

            self._captioner = Captioner(self.generator)
        return self._captioner

    def default_min_score(self) -> float:
        name = self.model.spec.name if self.model is not None else ""
        return DEFAULT_MIN_SCORE.get(name, FALLBACK_MIN_SCORE)

    def query(self, image: str | Path | Image.Image, k: int = 10, mode: str = "retrieve", **options: Any) -> list[Hit]:
        """Caption ideas for one image (a path or a PIL image), best first; see `query_many`."""
        return self.query_many([image], k=k, mode=mode, **options)[0]

    def query_many(
        self,
        images: Sequence[str | Path | Image.Image],
        k: int = 10,
        mode: str = "retrieve",
        decode: DecodeOptions | None = None,
        min_score: float | None = None,
        always_generate: bool = False,
        n_generate: int = 1,
        batch_size: int = 64,
        text: str | None = None,
        plus: Sequence[str | tuple[str, float]] = (),
        minus: Sequence[str | tuple[str, float]] = (),
        diversity: float = 0.0,
        fetch_k: int | None = None,
        dedupe: float | None = None,
        where: str | None = None,
    ) -> list[list[Hit]]:
        """Caption ideas for several images.

        Args:
            images: paths or PIL images; an unreadable file raises ImageError.
            k: retrieved texts per image (hybrid returns the k best of retrieved + generated).
            mode: `retrieve`, `generate` or `hybrid`.
            decode: decoding options for generated captions (default: beam search, 6 beams).
            min_score: hybrid generates when the best retrieved score is below this
                (default: per model, see DEFAULT_MIN_SCORE).
            always_generate: hybrid generates whatever the retrieved scores.
            n_generate: captions to generate per image (the n best beams, or n samples).
            text: a text combined with each image (image + text, normalised): "in winter".
            plus: texts (or (text, weight) pairs, or "text:weight") that push each query towards
                them: normalise(image + sum(w plus) - sum(w minus)).
            minus: the same, pushing each query away from them.
            diversity: 0 (plain nearest) to 1 (most diverse): MMR over `fetch_k` candidates.
            fetch_k: candidates for re-ranking, from each index (default max(10 k, 100) when re-ranking).
            dedupe: collapse hits whose texts' cosine is at least this, keeping the best.
            where: a filter over metadata columns, e.g. `source = "coco" and len < 60`.
        """
        from PIL import Image

        if mode not in MODES:
            raise RetrieverError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if k < 1:
            raise RetrieverError(f"k must be at least 1, got {k}")
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        if mode == "generate":
            generated = self.captioner.caption_candidates(pil, decode, n=n_generate)
            scores = self._similarities(pil, generated) if self.encoder is not None else None
            return [
                self._generated_hits(texts, None if scores is None else scores[i]) for i, texts in enumerate(generated)
            ]
        xq = self._require_encoder().encode_image(pil, batch_size=batch_size, show_progress_bar=False)
        xq = self.steer(xq, text=text, plus=plus, minus=minus)
        results = self.search(xq, k, diversity=diversity, fetch_k=fetch_k, dedupe=dedupe, where=where)
        if mode == "retrieve":
            return results
        threshold = self.default_min_score() if min_score is None else min_score
        weak = [i for i, hits in enumerate(results) if always_generate or not hits or _score(hits[0]) < threshold]
        if weak:
            generated = self.captioner.caption_candidates([pil[i] for i in weak], decode, n=n_generate)
            for i, texts in zip(weak, generated):
                texts = [t for t in texts if t not in {h.text for h in results[i]}]
                similar: list[float] = (
                    (self._require_encoder().encode_text(texts, show_progress_bar=False) @ xq[i]).tolist()
                    if texts
                    else []
                )
                merged = results[i] + self._generated_hits(texts, similar)
                results[i] = sorted(merged, key=lambda h: -_score(h))[:k]
        return results

    def query_text(
        self,
        text: str,
        k: int = 10,
        plus: Sequence[str | tuple[str, float]] = (),
        minus: Sequence[str | tuple[str, float]] = (),
        **options: Any,
    ) -> list[Hit]:
        """The `k` indexed texts nearest to a text query (steering and result options as in `query_many`)."""
        if not text or not text.strip():
            raise RetrieverError("the text query is empty")
        xq = self.steer(self._require_encoder().encode_text([text], show_progress_bar=False), plus=plus, minus=minus)
        return self.search(xq, k, **options)[0]

    def query_blend(
        self,
        images: Sequence[str | Path | Image.Image],
        weights: Sequence[float] | None = None,
        k: int = 10,
        text: str | None = None,
        plus: Sequence[str | tuple[str, float]] = (),
        minus: Sequence[str | tuple[str, float]] = (),
        **options: Any,
    ) -> list[Hit]:
        """One result list for several images blended (weighted, normalised), optionally steered."""
        from PIL import Image

        from retriever.search.steering import blend

        if not images:
            raise RetrieverError("blend needs at least one image")
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        xq = blend(self._require_encoder().encode_image(pil, show_progress_bar=False), weights)[None]
        return self.search(self.steer(xq, text=text, plus=plus, minus=minus), k, **options)[0]

    def more_like(
        self,
        id: int,
        k: int = 10,
        index: int = 0,
        plus: Sequence[str | tuple[str, float]] = (),
        minus: Sequence[str | tuple[str, float]] = (),
        **options: Any,
    ) -> list[Hit]:
        """Hits for an indexed text's own stored vector ("more like this"): row `id` of index number `index`."""
        from retriever.search.options import exact_vectors

        if not self.indexes:
            raise RetrieverError("more like this needs an index")
        if not 0 <= index < len(self.indexes):
            raise RetrieverError(f"no index number {index} (this Retriever has {len(self.indexes)})")
        source = self.indexes[index]
        if not 0 <= int(id) < len(source):
            raise RetrieverError(f"{source.path}: no row {id} (ids run from 0 to {len(source) - 1})")
        xq = self.steer(exact_vectors(source, [int(id)]), plus=plus, minus=minus)
        return self.search(xq, k, **options)[0]

    def steer(
        self,
        xq: np.ndarray,
        text: str | None = None,
        plus: Sequence[str | tuple[str, float]] = (),
        minus: Sequence[str | tuple[str, float]] = (),
    ) -> np.ndarray:
        """Query vectors `xq` combined with a text and pushed by weighted modifiers, normalised."""
        from retriever.search.steering import normalise, parse_weighted, steer

        if text is None and not plus and not minus:
            return xq
        encoder = self._require_encoder()

        def weighted(specs: Sequence[str | tuple[str, float]]) -> tuple[Any, list[float]]:
            pairs = [parse_weighted(s) if isinstance(s, str) else (str(s[0]), float(s[1])) for s in specs]
            if not pairs:
                return None, []
            return encoder.encode_text([t for t, _ in pairs], show_progress_bar=False), [w for _, w in pairs]

        if text is not None:
            if not text.strip():
                raise RetrieverError("the text to combine with the image is empty")
            xq = normalise(xq + encoder.encode_text([text], show_progress_bar=False))
        plus_v, plus_w = weighted(plus)
        minus_v, minus_w = weighted(minus)
        return steer(xq, plus_v, plus_w, minus_v, minus_w)

    def search(
        self,
        xq: np.ndarray,
        k: int,
        diversity: float = 0.0,
        fetch_k: int | None = None,
        dedupe: float | None = None,
        where: str | None = None,
    ) -> list[list[Hit]]:
        """Hits for each row of `xq` (normalised query vectors from this model), from every index
        merged by score, with the result options of `query_many`."""
        from retriever.search.options import ResultOptions, search_indexes

        if not self.indexes:
            raise RetrieverError("this mode needs an index (build one with `retriever build-index`)")
        if k < 1:
            raise RetrieverError(f"k must be at least 1, got {k}")
        options = ResultOptions(diversity=diversity, fetch_k=fetch_k, dedupe=dedupe, where=where)
        masks = [self._mask(n, where) for n in range(len(self.indexes))] if where else None
        names = [Path(index.path).name for index in self.indexes]
        results = []
        for hits in search_indexes(self.indexes, xq, k, options, masks):
            for n, score, i in hits:  # a cosine above 1 is a corrupt vector, never an answer
                check_scores(self.indexes[n].path, [score], [i])
            rows = [self.indexes[n].rows([i])[0] for n, _, i in hits]
            results.append([_hit(row, score, names[n]) for row, (n, score, _) in zip(rows, hits)])
        return results

    def _mask(self, n: int, where: str) -> RowMask:
        """Index n's rows matching `where`, computed once per expression: a server or a page
        re-uses a filter query after query."""
        from retriever.search.filters import where_rows

        key = (n, where)
        with self._mask_lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
                return mask
        mask = where_rows(self.indexes[n].texts, where)
        with self._mask_lock:
            self._masks[key] = mask
            while len(self._masks) > MASKS_KEPT:
                self._masks.popitem(last=False)
        return mask

    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise RetrieverError("this mode needs an index (build one with `retriever build-index`)")
        return self.encoder

    def _similarities(self, images: list, texts: list[list[str]]) -> list[list[float]]:
        encoder = self._require_encoder()
        xq = encoder.encode_image(images, show_progress_bar=False)
        return [
            (encoder.encode_text(t, show_progress_bar=False) @ xq[i]).tolist() if t else [] for i, t in enumerate(texts)
        ]

    def _generated_hits(self, texts: list[str], scores: list[float] | None) -> list[Hit]:
        source = getattr(self.captioner, "source", "generated")  # "styled" for a style decoder
        if scores is None:
            return [Hit(text=t, score=None, id=None, source=source) for t in texts]
        hits = [Hit(text=t, score=float(s), id=None, source=source) for t, s in zip(texts, scores)]
        return sorted(hits, key=lambda h: -_score(h))


def _score(hit: Hit) -> float:
    """A hit's score for ranking (generated hits without one rank last)."""
    return -math.inf if hit.score is None else hit.score


def _hit(row: dict, score: float, index: str | None = None) -> Hit:
    row = {key: _plain(value) for key, value in row.items()}
    return Hit(text=row.pop("text"), score=score, id=int(row.pop("id")), metadata=row, index=index)


def _plain(value: Any) -> Any:
    """NaN (a missing value) to None, so hits serialise as JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
