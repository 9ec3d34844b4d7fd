"""What a query asks for and its answer: the checks that need the loaded indexes (names, mode,
which inputs go together), the Retriever call for each kind of query, and the OpenAPI text of
its fields. The fields' types were checked before, by `body.check_fields`.

Several indexes are searched by one Retriever holding them all (`Combined`), so hits merge by
score (or by MMR with diversity) exactly as `retriever query --index a --index b` merges them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from retriever.corpus.cjk import dedupe_key
from retriever.errors import ImageError, IndexFormatError, RetrieverError
from retriever.serve.body import HTTPProblem, QueryParams, http_message
from retriever.serve.health import IndexHealth

if TYPE_CHECKING:
    from retriever.search.api import Retriever

IMAGE_ERROR_STATUS = {"too_large": 413}


def check_query(
    params: QueryParams,
    retrievers: dict[str, Retriever],
    default: str,
    health: IndexHealth,
    generators: dict[str, dict] | None = None,
) -> tuple[tuple[str, ...], str, str | None]:
    """The index names, mode and generator name (None when retrieving) of a query, or a refusal of what it asks for."""
    if params.index is not None and params.indexes is not None:
        raise HTTPProblem(400, "send index (one name) or indexes (several), not both")
    names = tuple(params.indexes or [params.index or params.like_index or default])
    unknown = [n for n in names if n not in retrievers]
    if unknown:
        raise HTTPProblem(404, f"unknown index {unknown[0]!r}; loaded: {', '.join(retrievers)}")
    first = retrievers[names[0]]
    images = params.images or ([params.image_bytes] if params.image_bytes is not None else [])
    text = params.text
    if not images and text is None and params.like is None:
        raise HTTPProblem(400, "send an image (or images), a text, or like (an indexed text's id)")
    if params.like is not None and (images or text is not None):
        raise HTTPProblem(400, "like queries with an indexed text alone: send no image or text with it")
    if params.like_index is not None and params.like is None:
        raise HTTPProblem(400, "like_index names the index of like: send like (an id) too")
    if params.weights is not None and not images:
        raise HTTPProblem(400, "weights are for blending images: send images with them")
    blend = len(images) > 1 or params.weights is not None
    mode = params.mode or ("retrieve" if first.index is not None or not images else "generate")
    if mode not in ("retrieve", "generate", "hybrid"):
        raise HTTPProblem(400, f"unknown mode {mode!r}; choose from retrieve, generate, hybrid")
    for name in names:
        if mode != "generate" and retrievers[name].index is None:
            raise HTTPProblem(400, f"{name!r} has no index: only mode=generate")
    available = (generators or {}).get(names[0], {} if first.generator is None else {"": first.generator})
    generator = _check_generator(params.generator, names[0], mode, available, generators or {})
    if mode != "retrieve":
        if not images:
            raise HTTPProblem(400, "text and like queries only retrieve (mode must be retrieve)")
        if blend:
            raise HTTPProblem(400, "blended images only retrieve (mode must be retrieve)")
        if not available:
            raise HTTPProblem(400, f"{names[0]!r} has no generator: start the server with --generator for mode={mode}")
    if mode == "generate":
        used = [
            f
            for f, on in (
                ("text", text is not None),
                ("plus", params.plus),
                ("minus", params.minus),
                ("diversity", params.diversity),
                ("fetch_k", params.fetch_k),
                ("where", params.where),
                ("like", params.like is not None),
                ("indexes", len(names) > 1),
            )
            if on
        ]
        if used:
            raise HTTPProblem(
                400,
                f"mode=generate writes captions without an index: {', '.join(used)} "
                "apply to retrieved texts (use retrieve or hybrid)",
            )
    if mode != "generate":
        for name in names:
            damage = health.problem(name)
            if damage:
                raise HTTPProblem(503, f"index {name} is damaged: {damage}")
    return names, mode, generator


def _check_generator(asked: str | None, index: str, mode: str, available: dict, generators: dict) -> str | None:
    """The name of the generator that writes a query's captions: the one asked for, or the index's default."""
    if asked is None:
        return None if mode == "retrieve" else (next(iter(available), None) or None)  # "": an unnamed generator
    loaded = list(dict.fromkeys(g for per_index in generators.values() for g in per_index))
    if asked not in loaded:
        raise HTTPProblem(400, f"unknown generator {asked[:200]!r}; loaded: {', '.join(loaded) or '(none)'}")
    if asked not in available:
        raise HTTPProblem(
            400,
            f"generator {asked!r} does not serve index {index!r} (it was trained with another "
            f"CLIP model); for {index!r} choose from: {', '.join(available) or '(none)'}",
        )
    if mode == "retrieve":
        raise HTTPProblem(400, "generator chooses who writes captions: send mode generate or hybrid with it")
    return asked


def answer(names: tuple[str, ...], target: tuple[Retriever, list[str]], params: QueryParams, mode: str):
    """The hits of a checked query, each naming its index by the name the server knows it by."""
    from retriever.models.images import image_from_bytes
    from retriever.search.options import DEFAULT_QUERY_DEDUPE, can_rerank

    retriever, labels = target
    try:
        options = params.result_options()
        dedupe = params.dedupe
        if dedupe is None or dedupe is True:  # the CLI's default: on where every index can re-rank exactly
            dedupe = (
                DEFAULT_QUERY_DEDUPE
                if retriever.indexes and all(can_rerank(i) for i in retriever.indexes)
                else (True if dedupe else None)
            )
        options["dedupe"] = dedupe if isinstance(dedupe, float) else None
        steering = {"plus": params.plus, "minus": params.minus}
        images = params.images or ([params.image_bytes] if params.image_bytes is not None else [])
        pil = [
            image_from_bytes(data, params.filename if len(images) == 1 and params.filename else f"images[{i}]")
            for i, data in enumerate(images)
        ]
        if params.like is not None:
            position = _like_position(params, labels)
            hits = retriever.more_like(params.like, k=params.k, index=position, **steering, **options)
        elif len(pil) > 1 or params.weights is not None:
            hits = retriever.query_blend(pil, params.weights, k=params.k, text=params.text, **steering, **options)
        elif pil:
            extra = {**steering, **options} if mode != "generate" else {}
            hits = retriever.query(pil[0], k=params.k, mode=mode, text=params.text, **extra)
        else:
            hits = retriever.query_text(params.text or "", k=params.k, **steering, **options)
    except ImageError as e:
        raise HTTPProblem(IMAGE_ERROR_STATUS.get(e.kind, 400), f"{e.reason}") from None
    except IndexFormatError as e:  # a search that met damaged vectors: not the client's fault
        raise HTTPProblem(503, f"index {', '.join(names)} is damaged: {e}") from None
    except RetrieverError as e:
        raise HTTPProblem(400, http_message(str(e))) from None
    by_path = {Path(ix.path).name: label for ix, label in zip(retriever.indexes, labels)}
    for hit in hits:
        hit.index = by_path.get(hit.index, hit.index) if hit.index is not None else None
    if dedupe is not None and dedupe is not False:  # and the text-normalised collapse, as before
        hits = _dedupe(hits)
    return hits


def _like_position(params: QueryParams, labels: list[str]) -> int:
    name = params.like_index or labels[0]
    if name not in labels:
        raise RetrieverError(f"like_index {name!r} is not among the searched indexes ({', '.join(labels)})")
    return labels.index(name)


def label(params: QueryParams) -> dict:
    """What each hit answers: the CLI's keys (`image`, `query_text`, `like`, `blend`)."""
    if params.like is not None:
        return {"like": params.like}
    if params.images or params.weights is not None:
        count = len(params.images) or 1
        weights = params.weights or [1.0] * count
        names = [f"images[{i}]" for i in range(count)] if params.images else [params.filename or "image"]
        return {"blend": " + ".join(f"{n}:{w:g}" for n, w in zip(names, weights))}
    if params.image_bytes is not None:
        return {"image": params.filename, **({"query_text": params.text} if params.text is not None else {})}
    return {"query_text": params.text}


def note(hits: list, params: QueryParams) -> str | None:
    """Why fewer than k hits came back, as `retriever query` says it on stderr."""
    if params.where and len(hits) < params.k:
        return f"only {len(hits)} indexed texts match where {params.where!r}"
    return None


def _dedupe(hits: list) -> list:
    seen, kept = set(), []
    for hit in hits:
        key = dedupe_key(hit.text, fold_case=True)
        if key not in seen:
            seen.add(key)
            kept.append(hit)
    return kept


class Combined:
    """The Retriever answering a query over one or several loaded indexes, with each index's name.

    Several indexes are searched together by one Retriever holding them all (the first one's
    model and generator, or the generator the query chose); it is built on first use and kept.
    Indexes built with different models cannot be combined: that is the client's 400.
    """

    def __init__(self, generators: dict[str, dict] | None = None):
        self._cache: dict[tuple[tuple[str, ...], str | None], tuple[Retriever, list[str]]] = {}
        self._lock = threading.Lock()
        self._generators = generators or {}

    def get(
        self, names: tuple[str, ...], retrievers: dict[str, Retriever], generator: str | None = None
    ) -> tuple[Retriever, list[str]]:
        with self._lock:
            if (names, generator) not in self._cache:
                self._cache[names, generator] = self._build(names, retrievers, generator)
            return self._cache[names, generator]

    def _build(self, names, retrievers, generator):
        from retriever.search.api import Retriever

        parts = [retrievers[n] for n in names]
        labels = [
            name if len(r.indexes) == 1 else f"{name}/{Path(ix.path).name}"
            for name, r in zip(names, parts)
            for ix in r.indexes
        ]
        chosen = self._generators.get(names[0], {}).get(generator) if generator else None
        if len(parts) == 1:
            if chosen is None or chosen is parts[0].generator:
                return parts[0], labels
            first = parts[0]
            return Retriever(first.index, first.model, chosen, first.indexes[1:]), labels
        indexes = [ix for r in parts for ix in r.indexes]
        dirs = [Path(ix.path).name for ix in indexes]
        if len(set(dirs)) < len(dirs):
            raise HTTPProblem(
                400,
                f"{', '.join(names)} hold indexes in directories of one name; they cannot be told apart in one search",
            )
        try:
            return Retriever(indexes[0], parts[0].model, chosen or parts[0].generator, indexes[1:]), labels
        except IndexFormatError as e:
            raise HTTPProblem(400, f"{', '.join(names)} cannot be searched together: {e}") from None


_FIELDS_DOC = {
    "k": {"type": "integer", "default": 10, "minimum": 1, "maximum": 1000, "description": "hits to return"},
    "mode": {
        "type": "string",
        "enum": ["retrieve", "generate", "hybrid"],
        "description": "default: retrieve where the index exists; text, like and blends only retrieve",
    },
    "index": {"type": "string", "description": "a loaded index's name (GET /v1/indexes); default: the first"},
    "generator": {
        "type": "string",
        "description": "generate/hybrid: who writes the captions, a name from "
        "GET /v1/indexes (e.g. toyworld-coca, style:toyworld-style); "
        "default: the server's first --generator. A style decoder's "
        "hits have source `styled`",
    },
    "dedupe": {
        "description": "collapse near-duplicate hits: true (cosine 0.95, as `retriever query`; the default "
        "where exact vectors exist), false, or a cosine in (0, 1]; also collapses texts "
        "equal up to case and spaces",
        "oneOf": [{"type": "boolean"}, {"type": "number"}],
    },
    "diversity": {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "default": 0,
        "description": "0 plain nearest, 1 most diverse (MMR); the first hit stays the nearest",
    },
    "fetch_k": {
        "type": "integer",
        "minimum": 1,
        "maximum": 10000,
        "description": "candidates re-ranked by diversity/dedupe (default max(10 k, 100))",
    },
    "where": {
        "type": "string",
        "description": "filter on metadata columns, e.g. "
        '`shape = "star" and len < 40`; fewer than k matches set `note`',
    },
    "like": {"type": "integer", "minimum": 0, "description": "more like this: an indexed text's id (a hit's `id`)"},
    "like_index": {"type": "string", "description": "the index `like` belongs to (a hit's `index`)"},
}
_MODIFIERS_DOC = {
    "type": "array",
    "maxItems": 16,
    "items": {
        "oneOf": [
            {"type": "string", "description": "TEXT or TEXT:WEIGHT, e.g. autumn:0.5"},
            {
                "type": "object",
                "required": ["text"],
                "properties": {"text": {"type": "string"}, "weight": {"type": "number", "exclusiveMinimum": 0}},
            },
        ]
    },
}
QUERY_OPENAPI = {
    "description": "Send an image, several images (a blend), a text, an image and a text together, or `like`. "
    "The query vector is normalise(image(s) + text + sum(w plus) - sum(w minus)). The answer is "
    "`{index, indexes, mode, k, note, hits}`; each hit has the fields of `retriever query --json` "
    "and names its index.",
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one image, or repeat the field to blend several",
                        },
                        "weights": {"type": "string", "description": "blend weights, one per image: 1,0.5"},
                        "text": {"type": "string", "description": "a text query, or a text combined with the image"},
                        "plus": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "repeat: TEXT or TEXT:WEIGHT",
                        },
                        "minus": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "repeat: TEXT or TEXT:WEIGHT",
                        },
                        "indexes": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "repeat to search several indexes of one model, merged by score",
                        },
                        **_FIELDS_DOC,
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "image_base64": {
                            "type": "string",
                            "description": "base64 or a data URL (also accepted as `image`)",
                        },
                        "images": {
                            "type": "array",
                            "maxItems": 8,
                            "items": {"type": "string"},
                            "description": "several base64 images, blended",
                        },
                        "weights": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
                        "text": {"type": "string"},
                        "plus": _MODIFIERS_DOC,
                        "minus": _MODIFIERS_DOC,
                        "indexes": {"type": "array", "items": {"type": "string"}},
                        **_FIELDS_DOC,
                    },
                }
            },
        },
    },
}
