"""The on-disk index: a directory with a FAISS index, the texts and metadata, and a manifest.

    INDEX/
      manifest.json    format version, model identity, dim, count, index type and tuning, corpus hash, versions
      index.faiss      the FAISS index over L2-normalised vectors (inner product = cosine)
      texts.parquet    id (the FAISS row), text, and the corpus's other columns
      vectors.f16.npy  the exact normalised embeddings, fp16, row = id (absent with --no-vectors);
                       memory-mapped for exact re-ranking, diversity and "more like this"

A directory is written under a temporary name beside its target and renamed into place only
when complete, so an interrupted build never leaves a half index that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from retriever.errors import IndexFormatError
from retriever.index.faiss_import import import_faiss

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from retriever.models.loading import LoadedModel

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
TEXTS_FILE = "texts.parquet"
VECTORS_FILE = "vectors.f16.npy"
RESERVED_COLUMNS = ("id", "text")


@dataclass
class TextIndex:
    """A loaded index: search it with normalised query vectors `xq`."""

    path: Path
    manifest: dict
    faiss_index: Any
    texts: pa.Table

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (D, I): scores and row ids of the `k` nearest texts for each row of `xq`."""
        import numpy as np

        xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        return self.faiss_index.search(xq, min(k, len(self)))

    def rows(self, ids: list[int]) -> list[dict]:
        """The stored id, text and metadata of each row id, as dicts."""
        # One zero-copy slice per row: `take` on a many-chunk table copies whole chunks.
        return [self.texts.slice(i, 1).to_pylist()[0] for i in ids]


def write_index(path: str | Path, faiss_index: Any, texts: Iterable[pa.Table], schema: pa.Schema,
                manifest: dict, overwrite: bool = False, vectors: Iterable[np.ndarray] | None = None) -> Path:
    """Write a built FAISS index, its texts (tables conforming to `schema`) and optionally its
    exact vectors (blocks in row order, stored as one fp16 array) atomically."""
    faiss = import_faiss()
    import pyarrow.parquet as pq

    path = Path(path)
    if path.exists() and not overwrite:
        raise IndexFormatError(f"{path} already exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {**manifest, "format_version": FORMAT_VERSION, "count": int(faiss_index.ntotal)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an index is an ordinary directory
    try:
        faiss.write_index(faiss_index, str(tmp / FAISS_FILE))
        with pq.ParquetWriter(tmp / TEXTS_FILE, schema) as writer:
            for table in texts:
                writer.write_table(table)
        if vectors is not None:
            _write_vectors(tmp / VECTORS_FILE, vectors, int(faiss_index.ntotal), int(faiss_index.d))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_vectors(path: Path, blocks: Iterable[np.ndarray], count: int, d: int) -> None:
    """Stream row blocks into one fp16 .npy file (memory-mappable, no pickle)."""
    import numpy as np

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(count, d))
    row = 0
    for block in blocks:
        out[row:row + len(block)] = block
        row += len(block)
    if row != count:
        raise IndexFormatError(f"{path}: {row} vectors written for an index of {count}")
    out.flush()
    del out


def read_manifest(path: str | Path) -> dict:
    """The manifest of the index at `path`, checked for the format version."""
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise IndexFormatError(f"{path}: no such index directory")
    if not file.is_file():
        raise IndexFormatError(f"{path}: not an index (no {MANIFEST}); build one with `retriever build-index`")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{file}: unreadable manifest ({e})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{path}: index format {version}, this retriever reads format {FORMAT_VERSION}; rebuild it")
    return manifest


def check_built_with(manifest: dict, model: LoadedModel, path: str | Path, advice: str) -> None:
    """Raise IndexFormatError (ending with `advice`) unless the index at `path` was built with `model`."""
    built_with = manifest.get("model") or {}
    if built_with.get("fingerprint") != model.fingerprint:
        name, pretrained = built_with.get("name"), built_with.get("pretrained")
        label = f"{name} ({pretrained})" if pretrained else str(name)
        raise IndexFormatError(f"{path} was built with {label}, not {model.spec}; {advice}")
    if manifest.get("embedding_dim") != model.embed_dim:
        raise IndexFormatError(f"{path}: dimension {manifest.get('embedding_dim')} != model's {model.embed_dim}")


def read_index(path: str | Path, use_gpu: bool | None = None, mmap: bool | None = None) -> TextIndex:
    """Load an index.

    Args:
        path: the index directory.
        use_gpu: None moves it to the GPU when faiss has one; False keeps it on the CPU.
        mmap: memory-map the vectors instead of reading them into RAM; None does so when the
            index file is larger than half the available memory.
    """
    faiss = import_faiss()
    import pyarrow.parquet as pq

    from retriever.index.ann import apply_search_params

    path = Path(path)
    manifest = read_manifest(path)
    for name in (FAISS_FILE, TEXTS_FILE):
        if not (path / name).is_file():
            raise IndexFormatError(f"{path}: incomplete index, {name} is missing")
    if mmap is None:
        mmap = (path / FAISS_FILE).stat().st_size > 0.5 * _available_memory()
    # Inverted lists (IVF) and flat code arrays (Flat, HNSW storage) are mapped by different flags.
    ivf = str(manifest.get("faiss_factory", "")).startswith("IVF")
    flags = ((faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    index = faiss.read_index(str(path / FAISS_FILE), flags)
    texts = pq.read_table(path / TEXTS_FILE, memory_map=True)
    if index.ntotal != manifest["count"] or texts.num_rows != manifest["count"]:
        raise IndexFormatError(f"{path}: corrupt index ({index.ntotal} vectors, {texts.num_rows} texts, "
                               f"manifest says {manifest['count']})")
    if use_gpu is not False and not mmap and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    apply_search_params(index, manifest.get("search_params") or {})
    return TextIndex(path, manifest, index, texts)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _fsync_dir(directory: Path) -> None:
    for entry in directory.iterdir():
        with open(entry, "rb") as f:
            os.fsync(f.fileno())
