"""The Python API: open an index with its model, query it with images or text."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from retriever.encoder import Encoder
from retriever.errors import IndexFormatError, RetrieverError
from retriever.images import load_image
from retriever.index import TextIndex, read_index, read_manifest
from retriever.models import LoadedModel, load_model

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image



@dataclass
class Hit:
    """One retrieved text: cosine `score` to the query, row `id` in the index, and its metadata."""

    text: str
    score: float
    id: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Retriever:
    """Nearest texts for images, over an index built by `build_index`.

    Example:
        >>> r = Retriever.open("indexes/toyworld")
        >>> [h.text for h in r.query("cat.png", k=3)]
    """

    def __init__(self, index: TextIndex, model: LoadedModel):
        built_with = index.manifest["model"]
        if model.fingerprint != built_with["fingerprint"]:
            raise IndexFormatError(
                f"{index.path} was built with {_model_label(built_with)}, not {model.spec}; "
                "query it with the model that built it, or rebuild the index"
            )
        if model.embed_dim != index.manifest["embedding_dim"]:
            raise IndexFormatError(f"{index.path}: dimension {index.manifest['embedding_dim']} != model's {model.embed_dim}")
        self.index = index
        self.model = model
        self.encoder = Encoder(model)

    @classmethod
    def open(cls, index: str | Path, model: str | None = None, pretrained: str | None = None,
             device: str | None = None, precision: str = "fp32") -> Retriever:
        """Open an index with the model recorded in its manifest, or with `model`/`pretrained`
        (which must be the same weights, e.g. a checkpoint that has moved)."""
        manifest = read_manifest(index)
        recorded = manifest["model"]
        if model is None:
            model, pretrained = recorded["name"], pretrained or recorded["pretrained"]
        loaded = load_model(model, pretrained, device=device, precision=precision)
        return cls(read_index(index, use_gpu=None if device in (None, "cuda") else False), loaded)

    def query(self, image: str | Path | Image.Image, k: int = 10) -> list[Hit]:
        """The `k` texts nearest to one image (a path or a PIL image), best first."""
        return self.query_many([image], k=k)[0]

    def query_many(self, images: Sequence[str | Path | Image.Image], k: int = 10, batch_size: int = 64) -> list[list[Hit]]:
        """`query` for several images at once; raises ImageError on the first unreadable one."""
        from PIL import Image

        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return self.search(self.encoder.encode_image(pil, batch_size=batch_size, show_progress_bar=False), k)

    def query_text(self, text: str, k: int = 10) -> list[Hit]:
        """The `k` indexed texts nearest to a text query."""
        return self.search(self.encoder.encode_text([text], show_progress_bar=False), k)[0]

    def search(self, xq: np.ndarray, k: int) -> list[list[Hit]]:
        """Hits for each row of `xq` (normalised query vectors from this model)."""
        if k < 1:
            raise RetrieverError(f"k must be at least 1, got {k}")
        D, I = self.index.search(xq, k)
        results = []
        for scores, ids in zip(D, I):
            rows = self.index.rows([int(i) for i in ids if i >= 0])
            results.append([_hit(row, float(s)) for row, s in zip(rows, scores)])
        return results


def _hit(row: dict, score: float) -> Hit:
    row = {key: _plain(value) for key, value in row.items()}
    return Hit(text=row.pop("text"), score=score, id=int(row.pop("id")), metadata=row)


def _plain(value: Any) -> Any:
    """Numpy scalars to Python, NaN (pandas' missing value) to None, so hits serialise as JSON."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _model_label(described: dict) -> str:
    name, pretrained = described.get("name"), described.get("pretrained")
    return f"{name} ({pretrained})" if pretrained else str(name)
