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
from dataclasses import dataclass, field
from typing import Any

# Result options (diversity ... indexes) mean what `retriever query`'s options mean; see README.
JSON_FIELDS = {
    "image",
    "image_base64",
    "images",
    "weights",
    "text",
    "k",
    "mode",
    "index",
    "indexes",
    "dedupe",
    "diversity",
    "fetch_k",
    "where",
    "plus",
    "minus",
    "like",
    "like_index",
    "generator",
}
# Multipart fields that may repeat (several files, several modifiers).
FORM_LISTS = ("plus", "minus", "weights", "indexes")
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
    dedupe: bool | float | None = None  # None: the CLI's default; True: DEFAULT_QUERY_DEDUPE; False: off
    images: list[bytes] = field(default_factory=list)  # a blend (two or more), with `weights`
    weights: list[float] | None = None
    indexes: list[str] | None = None  # several loaded indexes searched together
    diversity: float = 0.0
    fetch_k: int | None = None
    where: str | None = None
    plus: list[tuple[str, float]] = field(default_factory=list)
    minus: list[tuple[str, float]] = field(default_factory=list)
    like: int | None = None
    like_index: str | None = None
    generator: str | None = None  # a generator's name as GET /v1/indexes lists it

    @property
    def steered(self) -> bool:
        return bool(self.plus or self.minus)

    def result_options(self) -> dict[str, Any]:
        """The keyword options of Retriever.search (dedupe resolved by the caller)."""
        return {"diversity": self.diversity, "fetch_k": self.fetch_k, "where": self.where}


@dataclass
class Limits:
    """How much one query may ask for (list lengths, texts, candidates)."""

    max_k: int = 1000
    max_text_chars: int = 2000
    max_images: int = 8
    max_modifiers: int = 16
    max_indexes: int = 16
    max_fetch_k: int = 10_000


def content_type_of(request) -> str:
    """The media type of a request, lower case, without parameters; 415 unless JSON or multipart."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in CONTENT_TYPES:
        raise HTTPProblem(
            415,
            f"unsupported content type {content_type or '(none)'!r}; "
            "send multipart/form-data (an image upload) or application/json",
        )
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
        raise HTTPProblem(
            400, f"unknown field(s) {', '.join(map(repr, sorted(unknown)))}; expected {', '.join(sorted(JSON_FIELDS))}"
        )
    if "image" in data and "image_base64" in data:
        raise HTTPProblem(400, "send the image once, as image or image_base64")
    encoded = data.pop("image_base64", None)
    encoded = data.pop("image", None) if encoded is None else encoded
    if encoded is not None:
        data["image_bytes"] = _decode_base64(encoded)
    if encoded is not None and "images" in data:
        raise HTTPProblem(400, "send image or images, not both")
    return data  # `images` (base64 strings) is decoded by check_fields, after its length is checked


def _decode_base64(encoded: Any, name: str = "image") -> bytes:
    if not isinstance(encoded, str):
        raise HTTPProblem(400, f"{name} must be a base64 string, not {_json_type(encoded)}")
    if encoded.startswith("data:") and "," in encoded:
        encoded = encoded.split(",", 1)[1]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPProblem(400, f"{name} is not valid base64") from None


async def parse_form(request) -> dict[str, Any]:
    """The fields of a multipart body, with the uploaded image's bytes in `image_bytes`."""
    try:
        form = await request.form()
    except Exception as e:  # python-multipart raises several types for a broken body
        raise HTTPProblem(400, f"malformed multipart body: {e}") from None
    try:
        params: dict[str, Any] = {key: value for key, value in form.items() if isinstance(value, str)}
        for key in FORM_LISTS:  # repeatable: plus=a -F plus=b, or one comma-separated weights field
            values = [v for v in form.getlist(key) if isinstance(v, str)]
            if values:
                params[key] = values
        uploads = [v for key in ("image", "file") for v in form.getlist(key) if not isinstance(v, str)]
        if len(uploads) == 1:
            params["image_bytes"] = await uploads[0].read()
            params["filename"] = uploads[0].filename
        elif uploads:
            params["images_bytes"] = [await upload.read() for upload in uploads]
        return params
    finally:
        await form.close()


def check_fields(data: dict[str, Any], limits: Limits) -> QueryParams:
    """QueryParams from parsed fields, refusing (400) any field of the wrong type or range."""
    text = _text_field(data, "text", limits.max_text_chars)
    filename = data.get("filename")
    if not isinstance(filename, str) or not _encodable(filename):
        filename = "upload" if data.get("image_bytes") is not None else None
    images = _images_field(data, limits.max_images)
    weights = _weights_field(data.get("weights"), limits.max_images)
    count = len(images) or (1 if data.get("image_bytes") is not None else 0)
    if weights is not None and count and len(weights) != count:  # weights with no image: _check_query says so
        raise HTTPProblem(400, f"{len(weights)} weights for {count} image(s): send one weight per image")
    where = _text_field(data, "where", limits.max_text_chars)
    if where is not None:
        from retriever.search.filters import FilterError, parse_where

        try:
            parse_where(where)  # syntax now, before the query waits; columns are checked by the search
        except FilterError as e:
            raise HTTPProblem(400, http_message(str(e))) from None
    like = data.get("like")
    return QueryParams(
        text=text,
        image_bytes=data.get("image_bytes"),
        filename=filename,
        k=_int_field(data.get("k", 10), "k", 1, limits.max_k),
        mode=_optional_str(data, "mode") or None,
        index=_optional_str(data, "index") or None,
        dedupe=_dedupe_field(data.get("dedupe")),
        images=images,
        weights=weights,
        indexes=_names_field(data.get("indexes"), limits.max_indexes),
        diversity=_number_field(data.get("diversity", 0.0), "diversity", 0.0, 1.0),
        fetch_k=None if data.get("fetch_k") is None else _int_field(data["fetch_k"], "fetch_k", 1, limits.max_fetch_k),
        where=where,
        plus=_modifiers_field(data.get("plus"), "plus", limits),
        minus=_modifiers_field(data.get("minus"), "minus", limits),
        like=None if like is None else _int_field(like, "like", 0, 2**62),
        like_index=_optional_str(data, "like_index") or None,
        generator=_optional_str(data, "generator") or None,
    )


def http_message(message: str) -> str:
    """A library message for an HTTP client: `--where` is the `where` field here."""
    return message.replace("--where", "where")


def _text_field(data: dict[str, Any], name: str, limit: int) -> str | None:
    value = _optional_str(data, name)
    if value is not None:
        if not value.strip():
            raise HTTPProblem(400, f"{name} must be a non-empty string")
        if len(value) > limit:
            raise HTTPProblem(400, f"{name} is {len(value)} characters; the limit is {limit}")
    return value


def _list_of(value: Any, name: str, limit: int) -> list:
    """A JSON array, or the repeated values of a multipart field; one value stands for a list of one."""
    if not isinstance(value, list):
        value = [value]
    if len(value) > limit:
        raise HTTPProblem(400, f"{name} holds {len(value)} items; the limit is {limit}")
    return value


def _images_field(data: dict[str, Any], limit: int) -> list[bytes]:
    if "images_bytes" in data:  # multipart: several uploaded files
        images = data["images_bytes"]
        if len(images) > limit:
            raise HTTPProblem(400, f"{len(images)} images; the limit is {limit}")
        return images
    if data.get("images") is None:
        return []
    images = data["images"]
    if not isinstance(images, list):
        raise HTTPProblem(400, f"images must be an array of base64 strings, not {_json_type(images)}")
    if not images:
        raise HTTPProblem(400, "images is empty: send one or more base64 images")
    if len(images) > limit:
        raise HTTPProblem(400, f"images holds {len(images)} items; the limit is {limit}")
    return [_decode_base64(item, f"images[{i}]") for i, item in enumerate(images)]


def _weights_field(value: Any, limit: int) -> list[float] | None:
    """Blend weights: a JSON array of numbers, or multipart `weights` fields (each may be "1,0.5")."""
    if value is None:
        return None
    items = _list_of(value, "weights", limit)
    if all(isinstance(item, str) for item in items):
        items = [part for item in items for part in item.split(",")]
        if len(items) > limit:
            raise HTTPProblem(400, f"weights holds {len(items)} items; the limit is {limit}")
    return [_weight(item, f"weights[{i}]") for i, item in enumerate(items)]


def _weight(value: Any, name: str) -> float:
    number = _number_field(value, name, 0.0, 1e6)
    if number <= 0 or number >= 1e6:
        raise HTTPProblem(400, f"{name} must be a positive number below 1000000, got {number:g}")
    return number


def _names_field(value: Any, limit: int) -> list[str] | None:
    if value is None:
        return None
    items = _list_of(value, "indexes", 64)  # repeats are dropped below, then the loaded count applies
    names: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise HTTPProblem(
                400,
                f"indexes[{i}] must be an index name (a non-empty string), not "
                f"{_json_type(item) if not isinstance(item, str) else 'an empty string'}",
            )
        names.extend(part.strip() for part in item.split(",") if part.strip())
    names = list(dict.fromkeys(names))  # a name twice is searched once
    if not names:
        raise HTTPProblem(400, "indexes is empty: name one or more loaded indexes")
    if len(names) > limit:
        raise HTTPProblem(400, f"indexes holds {len(names)} names; the limit is {limit}")
    for name in names:
        if not _encodable(name):
            raise HTTPProblem(400, "indexes is not valid Unicode (it holds a lone surrogate)")
    return names


def _modifiers_field(value: Any, name: str, limits: Limits) -> list[tuple[str, float]]:
    """plus / minus: texts ("autumn", "autumn:0.5" as on the command line) or {"text", "weight"} objects."""
    from retriever.errors import RetrieverError
    from retriever.search.steering import DEFAULT_WEIGHT, parse_weighted

    if value is None:
        return []
    pairs = []
    for i, item in enumerate(_list_of(value, name, limits.max_modifiers)):
        where = f"{name}[{i}]"
        if isinstance(item, dict):
            unknown = set(item) - {"text", "weight"}
            if unknown:
                raise HTTPProblem(
                    400, f"{where}: unknown key(s) {', '.join(map(repr, sorted(unknown)))}; expected text and weight"
                )
            text = _text_field(item, "text", limits.max_text_chars) if "text" in item else None
            if text is None:
                raise HTTPProblem(400, f"{where} needs a text")
            weight = _weight(item["weight"], f"{where}.weight") if item.get("weight") is not None else DEFAULT_WEIGHT
            pairs.append((text.strip(), weight))
        elif isinstance(item, str):
            checked = _text_field({where: item}, where, limits.max_text_chars)
            try:
                pairs.append(parse_weighted(checked or ""))
            except RetrieverError as e:
                raise HTTPProblem(400, f"{where}: {e}") from None
        else:
            raise HTTPProblem(400, f'{where} must be a text or an object {{"text", "weight"}}, not {_json_type(item)}')
    return pairs


def _number_field(value: Any, name: str, low: float, high: float) -> float:
    import math

    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise HTTPProblem(400, f"{name} must be a number, got {value[:40]!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise HTTPProblem(400, f"{name} must be a number, got {_json_type(value)}")
    if not math.isfinite(number) or not low <= number <= high:
        raise HTTPProblem(400, f"{name} must be between {low:g} and {high:g}, got {str(value)[:40]}")
    return number


def _dedupe_field(value: Any) -> bool | float | None:
    """None (the default), True/False, or a cosine in (0, 1]; multipart sends them as text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE | FALSE | {"none"}:
            return word in TRUE
        try:
            value = float(word)
        except ValueError:
            raise HTTPProblem(400, f"dedupe must be true, false or a cosine in (0, 1], got {value[:40]!r}") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0:
        return float(value)
    shown = repr(value)[:40] if isinstance(value, (int, float)) else _json_type(value)
    raise HTTPProblem(400, f"dedupe must be true, false or a cosine in (0, 1], got {shown}")


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


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "a number",
        float: "a number",
    }
    return names.get(type(value), type(value).__name__)
