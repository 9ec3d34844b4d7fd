"""Turning the values people put in corpus files into clean texts and parquet-safe metadata.

Texts must be strings: a number, object or list in the text column is a bad row, not its Python
repr; UTF-8 bytes (a parquet binary column) are decoded; a lone surrogate (a JSON escape such as
\\ud800) cannot be encoded, so it is a bad row before anything is embedded. Metadata values
become JSON scalars, with objects and lists kept as JSON text: a column that is a number in one
JSON line and an object in the next is then still writable as one parquet column.
"""

from __future__ import annotations

import json
import re
from typing import Any

# C0 controls except tab, newline and carriage return, and DEL: a NUL-only line is not a text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_INT64 = (-(1 << 63), (1 << 63) - 1)


def clean_text(text: str | None) -> str:
    """A text with control characters (NUL included) turned into spaces, stripped; '' for None."""
    return "" if text is None else _CONTROL.sub(" ", text).strip()


def unique_names(header: list[str]) -> list[str]:
    """Header names with blanks named `column_N` and repeats suffixed `.2`, `.3`: no column is lost."""
    seen: set[str] = set()
    out = []
    for i, name in enumerate(header, start=1):
        name = name or f"column_{i}"
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}.{n}"
        seen.add(candidate)
        out.append(candidate)
    return out


def text_value(value: Any) -> tuple[str | None, str | None]:
    """(text, None) for a usable text value (None counts as empty), or (None, why it is a bad row)."""
    if value is None or isinstance(value, str):
        text = value
    elif isinstance(value, (bytes, bytearray)):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"text is bytes that are not UTF-8 (invalid byte at {e.start})"
    else:
        return None, f"text is {json_kind(value)}, not a string"
    if text is not None and has_surrogates(text):
        return None, "text holds a lone surrogate (an escape such as \\ud800), which is not valid Unicode"
    return text, None


def metadata(record: dict[str, Any], text_column: str | None) -> dict[str, Any]:
    """The other fields, as JSON scalars, so that any mix of rows can be written to parquet."""
    return {_SURROGATE.sub("\ufffd", k): meta_value(v) for k, v in record.items() if k != text_column}


def meta_value(value: Any) -> Any:
    """One metadata value as a JSON scalar (see the module's note)."""
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)  # parquet has no bigger int
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (dict, list, tuple)):
        # One JSONL row's object and another's number would give a column no parquet type holds.
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (ValueError, RecursionError):
            text = str(value)
        return _SURROGATE.sub("\ufffd", text)
    return _SURROGATE.sub("\ufffd", str(value))  # dates, decimals, ... from parquet


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def has_surrogates(value: str) -> bool:
    """Whether `value` cannot be encoded as UTF-8 (lone surrogates, or bytes kept by surrogateescape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
