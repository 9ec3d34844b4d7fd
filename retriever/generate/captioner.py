"""Writing captions with a CoCa model: the project's own decoding loop over a KV-cached stepper.

No transformers needed; see `decoding.py` for why the loops match open_clip's `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from retriever.errors import ModelError
from retriever.generate.coca import CocaStepper, is_coca
from retriever.generate.decoding import DecodeOptions, beam_search, sample, tokens_to_text
from retriever.models.loading import LoadedModel

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_GENERATOR = "coca_ViT-L-14"
DEFAULT_GENERATOR_PRETRAINED = "mscoco_finetuned_laion2b_s13b_b90k"


class Captioner:
    """Captions for images from a CoCa model.

    Example:
        >>> cap = Captioner(load_model("toyworld-coca"))
        >>> cap.caption([image], DecodeOptions(method="greedy"))
        ['a large red star on the left']
    """

    def __init__(self, loaded: LoadedModel):
        if not is_coca(loaded.model):
            raise ModelError(
                f"{loaded.spec} cannot write captions: generation needs a CoCa model "
                f"(e.g. --generator {DEFAULT_GENERATOR} --generator-pretrained {DEFAULT_GENERATOR_PRETRAINED}, "
                "or toyworld-coca offline)"
            )
        self.loaded = loaded
        self.context_length = int(loaded.model.text.positional_embedding.shape[0]) - 1  # one position is CLS
        self.sot = int(loaded.tokenizer.sot_token_id)
        self.eot = int(loaded.tokenizer.eot_token_id)

    def options(self, opts: DecodeOptions) -> DecodeOptions:
        """`opts` with max_len capped at what the model's position table allows."""
        opts = replace(opts, max_len=min(opts.max_len, self.context_length))
        if opts.min_len >= opts.max_len:
            opts = replace(opts, min_len=max(1, opts.max_len - 1))
        opts.check()
        return opts

    def generate_tokens(self, images: Sequence[Image.Image], opts: DecodeOptions, n: int = 1) -> list[list[list[int]]]:
        """Up to `n` token sequences (each starting with the start token) per image, best first."""
        import torch

        opts = self.options(opts)
        if opts.method != "beam" and n > 1:  # n samples: each image n times
            images = [im for im in images for _ in range(n)]
        pixels = torch.stack([self.loaded.preprocess(im) for im in images]).to(self.loaded.device)
        pixels = pixels.to(next(self.loaded.model.parameters()).dtype)
        beams = opts.beams if opts.method == "beam" else 1
        with torch.inference_mode():
            stepper = CocaStepper(self.loaded.model, pixels, beams=beams, max_len=opts.max_len)
            if opts.method == "beam":
                return [ranked[:n] for ranked in beam_search(stepper, len(images), opts, self.sot, self.eot)]
            rows = sample(stepper, len(images), opts, self.sot, self.eot).tolist()
        return [rows[i : i + n] for i in range(0, len(rows), n)] if n > 1 else [[row] for row in rows]

    def caption_candidates(
        self, images: Sequence[Image.Image], opts: DecodeOptions | None = None, n: int = 1, batch_size: int = 16
    ) -> list[list[str]]:
        """Up to `n` distinct clean captions per image, best first (beam search) or as sampled."""
        opts = opts or DecodeOptions()
        out: list[list[str]] = []
        for start in range(0, len(images), batch_size):
            for candidates in self.generate_tokens(images[start : start + batch_size], opts, n=n):
                texts = [self.to_text(tokens) for tokens in candidates]
                out.append([t for t in dict.fromkeys(texts) if t])
        return out

    def to_text(self, tokens: list[int]) -> str:
        """Tokens (start token first) to clean text."""
        return tokens_to_text(tokens, self.eot, self.loaded.tokenizer.decode)

    def caption(
        self, images: Sequence[Image.Image], opts: DecodeOptions | None = None, batch_size: int = 16
    ) -> list[str]:
        """One clean caption per image (no start/end markers, whitespace normalised)."""
        return [
            candidates[0] if candidates else "" for candidates in self.caption_candidates(images, opts, 1, batch_size)
        ]
