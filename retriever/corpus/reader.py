"""Reading a text corpus (.txt, .tsv, .csv, .parquet, .jsonl) into texts plus metadata.

Messy input is the norm: empty texts and exact duplicates are dropped and counted; rows with the
wrong field count, invalid UTF-8 or bad JSON are reported with file and line and skipped (or
fatal with `strict`). `.tsv` is read without quote handling, as TSV corpora (COCO conversions,
prompt dumps) contain bare quotes; `.csv` follows the usual CSV quoting rules.

Every value is checked where it is read, so nothing surprising reaches the encoder or the parquet
writer: a text that is not a string (a number, an object, a list) or holds a lone surrogate is a
bad row (UTF-8 bytes are decoded); control characters in texts become spaces; metadata values are
JSON scalars (None, bool, int, float, str), with objects and lists stored as JSON text.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from retriever.corpus.cjk import dedupe_key
from retriever.corpus.files import SAMPLE_BYTES, read_sample, sniff_text
from retriever.corpus.values import clean_text, has_surrogates, json_kind, metadata, text_value, unique_names
from retriever.errors import CorpusError

if TYPE_CHECKING:
    import pyarrow.parquet as pq

__all__ = [
    "BadRow",
    "Corpus",
    "CorpusReport",
    "check_corpus_file",
    "clean_text",
    "count_rows",
    "iter_corpus",
    "iter_rows",
    "pick_text_column",
    "read_corpus",
]

TEXT_COLUMNS = ("caption", "title", "text", "prompt")
FORMATS = (".txt", ".tsv", ".csv", ".parquet", ".jsonl")
# JSON lines may differ in their keys; the text column is chosen from this many records.
JSONL_SAMPLE = 100


@dataclass
class BadRow:
    """A row that could not be used, with where it is and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class CorpusReport:
    """Counts from reading a corpus, filled in as it is read."""

    column: str | None = None
    rows: int = 0
    kept: int = 0
    empty: int = 0
    duplicates: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)

    def no_usable_text(self, path: str | Path) -> CorpusError:
        """The error for a corpus that held no text to index, with what it held instead."""
        rows = self.rows + len(self.bad_rows)
        return CorpusError(f"{path}: no usable text ({rows} rows: {self.empty} empty, {len(self.bad_rows)} bad)")

    def as_dict(self) -> dict:
        return {
            "column": self.column,
            "rows": self.rows,
            "kept": self.kept,
            "empty": self.empty,
            "duplicates": self.duplicates,
            "bad_rows": len(self.bad_rows),
        }


@dataclass
class Corpus:
    """Unique, non-empty texts in file order, with the other columns as metadata."""

    path: Path
    column: str | None
    texts: list[str]
    metadata: list[dict[str, Any]]
    report: CorpusReport


def read_corpus(path: str | Path, column: str | None = None, strict: bool = False) -> Corpus:
    """Read a whole corpus file into memory; see `iter_corpus` for the arguments and errors."""
    report = CorpusReport()
    texts: list[str] = []
    metadata: list[dict[str, Any]] = []
    for text, meta in iter_corpus(path, column=column, strict=strict, report=report):
        texts.append(text)
        metadata.append(meta)
    return Corpus(Path(path), report.column, texts, metadata, report)


def iter_corpus(
    path: str | Path,
    column: str | None = None,
    strict: bool = False,
    report: CorpusReport | None = None,
    on_bad_row: Callable[[BadRow], None] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream the unique, non-empty (text, metadata) pairs of a corpus file, in file order.

    Memory stays small however large the file: duplicates are found by an 8-byte hash per
    distinct text, not by keeping the texts.

    Args:
        path: a `.txt` (one text per line), `.tsv`/`.csv` (with a header), `.parquet` or `.jsonl` file.
        column: the text column; by default the first of caption, title, text, prompt.
        strict: raise on the first bad row instead of skipping it.
        report: filled in with counts and bad rows as the corpus is read.
        on_bad_row: called with each skipped bad row as it is found.

    Raises:
        CorpusError: unreadable file, unknown format, no text column, a bad row with `strict`,
            or (when the file is exhausted) no usable text at all.
    """
    path = Path(path)
    report = report if report is not None else CorpusReport()
    seen: set[int] = set()
    for item in iter_rows(path, column):
        if isinstance(item, BadRow):
            if strict:
                raise CorpusError(f"{item} (without --strict, bad rows are skipped)")
            report.bad_rows.append(item)
            if on_bad_row:
                on_bad_row(item)
            continue
        if isinstance(item, str):  # the reader announces the text column it chose, once
            report.column = item
            continue
        _, text, meta = item
        report.rows += 1
        text = clean_text(text)
        if not text:
            report.empty += 1
            continue
        key = text_key(text)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        report.kept += 1
        yield text, meta
    if not report.kept:
        raise report.no_usable_text(path)


def text_key(text: str) -> int:
    """The 8-byte hash under which a cleaned text counts as a duplicate. Full- and half-width
    forms, and spaces between Chinese characters, don't make a new text."""
    digest = hashlib.blake2b(dedupe_key(text).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def iter_rows(path: str | Path, column: str | None = None) -> Iterator[Row | BadRow | str]:
    """Every row of a corpus file as (line, text, other columns), or a BadRow, in file order.

    No cleaning or deduplication: `iter_corpus` does that for text corpora; image-caption pairs
    (`retriever.pairs`) keep repeated captions. The first item is the chosen text column's name
    (a str), except for .txt files.

    Texts are str or None (see the module's note on values); metadata values are JSON scalars.

    Raises:
        CorpusError: see `check_corpus_file`; also no such column.
    """
    path = Path(path)
    check_corpus_file(path)
    suffix = path.suffix.lower()
    readers = {
        ".txt": _read_txt,
        ".tsv": _read_delimited,
        ".csv": _read_delimited,
        ".parquet": _read_parquet,
        ".jsonl": _read_jsonl,
    }
    yield from readers[suffix](path, column)


def check_corpus_file(path: str | Path) -> None:
    """Check, in milliseconds, that `path` is a corpus file this module can read.

    Call it before hashing the file or loading a model: it never blocks (FIFOs and devices are
    refused by `stat`, not read) and reads at most 64 KiB.

    Raises:
        CorpusError: missing, a directory, a FIFO or device (or a symlink to one), unreadable,
            empty, an unknown suffix, or content that is plainly not that format (compressed,
            UTF-16, binary, a parquet file without its header, one JSON document in a .jsonl).
    """
    path = Path(path)
    sample = read_sample(path, what="corpus")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise CorpusError(
            f"{path}: unknown format {suffix or '(no suffix)'!r} for a corpus; "
            f"save it as, and name it by, one of {', '.join(FORMATS)}"
        )
    if suffix == ".parquet":
        if not sample.startswith(b"PAR1"):
            raise CorpusError(
                f"{path}: not a readable parquet file (no PAR1 header); "
                f"if it is text, name it .txt, .tsv, .csv or .jsonl"
            )
        return
    sniff_text(path, sample, what="corpus file")
    if suffix == ".jsonl":
        _sniff_jsonl(path, sample)


def _sniff_jsonl(path: Path, sample: bytes) -> None:
    """Refuse one JSON document (an array, or a pretty-printed object) saved as .jsonl."""
    lines = sample.lstrip().split(b"\n", 1)
    first = lines[0].strip()
    if not first or len(lines) == 1 and len(sample) == SAMPLE_BYTES:
        return  # the first line runs past the sample; the reader will judge it
    advice = f"JSON Lines holds one object per line; convert it, e.g. jq -c '.[]' {path.name} > {path.stem}.lines.jsonl"
    if first in (b"[", b"{", b"[{"):
        raise CorpusError(f"{path}:1: looks like one JSON document over several lines, not JSON Lines; {advice}")
    if first.startswith(b"["):
        try:
            value = json.loads(first)
        except (ValueError, RecursionError):
            return
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            raise CorpusError(f"{path}:1: is a JSON array of objects, not JSON Lines; {advice}")


def count_rows(path: str | Path) -> int | None:
    """A quick upper bound on a corpus's rows (lines, or parquet rows), for progress bars."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:
            return None
    lines = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            lines += chunk.count(b"\n")
    return lines


def header_names(fields: list[str], path: Path) -> list[str]:
    """A .tsv/.csv header line's column names: trimmed, without a byte-order mark, made unique.
    Raises CorpusError when the line is not UTF-8 (a binary file, or another encoding)."""
    if any(has_surrogates(f) for f in fields):
        raise CorpusError(f"{path}:1: the header line is not UTF-8 text; save the corpus as UTF-8 with a header line")
    return unique_names([f.lstrip("\ufeff").strip() for f in fields])


def pick_text_column(columns: list[str], column: str | None, path: Path) -> str:
    """The requested column, or the first of TEXT_COLUMNS present (case-insensitive)."""
    if column is not None:
        if column not in columns:
            raise CorpusError(f"{path}: no column {column!r}; columns are {', '.join(columns)}")
        return column
    lowered = {c.lower().strip(): c for c in columns}
    for candidate in TEXT_COLUMNS:
        if candidate in lowered:
            return lowered[candidate]
    raise CorpusError(
        f"{path}: no text column found among {', '.join(columns) or '(none)'}; "
        f"name one with --column, or call it one of {', '.join(TEXT_COLUMNS)}"
    )


Row = tuple[int, Any, dict[str, Any]]


def _read_txt(path: Path, column: str | None) -> Iterator[Row | BadRow | str]:
    if column is not None:
        raise CorpusError(f"{path}: --column needs a file with columns (.tsv, .csv, .parquet, .jsonl)")
    with open(path, "rb") as f:
        yield from txt_rows(f, path)


def txt_rows(f: IO[bytes], path: Path, file_start: bool = True) -> Iterator[Row | BadRow]:
    """The rows of a .txt file from binary `f`, numbered from 1 (the file's lines when
    `file_start`; else the lines of a part, see parts.py)."""
    for number, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield BadRow(str(path), number, f"invalid UTF-8 ({e.reason} at byte {e.start})")
            continue
        yield number, line.lstrip("\ufeff") if number == 1 and file_start else line, {}


def _read_delimited(path: Path, column: str | None) -> Iterator[Row | BadRow | str]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f, **delimited_options(path))
        try:
            header = next(reader)
        except StopIteration:
            raise CorpusError(f"{path}: empty file (a header line is expected)") from None
        except csv.Error as e:
            raise CorpusError(f"{path}:1: {e}") from None
        header = header_names(header, path)
        text_column = pick_text_column(header, column, path)
        yield text_column
        yield from delimited_rows(reader, header, text_column, path, reader.line_num)


def delimited_rows(
    reader: Iterator[list[str]], header: list[str], text_column: str, path: Path, line: int = 0
) -> Iterator[Row | BadRow]:
    """The rows of a csv.reader past the header, numbered after `line` (the lines already read)."""
    text_index = header.index(text_column)
    while True:
        start = line + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            line = reader.line_num  # type: ignore[attr-defined]
            yield BadRow(str(path), start, f"unparseable row ({e})")
            continue
        line = reader.line_num  # type: ignore[attr-defined]
        if not fields:
            continue
        if len(fields) != len(header):
            yield BadRow(str(path), start, f"expected {len(header)} fields, found {len(fields)}")
            continue
        if any(has_surrogates(v) for v in fields):
            yield BadRow(str(path), start, "invalid UTF-8")
            continue
        meta = {h: v for i, (h, v) in enumerate(zip(header, fields)) if i != text_index}
        yield start, fields[text_index], meta


def delimited_options(path: Path) -> dict[str, Any]:
    """csv.reader's options: .tsv without quote handling (see the module's note), .csv the usual."""
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix.lower() == ".tsv" else {}


def _read_jsonl(path: Path, column: str | None) -> Iterator[Row | BadRow | str]:
    records = _jsonl_records(path)
    sample: list[tuple[int, dict] | BadRow] = []
    chosen: list[dict] = []
    for item in records:
        sample.append(item)
        if not isinstance(item, BadRow):
            chosen.append(item[1])
        if len(chosen) == JSONL_SAMPLE or len(sample) >= 100 * JSONL_SAMPLE:
            break
    text_column = _pick_jsonl_column(chosen, column, path) if chosen else None
    if text_column is not None:
        yield text_column
    yield from jsonl_rows(_chain(sample, records), text_column, path)


def jsonl_rows(
    records: Iterator[tuple[int, dict] | BadRow], text_column: str | None, path: Path
) -> Iterator[Row | BadRow]:
    """Rows from (line number, object) records, with `text_column` as the text."""
    for item in records:
        if isinstance(item, BadRow):
            yield item
            continue
        number, record = item
        if text_column not in record:
            yield BadRow(str(path), number, f"no {text_column!r} key")
            continue
        text, problem = text_value(record[text_column])
        if problem:
            yield BadRow(str(path), number, problem)
            continue
        yield number, text, metadata(record, text_column)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict] | BadRow]:
    with open(path, "rb") as f:
        yield from jsonl_records(f, path)


def jsonl_records(f: IO[bytes], path: Path) -> Iterator[tuple[int, dict] | BadRow]:
    """(line number, object) for each JSON line of binary `f`, or a BadRow for lines that are not one."""
    for number, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield BadRow(str(path), number, f"invalid UTF-8 (at byte {e.start})")
            continue
        except json.JSONDecodeError as e:
            yield BadRow(str(path), number, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            yield BadRow(str(path), number, "JSON nested too deeply to read")
            continue
        except ValueError as e:  # e.g. an integer beyond Python's digit limit
            yield BadRow(str(path), number, f"invalid JSON ({e})")
            continue
        if not isinstance(record, dict):
            yield BadRow(str(path), number, f"not a JSON object (found {json_kind(record)})")
            continue
        yield number, record


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def _pick_jsonl_column(records: list[dict], column: str | None, path: Path) -> str:
    """The text key: `column` if given, else the TEXT_COLUMNS key most records in the sample have."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    if column is not None:
        if column not in keys:
            raise CorpusError(
                f"{path}: no key {column!r} in the first {len(records)} records; keys are {', '.join(keys)}"
            )
        return column
    counts = Counter(k for r in records for k in r)
    candidates = [k for k in keys if k.lower().strip() in TEXT_COLUMNS]
    if not candidates:
        return pick_text_column(keys, None, path)  # raises, listing the keys
    rank = {name: i for i, name in enumerate(TEXT_COLUMNS)}
    return min(candidates, key=lambda k: (-counts[k], rank[k.lower().strip()]))


def _read_parquet(path: Path, column: str | None) -> Iterator[Row | BadRow | str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    text_column = pick_text_column(names, column, path)
    yield text_column
    yield from parquet_rows(parquet, text_column, path)


def parquet_rows(
    parquet: pq.ParquetFile, text_column: str, path: Path, row_groups: range | None = None, number: int = 0
) -> Iterator[Row | BadRow]:
    """Rows of a parquet file (of `row_groups` only, whose first row follows row `number`)."""
    batches = parquet.iter_batches(batch_size=65536, row_groups=row_groups)
    while True:
        try:
            batch = next(batches, None)
            records = batch.to_pylist() if batch is not None else []
        except Exception as e:  # corrupt pages, invalid UTF-8 in a string column, ...
            raise CorpusError(
                f"{path}: unreadable after row {number} ({e}); the file is damaged or was written with invalid strings"
            ) from None
        if batch is None:
            break
        for record in records:
            number += 1  # parquet has no lines; this is the 1-based row number
            text, problem = text_value(record[text_column])
            if problem:
                yield BadRow(str(path), number, problem)
                continue
            yield number, text, metadata(record, text_column)
