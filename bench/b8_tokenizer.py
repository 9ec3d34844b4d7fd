#!/usr/bin/env python
"""B8: texts/s of tokenization alone, and of a whole toy-model build, open_clip's tokenizer vs retriever's.

Tokenization: open_clip's `SimpleTokenizer` (a fresh one: its word cache starts empty, as in a
build) against `FastClipTokenizer` (fresh, then again with its word cache warm), on
clip-interrogator's flavors and on synthetic short captions; also the fast one split over
`--processes` worker processes. Build: `build_index` with the bundled toyworld model (3 small
layers, 32 tokens: the tokenizer is a large part of the work) on synthetic captions, once with
RETRIEVER_TOKENIZER=open_clip and once with the fast tokenizer (which also tokenizes the next
chunk in a thread while this one is encoded). Both sides run in the same process, one after the
other; the ratios are what to compare across machines.

    python bench/b8_tokenizer.py --n 100000 --build-n 200000
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import flavors, machine, synthetic_captions


def rate(fn, texts) -> float:
    start = time.perf_counter()
    fn(texts)
    return len(texts) / (time.perf_counter() - start)


def _fast_in_worker(texts):
    import open_clip

    from retriever.models.fast_tokenizer import FastClipTokenizer

    global _worker_tok
    if "_worker_tok" not in globals():
        _worker_tok = FastClipTokenizer(open_clip.tokenizer.SimpleTokenizer())
    return _worker_tok.ids_array(texts)


def pooled_rate(texts, processes: int) -> float:
    """Texts/s of the fast tokenizer over `processes` worker processes (started before timing)."""
    import multiprocessing as mp

    import numpy as np

    ctx = mp.get_context("fork")
    with ctx.Pool(processes) as pool:
        pool.map(_fast_in_worker, [texts[:100]] * processes)  # start them, load the vocabulary
        step = 8192
        start = time.perf_counter()
        parts = pool.map(_fast_in_worker, [texts[i : i + step] for i in range(0, len(texts), step)])
        np.concatenate(parts)
        return len(texts) / (time.perf_counter() - start)


def tokenization(name: str, texts: list[str], processes: int) -> list[str]:
    import open_clip

    from retriever.models.fast_tokenizer import FastClipTokenizer

    slow = open_clip.tokenizer.SimpleTokenizer()
    reference = rate(slow, texts)
    fast = FastClipTokenizer(open_clip.tokenizer.SimpleTokenizer())
    cold = rate(fast, texts)
    warm = rate(fast, texts)
    same = bool((fast(texts[:20000]) == slow(texts[:20000])).all())
    python = rate(FastClipTokenizer(open_clip.tokenizer.SimpleTokenizer(), rust=False), texts)
    rows = [
        f"| {name}: open_clip `SimpleTokenizer` | {reference:,.0f} | 1.0x | |",
        f"| {name}: retriever, new words by HF tokenizers (cold cache) | {cold:,.0f} | {cold / reference:.1f}x | {same} |",
        f"| {name}: retriever, new words by open_clip's bpe (cold cache) | {python:,.0f} | {python / reference:.1f}x | |",
        f"| {name}: retriever, warm word cache | {warm:,.0f} | {warm / reference:.1f}x | |",
    ]
    if processes > 1:
        pooled = pooled_rate(texts, processes)
        rows.append(f"| {name}: retriever, {processes} processes | {pooled:,.0f} | {pooled / reference:.1f}x | |")
    return rows


def build(n: int, batch_size: int) -> list[str]:
    from retriever.index.build import build_index
    from retriever.models.loading import load_model

    texts = [f"{c} {i}" for i, c in enumerate(synthetic_captions(n, seed=8))]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(texts) + "\n")
        for label, env in (("open_clip", "open_clip"), ("retriever", "fast")):
            os.environ["RETRIEVER_TOKENIZER"] = env
            model = load_model("toyworld", device="cpu")
            start = time.perf_counter()
            result = build_index(
                corpus,
                Path(tmp) / label,
                model,
                batch_size=batch_size,
                index_type="flat",
                show_progress_bar=False,
                store_vectors=False,
            )
            results[label] = result.report.kept / (time.perf_counter() - start)
        os.environ.pop("RETRIEVER_TOKENIZER")
    base = results["open_clip"]
    return [
        f"| build, toyworld, {n:,} captions: open_clip tokenizer | {base:,.0f} | 1.0x | |",
        f"| build, toyworld, {n:,} captions: retriever tokenizer + prefetch | {results['retriever']:,.0f} | "
        f"{results['retriever'] / base:.2f}x | |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="texts for tokenization alone")
    parser.add_argument("--build-n", type=int, default=200_000, help="captions in the build (0: skip)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(machine(), f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print("| what | texts/s | vs open_clip | same ids |")
    print("| --- | --- | --- | --- |")
    for row in tokenization("flavors", flavors()[: args.n], args.processes):
        print(row, flush=True)
    for row in tokenization("captions", synthetic_captions(args.n, seed=3), args.processes):
        print(row, flush=True)
    if args.build_n:
        for row in build(args.build_n, args.batch_size):
            print(row, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}", file=sys.stderr)


if __name__ == "__main__":
    main()
