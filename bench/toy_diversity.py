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
import json
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
        rows += [{"text": text, "source": "rewording", **attributes} for text in rewordings(scene)]
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


def rewordings(scene: toyworld.Scene) -> list[str]:
    attributes = {"size": scene.size, "colour": scene.colour, "shape": scene.shape, "position": scene.position}
    return [t.format(caption=scene.caption, Caption=scene.caption.capitalize(), **attributes) for t in REWORDINGS]


def write_pairs(folder: Path, n: int, seed: int) -> Path:
    """Held-out images; each image's caption and its rewordings are all true captions of it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.tsv"
    scenes = {scene.caption: scene for scene in toyworld.all_scenes()}
    with open(path, "w", encoding="utf-8") as f:
        f.write("filepath\ttitle\n")
        for i, (image, caption) in enumerate(toyworld.sample(n, seed=seed, style="random")):
            image.save(folder / f"{i:04d}.png")
            for text in [caption, *rewordings(scenes[caption])]:
                f.write(f"{i:04d}.png\t{text}\n")
    return path


def near_duplicate_thresholds(thresholds: list[float]) -> None:
    """For each cosine threshold: the share of (caption, rewording) pairs it would merge (the
    same idea: should merge) and of captions one attribute apart (different ideas: should not)."""
    import numpy as np

    from retriever.models.encoder import Encoder
    from retriever.models.loading import load_model

    encoder = Encoder(load_model("toyworld", device="cpu"))
    scenes = toyworld.all_scenes()
    captions = encoder.encode_text([s.caption for s in scenes], show_progress_bar=False)
    same = []
    for scene, vector in zip(scenes, captions):
        variants = encoder.encode_text(rewordings(scene), show_progress_bar=False)
        same += list(variants @ vector)
    apart = [
        float(captions[i] @ captions[j])
        for i in range(len(scenes))
        for j in range(i + 1, len(scenes))
        if sum(a != b for a, b in zip(vars(scenes[i]).values(), vars(scenes[j]).values())) == 1
    ]
    print(f"highest cosine between captions one attribute apart: {max(apart):.3f}")
    print(
        "\n| --dedupe | rewordings merged with their caption (same idea) | captions one attribute apart merged (different ideas) |"
    )
    print("| --- | --- | --- |")
    for t in thresholds:
        print(f"| {t} | {np.mean(np.array(same) >= t):.3f} | {np.mean(np.array(apart) >= t):.3f} |")
    print(f"({len(same)} same-idea pairs, {len(apart)} one-attribute-apart pairs)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--work", type=Path, default=None, help="keep the corpus, images and index here")
    parser.add_argument("--diversity", default="0,0.3,0.5,0.7,0.9")
    parser.add_argument("--dedupe", default="none,0.99,0.98,0.95,0.9,0.85")
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
    near_duplicate_thresholds([float(v) for v in args.dedupe.split(",") if v != "none"])
    for sweep in (f"diversity={args.diversity}", f"dedupe={args.dedupe}"):
        command = [*retriever, "eval", str(pairs), "--index", str(index), "--sweep", sweep, "--json"]
        print("$ retriever " + " ".join(command[3:]), flush=True)
        rows = [
            json.loads(line)
            for line in subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
        ]
        print_table(sweep.split("=")[0], rows)


def print_table(option: str, rows: list[dict]) -> None:
    first = rows[0]
    print(
        f"image->text R@1/5/10 {first['image_to_text_recall@1']:.3f} / {first['image_to_text_recall@5']:.3f} / "
        f"{first['image_to_text_recall@10']:.3f}, MRR {first['image_to_text_mrr']:.3f}; "
        f"text->image R@1 {first['text_to_image_recall@1']:.3f}"
    )
    attributes = ("colour", "shape", "size", "position")
    print(
        f"| --{option} | top-1 true | intra-list similarity | mean relevance | distinct {' / '.join(attributes)} per top-10 |"
    )
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        value = row["options"][option]
        distinct = " / ".join(f"{row['distinct_per_list'].get(a, 0):.2f}" for a in attributes)
        print(
            f"| {'off' if value is None else value} | {row['top1_true_caption']:.3f} | "
            f"{row['intra_list_similarity']:.3f} | {row['mean_relevance']:.3f} | {distinct} |"
        )
    print(flush=True)


if __name__ == "__main__":
    main()
