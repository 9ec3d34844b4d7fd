#!/usr/bin/env python
"""B5: caption generation speed, retriever's decoding vs open_clip's `generate`, same output.

Same model, images, batch and decoding on both sides, measured in one run; open_clip needs
transformers 4.56.x for `generate`. Models: full-size coca_ViT-B-32 with random weights (the
real FLOPs; a random model rarely ends early, so every caption runs to --max-len) and the
bundled toyworld-coca.

    python bench/b5_generation.py --batch 4 --beams 6 --max-len 20 --toy-batches 1,4,16
"""

import argparse
import time

import torch
from common import machine

from retriever.generate.captioner import Captioner
from retriever.generate.decoding import DecodeOptions
from retriever.models import toyworld
from retriever.models.loading import ModelSpec, load_model, wrap_model


def until_eos(tokens: list[int], eos: int = 49407) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def repeat(fn, min_seconds: float = 3.0):
    """fn's result and its mean time over as many runs as fill `min_seconds` (at least one)."""
    runs, start = 0, time.perf_counter()
    while runs == 0 or time.perf_counter() - start < min_seconds:
        result = fn()
        runs += 1
    return result, (time.perf_counter() - start) / runs


def compare(loaded, images, method: str, beams: int, max_len: int) -> None:
    captioner = Captioner(loaded)
    opts = DecodeOptions(method=method, beams=beams, max_len=max_len)
    pixels = torch.stack([loaded.preprocess(im) for im in images])
    kwargs = (
        {"generation_type": "beam_search", "num_beams": beams, "num_beam_groups": 1}
        if method == "beam"
        else {"generation_type": "top_k", "top_k": 1}
    )
    captioner.generate_tokens(images[:1], opts)  # warm-up
    ours, ours_s = repeat(lambda: [until_eos(t[0]) for t in captioner.generate_tokens(images, opts)])
    with torch.inference_mode():
        ref, ref_s = repeat(
            lambda: [until_eos(t) for t in loaded.model.generate(pixels, seq_len=max_len, **kwargs).tolist()]
        )
    label = f"{loaded.spec.name} {method}{f' x{beams}' if method == 'beam' else ''}, batch {len(images)}"
    print(
        f"{label:32} open_clip {len(images) / ref_s:7.2f} captions/s   ours {len(images) / ours_s:7.2f} captions/s   "
        f"speed-up {ref_s / ours_s:5.2f}x   identical output: {ours == ref}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--beams", type=int, default=6)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--toy-batches", default="1,4,16", help="batch sizes for the toy model")
    args = parser.parse_args()
    import open_clip

    print(f"machine: {machine()}")
    print(f"batch {args.batch} images, max length {args.max_len} tokens")
    images = [im for im, _ in toyworld.sample(args.batch, seed=11)]
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("coca_ViT-B-32")
    # open_clip leaves the decoder's output projection uninitialised (torch.empty, in practice
    # zeros): every logit ties and "greedy" samples at random. Give it real random weights.
    torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width**-0.5)
    big = wrap_model(
        ModelSpec("coca_ViT-B-32", "random"),
        model,
        preprocess,
        open_clip.get_tokenizer("coca_ViT-B-32"),
        "coca_ViT-B-32/random",
        "cpu",
    )
    toy = load_model("toyworld-coca", device="cpu")
    for method in ("greedy", "beam"):
        compare(big, images, method, args.beams, args.max_len)
    for batch in (int(b) for b in args.toy_batches.split(",")):
        toy_images = [im for im, _ in toyworld.sample(batch, seed=11)]
        for method in ("greedy", "beam"):
            compare(toy, toy_images, method, args.beams, 10)


if __name__ == "__main__":
    main()
