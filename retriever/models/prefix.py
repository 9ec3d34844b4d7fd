"""Encoding many texts that share a prefix: the prefix runs through the text tower once.

open_clip's CLIP text towers are causal and pool at the end-of-text token, so a token's hidden
state depends only on the tokens before it. And CLIP's BPE splits text into words before
merging, so the tokens of `prefix + ", " + term` are the tokens of `prefix` followed by those of
`", " + term` whenever the boundary cannot merge (the prefix ends in a letter or digit) and the
text cleaning (ftfy, HTML unescaping) leaves both parts alone. Then the prefix's keys
and values can be computed once and each candidate costs only its few suffix tokens.

`PrefixScorer.encode` does that for the towers where it is exact (`can_trim_padding`'s rule,
plus open_clip's standard residual block), verifies the two conditions per text, and encodes
every other text in full with the ordinary path. Used by interrogate's best and negative modes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from retriever.models.loading import LoadedModel

# Printable ASCII without '&': ftfy and HTML unescaping leave it alone, no need to ask them.
_ASCII = re.compile(r"[\x20-\x25\x27-\x7e]*\Z")
_CLEAN: dict[str, bool] = {}


def is_plain(text: str) -> bool:
    """Whether the tokenizer's cleaning (ftfy.fix_text, html.unescape) leaves `text` as it is, so
    that it tokenizes the same alone and beside other such text. '&' is never plain (an entity
    could form across the boundary). Cached: the same labels come back at every chain step."""
    if _ASCII.match(text):
        return True
    known = _CLEAN.get(text)
    if known is None:
        from open_clip.tokenizer import basic_clean

        known = "&" not in text and basic_clean(text) == text.strip()
        if len(_CLEAN) < 1_000_000:
            _CLEAN[text] = known
    return known


def can_share_prefix(model: Any) -> bool:
    """Whether this tower's prefix can be cached exactly: a causal, EOT-pooled open_clip text
    tower built of standard residual blocks with torch's MultiheadAttention."""
    import torch

    from retriever.models.encoder import can_trim_padding

    if not can_trim_padding(model):
        return False
    blocks = list(model.transformer.resblocks)
    return all(
        isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention)
        and getattr(b.attn, "batch_first", False)
        and isinstance(getattr(b, "ln_attn", torch.nn.Identity()), torch.nn.Identity)
        and isinstance(getattr(b.mlp, "ln", torch.nn.Identity()), torch.nn.Identity)
        for b in blocks
    )


class PrefixScorer:
    """Embeds `prefix + joiner + suffix` for many suffixes, sharing the prefix's computation.

    Example:
        >>> scorer = PrefixScorer(load_model("toyworld"))
        >>> scorer.encode("a large red star", ["on the left", "on the top"])  # == encode_text of the joins
    """

    def __init__(self, loaded: LoadedModel, joiner: str = ", ", batch_size: int = 1024):
        from retriever.models.encoder import Encoder

        self.loaded = loaded
        self.model = loaded.model
        self.encoder = Encoder(loaded)
        self.joiner = joiner
        self.batch_size = batch_size
        self.exact = can_share_prefix(self.model)
        tokenizer = loaded.tokenizer
        self.context = int(getattr(tokenizer, "context_length", 77))
        self.sot = int(getattr(tokenizer, "sot_token_id", 49406))
        self.eot = int(getattr(tokenizer, "eot_token_id", 49407))
        self._suffix_cache: dict[str, list[int]] = {}
        self.shared = 0  # texts encoded through a shared prefix, and in full (for tests and benches)
        self.full = 0

    def tokens(self, text: str) -> list[int]:
        """BPE ids of `text` without start/end tokens and untruncated (open_clip's encode)."""
        return list(self.loaded.tokenizer.encode(text)) if hasattr(self.loaded.tokenizer, "encode") else \
            list(self.loaded.tokenizer.tokenizer.encode(text))

    def suffix_tokens(self, suffix: str) -> list[int]:
        """Tokens of `joiner + suffix`, cached (the same labels recur at every chain step)."""
        tokens = self._suffix_cache.get(suffix)
        if tokens is None:
            tokens = self._suffix_cache[suffix] = self.tokens(self.joiner + suffix)
        return tokens

    def fits(self, prefix_tokens: list[int], suffix: str) -> bool:
        """Whether `prefix + joiner + suffix` fits the context with a padding position to spare
        (clip-interrogator's rule: the last position must still be padding), from token counts.
        Exact when `shareable(prefix)` and `is_plain(suffix)`."""
        return 1 + len(prefix_tokens) + len(self.suffix_tokens(suffix)) + 1 < self.context

    def shareable(self, prefix: str) -> bool:
        """Whether texts starting with `prefix + joiner` tokenize as the prefix's tokens plus the rest's."""
        return self.exact and bool(prefix) and prefix[-1].isalnum() and is_plain(prefix)

    def encode(self, prefix: str, suffixes: list[str]) -> np.ndarray:
        """Normalised embeddings of `prefix + joiner + s` for each suffix `s` (float32 [n, d])."""
        import numpy as np

        if not suffixes:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        prefix_tokens = self.tokens(prefix)
        out = np.zeros((len(suffixes), self.encoder.dim), dtype=np.float32)
        shared = [i for i, s in enumerate(suffixes) if is_plain(s) and self.fits(prefix_tokens, s)] \
            if self.shareable(prefix) else []
        rest = sorted(set(range(len(suffixes))) - set(shared))
        if shared:
            out[shared] = self._encode_shared(prefix_tokens, [self.suffix_tokens(suffixes[i]) for i in shared])
        if rest:
            out[rest] = self.encoder.encode_text([prefix + self.joiner + suffixes[i] for i in rest],
                                                 show_progress_bar=False)
        self.shared += len(shared)
        self.full += len(rest)
        return out

    def _encode_shared(self, prefix_tokens: list[int], suffixes: list[list[int]]) -> np.ndarray:
        import torch

        device = next(self.model.parameters()).device
        with torch.inference_mode():
            cache = self._prefix_cache(torch.tensor([[self.sot, *prefix_tokens]], device=device))
            parts = []
            for start in range(0, len(suffixes), self.batch_size):
                parts.append(self._suffix_batch(cache, suffixes[start:start + self.batch_size], device))
            x = torch.cat(parts)
            x = torch.nn.functional.normalize(x.float(), dim=-1)
        return x.cpu().numpy()

    def _prefix_cache(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the prefix's keys and values: [1, heads, p, head_dim] each."""
        import torch.nn.functional as F

        model = self.model
        cast = model.transformer.get_cast_dtype()
        p = tokens.shape[1]
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:p].to(cast)
        cache = []
        for block in model.transformer.resblocks:
            attn = block.attn
            h = block.ln_1(x)
            q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            split = (1, p, attn.num_heads, attn.embed_dim // attn.num_heads)
            q, k, v = (t.view(split).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(1, p, attn.embed_dim)))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            cache.append((k, v))
        return cache

    def _suffix_batch(self, cache: list[tuple[torch.Tensor, torch.Tensor]], suffixes: list[list[int]],
                      device: Any) -> torch.Tensor:
        """Unnormalised embeddings of each suffix (+ end token) continuing the cached prefix."""
        import torch
        import torch.nn.functional as F
        from open_clip.transformer import text_global_pool

        model = self.model
        cast = model.transformer.get_cast_dtype()
        p = cache[0][0].shape[2]
        rows = [[*s, self.eot] for s in suffixes]
        length = max(len(r) for r in rows)
        tokens = torch.zeros((len(rows), length), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r, device=device)
        n = len(rows)
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[p:p + length].to(cast)
        # Suffix position j sees the whole prefix and suffix positions <= j.
        allowed = torch.ones((length, p + length), dtype=torch.bool, device=device)
        allowed[:, p:] = torch.ones((length, length), dtype=torch.bool, device=device).tril()
        for block, (pk, pv) in zip(model.transformer.resblocks, cache):
            attn = block.attn
            heads, head_dim = attn.num_heads, attn.embed_dim // attn.num_heads
            h = block.ln_1(x)
            q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            split = (n, length, heads, head_dim)
            q, k, v = (t.view(split).transpose(1, 2) for t in (q, k, v))
            keys = torch.cat([pk.expand(n, -1, -1, -1), k], dim=2)
            values = torch.cat([pv.expand(n, -1, -1, -1), v], dim=2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
            x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(n, length, attn.embed_dim)))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = model.ln_final(x)
        pooled = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(pooled)
        return pooled @ model.text_projection
