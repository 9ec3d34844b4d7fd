"""Label tables for `interrogate`: lists of terms (artists, mediums, flavors...) embedded once per model.

A table is an ordinary index directory built by `build_index` (exact, flat), so it carries the
manifest that ties it to one model. The built-in tables come from clip-interrogator's word lists
(its package data only; none of its code is imported) and are cached per model and list:

    CACHE/tables/<model>-<fingerprint hash>/<table>-<list hash>/    (an index directory)

CACHE is `$RETRIEVER_CACHE`, else `$XDG_CACHE_HOME/retriever`, else `~/.cache/retriever`. A
changed list or another model gets a new directory; an unchanged one is never embedded again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retriever.errors import IndexFormatError, MissingExtraError, RetrieverError
from retriever.index.store import MANIFEST, TextIndex, check_built_with, read_index, read_manifest
from retriever.models.loading import LoadedModel

if TYPE_CHECKING:
    import numpy as np

# clip-interrogator's tables, in its order; `negative` is only used by negative mode.
BUILTIN_TABLES = ("artists", "flavors", "mediums", "movements", "trendings", "negative")
CLIP_INTERROGATOR_INSTALL = "pip install --no-deps clip-interrogator==0.6.0"
# The sites behind clip-interrogator's "trending" phrases (clip_interrogator.py, load_clip_model).
SITES = (
    "Artstation",
    "behance",
    "cg society",
    "cgsociety",
    "deviantart",
    "dribble",
    "flickr",
    "instagram",
    "pexels",
    "pinterest",
    "pixabay",
    "pixiv",
    "polycount",
    "reddit",
    "shutterstock",
    "tumblr",
    "unsplash",
    "zbrush central",
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_REBUILD = "a label table must be built with the interrogating model (rebuild it with --model)"


@dataclass(frozen=True)
class Term:
    """A label chosen for a prompt: its text, the table it came from, and its cosine to the image."""

    text: str
    category: str
    score: float


@dataclass
class LabelTable:
    """A loaded table: labels in index row order, searched by image-label cosine."""

    name: str
    index: TextIndex
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def rank(self, image_features: np.ndarray, top_count: int = 1, reverse: bool = False) -> list[Term]:
        """The `top_count` labels most similar to the image (least similar with `reverse`), best first.

        Exact over the whole table (a flat index): clip-interrogator ranks tables over 2,048
        labels chunk by chunk, keeping a share of each chunk, which can miss a chunk's runners-up.
        """
        import numpy as np

        if top_count < 1 or not self.labels:
            return []
        sign = -1.0 if reverse else 1.0
        D, I = self.index.search(sign * np.asarray(image_features, dtype=np.float32), top_count)
        return [Term(self.labels[int(i)], self.name, sign * float(d)) for d, i in zip(D[0], I[0]) if i >= 0]


def rank_tables(
    tables: Sequence[LabelTable], image_features: np.ndarray, top_count: int, reverse: bool = False
) -> list[Term]:
    """The best `top_count` labels of several tables ranked together (clip-interrogator's merged
    table); a label in two tables counts once, with its first table."""
    merged: dict[str, Term] = {}
    for table in tables:
        for term in table.rank(image_features, top_count, reverse=reverse):
            merged.setdefault(term.text, term)
    ordered = sorted(merged.values(), key=lambda t: t.score, reverse=not reverse)
    return ordered[:top_count]


def cache_dir(override: str | Path | None = None) -> Path:
    """The cache root: `override`, `$RETRIEVER_CACHE`, `$XDG_CACHE_HOME/retriever` or `~/.cache/retriever`."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("RETRIEVER_CACHE"):
        return Path(os.environ["RETRIEVER_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "retriever"


def list_hash(labels: Sequence[str]) -> str:
    """Hex SHA-256 of a label list (one label per line)."""
    return hashlib.sha256("\n".join(labels).encode("utf-8", "surrogatepass")).hexdigest()


def table_dir(model: LoadedModel, name: str, labels: Sequence[str], root: str | Path | None = None) -> Path:
    """Where the table `name` with these labels lives in the cache for `model`."""
    check_table_name(name)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.spec.name.removeprefix("local-dir:")).strip("_.")[-40:] or "model"
    model_key = hashlib.sha256(model.fingerprint.encode()).hexdigest()[:12]
    return cache_dir(root) / "tables" / f"{slug}-{model_key}" / f"{name}-{list_hash(labels)[:16]}"


def parse_builtin(names: str | Sequence[str]) -> tuple[str, ...]:
    """Built-in table names from `all`, `none` or a comma-separated list (or a sequence), checked."""
    if isinstance(names, str):
        names = {"all": ",".join(BUILTIN_TABLES), "none": ""}.get(names.strip().lower(), names)
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILTIN_TABLES]
    if unknown:
        raise RetrieverError(
            f"unknown built-in table {unknown[0]!r}; choose from {', '.join(BUILTIN_TABLES)}, all or none"
        )
    return tuple(dict.fromkeys(names))


def check_table_name(name: str) -> str:
    """`name` if it can name a table (letters, digits, `_`, `-`, `.`), else a RetrieverError."""
    if not _NAME.match(name) or name.startswith("."):
        raise RetrieverError(f"bad table name {name!r}: use letters, digits, '_', '-' or '.'")
    return name


def data_dir() -> Path:
    """clip-interrogator's data folder, found without importing its code (which needs transformers)."""
    spec = importlib.util.find_spec("clip_interrogator")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / "data" / "flavors.txt").is_file():
            return Path(location) / "data"
    raise MissingExtraError(
        f"the built-in label tables are clip-interrogator's word lists: {CLIP_INTERROGATOR_INSTALL} "
        "(or pass your own tables with --table NAME=PATH)"
    )


def read_list(path: str | Path) -> list[str]:
    """Labels from a text file, one per line, stripped; empty lines dropped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise RetrieverError(f"{path}: cannot read the label list ({e.strerror or e})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def builtin_labels(name: str) -> list[str]:
    """The labels of a built-in table, formed the way clip-interrogator forms them.

    `artists` is "by X" and "inspired by X" for each artist; `trendings` is each site, "trending
    on X", "featured on X" and "X contest winner"; the others are the lists as they are.
    """
    if name not in BUILTIN_TABLES:
        raise RetrieverError(f"unknown built-in table {name!r}; choose from {', '.join(BUILTIN_TABLES)}")
    if name == "trendings":
        return [
            *SITES,
            *(f"trending on {s}" for s in SITES),
            *(f"featured on {s}" for s in SITES),
            *(f"{s} contest winner" for s in SITES),
        ]
    raw = read_list(data_dir() / f"{name}.txt")
    if name == "artists":
        return [f"by {a}" for a in raw] + [f"inspired by {a}" for a in raw]
    return raw


@dataclass
class TableStatus:
    """Where a cached table is, how many labels it holds, and whether this call embedded it."""

    name: str
    path: Path
    count: int
    built: bool
    seconds: float

    def as_dict(self) -> dict:
        return {
            "table": self.name,
            "path": str(self.path),
            "count": self.count,
            "built": self.built,
            "seconds": round(self.seconds, 2),
        }


def ensure_table(
    name: str,
    labels: Sequence[str],
    model: LoadedModel,
    root: str | Path | None = None,
    batch_size: int = 256,
    show_progress_bar: bool | None = None,
    on_embed: Callable[[str, int], None] | None = None,
) -> TableStatus:
    """The cached table for `labels` under `model`, embedding it first if it is not cached yet.

    Args:
        name: the table's name (also its category in interrogation results).
        labels: the texts; empty ones and duplicates are dropped, as by `build_index`.
        model: the model to embed with.
        root: the cache root (default: see `cache_dir`).
        batch_size: texts per forward pass.
        show_progress_bar: None shows one on stderr when it is a terminal.
        on_embed: called with the name and label count just before a table is embedded.
    """
    from retriever.index.build import build_index

    start = time.perf_counter()
    labels = list(labels)
    if not any(label.strip() for label in labels):
        raise RetrieverError(f"table {name!r} has no labels")
    path = table_dir(model, name, labels, root)
    if (path / MANIFEST).is_file():
        try:
            manifest = read_manifest(path)
            check_built_with(manifest, model, path, _REBUILD)
            return TableStatus(name, path, int(manifest["count"]), False, time.perf_counter() - start)
        except IndexFormatError:
            pass  # an old format or a damaged entry: embed it again
    if on_embed:
        on_embed(name, len(labels))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        corpus = Path(tmp) / f"{name}.txt"
        corpus.write_text("\n".join(label.replace("\n", " ") for label in labels) + "\n", encoding="utf-8")
        try:
            result = build_index(
                corpus,
                path,
                model,
                batch_size=batch_size,
                overwrite=True,
                index_type="flat",
                show_progress_bar=show_progress_bar,
            )
        except IndexFormatError:
            if (path / MANIFEST).is_file():  # another process finished the same table meanwhile
                return TableStatus(name, path, int(read_manifest(path)["count"]), False, time.perf_counter() - start)
            raise
    return TableStatus(name, path, result.report.kept, True, time.perf_counter() - start)


def ensure_builtin_tables(
    model: LoadedModel,
    names: Sequence[str] = BUILTIN_TABLES,
    root: str | Path | None = None,
    batch_size: int = 256,
    show_progress_bar: bool | None = None,
    on_embed: Callable[[str, int], None] | None = None,
) -> list[TableStatus]:
    """Embed (once per model and list) clip-interrogator's tables into the cache; see `ensure_table`."""
    return [
        ensure_table(name, builtin_labels(name), model, root, batch_size, show_progress_bar, on_embed) for name in names
    ]


def load_table(name: str, path: str | Path, model: LoadedModel) -> LabelTable:
    """Open a table: an index directory built with `model` (any index type; flat ones rank exactly).

    Raises:
        IndexFormatError: not an index, or built with another model.
    """
    check_table_name(name)
    path = Path(path)
    check_built_with(read_manifest(path), model, path, _REBUILD)
    index = read_index(path, use_gpu=False)
    labels = [str(t) for t in index.texts.column("text").to_pylist()]
    return LabelTable(name, index, labels)


def open_table(
    name: str,
    path: str | Path,
    model: LoadedModel,
    root: str | Path | None = None,
    batch_size: int = 256,
    show_progress_bar: bool | None = None,
    on_embed: Callable[[str, int], None] | None = None,
) -> LabelTable:
    """A user's table: an index directory, or a text file of labels (one a line, embedded once and cached)."""
    path = Path(path)
    if path.is_file():
        status = ensure_table(name, read_list(path), model, root, batch_size, show_progress_bar, on_embed)
        path = status.path
    elif not path.exists():
        raise RetrieverError(f"table {name!r}: {path} does not exist (give an index directory or a .txt list)")
    return load_table(name, path, model)
