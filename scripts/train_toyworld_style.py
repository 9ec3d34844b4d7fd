#!/usr/bin/env python
"""Train the bundled `toyworld-style` decoder: text only, on the 256 toy captions (DeCap's recipe).

    python scripts/train_toyworld_style.py                      # writes retriever/models/weights/toyworld-style/
    python scripts/train_toyworld_style.py --out /tmp/style     # elsewhere

No image is seen: the decoder learns to rewrite each caption from the bundled `toyworld` CLIP's
text embedding of it, and captions images through DeCap's memory projection (the 256 caption
embeddings are stored in the folder, 64 KB in fp16). The folder records the `toyworld` weights'
fingerprint, so whenever those weights are retrained this script must be run again (about a
minute on two CPU cores); `style:toyworld-style` otherwise refuses to load, naming both models.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from retriever.models import toyworld
from retriever.models.loading import BUNDLED_DIR
from retriever.train.style import STATE_DIR, StyleOptions, train_style

# Small enough to ship (about 1.8 MB), and exact on held-out toy images (bench/b11_style.py).
OPTIONS = StyleOptions(width=128, layers=2, heads=4, epochs=30, batch_size=32, lr=1e-3, projection="memory", seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR / "toyworld-style")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "toyworld_captions.txt"
        corpus.write_text("\n".join(toyworld.all_captions()) + "\n")
        result = train_style(corpus, args.out, "toyworld", val=corpus, options=OPTIONS, overwrite=True, device="cpu")
    shutil.rmtree(args.out / STATE_DIR)  # the resumable state is not shipped
    last = result.epochs[-1]
    print(
        f"wrote {args.out}: {result.parameters:,} parameters, {result.vocab_size} tokens, "
        f"reconstruction exact match {last.exact_match:.3f}, {result.seconds:.0f}s"
    )


if __name__ == "__main__":
    main()
