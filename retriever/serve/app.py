"""HTTP API and web page over loaded Retrievers (FastAPI; `pip install retriever[serve]`).

The server never loads models: it is given `Retriever`s opened by the caller. Inference runs
on one worker thread, off the event loop (torch uses every core inside it); at most
`max_pending` queries wait or run at once, and the next one is answered 503 with Retry-After
before its body is read, instead of queueing (and buffering uploads) without bound. Requests
pass `security.SecurityMiddleware` first (Host, origin, API key). Every refusal is JSON:

    {"error": {"status": 413, "message": "upload is 12.0 MB; the limit is 10.0 MB"}}
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (`request: Request`) at definition time, and Request is imported inside create_app.
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Callable

from retriever.errors import ImageError, IndexFormatError, MissingExtraError, RetrieverError
from retriever.serve.body import (
    HTTPProblem,
    Limits,
    QueryParams,
    check_declared_length,
    check_fields,
    content_type_of,
    http_message,
    parse_form,
    parse_json,
    read_body,
)
from retriever.serve.health import IndexHealth, default_verifier
from retriever.serve.security import LOOPBACK_NAMES, SecurityMiddleware

from pathlib import Path

if TYPE_CHECKING:
    from retriever.search.api import Retriever

__all__ = ["HTTPProblem", "ServerSettings", "create_app"]
IMAGE_ERROR_STATUS = {"too_large": 413}


@dataclass
class ServerSettings:
    """Limits of the HTTP API, and who may use it (see `retriever.serve.security`)."""

    max_upload_bytes: int = 10 * 2**20
    max_text_chars: int = 2000  # also bounds `where` and each plus/minus text
    max_k: int = 1000
    max_fetch_k: int = 10_000
    max_images: int = 8  # images in one blend
    max_modifiers: int = 16  # plus and minus texts, each
    max_pending: int = 32
    retry_after_s: int = 1
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # "*" accepts any Host header
    api_key: str | None = field(default=None, repr=False)
    read_timeout_s: float = 60.0  # for a whole request (headers and body) to arrive
    keep_alive_s: float = 5.0
    spare_connections: int = 32  # open connections beyond max_pending, for the page and refusals
    verify_on_start: bool = True


def create_app(retrievers: "dict[str, Retriever]", settings: "ServerSettings | None" = None,
               verifier: "Callable[[Path], None] | None" = None):
    """A FastAPI app serving `retrievers` by name (the first is the default index).

    On start-up each index's files are checked against their hashes in a background thread
    (`verifier`, by default `retriever.index.verify.verify_index`); a damaged index is refused.
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError:
        raise MissingExtraError("the server needs its extra: pip install 'retriever[serve]'") from None

    if not retrievers:
        raise RetrieverError("serve needs at least one index or a generator")
    settings = settings or ServerSettings()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever-inference")
    pending = _Gate(settings.max_pending)
    limits = Limits(max_k=settings.max_k, max_text_chars=settings.max_text_chars, max_images=settings.max_images,
                    max_modifiers=settings.max_modifiers, max_indexes=max(len(retrievers), 1),
                    max_fetch_k=settings.max_fetch_k)
    combined = _Combined()
    default = next(iter(retrievers))
    health = IndexHealth({name: [ix.path for ix in r.indexes] for name, r in retrievers.items()},
                         (verifier or default_verifier()) if settings.verify_on_start else None)

    @asynccontextmanager
    async def lifespan(app):
        health.start()
        yield

    app = FastAPI(title="retriever", version="1", summary="Caption ideas for images: retrieved, generated, or both.",
                  lifespan=lifespan)
    app.add_middleware(SecurityMiddleware, hosts=settings.allowed_hosts, api_key=settings.api_key)
    app.state.health = health

    def problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        # A message may quote what the client sent; it must still encode as UTF-8.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(HTTPProblem)
    async def on_problem(request: Request, exc: HTTPProblem) -> JSONResponse:
        return problem(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return problem(400, f"{where}: {first['msg']}" if where else first["msg"])

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this, so the traceback reaches the server's log, not the client.
        return problem(500, "internal error: the server's log has the details")

    @app.get("/healthz")
    async def healthz() -> dict:
        indexes = health.report()
        damaged = any(i["state"] == "damaged" for i in indexes.values())
        return {"status": "degraded" if damaged else "ok", "pending": pending.count, "indexes": indexes}

    @app.get("/v1/indexes")
    async def indexes() -> dict:
        return {"default": default, "indexes": [_describe(name, r) for name, r in retrievers.items()]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("retriever").joinpath("serve/web/index.html").read_text(encoding="utf-8")

    @app.post("/v1/query", openapi_extra=_QUERY_OPENAPI)
    async def query(request: Request) -> dict:
        """Caption ideas for an image (multipart upload, or JSON with base64), or for a text."""
        # Cheap refusals first, and the pending slot before a byte of the body is read: a
        # refused request must not cost the memory of its upload.
        check_declared_length(request, settings.max_upload_bytes)
        content_type = content_type_of(request)
        if not pending.enter():
            raise HTTPProblem(503, "busy: too many queries in progress, retry shortly",
                              {"Retry-After": str(settings.retry_after_s)})
        try:
            body = await read_body(request, settings.max_upload_bytes)
            raw = parse_json(body) if content_type == "application/json" else await parse_form(request)
            del body
            request._body = b""  # the parsed fields are all that is kept while the query waits
            params = check_fields(raw, limits)
            del raw
            names, mode = _check_query(params, retrievers, default, health)
            target = combined.get(names, retrievers)
            loop = asyncio.get_running_loop()
            hits = await loop.run_in_executor(worker, _answer, names, target, params, mode)
        finally:
            pending.leave()
        return {"index": names[0], "indexes": list(names), "mode": mode, "k": params.k,
                "note": _note(hits, params), "hits": [{**_label(params), "rank": rank, **hit.to_dict()}
                                                      for rank, hit in enumerate(hits, start=1)]}

    return app


def _check_query(params: QueryParams, retrievers: "dict[str, Retriever]", default: str,
                 health: IndexHealth) -> "tuple[tuple[str, ...], str]":
    """The index names and mode of a query, or a refusal of what it asks for."""
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
    if mode != "retrieve":
        if not images:
            raise HTTPProblem(400, "text and like queries only retrieve (mode must be retrieve)")
        if blend:
            raise HTTPProblem(400, "blended images only retrieve (mode must be retrieve)")
        if first.generator is None:
            raise HTTPProblem(400, f"{names[0]!r} has no generator: start the server with --generator for mode={mode}")
    if mode == "generate":
        used = [f for f, on in (("text", text is not None), ("plus", params.plus), ("minus", params.minus),
                                ("diversity", params.diversity), ("fetch_k", params.fetch_k), ("where", params.where),
                                ("like", params.like is not None), ("indexes", len(names) > 1)) if on]
        if used:
            raise HTTPProblem(400, f"mode=generate writes captions without an index: {', '.join(used)} "
                                   "apply to retrieved texts (use retrieve or hybrid)")
    if mode != "generate":
        for name in names:
            damage = health.problem(name)
            if damage:
                raise HTTPProblem(503, f"index {name} is damaged: {damage}")
    return names, mode


def _answer(names: "tuple[str, ...]", target: "tuple[Retriever, list[str]]", params: QueryParams, mode: str):
    """The hits of a checked query, each naming its index by the name the server knows it by."""
    from retriever.models.images import image_from_bytes
    from retriever.search.options import DEFAULT_QUERY_DEDUPE, can_rerank

    retriever, labels = target
    try:
        options = params.result_options()
        dedupe = params.dedupe
        if dedupe is None or dedupe is True:  # the CLI's default: on where every index can re-rank exactly
            dedupe = DEFAULT_QUERY_DEDUPE if retriever.indexes and all(can_rerank(i) for i in retriever.indexes) \
                else (True if dedupe else None)
        options["dedupe"] = dedupe if isinstance(dedupe, float) else None
        steering = {"plus": params.plus, "minus": params.minus}
        images = params.images or ([params.image_bytes] if params.image_bytes is not None else [])
        pil = [image_from_bytes(data, params.filename if len(images) == 1 and params.filename else f"images[{i}]")
               for i, data in enumerate(images)]
        if params.like is not None:
            position = _like_position(params, labels)
            hits = retriever.more_like(params.like, k=params.k, index=position, **steering, **options)
        elif len(pil) > 1 or params.weights is not None:
            hits = retriever.query_blend(pil, params.weights, k=params.k, text=params.text, **steering, **options)
        elif pil:
            extra = {**steering, **options} if mode != "generate" else {}
            hits = retriever.query(pil[0], k=params.k, mode=mode, text=params.text, **extra)
        else:
            hits = retriever.query_text(params.text, k=params.k, **steering, **options)
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


def _like_position(params: QueryParams, labels: "list[str]") -> int:
    name = params.like_index or labels[0]
    if name not in labels:
        raise RetrieverError(f"like_index {name!r} is not among the searched indexes ({', '.join(labels)})")
    return labels.index(name)


def _label(params: QueryParams) -> dict:
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


def _note(hits: list, params: QueryParams) -> "str | None":
    """Why fewer than k hits came back, as `retriever query` says it on stderr."""
    if params.where and len(hits) < params.k:
        return f"only {len(hits)} indexed texts match where {params.where!r}"
    return None


def _dedupe(hits: list) -> list:
    seen, kept = set(), []
    for hit in hits:
        key = " ".join(hit.text.lower().split())
        if key not in seen:
            seen.add(key)
            kept.append(hit)
    return kept


class _Combined:
    """The Retriever answering a query over one or several loaded indexes, with each index's name.

    Several indexes are searched together by one Retriever holding them all (the first one's
    model and generator); it is built on first use and kept. Indexes built with different
    models cannot be combined: that is the client's 400.
    """

    def __init__(self):
        self._cache: "dict[tuple[str, ...], tuple[Retriever, list[str]]]" = {}
        self._lock = threading.Lock()

    def get(self, names: "tuple[str, ...]", retrievers: "dict[str, Retriever]") -> "tuple[Retriever, list[str]]":
        with self._lock:
            if names not in self._cache:
                self._cache[names] = self._build(names, retrievers)
            return self._cache[names]

    @staticmethod
    def _build(names, retrievers):
        from retriever.search.api import Retriever

        parts = [retrievers[n] for n in names]
        labels = [name if len(r.indexes) == 1 else f"{name}/{Path(ix.path).name}"
                  for name, r in zip(names, parts) for ix in r.indexes]
        if len(parts) == 1:
            return parts[0], labels
        indexes = [ix for r in parts for ix in r.indexes]
        dirs = [Path(ix.path).name for ix in indexes]
        if len(set(dirs)) < len(dirs):
            raise HTTPProblem(400, f"{', '.join(names)} hold indexes in directories of one name; "
                                   "they cannot be told apart in one search")
        try:
            return Retriever(indexes[0], parts[0].model, parts[0].generator, indexes[1:]), labels
        except IndexFormatError as e:
            raise HTTPProblem(400, f"{', '.join(names)} cannot be searched together: {e}") from None


def _describe(name: str, retriever: "Retriever") -> dict:
    manifest = retriever.index.manifest if retriever.index is not None else None
    return {
        "name": name,
        "model": manifest["model"]["name"] if manifest else None,
        "pretrained": manifest["model"]["pretrained"] if manifest else None,
        "count": manifest["count"] if manifest else 0,
        "index_type": manifest.get("index_type") if manifest else None,
        "generator": str(retriever.generator.spec) if retriever.generator is not None else None,
        "modes": [m for m, ok in (("retrieve", manifest), ("generate", retriever.generator),
                                  ("hybrid", manifest and retriever.generator)) if ok],
    }


class _Gate:
    """Counts requests in progress; refuses past `limit`."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.count -= 1


_FIELDS_DOC = {
    "k": {"type": "integer", "default": 10, "minimum": 1, "maximum": 1000, "description": "hits to return"},
    "mode": {"type": "string", "enum": ["retrieve", "generate", "hybrid"],
             "description": "default: retrieve where the index exists; text, like and blends only retrieve"},
    "index": {"type": "string", "description": "a loaded index's name (GET /v1/indexes); default: the first"},
    "dedupe": {"description": "collapse near-duplicate hits: true (cosine 0.95, as `retriever query`; the default "
                             "where exact vectors exist), false, or a cosine in (0, 1]; also collapses texts "
                             "equal up to case and spaces", "oneOf": [{"type": "boolean"}, {"type": "number"}]},
    "diversity": {"type": "number", "minimum": 0, "maximum": 1, "default": 0,
                  "description": "0 plain nearest, 1 most diverse (MMR); the first hit stays the nearest"},
    "fetch_k": {"type": "integer", "minimum": 1, "maximum": 10000,
                "description": "candidates re-ranked by diversity/dedupe (default max(10 k, 100))"},
    "where": {"type": "string", "description": "filter on metadata columns, e.g. "
                                               "`shape = \"star\" and len < 40`; fewer than k matches set `note`"},
    "like": {"type": "integer", "minimum": 0, "description": "more like this: an indexed text's id (a hit's `id`)"},
    "like_index": {"type": "string", "description": "the index `like` belongs to (a hit's `index`)"},
}
_MODIFIERS_DOC = {
    "type": "array", "maxItems": 16,
    "items": {"oneOf": [{"type": "string", "description": "TEXT or TEXT:WEIGHT, e.g. autumn:0.5"},
                        {"type": "object", "required": ["text"], "properties": {
                            "text": {"type": "string"}, "weight": {"type": "number", "exclusiveMinimum": 0}}}]},
}
_QUERY_OPENAPI = {
    "description": "Send an image, several images (a blend), a text, an image and a text together, or `like`. "
                   "The query vector is normalise(image(s) + text + sum(w plus) - sum(w minus)). The answer is "
                   "`{index, indexes, mode, k, note, hits}`; each hit has the fields of `retriever query --json` "
                   "and names its index.",
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "one image, or repeat the field to blend several"},
                "weights": {"type": "string", "description": "blend weights, one per image: 1,0.5"},
                "text": {"type": "string", "description": "a text query, or a text combined with the image"},
                "plus": {"type": "array", "items": {"type": "string"}, "description": "repeat: TEXT or TEXT:WEIGHT"},
                "minus": {"type": "array", "items": {"type": "string"}, "description": "repeat: TEXT or TEXT:WEIGHT"},
                "indexes": {"type": "array", "items": {"type": "string"},
                            "description": "repeat to search several indexes of one model, merged by score"},
                **_FIELDS_DOC}}},
            "application/json": {"schema": {"type": "object", "additionalProperties": False, "properties": {
                "image_base64": {"type": "string", "description": "base64 or a data URL (also accepted as `image`)"},
                "images": {"type": "array", "maxItems": 8, "items": {"type": "string"},
                           "description": "several base64 images, blended"},
                "weights": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
                "text": {"type": "string"}, "plus": _MODIFIERS_DOC, "minus": _MODIFIERS_DOC,
                "indexes": {"type": "array", "items": {"type": "string"}}, **_FIELDS_DOC}}},
        },
    },
}
