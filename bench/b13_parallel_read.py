#!/usr/bin/env python
"""B13: what reading a corpus costs the driver of a distributed build, before and after parallel reading.

Before, the driver parsed, cleaned and de-duplicated every row itself (`iter_corpus`). Now the
actors scan the parts (`scan_part`: parse, clean, key, write the piece) and the driver only walks
the keys (`Deduper.add`). All three are timed here in one process, as CPU-seconds per row, on
a synthetic corpus of short captions with two metadata columns, as .txt and as .tsv.

    python bench/b13_parallel_read.py --n 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import machine, synthetic_captions

from retriever.corpus.parts import Deduper, piece_path, scan_part, split_corpus
from retriever.corpus.reader import CorpusReport, iter_corpus


def cpu(fn):
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, default=16)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="b13-"))
    texts = synthetic_captions(args.n, seed=0)
    (work / "corpus.txt").write_text("".join(t + "\n" for t in texts))
    (work / "corpus.tsv").write_text(
        "caption\tsource\tn\n" + "".join(f"{t}\tsrc{i % 7}\t{i}\n" for i, t in enumerate(texts))
    )
    print(f"{args.n:,} captions; CPU-seconds of one process, rows per CPU-second")
    print(
        f"{'format':6} {'driver before (iter_corpus)':>28} {'actors (scan_part)':>20} {'driver now (dedupe)':>20} {'driver speed-up':>16}"
    )
    for name in ("corpus.txt", "corpus.tsv"):
        path = work / name
        _, before = cpu(lambda: sum(1 for _ in iter_corpus(path)))  # noqa: B023
        layout = split_corpus(path, None, args.parts)
        assert layout is not None
        scans, scanning = cpu(lambda: [scan_part(layout, p, piece_path(work, p.number)) for p in layout.parts])  # noqa: B023
        dedupe = Deduper(layout, CorpusReport())
        _, deduping = cpu(lambda: [dedupe.add(s) for s in scans])  # noqa: B023
        print(
            f"{path.suffix:6} {args.n / before:>28,.0f} {args.n / scanning:>20,.0f} {args.n / deduping:>20,.0f} "
            f"{before / deduping:>15.1f}x"
        )


if __name__ == "__main__":
    main()
