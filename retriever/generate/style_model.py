"""The style decoder: a small transformer that writes a line from a CLIP embedding (DeCap / CapDec).

It is trained from scratch on text alone, as DeCap does: the CLIP *text* embedding of a corpus
line goes through a small MLP into `prefix_length` prefix vectors (ClipCap's mapping), and a
causal transformer reconstructs the line after them. At caption time an image embedding (or its
projection onto the corpus's text embeddings) takes the text embedding's place.

Tokens are the CLIP model's own BPE ids, but the decoder only knows a compact vocabulary: the
ids that occur in its training corpus. Compact id 0 is padding (the decoding loops treat 0 as
"finished"), 1 the start token and 2 the end token; `vocab[i]` is the CLIP id of compact id i.

A style folder holds `style.json` (this config, the CLIP model it was trained with and what
training did), `decoder.safetensors` and optionally `memory.safetensors` (fp16 text embeddings of
the corpus, DeCap's projection memory).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import ModelError

if TYPE_CHECKING:
    import torch

KIND = "retriever-style-decoder"
FORMAT_VERSION = 1
CONFIG_NAME = "style.json"
WEIGHTS_NAME = "decoder.safetensors"
MEMORY_NAME = "memory.safetensors"
PAD, SOT, EOT = 0, 1, 2
PROJECTIONS = ("memory", "noise", "none")


@dataclass
class StyleConfig:
    """The decoder's architecture and vocabulary."""

    embed_dim: int
    vocab: list[int]  # compact id -> CLIP token id (0, 1, 2: pad, start, end)
    width: int = 512
    layers: int = 4
    heads: int = 8
    prefix_length: int = 1
    max_tokens: int = 77  # start token + text + end token

    @property
    def positions(self) -> int:
        return self.prefix_length + self.max_tokens


def build_decoder(config: StyleConfig) -> Any:
    """A freshly initialised `StyleDecoder` (a torch module) for `config`."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, width: int, heads: int):
            super().__init__()
            self.heads = heads
            self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def split(self, x: torch.Tensor) -> list[torch.Tensor]:
            batch, length, width = x.shape
            shape = (batch, length, self.heads, width // self.heads)
            return [t.view(shape).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)]

        def merge(self, x: torch.Tensor) -> torch.Tensor:
            batch, _, length, _ = x.shape
            return self.out(x.transpose(1, 2).reshape(batch, length, -1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.split(self.ln_1(x))
            x = x + self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))
            return x + self.mlp(self.ln_2(x))

    class StyleDecoder(nn.Module):
        def __init__(self, config: StyleConfig):
            super().__init__()
            self.config = config
            width, p = config.width, config.prefix_length
            hidden = (config.embed_dim + width * p) // 2
            self.prefix = nn.Sequential(nn.Linear(config.embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, width * p))
            self.token_embedding = nn.Embedding(len(config.vocab), width)
            self.positional_embedding = nn.Parameter(torch.randn(config.positions, width) * 0.01)
            self.blocks = nn.ModuleList(Block(width, config.heads) for _ in range(config.layers))
            self.ln_final = nn.LayerNorm(width)
            self.head = nn.Linear(width, len(config.vocab), bias=False)
            nn.init.normal_(self.token_embedding.weight, std=0.02)

        def prefix_vectors(self, embeddings: torch.Tensor) -> torch.Tensor:
            """[batch, prefix_length, width] from [batch, embed_dim] CLIP embeddings."""
            return self.prefix(embeddings).view(len(embeddings), self.config.prefix_length, self.config.width)

        def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            """Logits [batch, length, vocab] for the token after each of `tokens` (compact ids,
            starting with the start token), given the embeddings."""
            x = torch.cat([self.prefix_vectors(embeddings), self.token_embedding(tokens)], dim=1)
            x = x + self.positional_embedding[: x.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_final(x[:, self.config.prefix_length :]))

    return StyleDecoder(config)


class StyleStepper:
    """Next-token logits for `beams` rows per embedding, with a key/value cache per layer (the
    `Stepper` of `decoding.py`): the prefix is encoded once, then each token costs one position."""

    def __init__(self, decoder: Any, embeddings: torch.Tensor, beams: int, max_len: int):
        import torch

        self.decoder = decoder
        config = decoder.config
        self.rows = len(embeddings) * beams
        p = config.prefix_length
        x = decoder.prefix_vectors(embeddings).repeat_interleave(beams, dim=0) + decoder.positional_embedding[:p]
        head_dim = config.width // config.heads
        shape = (self.rows, config.heads, p + max_len, head_dim)
        self.cache = [
            (torch.zeros(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device))
            for _ in decoder.blocks
        ]
        self.pos = 0
        self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run `x` ([rows, n, width], the next n positions) through the blocks, caching keys and values."""
        from torch.nn import functional as F

        n = x.shape[1]
        end = self.pos + n
        for block, (keys, values) in zip(self.decoder.blocks, self.cache):
            q, k, v = block.split(block.ln_1(x))
            keys[:, :, self.pos : end], values[:, :, self.pos : end] = k, v
            # Several new positions (the prefix) attend causally among themselves; one attends to all.
            out = F.scaled_dot_product_attention(
                q, keys[:, :, :end], values[:, :, :end], is_causal=n > 1 and self.pos == 0
            )
            x = x + block.merge(out)
            x = x + block.mlp(block.ln_2(x))
        self.pos = end
        return x

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the token after `tokens` (the newest compact id of each row)."""
        decoder = self.decoder
        tokens = tokens.to(decoder.positional_embedding.device)
        x = decoder.token_embedding(tokens)[:, None] + decoder.positional_embedding[self.pos]
        return decoder.head(decoder.ln_final(self._forward(x)))[:, 0]

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i continue what row `rows[i]` was."""
        rows = rows.to(self.cache[0][0].device)
        self.cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache]


@dataclass
class StyleFolder:
    """What `style.json` records besides the architecture."""

    config: StyleConfig
    clip: dict  # name, pretrained, fingerprint, embed_dim of the CLIP model the decoder learned from
    projection: str = "memory"
    noise_variance: float = 0.016
    memory_temperature: float = 0.01
    training: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "clip": self.clip,
            "projection": self.projection,
            "noise_variance": self.noise_variance,
            "memory_temperature": self.memory_temperature,
            "decoder": asdict(self.config),
            "training": self.training,
        }


def is_style_folder(path: str | Path) -> bool:
    """True when `path` holds a style decoder's `style.json`."""
    try:
        return json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def read_style_folder(path: str | Path) -> StyleFolder:
    """Read `style.json`; raises ModelError naming the folder when it is not a style decoder."""
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise ModelError(f"{path}: not a style decoder (no {CONFIG_NAME}); train one with `retriever style train`")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelError(f"{config_path}: unreadable ({e}); retrain with `retriever style train --overwrite`") from None
    if raw.get("kind") != KIND:
        raise ModelError(f"{config_path}: not a style decoder's config (kind {raw.get('kind')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{config_path}: format version {raw.get('format_version')}, this retriever reads "
            f"{FORMAT_VERSION}; retrain with `retriever style train --overwrite`"
        )
    return StyleFolder(
        StyleConfig(**raw["decoder"]),
        raw["clip"],
        raw["projection"],
        raw["noise_variance"],
        raw["memory_temperature"],
        raw.get("training", {}),
    )


def save_weights(tensors: dict[str, Any], path: str | Path) -> None:
    """Write tensors as safetensors to a temporary name, then rename into place."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; a shipped or shared decoder must be readable
    os.replace(tmp, path)


def load_weights(path: str | Path) -> dict[str, Any]:
    """Tensors of a safetensors file (on the CPU); ModelError naming the file if unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelError(
            f"{path}: unreadable weights ({e}); retrain with `retriever style train --overwrite`"
        ) from None


def load_decoder(path: str | Path, device: str = "cpu") -> tuple[StyleFolder, Any]:
    """The folder's config and its decoder in eval mode on `device`."""
    folder = read_style_folder(path)
    decoder = build_decoder(folder.config)
    try:
        decoder.load_state_dict(load_weights(Path(path) / WEIGHTS_NAME))
    except RuntimeError as e:
        raise ModelError(f"{Path(path) / WEIGHTS_NAME}: does not fit {CONFIG_NAME} ({str(e)[:200]})") from None
    return folder, decoder.to(device).eval()
