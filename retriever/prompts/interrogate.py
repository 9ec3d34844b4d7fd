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

from retriever.errors import RetrieverError
from retriever.models.images import load_image
from retriever.models.loading import DEFAULT_MODEL, DEFAULT_PRETRAINED, LoadedModel, load_model, split_model_ref
from retriever.prompts.label_tables import (
    BUILTIN_TABLES,
    LabelTable,
    ensure_builtin_tables,
    load_table,
    open_table,
    parse_builtin,
)
from retriever.prompts.modes import DEFAULT_MIN_FLAVORS, FLAVOR_INTERMEDIATE_COUNT, PromptBuilder, join

if TYPE_CHECKING:
    from PIL import Image

    from retriever.generate.decoding import DecodeOptions

MODES = ("best", "fast", "classic", "negative")
DEFAULT_MAX_FLAVORS = {"best": 32, "fast": 32, "classic": 3, "negative": 32}

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
        return {
            "image": self.image,
            "mode": self.mode,
            "prompt": self.prompt,
            "caption": self.caption,
            "similarity": round(self.similarity, 6),
            "terms": self.terms,
        }


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

    def __init__(
        self,
        model: LoadedModel,
        tables: Sequence[LabelTable],
        caption_source: CaptionSource | None = None,
        flavor_intermediate_count: int = FLAVOR_INTERMEDIATE_COUNT,
        batch_size: int = 256,
    ):
        if not tables:
            raise RetrieverError("interrogation needs at least one label table")
        if flavor_intermediate_count < 1:
            raise RetrieverError(f"flavor_intermediate_count must be at least 1, got {flavor_intermediate_count}")
        self.model = model
        self.tables = list(tables)
        self.caption_source = caption_source
        self.builder = PromptBuilder(model, self.tables, flavor_intermediate_count, batch_size)
        self.encoder = self.builder.encoder
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
        loaded = (
            model
            if isinstance(model, LoadedModel)
            else load_model(model, pretrained, device=device, precision=precision)
        )
        # Everything that can fail fast does so before a built-in table is embedded (minutes, once).
        source: CaptionSource | None = None
        if caption_model is not None:
            source = GeneratedCaption(_load_generator(caption_model, device, precision), decode)
        elif caption_index is not None:
            source = RetrievedCaption(_open_caption_index(caption_index, loaded, device, precision))
        embed: dict[str, Any] = {"root": cache_dir, "show_progress_bar": show_progress_bar, "on_embed": on_embed}
        user = {name: open_table(name, path, loaded, **embed) for name, path in (tables or {}).items()}
        wanted = [name for name in parse_builtin(builtin) if name not in user]
        loaded_tables = [
            load_table(status.name, status.path, loaded) for status in ensure_builtin_tables(loaded, wanted, **embed)
        ]
        return cls(loaded, loaded_tables + list(user.values()), source, flavor_intermediate_count)

    def interrogate(
        self,
        image: str | Path | Image.Image,
        mode: str = "best",
        caption: str | None = None,
        min_flavors: int = DEFAULT_MIN_FLAVORS,
        max_flavors: int | None = None,
    ) -> Interrogation:
        """A prompt for one image (a path or a PIL image); see `interrogate_many`."""
        return self.interrogate_many([image], mode, caption, min_flavors, max_flavors)[0]

    def interrogate_many(
        self,
        images: Sequence[str | Path | Image.Image],
        mode: str = "best",
        caption: str | None = None,
        min_flavors: int = DEFAULT_MIN_FLAVORS,
        max_flavors: int | None = None,
        on_progress: Callable[[int, int, float], None] | None = None,
    ) -> list[Interrogation]:
        """Prompts for several images.

        Args:
            images: paths or PIL images; an unreadable file raises ImageError.
            mode: `best`, `fast`, `classic` or `negative`.
            caption: the base caption for every image; None asks the caption source (none
                configured: no caption), "" means none. Negative mode uses no caption.
            min_flavors: best mode adds at least this many terms before it may stop.
            max_flavors: most terms (flavors in classic); default per mode, see DEFAULT_MAX_FLAVORS.
            on_progress: called after each chain step of best and negative mode with
                (step, at most this many steps, the similarity reached).
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
        self.builder.on_step = on_progress
        results = []
        for label, features, base in zip(labels, xq, captions):
            if mode == "negative":
                pieces = self.builder.negative(features, max_flavors)
            elif mode == "fast":
                pieces = self.builder.fast(features, base, max_flavors)
            elif mode == "classic":
                pieces = self.builder.classic(features, base, max_flavors)
            else:
                pieces = self.builder.best(features, base, min_flavors, max_flavors)
            prompt = join(pieces)
            similarity = float((self.builder.encode([prompt]) @ features)[0]) if prompt else 0.0
            terms: dict[str, list[dict]] = {}
            for term in (t for piece in pieces for t in piece.terms):
                terms.setdefault(term.category, []).append({"text": term.text, "score": round(term.score, 6)})
            results.append(Interrogation(label, mode, prompt, base, similarity, terms))
        return results

    def fits(self, text: str) -> bool:
        """Whether `text` fits the model's context without truncation."""
        return self.builder.fits(text)


def _load_generator(generator: str | LoadedModel, device: str | None, precision: str) -> LoadedModel:
    """A CoCa model from `toyworld-coca`, `NAME:TAG`, `hf-hub:...` or `local-dir:...` (as `query --generator`)."""
    if isinstance(generator, LoadedModel):
        return generator
    name, tag = split_model_ref(generator)
    return load_model(name, tag, device=device, precision=precision)


def _open_caption_index(path: str | Path, model: LoadedModel, device: str | None, precision: str) -> Any:
    """A Retriever over `path`, sharing `model` when the index was built with it."""
    from retriever.index.store import read_index, read_manifest
    from retriever.search.api import Retriever

    if read_manifest(path)["model"].get("fingerprint") == model.fingerprint:
        return Retriever(read_index(path, use_gpu=None if device in (None, "cuda") else False), model)
    return Retriever.open(path, device=device, precision=precision)
