#!/usr/bin/env python
"""Train the bundled `toyworld-zh`: a tiny Chinese-CLIP (cn_clip's architecture and vocabulary) on the toy world.

    python scripts/train_toyworld_zh.py                       # writes retriever/models/weights/toyworld-zh/
    python scripts/train_toyworld_zh.py --steps 50 --out /tmp/toy-zh   # a quick smoke run

The image tower and projection are the bundled English `toyworld`'s (`--english DIR` for
another), locked; the Chinese text tower learns to match them (below). About 8 CPU-minutes.

Captions are `{position}有一个{size}的{colour}{shape}` (左边有一个大的红色五角星). The model is
`retriever.models.cnclip_net.ChineseCLIP` with cn_clip's parameter names, a BERT text tower over
the bundled Chinese BERT vocabulary, and it loads through the same path as a released Chinese-CLIP
checkpoint (`cn_clip_config.json` + safetensors).

Like the v2 English toy, every image is drawn in a random training style, the model also learns
partial captions (红色, 五角星, 左边, 红色五角星, ...), and progress lines report R@1 on the
held-out styles. What is particular to it:
- the image tower is the English `toyworld`'s (the same ViT, as cn_clip's is OpenAI's), locked
  as in LiT (Zhai et al., 2022): its output for the pre-rendered pool is computed once, and only
  the Chinese text tower and the temperature train. `--train-blocks N` also trains the tower's
  last N blocks, `--train-image-tower` all of it (much more slowly);
- distillation (`--distill-weight`): each Chinese caption and partial caption is pulled onto the
  English model's text vector for its translation (ENGLISH_TEMPLATES), so the Chinese text tower
  lands in the English model's space (multilingual distillation, Reimers & Gurevych 2020; M-CLIP);
  the image projection then stays the English one;
- each batch also scores every image against 64 Chinese lines that describe no scene (random
  characters from the whole vocabulary, and captions with a colour, shape, size or position
  outside the world; `distractor_lines`) and, per image, `--hard-negatives` lines that swap one
  of its own attributes for a listed word or random characters (`swapped_lines`), so that any
  unknown word in a slot breaks the match. The tests and bench/toy_zh.py draw theirs with words
  training never shows (OTHER_WORDS["test"]).

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
    "embed_dim": 128,
    "image_resolution": 64,
    "vision_layers": 3,
    "vision_width": 128,
    "vision_patch_size": 16,
    "vision_head_width": 32,
    "vocab_size": 21128,
    "text_hidden_size": 128,
    "text_intermediate_size": 512,
    "text_max_position_embeddings": 64,
    "text_num_attention_heads": 4,
    "text_num_hidden_layers": 2,
    "text_type_vocab_size": 2,
}
CONTEXT_LENGTH = 52
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "retriever" / "models" / "weights" / "toyworld-zh"
ENGLISH = ROOT / "retriever" / "models" / "weights" / "toyworld"
PARTIAL_TEMPLATES_ZH = (
    "{colour}",
    "{shape}",
    "{size}的",
    "{position}",
    "{colour}{shape}",
    "{size}的{shape}",
    "{size}的{colour}{shape}",
    "{position}有一个{shape}",
    "{position}有一个{colour}{shape}",
)
# The English toy model's text for each Chinese template (None: English has no such template).
ENGLISH_TEMPLATES = (
    "{colour}",
    "{shape}",
    "{size}",
    "on the {position}",
    "a {colour} {shape}",
    "a {size} {shape}",
    "a {size} {colour} {shape}",
    "a {shape} on the {position}",
    None,
)
# Words outside the world, for distractor captions; the tests use OTHER_WORDS["test"].
OTHER_WORDS = {
    "train": {
        "size": ["中等", "很小", "极大"],
        "colour": ["粉色", "棕色", "灰色", "金色", "青色"],
        "shape": ["椭圆形", "六边形", "菱形", "心形", "长方形"],
        "position": ["中间", "左上角", "右下角", "外面"],
    },
    "test": {
        "size": ["微小", "巨大", "中号"],
        "colour": ["银色", "褐色", "米色", "天蓝色", "深红色"],
        "shape": ["梯形", "十字形", "月牙形", "五边形", "箭头"],
        "position": ["正中", "右上角", "左下角", "里面"],
    },
}


def zh(template: str, scene: toyworld.Scene) -> str:
    Z = toyworld.ZH
    return template.format(size=Z[scene.size], colour=Z[scene.colour], shape=Z[scene.shape], position=Z[scene.position])


def caption_of(parts: dict[str, str]) -> str:
    """A caption in the world's pattern from Chinese words for each slot (some maybe outside it)."""
    return f"{parts['position']}有一个{parts['size']}的{parts['colour']}{parts['shape']}"


def cjk_characters() -> list[str]:
    """Every single CJK character of the bundled vocabulary, for random lines and words."""
    return [w for w in WordPieceTokenizer().vocab if len(w) == 1 and is_cjk(w)]


def near_lines(scene: toyworld.Scene, words: str = "train") -> list[str]:
    """`scene`'s caption with one attribute swapped for a word outside the world (OTHER_WORDS[words])."""
    out = []
    for slot, replacements in OTHER_WORDS[words].items():
        for word in replacements:
            parts = {k: toyworld.ZH[getattr(scene, k)] for k in OTHER_WORDS[words]}
            parts[slot] = word
            out.append(caption_of(parts))
    return out


def swapped_lines(scene: toyworld.Scene, n: int, rng: np.random.Generator, chars: list[str]) -> list[str]:
    """`n` lines that swap one of `scene`'s attributes for something outside the world: a word of
    OTHER_WORDS["train"] or 1-3 random characters (half the time ending in 形, as most shape
    names do), so that the model learns that any unknown word in a slot breaks the match, not only
    the words it was shown."""
    out = []
    slots = list(OTHER_WORDS["train"])
    for _ in range(n):
        parts = {k: toyworld.ZH[getattr(scene, k)] for k in slots}
        slot = slots[int(rng.integers(len(slots)))]
        if rng.random() < 0.3:
            word = OTHER_WORDS["train"][slot][int(rng.integers(len(OTHER_WORDS["train"][slot])))]
        else:
            word = "".join(chars[i] for i in rng.integers(len(chars), size=int(rng.integers(1, 4))))
            if slot == "shape" and rng.random() < 0.5:
                word += "形"
            elif slot == "colour" and rng.random() < 0.5:
                word += "色"
        if word == parts[slot]:
            word += "的"
        parts[slot] = word
        out.append(caption_of(parts))
    return out


def distractor_lines(n: int, seed: int, words: str = "train") -> list[str]:
    """`n` Chinese lines that describe no toy scene: up to half of them captions with one attribute
    outside the world (from OTHER_WORDS[words]), the rest random characters, in a random order."""
    rng = np.random.default_rng(seed)
    near = [line for scene in toyworld.all_scenes() for line in near_lines(scene, words)]
    near = [near[i] for i in rng.permutation(len(near))[: n // 2]]
    chars = cjk_characters()
    real, out = set(toyworld.all_captions("zh")), dict.fromkeys(near)
    while len(out) < n:
        line = "".join(chars[i] for i in rng.integers(len(chars), size=int(rng.integers(2, 20))))
        if line not in real:
            out[line] = None
    lines = list(out)
    return [lines[i] for i in rng.permutation(len(lines))]


def trunk(model, pixels: torch.Tensor, frozen: int) -> torch.Tensor:
    """The image tower's tokens after its first `frozen` blocks (open_clip's VisionTransformer.forward, split)."""
    v = model.visual
    x = v.conv1(pixels.to(v.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    for block in v.transformer.resblocks[:frozen]:
        x = block(x)
    return x


def head(model, tokens: torch.Tensor, frozen: int) -> torch.Tensor:
    """The rest of the image tower, from `trunk`'s tokens to normalised image features."""
    v = model.visual
    for block in v.transformer.resblocks[frozen:]:
        tokens = block(tokens)
    return torch.nn.functional.normalize(v.ln_post(tokens[:, 0]) @ v.proj, dim=-1)


@torch.inference_mode()
def image_features_of(model, pixels: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat(
        [model.encode_image(pixels[i : i + batch].float(), normalize=True) for i in range(0, len(pixels), batch)]
    )


@torch.inference_mode()
def trunk_of(model, pixels: torch.Tensor, frozen: int, batch: int = 512) -> torch.Tensor:
    return torch.cat([trunk(model, pixels[i : i + batch].float(), frozen) for i in range(0, len(pixels), batch)])


def held_out_set(preprocess, n: int, seed: int, style: str | None) -> tuple[torch.Tensor, list[str]]:
    """(pixels, captions) of `n` renders no training image shares (another seed, or a held-out style)."""
    pairs = list(toyworld.sample(n, seed=seed, style=style, lang="zh"))
    return torch.stack([preprocess(img) for img, _ in pairs]), [c for _, c in pairs]


@torch.inference_mode()
def recall_at_1(model, tokenizer, pixels: torch.Tensor, captions: list[str]) -> float:
    model.eval()
    features = image_features_of(model, pixels)
    names = toyworld.all_captions("zh")
    best = (features @ model.encode_text(tokenizer(names), normalize=True).T).argmax(dim=1).tolist()
    model.train()
    return sum(names[b] == c for b, c in zip(best, captions)) / len(captions)


def main() -> None:
    parser = training_args(__doc__, steps=800, variants=64, eval_every=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--english", type=Path, default=ENGLISH, help="the English toyworld whose image tower to use")
    parser.add_argument("--partial-weight", type=float, default=0.5, help="weight of the partial-caption loss")
    parser.add_argument("--negatives", type=int, default=64, help="distractor lines per batch")
    parser.add_argument("--train-image-tower", action="store_true", help="train all of the image tower (slow on a CPU)")
    parser.add_argument(
        "--train-blocks", type=int, default=0, help="last image-tower blocks to train (the rest stay frozen)"
    )
    parser.add_argument(
        "--distill-weight",
        type=float,
        default=1.0,
        help="weight of the loss pulling each Chinese text onto the English model's vector for its translation "
        "(0: off); above 0 the image projection stays the English one",
    )
    parser.add_argument(
        "--hard-negatives",
        type=int,
        default=4,
        help="per image, lines that swap one of its attributes for a word outside the world",
    )
    parser.set_defaults(lr=2e-3, warmup=20)  # the bundled weights' run
    args = parser.parse_args()

    from safetensors.torch import load_file

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    english_cfg = json.loads((args.english / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    MODEL_CFG["vision_patch_size"] = english_cfg["patch_size"]  # the image tower is the English one
    model = ChineseCLIP(MODEL_CFG)
    weights = args.english / "open_clip_model.safetensors"
    english = {k: v.float() for k, v in load_file(str(weights)).items() if k.startswith("visual.")}
    model.load_state_dict(english, strict=False)
    frozen = 0 if args.train_image_tower else len(model.visual.transformer.resblocks) - args.train_blocks
    if not args.train_image_tower:
        model.visual.requires_grad_(False)
        for block in model.visual.transformer.resblocks[frozen:]:
            block.requires_grad_(True)
        # Distilled, the text tower aims at the English vectors, so the English projection stays.
        model.visual.proj.requires_grad_(args.distill_weight == 0)
        model.visual.ln_post.requires_grad_(args.distill_weight == 0 or args.train_blocks > 0)
    preprocess = preprocess_for(MODEL_CFG["image_resolution"])
    tokenizer = WordPieceTokenizer(context_length=CONTEXT_LENGTH)
    optimizer = adamw(model, args.lr)  # frozen parameters get no gradient, so AdamW leaves them as they are

    scenes = toyworld.all_scenes()
    pool = render_pool(scenes, preprocess, args.variants, args.seed)
    if not args.train_image_tower:
        pool_tokens = trunk_of(model, pool.flatten(0, 1), frozen).view(*pool.shape[:2], -1, MODEL_CFG["vision_width"])
        with torch.inference_mode():  # the split tower is the tower
            assert torch.allclose(
                head(model, trunk(model, pool[0, :8].float(), frozen), frozen),
                model.encode_image(pool[0, :8].float(), normalize=True),
                atol=1e-4,
            )
    checks = {"random": held_out_set(preprocess, 512, 10_000, "random")}
    checks |= {name: held_out_set(preprocess, 256, 10_000, name) for name in toyworld.HELD_OUT_STYLES}
    all_tokens = tokenizer([s.caption_zh for s in scenes])
    partial_texts = [list(dict.fromkeys(zh(t, s) for s in scenes)) for t in PARTIAL_TEMPLATES_ZH]
    partial_tokens = tokenizer([text for texts in partial_texts for text in texts])
    owner = torch.tensor(
        [[texts.index(zh(t, s)) for s in scenes] for t, texts in zip(PARTIAL_TEMPLATES_ZH, partial_texts)]
    )
    bounds = torch.tensor([0] + [len(t) for t in partial_texts]).cumsum(0).tolist()
    negative_tokens = tokenizer(distractor_lines(20_000, seed=args.seed))
    chars = cjk_characters()
    swap_rng = np.random.default_rng(args.seed)
    teacher_full, teacher_partial, distilled = english_targets(args.english, scenes, partial_texts)
    generator = torch.Generator().manual_seed(args.seed)
    ce = torch.nn.functional.cross_entropy
    start = time.perf_counter()
    r1, held_out = 0.0, {}
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.lr, args.warmup, args.steps)
        order = torch.randperm(len(scenes), generator=generator)
        variant = torch.randint(args.variants, (len(order),), generator=generator)
        if args.train_image_tower:
            image_features = model.encode_image(pool[variant, order].float(), normalize=True)
        else:
            image_features = head(model, pool_tokens[variant, order], frozen)
        text_features = model.encode_text(all_tokens[order], normalize=True)
        pick = torch.randint(len(negative_tokens), (args.negatives,), generator=generator)
        negatives = model.encode_text(negative_tokens[pick], normalize=True)
        scale = model.logit_scale.exp()
        target = torch.arange(len(order))
        image_logits = scale * image_features @ torch.cat([text_features, negatives]).T
        if args.hard_negatives > 0:
            lines = [
                line for i in order.tolist() for line in swapped_lines(scenes[i], args.hard_negatives, swap_rng, chars)
            ]
            near = model.encode_text(tokenizer(lines), normalize=True)
            near = near.view(len(order), args.hard_negatives, -1)
            image_logits = torch.cat([image_logits, scale * (image_features[:, None, :] * near).sum(-1)], dim=1)
        loss = (ce(image_logits, target) + ce(scale * text_features @ image_features.T, target)) / 2
        partial = model.encode_text(partial_tokens, normalize=True)
        if args.distill_weight > 0:
            pulled = torch.cat(
                [(text_features * teacher_full[order]).sum(-1), (partial[distilled] * teacher_partial).sum(-1)]
            )
            loss = loss + args.distill_weight * (1 - pulled).mean()
        if args.partial_weight > 0:
            per_template = [
                ce(scale * image_features @ partial[lo:hi].T, owner[j, order])
                for j, (lo, hi) in enumerate(zip(bounds, bounds[1:]))
            ]
            loss = loss + args.partial_weight * torch.stack(per_template).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            r1 = recall_at_1(model, tokenizer, *checks["random"])
            held_out = {
                name: recall_at_1(model, tokenizer, *check) for name, check in checks.items() if name != "random"
            }
            shown = "  ".join(f"{name} {r:.3f}" for name, r in held_out.items())
            print(
                f"step {step + 1:5d}  loss {loss.item():.4f}  held-out R@1 {r1:.3f}  styles: {shown}  "
                f"{time.perf_counter() - start:.0f}s",
                flush=True,
            )
            save(model, args, step + 1, start, r1, held_out)  # the latest, so a run can be stopped at any eval


@torch.no_grad()
def english_targets(english: Path, scenes, partial_texts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The English toy model's text vectors for each scene's caption and for the Chinese partial texts
    that have an English template (ENGLISH_TEMPLATES), with the indices of those partial texts."""
    from retriever.models.encoder import Encoder
    from retriever.models.loading import load_model

    encoder = Encoder(load_model(f"local-dir:{english}", device="cpu"))
    full = torch.from_numpy(encoder.encode_text([s.caption for s in scenes], show_progress_bar=False))
    rows, texts, start = [], [], 0
    for zh_template, en_template, zh_texts in zip(PARTIAL_TEMPLATES_ZH, ENGLISH_TEMPLATES, partial_texts):
        if en_template is not None:
            for scene in scenes:  # zh_texts holds each distinct text once, in first-scene order
                row = start + zh_texts.index(zh(zh_template, scene))
                if row not in rows:
                    rows.append(row)
                    texts.append(toyworld.partial_caption(en_template, scene))
        start += len(zh_texts)
    partial = torch.from_numpy(encoder.encode_text(texts, show_progress_bar=False))
    return full.clone(), partial.clone(), torch.tensor(rows)


def save(model, args, steps: int, start: float, r1: float, held_out: dict) -> None:
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": MODEL_CFG,
        "context_length": CONTEXT_LENGTH,
        "training": {
            "script": "scripts/train_toyworld_zh.py",
            "steps": steps,
            "planned_steps": args.steps,
            "seed": args.seed,
            "lr": args.lr,
            "threads": args.threads,
            "variants": args.variants,
            "negatives": args.negatives,
            "image_tower": "from toyworld's, all trained"
            if args.train_image_tower
            else f"from toyworld's, last {args.train_blocks} block(s) trained",
            "seconds": round(time.perf_counter() - start),
            "heldout_r_at_1": r1,
            "heldout_styles_r_at_1": held_out,
            "partial_weight": args.partial_weight,
            "distill_weight": args.distill_weight,
            "hard_negatives": args.hard_negatives,
            "english_tower": str(args.english.relative_to(ROOT))
            if args.english.is_relative_to(ROOT)
            else str(args.english),
        },
    }
    (args.out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / WEIGHTS_FILE))
    (args.out / WEIGHTS_FILE).chmod(0o644)
    print(f"saved {args.out} (step {steps})", flush=True)


if __name__ == "__main__":
    main()
