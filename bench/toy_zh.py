#!/usr/bin/env python
"""The bundled toyworld-zh: R@1 of held-out renders against the 256 Chinese captions plus 10,000
Chinese lines that describe no scene, per rendering style (issue 14's target: >= 0.95).

    python bench/toy_zh.py --images 400

Measured 2026-11-28 (2-core Xeon), the bundled model (v3 English tower and projection, locked;
distilled onto the English text vectors; hard negatives), 256 captions only / + 10,000 unseen-word
non-captions: random 0.887 / 0.887, classic 0.958 / 0.958, plain-smallest 0.970 / 0.970,
flat-classic 0.980 / 0.980, noisy-jpeg (stress) 0.715 / 0.713. The previous model (v2 tower, no
distillation): 0.738, 0.900, 0.805, 0.930, 0.703 with the non-captions (docs/toyworld.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))
import alt_toyworld  # noqa: E402
from train_toyworld_zh import distractor_lines  # noqa: E402

from retriever.index.build import build_index  # noqa: E402
from retriever.models import toyworld  # noqa: E402
from retriever.models.loading import load_model  # noqa: E402
from retriever.search.api import Retriever  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--model", default="toyworld-zh", help="a bundled name or local-dir:PATH")
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu")
    styles = ["random", None, *toyworld.HELD_OUT_STYLES, *toyworld.STRESS_STYLES]
    samples = {style: list(toyworld.sample(args.images, seed=2024, style=style, lang="zh")) for style in styles}
    samples["alt-renderer"] = alt_renders(args.images, seed=2024)
    print(f"{'style':>15}  " + "  ".join(f"{name:>22}" for name in ("256 captions only", *DISTRACTORS)))
    rows: dict = {style: [] for style in samples}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in [("none", [])] + [
            (name, distractor_lines(10_000, seed=777, words=w)) for name, w in DISTRACTORS.items()
        ]:
            corpus = Path(tmp) / f"{name}.txt"
            corpus.write_text("\n".join(toyworld.all_captions("zh") + extra) + "\n", encoding="utf-8")
            out = build_index(corpus, Path(tmp) / name, loaded, show_progress_bar=False)
            retriever = Retriever.open(out.path)
            for style, pairs in samples.items():
                results = retriever.query_many([im for im, _ in pairs], k=1)
                rows[style].append(np.mean([hits[0].text == caption for hits, (_, caption) in zip(results, pairs)]))
    for style, values in rows.items():
        print(f"{style or 'classic':>15}  " + "  ".join(f"{v:>22.3f}" for v in values), flush=True)


def alt_renders(n: int, seed: int) -> list:
    """An independently written renderer's images (tests/models/alt_toyworld.py), captioned in Chinese."""
    chinese = {scene.caption: scene.caption_zh for scene in toyworld.all_scenes()}
    return [(image, chinese[caption]) for image, caption in alt_toyworld.sample(n, seed)]


# 10,000 lines each: half the captions with one attribute swapped for a word outside the world, half
# random characters. "unseen words" uses words training never showed (OTHER_WORDS["test"]).
DISTRACTORS = {"+10k, unseen words": "test", "+10k, training's words": "train"}


if __name__ == "__main__":
    main()
