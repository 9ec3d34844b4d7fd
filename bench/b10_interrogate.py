#!/usr/bin/env python
"""B10: `interrogate --mode best` with prefix-shared encoding against the full re-encoding it replaces.

Both sides use the same full-size ViT-B-32 with random weights (the real FLOPs), the same
label tables (a 2,000-flavor subset plus mediums, artists, movements and trendings), a fixed
caption, and tables embedded beforehand (cached); the time is in-process, per image, median
over several images. "before" is the same code with prefix sharing switched off, which is the
path this project used before (every `prefix, term` tokenized twice and encoded in full).
Prompts must be identical.

    python bench/b10_interrogate.py --images 3
    python bench/b10_interrogate.py --images 2 --intermediate 128 --cache /tmp/b10cache --threads 1   # README's
    python bench/b10_interrogate.py --full-tables --images 2 --skip-before   # all ~112k labels
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, random_model

from retriever.models import toyworld
from retriever.prompts.interrogate import Interrogator
from retriever.prompts.label_tables import BUILTIN_TABLES, builtin_labels, ensure_table, load_table

CAPTION = "a photograph of a lighthouse on a rocky coast at dusk"


def tables(model, root: Path, flavors: int | None) -> list:
    out = []
    for name in BUILTIN_TABLES:
        if name == "negative":
            continue
        labels = builtin_labels(name)
        if name == "flavors" and flavors is not None:
            labels = labels[:flavors]
        status = ensure_table(name, labels, model, root, show_progress_bar=True)
        out.append(load_table(name, status.path, model))
    return out


def best(it: Interrogator, image, shared: bool) -> tuple[str, float]:
    it.builder.scorer.exact = shared
    start = time.perf_counter()
    prompt = it.interrogate(image, mode="best", caption=CAPTION).prompt
    return prompt, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--flavors", type=int, default=2000)
    parser.add_argument("--intermediate", type=int, default=None, help="flavor intermediate count (default 2048)")
    parser.add_argument("--full-tables", action="store_true", help="all flavors (~112k labels in all)")
    parser.add_argument("--skip-before", action="store_true", help="only time the new path")
    parser.add_argument("--cache", type=Path, default=None, help="table cache (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    print(f"machine: {machine()}")
    model = random_model("ViT-B-32")
    root = args.cache or Path(tempfile.mkdtemp(prefix="b10-"))
    start = time.perf_counter()
    loaded = tables(model, root, None if args.full_tables else args.flavors)
    print(f"tables ready in {time.perf_counter() - start:.0f}s: {sum(len(t) for t in loaded):,} labels")
    kwargs = {} if args.intermediate is None else {"flavor_intermediate_count": args.intermediate}
    it = Interrogator(model, loaded, **kwargs)
    images = [toyworld.render(s, seed=i) for i, s in enumerate(toyworld.all_scenes()[:: 256 // args.images])][
        : args.images
    ]
    after, before, t_after, t_before = [], [], [], []
    for i, image in enumerate(images):  # interleaved, alternating which side goes first (a shared machine)
        sides = [True] if args.skip_before else [True, False] if i % 2 == 0 else [False, True]
        for shared in sides:
            prompt, seconds = best(it, image, shared)
            (after if shared else before).append(prompt)
            (t_after if shared else t_before).append(seconds)
            print(f"image {i} {'after ' if shared else 'before'} {seconds:.2f}s", flush=True)
    print(f"after (prefix shared): median {np.median(t_after):.2f} s/image  {[f'{t:.2f}' for t in t_after]}")
    print(f"  texts shared {it.builder.scorer.shared:,}, in full {it.builder.scorer.full:,}")
    if not args.skip_before:
        print(f"before (full encoding): median {np.median(t_before):.2f} s/image  {[f'{t:.2f}' for t in t_before]}")
        ratios = [b / a for a, b in zip(t_after, t_before)]
        print(
            f"speed-up {np.median(t_before) / np.median(t_after):.1f}x (per image {[f'{r:.1f}' for r in ratios]}); "
            f"identical prompts: {before == after}"
        )
    print("example prompt:", after[0])


if __name__ == "__main__":
    main()
