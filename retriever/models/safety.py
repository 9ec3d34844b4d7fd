"""Checks on model files before open_clip builds or loads anything from them.

A model reference can come from a stranger: an index manifest names the model that `query` and
`serve` build, and a `local-dir:` config or a `--pretrained` file may be downloaded. open_clip
allocates whatever a config asks for (100,000 layers of width 10^6 is an out-of-memory kill, not
an error), so the parameter count is estimated from the config first. Checkpoints that are not
safetensors are pickles; they are opened with `weights_only=True`, which builds tensors and
plain containers and refuses everything else, so a pickle can never run code.
"""

from __future__ import annotations

import builtins
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

from retriever.errors import ModelError

# The largest open_clip models (ViT-bigG-14, EVA02-E) have about 2.5e9 parameters.
MAX_PARAMETERS = 5e9
MAX_IMAGE_SIDE = 8192
MAX_TOKENS = 1 << 16  # image patches, or text positions (whose causal mask is tokens^2)
MAX_CONTEXT = 4096


def read_config(path: Path) -> dict:
    """The `open_clip_config.json` at `path`, checked (see `check_model_config`)."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{path}: not a valid open_clip config (invalid JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ModelError(f"{path}: not an open_clip config (no 'model_cfg' object)")
    check_model_config(data["model_cfg"], str(path), data.get("preprocess_cfg"))
    return data


def check_model_config(cfg: dict, source: str, preprocess_cfg: Any = None) -> float:
    """Estimate the parameters of an open_clip model config, refusing absurd or malformed ones.

    Counts the vision tower (ViT or modified ResNet; timm towers are sized by timm's own names),
    the text tower (unless it is a Hugging Face model) and CoCa's multimodal decoder: within 3%
    of what open_clip builds for ViT-B-32, ViT-L-14, ViT-bigG-14 and RN50, 11% under for CoCa.

    Args:
        cfg: the `model_cfg` object.
        source: the file or name it came from, for messages.
        preprocess_cfg: the config's `preprocess_cfg`, whose `size` is checked too.

    Returns:
        The estimated parameter count.

    Raises:
        ModelError: a size that is not a positive integer, or a model above MAX_PARAMETERS, or
            an image side, patch count or context length beyond any CLIP model's.
    """
    fields = _Fields(source)
    if not isinstance(cfg, dict):
        raise ModelError(f"{source}: model_cfg should be a JSON object")
    embed = fields.int(cfg, "embed_dim", 512, "model_cfg")
    total = _vision(fields, cfg.get("vision_cfg") or {}, embed)
    total += _text(fields, cfg.get("text_cfg") or {}, embed)
    if cfg.get("multimodal_cfg") is not None:
        total += _decoder(fields, cfg["multimodal_cfg"])
    if isinstance(preprocess_cfg, dict) and "size" in preprocess_cfg:
        fields.side(preprocess_cfg, "size", "preprocess_cfg")
    if total > MAX_PARAMETERS:
        raise ModelError(
            f"{source}: the config asks for about {total:.2g} parameters (limit {MAX_PARAMETERS:.0g}); "
            f"it would not fit in memory. Fix its layers/width, or use a real model config"
        )
    return total


def check_checkpoint(path: str | Path) -> None:
    """Open a pickled checkpoint with `weights_only=True` (safetensors files need no check).

    Loading it here first also means open_clip's own `torch.load(weights_only=True)` succeeds,
    so it never reaches its fallback that calls `torch.load` without that argument.

    Raises:
        ModelError: not a checkpoint, or a pickle holding anything but tensors and containers.
    """
    import torch

    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".npz", ".npy"):
        return  # no pickle: safetensors is a header plus raw tensors; numpy loads without pickles
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head:
        raise ModelError(f"{path}: empty file (0 bytes); give a checkpoint (.safetensors, .pt, .bin)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            # mmap maps a zip checkpoint instead of reading it, so checking a large one costs little.
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... for one bad file
        reason = _load_failure(e)
        raise ModelError(
            f"{path}: refused as a checkpoint: it cannot be loaded as plain tensors ({reason[:200]}). "
            f"Only weights are read, never pickled code; re-save it with "
            f"torch.save(model.state_dict()) or as .safetensors"
        ) from None


def _load_failure(error: Exception) -> str:
    """The useful line of a torch.load failure (torch's own first line advises weights_only=False)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()
    if lines and lines[0].startswith("Weights only load failed"):
        return "it holds Python objects, not only tensors"
    return lines[0] if lines else type(error).__name__


class _Fields:
    """Typed reads from a config, with errors that name the source and the key."""

    def __init__(self, source: str):
        self.source = source

    def int(self, cfg: dict, key: str, default: int, where: str) -> int:
        value = cfg.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
            raise ModelError(f"{self.source}: {where}.{key} should be a positive integer, found {value!r}")
        return int(value)

    def number(self, cfg: dict, key: str, default: float, where: str) -> float:
        value = cfg.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e3:
            raise ModelError(f"{self.source}: {where}.{key} should be a positive number, found {value!r}")
        return float(value)

    def side(self, cfg: dict, key: str, where: str, default: builtins.int = 224) -> builtins.int:
        value = cfg.get(key, default)
        sides = list(value) if isinstance(value, (list, tuple)) else [value]
        if not sides or len(sides) > 2:
            raise ModelError(f"{self.source}: {where}.{key} should be a size or [height, width], found {value!r}")
        checked = [self.int({key: s}, key, default, where) for s in sides]
        if max(checked) > MAX_IMAGE_SIDE:
            raise ModelError(
                f"{self.source}: {where}.{key} is {value!r}; no CLIP model takes images over "
                f"{MAX_IMAGE_SIDE} px (fix the config)"
            )
        return max(checked)

    def context(self, cfg: dict, default: builtins.int, where: str) -> builtins.int:
        n = self.int(cfg, "context_length", default, where)
        if n > MAX_CONTEXT:
            raise ModelError(
                f"{self.source}: {where}.context_length is {n}; the limit is {MAX_CONTEXT} "
                f"(its attention mask alone would take {n * n * 4 / 2**30:.1f} GiB)"
            )
        return n


def _transformer(layers: int, width: int, mlp_ratio: float, attention_blocks: int = 1) -> float:
    """Weights of `layers` pre-norm blocks: attention is 4 w^2 per block, the MLP 2 r w^2."""
    return layers * (4 * attention_blocks + 2 * mlp_ratio) * width * width


def _vision(fields: _Fields, cfg: dict, embed: int) -> float:
    if not isinstance(cfg, dict):
        raise ModelError(f"{fields.source}: vision_cfg should be a JSON object")
    side = fields.side(cfg, "image_size", "vision_cfg")
    width = fields.int(cfg, "width", 768, "vision_cfg")
    if cfg.get("timm_model_name"):
        return float(width * embed)  # timm builds the tower from its own named sizes
    layers = cfg.get("layers", 12)
    if isinstance(layers, (list, tuple)):  # a modified ResNet: blocks per stage
        stages = [fields.int({"layers": n}, "layers", 1, "vision_cfg") for n in layers]
        total = sum(n * 17 * (width * 2**i) ** 2 for i, n in enumerate(stages))
        return float(total + 3 * (width * 32) ** 2 + width * 32 * embed)
    layers = fields.int(cfg, "layers", 12, "vision_cfg")
    patch = fields.int(cfg, "patch_size", 16, "vision_cfg")
    tokens = (side // patch) ** 2
    if tokens > MAX_TOKENS:
        raise ModelError(
            f"{fields.source}: vision_cfg gives {tokens} patches per image "
            f"(image_size {side} / patch_size {patch}); the limit is {MAX_TOKENS}"
        )
    mlp = fields.number(cfg, "mlp_ratio", 4.0, "vision_cfg")
    return _transformer(layers, width, mlp) + 3 * patch * patch * width + tokens * width + width * embed


def _text(fields: _Fields, cfg: dict, embed: int) -> float:
    if not isinstance(cfg, dict):
        raise ModelError(f"{fields.source}: text_cfg should be a JSON object")
    if cfg.get("hf_model_name"):
        return float(fields.int(cfg, "width", 512, "text_cfg") * embed)  # sized by its Hugging Face config
    context = fields.context(cfg, 77, "text_cfg")
    vocab = fields.int(cfg, "vocab_size", 49408, "text_cfg")
    width = fields.int(cfg, "width", 512, "text_cfg")
    layers = fields.int(cfg, "layers", 12, "text_cfg")
    fields.int(cfg, "heads", 8, "text_cfg")
    mlp = fields.number(cfg, "mlp_ratio", 4.0, "text_cfg")
    return _transformer(layers, width, mlp) + (vocab + context) * width + width * embed + context * context


def _decoder(fields: _Fields, cfg: Any) -> float:
    if not isinstance(cfg, dict):
        raise ModelError(f"{fields.source}: multimodal_cfg should be a JSON object")
    context = fields.context(cfg, 76, "multimodal_cfg")
    vocab = fields.int(cfg, "vocab_size", 49408, "multimodal_cfg")
    width = fields.int(cfg, "width", 512, "multimodal_cfg")
    layers = fields.int(cfg, "layers", 12, "multimodal_cfg")
    mlp = fields.number(cfg, "mlp_ratio", 4.0, "multimodal_cfg")
    # Each decoder layer has self-attention and cross-attention to the image tokens.
    return _transformer(layers, width, mlp, attention_blocks=2) + (vocab + context) * width + context * context
