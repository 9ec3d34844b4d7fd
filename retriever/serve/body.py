"""A query request's body: read within limits, parsed (JSON or multipart), and type-checked.

Every field is checked for its type here, before any is used: a JSON body can hold any value
in any field (a list as the index name, Infinity as k, a lone surrogate as the text), and each
of those once reached code that raised something other than a clean refusal.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

JSON_FIELDS = {"image", "image_base64", "text", "k", "mode", "index", "dedupe"}
CONTENT_TYPES = ("application/json", "multipart/form-data")
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")


class HTTPProblem(Exception):
    """A request the server refuses: status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class QueryParams:
    """A query's fields, each of its declared type."""

    text: str | None = None
    image_bytes: bytes | None = None
    filename: str | None = None
    k: int = 10
    mode: str | None = None
    index: str | None = None
    dedupe: bool = False


def content_type_of(request) -> str:
    """The media type of a request, lower case, without parameters; 415 unless JSON or multipart."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in CONTENT_TYPES:
        raise HTTPProblem(415, f"unsupported content type {content_type or '(none)'!r}; "
                               "send multipart/form-data (an image upload) or application/json")
    return content_type


def check_declared_length(request, limit: int) -> None:
    """413 for a Content-Length over `limit`, before a byte of the body is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"upload is {int(declared) / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB")


async def read_body(request, limit: int) -> bytes:
    """The whole body, counting bytes as they come (a chunked body declares no length): 413 past `limit`."""
    from starlette.requests import ClientDisconnect

    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise HTTPProblem(413, f"upload is over the limit of {limit / 2**20:.1f} MB")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPProblem(400, "the client went away before sending the whole body") from None
    body = b"".join(chunks)
    chunks.clear()
    request._body = body  # Starlette re-reads a consumed body from here (request.form() below)
    return body


def _reject_constant(name: str) -> None:
    raise HTTPProblem(400, f"malformed JSON: {name} is not a JSON number")


def parse_json(body: bytes) -> dict[str, Any]:
    """The JSON object of a body, with the image base64-decoded into `image_bytes`."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPProblem(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise HTTPProblem(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise HTTPProblem(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise HTTPProblem(400, f"the JSON body must be an object, not {_json_type(data)}")
    unknown = set(data) - JSON_FIELDS
    if unknown:
        raise HTTPProblem(400, f"unknown field(s) {', '.join(map(repr, sorted(unknown)))}; "
                               f"expected {', '.join(sorted(JSON_FIELDS))}")
    if "image" in data and "image_base64" in data:
        raise HTTPProblem(400, "send the image once, as image or image_base64")
    encoded = data.pop("image_base64", None)
    encoded = data.pop("image", None) if encoded is None else encoded
    if encoded is not None:
        data["image_bytes"] = _decode_base64(encoded)
    return data


def _decode_base64(encoded: Any) -> bytes:
    if not isinstance(encoded, str):
        raise HTTPProblem(400, f"image must be a base64 string, not {_json_type(encoded)}")
    if encoded.startswith("data:") and "," in encoded:
        encoded = encoded.split(",", 1)[1]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPProblem(400, "image is not valid base64") from None


async def parse_form(request) -> dict[str, Any]:
    """The fields of a multipart body, with the uploaded image's bytes in `image_bytes`."""
    try:
        form = await request.form()
    except Exception as e:  # python-multipart raises several types for a broken body
        raise HTTPProblem(400, f"malformed multipart body: {e}") from None
    try:
        params: dict[str, Any] = {key: value for key, value in form.items() if isinstance(value, str)}
        upload = form.get("image") or form.get("file")
        if upload is not None and not isinstance(upload, str):
            params["image_bytes"] = await upload.read()
            params["filename"] = upload.filename
        return params
    finally:
        await form.close()


def check_fields(data: dict[str, Any], max_k: int, max_text_chars: int) -> QueryParams:
    """QueryParams from parsed fields, refusing (400) any field of the wrong type or range."""
    text = _optional_str(data, "text")
    if text is not None:
        if not text.strip():
            raise HTTPProblem(400, "text must be a non-empty string")
        if len(text) > max_text_chars:
            raise HTTPProblem(400, f"text is {len(text)} characters; the limit is {max_text_chars}")
    filename = data.get("filename")
    if not isinstance(filename, str) or not _encodable(filename):
        filename = "upload" if data.get("image_bytes") is not None else None
    return QueryParams(text=text, image_bytes=data.get("image_bytes"), filename=filename,
                       k=_int_field(data.get("k", 10), "k", 1, max_k), mode=_optional_str(data, "mode") or None,
                       index=_optional_str(data, "index") or None, dedupe=_bool_field(data.get("dedupe", False)))


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _optional_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        kind = "a non-empty string" if name == "text" else "a string"
        raise HTTPProblem(400, f"{name} must be {kind}, not {_json_type(value)}")
    if not _encodable(value):  # a lone surrogate ("\ud800" in JSON) cannot be encoded, tokenised or echoed
        raise HTTPProblem(400, f"{name} is not valid Unicode (it holds a lone surrogate)")
    return value


def _int_field(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        number = int(value) if len(value.strip().lstrip("+-")) <= 18 else (high + 1 if "-" not in value else low - 1)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():  # finite, and whole: 3.0 is 3
        number = int(value)
    else:
        shown = repr(value) if isinstance(value, (str, int, float)) else _json_type(value)
        raise HTTPProblem(400, f"{name} must be an integer, got {shown[:40]}")
    if not low <= number <= high:
        raise HTTPProblem(400, f"{name} must be between {low} and {high}, got {str(number)[:40]}")
    return number


def _bool_field(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in TRUE | FALSE:
        return value.lower() in TRUE
    raise HTTPProblem(400, f"dedupe must be true or false, got {repr(value)[:40]}")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)
