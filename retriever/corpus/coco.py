"""Converting COCO captions (official annotation files, Karpathy splits) into corpus TSVs.

The output is the seed's format: a header `filepath<TAB>title`, then one row per caption, with
the image path relative to the TSV's own folder. Captions are cleaned so that a row is always one
line of two fields: whitespace and control characters (tabs and newlines included) collapse to
single spaces, and empty captions are dropped and counted. Malformed input stops with one line
naming the file and the entry (or line and column for invalid JSON).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retriever.atomic import write_text_atomic
from retriever.corpus.cjk import dedupe_key, squash_spaces
from retriever.corpus.files import check_regular_file, read_sample
from retriever.errors import CorpusError

SPLITS = ("train", "val", "test")
# restval (the 30k val2014 images outside Karpathy's val and test) is training data by convention.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A JSON escape such as \ud800 gives a lone surrogate, which cannot be written as UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_COCO_FOLDER = re.compile(r"^COCO_([A-Za-z]+\d{4})_")
_CAPTIONS_FILE = re.compile(r"^captions_(.+)\.json$")


@dataclass
class SplitReport:
    """Counts for one output file."""

    path: str
    images: int = 0
    captions: int = 0
    missing_images: int = 0
    skipped_captions: int = 0
    empty_captions: int = 0
    uncaptioned_images: int = 0
    duplicates: int = 0


@dataclass
class CocoReport:
    """What `convert_coco` wrote, per output file (keyed by split, or `all` without Karpathy)."""

    splits: dict[str, SplitReport]
    images_checked: bool
    unmatched_captions: int = 0
    karpathy_captions_used: int = 0
    totals: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        keys = [k for k in asdict(SplitReport("")) if k != "path"]
        self.totals = {k: sum(getattr(s, k) for s in self.splits.values()) for k in keys}

    def as_dict(self) -> dict:
        return {
            **self.totals,
            "images_checked": self.images_checked,
            "unmatched_captions": self.unmatched_captions,
            "karpathy_captions_used": self.karpathy_captions_used,
            "splits": {name: asdict(s) for name, s in self.splits.items()},
        }


@dataclass
class _Image:
    key: Any
    candidates: list[str]  # paths under the images folder, the canonical one first
    captions: list[str]  # raw, not yet cleaned
    split: str


def clean_caption(text: str) -> str:
    """One line of text: control characters and runs of whitespace become single spaces (none
    between Chinese characters: word-segmented captions such as COCO-CN's `一个 男人` are joined
    back), and lone surrogates the replacement character U+FFFD."""
    return squash_spaces(_CONTROL.sub(" ", _SURROGATE.sub("\ufffd", text)))


def convert_coco(
    out: str | Path,
    annotations: Sequence[str | Path] = (),
    karpathy: str | Path | None = None,
    images: str | Path | None = None,
    captions_only: bool = False,
    keep_missing: bool = False,
    overwrite: bool = False,
) -> CocoReport:
    """Write COCO captions as corpus files: image/caption TSVs, or captions alone.

    Without `karpathy`, `out` is one file holding every image of `annotations`. With it, `out`
    is a directory that receives `train.tsv`, `val.tsv` and `test.tsv` (restval goes to train);
    the Karpathy file alone is enough, and when `annotations` are given too their captions are
    used for the images they cover (matched by `cocoid`), Karpathy's `sentences.raw` for the rest.

    Image rows hold `filepath` (relative to the folder of the file written, so the folder can
    move as a whole) and `title`. Images are looked up as `images/FILE_NAME`, then, for COCO
    annotations, `images/SPLIT/FILE_NAME` where SPLIT (e.g. `val2014`) comes from a
    `COCO_val2014_...` file name or a `captions_val2017.json` annotations file; for Karpathy,
    `images/FILEPATH/FILENAME`, then `images/FILENAME`. Images that are not there are counted
    and their rows skipped, unless `keep_missing`.

    Args:
        out: the output file (`.tsv`; `.tsv` or `.txt` with `captions_only`), or with
            `karpathy` the output directory.
        annotations: COCO caption files (`captions_train2014.json`, ...), read together.
        karpathy: Karpathy's `dataset_coco.json` (or another `dataset_*.json` in that format).
        images: the folder holding the images; needed unless `captions_only`.
        captions_only: write one `caption` column (or, for a `.txt` file, one caption per line),
            with exact duplicates dropped: a text corpus for `build-index`. With `images`,
            captions of missing images are still skipped.
        keep_missing: write rows whose image file is not found.
        overwrite: replace existing output files.

    Returns:
        The counts: per output file, and in total.

    Raises:
        CorpusError: a missing, unreadable or malformed input file (the message names the file
            and the entry), a bad `out`, existing output without `overwrite`, or nothing to write.
    """
    if not annotations and karpathy is None:
        raise CorpusError("give COCO annotations, a Karpathy split file, or both")
    if images is None and not captions_only:
        raise CorpusError("the images folder is needed to write image paths (or write captions only)")
    # Every input is checked before any is read: a FIFO or /dev/zero would otherwise hang or
    # fill memory, and a typo in the last file would cost the parse of the first.
    for path in [*annotations, *([karpathy] if karpathy is not None else [])]:
        read_sample(path, what="COCO JSON", size=1)
    images_dir = Path(images) if images is not None else None
    if images_dir is not None and not images_dir.is_dir():
        raise CorpusError(
            f"{images_dir}: no such directory"
            if not images_dir.exists()
            else f"{images_dir}: not a directory; give the folder that holds the images"
        )
    targets = _targets(Path(out), karpathy is not None, captions_only, overwrite)

    by_id: dict[Any, _Image] = {}
    unmatched = 0
    for path in annotations:
        unmatched += _read_annotations(Path(path), by_id)
    karpathy_used = 0
    if karpathy is not None:
        listed, karpathy_used = _read_karpathy(Path(karpathy), by_id if annotations else None)
    else:
        listed = list(by_id.values())

    reports = {split: SplitReport(str(path)) for split, path in targets.items()}
    rows: dict[str, list[str]] = {split: [] for split in targets}
    seen: dict[str, set[str]] = {split: set() for split in targets}
    for image in listed:
        report = reports[image.split]
        captions = [clean_caption(c) for c in image.captions]
        report.empty_captions += sum(1 for c in captions if not c)
        captions = [c for c in captions if c]
        if not captions:
            report.uncaptioned_images += 1
            continue
        found = _find(images_dir, image.candidates) if images_dir is not None else image.candidates[0]
        if found is None:
            report.missing_images += 1
            if not keep_missing:
                report.skipped_captions += len(captions)
                continue
            found = image.candidates[0]
        if captions_only:
            for caption in captions:
                key = dedupe_key(caption)  # full- and half-width forms alike
                if key in seen[image.split]:
                    report.duplicates += 1
                    continue
                seen[image.split].add(key)
                rows[image.split].append(caption)
                report.captions += 1
        else:
            assert images_dir is not None  # checked above: image rows need the folder
            filepath = _relative(images_dir / found, targets[image.split].parent)
            if _CONTROL.search(filepath) or _SURROGATE.search(filepath):
                raise CorpusError(
                    f"image {found!r} has a tab, newline, control character or invalid Unicode "
                    f"in its name, which a TSV row cannot hold; rename it"
                )
            rows[image.split].extend(f"{filepath}\t{c}" for c in captions)
            report.captions += len(captions)
        report.images += 1

    result = CocoReport(
        reports,
        images_checked=images_dir is not None,
        unmatched_captions=unmatched,
        karpathy_captions_used=karpathy_used,
    )
    if not result.totals["captions"]:
        t = result.totals
        missing = (
            f"{t['missing_images']} images not found in {images_dir} (--keep-missing writes them), "
            if t["missing_images"]
            else ""
        )
        raise CorpusError(
            f"no captions to write: {missing}{t['uncaptioned_images']} images without a caption "
            f"({t['empty_captions']} empty captions, {unmatched} captions of unknown images); "
            f"nothing written"
        )
    for split, path in targets.items():
        if not captions_only:
            header = ["filepath\ttitle"]
        else:
            header = [] if path.suffix.lower() == ".txt" else ["caption"]
        write_text_atomic(path, "".join(line + "\n" for line in header + rows[split]))
    return result


def _targets(out: Path, by_split: bool, captions_only: bool, overwrite: bool) -> dict[str, Path]:
    """The file to write for each split, after checking `out` makes sense."""
    if by_split:
        if out.suffix.lower() in (".tsv", ".txt") or out.is_file():
            raise CorpusError(
                f"{out}: with a Karpathy split file, the output is a directory "
                f"(it receives {', '.join(s + '.tsv' for s in SPLITS)})"
            )
        targets = {split: out / f"{split}.tsv" for split in SPLITS}
    else:
        allowed = (".tsv", ".txt") if captions_only else (".tsv",)
        if out.suffix.lower() not in allowed:
            raise CorpusError(f"{out}: the output file should end in {' or '.join(allowed)}")
        if out.is_dir():
            raise CorpusError(f"{out}: is a directory; name the output file")
        targets = {"all": out}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise CorpusError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} (use --overwrite to replace)"
        )
    return targets


def _load_json(path: Path) -> Any:
    """The parsed file, or a CorpusError that says where it went wrong."""
    check_regular_file(path, what="COCO JSON")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); save it as UTF-8") from None
    except RecursionError:
        raise CorpusError(f"{path}: JSON nested too deeply to read; this is not a COCO annotation file") from None
    except ValueError as e:  # e.g. an integer longer than Python's digit limit
        raise CorpusError(f"{path}: invalid JSON ({e})") from None


def _read_annotations(path: Path, by_id: dict[Any, _Image]) -> int:
    """Add the images and captions of one COCO file to `by_id`; returns captions with no image."""
    data = _load_json(path)
    entries = _get(path, data, "images", list, "the top level")
    notes = _get(path, data, "annotations", list, "the top level")
    hints = [m.group(1)] if (m := _CAPTIONS_FILE.match(path.name)) else []
    added: set[Any] = set()
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        key = _get(path, entry, "id", (int, str), where)
        file_name = _get(path, entry, "file_name", str, where)
        if key in by_id:
            raise CorpusError(f"{path}: {where} repeats image id {key!r}")
        folders = [m.group(1)] if (m := _COCO_FOLDER.match(file_name)) else []
        folders += [h for h in hints if h not in folders]
        by_id[key] = _Image(key, [file_name] + [f"{f}/{file_name}" for f in folders], [], "all")
        added.add(key)
    unmatched = 0
    for i, entry in enumerate(notes):
        where = f"annotations[{i}]"
        key = _get(path, entry, "image_id", (int, str), where)
        caption = _get(path, entry, "caption", str, where)
        if key in added:
            by_id[key].captions.append(caption)
        else:
            unmatched += 1
    return unmatched


def _read_karpathy(path: Path, annotated: dict[Any, _Image] | None) -> tuple[list[_Image], int]:
    """Images of a Karpathy file with their split; captions from `annotated` where it has them."""
    data = _load_json(path)
    entries = _get(path, data, "images", list, "the top level")
    listed: list[_Image] = []
    fallback = 0
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        filename = _get(path, entry, "filename", str, where)
        folder = entry.get("filepath") or ""
        if not isinstance(folder, str):
            raise CorpusError(f"{path}: {where}['filepath'] should be a string, found {_kind(folder)}")
        split = _get(path, entry, "split", str, where)
        if split not in KARPATHY_SPLITS:
            raise CorpusError(f"{path}: {where} has split {split!r}; expected one of {', '.join(KARPATHY_SPLITS)}")
        candidates = ([f"{folder}/{filename}"] if folder else []) + [filename]
        if annotated is not None:
            key = _get(path, entry, "cocoid", (int, str), where + " (needed to match the annotations)")
            if key in annotated:
                listed.append(_Image(key, candidates, annotated[key].captions, KARPATHY_SPLITS[split]))
                continue
        sentences = _get(path, entry, "sentences", list, where)
        captions = [_get(path, s, "raw", str, f"{where}['sentences'][{j}]") for j, s in enumerate(sentences)]
        if annotated is not None:
            fallback += len(captions)
        listed.append(_Image(entry.get("cocoid"), candidates, captions, KARPATHY_SPLITS[split]))
    return listed, fallback


def _get(path: Path, entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`entry[key]`, checked to be a JSON object holding a value of `kind`."""
    if not isinstance(entry, dict):
        raise CorpusError(f"{path}: {where} should be a JSON object, found {_kind(entry)}")
    if key not in entry:
        raise CorpusError(f"{path}: {where} has no {key!r}")
    value = entry[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool):
        wanted = " or ".join(_kind(k()) for k in kinds)
        raise CorpusError(f"{path}: {where}[{key!r}] should be {wanted}, found {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _find(images_dir: Path, candidates: Iterable[str]) -> str | None:
    """The first candidate that is a file under `images_dir`."""
    for candidate in candidates:
        if (images_dir / candidate).is_file():
            return candidate
    return None


def _relative(image: Path, folder: Path) -> str:
    """`image` relative to `folder` (absolute where no relative path exists, e.g. across drives)."""
    image_abs = os.path.abspath(image)
    try:
        return Path(os.path.relpath(image_abs, os.path.abspath(folder))).as_posix()
    except ValueError:
        return Path(image_abs).as_posix()
