#!/usr/bin/env python
"""B6: fine-tuning speed, `retriever finetune` vs open_clip_train's main() on the same job.

Both run as fresh processes on the same TSV of toy-world images, model, weights, batch size,
learning rate, data workers and fp32, for one epoch, and each saves its checkpoint at the end:
the times include start-up and saving. The baseline needs open_clip_train's own dependencies
(`pip install webdataset braceexpand`). Models: the bundled toyworld CLIP, and a full-size
ViT-B-32 with random weights (the real FLOPs) saved as a checkpoint file.

    python bench/b6_finetune.py --pairs 2048 --batch 64 --big-pairs 256 --big-batch 32
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

from retriever.models import toyworld


def write_pairs(folder: Path, n: int) -> Path:
    lines = ["filepath\ttitle"]
    for i, (image, caption) in enumerate(toyworld.sample(n, seed=11)):
        path = folder / f"{i:05d}.png"
        image.save(path)
        lines.append(f"{path}\t{caption}")  # absolute: open_clip_train opens paths as given
    tsv = folder / "pairs.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def compare(label: str, model: str, pretrained: str | None, tsv: Path, batch: int, workers: int, work: Path) -> None:
    n = sum(1 for _ in open(tsv)) - 1
    steps = n // batch
    ours_cmd = [
        sys.executable,
        "-m",
        "retriever",
        "finetune",
        str(tsv),
        "--out",
        str(work / f"ours-{label}"),
        "--model",
        model,
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--lr",
        "1e-5",
        "--warmup",
        "2",
        "--workers",
        str(workers),
        "--precision",
        "fp32",
        "--json",
        "-q",
    ]
    if pretrained:
        ours_cmd += ["--pretrained", pretrained]
    theirs_cmd = [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--train-data",
        str(tsv),
        "--dataset-type",
        "csv",
        "--csv-separator",
        "\t",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        model,
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--lr",
        "1e-5",
        "--warmup",
        "2",
        "--wd",
        "0.1",
        "--workers",
        str(workers),
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--logs",
        str(work / f"theirs-{label}"),
        "--name",
        "run",
        "--report-to",
        "",
        "--log-every-n-steps",
        "1",
    ]
    if pretrained:
        theirs_cmd += ["--pretrained", pretrained]
    theirs_s, theirs_log = run(theirs_cmd)
    ours_s, ours_out = run(ours_cmd)
    theirs_losses = [float(x) for x in re.findall(r"Loss: ([0-9.]+)", theirs_log)]
    import json

    ours_loss = json.loads(ours_out.strip().splitlines()[-1])["epochs"][0]["train_loss"]
    print(f"{label}: {n} pairs, batch {batch}, {steps} steps, {workers} workers")
    print(
        f"  open_clip_train main(): {theirs_s:7.1f} s  ({steps / theirs_s:.2f} steps/s), "
        f"mean train loss {sum(theirs_losses) / max(1, len(theirs_losses)):.4f}"
    )
    print(f"  retriever finetune:     {ours_s:7.1f} s  ({steps / ours_s:.2f} steps/s), mean train loss {ours_loss:.4f}")
    print(f"  speed ratio (ours / open_clip_train): {theirs_s / ours_s:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--big-pairs", type=int, default=256, help="pairs for ViT-B-32 (0 skips it)")
    parser.add_argument("--big-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print(machine())
    from retriever.models.loading import BUNDLED_DIR

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "toy").mkdir()
        tsv = write_pairs(work / "toy", args.pairs)
        compare("toyworld", f"local-dir:{BUNDLED_DIR / 'toyworld'}", None, tsv, args.batch, args.workers, work)
        if args.big_pairs:
            import torch
            from safetensors.torch import save_file

            from retriever.models.loading import load_model

            torch.manual_seed(0)
            model = load_model("ViT-B-32", device="cpu", random_weights=True).model
            weights = work / "vit-b-32-random.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
            (work / "big").mkdir()
            big = write_pairs(work / "big", args.big_pairs)
            compare("ViT-B-32 (random weights)", "ViT-B-32", str(weights), big, args.big_batch, args.workers, work)


if __name__ == "__main__":
    main()
