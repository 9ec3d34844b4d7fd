#!/usr/bin/env python
"""B7: what diversity, filters and several indexes cost per query, against plain search.

The corpus is 1,000,000 captions: clip-interrogator's flavors plus synthetic pairs of short
flavors, with a `bucket` column (row number mod 10, so `bucket = 3` keeps 10% of rows), built
into flat and HNSW indexes with `build_index` and the bundled toyworld model (d=128). Queries
are toy images' vectors, one at a time (a user's query), so each time is one query's latency.

For each index type it prints the p50 and p95 of `search_index` with:
- plain options (the baseline);
- `diversity=0.5, fetch_k=1000` (exact re-ranking plus MMR over 1,000 candidates), and with the
  default fetch_k (100 for k=10);
- `--where "bucket = 3"`, its rows computed per query (the column already prepared, as after an
  index's first filter on it: read as numbers, in int8, with a bitmap per value asked for), and
  reused (as a Retriever does for the same expression: a server, or `query` over a folder);
- `--where "len < N"` keeping about 10% of rows, computed per query: a range, which reads the
  whole column each time;
- two indexes (this one and a second built from the same model) searched and merged, against
  the slower of the two alone; again with each option run back to back over blocks of queries
  (a busy server, whose cores are awake).

Then, for HNSW, how MMR's picks from the index's 1,000 candidates compare with picks from the
exact 1,000 nearest, what the same options cost made of bare FAISS calls (the floor under the
library's ratios), and how long this machine takes to wake an idle core.

    python bench/b7_result_options.py --n 1000000 --queries 400
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from common import flavors, machine, synthetic_captions

from retriever.index.build import build_index
from retriever.index.store import read_index
from retriever.models import toyworld
from retriever.models.encoder import Encoder
from retriever.models.loading import load_model
from retriever.search.filters import where_rows
from retriever.search.options import ResultOptions, search_index, search_indexes


def write_corpus(path: Path, n: int, seed: int) -> None:
    texts = list(dict.fromkeys(flavors() + synthetic_captions(n, seed=seed)))[:n]
    with open(path, "w", encoding="utf-8") as f:
        f.write("text\tbucket\n")
        for i, text in enumerate(texts):
            f.write(f"{text.replace(chr(9), ' ')}\t{i % 10}\n")


def latencies(fn, xq: np.ndarray) -> np.ndarray:
    fn(xq[:1])
    out = []
    for q in xq:
        start = time.perf_counter()
        fn(q[None])
        out.append(time.perf_counter() - start)
    return np.array(out) * 1000


def interleaved(calls: dict, xq: np.ndarray) -> dict[str, np.ndarray]:
    """Latencies in ms of each call on each query, the calls taken in turn, so that drift over the
    run (page cache, clock, neighbours) falls on all of them alike. In each turn every call gets
    a different query (call j takes query i + j * len(xq) // len(calls)): a query's first search
    finds its part of the graph out of the CPU caches and warms it for a second, and a user's
    query is a new one. Every call still answers every query once."""
    for fn in calls.values():
        fn(xq[:1])
    names = list(calls)
    stride = max(1, len(xq) // len(names))
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(len(xq)):
        for j, name in enumerate(names):
            q = xq[(i + j * stride) % len(xq)]
            start = time.perf_counter()
            calls[name](q[None])
            out[name].append(time.perf_counter() - start)
    return {name: np.array(values) * 1000 for name, values in out.items()}


def in_blocks(calls: dict, xq: np.ndarray, block: int = 25) -> dict[str, np.ndarray]:
    """Latencies in ms with each call run back to back over a block of queries, the calls' blocks
    taken in turn: a busy server's steady state, where the other cores are awake. (Taken in turn
    query by query, a call that needs a second core finds it idle, and this machine's idle
    vCPUs take 0.1-0.3 ms to wake: see `wake_up_cost`.)"""
    for fn in calls.values():
        fn(xq[:1])
    out: dict[str, list[float]] = {name: [] for name in calls}
    for start in range(0, len(xq), block):
        for name, fn in calls.items():
            for q in xq[start : start + block]:
                begin = time.perf_counter()
                fn(q[None])
                out[name].append(time.perf_counter() - begin)
    return {name: np.array(values) * 1000 for name, values in out.items()}


def wake_up_cost(d: int) -> str:
    """p50 of a FAISS IndexShards search over two 10-row indexes (its two worker threads do next to
    nothing), right after another and after the calling thread has worked alone for 20 ms."""
    from retriever.index.faiss_import import import_faiss

    faiss = import_faiss()
    rows = np.random.default_rng(0).standard_normal((10, d)).astype(np.float32)
    parts = [faiss.IndexFlatIP(d) for _ in range(2)]
    shards = faiss.IndexShards(d, True, True)
    for part in parts:
        part.add(rows)
        shards.add_shard(part)
    medians = []
    for idle in (0.0, 0.02):
        times = []
        for _ in range(100):
            until = time.perf_counter() + idle
            while time.perf_counter() < until:  # busy alone, as a single-threaded option is
                pass
            begin = time.perf_counter()
            shards.search(rows[:1], 5)
            times.append(time.perf_counter() - begin)
        medians.append(np.median(times) * 1000)
    return f"handing a search to two idle worker threads: p50 {medians[0]:.3f} ms back to back, {medians[1]:.3f} ms after 20 ms alone"


def faiss_floors(index, other, xq: np.ndarray) -> list[str]:
    """The same HNSW options made of bare FAISS calls, no library code: what any caller of FAISS
    pays on this machine. 1,000 candidates need a walk whose frontier holds 1,000 (FAISS raises
    efSearch to k); two indexes need a second thread, here one pool thread as the library uses."""
    from concurrent.futures import ThreadPoolExecutor

    first, second = index.faiss_index, other.faiss_index
    pool = ThreadPoolExecutor(max_workers=1)

    def both(q: np.ndarray) -> None:
        later = pool.submit(second.search, q, 10)
        first.search(q, 10)
        later.result()

    calls = {
        "10": lambda q: first.search(q, 10),
        "1000": lambda q: first.search(q, 1000),
        "other": lambda q: second.search(q, 10),
        "both": both,
    }
    turns = interleaved(calls, xq)
    blocks = in_blocks({name: calls[name] for name in ("10", "other", "both")}, xq)
    p50 = {name: float(np.median(t)) for name, t in turns.items()}
    slower = max(p50["10"], p50["other"])
    slower_blocks = max(np.median(blocks["10"]), np.median(blocks["other"]))
    return [
        f"bare FAISS: 1,000 candidates {p50['1000']:.2f} ms vs 10 {p50['10']:.2f} ms: "
        f"{p50['1000'] / p50['10']:.2f}x before any re-ranking",
        f"bare FAISS: two indexes (one pool thread) {p50['both'] / slower:.2f}x the slower, "
        f"{np.median(blocks['both']) / slower_blocks:.2f}x back to back",
    ]


def diversity_quality(index, xq: np.ndarray, fetch_k: int = 1000, diversity: float = 0.5) -> str:
    """How MMR's top-10 from the index's `fetch_k` candidates compares with MMR over the exact
    `fetch_k` nearest (brute force): recall of the candidates, overlap of the picks, intra-list
    similarity (lower: more diverse) and mean relevance of the picks."""
    from retriever.search.diversity import mmr
    from retriever.search.options import exact_vectors

    xb = index.faiss_index.reconstruct_n(0, len(index))
    _, found = index.faiss_search(xq, fetch_k)
    recall, overlap, ils, relevance = [], [], [[], []], [[], []]
    for q, candidates in zip(xq, found):
        exact = np.argpartition(-(xb @ q), fetch_k)[:fetch_k]
        candidates = candidates[candidates >= 0]
        recall.append(len(np.intersect1d(exact, candidates)) / fetch_k)
        picks = []
        for side, ids in enumerate((exact, candidates)):
            vectors = exact_vectors(index, ids)
            chosen = mmr(vectors @ q, vectors, 10, diversity)
            gram = vectors[chosen] @ vectors[chosen].T
            ils[side].append((gram.sum() - np.trace(gram)) / (len(chosen) * (len(chosen) - 1)))
            relevance[side].append(float((vectors[chosen] @ q).mean()))
            picks.append(set(ids[chosen].tolist()))
        overlap.append(len(picks[0] & picks[1]) / 10)
    return (
        f"diversity {diversity} from the index's {fetch_k} candidates (recall of the exact {fetch_k}: "
        f"{np.mean(recall):.3f}) vs from the exact ones: same picks {np.mean(overlap):.2f}, intra-list "
        f"similarity {np.mean(ils[1]):.3f} vs {np.mean(ils[0]):.3f}, relevance {np.mean(relevance[1]):.3f} "
        f"vs {np.mean(relevance[0]):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--types", default="flat,hnsw")
    parser.add_argument("--work", type=Path, default=None, help="keep built indexes here between runs")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    work = args.work or Path(tempfile.mkdtemp(prefix="b7-"))
    work.mkdir(parents=True, exist_ok=True)
    model = load_model("toyworld", device="cpu")
    images = [im for im, _ in toyworld.sample(args.queries, seed=5)]
    encoder = Encoder(model)
    xq = encoder.encode_image(images, show_progress_bar=False)
    encode = latencies(lambda q: encoder.encode_image(images[:1], show_progress_bar=False), xq[:50])
    print(
        f"image encoding alone (toyworld, one image): p50 {np.median(encode):.2f} ms; 'end to end' adds it to both sides"
    )
    for corpus_seed in (1, 2):
        corpus = work / f"corpus{corpus_seed}.tsv"
        if not corpus.exists():
            write_corpus(corpus, args.n, corpus_seed)
    print(f"{'index':6} {'options':28} {'p50 ms':>8} {'p95 ms':>8} {'vs plain':>9} {'end to end':>11}  hits")
    for kind in args.types.split(","):
        opened = []
        for corpus_seed in (1, 2):
            out = work / f"{kind}{corpus_seed}"
            if not (out / "manifest.json").exists():
                start = time.perf_counter()
                build_index(
                    work / f"corpus{corpus_seed}.tsv",
                    out,
                    model,
                    index_type=kind,
                    overwrite=True,
                    show_progress_bar=False,
                )
                print(f"built {out} in {time.perf_counter() - start:.0f}s", flush=True)
            opened.append(read_index(out, use_gpu=False))
        index, other = opened
        plain = ResultOptions()
        diverse = ResultOptions(diversity=0.5, fetch_k=1000)
        diverse_default = ResultOptions(diversity=0.5)  # fetch-k max(10 k, 100): 100
        start = time.perf_counter()
        reused_mask = where_rows(index.texts, "bucket = 3")
        lengths = np.asarray(pc.utf8_length(index.texts["text"]))
        shortest = f"len < {int(np.quantile(lengths, 0.1)) + 1}"  # about 10% of rows: a range, not a value
        share = float(np.mean(where_rows(index.texts, shortest).matches()))
        print(
            f"{kind:6} the first filter, which prepares the text column `bucket` as numbers: {(time.perf_counter() - start) * 1000:.0f} ms"
        )
        calls = {
            "plain": lambda q: search_index(index, q, 10, plain),  # noqa: B023 (timed inside this iteration)
            "other": lambda q: search_index(other, q, 10, plain),  # noqa: B023
            "diverse": lambda q: search_index(index, q, 10, diverse),  # noqa: B023
            "diverse default": lambda q: search_index(index, q, 10, diverse_default),  # noqa: B023
            "filtered": lambda q: search_index(index, q, 10, plain, mask=where_rows(index.texts, "bucket = 3")),  # noqa: B023
            "reused": lambda q: search_index(index, q, 10, plain, mask=reused_mask),  # noqa: B023
            "range": lambda q: search_index(index, q, 10, plain, mask=where_rows(index.texts, shortest)),  # noqa: B023
            "both": lambda q: search_indexes(opened, q, 10, plain),  # noqa: B023
        }
        times = interleaved(calls, xq)
        base, other_alone = times["plain"], times["other"]
        rows = [
            ("plain", base, 10),
            ("diversity 0.5, fetch-k 1000", times["diverse"], 10),
            ("diversity 0.5 (fetch-k 100)", times["diverse default"], 10),
            ('where "bucket = 3" (10%)', times["filtered"], len(calls["filtered"](xq[:1])[0][1])),
            ("  the same, mask reused", times["reused"], len(calls["reused"](xq[:1])[0][1])),
            (f'where "{shortest}" ({share:.0%})', times["range"], len(calls["range"](xq[:1])[0][1])),
            ("two indexes", times["both"], 10),
        ]
        streamed = in_blocks({name: calls[name] for name in ("plain", "other", "both")}, xq)
        rows.append(("two indexes, back to back", streamed["both"], 10))
        for name, times, hits in rows:
            if name.startswith("two indexes"):
                alone = streamed if "back to back" in name else {"plain": base, "other": other_alone}
                reference = max(np.median(alone["plain"]), np.median(alone["other"]))
            else:
                reference = np.median(base)
            e2e = (np.median(times) + np.median(encode)) / (reference + np.median(encode))
            print(
                f"{kind:6} {name:28} {np.median(times):8.2f} {np.percentile(times, 95):8.2f} "
                f"{np.median(times) / reference:8.2f}x {e2e:10.2f}x  {hits}",
                flush=True,
            )
        if kind != "flat":
            print(f"{kind:6} {diversity_quality(index, xq[:100])}")
            for line in faiss_floors(index, other, xq):
                print(f"{kind:6} {line}", flush=True)
    print(wake_up_cost(xq.shape[1]))


if __name__ == "__main__":
    main()
