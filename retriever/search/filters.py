"""`--where`: a small, safe filter language over an index's metadata columns.

    source = "coco"            len < 60                 lang in ("en", "zh")
    title contains "cat"       not (shape = "star") and colour != "red" or len >= 10

Comparisons `= == != < <= > >=`, `in (...)`, `contains "..."`, combined with `and`, `or`, `not`
and parentheses. `len` is the length of the text in characters (unless a column of that name
exists). Strings are quoted with " or ' (backslash escapes the quote); numbers, true, false and
null are literals. A missing value never matches. A text column compared with a number is read
as numbers (TSV and CSV metadata is text, and as text "10" < "9"); its values that are not
numbers are missing there.

Hand-written rather than a parser library: the grammar is a dozen lines, it must never evaluate
Python, and each node compiles to one vectorised pass over a whole column (or none). The result
is a RowMask, which the search turns into a FAISS id selector (pre-filtering, so a selective
filter still returns k).

A filter's columns are prepared once per index and column, then each comparison over them is a
numpy pass: numbers as numpy arrays of the narrowest integer type that holds them, and text
columns with few distinct values (source, lang) as dictionary codes. Measured on a million rows
(B7's `bucket`): `bucket < 3` costs 0.04 ms on int8, against 0.33-0.54 ms for Arrow's comparison
kernels on int8-int64. Equality on such columns keeps a bitmap per value (see FEW_VALUES). Other
comparisons (text order, bools, `contains` on many distinct texts) use pyarrow.compute.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retriever.errors import RetrieverError
from retriever.search.derived import DerivedValues
from retriever.search.rowmask import RowMask

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

_TOKEN = re.compile(
    r"""
    \s*(?:
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<op>==|!=|<=|>=|=|<|>|\(|\)|,)
    | (?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "contains", "true", "false", "null"}
MAX_LENGTH = 10_000


class FilterError(RetrieverError):
    """A --where expression that cannot be parsed or does not fit the index's columns."""


@dataclass(frozen=True)
class Token:
    kind: str  # string, number, op, word, keyword, end
    value: Any
    at: int


def tokenize(text: str) -> list[Token]:
    """The expression as tokens; a character that starts no token is an error naming its position."""
    if len(text) > MAX_LENGTH:
        raise FilterError(f"--where is longer than {MAX_LENGTH} characters")
    tokens, at = [], 0
    while at < len(text):
        if text[at:].strip() == "":
            break
        match = _TOKEN.match(text, at)
        if not match or match.end() == at:
            raise FilterError(f"--where: unexpected {text[at:].lstrip()[:10]!r} at character {at + 1}")
        kind = match.lastgroup
        assert kind is not None  # every alternative of _TOKEN is a named group
        raw = match[kind]
        start = match.start(kind)
        if kind == "string":
            value: Any = re.sub(r"\\(.)", r"\1", raw[1:-1])
        elif kind == "number":
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        elif kind == "word" and raw.lower() in _KEYWORDS:
            kind, value = "keyword", raw.lower()
        else:
            value = raw
        tokens.append(Token(kind, value, start + 1))
        at = match.end()
    tokens.append(Token("end", None, len(text) + 1))
    return tokens


class _Parser:
    """Recursive descent: or > and > not > comparison; builds nested tuples."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    def parse(self) -> tuple:
        node = self.or_()
        if self.peek().kind != "end":
            self.fail("expected and/or or the end")
        return node

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def fail(self, what: str) -> None:
        token = self.peek()
        got = "the end" if token.kind == "end" else repr(token.value)
        raise FilterError(f"--where: {what}, got {got} at character {token.at}")

    def accept(self, kind: str, value: Any = None) -> bool:
        token = self.peek()
        if token.kind == kind and (value is None or token.value == value):
            self.i += 1
            return True
        return False

    def or_(self) -> tuple:
        node = self.and_()
        while self.accept("keyword", "or"):
            node = ("or", node, self.and_())
        return node

    def and_(self) -> tuple:
        node = self.not_()
        while self.accept("keyword", "and"):
            node = ("and", node, self.not_())
        return node

    def not_(self) -> tuple:
        if self.accept("keyword", "not"):
            return ("not", self.not_())
        if self.accept("op", "("):
            self.depth += 1
            if self.depth > 50:
                self.fail("parentheses nested too deeply")
            node = self.or_()
            if not self.accept("op", ")"):
                self.fail("expected ')'")
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> tuple:
        column = self.peek()
        if column.kind != "word":
            self.fail("expected a column name")
        self.take()
        if self.accept("keyword", "in"):
            if not self.accept("op", "("):
                self.fail("expected '(' after in")
            values = [self.literal()]
            while self.accept("op", ","):
                values.append(self.literal())
            if not self.accept("op", ")"):
                self.fail("expected ')' to close the list")
            return ("in", column.value, tuple(values))
        if self.accept("keyword", "contains"):
            value = self.literal()
            if not isinstance(value, str):
                raise FilterError(f"--where: contains needs a quoted string (character {column.at})")
            return ("contains", column.value, value)
        op = self.peek()
        if op.kind != "op" or op.value not in ("=", "==", "!=", "<", "<=", ">", ">="):
            self.fail(f"expected a comparison after {column.value!r}")
        self.take()
        return ("==" if op.value == "=" else op.value, column.value, self.literal())

    def literal(self) -> Any:
        token = self.take()
        if token.kind in ("string", "number"):
            return token.value
        if token.kind == "keyword" and token.value in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[token.value]
        self.i -= 1
        self.fail("expected a value (a quoted string, a number, true, false or null)")


def parse_where(text: str) -> tuple:
    """The syntax tree of a --where expression (nested tuples); raises FilterError with a position."""
    if not isinstance(text, str):
        raise FilterError(f"--where must be text, got {type(text).__name__}")
    if not text.strip():
        raise FilterError("--where is empty")
    return _parse(text)


@functools.lru_cache(maxsize=256)  # a server or page repeats its filters; the tree is immutable
def _parse(text: str) -> tuple:
    return _Parser(text).parse()


def where_rows(table: pa.Table, text: str) -> RowMask:
    """The rows of `table` that match the --where expression `text`."""
    return _evaluate(parse_where(text), table)


def where_mask(table: pa.Table, text: str) -> np.ndarray:
    """A boolean numpy mask over `table`'s rows: which match the --where expression `text`."""
    return where_rows(table, text).matches()


_NUMBER = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"  # the tokenizer's numbers
_PREPARED = DerivedValues(size=16)
# Text columns with more distinct values than this (or than a quarter of the rows) are compared by
# Arrow: dictionary codes only pay off when values repeat.
MAX_CODES = 65_536


def _as_numbers(table: pa.Table, name: str, column: Any) -> Any:
    """A text column's values as numbers (int64, or float64 if any has a fraction or exponent),
    for comparing with a number literal: metadata read from TSV or CSV is text, where "10" < "9".
    A value that is not a number is missing there, so it never matches."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def parse() -> Any:
        trimmed = pc.utf8_trim_whitespace(column)
        numbers = pc.if_else(pc.match_substring_regex(trimmed, _NUMBER), trimmed, pa.scalar(None, trimmed.type))
        numbers = pc.replace_substring_regex(numbers, r"^\+", "")  # Arrow's parser refuses a leading +
        try:
            return pc.cast(numbers, pa.int64())
        except (pa.ArrowInvalid, OverflowError):
            return pc.cast(numbers, pa.float64())

    return _PREPARED.get(table, parse, key=("parsed", name))


# Equality (=, != and in) on a column of text with few distinct values, or of integers with at
# most FEW_VALUES, is answered from a bitmap per value, made the first time that value is asked
# for and kept (a bitmap index, as databases keep for such columns): a new `source = "coco"` or
# `bucket = 3` then reads no column at all. Measured on B7's 1M rows, reading the int8 column
# and packing its bitmap costs 0.13 ms alone and made the HNSW search that follows about 0.2 ms
# slower than with a kept bitmap (docs/performance.md). The 64 most recently used are kept (n / 8
# bytes each).
FEW_VALUES = 256
_VALUE_ROWS = DerivedValues(size=64)


@dataclass(frozen=True)
class _Numbers:
    values: np.ndarray  # the narrowest integer type holding them, or float; 0 where missing
    valid: RowMask | None  # None: no value is missing
    few_values: bool  # integers with at most FEW_VALUES distinct values


def _numbers(table: pa.Table, name: str, column: Any) -> _Numbers:
    """A number column (or a text one read as numbers) as numpy arrays, once per table and column."""
    import numpy as np
    import pyarrow.compute as pc

    def prepare() -> _Numbers:
        numbers = _as_numbers(table, name, column) if _is_text(column.type) else column
        valid = None if numbers.null_count == 0 else _arrow_rows(pc.is_valid(numbers))
        values = np.asarray(pc.fill_null(numbers, 0).to_numpy())
        few_values = False
        if values.dtype.kind in "iu" and len(values):
            low, high = int(values.min()), int(values.max())
            for kind in (np.int8, np.int16, np.int32):
                if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
                    values = values.astype(kind)
                    break
            if high - low < 65_536:
                few_values = bool(np.count_nonzero(np.bincount(values - np.int64(low))) <= FEW_VALUES)
        return _Numbers(values, valid, few_values)

    return _PREPARED.get(table, prepare, key=("numbers", name))


@dataclass(frozen=True)
class _Codes:
    codes: np.ndarray  # each row's position in `values`, -1 where missing
    values: dict[str, int]
    dictionary: Any  # the distinct values as an Arrow array, in code order


def _codes(table: pa.Table, name: str, column: Any) -> _Codes | None:
    """A text column as dictionary codes, once per table and column; None when its values rarely
    repeat (such a column is compared by Arrow)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def prepare() -> _Codes | None:
        whole = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        encoded = pc.dictionary_encode(whole)
        if len(encoded.dictionary) > min(MAX_CODES, max(16, len(whole) // 4)):
            return None
        codes = np.asarray(pc.fill_null(encoded.indices, -1).to_numpy())
        codes = codes.astype(np.int8 if len(encoded.dictionary) < 127 else np.int32)
        values = {value: n for n, value in enumerate(encoded.dictionary.to_pylist())}
        return _Codes(codes, values, encoded.dictionary)

    return _PREPARED.get(table, prepare, key=("codes", name))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_text(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _is_numeric(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


def _column(table: pa.Table, name: str) -> Any:
    import pyarrow.compute as pc

    if name in table.column_names:
        return table[name]
    if name == "len" and "text" in table.column_names:
        return _PREPARED.get(table, lambda: pc.utf8_length(table["text"]), key=("len",))
    shown = ", ".join(c for c in table.column_names if c != "id") + (", len" if "text" in table.column_names else "")
    raise FilterError(f"--where: no column {name!r} in this index (columns: {shown})")


def _arrow_rows(result: Any) -> RowMask:
    """The rows where an Arrow boolean result is true (missing values are not)."""
    import numpy as np
    import pyarrow.compute as pc

    mask = pc.fill_null(result, False)
    if hasattr(mask, "combine_chunks"):
        mask = mask.combine_chunks()
    if mask.offset % 8 == 0 and mask.null_count == 0 and len(mask):  # Arrow's bitmap is FAISS's
        return RowMask.from_bitmap(mask.buffers()[1][mask.offset // 8 :], len(mask))
    return RowMask.from_bools(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))


_COMPARE = {"==": "equal", "!=": "not_equal", "<": "less", "<=": "less_equal", ">": "greater", ">=": "greater_equal"}


def _evaluate(node: tuple, table: pa.Table) -> RowMask:
    """The rows matching `node`. A missing value matches no comparison, so it is not kept from
    the start (the same as Arrow's three-valued and/or once missing means no match)."""
    kind = node[0]
    if kind == "and":
        return _evaluate(node[1], table) & _evaluate(node[2], table)
    if kind == "or":
        return _evaluate(node[1], table) | _evaluate(node[2], table)
    if kind == "not":
        return ~_evaluate(node[1], table)
    column = _column(table, node[1])
    literals = node[2] if kind == "in" else [node[2]]
    values = [v for v in literals if v is not None]  # null in a list matches nothing
    if kind != "contains" and values and all(_is_number(v) for v in values):
        if _is_numeric(column.type) or _is_text(column.type):
            return _compare_numbers(table, _numbers(table, node[1], column), kind, values, node)
    if _is_text(column.type) and kind in ("==", "!=", "in", "contains") and values:
        if all(isinstance(v, str) for v in values):
            codes = _codes(table, node[1], column)
            if codes is not None:
                return _compare_codes(table, node[1], codes, kind, values)
    return _arrow_rows(_compare_arrow(column, kind, node))


def _compare_numbers(table: pa.Table, numbers: _Numbers, kind: str, values: list, node: tuple) -> RowMask:
    import numpy as np

    if numbers.few_values and kind in ("==", "!=", "in"):

        def equal(value: Any) -> RowMask:
            def make() -> RowMask:
                rows = RowMask.from_bools(numbers.values == value)
                return rows if numbers.valid is None else rows & numbers.valid

            return _VALUE_ROWS.get(table, make, key=("number", node[1], value))

        return _equality(kind, [equal(v) for v in values], numbers.valid, len(numbers.values))
    try:
        if kind == "in":
            matched = np.isin(numbers.values, np.array(values))
        else:
            matched = getattr(np, _COMPARE[kind])(numbers.values, values[0])
    except (OverflowError, TypeError) as e:
        raise FilterError(f"--where: cannot compare column {node[1]!r} with {node[2]!r}: {e}") from None
    rows = RowMask.from_bools(matched)
    return rows if numbers.valid is None else rows & numbers.valid


def _compare_codes(table: pa.Table, name: str, codes: _Codes, kind: str, values: list[str]) -> RowMask:
    import numpy as np
    import pyarrow.compute as pc

    if kind == "contains":
        in_dictionary = _arrow_rows(pc.match_substring(codes.dictionary, values[0])).matches()
        return RowMask.from_bools(np.append(in_dictionary, False)[codes.codes])  # code -1 (missing) takes the last

    def rows_where(position: int) -> RowMask:  # -1: the rows with a value
        def make() -> RowMask:
            return RowMask.from_bools(codes.codes >= 0 if position < 0 else codes.codes == position)

        return _VALUE_ROWS.get(table, make, key=("code", name, position))

    equal = [rows_where(codes.values[v]) for v in values if v in codes.values]
    return _equality(kind, equal, rows_where(-1), len(codes.codes))


def _equality(kind: str, equal: list[RowMask], present: RowMask | None, size: int) -> RowMask:
    """`==` / `in`: the rows in any of `equal`; `!=`: those with a value (`present`, None: all)
    in none of them."""
    matched = equal[0] if equal else RowMask.all(size, False)
    for rows in equal[1:]:
        matched = matched | rows
    if kind != "!=":
        return matched
    return ~matched if present is None else present & ~matched


def _compare_arrow(column: Any, kind: str, node: tuple) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        if kind == "contains":
            return pc.match_substring(pc.cast(column, pa.string()), node[2])
        if kind == "in":
            values = [v for v in node[2] if v is not None]
            return pc.is_in(column, value_set=pa.array(values).cast(column.type))
        value = node[2]
        if value is None:  # `x = null` / `x != null`
            return pc.is_null(column) if kind == "==" else pc.is_valid(column)
        return getattr(pc, _COMPARE[kind])(column, pa.scalar(value).cast(column.type))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError) as e:
        raise FilterError(
            f"--where: cannot compare column {node[1]!r} ({column.type}) with {node[2]!r}: {str(e).splitlines()[0]}"
        ) from None
