"""HTTP API and web page over loaded Retrievers (FastAPI; `pip install retriever[serve]`).

The server never loads models: it is given `Retriever`s opened by the caller. Inference runs
on one worker thread, off the event loop (torch uses every core inside it); at most
`max_pending` requests wait or run at once, and the next one is answered 503 with Retry-After
instead of queueing without bound. Every refusal is a JSON error with a 4xx status:

    {"error": {"status": 413, "message": "upload is 12.0 MB; the limit is 10.0 MB"}}
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (`request: Request`) at definition time, and Request is imported inside create_app.
import asyncio
import base64
import binascii
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from retriever.corpus.cjk import dedupe_key
from retriever.errors import ImageError, MissingExtraError, RetrieverError

if TYPE_CHECKING:
    from retriever.search.api import Retriever

IMAGE_ERROR_STATUS = {"too_large": 413}
JSON_FIELDS = {"image", "image_base64", "text", "k", "mode", "index", "dedupe"}


@dataclass
class ServerSettings:
    """Limits of the HTTP API."""

    max_upload_bytes: int = 10 * 2**20
    max_text_chars: int = 2000
    max_k: int = 1000
    max_pending: int = 32
    retry_after_s: int = 1


class HTTPProblem(Exception):
    """A request the server refuses: status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def create_app(retrievers: "dict[str, Retriever]", settings: "ServerSettings | None" = None):
    """A FastAPI app serving `retrievers` by name (the first is the default index)."""
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
    app = FastAPI(title="retriever", version="1", summary="Caption ideas for images: retrieved, generated, or both.")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever-inference")
    pending = _Gate(settings.max_pending)
    default = next(iter(retrievers))

    def problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
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

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "pending": pending.count}

    @app.get("/v1/indexes")
    async def indexes() -> dict:
        return {"default": default, "indexes": [_describe(name, r) for name, r in retrievers.items()]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("retriever").joinpath("serve/web/index.html").read_text(encoding="utf-8")

    @app.post("/v1/query", openapi_extra=_QUERY_OPENAPI)
    async def query(request: Request) -> dict:
        """Caption ideas for an image (multipart upload, or JSON with base64), or for a text."""
        body = await _read_body(request, settings.max_upload_bytes)
        params = await _parse(request, body)
        name = params.get("index") or default
        if name not in retrievers:
            raise HTTPProblem(404, f"unknown index {name!r}; loaded: {', '.join(retrievers)}")
        retriever = retrievers[name]
        text = params.get("text")
        mode = params.get("mode") or ("retrieve" if retriever.index is not None or text is not None else "generate")
        k = _int_param(params.get("k", 10), "k", 1, settings.max_k)
        dedupe = _bool_param(params.get("dedupe", False))
        image_bytes = params.get("image_bytes")
        if (text is None) == (image_bytes is None):
            raise HTTPProblem(400, "send exactly one of an image or a text")
        if mode not in ("retrieve", "generate", "hybrid"):
            raise HTTPProblem(400, f"unknown mode {mode!r}; choose from retrieve, generate, hybrid")
        if mode != "generate" and retriever.index is None:
            raise HTTPProblem(400, f"{name!r} has no index: only mode=generate")
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise HTTPProblem(400, "text must be a non-empty string")
            if len(text) > settings.max_text_chars:
                raise HTTPProblem(400, f"text is {len(text)} characters; the limit is {settings.max_text_chars}")
            if mode != "retrieve":
                raise HTTPProblem(400, "text queries only retrieve (mode must be retrieve)")
        if mode != "retrieve" and retriever.generator is None:
            raise HTTPProblem(400, f"{name!r} has no generator: start the server with --generator for mode={mode}")
        if not pending.enter():
            raise HTTPProblem(503, "busy: too many queries in progress, retry shortly",
                              {"Retry-After": str(settings.retry_after_s)})
        try:
            hits = await asyncio.get_running_loop().run_in_executor(
                worker, _answer, retriever, image_bytes, params.get("filename"), text, k, mode)
        finally:
            pending.leave()
        if dedupe:
            hits = _dedupe(hits)
        label = {"query_text": text} if text is not None else {"image": params.get("filename")}
        return {"index": name, "mode": mode, "k": k,
                "hits": [{**label, "rank": rank, **hit.to_dict()} for rank, hit in enumerate(hits, start=1)]}

    return app


def _answer(retriever: "Retriever", image_bytes: bytes | None, filename: str | None, text: str | None, k: int, mode: str):
    from retriever.models.images import image_from_bytes

    try:
        if text is not None:
            return retriever.query_text(text, k=k)
        image = image_from_bytes(image_bytes, filename or "upload")
        return retriever.query(image, k=k, mode=mode)
    except ImageError as e:
        raise HTTPProblem(IMAGE_ERROR_STATUS.get(e.kind, 400), f"{e.reason}") from None
    except RetrieverError as e:
        raise HTTPProblem(400, str(e)) from None


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"upload is {int(declared) / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise HTTPProblem(413, f"upload is over the limit of {limit / 2**20:.1f} MB")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette re-reads a consumed body from here (request.form() below)
    return body


async def _parse(request, body: bytes) -> dict[str, Any]:
    """Query parameters from JSON or a multipart form, with the image as bytes."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPProblem(400, f"malformed JSON: {e}") from None
        if not isinstance(data, dict):
            raise HTTPProblem(400, "the JSON body must be an object")
        unknown = set(data) - JSON_FIELDS
        if unknown:
            raise HTTPProblem(400, f"unknown field(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(JSON_FIELDS))}")
        encoded = data.pop("image_base64", None) or data.pop("image", None)
        if encoded is not None:
            if not isinstance(encoded, str):
                raise HTTPProblem(400, "image must be a base64 string")
            if encoded.startswith("data:") and "," in encoded:
                encoded = encoded.split(",", 1)[1]
            try:
                data["image_bytes"] = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPProblem(400, "image is not valid base64") from None
        return data
    if content_type == "multipart/form-data":
        try:
            form = await request.form()
        except Exception as e:  # python-multipart raises several types for a broken body
            raise HTTPProblem(400, f"malformed multipart body: {e}") from None
        params: dict[str, Any] = {key: value for key, value in form.items() if isinstance(value, str)}
        upload = form.get("image") or form.get("file")
        if upload is not None and not isinstance(upload, str):
            params["image_bytes"] = await upload.read()
            params["filename"] = upload.filename
        return params
    raise HTTPProblem(415, f"unsupported content type {content_type or '(none)'!r}; "
                           "send multipart/form-data (an image upload) or application/json")


def _int_param(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
        if isinstance(value, float) and number != value or isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise HTTPProblem(400, f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise HTTPProblem(400, f"{name} must be between {low} and {high}, got {number}")
    return number


def _bool_param(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        return value.lower() in ("1", "true", "yes", "on")
    raise HTTPProblem(400, f"dedupe must be true or false, got {value!r}")


def _dedupe(hits: list) -> list:
    seen, kept = set(), []
    for hit in hits:
        key = dedupe_key(hit.text, fold_case=True)
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
