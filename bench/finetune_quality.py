#!/usr/bin/env python
"""Does fine-tuning adapt a model to a user's data? The bundled toy CLIP learned captions like
"a large red star on the left"; this user writes "red star, large, left side". Fine-tune on
toy-world images captioned in that style and compare held-out caption R@1 (against all 256
restyled captions) before (the starting model, scored in the same run) and after each epoch.

    python bench/finetune_quality.py --train 2048 --val 512 --epochs 3 --lr 1e-4
    python bench/finetune_quality.py --small-only --lr 1e-4   # original captions, small shapes only
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import machine

from retriever.models import toyworld
from retriever.train.finetune import TrainOptions, finetune


def restyled(scene: toyworld.Scene) -> str:
    return f"{scene.colour} {scene.shape}, {scene.size}, {scene.position} side"


def write_pairs(folder: Path, n: int, seed: int, small_only: bool) -> Path:
    folder.mkdir(parents=True)
    scenes = [s for s in toyworld.all_scenes() if s.size == "small" or not small_only]
    rng = np.random.default_rng(seed)
    lines = ["filepath\ttitle"]
    for i in range(n):
        scene = scenes[int(rng.integers(len(scenes)))]
        toyworld.render(scene, seed=seed * 1_000_000 + i).save(folder / f"{i:05d}.png")
        lines.append(f"{i:05d}.png\t{scene.caption if small_only else restyled(scene)}")
    path = folder / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--val", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--small-only", action="store_true", help="small shapes with the original captions instead")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        train = write_pairs(Path(tmp) / "train", args.train, seed=21, small_only=args.small_only)
        val = write_pairs(Path(tmp) / "val", args.val, seed=22, small_only=args.small_only)
        options = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, workers=1)
        result = finetune(train, Path(tmp) / "out", "toyworld", val=val, options=options, show_progress_bar=False)
    data = "small-shape images, original captions" if args.small_only else "images with restyled captions"
    print(
        f"toyworld fine-tuned on {args.train} {data}, {args.epochs} epochs, batch "
        f"{args.batch_size}, lr {args.lr}; held-out: {args.val} images (R@1 counts distinct held-out captions)"
    )
    for report in [result.before, *result.epochs]:
        label = "before" if report.epoch == 0 else f"epoch {report.epoch}"
        print(f"  {label:8s} R@1 {report.recall_at_1:.3f}  val loss {report.val_loss:.4f}")
    print(f"  R@1 change: {result.epochs[-1].recall_at_1 - result.before.recall_at_1:+.3f} in {result.seconds:.0f} s")


if __name__ == "__main__":
    main()
