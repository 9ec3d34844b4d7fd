"""Reading (image path, caption) training pairs from a TSV/CSV/parquet/JSONL file.

The format is the seed's: a `filepath` column and a `title` column, one row per caption, so an
image with five captions has five rows. Image paths are absolute or relative to the file's folder.
Bad rows and missing images are reported with line numbers and skipped; unreadable images are
only found when training opens them, and are counted there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from retriever.corpus.reader import BadRow, iter_rows
from retriever.corpus.values import clean_text
from retriever.errors import CorpusError

DEFAULT_IMAGE_COLUMN = "filepath"
DEFAULT_CAPTION_COLUMN = "title"


@dataclass
class PairsReport:
    """Counts from reading a pairs file."""

    rows: int = 0
    kept: int = 0
    empty_captions: int = 0
    missing_images: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "empty_captions": self.empty_captions,
            "missing_images": self.missing_images,
            "bad_rows": len(self.bad_rows),
        }


@dataclass
class Pairs:
    """Usable pairs in file order, with the line each came from."""

    path: Path
    images: list[Path]
    captions: list[str]
    lines: list[int]
    report: PairsReport

    def __len__(self) -> int:
        return len(self.captions)

    def unique_images(self) -> dict[Path, set[str]]:
        """Each image with all its captions (COCO has five per image)."""
        out: dict[Path, set[str]] = {}
        for image, caption in zip(self.images, self.captions):
            out.setdefault(image, set()).add(caption)
        return out


def read_pairs(
    path: str | Path,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    caption_column: str = DEFAULT_CAPTION_COLUMN,
    on_bad_row: Callable[[BadRow], None] | None = None,
) -> Pairs:
    """Read image-caption pairs; rows whose image file is missing are skipped and reported.

    Args:
        path: a `.tsv`, `.csv`, `.parquet` or `.jsonl` file with a header.
        image_column: the column of image paths (absolute, or relative to the file's folder).
        caption_column: the column of captions.
        on_bad_row: called with each skipped row (wrong field count, empty path, missing image...).

    Raises:
        CorpusError: unreadable file, a named column that is not there, or no usable pair at all.
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        raise CorpusError(
            f"{path}: training pairs need columns ({image_column!r} and {caption_column!r}); "
            "use a .tsv, .csv, .parquet or .jsonl file"
        )
    report = PairsReport()
    images: list[Path] = []
    captions: list[str] = []
    lines: list[int] = []
    base = path.resolve().parent
    unreadable = 0  # rows the reader could not parse (not in report.rows)

    def bad(row: BadRow) -> None:
        report.bad_rows.append(row)
        if on_bad_row:
            on_bad_row(row)

    for item in iter_rows(path, caption_column):
        if isinstance(item, str):
            continue
        if isinstance(item, BadRow):
            unreadable += 1
            bad(item)
            continue
        line, caption, meta = item
        report.rows += 1
        if image_column not in meta:
            columns = ", ".join([caption_column, *meta])
            raise CorpusError(f"{path}: no column {image_column!r}; columns are {columns} (use --image-column)")
        caption = " ".join(clean_text(caption).split())
        if not caption:
            report.empty_captions += 1
            bad(BadRow(str(path), line, "empty caption"))
            continue
        raw = meta[image_column]
        if raw is not None and not isinstance(raw, str):
            bad(BadRow(str(path), line, f"image path is {raw!r}, not a string"))
            continue
        if raw is None or not raw.strip():
            bad(BadRow(str(path), line, "empty image path"))
            continue
        image = Path(raw.strip()).expanduser()
        image = image if image.is_absolute() else base / image
        if not image.is_file():
            report.missing_images += 1
            bad(BadRow(str(path), line, f"image not found: {image}"))
            continue
        images.append(image)
        captions.append(caption)
        lines.append(line)
    report.kept = len(captions)
    if not captions:
        total = report.rows + unreadable
        other = len(report.bad_rows) - report.missing_images - report.empty_captions
        counts = f"{report.missing_images} missing images, {report.empty_captions} empty captions, {other} other bad"
        raise CorpusError(f"{path}: no usable image-caption pairs ({total} rows{': ' + counts if total else ''})")
    return Pairs(path, images, captions, lines, report)
