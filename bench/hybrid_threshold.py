#!/usr/bin/env python
"""Where hybrid mode's --min-score default for toyworld comes from.

Index the toy world's captions minus a quarter of them, query held-out images, and compare the
best retrieved score when the image's caption is in the index (retrieval is right) with when it
is not (retrieval can only be wrong). A good threshold separates the two; then measure exact
match of retrieve-only vs hybrid (toyworld-coca, beam search) at that threshold.

    python bench/hybrid_threshold.py
"""

import tempfile
from pathlib import Path

import numpy as np

from retriever.index.build import build_index
from retriever.models import toyworld
from retriever.models.loading import load_model
from retriever.search.api import Retriever


def main() -> None:
    captions = toyworld.all_captions()
    rng = np.random.default_rng(0)
    missing = set(rng.choice(captions, size=len(captions) // 4, replace=False).tolist())
    pairs = list(toyworld.sample(400, seed=99))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "partial.txt"
        corpus.write_text("\n".join(c for c in captions if c not in missing) + "\n")
        build_index(corpus, Path(tmp) / "idx", load_model("toyworld", device="cpu"), show_progress_bar=False)
        retriever = Retriever.open(Path(tmp) / "idx", generator="toyworld-coca")
        images = [im for im, _ in pairs]
        retrieved = retriever.query_many(images, k=5)
        best = np.array([hits[0].score for hits in retrieved])
        present = np.array([cap not in missing for _, cap in pairs])
        print(
            f"best score, caption in index:     min {best[present].min():.3f}  p5 {np.percentile(best[present], 5):.3f}  median {np.median(best[present]):.3f}"
        )
        print(
            f"best score, caption not in index: max {best[~present].max():.3f}  p95 {np.percentile(best[~present], 95):.3f}  median {np.median(best[~present]):.3f}"
        )
        for threshold in (0.7, 0.75, 0.78, 0.8, 0.85):
            errors = np.mean((best < threshold) == present)
            print(f"threshold {threshold:.2f}: {errors:.3f} of images on the wrong side")
        from retriever.search.api import DEFAULT_MIN_SCORE

        hybrid = retriever.query_many(images, k=5, mode="hybrid")
        truth = [cap for _, cap in pairs]
        r_match = np.mean([h[0].text == t for h, t in zip(retrieved, truth)])
        h_match = np.mean([h[0].text == t for h, t in zip(hybrid, truth)])
        generated = np.mean([h[0].source == "generated" for h in hybrid])
        print(
            f"exact match at the default {DEFAULT_MIN_SCORE['toyworld']}: retrieve {r_match:.3f}, hybrid {h_match:.3f} "
            f"({generated:.2f} of top answers generated; {len(missing)} of 256 captions missing from the index)"
        )


if __name__ == "__main__":
    main()
