#!/usr/bin/env python
"""B2: single-image query latency on a 1M-caption exact index, end to end vs its parts.

End to end is `Retriever.query(path, k=10)`: read and decode the file, preprocess, encode with
the image tower, search, fetch texts and metadata, build the hits. The baseline is the sum of
the two costs that cannot be avoided, each measured alone in the same run: encoding the image
file (decode, preprocess, forward pass) and the raw faiss search. The index holds 1M random unit vectors (d=512) with synthetic captions: the
search cost depends on the count and dimension, not on what the vectors mean.

    python bench/b2_query_latency.py --n 1000000 --queries 30
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, random_model, synthetic_captions
from PIL import Image

from retriever.index.store import read_index, write_index
from retriever.models import toyworld
from retriever.search.api import Retriever


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50) * 1e3), float(np.percentile(samples, 95) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()
    import faiss
    import pyarrow as pa

    loaded = random_model("ViT-B-32")
    d = loaded.embed_dim
    print(f"machine: {machine()}")
    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(d)
    for start in range(0, args.n, 100_000):
        x = rng.normal(size=(min(100_000, args.n - start), d)).astype(np.float32)
        index.add(x / np.linalg.norm(x, axis=1, keepdims=True))
    table = pa.table({"id": np.arange(args.n), "text": synthetic_captions(args.n)})
    with tempfile.TemporaryDirectory() as tmp:
        manifest = {"model": loaded.describe(), "embedding_dim": d, "index_type": "flat", "search_params": {}}
        path = write_index(Path(tmp) / "idx", index, [table], table.schema, manifest)
        del index, table
        retriever = Retriever(read_index(path), loaded)
        images = []
        for i, (image, _) in enumerate(toyworld.sample(args.queries, seed=5)):
            images.append(Path(tmp) / f"q{i}.jpg")
            image.resize((320, 320)).save(images[-1], quality=90)

        retriever.query(images[0], k=10)  # warm-up
        e2e, encode, search = [], [], []
        for image in images:
            start = time.perf_counter()
            hits = retriever.query(image, k=10)
            e2e.append(time.perf_counter() - start)
            assert len(hits) == 10
        with torch.inference_mode():
            for image in images:
                start = time.perf_counter()
                x = loaded.preprocess(Image.open(image).convert("RGB"))[None]
                q = torch.nn.functional.normalize(loaded.model.encode_image(x), dim=-1).numpy()
                encode.append(time.perf_counter() - start)
                start = time.perf_counter()
                retriever.index.faiss_index.search(q, 10)
                search.append(time.perf_counter() - start)
    (e50, e95), (c50, c95), (s50, s95) = percentiles(e2e), percentiles(encode), percentiles(search)
    print(f"index: {args.n:,} captions, d={d}, exact (IndexFlatIP); {args.queries} single-image queries, k=10")
    print(f"end to end          p50 {e50:7.1f} ms   p95 {e95:7.1f} ms")
    print(f"image file encode   p50 {c50:7.1f} ms   p95 {c95:7.1f} ms")
    print(f"faiss search alone  p50 {s50:7.1f} ms   p95 {s95:7.1f} ms")
    print(f"end to end / (encode + search): p50 {e50 / (c50 + s50):.2f}x   p95 {e95 / (c95 + s95):.2f}x")


if __name__ == "__main__":
    main()
