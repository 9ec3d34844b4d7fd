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
    QueryParams,
    check_declared_length,
    check_fields,
    content_type_of,
    parse_form,
    parse_json,
    read_body,
)
from retriever.serve.health import IndexHealth, default_verifier
from retriever.serve.security import LOOPBACK_NAMES, SecurityMiddleware

if TYPE_CHECKING:
    from pathlib import Path

    from retriever.search.api import Retriever

__all__ = ["HTTPProblem", "ServerSettings", "create_app"]
IMAGE_ERROR_STATUS = {"too_large": 413}


@dataclass
class ServerSettings:
    """Limits of the HTTP API, and who may use it (see `retriever.serve.security`)."""

    max_upload_bytes: int = 10 * 2**20
    max_text_chars: int = 2000
    max_k: int = 1000
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
            params = check_fields(raw, settings.max_k, settings.max_text_chars)
            del raw
            name, mode = _check_query(params, retrievers, default, health)
            loop = asyncio.get_running_loop()
            hits = await loop.run_in_executor(worker, _answer, name, retrievers[name], params, mode)
        finally:
            pending.leave()
        if params.dedupe:
            hits = _dedupe(hits)
        label = {"query_text": params.text} if params.text is not None else {"image": params.filename}
        return {"index": name, "mode": mode, "k": params.k,
                "hits": [{**label, "rank": rank, **hit.to_dict()} for rank, hit in enumerate(hits, start=1)]}

    return app


def _check_query(params: QueryParams, retrievers: "dict[str, Retriever]", default: str,
                 health: IndexHealth) -> tuple[str, str]:
    """The index name and mode of a query, or a refusal of what it asks for."""
    name = params.index or default
    if name not in retrievers:
        raise HTTPProblem(404, f"unknown index {name!r}; loaded: {', '.join(retrievers)}")
    retriever = retrievers[name]
    text = params.text
    mode = params.mode or ("retrieve" if retriever.index is not None or text is not None else "generate")
    if (text is None) == (params.image_bytes is None):
        raise HTTPProblem(400, "send exactly one of an image or a text")
    if mode not in ("retrieve", "generate", "hybrid"):
        raise HTTPProblem(400, f"unknown mode {mode!r}; choose from retrieve, generate, hybrid")
    if mode != "generate" and retriever.index is None:
        raise HTTPProblem(400, f"{name!r} has no index: only mode=generate")
    if text is not None and mode != "retrieve":
        raise HTTPProblem(400, "text queries only retrieve (mode must be retrieve)")
    if mode != "retrieve" and retriever.generator is None:
        raise HTTPProblem(400, f"{name!r} has no generator: start the server with --generator for mode={mode}")
    damage = health.problem(name) if mode != "generate" else None
    if damage:
        raise HTTPProblem(503, f"index {name} is damaged: {damage}")
    return name, mode


def _answer(name: str, retriever: "Retriever", params: QueryParams, mode: str):
    from retriever.models.images import image_from_bytes

    try:
        if params.text is not None:
            return retriever.query_text(params.text, k=params.k)
        image = image_from_bytes(params.image_bytes, params.filename or "upload")
        return retriever.query(image, k=params.k, mode=mode)
    except ImageError as e:
        raise HTTPProblem(IMAGE_ERROR_STATUS.get(e.kind, 400), f"{e.reason}") from None
    except IndexFormatError as e:  # a search that met damaged vectors: not the client's fault
        raise HTTPProblem(503, f"index {name} is damaged: {e}") from None
    except RetrieverError as e:
        raise HTTPProblem(400, str(e)) from None


def _dedupe(hits: list) -> list:
    seen, kept = set(), []
    for hit in hits:
        key = " ".join(hit.text.lower().split())
        if key not in seen:
            seen.add(key)
            kept.append(hit)
    return kept


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


_QUERY_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "format": "binary"}, "k": {"type": "integer", "default": 10},
                "mode": {"type": "string", "enum": ["retrieve", "generate", "hybrid"]},
                "index": {"type": "string"}, "dedupe": {"type": "boolean"}}}},
            "application/json": {"schema": {"type": "object", "properties": {
                "image_base64": {"type": "string"}, "text": {"type": "string"}, "k": {"type": "integer", "default": 10},
                "mode": {"type": "string", "enum": ["retrieve", "generate", "hybrid"]},
                "index": {"type": "string"}, "dedupe": {"type": "boolean"}}}},
        },
    }
}
