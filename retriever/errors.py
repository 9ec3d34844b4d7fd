"""The one exception family the library raises; the CLI turns these into one-line messages."""


class RetrieverError(Exception):
    """Base class for every error `retriever` raises on bad input or environment."""


class ModelError(RetrieverError):
    """A model cannot be found, downloaded or used for the requested job."""


class CorpusError(RetrieverError):
    """A corpus file cannot be read, or holds no usable text."""


class ImageError(RetrieverError):
    """An image cannot be read; `path` names it, `kind` says why (missing, empty, not_image,
    broken, too_large)."""

    def __init__(self, path: str, reason: str, kind: str = "broken"):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.kind = kind

    def __reduce__(self):  # rebuilt from its own arguments when it crosses a process boundary
        return ImageError, (self.path, self.reason, self.kind)


class IndexFormatError(RetrieverError):
    """An index directory is missing, incomplete, or built by another model or format."""


class MissingExtraError(RetrieverError):
    """An optional feature was used without its extra installed."""
