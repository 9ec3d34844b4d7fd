"""HTTP API and web page over loaded Retrievers (FastAPI; `pip install caption-retriever[serve]`).

The server never loads models: it is given `Retriever`s opened by the caller. Inference runs
on one worker thread, off the event loop (torch uses every core inside it); at most
`max_pending` queries wait or run at once, and the next one is answered 503 with Retry-After
before its body is read, instead of queueing (and buffering uploads) without bound. Requests
pass `security.SecurityMiddleware` first (Host, origin, API key); a query's fields are typed by
`body.check_fields`, then checked against the loaded indexes and answered by `query`. Every
refusal is JSON:

    {"error": {"status": 413, "message": "upload is 12.0 MB; the limit is 10.0 MB"}}
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (`request: Request`) at definition time, and Request is imported inside create_app.
import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

from retriever.errors import MissingExtraError, RetrieverError
from retriever.serve.body import (
    HTTPProblem,
    Limits,
    check_declared_length,
    check_fields,
    content_type_of,
    parse_form,
    parse_json,
    read_body,
)
from retriever.serve.generators import generators_of
from retriever.serve.health import IndexHealth, default_verifier
from retriever.serve.query import QUERY_OPENAPI, Combined, answer, check_query, label, note
from retriever.serve.security import LOOPBACK_NAMES, SecurityMiddleware

if TYPE_CHECKING:
    from pathlib import Path

    from retriever.search.api import Retriever

__all__ = ["HTTPProblem", "ServerSettings", "create_app"]


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


def create_app(
    retrievers: "dict[str, Retriever]",
    settings: "ServerSettings | None" = None,
    verifier: "Callable[[Path], None] | None" = None,
    generators: "dict[str, dict] | None" = None,
):
    """A FastAPI app serving `retrievers` by name (the first is the default index).

    `generators` maps each index name to the generators a query may choose for it (field
    `generator`), by name, the first being the default (`retriever.serve.generators.open_served`
    builds both); without it, each Retriever's own generator is the only one.

    On start-up each index's files are checked against their hashes in a background thread
    (`verifier`, by default `retriever.index.verify.verify_index`); a damaged index is refused.
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError:
        raise MissingExtraError("the server needs its extra: pip install 'caption-retriever[serve]'") from None

    if not retrievers:
        raise RetrieverError("serve needs at least one index or a generator")
    settings = settings or ServerSettings()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever-inference")
    pending = _Gate(settings.max_pending)
    limits = Limits(
        max_k=settings.max_k,
        max_text_chars=settings.max_text_chars,
        max_images=settings.max_images,
        max_modifiers=settings.max_modifiers,
        max_indexes=max(len(retrievers), 1),
        max_fetch_k=settings.max_fetch_k,
    )
    generators = generators if generators is not None else generators_of(retrievers)
    combined = Combined(generators)
    default = next(iter(retrievers))
    health = IndexHealth(
        {name: [ix.path for ix in r.indexes] for name, r in retrievers.items()},
        (verifier or default_verifier()) if settings.verify_on_start else None,
    )

    @asynccontextmanager
    async def lifespan(app):
        health.start()
        yield

    app = FastAPI(
        title="retriever",
        version="1",
        summary="Caption ideas for images: retrieved, generated, or both.",
        lifespan=lifespan,
    )
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
        names = list(dict.fromkeys(g for per_index in generators.values() for g in per_index))
        return {
            "default": default,
            "indexes": [_describe(name, r, generators.get(name, {})) for name, r in retrievers.items()],
            "generators": [
                {
                    "name": g,
                    "source": _source(g, generators),
                    "indexes": [i for i, per_index in generators.items() if g in per_index],
                }
                for g in names
            ],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("retriever").joinpath("serve/web/index.html").read_text(encoding="utf-8")

    @app.post("/v1/query", openapi_extra=QUERY_OPENAPI)
    async def query(request: Request) -> dict:
        """Caption ideas for an image (multipart upload, or JSON with base64), or for a text."""
        # Cheap refusals first, and the pending slot before a byte of the body is read: a
        # refused request must not cost the memory of its upload.
        check_declared_length(request, settings.max_upload_bytes)
        content_type = content_type_of(request)
        if not pending.enter():
            raise HTTPProblem(
                503, "busy: too many queries in progress, retry shortly", {"Retry-After": str(settings.retry_after_s)}
            )
        try:
            body = await read_body(request, settings.max_upload_bytes)
            raw = parse_json(body) if content_type == "application/json" else await parse_form(request)
            del body
            request._body = b""  # the parsed fields are all that is kept while the query waits
            params = check_fields(raw, limits)
            del raw
            names, mode, generator = check_query(params, retrievers, default, health, generators)
            target = combined.get(names, retrievers, generator)
            loop = asyncio.get_running_loop()
            hits = await loop.run_in_executor(worker, answer, names, target, params, mode)
        finally:
            pending.leave()
        return {
            "index": names[0],
            "indexes": list(names),
            "mode": mode,
            "generator": generator,
            "k": params.k,
            "note": note(hits, params),
            "hits": [{**label(params), "rank": rank, **hit.to_dict()} for rank, hit in enumerate(hits, start=1)],
        }

    return app


def _describe(name: str, retriever: "Retriever", generators: dict) -> dict:
    manifest = retriever.index.manifest if retriever.index is not None else None
    default_generator = next(iter(generators), None)
    return {
        "name": name,
        "model": manifest["model"]["name"] if manifest else None,
        "pretrained": manifest["model"]["pretrained"] if manifest else None,
        "count": manifest["count"] if manifest else 0,
        "index_type": manifest.get("index_type") if manifest else None,
        "generator": default_generator,  # the default; `generators` are those a query may choose
        "generators": list(generators),
        "modes": [
            m for m, ok in (("retrieve", manifest), ("generate", generators), ("hybrid", manifest and generators)) if ok
        ],
    }


def _source(name: str, generators: dict) -> str:
    """How a generator's hits are marked: `styled` (a style decoder) or `generated` (a CoCa)."""
    loaded = next(per_index[name] for per_index in generators.values() if name in per_index)
    return getattr(loaded, "source", "generated")


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
