"""One encoder for texts and images, shaped like sentence-transformers' `encode()`.

Texts are tokenized with the model's own tokenizer, sorted by token length, batched, and each
batch is cut to its longest text (for towers where that is exact), then put back in input order.
Images go through the model's own eval transform. Output is L2-normalised float32 numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from retriever.models.loading import LoadedModel
from retriever.progress import progress

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image


def can_trim_padding(model: Any) -> bool:
    """Whether cutting padding off a text batch leaves `model.encode_text` unchanged.

    True for open_clip's built-in text tower with a causal mask that pools at the end-of-text
    token: no real token attends to padding, so the padding can go. Other towers (bidirectional,
    HF text models, CoCa's appended CLS token, last-position pooling) get full padding.
    """
    import open_clip

    return (
        type(model) is open_clip.CLIP
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos")
    )


def text_attention(device: str) -> Any:
    """A context in which text batches attend without cuDNN's fused attention on CUDA.

    Measured on an H200 (torch 2.11, ViT-B-32 in fp16, batches of 4,096 short captions cut to
    their longest text): with the causal mask passed explicitly, PyTorch picks cuDNN's attention,
    which took two thirds of the GPU time; FlashAttention/memory-efficient kernels gave 196,000
    texts/s instead of 69,000, with the same vectors (docs/performance.md, "GPU paths"). A no-op
    off CUDA and on torch releases without `torch.nn.attention`.
    """
    import contextlib

    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def encode_text_tokens(model: Any, tokens: torch.Tensor, trim: bool) -> torch.Tensor:
    """`model.encode_text(tokens)` (unnormalised), with the batch cut to its longest text if `trim`."""
    if not trim:
        return model.encode_text(tokens)
    import open_clip.transformer as oct

    length = int((tokens != 0).sum(dim=1).max())
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = oct.text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, oct.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


class Encoder:
    """Embeds texts and images with one open_clip model into its shared space.

    Example:
        >>> enc = Encoder(load_model("toyworld"))
        >>> enc.encode_text(["a small red circle on the left"]).shape
        (1, 128)
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.trim_padding = can_trim_padding(loaded.model)
        self.dtype = next(loaded.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return self.loaded.embed_dim

    def encode_text(
        self,
        texts: str | Sequence[str],
        batch_size: int = 256,
        show_progress_bar: bool | None = None,
        normalize: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embed texts.

        Args:
            texts: one text (gives a 1-D vector) or a list (gives a 2-D array, one row each).
            batch_size: texts per forward pass.
            show_progress_bar: None shows one on stderr when it is a terminal.
            normalize: L2-normalise each vector.
            on_batch: called with the number of texts after each batch (for callers' own progress).
        """
        single = isinstance(texts, str)
        items: list[str] = [texts] if isinstance(texts, str) else list(texts)
        out = self.encode_tokens(self.tokenize(items), batch_size, show_progress_bar, normalize, on_batch)
        return out[0] if single else out

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """The model's token ids for `texts`, [len(texts), context_length] (for `encode_tokens`).

        Separate from encoding so that a build can tokenize the next chunk in a thread while
        this one is encoded.
        """
        import torch

        if not texts:
            return torch.zeros((0, self.loaded.context_length), dtype=torch.long)
        return self.loaded.tokenizer(list(texts))

    def encode_tokens(
        self,
        tokens: torch.Tensor,
        batch_size: int = 256,
        show_progress_bar: bool | None = None,
        normalize: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embed tokenized texts (`tokenize`'s output): a 2-D array, one row each, in input order."""
        import numpy as np
        import torch

        lengths = (tokens != 0).sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True)
        out = np.empty((len(tokens), self.dim), dtype=np.float32)
        with (
            torch.inference_mode(),
            text_attention(self.loaded.device),
            progress(len(tokens), "encoding texts", "texts", show_progress_bar) as advance,
        ):
            for start in range(0, len(tokens), batch_size):
                idx = order[start : start + batch_size]
                batch = tokens[idx].to(self.loaded.device)
                features = encode_text_tokens(self.loaded.model, batch, self.trim_padding).float()
                if normalize:
                    features = torch.nn.functional.normalize(features, dim=-1)
                out[idx.numpy()] = features.cpu().numpy()
                advance(len(idx))
                if on_batch:
                    on_batch(len(idx))
        return out

    def encode_image(
        self,
        images: Image.Image | Sequence[Image.Image] | Iterable[Image.Image],
        batch_size: int = 64,
        show_progress_bar: bool | None = None,
        normalize: bool = True,
    ) -> np.ndarray:
        """Embed PIL images (see `retriever.images.load_image` for reading files safely).

        A single image gives a 1-D vector, a list a 2-D array.
        """
        import numpy as np
        import torch
        from PIL import Image

        single = isinstance(images, Image.Image)
        items: list[Image.Image] = [images] if isinstance(images, Image.Image) else list(images)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        with torch.inference_mode(), progress(len(items), "encoding images", "images", show_progress_bar) as advance:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                pixels = torch.stack([self.loaded.preprocess(im.convert("RGB")) for im in chunk])
                pixels = pixels.to(self.loaded.device, dtype=self.dtype)
                features = self.loaded.model.encode_image(pixels).float()
                if normalize:
                    features = torch.nn.functional.normalize(features, dim=-1)
                out[start : start + len(chunk)] = features.cpu().numpy()
                advance(len(chunk))
        return out[0] if single else out
