#!/usr/bin/env python
"""B1: text-embedding throughput, retriever's encoder vs the reference open_clip loop.

Reference: open_clip's `encode_text` over `tokenizer(batch)` (77 tokens, full padding), in file
order, under `torch.no_grad()`, like clip-retrieval's inference loop. Both sides use the same
model (full-size ViT-B-32, random weights: real FLOPs), texts, threads and batch size, and must
give the same embeddings.

    python bench/b1_build_throughput.py --n 4000          # a subset of the 100,970 flavors
"""

import argparse

import numpy as np
import torch
from common import flavors, machine, matmul_gflops, random_model, timed

from retriever.models.encoder import Encoder


def text_flops(model, lengths: np.ndarray) -> float:
    """Forward FLOPs of the text tower for sequences of these real lengths (no padding)."""
    width = model.transformer.width
    layers = model.transformer.layers
    mlp = model.transformer.resblocks[0].mlp.c_fc.out_features
    per_token = layers * (2 * 4 * width * width + 2 * 2 * width * mlp)  # qkv+out projections, MLP
    attention = layers * 2 * 2 * width * (lengths.astype(np.float64) ** 2)  # scores and weighted sum
    projection = 2 * width * model.text_projection.shape[1]
    return float(per_token * lengths.sum() + attention.sum() + projection * len(lengths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000, help="texts (of the 100,970 flavors)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", default="ViT-B-32")
    args = parser.parse_args()

    loaded = random_model(args.model)
    texts = flavors()[: args.n]
    print(f"machine: {machine()}")
    print(f"model: {args.model} (random weights), {len(texts)} texts, batch {args.batch_size}")

    def reference() -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), args.batch_size):
                tokens = loaded.tokenizer(texts[start : start + args.batch_size])
                out.append(torch.nn.functional.normalize(loaded.model.encode_text(tokens), dim=-1).numpy())
        return np.concatenate(out)

    encoder = Encoder(loaded)
    ours, ours_s = timed(encoder.encode_text, texts, batch_size=args.batch_size, show_progress_bar=False)
    ref, ref_s = timed(reference)
    cosine = float((ours * ref).sum(axis=1).min())
    lengths = (loaded.tokenizer(texts) != 0).sum(dim=1).numpy()
    useful = text_flops(loaded.model, lengths)
    peak = matmul_gflops()
    print(f"reference open_clip loop (77 tokens): {len(texts) / ref_s:8.1f} texts/s")
    print(f"retriever encoder (trimmed, sorted):  {len(texts) / ours_s:8.1f} texts/s")
    print(f"speed-up: {ref_s / ours_s:.2f}x   min cosine to reference: {cosine:.6f}")
    print(f"mean real tokens per text: {lengths.mean():.1f} of {loaded.context_length}")
    print(
        f"useful GFLOP/s: ours {useful / ours_s / 1e9:.1f}, reference {useful / ref_s / 1e9:.1f}; "
        f"matmul {peak:.1f} GFLOP/s -> ours at {useful / ours_s / 1e9 / peak:.2f} of matmul"
    )


if __name__ == "__main__":
    main()
