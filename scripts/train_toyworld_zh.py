#!/usr/bin/env python
"""Train the bundled `toyworld-zh`: a tiny Chinese-CLIP (cn_clip's architecture and vocabulary) on the toy world.

    python scripts/train_toyworld_zh.py                       # writes retriever/models/weights/toyworld-zh/
    python scripts/train_toyworld_zh.py --steps 50 --out /tmp/toy-zh   # a quick smoke run

Captions are `{position}有一个{size}的{colour}{shape}` (左边有一个大的红色五角星). The model is
`retriever.models.cnclip_net.ChineseCLIP` with cn_clip's parameter names, a BERT text tower over
the bundled Chinese BERT vocabulary, and it loads through the same path as a released Chinese-CLIP
checkpoint (`cn_clip_config.json` + safetensors).

Like the v2 English toy: every image is drawn in a random training style, the model also learns
partial captions (红色, 五角星, 左边, 红色五角星, ...), and progress lines report R@1 on the
held-out styles. Two additions for a Chinese corpus:
- the image tower starts from the English `toyworld`'s (the same ViT, as cn_clip's is OpenAI's),
  so a few hundred CPU steps suffice (`--no-warm-start` trains from scratch);
- each batch also scores every image against 256 Chinese lines that describe no scene (random
  characters from the whole vocabulary, and captions with a colour, shape, size or position
  outside the world), so unseen characters learn to match nothing. `distractor_lines` draws
  them; the tests draw theirs with other words and another seed.

Reproducible: the same seed and thread count give the same weights.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from train_toyworld import adamw, cosine_lr, render_pool, training_args

from retriever.models import toyworld
from retriever.models.cnclip import CONFIG_FILE, WEIGHTS_FILE, preprocess_for
from retriever.models.cnclip_net import ChineseCLIP
from retriever.models.wordpiece import WordPieceTokenizer, is_cjk

MODEL_CFG = {
    "embed_dim": 128, "image_resolution": 64, "vision_layers": 3, "vision_width": 128, "vision_patch_size": 16,
    "vision_head_width": 32,
    "vocab_size": 21128, "text_hidden_size": 128, "text_intermediate_size": 512, "text_max_position_embeddings": 64,
    "text_num_attention_heads": 4, "text_num_hidden_layers": 2, "text_type_vocab_size": 2,
}
CONTEXT_LENGTH = 52
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "retriever" / "models" / "weights" / "toyworld-zh"
ENGLISH = ROOT / "retriever" / "models" / "weights" / "toyworld" / "open_clip_model.safetensors"
PARTIAL_TEMPLATES_ZH = ("{colour}", "{shape}", "{size}的", "{position}", "{colour}{shape}", "{size}的{shape}",
                        "{size}的{colour}{shape}", "{position}有一个{shape}", "{position}有一个{colour}{shape}")
# Words outside the world, for distractor captions; the tests use OTHER_WORDS["test"].
OTHER_WORDS = {
    "train": {"size": ["中等", "很小", "极大"], "colour": ["粉色", "棕色", "灰色", "金色", "青色"],
              "shape": ["椭圆形", "六边形", "菱形", "心形", "长方形"], "position": ["中间", "左上角", "右下角", "外面"]},
    "test": {"size": ["微小", "巨大", "中号"], "colour": ["银色", "褐色", "米色", "天蓝色", "深红色"],
             "shape": ["梯形", "十字形", "月牙形", "五边形", "箭头"], "position": ["正中", "右上角", "左下角", "里面"]},
}


def zh(template: str, scene: toyworld.Scene) -> str:
    Z = toyworld.ZH
    return template.format(size=Z[scene.size], colour=Z[scene.colour], shape=Z[scene.shape], position=Z[scene.position])


def distractor_lines(n: int, seed: int, words: str = "train") -> list[str]:
    """`n` Chinese lines that describe no toy scene: up to half of them captions with one attribute
    outside the world (from OTHER_WORDS[words]), the rest random characters, in a random order."""
    rng = np.random.default_rng(seed)
    other = OTHER_WORDS[words]
    near = []
    for scene in toyworld.all_scenes():
        for slot, replacements in other.items():
            for word in replacements:
                parts = {k: toyworld.ZH[getattr(scene, k)] for k in other}
                parts[slot] = word
                near.append(f"{parts['position']}有一个{parts['size']}的{parts['colour']}{parts['shape']}")
    near = [near[i] for i in rng.permutation(len(near))[:n // 2]]
    chars = [w for w in WordPieceTokenizer().vocab if len(w) == 1 and is_cjk(w)]
    real, out = set(toyworld.all_captions("zh")), dict.fromkeys(near)
    while len(out) < n:
        line = "".join(chars[i] for i in rng.integers(len(chars), size=int(rng.integers(2, 20))))
        if line not in real:
            out[line] = None
    lines = list(out)
    return [lines[i] for i in rng.permutation(len(lines))]


@torch.inference_mode()
def recall_at_1(model, tokenizer, preprocess, n: int = 512, seed: int = 10_000, style: str | None = "random") -> float:
    model.eval()
    captions = toyworld.all_captions("zh")
    text = model.encode_text(tokenizer(captions), normalize=True)
    pairs = list(toyworld.sample(n, seed=seed, style=style, lang="zh"))
    image_features = model.encode_image(torch.stack([preprocess(img) for img, _ in pairs]), normalize=True)
    best = (image_features @ text.T).argmax(dim=1).tolist()
    model.train()
    return sum(captions[b] == cap for b, (_, cap) in zip(best, pairs)) / n


def main() -> None:
    parser = training_args(__doc__, steps=800, variants=64, eval_every=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--partial-weight", type=float, default=0.5, help="weight of the partial-caption loss")
    parser.add_argument("--negatives", type=int, default=256, help="distractor lines per batch")
    parser.add_argument("--no-warm-start", action="store_true", help="train the image tower from scratch too")
    args = parser.parse_args()

    from safetensors.torch import load_file, save_file

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = ChineseCLIP(MODEL_CFG)
    if not args.no_warm_start:
        english = {k: v.float() for k, v in load_file(str(ENGLISH)).items() if k.startswith("visual.")}
        model.load_state_dict(english, strict=False)
    preprocess = preprocess_for(MODEL_CFG["image_resolution"])
    tokenizer = WordPieceTokenizer(context_length=CONTEXT_LENGTH)
    optimizer = adamw(model, args.lr)

    scenes = toyworld.all_scenes()
    pool = render_pool(scenes, preprocess, args.variants, args.seed)
    all_tokens = tokenizer([s.caption_zh for s in scenes])
    partial_texts = [list(dict.fromkeys(zh(t, s) for s in scenes)) for t in PARTIAL_TEMPLATES_ZH]
    partial_tokens = tokenizer([text for texts in partial_texts for text in texts])
    owner = torch.tensor([[texts.index(zh(t, s)) for s in scenes] for t, texts in zip(PARTIAL_TEMPLATES_ZH, partial_texts)])
    bounds = torch.tensor([0] + [len(t) for t in partial_texts]).cumsum(0).tolist()
    negative_tokens = tokenizer(distractor_lines(20_000, seed=args.seed))
    generator = torch.Generator().manual_seed(args.seed)
    ce = torch.nn.functional.cross_entropy
    start = time.perf_counter()
    r1, held_out = 0.0, {}
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.lr, args.warmup, args.steps)
        order = torch.randperm(len(scenes), generator=generator)
        variant = torch.randint(args.variants, (len(order),), generator=generator)
        images = pool[variant, order].float()
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(all_tokens[order], normalize=True)
        pick = torch.randint(len(negative_tokens), (args.negatives,), generator=generator)
        negatives = model.encode_text(negative_tokens[pick], normalize=True)
        scale = model.logit_scale.exp()
        target = torch.arange(len(order))
        loss = (ce(scale * image_features @ torch.cat([text_features, negatives]).T, target)
                + ce(scale * text_features @ image_features.T, target)) / 2
        if args.partial_weight > 0:
            partial = model.encode_text(partial_tokens, normalize=True)
            per_template = [ce(scale * image_features @ partial[lo:hi].T, owner[j, order])
                            for j, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
            loss = loss + args.partial_weight * torch.stack(per_template).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            r1 = recall_at_1(model, tokenizer, preprocess)
            held_out = {name: recall_at_1(model, tokenizer, preprocess, n=256, style=name) for name in toyworld.HELD_OUT_STYLES}
            shown = "  ".join(f"{name} {r:.3f}" for name, r in held_out.items())
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  held-out R@1 {r1:.3f}  styles: {shown}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "context_length": CONTEXT_LENGTH, "training": {
        "script": "scripts/train_toyworld_zh.py", "steps": args.steps, "seed": args.seed, "lr": args.lr,
        "threads": args.threads, "variants": args.variants, "negatives": args.negatives,
        "warm_start": None if args.no_warm_start else "toyworld (image tower)",
        "seconds": round(time.perf_counter() - start), "heldout_r_at_1": r1, "heldout_styles_r_at_1": held_out,
        "partial_weight": args.partial_weight,
    }}
    (args.out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / WEIGHTS_FILE))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
