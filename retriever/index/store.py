"""The on-disk index: a directory with a FAISS index, the texts and metadata, and a manifest.

    INDEX/
      manifest.json    format version, model identity, dim, count, index type and tuning, corpus hash, versions
      index.faiss      the FAISS index over L2-normalised vectors (inner product = cosine)
      texts.parquet    id (the FAISS row), text, and the corpus's other columns
      vectors.f16.npy  the exact normalised embeddings, fp16, row = id (absent with --no-vectors);
                       memory-mapped for exact re-ranking, diversity and "more like this"
      index.ivfdata    only in format 2 (IVF indexes merged by a distributed build): the inverted
                       lists on disk (faiss OnDiskInvertedLists), always memory-mapped; index.faiss
                       then holds only the quantizers and list sizes

A directory is written under a temporary name beside its target and published only when
complete (publish.py), so an interrupted build never leaves a half index that loads, and a
reader sees the old index or the new one. The manifest records each file's size (checked on
every open) and SHA-256 (checked by `verify_index`, see verify.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import IndexFormatError
from retriever.index.faiss_import import import_faiss
from retriever.index.gpu import Placement, gpu_search, place, set_gpu_params
from retriever.index.lock import BuildLock
from retriever.index.publish import check_out, new_temp_dir, publish, recover, wait_for_publish
from retriever.index.verify import check_manifest, check_scores, check_sizes, damaged, file_records

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from retriever.models.loading import LoadedModel

FORMAT_VERSION = 1
ONDISK_FORMAT_VERSION = 2  # older readers refuse it in one line instead of opening a missing list file
REFINED_FORMAT_VERSION = 3  # search_params may hold k_factor: re-rank with vectors.f16.npy (refine.py)
READABLE_FORMATS = (FORMAT_VERSION, ONDISK_FORMAT_VERSION, REFINED_FORMAT_VERSION)
MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
TEXTS_FILE = "texts.parquet"
VECTORS_FILE = "vectors.f16.npy"
IVFDATA_FILE = "index.ivfdata"
RESERVED_COLUMNS = ("id", "text")


@dataclass
class TextIndex:
    """A loaded index: search it with normalised query vectors `xq`."""

    path: Path
    manifest: dict
    faiss_index: Any  # always the CPU index; a GPU copy, if any, is in `placement`
    texts: pa.Table
    placement: Placement = field(default_factory=Placement)
    refine_vectors: Any = None  # memory-mapped exact vectors when the tuning chose re-ranking
    k_factor: int = 1
    mapped_vectors: Any = field(default=None, repr=False)  # vectors.f16.npy once mapped (False: absent)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (D, I): scores and row ids of the `k` nearest texts for each row of `xq`."""
        import numpy as np

        xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        D, I = self.faiss_search(xq, min(k, len(self)))
        check_scores(self.path, D, I)
        return D, I

    def faiss_search(self, xq: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The FAISS search itself: on the GPU copy where it can answer (k, parameters), else on the
        CPU; then, for a re-ranked IVF-PQ, `k * k_factor` candidates re-scored exactly (refine.py)."""
        if self.refine_vectors is None:
            return gpu_search(self.placement, self.faiss_index, xq, k, params)
        from retriever.index.refine import refined_search

        def search(q, n):
            return gpu_search(self.placement, self.faiss_index, q, n, params)

        return refined_search(search, xq, k, self.refine_vectors, self.k_factor, len(self))

    def rows(self, ids: list[int]) -> list[dict]:
        """The stored id, text and metadata of each row id, as dicts."""
        # One zero-copy slice per row: `take` on a many-chunk table copies whole chunks.
        return [self.texts.slice(i, 1).to_pylist()[0] for i in ids]


def write_index(
    path: str | Path,
    faiss_index: Any,
    texts: Iterable[pa.Table],
    schema: pa.Schema,
    manifest: dict,
    overwrite: bool = False,
    vectors: Iterable[np.ndarray] | None = None,
    lock: BuildLock | None = None,
    ivf_data: Path | None = None,
) -> Path:
    """Write a built FAISS index, its texts (tables conforming to `schema`) and optionally its
    exact vectors (blocks in row order, stored as one fp16 array) atomically.

    The files are written into a temporary directory beside `path`, their sizes and SHA-256 go
    into the manifest, and the directory is then published in one step (see publish.py): a
    reader sees the old index or the new one. Only an index is ever replaced (`overwrite`).

    Args:
        lock: the caller's build lock on `path`, if it holds one; otherwise one is taken here.
        ivf_data: the on-disk inverted lists of `faiss_index` (a merged IVF, see distributed.py),
            on the same filesystem; moved into the index as index.ivfdata (format 2).
    """
    faiss = import_faiss()
    import pyarrow.parquet as pq

    path = check_out(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    own_lock = BuildLock(path).acquire() if lock is None else None
    try:
        path = check_out(path, overwrite)  # again, now that no other build can change it
        recover(path)
        # The oldest format that describes the index, so older releases open what they can.
        if "k_factor" in (manifest.get("search_params") or {}):
            version = REFINED_FORMAT_VERSION
        else:
            version = ONDISK_FORMAT_VERSION if ivf_data is not None else FORMAT_VERSION
        manifest = {**manifest, "format_version": version, "count": int(faiss_index.ntotal)}
        tmp = new_temp_dir(path)
        try:
            faiss.write_index(faiss_index, str(tmp / FAISS_FILE))
            if ivf_data is not None:  # read back with IO_FLAG_ONDISK_SAME_DIR, wherever the index moves
                os.replace(ivf_data, tmp / IVFDATA_FILE)
            with pq.ParquetWriter(tmp / TEXTS_FILE, schema) as writer:
                for table in texts:
                    writer.write_table(table)
            if vectors is not None:
                _write_vectors(tmp / VECTORS_FILE, vectors, int(faiss_index.ntotal), int(faiss_index.d))
            manifest["files"] = file_records(tmp, (FAISS_FILE, TEXTS_FILE, VECTORS_FILE, IVFDATA_FILE))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
            _fsync_dir(tmp)
            publish(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if own_lock is not None:
            own_lock.release()
    return path


def _write_vectors(path: Path, blocks: Iterable[np.ndarray], count: int, d: int) -> None:
    """Stream row blocks into one fp16 .npy file (memory-mappable, no pickle)."""
    import numpy as np

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(count, d))
    row = 0
    for block in blocks:
        out[row : row + len(block)] = block
        row += len(block)
    if row != count:
        raise IndexFormatError(f"{path}: {row} vectors written for an index of {count}")
    out.flush()
    del out


def read_manifest(path: str | Path) -> dict:
    """The manifest of the index at `path`, checked for the format version and its schema."""
    path = Path(path)
    wait_for_publish(path)
    file = path / MANIFEST
    if not path.exists():
        raise IndexFormatError(f"{path}: no such index directory")
    if not path.is_dir():
        raise IndexFormatError(f"{path}: not an index directory (it is a file)")
    if not file.is_file():
        raise IndexFormatError(f"{path}: not an index (no {MANIFEST}); build one with `retriever build-index`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise damaged(path, f"{MANIFEST} cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(path, f"{MANIFEST} is not valid JSON ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(manifest, dict) and "format_version" in manifest and version not in READABLE_FORMATS:
        advice = (
            "it was written by a newer release: pip install -U caption-retriever"
            if isinstance(version, int) and version > max(READABLE_FORMATS)
            else "rebuild it with `retriever build-index`"
        )
        raise IndexFormatError(
            f"{path}: index format {version}, this retriever reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}; {advice}"
        )
    return check_manifest(manifest, path)


def _short(fingerprint: str) -> str:
    """A fingerprint shortened for a message: 'sha256:1a2b3c4d5e6f'."""
    kind, _, value = fingerprint.rpartition(":")
    return f"{kind}:{value[:12]}" if kind and len(value) > 12 else fingerprint[:40]


def check_built_with(manifest: dict, model: LoadedModel, path: str | Path, advice: str) -> None:
    """Raise IndexFormatError (ending with `advice`) unless the index at `path` was built with `model`."""
    entry = manifest.get("model")
    built_with = entry if isinstance(entry, dict) else {}
    recorded = str(built_with.get("fingerprint") or "")
    if recorded != model.fingerprint:
        name, pretrained = built_with.get("name"), built_with.get("pretrained")
        label = f"{name} ({pretrained})" if pretrained else str(name)
        if str(name) == str(model.spec):  # the same name: the weights differ, so show how
            raise IndexFormatError(
                f"{path} was built with {label} weights {_short(recorded) or 'unknown'}, "
                f"not these ({_short(model.fingerprint) or 'unknown'}); {advice}"
            )
        raise IndexFormatError(f"{path} was built with {label}, not {model.spec}; {advice}")
    if manifest.get("embedding_dim") != model.embed_dim:
        raise IndexFormatError(f"{path}: dimension {manifest.get('embedding_dim')} != model's {model.embed_dim}")


def read_index(path: str | Path, use_gpu: bool | None = None, mmap: bool | None = None) -> TextIndex:
    """Load an index, checking it against its manifest (file sizes, dimension, counts, columns).

    Args:
        path: the index directory.
        use_gpu: None moves it to the GPU when faiss has one; False keeps it on the CPU.
        mmap: memory-map the vectors instead of reading them into RAM; None does so when the
            index file is larger than half the available memory.

    Raises:
        IndexFormatError: not an index, another format, or damaged (saying what is wrong).
    """
    faiss = import_faiss()

    from retriever.index.ann import apply_search_params

    path = Path(path)
    manifest = read_manifest(path)
    for name in (FAISS_FILE, TEXTS_FILE):
        if not (path / name).is_file():
            raise damaged(path, f"incomplete index, {name} is missing")
    check_sizes(path, manifest)
    size = (path / FAISS_FILE).stat().st_size
    if size == 0:
        raise damaged(path, f"{FAISS_FILE} is empty")
    if mmap is None:
        mmap = size > 0.5 * _available_memory()
    # Inverted lists (IVF) and flat code arrays (Flat, HNSW storage) are mapped by different flags.
    ivf = str(manifest.get("faiss_factory") or "").startswith("IVF")
    flags = ((faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    ondisk = manifest.get("format_version") == ONDISK_FORMAT_VERSION or (path / IVFDATA_FILE).exists()
    if ondisk:  # on-disk lists are always mapped; IO_FLAG_MMAP on them crashes faiss, so never pass it
        if not (path / IVFDATA_FILE).is_file():
            raise damaged(path, f"incomplete index, {IVFDATA_FILE} is missing")
        flags, mmap = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY, True
    try:
        with quiet_stdout():  # faiss prints the on-disk file's new name on stdout (C printf)
            index = faiss.read_index(str(path / FAISS_FILE), flags)
    except (RuntimeError, MemoryError, ValueError, OverflowError) as e:
        raise damaged(path, f"{FAISS_FILE} cannot be read ({_faiss_reason(e)})") from None
    count, d = manifest["count"], manifest["embedding_dim"]
    if index.d != d:
        raise damaged(path, f"{FAISS_FILE} holds {index.d}-dimensional vectors, the manifest says {d}")
    if index.ntotal != count:
        raise damaged(path, f"{FAISS_FILE} holds {index.ntotal} vectors, the manifest says {count}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise damaged(path, f"{FAISS_FILE} does not rank by inner product")
    texts = _read_texts(path, count)
    params = manifest.get("search_params") or {}
    try:
        apply_search_params(index, params)
    except RuntimeError as e:
        raise damaged(path, f"manifest.json's search_params do not fit {FAISS_FILE} ({_faiss_reason(e)})") from None
    # Only what faiss-gpu supports goes to the GPU (gpu.py); a memory-mapped index stays mapped.
    placement = place(faiss, index) if use_gpu is not False and not mmap else Placement(reason="kept on the CPU")
    set_gpu_params(faiss, placement, params)
    refine_vectors = None
    if "k_factor" in params:
        refine_vectors = map_vectors(path, count, d)
        if refine_vectors is None:
            raise damaged(path, f"its search_params re-rank with {VECTORS_FILE}, which is missing")
    return TextIndex(path, manifest, index, texts, placement, refine_vectors, int(params.get("k_factor", 1)))


def map_vectors(path: Path, count: int, d: int) -> Any | None:
    """The index's exact vectors (vectors.f16.npy) memory-mapped and checked against the
    manifest's count and dimension, or None when the index was built without them."""
    import numpy as np

    if not (path / VECTORS_FILE).is_file():
        return None
    try:
        vectors = np.load(path / VECTORS_FILE, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise damaged(path, f"{VECTORS_FILE} cannot be read ({str(e)[:160]})") from None
    if vectors.shape != (count, d) or vectors.dtype != np.float16:
        raise damaged(
            path, f"{VECTORS_FILE} holds {vectors.dtype} {vectors.shape}, the manifest says float16 ({count}, {d})"
        )
    return vectors


def _read_texts(path: Path, count: int) -> pa.Table:
    """texts.parquet, checked: `count` rows, ids 0..count-1 in order, non-null string texts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        texts = pq.read_table(path / TEXTS_FILE, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise damaged(path, f"{TEXTS_FILE} cannot be read ({str(e).splitlines()[0][:160]})") from None
    for name, check, kind in (
        ("id", pa.types.is_integer, "integer"),
        ("text", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    ):
        if name not in texts.column_names:
            raise damaged(path, f"{TEXTS_FILE} has no {name!r} column (it has {', '.join(texts.column_names[:6])})")
        if not check(texts.schema.field(name).type):
            raise damaged(path, f"{TEXTS_FILE}'s {name!r} column holds {texts.schema.field(name).type}, not {kind}s")
        if texts.column(name).null_count:
            raise damaged(path, f"{TEXTS_FILE}'s {name!r} column has {texts.column(name).null_count} null values")
    if texts.num_rows != count:
        raise damaged(path, f"{TEXTS_FILE} holds {texts.num_rows} rows, the manifest says {count}")
    ids = texts.column("id").to_numpy()
    if not np.array_equal(ids, np.arange(count)):
        first = int(np.flatnonzero(ids != np.arange(count))[0])
        raise damaged(path, f"{TEXTS_FILE}'s row {first} has id {ids[first]}; ids must run 0..{count - 1} in order")
    return texts


@contextmanager
def quiet_stdout():
    """Discard what C code prints on stdout meanwhile (faiss's on-disk lists print their file's
    name and size): stdout may be a --json document, and -q means quiet."""
    import ctypes
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    libc = ctypes.CDLL(None)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        libc.fflush(None)
        os.dup2(null, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _faiss_reason(error: BaseException) -> str:
    """The useful line of a faiss exception (they span several lines and name C++ sources)."""
    import re

    text = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", " ".join(str(error).split()))
    return text[:160] or type(error).__name__


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
