#!/usr/bin/env python
"""B4: peak memory of `retriever build-index` grows with the chunk size, not the corpus.

Builds indexes of synthetic short captions (200k and 2M by default) with the toyworld model in
a child process and reports its peak RSS. With `--index-type ivfpq --max-memory` the finished
index is small too, so the whole build stays bounded; with a flat index the final index itself
(n x d x 4 bytes) is the part that grows.

    python bench/b4_build_memory.py --sizes 200000,2000000
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine

WORDS = (
    "small large red green blue yellow purple orange white black circle square triangle star "
    "left right top bottom bright dark shiny matte tiny huge old new soft sharp"
).split()


def write_corpus(path: Path, n: int) -> None:
    rng = np.random.default_rng(n)
    with open(path, "w") as f:
        for start in range(0, n, 100_000):
            picks = rng.integers(len(WORDS), size=(min(100_000, n - start), 5))
            f.write("".join(f"a {' '.join(WORDS[i] for i in row)} {start + k}\n" for k, row in enumerate(picks)))


def peak_rss_of(cmd: list[str]) -> tuple[float, dict, float]:
    """Run `cmd` in a fresh process (via a wrapper) and return its peak RSS in MiB."""
    wrapper = (
        "import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:], "
        "'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    start = time.perf_counter()
    result = json.loads(
        subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True).stdout
    )
    if result["rc"] != 0:
        raise SystemExit(result["err"])
    return result["maxrss_kib"] / 1024, json.loads(result["out"]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200000,2000000")
    parser.add_argument("--flat-sizes", default="200000", help="sizes also built as a flat index")
    parser.add_argument("--chunk-size", type=int, default=65536)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    retriever = [sys.executable, "-m", "retriever"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            corpus = Path(tmp) / f"c{n}.txt"
            write_corpus(corpus, n)
            configs = [("ivfpq 256M", ["--max-memory", "256M", "--index-type", "ivfpq"])]
            if str(n) in args.flat_sizes.split(","):
                configs.insert(0, ("flat", ["--index-type", "flat"]))
            for label, extra in configs:
                cmd = [
                    *retriever,
                    "build-index",
                    str(corpus),
                    "--model",
                    "toyworld",
                    "--out",
                    str(Path(tmp) / f"i{n}"),
                    "--overwrite",
                    "--quiet",
                    "--json",
                    "--chunk-size",
                    str(args.chunk_size),
                    *extra,
                ]
                rss, summary, seconds = peak_rss_of(cmd)
                print(
                    f"{n:>9,} texts  {label:11} peak RSS {rss:7.0f} MiB  {summary['kept'] / seconds:8.0f} texts/s "
                    f"({seconds:.0f}s, {summary.get('recall_at_10', 1.0)} recall@10)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
