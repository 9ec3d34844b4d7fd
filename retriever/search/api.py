"""The Python API: open an index (and optionally a caption generator), query with images or text.

Modes: `retrieve` (nearest indexed texts), `generate` (captions written by a CoCa model, no
index needed) and `hybrid` (retrieve; when the best match is weak, also generate; rank
everything by the index model's image-text similarity).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from retriever.models.encoder import Encoder
from retriever.errors import RetrieverError
from retriever.models.images import load_image
from retriever.index.store import TextIndex, check_built_with, read_index, read_manifest
from retriever.models.loading import LoadedModel, load_model, split_model_ref

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from retriever.generate.decoding import DecodeOptions

MODES = ("retrieve", "generate", "hybrid")
# Hybrid mode generates when the best retrieved score is below this. Measured on the toy world
# (bench/hybrid_threshold.py): with toyworld the true caption's score has 5th percentile 0.84,
# the best wrong one's (true caption missing) 95th percentile 0.72; 0.78 leaves 1.3% of images
# on the wrong side. For hub CLIP models a fitting caption's cosine is around 0.3 (not
# measurable offline here); pass --min-score to tune.
DEFAULT_MIN_SCORE = {"toyworld": 0.78}
FALLBACK_MIN_SCORE = 0.3


@dataclass
class Hit:
    """One caption idea: `score` is its cosine to the query under the index model (None when no
    index model scored it), `id` its row in the index (None when generated), `source` where it
    came from (`retrieved` or `generated`)."""

    text: str
    score: float | None
    id: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "retrieved"

    def to_dict(self) -> dict:
        return asdict(self)


class Retriever:
    """Caption ideas for images: nearest texts of an index, and/or captions from a generator.

    Example:
        >>> r = Retriever.open("indexes/toyworld", generator="toyworld-coca")
        >>> [(h.text, h.source) for h in r.query("cat.png", k=3, mode="hybrid")]
    """

    def __init__(self, index: TextIndex | None, model: LoadedModel | None, generator: LoadedModel | None = None):
        if index is not None:
            assert model is not None
            check_built_with(index.manifest, model, index.path,
                             "query it with the model that built it, or rebuild the index")
        self.index = index
        self.model = model
        self.encoder = Encoder(model) if model is not None else None
        self.generator = generator
        self._captioner = None

    @classmethod
    def open(cls, index: str | Path | None = None, model: str | None = None, pretrained: str | None = None,
             device: str | None = None, precision: str = "fp32", generator: str | LoadedModel | None = None,
             generator_pretrained: str | None = None) -> Retriever:
        """Open an index with the model recorded in its manifest (or `model`/`pretrained`, which
        must be the same weights, e.g. a checkpoint that has moved), and optionally a generator.

        `generator` is a CoCa model: `toyworld-coca`, `NAME:TAG` (e.g.
        `coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k`), a name with `generator_pretrained`,
        or an already loaded model (to share one between several indexes).
        """
        if index is None and generator is None:
            raise RetrieverError("give an index to retrieve from, or a generator to write captions")
        loaded_gen = generator if isinstance(generator, LoadedModel) else None
        if isinstance(generator, str):
            name, tag = split_model_ref(generator)
            loaded_gen = load_model(name, generator_pretrained or tag, device=device, precision=precision)
        if loaded_gen is not None:
            from retriever.generate.captioner import Captioner

            Captioner(loaded_gen)  # fail now, not at the first query, if it cannot write
        if index is None:
            return cls(None, None, loaded_gen)
        manifest = read_manifest(index)
        recorded = manifest["model"]
        if model is None:
            model, pretrained = recorded["name"], pretrained or recorded["pretrained"]
        loaded = load_model(model, pretrained, device=device, precision=precision)
        return cls(read_index(index, use_gpu=None if device in (None, "cuda") else False), loaded, loaded_gen)

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
            return [self._generated_hits(texts, None if scores is None else scores[i]) for i, texts in enumerate(generated)]
        xq = self._require_encoder().encode_image(pil, batch_size=batch_size, show_progress_bar=False)
        results = self.search(xq, k)
        if mode == "retrieve":
            return results
        threshold = self.default_min_score() if min_score is None else min_score
        weak = [i for i, hits in enumerate(results) if always_generate or not hits or hits[0].score < threshold]
        if weak:
            generated = self.captioner.caption_candidates([pil[i] for i in weak], decode, n=n_generate)
            for i, texts in zip(weak, generated):
                texts = [t for t in texts if t not in {h.text for h in results[i]}]
                scores = (self.encoder.encode_text(texts, show_progress_bar=False) @ xq[i]).tolist() if texts else []
                merged = results[i] + self._generated_hits(texts, scores)
                results[i] = sorted(merged, key=lambda h: -h.score)[:k]
        return results

    def query_text(self, text: str, k: int = 10) -> list[Hit]:
        """The `k` indexed texts nearest to a text query."""
        return self.search(self._require_encoder().encode_text([text], show_progress_bar=False), k)[0]

    def search(self, xq: np.ndarray, k: int) -> list[list[Hit]]:
        """Hits for each row of `xq` (normalised query vectors from this model)."""
        if self.index is None:
            raise RetrieverError("this mode needs an index (build one with `retriever build-index`)")
        if k < 1:
            raise RetrieverError(f"k must be at least 1, got {k}")
        D, I = self.index.search(xq, k)
        results = []
        for scores, ids in zip(D, I):
            rows = self.index.rows([int(i) for i in ids if i >= 0])
            results.append([_hit(row, float(s)) for row, s in zip(rows, scores)])
        return results

    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise RetrieverError("this mode needs an index (build one with `retriever build-index`)")
        return self.encoder

    def _similarities(self, images: list, texts: list[list[str]]) -> list[list[float]]:
        xq = self.encoder.encode_image(images, show_progress_bar=False)
        return [(self.encoder.encode_text(t, show_progress_bar=False) @ xq[i]).tolist() if t else []
                for i, t in enumerate(texts)]

    @staticmethod
    def _generated_hits(texts: list[str], scores: list[float] | None) -> list[Hit]:
        hits = [Hit(text=t, score=None if scores is None else float(s), id=None, source="generated")
                for t, s in zip(texts, scores if scores is not None else [None] * len(texts))]
        return sorted(hits, key=lambda h: -h.score) if scores is not None else hits


def _hit(row: dict, score: float) -> Hit:
    row = {key: _plain(value) for key, value in row.items()}
    return Hit(text=row.pop("text"), score=score, id=int(row.pop("id")), metadata=row)


def _plain(value: Any) -> Any:
    """NaN (a missing value) to None, so hits serialise as JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
