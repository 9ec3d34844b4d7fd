"""Prompts for images, the way clip-interrogator makes them, on this project's models and indexes.

A prompt is a base caption (written by CoCa, retrieved from an index, given, or none) followed by
terms from label tables (artists, mediums, movements, "trending" phrases, flavors), chosen by
image-text cosine under one CLIP model:

- `best`: grow the prompt greedily from the caption, one term at a time, keeping the best
  similarity seen; then return whichever of caption, classic, fast and this is most similar.
- `fast`: the caption and the top terms of all tables ranked together.
- `classic`: caption, then "medium artist, trending, movement" and the top flavors.
- `negative`: chain the terms least similar to the image (flavors and the negative list).

The algorithms follow clip-interrogator 0.6.0 (`interrogate`, `interrogate_fast`,
`interrogate_classic`, `interrogate_negative`, `chain`, `_truncate_to_fit`), with differences
noted where they are made: prompts always fit the model's context, ranking is exact, and
negative mode compares negated similarities throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.models.encoder import Encoder
from retriever.errors import RetrieverError
from retriever.models.images import load_image
from retriever.prompts.label_tables import (
    BUILTIN_TABLES,
    LabelTable,
    Term,
    ensure_builtin_tables,
    load_table,
    open_table,
    parse_builtin,
    rank_tables,
)
from retriever.models.loading import DEFAULT_MODEL, DEFAULT_PRETRAINED, LoadedModel, load_model, split_model_ref

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from retriever.generate.decoding import DecodeOptions

MODES = ("best", "fast", "classic", "negative")
DEFAULT_MAX_FLAVORS = {"best": 32, "fast": 32, "classic": 3, "negative": 32}
DEFAULT_MIN_FLAVORS = 8
FLAVOR_INTERMEDIATE_COUNT = 2048
# classic mode's single terms, in clip-interrogator's order; other tables follow in their order.
CLASSIC_SINGLES = ("mediums", "artists", "trendings", "movements")

CaptionSource = Callable[[list["Image.Image"]], list[str]]


@dataclass
class Interrogation:
    """One image's prompt: the base caption, the chosen terms by table, and the prompt's cosine
    to the image under the interrogating model."""

    image: str | None
    mode: str
    prompt: str
    caption: str
    similarity: float
    terms: dict[str, list[dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"image": self.image, "mode": self.mode, "prompt": self.prompt, "caption": self.caption,
                "similarity": round(self.similarity, 6), "terms": self.terms}


@dataclass
class _Piece:
    """One comma-separated part of a prompt and the terms it holds (the caption holds none)."""

    text: str
    terms: tuple[Term, ...] = ()


class GeneratedCaption:
    """Base captions written by a CoCa model (clip-interrogator uses BLIP here)."""

    def __init__(self, generator: LoadedModel, decode: DecodeOptions | None = None):
        from retriever.generate.captioner import Captioner

        self.captioner = Captioner(generator)
        self.decode = decode

    def __call__(self, images: list[Image.Image]) -> list[str]:
        return self.captioner.caption(images, self.decode)


class RetrievedCaption:
    """Base captions retrieved from an index: each image's nearest indexed text."""

    def __init__(self, retriever: Any):
        self.retriever = retriever

    def __call__(self, images: list[Image.Image]) -> list[str]:
        return [hits[0].text if hits else "" for hits in self.retriever.query_many(images, k=1)]


class Interrogator:
    """Prompts for images from label tables and a base caption, ranked by one CLIP model.

    Example:
        >>> it = Interrogator.open("toyworld", caption_model="toyworld-coca")
        >>> it.interrogate("red_star.png", mode="fast").prompt
    """

    def __init__(self, model: LoadedModel, tables: Sequence[LabelTable], caption_source: CaptionSource | None = None,
                 flavor_intermediate_count: int = FLAVOR_INTERMEDIATE_COUNT, batch_size: int = 256):
        if not tables:
            raise RetrieverError("interrogation needs at least one label table")
        if flavor_intermediate_count < 1:
            raise RetrieverError(f"flavor_intermediate_count must be at least 1, got {flavor_intermediate_count}")
        self.model = model
        self.encoder = Encoder(model)
        self.tables = list(tables)
        self.caption_source = caption_source
        self.flavor_intermediate_count = flavor_intermediate_count
        self.batch_size = batch_size

    @classmethod
    def open(
        cls,
        model: str | LoadedModel = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        builtin: str | Sequence[str] = BUILTIN_TABLES,
        tables: Mapping[str, str | Path] | None = None,
        caption_model: str | LoadedModel | None = None,
        caption_index: str | Path | None = None,
        decode: DecodeOptions | None = None,
        cache_dir: str | Path | None = None,
        device: str | None = None,
        precision: str = "fp32",
        flavor_intermediate_count: int = FLAVOR_INTERMEDIATE_COUNT,
        show_progress_bar: bool | None = None,
        on_embed: Callable[[str, int], None] | None = None,
    ) -> Interrogator:
        """Load a CLIP model, its label tables (embedding missing built-in ones into the cache) and
        optionally a source of base captions.

        Args:
            model: the CLIP model that ranks everything (a name as for `load_model`, or loaded).
            pretrained: its pretrained tag or checkpoint.
            builtin: clip-interrogator tables to use (artists, flavors, mediums, movements,
                trendings, negative; or "all", "none", a comma-separated string); missing ones
                are embedded once and cached.
            tables: your own tables by name: index directories built with `model`, or text files
                of labels (one a line, embedded once and cached). A name of a built-in table
                replaces it.
            caption_model: a CoCa model that writes base captions (`toyworld-coca`, `NAME:TAG`).
            caption_index: an index whose nearest text to the image is the base caption.
            decode: decoding options for `caption_model`.
            cache_dir: the cache root (default: see `label_tables.cache_dir`).
            device: `cuda`, `mps`, `cpu`, or None for the best available.
            precision: `fp32`, `fp16` or `bf16`.
            flavor_intermediate_count: terms best and negative mode chain from.
            show_progress_bar: for embedding tables; None shows one on stderr when it is a terminal.
            on_embed: called with a table's name and label count just before it is embedded.
        """
        if caption_model is not None and caption_index is not None:
            raise RetrieverError("give a caption model or a caption index, not both")
        loaded = model if isinstance(model, LoadedModel) else load_model(model, pretrained, device=device, precision=precision)
        # Everything that can fail fast does so before a built-in table is embedded (minutes, once).
        source: CaptionSource | None = None
        if caption_model is not None:
            source = GeneratedCaption(_load_generator(caption_model, device, precision), decode)
        elif caption_index is not None:
            source = RetrievedCaption(_open_caption_index(caption_index, loaded, device, precision))
        embed = {"root": cache_dir, "show_progress_bar": show_progress_bar, "on_embed": on_embed}
        user = {name: open_table(name, path, loaded, **embed) for name, path in (tables or {}).items()}
        wanted = [name for name in parse_builtin(builtin) if name not in user]
        loaded_tables = [load_table(status.name, status.path, loaded)
                         for status in ensure_builtin_tables(loaded, wanted, **embed)]
        return cls(loaded, loaded_tables + list(user.values()), source, flavor_intermediate_count)

    def interrogate(self, image: str | Path | Image.Image, mode: str = "best", caption: str | None = None,
                    min_flavors: int = DEFAULT_MIN_FLAVORS, max_flavors: int | None = None) -> Interrogation:
        """A prompt for one image (a path or a PIL image); see `interrogate_many`."""
        return self.interrogate_many([image], mode, caption, min_flavors, max_flavors)[0]

    def interrogate_many(self, images: Sequence[str | Path | Image.Image], mode: str = "best",
                         caption: str | None = None, min_flavors: int = DEFAULT_MIN_FLAVORS,
                         max_flavors: int | None = None) -> list[Interrogation]:
        """Prompts for several images.

        Args:
            images: paths or PIL images; an unreadable file raises ImageError.
            mode: `best`, `fast`, `classic` or `negative`.
            caption: the base caption for every image; None asks the caption source (none
                configured: no caption), "" means none. Negative mode uses no caption.
            min_flavors: best mode adds at least this many terms before it may stop.
            max_flavors: most terms (flavors in classic); default per mode, see DEFAULT_MAX_FLAVORS.
        """
        from PIL import Image

        if mode not in MODES:
            raise RetrieverError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        max_flavors = DEFAULT_MAX_FLAVORS[mode] if max_flavors is None else max_flavors
        if max_flavors < 0 or min_flavors < 0:
            raise RetrieverError("min_flavors and max_flavors must not be negative")
        labels = [None if isinstance(im, Image.Image) else str(im) for im in images]
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        if mode == "negative":
            captions = [""] * len(pil)
        elif caption is not None:
            captions = [caption.strip()] * len(pil)
        elif self.caption_source is not None and pil:
            captions = [c.strip() for c in self.caption_source(pil)]
        else:
            captions = [""] * len(pil)
        xq = self.encoder.encode_image(pil, batch_size=self.batch_size, show_progress_bar=False)
        results = []
        for label, features, base in zip(labels, xq, captions):
            if mode == "negative":
                pieces = self._negative(features, max_flavors)
            elif mode == "fast":
                pieces = self._fast(features, base, max_flavors)
            elif mode == "classic":
                pieces = self._classic(features, base, max_flavors)
            else:
                pieces = self._best(features, base, min_flavors, max_flavors)
            prompt = _join(pieces)
            similarity = float((self._encode([prompt]) @ features)[0]) if prompt else 0.0
            terms: dict[str, list[dict]] = {}
            for term in (t for piece in pieces for t in piece.terms):
                terms.setdefault(term.category, []).append({"text": term.text, "score": round(term.score, 6)})
            results.append(Interrogation(label, mode, prompt, base, similarity, terms))
        return results

    # The modes. Each returns the prompt as pieces, so the chosen terms are known without parsing.

    def _positive_tables(self) -> list[LabelTable]:
        return [t for t in self.tables if t.name != "negative"]

    def _fast(self, xq: np.ndarray, caption: str, max_flavors: int) -> list[_Piece]:
        """interrogate_fast: the caption, then the top terms of all tables merged."""
        tops = rank_tables(self._positive_tables(), xq, max_flavors)
        return self._truncate(_caption_piece(caption) + [_Piece(t.text, (t,)) for t in tops])

    def _classic(self, xq: np.ndarray, caption: str, max_flavors: int) -> list[_Piece]:
        """interrogate_classic: caption, "medium artist", trending, movement (one each), then the
        top `max_flavors` flavors; other tables add their top term after movement."""
        by_name = {t.name: t for t in self._positive_tables()}
        singles = [n for n in CLASSIC_SINGLES if n in by_name] + [n for n in by_name if n not in CLASSIC_SINGLES and n != "flavors"]
        top = {name: by_name[name].rank(xq, 1) for name in singles}
        top = {name: terms[0] for name, terms in top.items() if terms}
        medium, artist = top.get("mediums"), top.get("artists")
        pieces = _caption_piece(caption)
        if caption and medium is not None and caption.startswith(medium.text):
            # As clip-interrogator: the caption already names the medium, so the artist follows it.
            head = _Piece(f"{caption} {artist.text}", (artist,)) if artist else pieces[0]
            pieces = [head]
        else:
            lead = tuple(t for t in (medium, artist) if t is not None)
            if lead:
                pieces.append(_Piece(" ".join(t.text for t in lead), lead))
        pieces += [_Piece(top[n].text, (top[n],)) for n in singles if n not in ("mediums", "artists") and n in top]
        if "flavors" in by_name:
            pieces += [_Piece(t.text, (t,)) for t in by_name["flavors"].rank(xq, max_flavors)]
        return self._truncate(pieces)

    def _best(self, xq: np.ndarray, caption: str, min_flavors: int, max_flavors: int) -> list[_Piece]:
        """interrogate: chain from the caption over the top merged terms, then keep the most
        similar of caption, classic, fast and the chain."""
        flaves = rank_tables(self._positive_tables(), xq, self.flavor_intermediate_count)
        caption_sim = float((self._encode([caption]) @ xq)[0]) if caption else None
        chained = self._chain(xq, flaves, caption, caption_sim, min_flavors, max_flavors)
        candidates = [self._classic(xq, caption, max_flavors), self._fast(xq, caption, max_flavors), chained]
        if caption:
            candidates.insert(0, _caption_piece(caption))
        candidates = [c for c in candidates if c]
        if not candidates:
            return []
        sims = self._encode([_join(c) for c in candidates]) @ xq
        return candidates[int(sims.argmax())]

    def _negative(self, xq: np.ndarray, max_flavors: int) -> list[_Piece]:
        """interrogate_negative: chain the terms least like the image, from the flavors least like
        it and the whole negative list (every positive table when there is no flavors table)."""
        by_name = {t.name: t for t in self.tables}
        source = [by_name["flavors"]] if "flavors" in by_name else self._positive_tables()
        flaves = rank_tables(source, xq, self.flavor_intermediate_count, reverse=True)
        if "negative" in by_name:
            negative = by_name["negative"]
            scored = {t.text: t for t in negative.rank(xq, len(negative))}
            flaves += [scored[label] for label in negative.labels if label in scored]
        return self._chain(xq, flaves, "", None, DEFAULT_MIN_FLAVORS, max_flavors, reverse=True)

    def _chain(self, xq: np.ndarray, phrases: list[Term], caption: str, caption_sim: float | None,
               min_count: int, max_count: int, reverse: bool = False) -> list[_Piece]:
        """clip-interrogator's chain: add the phrase that makes the prompt most similar (least with
        `reverse`); stop when that no longer improves it, after at least `min_count` additions.
        Returns the best prompt seen.

        Unlike the original, a prompt that would not fit the context (so would be truncated) is
        never chosen: the next best phrase that fits is taken, and the chain stops when none
        does. With `reverse`, the starting similarity is negated too (the original compares
        negated sims against a plain one).
        """
        sign = -1.0 if reverse else 1.0
        remaining = list({t.text: t for t in phrases}.values())
        if caption:
            curr: list[Term] = []
            best_sim = sign * float(caption_sim if caption_sim is not None else (self._encode([caption]) @ xq)[0])
        else:
            if not remaining:
                return []
            first = max(remaining, key=lambda t: sign * t.score)  # a lone label's cosine is its table score
            curr = [first]
            remaining.remove(first)
            best_sim = sign * first.score
        best, curr_sim = list(curr), best_sim
        for idx in range(max_count):
            if not remaining:
                break
            prefix = _join(_caption_piece(caption) + [_Piece(t.text, (t,)) for t in curr])
            fitting = [i for i, ok in enumerate(self._fit_mask([f"{prefix}, {t.text}" for t in remaining])) if ok]
            if not fitting:
                break
            sims = sign * (self._encode([f"{prefix}, {remaining[i].text}" for i in fitting]) @ xq)
            best_at = int(sims.argmax())
            pick, sim = fitting[best_at], float(sims[best_at])
            if sim > best_sim:
                best, best_sim = curr + [remaining[pick]], sim
            if not (sim > curr_sim or idx < min_count):
                break
            curr, curr_sim = curr + [remaining[pick]], sim
            remaining.pop(pick)
        return _caption_piece(caption) + [_Piece(t.text, (t,)) for t in best]

    def fits(self, text: str) -> bool:
        """Whether `text` fits the model's context without truncation (clip-interrogator's
        `_prompt_at_max_len` negated: the last token position must still be padding)."""
        return bool(self._fit_mask([text])[0])

    def _fit_mask(self, texts: list[str]) -> list[bool]:
        return (self.model.tokenizer(texts)[:, -1] == 0).tolist()

    def _truncate(self, pieces: list[_Piece]) -> list[_Piece]:
        """clip-interrogator's `_truncate_to_fit`: keep the first piece, then pieces while the prompt fits.

        The original tests `prompt + part` without the ", " it then inserts, and splits the
        prompt on ", " (cutting labels that contain one); this tests the real text, piece by piece.
        """
        kept = pieces[:1]
        for piece in pieces[1:]:
            if not self.fits(_join(kept + [piece])):
                break
            kept.append(piece)
        return kept

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode_text(texts, batch_size=self.batch_size, show_progress_bar=False)


def _caption_piece(caption: str) -> list[_Piece]:
    return [_Piece(caption)] if caption else []


def _join(pieces: list[_Piece]) -> str:
    return ", ".join(p.text for p in pieces)


def _load_generator(generator: str | LoadedModel, device: str | None, precision: str) -> LoadedModel:
    """A CoCa model from `toyworld-coca`, `NAME:TAG`, `hf-hub:...` or `local-dir:...` (as `query --generator`)."""
    if isinstance(generator, LoadedModel):
        return generator
    name, tag = split_model_ref(generator)
    return load_model(name, tag, device=device, precision=precision)


def _open_caption_index(path: str | Path, model: LoadedModel, device: str | None, precision: str) -> Any:
    """A Retriever over `path`, sharing `model` when the index was built with it."""
    from retriever.search.api import Retriever
    from retriever.index.store import read_index, read_manifest

    if read_manifest(path)["model"].get("fingerprint") == model.fingerprint:
        return Retriever(read_index(path, use_gpu=None if device in (None, "cuda") else False), model)
    return Retriever.open(path, device=device, precision=precision)
