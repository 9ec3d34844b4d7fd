"""Reading one corpus file in parallel, with exactly the texts, order and duplicates of a
sequential read (`reader.iter_corpus`).

1. `split_corpus` cuts the file into parts that separate processes read on their own: byte
   ranges that start and end at line boundaries (.txt, .jsonl, .tsv), or runs of parquet row
   groups. `.csv` stays whole: a quoted field may hold a newline, so a byte offset cannot tell
   where a row starts.
2. `scan_part` (on any worker) parses and cleans one part exactly as the sequential reader
   does, writes its non-empty texts to a parquet piece in the work directory, and returns the
   counts, bad rows and one 8-byte key per text (`reader.text_key`).
3. `Deduper` walks the parts' keys in file order on the driver: a set lookup per text, which
   fixes which texts are kept and so their ids.
4. `chunk_segments` cuts the kept texts into the build's chunks; `read_segments` (on the worker
   that embeds a chunk) takes its rows from the pieces.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.corpus.reader import (
    BadRow,
    CorpusReport,
    delimited_options,
    delimited_rows,
    header_names,
    iter_rows,
    jsonl_records,
    jsonl_rows,
    parquet_rows,
    text_key,
    txt_rows,
)
from retriever.corpus.values import clean_text
from retriever.errors import CorpusError

if TYPE_CHECKING:
    import numpy as np

SPLITTABLE = (".txt", ".tsv", ".jsonl", ".parquet")
_SCAN_BLOCK = 1 << 20


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of a text file, or row groups [start, end) of a parquet file.
    `first_row`: rows before it (parquet); None for text, whose line numbers the driver adds."""

    number: int
    start: int
    end: int
    first_row: int | None = None


@dataclass(frozen=True)
class Layout:
    """Everything a worker needs to read any part of one corpus file."""

    path: str
    column: str | None  # the text column (None for .txt)
    header: list[str] | None  # .tsv: the header line's names (not in any part)
    header_lines: int  # lines before the first part
    parts: list[Part]


@dataclass
class PartScan:
    """What reading one part found; `keys[i]` is the key of the piece's row i."""

    number: int
    lines: int
    rows: int
    empty: int
    bad_rows: list[BadRow]
    keys: np.ndarray


def split_corpus(path: str | Path, column: str | None, parts: int) -> Layout | None:
    """Cut `path` into about `parts` parts; None when the format cannot be cut (.csv) or `parts` < 2.

    The text column is chosen as a sequential read chooses it (the header, or JSON Lines' first
    records), so every part reads the same column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SPLITTABLE or parts < 2:
        return None
    chosen = next(iter(iter_rows(path, column)), None) if suffix != ".txt" else None
    text_column = chosen if isinstance(chosen, str) else column
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        groups = _even_runs(sizes, parts)
        firsts = [sum(sizes[:start]) for start, _ in groups]
        return Layout(
            str(path), text_column, None, 0, [Part(i, s, e, f) for i, ((s, e), f) in enumerate(zip(groups, firsts))]
        )
    start, header = 0, None
    if suffix == ".tsv":
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            first = f.readline()  # a .tsv header is one line: no quoting
        start = len(first.encode("utf-8", "surrogateescape"))
        import csv

        names = next(csv.reader([first], **delimited_options(path)), [])
        header = header_names(names, path)
    bounds = _line_bounds(path, start, parts)
    cut = [Part(i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return Layout(str(path), text_column, header, 1 if header is not None else 0, cut)


def _line_bounds(path: Path, start: int, parts: int) -> list[int]:
    """Byte offsets start = b0 < b1 < ... = size, each just after a newline."""
    size = path.stat().st_size
    bounds = [start]
    with open(path, "rb") as f:
        for i in range(1, parts):
            target = max(start + (size - start) * i // parts, bounds[-1])
            f.seek(target)
            while True:
                block = f.read(_SCAN_BLOCK)
                at = block.find(b"\n")
                if at >= 0:
                    cut = f.tell() - len(block) + at + 1
                    break
                if not block:
                    cut = size
                    break
            if bounds[-1] < cut < size:
                bounds.append(cut)
    return [*bounds, size]


def _even_runs(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous runs of row groups with about sum(sizes) / parts rows each."""
    total, target = sum(sizes), max(1, sum(sizes) // parts)
    runs, begin, rows = [], 0, 0
    for g, n in enumerate(sizes):
        rows += n
        if rows >= target and g + 1 < len(sizes):
            runs.append((begin, g + 1))
            begin, rows = g + 1, 0
    runs.append((begin, len(sizes)))
    return runs if total else [(0, len(sizes))]


def part_rows(layout: Layout, part: Part) -> Iterator[tuple[int, Any, dict] | BadRow]:
    """The rows of one part, as the sequential reader yields them (line numbers within the part
    for text files; the file's row numbers for parquet)."""
    path = Path(layout.path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        assert layout.column is not None
        yield from parquet_rows(
            pq.ParquetFile(path), layout.column, path, range(part.start, part.end), part.first_row or 0
        )
        return
    with open(path, "rb") as f:
        f.seek(part.start)
        data = io.BytesIO(f.read(part.end - part.start))
    if suffix == ".txt":
        yield from txt_rows(data, path, file_start=part.start == 0)
    elif suffix == ".jsonl":
        yield from jsonl_rows(jsonl_records(data, path), layout.column, path)
    else:
        import csv

        assert layout.header is not None and layout.column is not None
        text = io.TextIOWrapper(data, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, **delimited_options(path))
        yield from delimited_rows(reader, layout.header, layout.column, path)


def scan_part(layout: Layout, part: Part, piece: Path) -> PartScan:
    """Read one part: write its non-empty cleaned texts (with their metadata as JSON) to `piece`,
    and return its counts, bad rows and keys."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts: list[str] = []
    metas: list[str] = []
    bad: list[BadRow] = []
    rows = empty = lines = 0
    for item in part_rows(layout, part):
        if isinstance(item, BadRow):
            bad.append(item)
            lines = max(lines, item.line)
            continue
        number, text, meta = item
        lines = max(lines, number)
        rows += 1
        text = clean_text(text)
        if not text:
            empty += 1
            continue
        texts.append(text)
        metas.append(json.dumps(meta, ensure_ascii=False))
    keys = np.fromiter((text_key(t) for t in texts), dtype=np.uint64, count=len(texts))
    if part.first_row is None:
        lines = _count_lines(layout, part)
    table = pa.table({"text": pa.array(texts, pa.string()), "meta": pa.array(metas, pa.string())})
    tmp = piece.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(piece)
    return PartScan(part.number, lines, rows, empty, bad, keys)


def _count_lines(layout: Layout, part: Part) -> int:
    """Lines in a text part as its reader counts them (a .tsv also ends lines at a lone '\\r')."""
    with open(layout.path, "rb") as f:
        f.seek(part.start)
        data = f.read(part.end - part.start)
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if layout.path.lower().endswith(".tsv"):
        lines += data.count(b"\r") - data.count(b"\r\n") - (1 if data.endswith(b"\r") else 0)
    return lines


@dataclass
class Deduper:
    """The driver's ordered pass over the parts' scans: counts into `report`, bad rows with the
    file's line numbers, and for each part the piece rows kept (first occurrences)."""

    layout: Layout
    report: CorpusReport
    strict: bool = False
    on_bad_row: Callable[[BadRow], None] | None = None
    seen: set[int] = field(default_factory=set)
    lines: int = 0

    def __post_init__(self) -> None:
        self.lines = self.layout.header_lines
        self.report.column = self.layout.column

    def add(self, scan: PartScan) -> np.ndarray:
        """Take the next part's scan (in part order); returns its kept piece rows."""
        import numpy as np

        offset = self.lines if self.layout.parts[scan.number].first_row is None else 0
        for bad in scan.bad_rows:
            bad = BadRow(bad.path, bad.line + offset, bad.reason)
            if self.strict:
                raise CorpusError(f"{bad} (without --strict, bad rows are skipped)")
            self.report.bad_rows.append(bad)
            if self.on_bad_row:
                self.on_bad_row(bad)
        self.lines += scan.lines
        self.report.rows += scan.rows
        self.report.empty += scan.empty
        kept = []
        seen = self.seen
        for row, key in enumerate(scan.keys.tolist()):
            if key not in seen:
                seen.add(key)
                kept.append(row)
        self.report.duplicates += len(scan.keys) - len(kept)
        self.report.kept += len(kept)
        return np.asarray(kept, dtype=np.int64)

    def finish(self) -> None:
        """Raise CorpusError if the whole file held no usable text (as a sequential read does)."""
        if not self.report.kept:
            raise self.report.no_usable_text(self.layout.path)


Segment = tuple[int, "np.ndarray"]  # (part number, piece rows)


def chunk_segments(kept: Iterable[tuple[int, np.ndarray]], chunk_size: int) -> Iterator[list[Segment]]:
    """Cut the kept rows of the parts, in order, into chunks of `chunk_size` texts (the last
    shorter): each chunk is the list of (part, piece rows) it takes."""
    chunk: list[Segment] = []
    filled = 0
    for number, rows in kept:
        while len(rows):
            take = rows[: chunk_size - filled]
            chunk.append((number, take))
            filled += len(take)
            rows = rows[len(take) :]
            if filled == chunk_size:
                yield chunk
                chunk, filled = [], 0
    if chunk:
        yield chunk


def read_segments(pieces: Path, segments: list[Segment]) -> list[tuple[str, dict]]:
    """A chunk's (text, metadata) pairs from the parquet pieces."""
    import pyarrow.parquet as pq

    out: list[tuple[str, dict]] = []
    for number, rows in segments:
        table = pq.read_table(piece_path(pieces, number)).take(rows)
        out += [(t, json.loads(m)) for t, m in zip(table.column("text").to_pylist(), table.column("meta").to_pylist())]
    return out


def piece_path(pieces: Path, number: int) -> Path:
    return pieces / f"piece-{number:05d}.parquet"
