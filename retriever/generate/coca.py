"""Incremental CoCa decoding: each new token costs one step, not a re-run over the prefix.

open_clip's `CoCa.generate` re-encodes the whole prefix through the text tower and the
multimodal decoder at every step, and runs each image through the vision tower once per beam.
`CocaStepper` encodes each image once, precomputes the cross-attention keys and values once
per image (shared by its beams), and keeps a key/value cache for every self-attention layer
of both text transformers. The arithmetic is open_clip's own modules' (layer norms, MLPs,
projections), called on one position at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def is_coca(model: Any) -> bool:
    import open_clip

    return isinstance(model, open_clip.CoCa)


class CocaStepper:
    """Next-token logits for `beams` rows per image, with key/value caches."""

    def __init__(self, model: Any, images: torch.Tensor, beams: int, max_len: int):
        import torch

        self.model = model
        self.beams = beams
        self.batch = images.shape[0]
        self.rows = self.batch * beams
        self.pos = 0
        text, decoder = model.text, model.text_decoder
        self.heads = text.transformer.resblocks[0].attn.num_heads
        self.dec_heads = decoder.resblocks[0].attn.num_heads
        _, image_embs = model._encode_image(images)
        self.cross = [self._project_kv(block, block.ln_1_kv(image_embs)) for block in decoder.cross_attn]

        def cache(width: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
            shape = (self.rows, heads, max_len, width // heads)
            return torch.zeros(shape, dtype=image_embs.dtype, device=images.device), torch.zeros(
                shape, dtype=image_embs.dtype, device=images.device
            )

        self.text_cache = [cache(text.transformer.width, self.heads) for _ in text.transformer.resblocks]
        self.dec_cache = [cache(decoder.width, self.dec_heads) for _ in decoder.resblocks]

    @staticmethod
    def _project_kv(block: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `x` through `block`'s attention: [batch, heads, length, head_dim] each."""
        import torch.nn.functional as F

        attn = block.attn
        width = attn.embed_dim
        w, b = attn.in_proj_weight, attn.in_proj_bias
        k = F.linear(x, w[width : 2 * width], b[width : 2 * width] if b is not None else None)
        v = F.linear(x, w[2 * width :], b[2 * width :] if b is not None else None)
        batch, length, _ = x.shape
        split = (batch, length, attn.num_heads, width // attn.num_heads)
        return k.view(split).transpose(1, 2), v.view(split).transpose(1, 2)

    def _self_attention(self, block: Any, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        attn = block.attn
        width, heads = attn.embed_dim, attn.num_heads
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        split = (self.rows, 1, heads, width // heads)
        keys, values = cache
        keys[:, :, self.pos] = k.view(split)[:, 0]
        values[:, :, self.pos] = v.view(split)[:, 0]
        out = F.scaled_dot_product_attention(
            q.view(split).transpose(1, 2), keys[:, :, : self.pos + 1], values[:, :, : self.pos + 1]
        )
        return attn.out_proj(out.transpose(1, 2).reshape(self.rows, 1, width))

    def _cross_attention(self, block: Any, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        attn = block.attn
        width, heads = attn.embed_dim, attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(x, w[:width], b[:width] if b is not None else None)
        # The beams of one image are extra query positions against that image's keys.
        q = q.view(self.batch, self.beams, heads, width // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return attn.out_proj(out.transpose(1, 2).reshape(self.rows, 1, width))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the token after `tokens` (the newest token of each row)."""
        text, decoder = self.model.text, self.model.text_decoder
        tokens = tokens.to(self.text_cache[0][0].device)
        x = text.token_embedding(tokens)[:, None] + text.positional_embedding[self.pos]
        for block, cache in zip(text.transformer.resblocks, self.text_cache):
            x = x + block.ls_1(self._self_attention(block, block.ln_1(x), cache))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        # CoCa feeds the text tower's token outputs (before its final norm) to the decoder.
        for block, cross, cache, kv in zip(decoder.resblocks, decoder.cross_attn, self.dec_cache, self.cross):
            x = x + block.ls_1(self._self_attention(block, block.ln_1(x), cache))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            x = x + cross.ls_1(self._cross_attention(cross, cross.ln_1(x), kv))
            x = x + cross.ls_2(cross.mlp(cross.ln_2(x)))
        self.pos += 1
        return decoder.ln_final(x)[:, 0] @ decoder.text_projection

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i continue what row `rows[i]` was (beams of the same image only)."""
        rows = rows.to(self.text_cache[0][0].device)
        self.text_cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.text_cache]
        self.dec_cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.dec_cache]
