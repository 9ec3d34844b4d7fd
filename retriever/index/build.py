"""Building an index: stream a corpus, embed it chunk by chunk into shards, then assemble the index.

Memory during embedding is bounded by `chunk_size`, not by the corpus. Every finished chunk is
a shard on disk (see `shards.py`), so a build stopped by Ctrl-C, kill -9 or a power cut resumes
from the last complete shard when the same command is run again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from retriever.corpus.reader import BadRow, CorpusReport, check_corpus_file, count_rows, iter_corpus
from retriever.errors import IndexFormatError, RetrieverError
from retriever.index.faiss_import import import_faiss
from retriever.index.lock import BuildLock
from retriever.index.publish import check_out, recover
from retriever.index.shards import ShardDir
from retriever.index.store import RESERVED_COLUMNS, write_index
from retriever.models.encoder import Encoder
from retriever.models.loading import LoadedModel, sha256_file
from retriever.progress import progress

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from retriever.index.distributed import PartedRead, RayOptions

DEFAULT_CHUNK_SIZE = 65_536
TUNING_QUERIES = 1_000
ENGINES = ("local", "ray")


@dataclass
class BuildResult:
    """What a build did: where the index is, corpus counts, index choice, and timings."""

    path: Path
    report: CorpusReport
    seconds: float
    embedded: int = 0
    resumed_shards: int = 0
    index: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "index": str(self.path),
            **self.report.as_dict(),
            "embedded": self.embedded,
            "resumed_shards": self.resumed_shards,
            **self.index,
            "seconds": round(self.seconds, 2),
        }


def build_index(
    corpus_path: str | Path,
    out: str | Path,
    model: LoadedModel,
    column: str | None = None,
    strict: bool = False,
    batch_size: int = 256,
    overwrite: bool = False,
    show_progress_bar: bool | None = None,
    on_bad_row: Callable[[BadRow], None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    index_type: str = "auto",
    max_memory: int | None = None,
    recall_target: float = 0.95,
    use_gpu: bool | None = None,
    store_vectors: bool = True,
    engine: str = "local",
    ray: RayOptions | None = None,
) -> BuildResult:
    """Embed every usable text of a corpus file into an index directory at `out`.

    Args:
        corpus_path: `.txt`, `.tsv`, `.csv`, `.parquet` or `.jsonl` (see `iter_corpus`).
        out: the index directory to create.
        model: the model to embed with; queries must later use the same one.
        column: the text column; auto-detected by default.
        strict: make bad rows fatal.
        batch_size: texts per forward pass.
        overwrite: replace an existing index at `out` (only an index: any other folder is refused).
        show_progress_bar: None shows one on stderr when it is a terminal.
        on_bad_row: called with each skipped bad row.
        chunk_size: texts per shard; bounds memory while embedding.
        index_type: auto, flat, hnsw, ivf or ivfpq (see `ann.plan_index`).
        max_memory: bytes the index may take in memory (None: no limit).
        recall_target: recall@10 against exact search that approximate indexes are tuned to.
        use_gpu: train and add on the GPU when faiss has one (None), or never (False).
        store_vectors: keep the exact fp16 vectors beside the index (`vectors.f16.npy`: 2 bytes
            per dimension per text) for exact re-ranking, diversity and "more like this".
        engine: `local` embeds in this process; `ray` on a Ray actor pool (`ray` says where and how
            wide), which also fills IVF indexes in parallel and merges them on disk (distributed.py).

    Raises:
        IndexFormatError: `out` is not an index (or exists without `overwrite`), another build
            holds its lock, or the files cannot be written.
        CorpusError, RetrieverError: an unreadable corpus, or an index type that cannot be built.
    """
    from retriever.index.ann import plan_index

    check_corpus_file(corpus_path)  # before hashing: a FIFO or /dev/zero would never end
    import_faiss()  # before hours of embedding, not after
    if engine not in ENGINES:
        raise RetrieverError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "ray":
        from retriever.index.distributed import RayOptions, import_ray

        import_ray()  # a missing extra is one line, before anything else
        ray = ray or RayOptions()
    start = time.perf_counter()
    out = check_out(out, overwrite)
    rows = count_rows(corpus_path)
    if rows is not None:  # the index must be buildable from at most this many texts: say so now
        plan_index(rows + 1, model.embed_dim, index_type, max_memory, at_most=True)  # +1: no final newline
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with BuildLock(out) as lock, _engine_session(ray if engine == "ray" else None):
            out = check_out(out, overwrite)  # again, now that no other build can change it
            recover(out)
            return _build_locked(
                corpus_path,
                out,
                model,
                lock,
                rows,
                start,
                column=column,
                strict=strict,
                batch_size=batch_size,
                overwrite=overwrite,
                show_progress_bar=show_progress_bar,
                on_bad_row=on_bad_row,
                chunk_size=chunk_size,
                index_type=index_type,
                max_memory=max_memory,
                recall_target=recall_target,
                use_gpu=use_gpu,
                store_vectors=store_vectors,
                ray=ray if engine == "ray" else None,
            )
    except OSError as e:
        where = e.filename or out
        raise IndexFormatError(
            f"{where}: {e.strerror or e} (while building {out}); free space or fix "
            "permissions, then run the same command to resume"
        ) from None


def _build_locked(
    corpus_path: str | Path,
    out: Path,
    model: LoadedModel,
    lock: BuildLock,
    rows: int | None,
    start: float,
    *,
    column: str | None,
    strict: bool,
    batch_size: int,
    overwrite: bool,
    show_progress_bar: bool | None,
    on_bad_row: Callable[[BadRow], None] | None,
    chunk_size: int,
    index_type: str,
    max_memory: int | None,
    recall_target: float,
    use_gpu: bool | None,
    store_vectors: bool,
    ray: RayOptions | None,
) -> BuildResult:
    """`build_index` once the build lock on `out` is held (`ray`: on a Ray cluster)."""
    from retriever.index.ann import plan_index

    corpus_sha = sha256_file(corpus_path)
    state = {"corpus_sha256": corpus_sha, "model": model.fingerprint, "column": column, "chunk_size": chunk_size}
    shards, _ = ShardDir.open(out, state)
    done_before = shards.done()
    report = CorpusReport()
    encoder = Encoder(model)
    embedded = 0
    # Chunk N+1 is read and tokenized (in a thread) while chunk N is encoded, so the model does
    # not wait on the tokenizer; at most two chunks are in memory. A Ray build embeds on its actors.
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
    with tokenizing, progress(rows, "embedding", "texts", show_progress_bar) as advance:
        if ray is not None:
            from retriever.index.distributed import embed_shards

            parted = _parted_read(corpus_path, column, rows, strict, report, on_bad_row, chunk_size)
            # .csv, or a corpus of one chunk: read on the driver
            chunks = parted or _numbered_chunks(corpus_path, column, strict, report, on_bad_row, chunk_size)
            number, embedded, done_before = embed_shards(chunks, chunk_size, shards, model, ray, batch_size, advance)
        else:
            number, embedded = _embed_locally(
                corpus_path,
                column,
                strict,
                report,
                on_bad_row,
                chunk_size,
                done_before,
                encoder,
                batch_size,
                shards,
                tokenizing,
                advance,
            )
    count = number
    n, d = report.kept, model.embed_dim
    plan = plan_index(n, d, index_type, max_memory)
    shards.check(count, d)
    fill, ivf_data = None, None
    if ray is not None and plan.factory.startswith("IVF"):
        from retriever.index.distributed import fill_ivf, import_ray, plan_workers

        workers = plan_workers(import_ray(), ray)[0]

        def fill(index, sizes):
            nonlocal ivf_data
            index, ivf_data = fill_ivf(index, shards, sizes, workers)
            return index

    faiss_index, tuning = _assemble(shards, count, plan, d, recall_target, use_gpu, fill, store_vectors)
    manifest = {
        "model": model.describe(),
        "embedding_dim": d,
        "index_type": plan.index_type,
        "faiss_factory": plan.factory,
        "metric": "inner_product",
        "search_params": tuning.params,
        "tuning": {
            "recall_at_10": round(tuning.recall_at_10, 4),
            "recall_target": recall_target,
            "queries": tuning.queries,
        }
        if plan.tune
        else None,
        "corpus": {"path": str(Path(corpus_path).resolve()), "sha256": corpus_sha, **report.as_dict()},
        "build": {
            "chunk_size": chunk_size,
            "shards": count,
            "max_memory": max_memory,
            "engine": "ray" if ray is not None else "local",
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    schema = _unified_schema([t.schema for t in shards.tables(count)])
    path = write_index(
        out,
        faiss_index,
        (_conform(t, schema) for t in shards.tables(count)),
        schema,
        manifest,
        overwrite=overwrite,
        lock=lock,
        ivf_data=ivf_data,
        vectors=(shards.vectors(i) for i in range(count)) if store_vectors else None,
    )
    shards.remove()
    index_info = {"index_type": plan.index_type, "search_params": tuning.params}
    if plan.tune:
        index_info["recall_at_10"] = round(tuning.recall_at_10, 4)
    return BuildResult(path, report, time.perf_counter() - start, embedded, min(done_before, count), index_info)


def _embed_locally(
    corpus_path,
    column,
    strict,
    report,
    on_bad_row,
    chunk_size: int,
    done_before: int,
    encoder,
    batch_size: int,
    shards: ShardDir,
    tokenizing: ThreadPoolExecutor,
    advance: Callable[[int], None],
) -> tuple[int, int]:
    """Embed the corpus chunk by chunk into `shards`, skipping the first `done_before` chunks
    (written by an earlier run). Returns (chunks seen, texts embedded now)."""
    chunk: list[tuple[str, dict]] = []
    pending: list[tuple[int, list[tuple[str, dict]], Future]] = []  # a chunk waiting to be encoded
    number = 0
    rows_seen = 0
    embedded = 0

    def encode_pending() -> None:
        nonlocal embedded
        if pending:
            at, items, tokens = pending.pop()
            vectors = encoder.encode_tokens(
                tokens.result(), batch_size=batch_size, show_progress_bar=False, on_batch=advance
            )
            shards.write(at, vectors, _table(items, first_id=at * chunk_size))
            embedded += len(items)

    def flush() -> None:
        nonlocal number, rows_seen
        if number >= done_before:
            items = list(chunk)
            future = tokenizing.submit(encoder.tokenize, [t for t, _ in items])
            encode_pending()
            pending.append((number, items, future))
        else:
            advance(len(chunk))
        consumed = report.rows + len(report.bad_rows)
        advance(consumed - rows_seen - len(chunk))  # skipped empty/duplicate/bad rows
        rows_seen = consumed
        number += 1
        chunk.clear()

    try:
        for item in iter_corpus(corpus_path, column=column, strict=strict, report=report, on_bad_row=on_bad_row):
            chunk.append(item)
            if len(chunk) == chunk_size:
                flush()
        if chunk:
            flush()
        encode_pending()
    finally:
        for _, _, future in pending:  # stopped early (Ctrl-C, a bad row): drop the tokenizing
            future.cancel()
    return number, embedded


def _assemble(
    shards: ShardDir,
    count: int,
    plan,
    d: int,
    recall_target: float,
    use_gpu: bool | None,
    fill: Callable | None = None,
    store_vectors: bool = False,
):
    """Train (on a random sample across all shards), fill and tune the FAISS index from the shards.

    `fill(index, sizes)` returns the trained `index` filled (the distributed build's parallel add
    and on-disk merge); by default the shards are added here, in order. With `store_vectors`, an
    IVF-PQ index is tuned to re-rank its candidates with them (refine.py).
    """
    faiss = import_faiss()
    import numpy as np

    from retriever.index.ann import TuneResult, exact_neighbors, new_index, perturbed_queries, train_sample_size, tune
    from retriever.index.gpu import training_quantizer

    index = new_index(plan, d)
    sizes = [len(shards.vectors(i)) for i in range(count)]
    n = sum(sizes)
    rng = np.random.default_rng(0)
    train_n = train_sample_size(plan, n)
    if train_n:
        sample = _sample_rows(shards, sizes, rng.choice(n, size=train_n, replace=False))
        quantizer = training_quantizer(faiss, d) if use_gpu is not False else None
        if quantizer is not None:  # k-means on the GPU; the index itself is trained and filled on the CPU
            faiss.extract_index_ivf(index).clustering_index = quantizer
        try:
            index.train(sample)
        except RuntimeError as e:  # plan_index rules out what is known to fail; this names the rest
            reason = " ".join(str(e).split()).rsplit("Error: ", 1)[-1][:200]
            raise RetrieverError(
                f"cannot train a {plan.index_type} index on {train_n} texts ({reason}); try --index-type flat or auto"
            ) from None
    if fill is not None:
        index = fill(index, sizes)
    else:
        for vectors in shards.iter_vectors(count):
            index.add(vectors)
    if not plan.tune:
        return index, TuneResult()
    queries = perturbed_queries(
        _sample_rows(shards, sizes, rng.choice(n, size=min(TUNING_QUERIES, n), replace=False)), TUNING_QUERIES, seed=1
    )
    gt = exact_neighbors(shards.iter_vectors(count), queries, 10)
    exact = _ShardRows(shards, sizes) if store_vectors else None
    return index, tune(index, plan, queries, gt, recall_target, vectors=exact)


def _engine_session(ray: RayOptions | None):
    """A connection to Ray for the build (`ray`), or nothing for a local one."""
    from contextlib import nullcontext

    if ray is None:
        return nullcontext()
    from retriever.index.distributed import RaySession

    return RaySession(ray)


def _numbered_chunks(
    corpus_path: str | Path,
    column: str | None,
    strict: bool,
    report: CorpusReport,
    on_bad_row: Callable[[BadRow], None] | None,
    chunk_size: int,
) -> Iterator[tuple[int, list[tuple[str, dict]], int]]:
    """(shard number, its (text, metadata) pairs, corpus rows consumed since the previous one), in
    corpus order: the same chunks, so the same shards and ids, as the local engine's loop."""
    chunk: list[tuple[str, dict]] = []
    number = rows_seen = 0
    for item in iter_corpus(corpus_path, column=column, strict=strict, report=report, on_bad_row=on_bad_row):
        chunk.append(item)
        if len(chunk) == chunk_size:
            consumed = report.rows + len(report.bad_rows)
            yield number, chunk, consumed - rows_seen
            number, rows_seen, chunk = number + 1, consumed, []
    if chunk:
        yield number, chunk, report.rows + len(report.bad_rows) - rows_seen


def _parted_read(
    corpus_path: str | Path,
    column: str | None,
    rows: int | None,
    strict: bool,
    report: CorpusReport,
    on_bad_row: Callable[[BadRow], None] | None,
    chunk_size: int,
) -> PartedRead | None:
    """The corpus cut into parts of about one chunk each, for the Ray actors to read in parallel;
    None where it cannot be cut (see corpus/parts.py)."""
    from retriever.corpus.parts import Deduper, split_corpus
    from retriever.index.distributed import PartedRead

    layout = split_corpus(corpus_path, column, -(-(rows or 0) // chunk_size))
    return None if layout is None else PartedRead(layout, Deduper(layout, report, strict, on_bad_row))


class _ShardRows:
    """The shards' vectors indexed by global row id, like the stored vectors.f16.npy will be."""

    def __init__(self, shards: ShardDir, sizes: list[int]):
        self.shards, self.sizes = shards, sizes

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return _sample_rows(self.shards, self.sizes, rows)


def _sample_rows(shards: ShardDir, sizes: list[int], rows: np.ndarray) -> np.ndarray:
    import numpy as np

    rows = np.sort(rows)
    bounds = np.cumsum([0] + sizes)
    parts = []
    for number in range(len(sizes)):
        local = rows[(rows >= bounds[number]) & (rows < bounds[number + 1])] - bounds[number]
        if len(local):
            parts.append(np.asarray(shards.vectors(number)[local], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(parts))


def _table(chunk: list[tuple[str, dict]], first_id: int) -> pa.Table:
    """A chunk's ids, texts and metadata; columns named id/text in the corpus become corpus_id/corpus_text."""
    import json

    import pyarrow as pa

    rows = []
    for offset, (text, meta) in enumerate(chunk):
        row = {"id": first_id + offset, "text": text}
        for key, value in meta.items():
            name = key  # id -> corpus_id, and on to corpus_corpus_id if the corpus has both
            while name in RESERVED_COLUMNS or (name != key and name in meta):
                name = f"corpus_{name}"
            row[name] = value
        rows.append(row)
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Mixed types within a column (JSON lines do this): keep such values as JSON text.
        return pa.Table.from_pylist(
            [
                {
                    k: v if k in RESERVED_COLUMNS or isinstance(v, str) or v is None else json.dumps(v)
                    for k, v in row.items()
                }
                for row in rows
            ]
        )


def _unified_schema(schemas: list[pa.Schema]) -> pa.Schema:
    import pyarrow as pa

    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        names = list(dict.fromkeys(name for schema in schemas for name in schema.names))
        return pa.schema([pa.field(n, pa.int64() if n == "id" else pa.string()) for n in names])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns, in order and types; missing columns are nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for f in schema:
        if f.name in table.column_names:
            column = table.column(f.name)
            columns.append(column if column.type == f.type else pc.cast(column, f.type, safe=False))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("retriever", "open_clip_torch", "torch", "faiss-cpu", "faiss-gpu-cu12", "numpy", "pyarrow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
