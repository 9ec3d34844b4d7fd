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

    def __init__(self, loaded: LoadedModel, joiner: str = ", ", batch_size: int = 256, pass_size: int = 4096):
        from retriever.models.encoder import Encoder

        self.loaded = loaded
        self.model = loaded.model
        self.encoder = Encoder(loaded)
        self.joiner = joiner
        self.batch_size = batch_size
        self.pass_size = pass_size
        self.exact = can_share_prefix(self.model)
        tokenizer = loaded.tokenizer
        self.context = int(getattr(tokenizer, "context_length", 77))
        self.sot = int(getattr(tokenizer, "sot_token_id", 49406))
        self.eot = int(getattr(tokenizer, "eot_token_id", 49407))
        self._suffix_cache: dict[tuple[str, str], list[int]] = {}
        self._last_prefix: tuple[list[int], Any] = ([], None)
        self.shared = 0  # texts encoded through a shared prefix, and in full (for tests and benches)
        self.full = 0

    def tokens(self, text: str) -> list[int]:
        """BPE ids of `text` without start/end tokens and untruncated (open_clip's encode)."""
        return (
            list(self.loaded.tokenizer.encode(text))
            if hasattr(self.loaded.tokenizer, "encode")
            else list(self.loaded.tokenizer.tokenizer.encode(text))
        )

    def suffix_tokens(self, suffix: str, joiner: str | None = None) -> list[int]:
        """Tokens of `joiner + suffix`, cached (the same labels recur at every chain step)."""
        joiner = self.joiner if joiner is None else joiner
        tokens = self._suffix_cache.get((joiner, suffix))
        if tokens is None:
            tokens = self._suffix_cache[joiner, suffix] = self.tokens(joiner + suffix)
        return tokens

    def fits(self, prefix_tokens: list[int], suffix: str, joiner: str | None = None) -> bool:
        """Whether `prefix + joiner + suffix` fits the context with a padding position to spare
        (clip-interrogator's rule: the last position must still be padding), from token counts.
        Exact when `shareable(prefix)` and `is_plain(suffix)`."""
        return 1 + len(prefix_tokens) + len(self.suffix_tokens(suffix, joiner)) + 1 < self.context

    def shareable(self, prefix: str) -> bool:
        """Whether texts starting with `prefix + joiner` tokenize as the prefix's tokens plus the rest's."""
        return self.exact and bool(prefix) and prefix[-1].isalnum() and is_plain(prefix)

    def encode(self, prefix: str, suffixes: list[str], joiner: str | None = None) -> np.ndarray:
        """Normalised embeddings of `prefix + joiner + s` for each suffix `s` (float32 [n, d]);
        `joiner` overrides the scorer's own for this call."""
        import numpy as np

        joiner = self.joiner if joiner is None else joiner
        if not suffixes:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        prefix_tokens = self.tokens(prefix)
        out = np.zeros((len(suffixes), self.encoder.dim), dtype=np.float32)
        shared = (
            [i for i, s in enumerate(suffixes) if is_plain(s) and self.fits(prefix_tokens, s, joiner)]
            if self.shareable(prefix)
            else []
        )
        rest = sorted(set(range(len(suffixes))) - set(shared))
        if shared:
            out[shared] = self._encode_shared(prefix_tokens, [self.suffix_tokens(suffixes[i], joiner) for i in shared])
        if rest:
            out[rest] = self.encoder.encode_text([prefix + joiner + suffixes[i] for i in rest], show_progress_bar=False)
        self.shared += len(shared)
        self.full += len(rest)
        return out

    def _encode_shared(self, prefix_tokens: list[int], suffixes: list[list[int]]) -> np.ndarray:
        import numpy as np
        import torch

        device = next(self.model.parameters()).device
        # The leading tokens all suffixes share (at least the joiner's ",") join the prefix.
        common = common_prefix_length(suffixes)
        head = [self.sot, *prefix_tokens, *suffixes[0][:common]]
        out = np.zeros((len(suffixes), self.encoder.dim), dtype=np.float32)
        with torch.inference_mode():
            cache = self._prefix_cache(head, device)
            for start in range(0, len(suffixes), self.pass_size):
                rows = [[*s[common:], self.eot] for s in suffixes[start : start + self.pass_size]]
                x = self._encode_tree(cache, SuffixTree(rows, self.batch_size), device)
                out[start : start + len(rows)] = torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()
        return out

    def _prefix_cache(self, tokens: list[int], device: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values of `tokens`: [1, heads, p, head_dim] each.

        Causal attention makes the keys and values of a token prefix independent of what
        follows, and a chain's next prefix is this one plus the chosen term: so the last cache
        is kept, cut to the tokens it shares with `tokens`, and only the rest is run.
        """
        import torch

        known, cache = self._last_prefix
        keep = common_prefix_length([known, tokens]) if cache is not None else 0
        if keep:
            cache = [(k[:, :, :keep], v[:, :, :keep]) for k, v in cache]
        if keep < len(tokens):
            cache = self._extend(cache if keep else None, torch.tensor([tokens[keep:]], device=device))
        self._last_prefix = (list(tokens), cache)
        return cache

    def _extend(
        self, cache: list[tuple[torch.Tensor, torch.Tensor]] | None, tokens: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`cache` (None: empty) with `tokens` [1, m] appended: their keys and values attend to it."""
        import torch
        import torch.nn.functional as F

        model = self.model
        cast = model.transformer.get_cast_dtype()
        p = 0 if cache is None else cache[0][0].shape[2]
        m = tokens.shape[1]
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[p : p + m].to(cast)
        out_cache = []
        allowed = suffix_mask(p, m, tokens.device)
        for layer, block in enumerate(model.transformer.resblocks):
            attn = block.attn
            h = block.ln_1(x)
            q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            split = (1, m, attn.num_heads, attn.embed_dim // attn.num_heads)
            q, k, v = (t.view(split).transpose(1, 2) for t in (q, k, v))
            if cache is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                pk, pv = cache[layer]
                out = attend(q, k, v, pk, pv, allowed)
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(1, m, attn.embed_dim)))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            out_cache.append((k, v))
        return out_cache

    def _encode_tree(
        self, cache: list[tuple[torch.Tensor, torch.Tensor]], tree: SuffixTree, device: Any
    ) -> torch.Tensor:
        """Unnormalised embeddings of the tree's rows continuing the cached prefix.

        Linear layers and MLPs run once per tree node (no padding, shared leading tokens once);
        attention runs per row, length-bucketed, and each node takes its output from one row.
        """
        import torch
        import torch.nn.functional as F

        model = self.model
        cast = model.transformer.get_cast_dtype()
        p = cache[0][0].shape[2]
        tokens = torch.tensor(tree.tokens, device=device)
        positions = torch.tensor(tree.depths, device=device) + p
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[positions].to(cast)
        groups = [g.to(device) for g in tree.groups]
        masks = {length: suffix_mask(p, length, device) for length in {g.paths.shape[1] for g in groups}}
        blocks = list(model.transformer.resblocks)
        for layer, (block, (pk, pv)) in enumerate(zip(blocks, cache)):
            attn = block.attn
            width, heads = attn.embed_dim, attn.num_heads
            qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
            mixed = torch.empty((len(tree.tokens), width), dtype=x.dtype, device=device)
            for group in groups:
                n, length = group.paths.shape
                q, k, v = (
                    t.view(n, length, heads, width // heads).transpose(1, 2) for t in qkv[group.paths].chunk(3, dim=-1)
                )
                out = attend(q, k, v, pk, pv, masks[length])
                mixed[group.nodes] = out.transpose(1, 2).reshape(n * length, width)[group.slots]
            if layer == len(blocks) - 1:  # only the end tokens' outputs are pooled
                x, mixed = x[tree.ends], mixed[tree.ends]
            x = x + block.ls_1(attn.out_proj(mixed))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = model.ln_final(x)
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Attention of suffix rows to a shared prefix and causally to themselves (`allowed`: the
    [length, p + length] mask of `suffix_mask`). q, k, v: [n, heads, length, head_dim]; pk, pv:
    the prefix's [1, heads, p, head_dim]. One fused call: few operations matter more than the
    prefix's copies on a busy CPU."""
    import torch
    import torch.nn.functional as F

    n = q.shape[0]
    keys = torch.cat([pk.expand(n, -1, -1, -1), k], dim=2)
    values = torch.cat([pv.expand(n, -1, -1, -1), v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)


def suffix_mask(p: int, length: int, device: Any) -> torch.Tensor:
    """Suffix position j sees the whole prefix (p tokens) and suffix positions <= j."""
    import torch

    allowed = torch.ones((length, p + length), dtype=torch.bool, device=device)
    allowed[:, p:] = allowed[:, p:].tril()
    return allowed


def common_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share."""
    first = rows[0]
    common = len(first)
    for row in rows[1:]:
        common = min(common, len(row))
        for j in range(common):
            if row[j] != first[j]:
                common = j
                break
    return common


class SuffixTree:
    """Token rows as a prefix tree: each distinct leading sequence is one node.

    `tokens`, `depths`: per node. `ends`: each row's last node. `groups`: rows sorted by length
    and cut into attention batches: `paths` [n, length] (node of each position, short rows padded
    with their last node, which causal attention never lets a real position see), and `nodes`,
    `slots`: the nodes whose output this batch provides and their flat positions in it.
    """

    def __init__(self, rows: list[list[int]], batch_size: int):
        import torch

        ids: dict[tuple[int, int], int] = {}
        self.tokens: list[int] = []
        self.depths: list[int] = []
        paths = []
        for row in rows:
            node, path = -1, []
            for depth, token in enumerate(row):
                key = (node, token)
                node = ids.get(key, -1)
                if node < 0:
                    node = ids[key] = len(self.tokens)
                    self.tokens.append(token)
                    self.depths.append(depth)
                path.append(node)
            paths.append(path)
        self.ends = torch.tensor([path[-1] for path in paths])
        order = sorted(range(len(rows)), key=lambda i: len(paths[i]))
        seen = [False] * len(self.tokens)
        self.groups = []
        for start in range(0, len(order), batch_size):
            batch = [paths[i] for i in order[start : start + batch_size]]
            length = len(batch[-1])
            nodes, slots = [], []
            for r, path in enumerate(batch):
                for j, node in enumerate(path):
                    if not seen[node]:
                        seen[node] = True
                        nodes.append(node)
                        slots.append(r * length + j)
            padded = torch.tensor([path + [path[-1]] * (length - len(path)) for path in batch])
            self.groups.append(
                _Group(padded, torch.tensor(nodes, dtype=torch.long), torch.tensor(slots, dtype=torch.long))
            )


class _Group:
    """One attention batch of a SuffixTree."""

    def __init__(self, paths: torch.Tensor, nodes: torch.Tensor, slots: torch.Tensor):
        self.paths, self.nodes, self.slots = paths, nodes, slots

    def to(self, device: Any) -> _Group:
        return _Group(self.paths.to(device), self.nodes.to(device), self.slots.to(device))
