#!/usr/bin/env python
"""How the bundled toy models hold up on rendering styles they were not trained on.

    python bench/toy_styles.py            # toyworld R@1 and toyworld-coca exact match per style
    python bench/toy_styles.py -n 300 --no-coca

Styles: `classic` (the v1 look), each of `toyworld.HELD_OUT_STYLES`, `alt-renderer` (an
independently written renderer of the same specification, tests/models/alt_toyworld.py), and
the `toyworld.STRESS_STYLES`, reported only.
R@1 ranks the 256 captions for each image; exact match greedy-decodes a caption with CoCa.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))

import alt_toyworld  # noqa: E402

from retriever.models import toyworld  # noqa: E402


def styled_samples(style: str, n: int, seed: int) -> list:
    """(image, caption) pairs in one named style."""
    if style == "alt-renderer":
        return alt_toyworld.sample(n, seed)
    return list(toyworld.sample(n, seed=seed, style=None if style == "classic" else style))


STYLES = ("classic", *toyworld.HELD_OUT_STYLES, "alt-renderer", *toyworld.STRESS_STYLES)


def recall_at_1(model, pairs) -> float:
    from retriever.models.encoder import Encoder

    encoder = Encoder(model)
    captions = toyworld.all_captions()
    xb = encoder.encode_text(captions, show_progress_bar=False)
    xq = encoder.encode_image([im for im, _ in pairs], show_progress_bar=False)
    best = (xq @ xb.T).argmax(axis=1)
    return sum(captions[b] == c for b, (_, c) in zip(best, pairs)) / len(pairs)


def exact_match(generator, pairs) -> float:
    from retriever.generate.captioner import Captioner

    written = Captioner(generator).caption([im for im, _ in pairs])
    return sum(w.strip() == c for w, (_, c) in zip(written, pairs)) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--generator", default="toyworld-coca")
    parser.add_argument("--no-coca", action="store_true")
    args = parser.parse_args()

    from retriever.models.loading import load_model

    model = load_model(args.model, device="cpu")
    generator = None if args.no_coca else load_model(args.generator, device="cpu")
    print(f"{'style':16s} {'R@1':>6s} {'exact':>6s}   (n={args.n}, seed={args.seed})")
    for style in STYLES:
        pairs = styled_samples(style, args.n, args.seed)
        em = f"{exact_match(generator, pairs):6.3f}" if generator else "     -"
        print(f"{style:16s} {recall_at_1(model, pairs):6.3f} {em}", flush=True)


if __name__ == "__main__":
    main()
