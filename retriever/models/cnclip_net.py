"""Chinese-CLIP's network, with its own parameter names, so its checkpoints load as they are.

The image towers are OpenAI CLIP's (ViT with QuickGELU, or the modified ResNet), built from
open_clip's implementations, whose parameter names are the same. The text tower is a BERT
encoder (RoBERTa-wwm-ext or RBT3 in the released models) pooled at `[CLS]` and projected.
It is bidirectional, so padding is masked out as cn_clip masks it (additive -10000 on the
padded keys): with that mask, cutting a batch's padding leaves every vector unchanged.

Imported only when a Chinese-CLIP model is loaded (it imports torch at the top).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# Keys of a cn_clip model config (the merged vision + text JSONs that `cn_clip.clip.utils.create_model` reads).
VISION_KEYS = (
    "embed_dim",
    "image_resolution",
    "vision_layers",
    "vision_width",
    "vision_patch_size",
    "vision_head_width",
)
TEXT_KEYS = (
    "vocab_size",
    "text_hidden_size",
    "text_intermediate_size",
    "text_max_position_embeddings",
    "text_num_attention_heads",
    "text_num_hidden_layers",
    "text_type_vocab_size",
)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, width: int, positions: int, types: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width, padding_idx=0)
        self.position_embeddings = nn.Embedding(positions, width)
        self.token_type_embeddings = nn.Embedding(types, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Dense(nn.Module):
    """A linear layer, then residual and LayerNorm (BERT's `*Output` modules)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, width // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask
        )
        return out.transpose(1, 2).reshape(n, length, width)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self = _SelfAttention(width, heads)
        self.output = _Dense(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # erf GELU, BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.attention = _Attention(width, heads)
        self.intermediate = _Intermediate(width, hidden)
        self.output = _Dense(hidden, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, hidden: int):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(width, heads, hidden) for _ in range(layers)])


class Bert(nn.Module):
    """A BERT encoder with cn_clip's parameter names (no pooler: Chinese-CLIP never uses it)."""

    def __init__(self, cfg: dict):
        super().__init__()
        width = cfg["text_hidden_size"]
        self.embeddings = _Embeddings(
            cfg["vocab_size"], width, cfg["text_max_position_embeddings"], cfg["text_type_vocab_size"]
        )
        self.encoder = _Encoder(
            cfg["text_num_hidden_layers"], width, cfg["text_num_attention_heads"], cfg["text_intermediate_size"]
        )

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        mask = (1.0 - keep[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class ChineseCLIP(nn.Module):
    """Chinese-CLIP: an OpenAI CLIP image tower and a BERT text tower pooled at `[CLS]`."""

    def __init__(self, cfg: dict, pad_id: int = 0):
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import QuickGELU, VisionTransformer

        embed, width = cfg["embed_dim"], cfg["vision_width"]
        head_width = cfg.get("vision_head_width", 64)
        layers = cfg["vision_layers"]
        if isinstance(layers, str):  # cn_clip's RN50.json writes "[3,4,6,3]"
            layers = [int(n) for n in layers.strip("[]()").split(",")]
        if isinstance(layers, (list, tuple)):
            self.visual = ModifiedResNet(
                layers=list(layers),
                output_dim=embed,
                heads=width * 32 // head_width,
                image_size=cfg["image_resolution"],
                width=width,
            )
        else:
            self.visual = VisionTransformer(
                image_size=cfg["image_resolution"],
                patch_size=cfg["vision_patch_size"],
                width=width,
                layers=layers,
                heads=width // head_width,
                mlp_ratio=4.0,
                output_dim=embed,
                act_layer=QuickGELU,
            )
        self.bert = Bert(cfg)
        self.text_projection = nn.Parameter(torch.empty(cfg["text_hidden_size"], embed))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        nn.init.normal_(self.text_projection, std=cfg["text_hidden_size"] ** -0.5)
        self.pad_id = pad_id
        self.image_size = cfg["image_resolution"]

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(image.to(self.text_projection.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Vectors at `[CLS]`. The batch is cut to its longest text first: exact, since padding is masked."""
        keep = text.ne(self.pad_id)
        length = max(1, int(keep.sum(dim=1).max())) if text.numel() else text.shape[1]
        x = self.bert(text[:, :length], keep[:, :length])
        x = x[:, 0, :] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()
