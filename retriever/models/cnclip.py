"""Chinese-CLIP (OFA-Sys) models: names, configs, weights, and loading into retriever's own modules.

`cn-clip:ViT-B-16` (also RN50, ViT-L-14, ViT-L-14-336, ViT-H-14) names a released model: its
weights come from `--pretrained FILE` (a checkpoint in cn_clip's format), else from the local
caches cn_clip and the Hugging Face hub use, else from the hub (after a quick reachability probe).
A directory with `cn_clip_config.json` and weights (the bundled `toyworld-zh`, or `local-dir:DIR`)
loads the same way. The `cn_clip` package itself is not needed (see the README for why): the
network is `cnclip_net.ChineseCLIP`, with cn_clip's parameter names, and the tokenizer is
`wordpiece.WordPieceTokenizer` with the bundled Chinese BERT vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from retriever.errors import ModelError
from retriever.models.safety import MAX_CONTEXT, MAX_IMAGE_SIDE, MAX_PARAMETERS, check_checkpoint

PREFIX = "cn-clip:"
CONFIG_FILE = "cn_clip_config.json"
WEIGHTS_FILE = "cn_clip_model.safetensors"
HUB_ORG = "OFA-Sys"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_VISION = {
    "ViT-B-16": {
        "embed_dim": 512,
        "image_resolution": 224,
        "vision_layers": 12,
        "vision_width": 768,
        "vision_patch_size": 16,
    },
    "ViT-L-14": {
        "embed_dim": 768,
        "image_resolution": 224,
        "vision_layers": 24,
        "vision_width": 1024,
        "vision_patch_size": 14,
    },
    "ViT-L-14-336": {
        "embed_dim": 768,
        "image_resolution": 336,
        "vision_layers": 24,
        "vision_width": 1024,
        "vision_patch_size": 14,
    },
    "ViT-H-14": {
        "embed_dim": 1024,
        "image_resolution": 224,
        "vision_layers": 32,
        "vision_width": 1280,
        "vision_head_width": 80,
        "vision_patch_size": 14,
    },
    "RN50": {
        "embed_dim": 1024,
        "image_resolution": 224,
        "vision_layers": [3, 4, 6, 3],
        "vision_width": 64,
        "vision_patch_size": None,
    },
}
_BERT = {
    "vocab_size": 21128,
    "text_intermediate_size": 3072,
    "text_max_position_embeddings": 512,
    "text_type_vocab_size": 2,
    "text_hidden_size": 768,
    "text_num_attention_heads": 12,
}
_TEXT = {
    "RoBERTa-wwm-ext-base-chinese": {**_BERT, "text_num_hidden_layers": 12},
    "RoBERTa-wwm-ext-large-chinese": {
        **_BERT,
        "text_hidden_size": 1024,
        "text_intermediate_size": 4096,
        "text_num_attention_heads": 16,
        "text_num_hidden_layers": 24,
    },
    "RBT3-chinese": {**_BERT, "text_num_hidden_layers": 3},
}
# Architecture: (text tower, hub repo under OFA-Sys, checkpoint file), as in cn_clip.clip.utils.
ARCHS = {
    "ViT-B-16": ("RoBERTa-wwm-ext-base-chinese", "chinese-clip-vit-base-patch16", "clip_cn_vit-b-16.pt"),
    "ViT-L-14": ("RoBERTa-wwm-ext-base-chinese", "chinese-clip-vit-large-patch14", "clip_cn_vit-l-14.pt"),
    "ViT-L-14-336": ("RoBERTa-wwm-ext-base-chinese", "chinese-clip-vit-large-patch14-336px", "clip_cn_vit-l-14-336.pt"),
    "ViT-H-14": ("RoBERTa-wwm-ext-large-chinese", "chinese-clip-vit-huge-patch14", "clip_cn_vit-h-14.pt"),
    "RN50": ("RBT3-chinese", "chinese-clip-rn50", "clip_cn_rn50.pt"),
}


def arch_config(arch: str) -> dict:
    """The merged cn_clip model config of a released architecture (what cn_clip's `CLIP(**cfg)` takes)."""
    if arch not in ARCHS:
        raise ModelError(
            f"unknown Chinese-CLIP architecture {arch!r}; use one of: " + ", ".join(PREFIX + a for a in ARCHS)
        )
    return {**_VISION[arch], **_TEXT[ARCHS[arch][0]]}  # type: ignore[dict-item]


def is_model_dir(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file()


def read_dir_config(directory: Path) -> dict:
    """`cn_clip_config.json` of a model directory: {"model_cfg": ..., "context_length": ..., ...}, checked."""
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: not a valid Chinese-CLIP config (invalid JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ModelError(f"{path}: not a Chinese-CLIP config (no 'model_cfg' object)")
    check_config(data["model_cfg"], str(path), data.get("context_length", 52))
    return data


def check_config(cfg: dict, source: str, context_length: Any = 52) -> float:
    """Refuse a malformed or absurdly large cn_clip config before building it; returns its parameter estimate."""
    from retriever.models.cnclip_net import TEXT_KEYS, VISION_KEYS

    def positive(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{source}: {key} should be a positive integer, found {value!r}")
        return value

    for key in (*VISION_KEYS, *TEXT_KEYS):
        if key in ("vision_head_width",) and key not in cfg:
            continue
        if key == "vision_patch_size" and isinstance(cfg.get("vision_layers"), (list, str)):
            continue
        if key == "vision_layers" and isinstance(cfg.get(key), (list, str)):
            layers = cfg[key]
            if isinstance(layers, str):
                try:
                    layers = [int(n) for n in layers.strip("[]()").split(",")]
                except ValueError:
                    raise ModelError(
                        f"{source}: vision_layers should be a number or four numbers, found {cfg[key]!r}"
                    ) from None
            if len(layers) != 4:
                raise ModelError(f"{source}: vision_layers of a ResNet should be four numbers, found {cfg[key]!r}")
            for n in layers:
                positive(key, n)
            continue
        positive(key, cfg.get(key))
    positive("context_length", context_length)
    side = cfg["image_resolution"]
    if side > MAX_IMAGE_SIDE:
        raise ModelError(f"{source}: image_resolution is {side}; no CLIP model takes images over {MAX_IMAGE_SIDE} px")
    if context_length > min(MAX_CONTEXT, cfg["text_max_position_embeddings"]):
        raise ModelError(
            f"{source}: context_length {context_length} is more than the text tower's "
            f"{cfg['text_max_position_embeddings']} positions"
        )
    resnet = not isinstance(cfg["vision_layers"], int)
    vision_width = cfg["vision_width"] * (32 if resnet else 1)  # a ResNet's attention pool runs at 32x its width
    for width, heads in (
        (cfg["text_hidden_size"], cfg["text_num_attention_heads"]),
        (vision_width, cfg.get("vision_head_width", 64)),
    ):
        if width % heads:
            raise ModelError(f"{source}: width {width} is not divisible by {heads}")
    w, t = cfg["vision_width"], cfg["text_hidden_size"]
    layers = cfg["vision_layers"]
    if not resnet:
        vision = 12 * layers * w * w + (side // cfg["vision_patch_size"]) ** 2 * w
    else:
        vision = 17 * 4 * (32 * w) ** 2  # about a ResNet's weights, by its widest stage
    text = 12 * cfg["text_num_hidden_layers"] * t * t + (cfg["vocab_size"] + cfg["text_max_position_embeddings"]) * t
    total = float(vision + text)
    if total > MAX_PARAMETERS:
        raise ModelError(
            f"{source}: the config asks for about {total:.2g} parameters (limit {MAX_PARAMETERS:.0g}); "
            f"it would not fit in memory"
        )
    return total


def cached_hub_weights(arch: str) -> str | None:
    """A released checkpoint already on this machine: cn_clip's download folder, or the Hugging Face cache."""
    _, repo, filename = ARCHS[arch]
    mine = Path(os.path.expanduser("~/.cache/clip")) / filename
    if mine.is_file():
        return str(mine)
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(f"{HUB_ORG}/{repo}", filename)
    return found if isinstance(found, str) else None


def hub_weights(arch: str, what: str) -> str:
    """A released checkpoint's local path: cached, else downloaded from the hub (after a quick probe)."""
    from retriever.models.loading import _hub_host, _probe

    found = cached_hub_weights(arch)
    if found:
        return found
    _, repo, filename = ARCHS[arch]
    _probe("https://" + _hub_host(), f"{what} (huggingface.co/{HUB_ORG}/{repo}, file {filename})")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(f"{HUB_ORG}/{repo}", filename)
    except Exception as e:  # missing repo, missing file, HTTP errors
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ModelError(f"{what}: cannot download {filename} from {HUB_ORG}/{repo} ({reason})") from None


def read_state_dict(path: str | Path) -> dict:
    """Weights from a cn_clip checkpoint (`{"state_dict": ...}`, maybe `module.`-prefixed), a bare state
    dict, or safetensors; as float32, without the BERT pooler Chinese-CLIP never uses."""
    import torch

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # a damaged or foreign file
            raise ModelError(
                f"{path}: not a safetensors file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
            ) from None
    else:
        check_checkpoint(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # type: ignore[assignment]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a Chinese-CLIP checkpoint (no state_dict of tensors)")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    return {k: v.float() for k, v in state.items() if not k.startswith("bert.pooler.")}


def build(cfg: dict, state: dict | None, source: str) -> Any:
    """A ChineseCLIP network with `state` loaded (strictly: a mismatch is an error naming the keys)."""
    from retriever.models.cnclip_net import ChineseCLIP

    model = ChineseCLIP(cfg)
    if state is not None:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
        if missing or unexpected or wrong:
            parts = [
                f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys
            ]
            raise ModelError(f"{source}: weights do not fit this Chinese-CLIP architecture ({'; '.join(parts)})")
        model.load_state_dict(state)
    return model


def preprocess_for(side: int) -> Any:
    """cn_clip's eval transform: resize to side x side (no crop), bicubic, CLIP's mean and std."""
    from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize((side, side), interpolation=InterpolationMode.BICUBIC), ToTensor(), Normalize(MEAN, STD)])
