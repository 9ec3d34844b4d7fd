#!/usr/bin/env python
"""B3: approximate indexes vs exact search on 1M+ text vectors from the toyworld text tower.

The database is 1M synthetic captions (pairs of clip-interrogator flavors) embedded with the
bundled toy model; 2,000 further captions, not in the index, are the queries. Each ANN index is
built and tuned exactly as `build-index --index-type T` does (perturbed database vectors as
tuning queries, target recall@10 0.95), then measured on the held-out queries: recall@10
against exact search, queries per second (one batch, all threads), and index bytes per caption.

`ivfpq+refine` is IVF-PQ whose candidates are re-ranked exactly with the fp16 vectors
(refine.py), memory-mapped from a .npy file as a built index does: bytes/caption counts what
is held in RAM (the index); the vectors add 2·d bytes per caption on disk.

    python bench/b3_ann.py --n 1000000
"""

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from common import machine, synthetic_captions

from retriever.index.ann import (
    exact_neighbors,
    new_index,
    perturbed_queries,
    plan_index,
    recall_at_k,
    train_sample_size,
    tune,
)
from retriever.index.refine import refined_search
from retriever.models.encoder import Encoder
from retriever.models.loading import load_model


def qps(search, xq: np.ndarray, k: int = 10) -> tuple[float, np.ndarray]:
    search(xq[:50], k)
    start = time.perf_counter()
    _, I = search(xq, k)
    return len(xq) / (time.perf_counter() - start), I


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--types", default="flat,ivf,hnsw,ivfpq,ivfpq+refine")
    parser.add_argument("--target", type=float, default=0.95)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    texts = synthetic_captions(args.n + args.queries, seed=3)
    encoder = Encoder(load_model("toyworld", device="cpu"))
    start = time.perf_counter()
    vectors = encoder.encode_text(texts, batch_size=1024, show_progress_bar=True)
    print(f"embedded {len(texts):,} texts with toyworld in {time.perf_counter() - start:.0f}s")
    xb, xq = vectors[: args.n], vectors[args.n :]
    d = xb.shape[1]
    gt = exact_neighbors([xb], xq, 10)
    flat_qps = None
    print(f"{'type':13} {'params':26} {'recall@10':>9} {'QPS':>9} {'vs flat':>8} {'bytes/caption':>13} {'build s':>8}")
    mapped = Path(tempfile.mkdtemp()) / "vectors.f16.npy"
    np.save(mapped, xb.astype(np.float16))
    vectors = np.load(mapped, mmap_mode="r")
    for kind in args.types.split(","):
        refine = kind.endswith("+refine")
        plan = plan_index(args.n, d, kind.removesuffix("+refine"))
        start = time.perf_counter()
        index = new_index(plan, d)
        train_n = train_sample_size(plan, args.n)
        if train_n:
            index.train(xb[np.random.default_rng(0).choice(args.n, size=train_n, replace=False)])
        index.add(xb)
        tuning_q = perturbed_queries(xb, 1000, seed=1)
        tuned = tune(
            index, plan, tuning_q, exact_neighbors([xb], tuning_q, 10), args.target, vectors=vectors if refine else None
        )
        build_s = time.perf_counter() - start
        if refine:

            def search(q, k, index=index, k_factor=tuned.params["k_factor"]):
                return refined_search(index.search, q, k, vectors, k_factor, args.n)

        else:
            search = index.search
        speed, I = qps(search, xq)
        flat_qps = flat_qps or speed
        size = len(faiss.serialize_index(index))
        params = ",".join(f"{k}={v}" for k, v in tuned.params.items()) or "-"
        print(
            f"{kind:13} {params:26} {recall_at_k(I, gt):9.3f} {speed:9.0f} {speed / flat_qps:7.1f}x "
            f"{size / args.n:13.0f} {build_s:8.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
