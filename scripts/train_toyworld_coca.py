#!/usr/bin/env python
"""Train the bundled `toyworld-coca` captioner: a tiny open_clip CoCa on the toy world.

    python scripts/train_toyworld_coca.py                       # writes retriever/models/weights/toyworld-coca/
    python scripts/train_toyworld_coca.py --steps 30 --out /tmp/coca   # a quick smoke run

Version 2 trains on the same random rendering styles as the toy CLIP (see train_toyworld.py)
and reports exact match on held-out styles.

CoCa's usual two losses: captioning, plus a contrastive loss on its own image and text
embeddings, which makes the vision side separate the attributes fast (caption loss alone left
"position" unlearned after 2,000 steps: 0.17 exact match). Retrieval still uses the separate
`toyworld` CLIP. Text and decoder are 64 wide so that the two 49408-token
tables (input embedding, output projection) fit the package's 16 MB budget in fp16.

The caption loss is a sampled softmax: each step scores the toy world's words plus 2,048 random
other tokens instead of all 49,408 (the output projection is most of a step's cost on a CPU).
Over a run every token is drawn as a negative many times, so at generation time, over the full
vocabulary, the toy words still win.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from train_toyworld import PREPROCESS_CFG, adamw, cosine_lr, render_pool, training_args, write_config

from retriever.models import toyworld

CONTEXT = 10  # the longest toy caption is 9 tokens with its start and end markers
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 64,
        "patch_size": 16,
        "width": 128,
        "layers": 3,
        "head_width": 32,
        "attentional_pool": True,
        "attn_pooler_queries": 16,
        "attn_pooler_heads": 4,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": CONTEXT,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 3,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {
        "context_length": CONTEXT,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 3,
        "attn_pooler_heads": 4,
    },
    "custom_text": True,
}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "retriever" / "models" / "weights" / "toyworld-coca"


@torch.inference_mode()
def exact_match(model, tokenizer, preprocess, n: int = 256, seed: int = 10_000, style: str | None = None) -> float:
    """Greedy captions (the model's own forward, full prefix each step) vs the true ones."""
    import open_clip

    model.eval()
    pairs = list(toyworld.sample(n, seed=seed, style=style))
    images = torch.stack([preprocess(img) for img, _ in pairs])
    _, image_embs = model._encode_image(images)
    out = torch.full((n, 1), tokenizer.sot_token_id, dtype=torch.long)
    for _ in range(CONTEXT - 1):
        logits = model(None, out, image_latent=torch.zeros(1), image_embs=image_embs, output_labels=False)["logits"][
            :, -1
        ]
        out = torch.cat([out, logits.argmax(dim=-1, keepdim=True)], dim=1)
    model.train()
    texts = [open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "").strip() for row in out]
    return sum(t == cap for t, (_, cap) in zip(texts, pairs)) / n


def forward(model, images: torch.Tensor, tokens: torch.Tensor, vocab: torch.Tensor):
    """Image and text embeddings, and teacher-forced next-token logits restricted to `vocab`."""
    image_latent, image_embs = model._encode_image(images)
    text_latent, token_embs = model._encode_text(tokens)
    decoder = model.text_decoder
    x = token_embs[:, :-1]
    length = x.shape[1]
    for block, cross in zip(decoder.resblocks, decoder.cross_attn):
        x = block(x, attn_mask=decoder.attn_mask[:length, :length])
        x = cross(x, k_x=image_embs, v_x=image_embs)
    return image_latent, text_latent, decoder.ln_final(x) @ decoder.text_projection[:, vocab]


def main() -> None:
    parser = training_args(__doc__, steps=2000, variants=128, eval_every=250)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--contrastive-weight", type=float, default=1.0)
    parser.add_argument("--negatives", type=int, default=2048, help="random vocabulary tokens scored per step")
    parser.add_argument(
        "--init-visual-from",
        default="toyworld",
        help="bundled CLIP whose vision trunk starts the CoCa's ('' for random)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    clip_loss = ClipLoss()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = open_clip.CoCa(**{k: v for k, v in MODEL_CFG.items() if k != "custom_text"})
    if args.init_visual_from:
        from retriever.models.loading import load_model

        clip_visual = load_model(args.init_visual_from, device="cpu").model.visual.state_dict()
        trunk = {k: v for k, v in clip_visual.items() if not k.startswith(("proj", "ln_post"))}
        missing, unexpected = model.visual.load_state_dict(trunk, strict=False)
        assert not unexpected, unexpected
        print(
            f"vision trunk from {args.init_visual_from}: {len(trunk)} tensors; new: {', '.join(sorted({m.split('.')[0] for m in missing}))}"
        )
    preprocess = open_clip.image_transform(64, is_train=False, mean=PREPROCESS_CFG["mean"], std=PREPROCESS_CFG["std"])
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT)
    optimizer = adamw(model, args.lr)

    scenes = toyworld.all_scenes()
    pool = render_pool(scenes, preprocess, args.variants, args.seed + 1)
    all_tokens = tokenizer([s.caption for s in scenes])
    toy_vocab = torch.unique(all_tokens[all_tokens != 0])
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    match = 0.0
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.lr, args.warmup, args.steps)
        which = torch.randperm(len(scenes), generator=generator)[: args.batch_size]  # distinct captions
        variant = torch.randint(args.variants, (args.batch_size,), generator=generator)
        negatives = torch.randint(49408, (args.negatives,), generator=generator)
        vocab = torch.unique(torch.cat([toy_vocab, negatives]))
        position = torch.full((49408,), -100, dtype=torch.long)
        position[vocab] = torch.arange(len(vocab))
        tokens = all_tokens[which]
        labels = position[tokens[:, 1:]]
        labels[tokens[:, 1:] == 0] = -100  # padding
        image_latent, text_latent, logits = forward(model, pool[variant, which].float(), tokens, vocab)
        loss = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=-100)
        if args.contrastive_weight:
            loss = loss + args.contrastive_weight * clip_loss(image_latent, text_latent, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            match = exact_match(model, tokenizer, preprocess)
            held_out = {
                name: exact_match(model, tokenizer, preprocess, n=128, style=name) for name in toyworld.HELD_OUT_STYLES
            }
            shown = "  ".join(f"{name} {m:.3f}" for name, m in held_out.items())
            print(
                f"step {step + 1:5d}  loss {loss.item():.4f}  held-out exact match {match:.3f}  styles: {shown}  "
                f"{time.perf_counter() - start:.0f}s",
                flush=True,
            )

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    write_config(
        args.out,
        MODEL_CFG,
        {
            "training": {
                "script": "scripts/train_toyworld_coca.py",
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seed": args.seed,
                "lr": args.lr,
                "contrastive_weight": args.contrastive_weight,
                "threads": args.threads,
                "init_visual_from": args.init_visual_from,
                "seconds": round(time.perf_counter() - start),
                "heldout_exact_match": match,
                "heldout_styles_exact_match": held_out,
                "version": 2,
            }
        },
    )
    save_file(state, str(args.out / "open_clip_model.safetensors"))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
