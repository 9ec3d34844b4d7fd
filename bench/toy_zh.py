#!/usr/bin/env python
"""The bundled toyworld-zh: R@1 of held-out renders against the 256 Chinese captions plus 10,000
Chinese lines that describe no scene, per rendering style (issue 14's target: >= 0.95).

    python bench/toy_zh.py --images 400

Measured 2026-11-28 (2-core Xeon), the bundled model (v2 English tower, locked, 800 steps):
random 0.738, classic 0.900, plain-smallest 0.805, flat-classic 0.930, noisy-jpeg (stress) 0.703
-- short of the target; before (v1 tower): 0.36, 0.57, 0.30, 0.57, 0.41 (docs/toyworld.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from train_toyworld_zh import distractor_lines  # noqa: E402

from retriever.index.build import build_index  # noqa: E402
from retriever.models import toyworld  # noqa: E402
from retriever.models.loading import load_model  # noqa: E402
from retriever.search.api import Retriever  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(
            "\n".join(toyworld.all_captions("zh") + distractor_lines(10_000, seed=777)) + "\n", encoding="utf-8"
        )
        out = build_index(corpus, Path(tmp) / "idx", load_model("toyworld-zh", device="cpu"), show_progress_bar=False)
        retriever = Retriever.open(out.path)
        for style in ["random", None, *toyworld.HELD_OUT_STYLES, *toyworld.STRESS_STYLES]:
            pairs = list(toyworld.sample(args.images, seed=2024, style=style, lang="zh"))
            results = retriever.query_many([im for im, _ in pairs], k=1)
            r_at_1 = np.mean([hits[0].text == caption for hits, (_, caption) in zip(results, pairs)])
            print(f"{style or 'classic':>15}  R@1 {r_at_1:.3f}  ({out.report.kept - 256} distractors)", flush=True)


if __name__ == "__main__":
    main()
