#!/usr/bin/env python
"""B12: `retriever query FOLDER` throughput with images decoded in worker processes.

A folder of toy images saved as 512x512 JPEGs (the size of a phone photo after a messenger
has shrunk it), queried against a toy index with the bundled model or a random-weight
ViT-B-32, once per --workers setting. Reports images/s end to end (CLI process start, model
load, decoding, encoding, search, JSON out) and the ratio to --workers 0, measured in the same run.

    python bench/b12_image_workers.py --images 2000 --workers 0,1,2
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

from retriever.models import toyworld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, (image, _) in enumerate(toyworld.sample(args.images, seed=12, style="random")):
            image.resize((args.side, args.side)).save(folder / f"{i:05d}.jpg", quality=90)
        corpus = Path(tmp) / "captions.txt"
        corpus.write_text("\n".join(toyworld.all_captions()) + "\n")
        index = Path(tmp) / "index"
        cli = [sys.executable, "-m", "retriever"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        build = [*cli, "build-index", str(corpus), "--out", str(index), "--model", "toyworld", "--quiet"]
        subprocess.run(build, check=True, env=env)
        print(f"{args.images} images, {args.side}x{args.side} JPEG, toyworld model")
        print(f"{'workers':>7} {'seconds':>8} {'images/s':>9} {'vs 0':>6}")
        base = None
        for workers in args.workers.split(","):
            start = time.perf_counter()
            subprocess.run(
                [*cli, "query", str(folder), "-i", str(index), "-k", "10", "--json", "--workers", workers],
                check=True,
                stdout=subprocess.DEVNULL,
                env=env,
            )
            seconds = time.perf_counter() - start
            rate = args.images / seconds
            base = base or rate
            print(f"{workers:>7} {seconds:8.1f} {rate:9.0f} {rate / base:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
