#!/usr/bin/env python
"""Diversity and near-duplicates on the toy world plus flavors: the README's `retriever eval` sweep
tables, and the measurement behind `query`'s default `--dedupe`.

The corpus is what a writer's index looks like: every toy caption (with size, colour, shape and
position columns), every partial caption ("a blue star", "on the left": many ways to say part of
one idea), a few rewordings of each full caption ("A large red star on the left.", "large red
star, left"), and clip-interrogator's 100,970 flavors. The pairs are held-out toy images in
random rendering styles with their true captions. The index is built with the bundled `toyworld`
model, and both sweeps run `retriever eval` itself:

    python bench/toy_diversity.py --images 300 --work /tmp/toydiv

prints the two commands and their tables (diversity with dedupe off, then dedupe at diversity 0).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

from common import flavors, machine

from retriever.models import toyworld

REWORDINGS = (
    "{caption}.",
    "{Caption}",
    "{size} {colour} {shape}, {position}",
    "{colour} {shape} on the {position}",
    "the {size} {colour} {shape} is on the {position}",
)


def write_corpus(path: Path) -> None:
    rows: list[dict[str, str]] = []
    for scene in toyworld.all_scenes():
        attributes = {"size": scene.size, "colour": scene.colour, "shape": scene.shape, "position": scene.position}
        rows.append({"text": scene.caption, "source": "caption", **attributes})
        for template in REWORDINGS:
            text = template.format(caption=scene.caption, Caption=scene.caption.capitalize(), **attributes)
            rows.append({"text": text, "source": "rewording", **attributes})
    for template in toyworld.PARTIAL_TEMPLATES:
        for scene in toyworld.all_scenes():
            named = {key: value for key, value in vars(scene).items() if "{" + key + "}" in template}
            rows.append({"text": toyworld.partial_caption(template, scene), "source": "partial", **named})
    rows += [{"text": text, "source": "flavor"} for text in flavors()]
    columns = ["text", "source", "size", "colour", "shape", "position"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t", restval="", quoting=csv.QUOTE_NONE, escapechar=None)
        writer.writeheader()
        writer.writerows({**row, "text": row["text"].replace("\t", " ")} for row in rows)


def write_pairs(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.tsv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("filepath\ttitle\n")
        for i, (image, caption) in enumerate(toyworld.sample(n, seed=seed, style="random")):
            image.save(folder / f"{i:04d}.png")
            f.write(f"{i:04d}.png\t{caption}\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--work", type=Path, default=None, help="keep the corpus, images and index here")
    parser.add_argument("--diversity", default="0,0.3,0.5,0.7,0.9")
    parser.add_argument("--dedupe", default="none,0.98,0.95,0.9,0.85")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    work = args.work or Path(tempfile.mkdtemp(prefix="toydiv-"))
    work.mkdir(parents=True, exist_ok=True)
    retriever = [sys.executable, "-m", "retriever"]
    corpus, index = work / "toy-flavors.tsv", work / "toy-flavors"
    if not (index / "manifest.json").exists():
        write_corpus(corpus)
        subprocess.run(
            [*retriever, "build-index", str(corpus), "--model", "toyworld", "--out", str(index), "--overwrite"],
            check=True,
        )
    pairs = work / "pairs" / "pairs.tsv"
    if not pairs.exists():
        write_pairs(pairs.parent, args.images, args.seed)
    for sweep in (f"diversity={args.diversity}", f"dedupe={args.dedupe}"):
        command = [*retriever, "eval", str(pairs), "--index", str(index), "--sweep", sweep]
        print("$ retriever " + " ".join(command[3:]), flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
