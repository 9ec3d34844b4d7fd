"""Reading a text corpus (.txt, .tsv, .csv, .parquet, .jsonl) into texts plus metadata.

Messy input is the norm: empty texts and exact duplicates are dropped and counted; rows with the
wrong field count, invalid UTF-8 or bad JSON are reported with file and line and skipped (or
fatal with `strict`). `.tsv` is read without quote handling, as TSV corpora (COCO conversions,
prompt dumps) contain bare quotes; `.csv` follows the usual CSV quoting rules.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from retriever.errors import CorpusError

TEXT_COLUMNS = ("caption", "title", "text", "prompt")
FORMATS = (".txt", ".tsv", ".csv", ".parquet", ".jsonl")


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

    def as_dict(self) -> dict:
        return {"column": self.column, "rows": self.rows, "kept": self.kept, "empty": self.empty,
                "duplicates": self.duplicates, "bad_rows": len(self.bad_rows)}


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
        text = text.strip() if isinstance(text, str) else ("" if text is None else str(text).strip())
        if not text:
            report.empty += 1
            continue
        key = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        report.kept += 1
        yield text, meta
    if not report.kept:
        raise CorpusError(f"{path}: no usable text ({report.rows} rows, {report.empty} empty, "
                          f"{len(report.bad_rows)} bad)")


def iter_rows(path: str | Path, column: str | None = None) -> Iterator[Row | BadRow | str]:
    """Every row of a corpus file as (line, text, other columns), or a BadRow, in file order.

    No cleaning or deduplication: `iter_corpus` does that for text corpora; image-caption pairs
    (`retriever.pairs`) keep repeated captions. The first item is the chosen text column's name
    (a str), except for .txt files.

    Raises:
        CorpusError: missing file, unknown format, no such column.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise CorpusError(f"{path}: unknown format {suffix!r}; use one of {', '.join(FORMATS)}")
    readers = {".txt": _read_txt, ".tsv": _read_delimited, ".csv": _read_delimited,
               ".parquet": _read_parquet, ".jsonl": _read_jsonl}
    yield from readers[suffix](path, column)


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
    raise CorpusError(f"{path}: no text column found among {', '.join(columns) or '(none)'}; "
                      f"name one with --column, or call it one of {', '.join(TEXT_COLUMNS)}")


Row = tuple[int, Any, dict[str, Any]]


def _read_txt(path: Path, column: str | None) -> Iterator[Row | BadRow | str]:
    if column is not None:
        raise CorpusError(f"{path}: --column needs a file with columns (.tsv, .csv, .parquet, .jsonl)")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRow(str(path), number, f"invalid UTF-8 ({e.reason} at byte {e.start})")
                continue
            yield number, line.lstrip("\ufeff") if number == 1 else line, {}


def _read_delimited(path: Path, column: str | None) -> Iterator[Row | BadRow | str]:
    tsv = path.suffix.lower() == ".tsv"
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f, **options)
        try:
            header = next(reader)
        except StopIteration:
            raise CorpusError(f"{path}: empty file (a header line is expected)") from None
        except csv.Error as e:
            raise CorpusError(f"{path}:1: {e}") from None
        header = [h.lstrip("\ufeff").strip() for h in header]
        text_column = pick_text_column(header, column, path)
        yield text_column
        text_index = header.index(text_column)
        line = reader.line_num
        while True:
            start = line + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                line = reader.line_num
                yield BadRow(str(path), start, f"unparseable row ({e})")
                continue
            line = reader.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                yield BadRow(str(path), start, f"expected {len(header)} fields, found {len(fields)}")
                continue
            if any(_has_surrogates(v) for v in fields):
                yield BadRow(str(path), start, "invalid UTF-8")
                continue
            meta = {h: v for i, (h, v) in enumerate(zip(header, fields)) if i != text_index}
            yield start, fields[text_index], meta


def _read_jsonl(path: Path, column: str | None) -> Iterator[Row | BadRow | str]:
    text_column: str | None = None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield BadRow(str(path), number, "invalid UTF-8")
                continue
            except json.JSONDecodeError as e:
                yield BadRow(str(path), number, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                yield BadRow(str(path), number, "not a JSON object")
                continue
            if text_column is None:
                text_column = pick_text_column(list(record), column, path)
                yield text_column
            if text_column not in record:
                yield BadRow(str(path), number, f"no {text_column!r} key")
                continue
            meta = {k: v for k, v in record.items() if k != text_column}
            yield number, record[text_column], meta


def _read_parquet(path: Path, column: str | None) -> Iterator[Row | BadRow | str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    text_column = pick_text_column(parquet.schema_arrow.names, column, path)
    yield text_column
    number = 0
    for batch in parquet.iter_batches(batch_size=65536):
        for record in batch.to_pylist():
            number += 1  # parquet has no lines; this is the 1-based row number
            meta = {k: v for k, v in record.items() if k != text_column}
            yield number, record[text_column], meta


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
