"""Telling a damaged index from a good one: the manifest's schema, the files' sizes (checked on
every open, cheap) and their SHA-256 (checked by `retriever info --verify` and `verify_index`).

The manifest records, for each file of the index, its size and SHA-256:

    "files": {"index.faiss": {"bytes": 131117, "sha256": "..."}, "texts.parquet": {...}, ...}

Indexes written before this was recorded still open; they cannot be verified.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from retriever.errors import IndexFormatError

REBUILD = "rebuild it with build-index ... --overwrite"
SCORE_SLACK = 1e-3

# Every manifest field that is read when opening or searching an index, with its type(s).
_REQUIRED: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "count": (int,),
    "embedding_dim": (int,),
    "model": (dict,),
}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "faiss_factory": (str,),
    "index_type": (str,),
    "metric": (str,),
    "search_params": (dict,),
    "files": (dict,),
    "tuning": (dict,),
    "corpus": (dict,),
    "build": (dict,),
    "created": (str,),
    "versions": (dict,),
}
_MODEL_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "pretrained": (str, type(None)),
    "fingerprint": (str,),
}


def damaged(path: str | Path, what: str) -> IndexFormatError:
    """The one error for a damaged index: what is wrong, and how to recover."""
    return IndexFormatError(f"{path}: damaged index: {what} ({REBUILD})")


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", dict: "an object", type(None): "null", float: "a number"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def check_manifest(manifest: Any, path: str | Path) -> dict:
    """Raise IndexFormatError (naming the field) unless `manifest` has every field an index
    needs, of the right type; returns it."""
    if not isinstance(manifest, dict):
        raise damaged(path, f"manifest.json holds a JSON {type(manifest).__name__}, not an object")
    for fields, required in ((_REQUIRED, True), (_OPTIONAL, False)):
        for key, types in fields.items():
            if key not in manifest:
                if required:
                    raise damaged(path, f"manifest.json has no {key!r}")
                continue
            if not _is(manifest[key], types) and not (not required and manifest[key] is None):
                raise damaged(path, f"manifest.json's {key!r} is {manifest[key]!r}, not {_type_name(types)}")
    for key, types in _MODEL_FIELDS.items():
        value = manifest["model"].get(key)
        if not _is(value, types):
            raise damaged(path, f"manifest.json's model {key!r} is {value!r}, not {_type_name(types)}")
    if manifest["count"] < 0 or manifest["embedding_dim"] < 1:
        raise damaged(path, f"manifest.json says count {manifest['count']}, dimension {manifest['embedding_dim']}")
    for name, value in (manifest.get("search_params") or {}).items():
        if name not in ("nprobe", "efSearch", "k_factor") or not _is(value, (int,)) or value < 1:
            raise damaged(
                path,
                f"manifest.json's search parameter {name!r} is {value!r}, "
                "not a positive integer nprobe, efSearch or k_factor",
            )
    for name, record in (manifest.get("files") or {}).items():
        if not (
            isinstance(record, dict) and _is(record.get("bytes"), (int,)) and isinstance(record.get("sha256"), str)
        ):
            raise damaged(path, f"manifest.json's record of {name!r} is {record!r}, not {{bytes, sha256}}")
    return manifest


def check_scores(path: str | Path, D: Any, I: Any) -> None:
    """Raise a damaged-index error if a search returned a score no normalised pair can have.

    Index vectors and queries are unit length, so inner products lie in [-1, 1] (fp16 storage
    adds about 1e-4); a score above 1 + 1e-3, or NaN, comes from corrupt stored vectors.
    """
    import numpy as np

    D, I = np.asarray(D), np.asarray(I)
    bad = (I >= 0) & ~(np.abs(D) <= 1 + SCORE_SLACK)
    if bad.any():
        score = float(D[bad].flat[0])
        raise damaged(
            path,
            f"a search scored {score:.3g}, impossible for normalised vectors (at most 1); "
            "`retriever info --verify` names the damaged file",
        )


def sha256_of(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def file_records(directory: Path, names: Iterable[str]) -> dict[str, dict]:
    """Size and SHA-256 of each named file in `directory` that exists, for the manifest."""
    return {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
        for name in names
        if (directory / name).is_file()
    }


def check_sizes(path: Path, manifest: dict) -> None:
    """Raise a damaged-index error if a recorded file is missing or has another size (no reading)."""
    for name, record in (manifest.get("files") or {}).items():
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise damaged(path, f"{name} is missing") from None
        except OSError as e:
            raise damaged(path, f"{name} cannot be read ({e.strerror})") from None
        if size != record["bytes"]:
            raise damaged(path, f"{name} is {size:,} bytes, the manifest records {record['bytes']:,}")


def can_verify(manifest: dict) -> bool:
    """Whether the manifest records the files' hashes (indexes built before that do not)."""
    return bool(manifest.get("files"))


def verify_index(path: str | Path) -> None:
    """Check every file of the index at `path` against the SHA-256 and size in its manifest.

    Reads every byte (seconds per GB). An index built before hashes were recorded passes after
    its manifest and files are checked for presence; `can_verify(read_manifest(path))` tells.

    Raises:
        IndexFormatError: naming the first damaged file, or the manifest's problem.
    """
    from retriever.index.store import read_manifest

    path = Path(path)
    manifest = read_manifest(path)
    check_sizes(path, manifest)
    for name, record in (manifest.get("files") or {}).items():
        try:
            digest = sha256_of(path / name)
        except OSError as e:
            raise damaged(path, f"{name} cannot be read ({e.strerror})") from None
        if digest != record["sha256"]:
            raise damaged(
                path,
                f"{name} has SHA-256 {digest[:12]}..., the manifest records "
                f"{record['sha256'][:12]}... (the file changed after the build)",
            )
