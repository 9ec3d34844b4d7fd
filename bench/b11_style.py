#!/usr/bin/env python
"""B11: text-only style decoders (DeCap / CapDec) on the toy world: quality and speed.

No image is ever paired with a caption in training. Three corpora, each trained twice (with
CapDec's noise and for DeCap's memory projection), each scored on held-out toy images by exact
match of the beam-6 caption:

  (a) same voice: all 256 captions;
  (b) novel combinations: 192 captions, scored on images of the 64 held-out combinations;
  (c) voice transfer: the 256 captions restyled ("red star, large, left side").

Also: training throughput (target tokens/s on this machine) and generation captions/s against
the bundled toyworld-coca (beam 6), on the same images, in the same run.

    nice -n 5 python bench/b11_style.py --images 200 --epochs 30
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine

from retriever.generate.captioner import Captioner
from retriever.generate.decoding import DecodeOptions
from retriever.generate.style import StyleCaptioner
from retriever.models import toyworld
from retriever.models.loading import load_model
from retriever.train.style import StyleOptions, train_style


def restyled(scene: toyworld.Scene) -> str:
    """bench/finetune_quality.py's user voice."""
    return f"{scene.colour} {scene.shape}, {scene.size}, {scene.position} side"


def held_out_split(seed: int = 0) -> tuple[list[toyworld.Scene], list[toyworld.Scene]]:
    """192 training scenes and 64 held-out ones (every attribute value still seen in training)."""
    scenes = toyworld.all_scenes()
    order = np.random.default_rng(seed).permutation(len(scenes))
    return [scenes[i] for i in sorted(order[64:])], [scenes[i] for i in sorted(order[:64])]


def images_of(scenes: list[toyworld.Scene], n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    picked = [scenes[int(rng.integers(len(scenes)))] for _ in range(n)]
    return [(toyworld.render(s, seed=seed * 100_000 + i), s) for i, s in enumerate(picked)]


def exact(captioner, images: list[tuple], voice, opts: DecodeOptions) -> tuple[float, list[str]]:
    out = captioner.caption([im for im, _ in images], opts)
    return sum(o == voice(s) for o, (_, s) in zip(out, images)) / len(images), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    opts = DecodeOptions(method="beam", beams=6)
    train_scenes, novel_scenes = held_out_split()
    all_scenes = toyworld.all_scenes()
    cases = {
        "a same voice": ([s.caption for s in all_scenes], images_of(all_scenes, args.images, 1), lambda s: s.caption),
        "b novel combos": (
            [s.caption for s in train_scenes],
            images_of(novel_scenes, args.images, 2),
            lambda s: s.caption,
        ),
        "c voice transfer": ([restyled(s) for s in all_scenes], images_of(all_scenes, args.images, 3), restyled),
    }
    clip = load_model("toyworld", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (lines, images, voice) in cases.items():
            corpus = Path(tmp) / f"{label[0]}.txt"
            corpus.write_text("\n".join(lines) + "\n")
            for projection in ("memory", "noise"):
                out = Path(tmp) / f"{label[0]}-{projection}"
                options = StyleOptions(
                    width=args.width,
                    layers=args.layers,
                    heads=4,
                    epochs=args.epochs,
                    batch_size=32,
                    lr=args.lr,
                    projection=projection,
                )
                start = time.perf_counter()
                result = train_style(corpus, out, "toyworld", options=options, device="cpu", show_progress_bar=False)
                seconds = time.perf_counter() - start
                captioner = StyleCaptioner(out, clip=clip)
                score, written = exact(captioner, images, voice, opts)
                other = "noise" if projection == "memory" else "memory"
                other_score = exact(StyleCaptioner(out, clip=clip, projection=other), images, voice, opts)[0]
                print(
                    f"{label:17} trained for {projection:6}: exact {score:.3f} (inference with {other}: {other_score:.3f}); "
                    f"{len(lines)} lines, {result.parameters:,} parameters, {seconds:.0f}s, "
                    f"{result.extra['tokens_per_second']:,.0f} tokens/s; e.g. {written[0]!r}",
                    flush=True,
                )
        images = [im for im, _ in cases["a same voice"][1]]
        style = StyleCaptioner(Path(tmp) / "a-memory", clip=clip)
        coca = Captioner(load_model("toyworld-coca", device="cpu"))
        for name, captioner in (("toyworld-coca", coca), ("style (memory)", style)):
            captioner.caption(images[:4], opts)  # warm-up
            start = time.perf_counter()
            captioner.caption(images, opts)
            rate = len(images) / (time.perf_counter() - start)
            print(f"generation, beam 6, {len(images)} images: {name:15} {rate:7.1f} captions/s", flush=True)


if __name__ == "__main__":
    main()
