"""Distributed builds on Ray: the same shards, work directory, lock, resume and publish as a local
build (build.py); only who embeds which shard, and who fills the IVF lists, changes.

    driver                                   Ray actors (one per worker, model loaded once)
    ------                                   ------------------------------------------------
    cuts the corpus into parts (byte ranges  scan(part): parse and clean one part into
    at newlines, parquet row groups; .csv    piece-NNNNN.parquet in the work directory, return
    is read by the driver in one pass)       its counts, bad rows and 8-byte text keys
    de-duplicates the keys in file order     embed(number, chunk): read the chunk's rows from the
    (ids exactly as a local build), skips    pieces, encode them, write meta-NNNNN.parquet +
    finished shards, sends each chunk's      emb-NNNNN.npy, return (number, rows): shard ids, never
    piece rows to the least busy actor       vectors, come back through the object store
    trains the IVF on a random sample        _add_block tasks: one block of shards each, added
    across all shards (not the first N)      with global ids to a copy of the trained index
    merges the blocks into on-disk lists     (faiss.contrib.ondisk.merge_ondisk), tunes nprobe,
    publishes the index (format 2)           serves it memory-mapped (store.read_index)

The work directory lives beside --out, so --out must be on storage every node sees (NFS, Lustre,
a FUSE-mounted bucket). A worker killed mid-shard is restarted by Ray and its task retried (the
shard files are renamed into place whole, so a half shard never counts); a killed driver leaves
finished shards behind, and the same command skips them. Shards are identical whichever engine
wrote them, so a build may even be resumed with the other engine.

Ray is imported only here, and only when `--engine ray` is used.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import MissingExtraError, RetrieverError
from retriever.index.shards import ShardDir

if TYPE_CHECKING:
    from retriever.corpus.parts import Deduper, Layout, Part, PartScan, Segment
    from retriever.models.loading import LoadedModel

RAY_INSTALL = "pip install 'retriever[ray]'"
IN_FLIGHT_PER_WORKER = 2  # chunks queued per actor: it never waits, and the driver holds few
MAX_RESTARTS = 3  # a worker process that dies is restarted this often...
MAX_RETRIES = 3  # ...and the shard it held retried this often
# Fault injection for the tests (a real SIGKILL of a real process, not a mock):
#   RETRIEVER_TEST_KILL_WORKER=N:MARKER   the worker embedding shard N kills itself once (MARKER records it)
#   RETRIEVER_TEST_KILL_DRIVER=K          the driver kills itself after K shards are written
KILL_WORKER_ENV = "RETRIEVER_TEST_KILL_WORKER"
KILL_DRIVER_ENV = "RETRIEVER_TEST_KILL_DRIVER"
# Timings of the last embed_shards call in this process (for bench/b9_ray.py).
last_timings: dict[str, float] = {}


@dataclass
class RayOptions:
    """Where and how wide to run: `address` None starts a local Ray; `workers` None uses one actor
    per GPU (or per CPU core without GPUs); `gpus_per_worker` None takes 1 when the cluster has GPUs."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingExtraError(f"--engine ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


class RaySession:
    """Connect to Ray for one build (or reuse the caller's connection); a context manager.

    Workers must import this same `retriever`: the driver's sys.path entry for it goes to them as
    PYTHONPATH (a shared checkout works as is; otherwise install the same version on every node).
    """

    def __init__(self, options: RayOptions):
        self.options = options
        self.started = False

    def __enter__(self):
        ray = import_ray()
        if ray.is_initialized():
            return ray
        root = str(Path(__file__).resolve().parents[2])
        paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        env = {"PYTHONPATH": os.pathsep.join(paths)}
        for name in ("HF_HUB_OFFLINE", "HF_HOME", "OPEN_CLIP_CACHE"):
            if name in os.environ:
                env[name] = os.environ[name]
        kwargs: dict[str, Any] = {
            "runtime_env": {"env_vars": env},
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        address = self.options.address
        if address:
            check_address(address)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:  # "local": a new Ray of our own, never whatever `ray start` left running here
                # (its token-authentication notice is about clusters others join: not this one)
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
                ray.init(address="local", include_dashboard=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            advice = "; start one with `ray start --head`, or leave out --ray-address" if address else ""
            raise RetrieverError(f"cannot start or reach {where} ({_first_line(e)}){advice}") from None
        self.started = True
        return ray

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, in one line, when nothing listens at the cluster's address: ray.init
    would otherwise retry for minutes. `auto` is checked at the address Ray would pick."""
    import socket

    where = address
    if address == "auto":
        where = os.environ.get("RAY_ADDRESS", "")
        if not where:
            try:
                with open(os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")) as f:
                    where = f.read().strip()
            except OSError:
                raise RetrieverError(
                    "--ray-address auto: no Ray cluster runs on this node; start one with "
                    "`ray start --head`, or leave out --ray-address"
                ) from None
    if where.startswith("ray://"):
        return  # Ray Client: ray.init reports it
    host, _, port = where.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise RetrieverError(
            f"cannot reach the Ray cluster at {where} ({reason}); start one with "
            "`ray start --head`, or leave out --ray-address"
        ) from None


def plan_workers(ray, options: RayOptions) -> tuple[int, float, int]:
    """(actors, GPUs per actor, CPU threads per actor) for the cluster Ray sees."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    per_gpu = options.gpus_per_worker if options.gpus_per_worker is not None else (1 if gpus else 0)
    if per_gpu and per_gpu > gpus:
        raise RetrieverError(
            f"--gpus-per-worker {per_gpu:g}: the Ray cluster has {gpus} GPUs; use --gpus-per-worker 0 to embed on CPUs"
        )
    default = int(gpus // per_gpu) if per_gpu else cpus
    workers = options.workers or max(1, default)
    threads = 0 if per_gpu else max(1, cpus // workers)
    return workers, per_gpu, threads


def _model_args(model: LoadedModel) -> dict:
    """How a worker loads the same model (checked there against the driver's fingerprint)."""
    import torch

    dtype = next(model.model.parameters()).dtype
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    return {"name": model.spec.name, "pretrained": model.spec.pretrained, "precision": precision}


class Embedder:
    """A Ray actor: loads the model once, then embeds shard after shard into the work directory."""

    def __init__(
        self,
        model_args: dict,
        fingerprint: str,
        work_dir: str,
        state: dict,
        device: str,
        threads: int,
        kill_spec: str | None = None,
    ):
        self.kill_spec = kill_spec
        if threads:
            import torch

            torch.set_num_threads(threads)
        from retriever.models.encoder import Encoder
        from retriever.models.loading import load_model

        model = load_model(**model_args, device=device)
        if model.fingerprint != fingerprint:
            raise RetrieverError(
                f"worker on {os.uname().nodename} loaded {model.spec} with weights "
                f"{model.fingerprint[:20]}, the driver has {fingerprint[:20]}; install the same "
                "weights on every node"
            )
        self.encoder = Encoder(model)
        self.shards = ShardDir(Path(work_dir), state)

    def scan(self, layout: Layout, part: Part) -> PartScan:
        """Parse and clean one part of the corpus into its piece (corpus/parts.py)."""
        from retriever.corpus.parts import piece_path, scan_part

        return scan_part(layout, part, piece_path(self.shards.path, part.number))

    def embed(
        self, number: int, chunk: list[tuple[str, dict]] | PieceChunk, first_id: int, batch_size: int
    ) -> tuple[int, int]:
        from retriever.index.build import _table  # built here, not on the driver: it halves the driver's work

        if isinstance(chunk, PieceChunk):
            from retriever.corpus.parts import read_segments

            chunk = read_segments(self.shards.path, chunk.segments)
        texts = [text for text, _ in chunk]
        vectors = self.encoder.encode_text(texts, batch_size=batch_size, show_progress_bar=False)
        _maybe_kill_worker(self.kill_spec, number)
        self.shards.write(number, vectors, _table(chunk, first_id))
        return number, len(texts)

    def cpu_seconds(self) -> float:
        """CPU time this worker process has used (all its threads), for the timings."""
        return time.process_time()


@dataclass
class PieceChunk:
    """A chunk named by where its texts are in the corpus pieces, not by the texts themselves."""

    segments: list[Segment]

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.segments)


@dataclass
class PartedRead:
    """A corpus read in parallel (corpus/parts.py): the actors scan its parts into pieces, the
    driver de-duplicates their keys in order, and chunks go out as PieceChunks."""

    layout: Layout
    deduper: Deduper


def embed_shards(
    chunks: Iterator[tuple[int, list[tuple[str, dict]], int]] | PartedRead,
    chunk_size: int,
    shards: ShardDir,
    model: LoadedModel,
    options: RayOptions,
    batch_size: int,
    advance: Callable[[int], None],
) -> tuple[int, int, int]:
    """Embed every chunk not finished yet on an actor pool; returns (shards, embedded, resumed).

    `chunks` yields (number, its (text, metadata) pairs, rows consumed from the corpus for it) in
    corpus order; chunk n's ids start at n x `chunk_size`. Or it is a PartedRead: the actors first
    read the corpus's parts in parallel, then embed. Call inside a RaySession.
    """
    ray = import_ray()
    workers, per_gpu, threads = plan_workers(ray, options)
    finished = shards.finished()
    actor = ray.remote(Embedder).options(
        num_cpus=threads or 1, num_gpus=per_gpu, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RETRIES
    )
    device = "cuda" if per_gpu else "cpu"
    args = (
        _model_args(model),
        model.fingerprint,
        str(shards.path),
        shards.state,
        device,
        threads,
        os.environ.get(KILL_WORKER_ENV),
    )
    started = time.perf_counter()
    pool = [actor.remote(*args) for _ in range(workers)]
    busy = [0] * workers
    pending: dict[Any, tuple[int, int, int]] = {}  # ref -> (actor, number, rows consumed)
    count = embedded = resumed = written = 0
    kill_after = int(os.environ.get(KILL_DRIVER_ENV) or 0)

    def collect(block: bool) -> None:
        nonlocal embedded, written
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
        for ref in ready:
            slot, number, consumed = pending.pop(ref)
            busy[slot] -= 1
            _, rows = _get(ray, ref, number)
            embedded += rows
            written += 1
            advance(consumed)
            if kill_after and written >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    try:
        for ref in [handle.__ray_ready__.remote() for handle in pool]:
            _get(ray, ref, None)  # each has loaded its model (or said in one line why it cannot)
        last_timings.clear()
        last_timings["actors_ready_s"] = time.perf_counter() - started
        last_timings["actors_ready_cpu_s"] = sum(ray.get([handle.cpu_seconds.remote() for handle in pool]))
        numbered: Iterator[tuple[int, list[tuple[str, dict]] | PieceChunk, int]]
        if isinstance(chunks, PartedRead):  # parts are scanned ahead of the chunks that need them
            numbered = _piece_chunks(chunks, _scan_parts(ray, pool, chunks.layout), chunk_size, advance)
            last_timings["parts"] = len(chunks.layout.parts)
        else:
            numbered = chunks
        for number, chunk, consumed in numbered:
            count = number + 1
            if number in finished:
                resumed += 1
                advance(consumed)
                continue
            while len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                collect(block=True)
            collect(block=False)
            slot = min(range(workers), key=busy.__getitem__)
            busy[slot] += 1
            ref = pool[slot].embed.remote(number, chunk, number * chunk_size, batch_size)
            pending[ref] = (slot, number, consumed)
        while pending:
            collect(block=True)
        last_timings["workers_cpu_s"] = sum(ray.get([handle.cpu_seconds.remote() for handle in pool]))
    finally:
        for handle in pool:
            ray.kill(handle)
    last_timings["embed_s"] = time.perf_counter() - started
    return count, embedded, resumed


def _scan_parts(ray, pool: list, layout: Layout) -> Iterator[PartScan]:
    """Each part scanned on the least busy actor, a few in flight per actor; yields the scans in part order."""
    busy = [0] * len(pool)
    pending: dict[Any, tuple[int, int]] = {}  # ref -> (actor, part)
    done: dict[int, PartScan] = {}
    parts = iter(layout.parts)
    following = 0
    while True:
        while len(pending) < IN_FLIGHT_PER_WORKER * len(pool):
            part = next(parts, None)
            if part is None:
                break
            slot = min(range(len(pool)), key=busy.__getitem__)
            busy[slot] += 1
            pending[pool[slot].scan.remote(layout, part)] = (slot, part.number)
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            slot, number = pending.pop(ref)
            busy[slot] -= 1
            done[number] = _get(ray, ref, None, f"reading part {number} of the corpus")
        while following in done:
            yield done.pop(following)
            following += 1


def _piece_chunks(
    read: PartedRead, scans: Iterator[PartScan], chunk_size: int, advance: Callable[[int], None]
) -> Iterator[tuple[int, PieceChunk, int]]:
    """Numbered PieceChunks from the parts' scans: duplicates dropped in file order, as a
    sequential read drops them (rows the read drops count as done for the progress bar)."""
    from retriever.corpus.parts import chunk_segments

    def kept() -> Iterator[tuple[int, Any]]:
        for scan in scans:
            rows = read.deduper.add(scan)
            advance(scan.rows + len(scan.bad_rows) - len(rows))
            yield scan.number, rows
        read.deduper.finish()

    for number, segments in enumerate(chunk_segments(kept(), chunk_size)):
        chunk = PieceChunk(segments)
        yield number, chunk, len(chunk)


def fill_ivf(index, shards: ShardDir, sizes: list[int], workers: int) -> tuple[Any, Path]:
    """Add every shard's vectors to the trained, empty IVF `index` in parallel, one block of shards
    per worker with global ids, then merge the blocks into on-disk inverted lists.

    Returns (the index, now over `work_dir/index.ivfdata`, and that file). Call inside a RaySession.
    """
    import numpy as np
    from faiss.contrib.ondisk import merge_ondisk

    from retriever.index.faiss_import import import_faiss
    from retriever.index.store import quiet_stdout

    faiss = import_faiss()
    ray = import_ray()
    work = shards.path
    trained = work / "trained.index"
    faiss.write_index(index, str(work / "trained.tmp"))
    os.replace(work / "trained.tmp", trained)
    starts = np.cumsum([0] + sizes)
    groups = [list(g) for g in np.array_split(np.arange(len(sizes)), min(workers, len(sizes))) if len(g)]
    threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // len(groups))  # faiss's OpenMP threads each
    task = ray.remote(_add_block).options(num_cpus=threads, max_retries=MAX_RETRIES)
    refs = [
        task.remote(str(work), block, [int(n) for n in group], [int(starts[n]) for n in group], threads)
        for block, group in enumerate(groups)
    ]
    blocks = [_get(ray, ref, None) for ref in refs]
    ivfdata = work / "index.ivfdata"
    ivfdata.unlink(missing_ok=True)
    merged = faiss.read_index(str(trained))
    with quiet_stdout():  # merge_ondisk's OnDiskInvertedLists prints its resizing on stdout
        merge_ondisk(merged, [str(work / name) for name in blocks], str(ivfdata))
    for name in blocks:
        (work / name).unlink()
    trained.unlink()
    if merged.ntotal != starts[-1]:
        raise RetrieverError(
            f"{work}: the merged index holds {merged.ntotal} vectors, the shards {starts[-1]}; "
            "run the same command again"
        )
    return merged, ivfdata


def _add_block(work_dir: str, block: int, numbers: list[int], first_ids: list[int], threads: int) -> str:
    """A Ray task: one block of shards added, with their global ids, to a copy of the trained index."""
    import numpy as np

    from retriever.index.faiss_import import import_faiss

    faiss = import_faiss()
    faiss.omp_set_num_threads(threads)
    work = Path(work_dir)
    index = faiss.read_index(str(work / "trained.index"))
    for number, first in zip(numbers, first_ids):
        x = np.ascontiguousarray(np.load(work / f"emb-{number:05d}.npy", mmap_mode="r"), dtype=np.float32)
        index.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
    name = f"block-{block:05d}.index"
    faiss.write_index(index, str(work / f"block-{block:05d}.tmp"))
    os.replace(work / f"block-{block:05d}.tmp", work / name)
    return name


def _get(ray, ref, number: int | None, doing: str | None = None):
    """ray.get, with a worker's error as one line (its own message when it is ours)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, RetrieverError):
            raise type(cause)(str(cause)) from None
        what = doing or (f"shard {number}" if number is not None else "starting or adding vectors")
        raise RetrieverError(
            f"a Ray worker failed on {what} ({_first_line(cause or e)}); run the same command to resume"
        ) from None
    except ray.exceptions.RayActorError as e:
        cause = getattr(e, "cause", None) or getattr(e, "error_msg", "") or e
        if isinstance(cause, RetrieverError) or "RetrieverError" in type(cause).__name__:
            raise RetrieverError(str(cause)) from None
        inner = _actor_init_error(e)
        if inner:
            raise RetrieverError(inner) from None
        raise RetrieverError(
            f"a Ray worker died {MAX_RESTARTS + 1} times on shard {number} ({_first_line(cause)}); "
            "finished shards are kept: run the same command to resume"
        ) from None
    except ray.exceptions.RayError as e:
        raise RetrieverError(
            f"Ray failed ({_first_line(e)}); finished shards are kept: run the same command to resume"
        ) from None


def _actor_init_error(error: BaseException) -> str | None:
    """The message of our own error raised in an actor's constructor, if that is why it died."""
    text = str(error)
    for kind in ("ModelError", "RetrieverError", "CorpusError", "IndexFormatError", "MissingExtraError"):
        marker = f"retriever.errors.{kind}: "
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
        marker = f"{kind}: "
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
    return None


def _first_line(error: BaseException | str) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def _maybe_kill_worker(spec: str | None, number: int) -> None:
    if not spec:
        return
    shard, _, marker = spec.partition(":")
    if int(shard) == number and marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
