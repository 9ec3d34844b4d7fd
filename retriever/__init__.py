"""retriever: caption ideas for images from CLIP retrieval over your own text corpus.

    from retriever import Retriever
    hits = Retriever.open("indexes/toyworld").query("image.png", k=10)

Importing the package is cheap: torch, open_clip and faiss load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from retriever.errors import CorpusError, ImageError, IndexFormatError, ModelError, RetrieverError

__version__ = "0.1.0"

_LAZY = {
    "Retriever": "retriever.api",
    "Hit": "retriever.api",
    "Encoder": "retriever.encoder",
    "load_model": "retriever.models",
    "list_models": "retriever.models",
    "build_index": "retriever.build",
    "read_corpus": "retriever.corpus",
    "load_image": "retriever.images",
    "Captioner": "retriever.captioner",
    "DecodeOptions": "retriever.decoding",
    "Interrogator": "retriever.interrogate",
    "TrainOptions": "retriever.finetune",
    "convert_coco": "retriever.coco",
}

__all__ = ["CorpusError", "ImageError", "IndexFormatError", "ModelError", "RetrieverError", *_LAZY]

if TYPE_CHECKING:  # noqa: F401 (names for type checkers; loaded lazily below)
    from retriever.api import Hit, Retriever
    from retriever.build import build_index
    from retriever.captioner import Captioner
    from retriever.coco import convert_coco
    from retriever.corpus import read_corpus
    from retriever.decoding import DecodeOptions
    from retriever.encoder import Encoder
    from retriever.finetune import TrainOptions
    from retriever.images import load_image
    from retriever.interrogate import Interrogator
    from retriever.models import list_models, load_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retriever' has no attribute {name!r}")
