#!/usr/bin/env python
"""Train the bundled `toyworld` CLIP: a tiny open_clip model on the synthetic toy world.

    python scripts/train_toyworld.py                      # writes retriever/models/weights/toyworld/
    python scripts/train_toyworld.py --steps 50 --out /tmp/toy   # a quick smoke run

The bundled weights (version 3) are three runs (about 65 CPU-minutes on 2 cores): 4,000 steps
with 16-pixel patches, 2,000 more at a lower rate on a freshly drawn image pool, then 1,500 with
8-pixel patches, started from the second run's weights converted by `halve_patches` (16-pixel
patches left a 4-pixel shape a few pixels inside one patch: the smallest shapes' errors):

    python scripts/train_toyworld.py --out /tmp/stage1
    python scripts/train_toyworld.py --init /tmp/stage1 --seed 1 --lr 3e-4 --steps 2000 --out /tmp/stage2
    python scripts/train_toyworld.py --init /tmp/stage2 --patch-size 8 --seed 2 --lr 3e-4 --steps 1500 --variants 192 --eval-every 250

Reproducible: the same seed and thread count give the same weights. Each batch holds every
caption exactly once (a fresh image each), so the contrastive loss never sees a duplicate
caption as a false negative.

Version 2: every training image is drawn in a random style (`toyworld.random_style`: noise,
grey level, scale, rotation, jitter, antialiasing, JPEG), and the model also learns partial
captions ("blue", "a star", "a large star", "on the left"): for each template of
`toyworld.PARTIAL_TEMPLATES` each image must pick its own text among that template's texts.
Within a template the texts are mutually exclusive, so this adds no false negatives.
Progress lines report R@1 on held-out styles, which training never draws.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from retriever.models import toyworld

MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
PREPROCESS_CFG = {"size": 64, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "retriever" / "models" / "weights" / "toyworld"


def write_config(out: Path, model_cfg: dict, extra: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS_CFG, **(extra or {})}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")


def render_pool(scenes, preprocess, per_scene: int, seed: int) -> torch.Tensor:
    """Pre-render `per_scene` variants of every scene, each in a random training style:
    [per_scene, len(scenes), 3, H, W] in fp16."""
    import numpy as np

    def one(scene, image_seed: int) -> torch.Tensor:
        style = toyworld.random_style(np.random.default_rng(image_seed + 1))
        return preprocess(toyworld.render(scene, seed=image_seed, style=style))

    return torch.stack(
        [
            torch.stack([one(s, seed * 1_000_000 + v * 1000 + i) for i, s in enumerate(scenes)]).to(torch.float16)
            for v in range(per_scene)
        ]
    )


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """Like `model.encode_text` with the padding past the longest text cut off; exact for causal towers."""
    length = int((tokens != 0).sum(dim=1).max())
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return x @ model.text_projection


@torch.inference_mode()
def recall_at_1(model, tokenizer, preprocess, n: int = 512, seed: int = 10_000, style: str | None = None) -> float:
    model.eval()
    captions = toyworld.all_captions()
    text = model.encode_text(tokenizer(captions), normalize=True)
    pairs = list(toyworld.sample(n, seed=seed, style=style))
    images = torch.stack([preprocess(img) for img, _ in pairs])
    image_features = model.encode_image(images, normalize=True)
    best = (image_features @ text.T).argmax(dim=1).tolist()
    model.train()
    return sum(captions[b] == cap for b, (_, cap) in zip(best, pairs)) / n


def training_args(doc: str, steps: int, variants: int, eval_every: int) -> argparse.ArgumentParser:
    """The options both toy training scripts share."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", type=int, default=variants, help="pre-rendered images per caption")
    parser.add_argument("--eval-every", type=int, default=eval_every)
    return parser


def adamw(model, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay 0.1 on matrices, none on embeddings, gains and biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def cosine_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def halve_patches(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights for half the patch size: the patch kernel summed over 2x2 pixel blocks and the
    position grid interpolated to twice the side, so the new model starts as the old one applied
    to the image upsampled 2x (nearest), and only has to learn the finer detail."""
    state = dict(state)
    w = state["visual.conv1.weight"]
    side = w.shape[-1] // 2
    state["visual.conv1.weight"] = w.reshape(w.shape[0], w.shape[1], side, 2, side, 2).sum(dim=(3, 5))
    pos = state["visual.positional_embedding"]
    grid = round((pos.shape[0] - 1) ** 0.5)
    old = pos[1:].reshape(grid, grid, -1).permute(2, 0, 1)[None]
    new = torch.nn.functional.interpolate(old, size=(2 * grid, 2 * grid), mode="bilinear", align_corners=False)
    state["visual.positional_embedding"] = torch.cat([pos[:1], new[0].permute(1, 2, 0).reshape(4 * grid * grid, -1)])
    return state


def main() -> None:
    parser = training_args(__doc__, steps=4000, variants=256, eval_every=500)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--partial-weight", type=float, default=0.5, help="weight of the partial-caption loss")
    parser.add_argument("--init", type=Path, help="continue from these weights (a folder this script wrote)")
    parser.add_argument(
        "--patch-size",
        type=int,
        default=16,
        help="vision patch size; half of --init's converts its weights (halve_patches)",
    )
    args = parser.parse_args()

    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model_cfg = {**MODEL_CFG, "vision_cfg": {**MODEL_CFG["vision_cfg"], "patch_size": args.patch_size}}
    model = open_clip.CLIP(**model_cfg)
    if args.init is not None:
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(args.init / "open_clip_model.safetensors").items()}
        model.load_state_dict(
            halve_patches(state) if state["visual.conv1.weight"].shape[-1] == 2 * args.patch_size else state
        )
    preprocess = open_clip.image_transform(64, is_train=False, mean=PREPROCESS_CFG["mean"], std=PREPROCESS_CFG["std"])
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model_cfg["text_cfg"]["context_length"])
    loss_fn = ClipLoss()
    optimizer = adamw(model, args.lr)

    scenes = toyworld.all_scenes()
    pool = render_pool(scenes, preprocess, args.variants, args.seed)
    all_tokens = tokenizer([s.caption for s in scenes])
    templates = toyworld.PARTIAL_TEMPLATES
    partial_texts = [toyworld.partial_captions(t) for t in templates]
    partial_tokens = tokenizer([text for texts in partial_texts for text in texts])
    # For each template, which of its texts each scene owns: [templates, scenes].
    owner = torch.tensor(
        [[texts.index(toyworld.partial_caption(t, s)) for s in scenes] for t, texts in zip(templates, partial_texts)]
    )
    bounds = torch.tensor([0] + [len(t) for t in partial_texts]).cumsum(0).tolist()
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    r1 = 0.0
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.lr, args.warmup, args.steps)
        order = torch.randperm(len(scenes), generator=generator).tolist()
        variant = torch.randint(args.variants, (len(order),), generator=generator)
        images = pool[variant, torch.tensor(order)].float()
        image_features = model.encode_image(images, normalize=True)
        text_features = torch.nn.functional.normalize(encode_text_trimmed(model, all_tokens[order]), dim=-1)
        scale = model.logit_scale.exp()
        loss = loss_fn(image_features, text_features, scale)
        if args.partial_weight > 0:
            partial = torch.nn.functional.normalize(encode_text_trimmed(model, partial_tokens), dim=-1)
            per_template = [
                torch.nn.functional.cross_entropy(scale * image_features @ partial[lo:hi].T, owner[j, order])
                for j, (lo, hi) in enumerate(zip(bounds, bounds[1:]))
            ]
            loss = loss + args.partial_weight * torch.stack(per_template).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            r1 = recall_at_1(model, tokenizer, preprocess)
            held_out = {
                name: recall_at_1(model, tokenizer, preprocess, n=256, style=name) for name in toyworld.HELD_OUT_STYLES
            }
            shown = "  ".join(f"{name} {r:.3f}" for name, r in held_out.items())
            print(
                f"step {step + 1:5d}  loss {loss.item():.4f}  held-out R@1 {r1:.3f}  styles: {shown}  "
                f"{time.perf_counter() - start:.0f}s",
                flush=True,
            )

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    write_config(
        args.out,
        model_cfg,
        {
            "training": {
                "script": "scripts/train_toyworld.py",
                "steps": args.steps,
                "seed": args.seed,
                "lr": args.lr,
                "threads": args.threads,
                "seconds": round(time.perf_counter() - start),
                "heldout_r_at_1": r1,
                "heldout_styles_r_at_1": held_out,
                "partial_weight": args.partial_weight,
                "init": str(args.init) if args.init else None,
                "version": 3 if args.patch_size == 8 else 2,
            }
        },
    )
    save_file(state, str(args.out / "open_clip_model.safetensors"))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
