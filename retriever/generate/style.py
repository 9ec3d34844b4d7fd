"""Captions in a corpus's voice from a text-only style decoder, and `load_generator` for any `--generator`.

CLIP puts an image and its caption near each other, but not on top of each other: a decoder
trained on text embeddings alone meets an image embedding as an input it has never seen (the
modality gap). Two remedies, chosen at training and overridable here:

- `noise` (CapDec, Nukrai et al. 2022): training added Gaussian noise to the normalised text
  embedding, so the decoder accepts a neighbourhood of it; the image embedding is used as it is.
- `memory` (DeCap, Li et al. 2023): the image embedding is replaced by a softmax(similarity / τ)
  weighted sum of the training corpus's text embeddings, which lies in the text region the
  decoder knows. The memory is the folder's stored embeddings, or, for corpora larger than what
  is stored, a lookup that returns an index's nearest text vectors (`memory_lookup`).
- `none`: the image embedding as it is (for comparison).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import ModelError, RetrieverError
from retriever.generate.captioner import Captioner
from retriever.generate.decoding import (
    DecodeOptions,
    beam_search,
    sample,
    tokens_to_text,
)
from retriever.generate.style_model import (
    EOT,
    MEMORY_NAME,
    PAD,
    PROJECTIONS,
    SOT,
    StyleStepper,
    is_style_folder,
    load_decoder,
    load_weights,
)
from retriever.models.loading import BUNDLED_DIR, LoadedModel

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

STYLE_PREFIX = "style:"
DEFAULT_FETCH_K = 256
# `memory_lookup(xq, k)`: the k nearest text vectors of each query row, [n, k, dim] (from an index).
MemoryLookup = Callable[["np.ndarray", int], "np.ndarray"]


REF_OPTIONS = {"projection": str, "memory": str, "fetch_k": int, "memory_temperature": float}


def parse_style_ref(ref: str) -> tuple[str, dict[str, Any]]:
    """`style:PATH?projection=noise&memory=index&fetch_k=64` into (PATH, options), so that
    inference-time overrides work wherever a `--generator` string goes (CLI, Python, server)."""
    path, _, query = ref.removeprefix(STYLE_PREFIX).partition("?")
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in REF_OPTIONS:
            raise RetrieverError(f"{ref}: unknown option {key!r}; choose from {', '.join(REF_OPTIONS)}")
        try:
            options[key] = REF_OPTIONS[key](value)
        except ValueError:
            raise RetrieverError(f"{ref}: {key} must be a {REF_OPTIONS[key].__name__}, got {value!r}") from None
    if options.get("memory", "stored") not in ("stored", "index"):
        raise RetrieverError(
            f"{ref}: memory must be stored (the folder's) or index (an index built with the same model)"
        )
    return path, options


def resolve_style_path(ref: str) -> Path:
    """The folder of a `style:PATH` reference: PATH, or a bundled style decoder's name (`toyworld-style`)."""
    name = parse_style_ref(ref)[0]
    path = Path(name).expanduser()
    if not path.exists() and (BUNDLED_DIR / name).is_dir():
        return BUNDLED_DIR / name
    if not is_style_folder(path):
        what = "does not exist" if not path.exists() else "is not a style decoder (no style.json)"
        raise ModelError(
            f"{path} {what}: train one with `retriever style train CORPUS --out {path}`, "
            "or use the bundled style:toyworld-style"
        )
    return path


def load_generator(
    ref: str | LoadedModel,
    device: str | None = None,
    precision: str = "fp32",
    pretrained: str | None = None,
    **style_options: Any,
) -> Any:
    """A caption writer for a `--generator` value: a `StyleCaptioner` for `style:PATH`, else a CoCa `Captioner`.

    Args:
        ref: `style:PATH` (or `style:toyworld-style`), a CoCa `NAME[:TAG]`, or a loaded CoCa model.
        device, precision: as for `load_model`.
        pretrained: the CoCa's pretrained tag, when `ref` has none.
        style_options: for style decoders, `StyleCaptioner`'s keyword arguments (`projection`,
            `clip`, `memory_lookup`, `fetch_k`, `memory_temperature`).

    Raises:
        ModelError: the model or folder cannot be loaded, or cannot write captions.
    """
    from retriever.models.loading import load_model, split_model_ref

    if isinstance(ref, str) and ref.startswith(STYLE_PREFIX):
        return StyleCaptioner(ref, device=device, precision=precision, **style_options)
    if style_options:
        raise RetrieverError(f"{', '.join(style_options)} apply only to style decoders (style:PATH)")
    if isinstance(ref, str):
        name, tag = split_model_ref(ref)
        ref = load_model(name, pretrained or tag, device=device, precision=precision)
    return Captioner(ref)


class StyleCaptioner(Captioner):
    """Captions for images in the voice of a text corpus, from a style decoder folder.

    A `Captioner` whose tokens come from the style decoder instead of a CoCa (same `caption`,
    `caption_candidates`, `generate_tokens`).

    Example:
        >>> cap = StyleCaptioner("style:styles/haiku")
        >>> cap.caption([image], DecodeOptions(method="beam"))
    """

    def __init__(
        self,
        ref: str | Path,
        device: str | None = None,
        precision: str = "fp32",
        *,
        clip: LoadedModel | None = None,
        projection: str | None = None,
        memory_lookup: MemoryLookup | None = None,
        fetch_k: int = DEFAULT_FETCH_K,
        memory_temperature: float | None = None,
    ):
        """Load the decoder and its CLIP model (or use `clip`, which must be the same weights).

        Args:
            ref: `style:PATH`, or the folder.
            device, precision: for the CLIP model (the decoder runs in fp32 on the same device).
            clip: an already loaded CLIP model to share (e.g. an index's).
            projection: `memory`, `noise` or `none`; default: what the folder records.
            memory_lookup: nearest text vectors from an index built with the same model, used
                as the projection memory instead of the stored one.
            fetch_k: neighbours `memory_lookup` returns per image.
            memory_temperature: τ of the memory projection's softmax; default: the folder's.
        """
        from retriever.models.loading import load_model

        self.path = resolve_style_path(str(ref))
        overrides = parse_style_ref(str(ref))[1]
        projection = projection or overrides.get("projection")
        fetch_k = overrides.get("fetch_k", fetch_k)
        memory_temperature = memory_temperature or overrides.get("memory_temperature")
        # memory=index: the Retriever that holds an index built with the same model supplies the lookup.
        self.wants_index_memory = overrides.get("memory") == "index"
        if clip is None:
            recorded = _read_clip_ref(self.path)
            clip = load_model(recorded["name"], recorded["pretrained"], device=device, precision=precision)
        self.folder, self.decoder = load_decoder(self.path, clip.device)
        check_same_clip(self.folder.clip, clip, self.path)
        self.clip = clip
        self.spec = f"style:{self.path}"
        self.source = "styled"  # how hybrid results mark this generator's captions
        self.projection = projection or self.folder.projection
        if self.projection not in PROJECTIONS:
            raise RetrieverError(f"unknown projection {self.projection!r}; choose from {', '.join(PROJECTIONS)}")
        self.memory_temperature = memory_temperature or self.folder.memory_temperature
        self.memory_lookup, self.fetch_k = memory_lookup, fetch_k
        self.memory = None
        if self.projection == "memory" and memory_lookup is None and not self.wants_index_memory:
            if not (self.path / MEMORY_NAME).is_file():
                raise ModelError(
                    f"{self.path}: no {MEMORY_NAME} for the memory projection; retrain with "
                    "--memory-size > 0, use projection noise, or give an index built with the same model"
                )
            self.memory = load_weights(self.path / MEMORY_NAME)["memory"].to(clip.device)
        self.vocab = self.folder.config.vocab
        self.context_length = self.folder.config.max_tokens  # caps max_len, as the CoCa's positions do

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Normalised CLIP image embeddings, projected as `self.projection` says: [n, dim] float32."""
        import torch

        from retriever.models.encoder import Encoder

        xq = Encoder(self.clip).encode_image(list(images), show_progress_bar=False)
        if self.projection != "memory":
            return torch.from_numpy(xq).to(self.clip.device)
        if self.memory_lookup is not None:
            memory = torch.from_numpy(self.memory_lookup(xq, self.fetch_k)).float().to(self.clip.device)
        elif self.memory is None:
            raise RetrieverError(
                f"{self.spec}: memory=index needs an index built with {self.clip.spec} "
                "(query --index INDEX), or drop memory=index to use the stored memory"
            )
        else:
            memory = self.memory.float()[None].expand(len(xq), -1, -1)
        return project_to_memory(torch.from_numpy(xq).to(self.clip.device), memory, self.memory_temperature)

    def generate_tokens(self, images: Sequence[Image.Image], opts: DecodeOptions, n: int = 1) -> list[list[list[int]]]:
        """Up to `n` compact-id sequences (each starting with the start token) per image, best first."""
        import torch

        opts = self.options(opts)
        with torch.inference_mode():
            embeddings = self.embed(images)
            return self.decode_embeddings(embeddings, opts, n)

    def decode_embeddings(self, embeddings: torch.Tensor, opts: DecodeOptions, n: int = 1) -> list[list[list[int]]]:
        """Decode [batch, dim] (already projected) embeddings; see `generate_tokens`."""
        import torch

        with torch.inference_mode():
            if opts.method != "beam" and n > 1:
                embeddings = embeddings.repeat_interleave(n, dim=0)
            beams = opts.beams if opts.method == "beam" else 1
            stepper = StyleStepper(self.decoder, embeddings.float(), beams=beams, max_len=opts.max_len)
            if opts.method == "beam":
                return [ranked[:n] for ranked in beam_search(stepper, len(embeddings), opts, SOT, EOT, PAD)]
            rows = sample(stepper, len(embeddings), opts, SOT, EOT, PAD).tolist()
        return [rows[i : i + n] for i in range(0, len(rows), n)] if n > 1 else [[row] for row in rows]

    def to_text(self, tokens: list[int]) -> str:
        """Compact ids (start token first) to clean text."""
        return detokenize(
            tokens_to_text(tokens, EOT, lambda body: self.clip.tokenizer.decode([self.vocab[t] for t in body]))
        )


def detokenize(text: str) -> str:
    """Undo the spaces CLIP's BPE decoding puts around punctuation ("star , large" -> "star, large")."""
    text = re.sub(r" ([,.;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    return re.sub(r" '(s|t|re|ve|m|ll|d)\b", r"'\1", text)


def project_to_memory(xq: torch.Tensor, memory: torch.Tensor, temperature: float) -> torch.Tensor:
    """DeCap's projection: each row of `xq` [n, d] becomes the softmax(sim / τ)-weighted sum of its
    memory rows (`memory` [n, m, d]), normalised."""
    import torch

    weights = torch.softmax(torch.einsum("nd,nmd->nm", xq, memory) / temperature, dim=-1)
    return torch.nn.functional.normalize(torch.einsum("nm,nmd->nd", weights, memory), dim=-1)


def check_same_clip(recorded: dict, clip: LoadedModel, path: Path) -> None:
    """A decoder only understands the CLIP model it was trained with: anything else is an error naming both."""
    if recorded.get("fingerprint") != clip.fingerprint:
        trained = f"{recorded.get('name')}" + (f" ({recorded['pretrained']})" if recorded.get("pretrained") else "")
        raise ModelError(
            f"{path} was trained with CLIP {trained} [{recorded.get('fingerprint')}], "
            f"not {clip.spec} [{clip.fingerprint}]; use it with the model it was trained with, "
            f"or retrain it with `retriever style train --model ...`"
        )


def _read_clip_ref(path: Path) -> dict:
    from retriever.generate.style_model import read_style_folder

    return read_style_folder(path).clip
