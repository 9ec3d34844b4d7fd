#!/usr/bin/env python
"""B10, the peer: clip-interrogator 0.6.0's `interrogate` (best mode) on the same model, tables and images.

The same full-size ViT-B-32 with random weights as bench/b10_interrogate.py (open_clip's
`create_model_and_transforms("ViT-B-32")` after `torch.manual_seed(0)`, passed in through
clip-interrogator's `Config.clip_model`), no caption model (the same fixed caption is
given), the same 2,000-flavor subset plus artists, mediums, movements and trendings. The tables'
embeddings are handed to clip-interrogator's own cache (its safetensors files, with its label
hashes) from this project's cached tables, so neither side embeds during the timing and both rank
the same vectors. Time is in-process per image; the median is printed.

clip-interrogator needs its own environment (it pins transformers and friends). A cheap one
that shares torch, open_clip and transformers with this project's venv:

    python3 -m venv /tmp/civenv
    echo /path/to/.venv/lib/python3.11/site-packages > /tmp/civenv/lib/python3.11/site-packages/shared.pth
    /tmp/civenv/bin/pip install --no-deps --ignore-installed clip-interrogator==0.6.0
    # embed the tables once with this project (same cache as B10):
    python bench/b10_interrogate.py --cache /tmp/b10cache --intermediate 32 --images 2
    PYTHONPATH=$PWD /tmp/civenv/bin/python bench/b10_clip_interrogator.py --cache /tmp/b10cache --intermediate 32 --images 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

CAPTION = "a photograph of a lighthouse on a rocky coast at dusk"  # as b10_interrogate.py
NAME = "ViT-B-32/random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--flavors", type=int, default=2000)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument(
        "--cache", type=Path, required=True, help="this project's table cache (from b10_interrogate.py)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import clip_interrogator
    import clip_interrogator.clip_interrogator as ci_module
    import open_clip
    import torch
    from safetensors.numpy import save_file

    from retriever.models import toyworld

    torch.set_num_threads(args.threads)
    print(f"clip-interrogator {getattr(clip_interrogator, '__version__', '?')} from {clip_interrogator.__file__}")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    model.eval()

    # The flavor subset: clip-interrogator reads flavors.txt through load_list.
    original_load_list = ci_module.load_list

    def load_list(data_path: str, filename: str | None = None) -> list[str]:
        labels = original_load_list(data_path, filename)
        return labels[: args.flavors] if filename == "flavors.txt" else labels

    ci_module.load_list = load_list
    ci_cache = Path(tempfile.mkdtemp(prefix="b10-ci-"))
    seed_cache(ci_module, args.cache, ci_cache, load_list, save_file)

    config = ci_module.Config(
        caption_model_name=None,
        clip_model_name=NAME,
        cache_path=str(ci_cache),
        download_cache=False,
        device="cpu",
        flavor_intermediate_count=args.intermediate,
        quiet=True,
    )
    config.clip_model, config.clip_preprocess = model, preprocess  # plain class attributes, not init fields
    ci = ci_module.Interrogator(config)
    images = [toyworld.render(s, seed=i) for i, s in enumerate(toyworld.all_scenes()[:: 256 // args.images])][
        : args.images
    ]
    seconds, prompts = [], []
    for i, image in enumerate(images):
        start = time.perf_counter()
        prompts.append(ci.interrogate(image, caption=CAPTION))
        seconds.append(time.perf_counter() - start)
        print(f"image {i} clip-interrogator {seconds[-1]:.2f}s", flush=True)
    print(f"clip-interrogator: median {np.median(seconds):.2f} s/image  {[f'{t:.2f}' for t in seconds]}")
    for p in prompts:
        print("prompt:", p)


def seed_cache(ci_module, ours: Path, ci_cache: Path, load_list, save_file) -> None:
    """Write clip-interrogator's cache files from this project's tables (same labels, same model)."""
    import hashlib
    import os

    data = os.path.join(os.path.dirname(ci_module.__file__), "data")
    from retriever.prompts.label_tables import SITES as sites  # the same list clip-interrogator builds

    artists = load_list(data, "artists.txt")
    lists = {
        "artists": [f"by {a}" for a in artists] + [f"inspired by {a}" for a in artists],
        "flavors": load_list(data, "flavors.txt"),
        "mediums": load_list(data, "mediums.txt"),
        "movements": load_list(data, "movements.txt"),
        "trendings": [
            *sites,
            *(f"trending on {s}" for s in sites),
            *(f"featured on {s}" for s in sites),
            *(f"{s} contest winner" for s in sites),
        ],
        "negative": load_list(data, "negative.txt"),
    }
    import pyarrow.parquet as pq

    model_dir = next((ours / "tables").iterdir())
    for name, labels in lists.items():
        found = None
        for table in sorted(model_dir.glob(f"{name}-*")):
            texts = [str(t) for t in pq.read_table(next(table.glob("*.parquet"))).column("text").to_pylist()]
            if texts == labels:
                found = table
                break
        if found is None:
            print(f"{name}: no cached table with the same labels; clip-interrogator embeds it itself")
            continue
        if (found / "vectors.f16.npy").is_file():
            embeds = np.load(found / "vectors.f16.npy")
        else:  # tables from before vectors were stored: a flat index holds them
            import faiss

            index = faiss.read_index(str(found / "index.faiss"))
            embeds = index.reconstruct_n(0, index.ntotal)
        digest = hashlib.sha256(",".join(labels).encode()).hexdigest()
        save_file(
            {"embeds": embeds.astype(np.float16), "hash": np.array([ord(c) for c in digest], dtype=np.int8)},
            str(ci_cache / f"{NAME.replace('/', '_')}_{name}.safetensors"),
        )
        print(f"{name}: {len(labels):,} embeddings from {found}")


if __name__ == "__main__":
    main()
