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
    "Retriever": "retriever.search.api",
    "Hit": "retriever.search.api",
    "Encoder": "retriever.models.encoder",
    "load_model": "retriever.models.loading",
    "list_models": "retriever.models.loading",
    "build_index": "retriever.index.build",
    "read_corpus": "retriever.corpus.reader",
    "load_image": "retriever.models.images",
    "Captioner": "retriever.generate.captioner",
    "DecodeOptions": "retriever.generate.decoding",
    "Interrogator": "retriever.prompts.interrogate",
    "TrainOptions": "retriever.train.finetune",
    "convert_coco": "retriever.corpus.coco",
}

__all__ = ["CorpusError", "ImageError", "IndexFormatError", "ModelError", "RetrieverError", *_LAZY]

if TYPE_CHECKING:  # noqa: F401 (names for type checkers; loaded lazily below)
    from retriever.corpus.coco import convert_coco
    from retriever.corpus.reader import read_corpus
    from retriever.generate.captioner import Captioner
    from retriever.generate.decoding import DecodeOptions
    from retriever.index.build import build_index
    from retriever.models.encoder import Encoder
    from retriever.models.images import load_image
    from retriever.models.loading import list_models, load_model
    from retriever.prompts.interrogate import Interrogator
    from retriever.search.api import Hit, Retriever
    from retriever.train.finetune import TrainOptions


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retriever' has no attribute {name!r}")
