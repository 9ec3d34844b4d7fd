"""FAISS comes from one of two extras, never both: `caption-retriever[cpu]` (faiss-cpu) or `caption-retriever[gpu]` (faiss-gpu)."""

from __future__ import annotations

from typing import Any

from retriever.errors import MissingExtraError


def import_faiss() -> Any:
    """The faiss module, or a clear error naming the install to run."""
    try:
        import faiss
    except ImportError:
        raise MissingExtraError(
            "FAISS is not installed: pip install 'caption-retriever[cpu]', or 'caption-retriever[gpu]' "
            "(faiss-gpu) in an environment without faiss-cpu"
        ) from None
    return faiss
