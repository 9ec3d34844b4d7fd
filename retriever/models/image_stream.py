"""Many image files decoded and shrunk in worker processes, in order, ahead of the model.

Decoding a JPEG and resizing it to the model's input costs more CPU than a small model's forward
pass, and Python decodes one image at a time. torch's DataLoader already does parallel, ordered,
prefetching loading (it is what open_clip's training uses), so it does this too: each worker
opens an image with `load_image` and applies the model's PIL-side transforms (resize and centre
crop), so only a small image crosses the process boundary and the main process encodes batch N
while the workers prepare batch N+1. The model's full preprocess then finds the image already at
its size, which resizing leaves unchanged: the vectors are the same as without workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.errors import ImageError
from retriever.models.images import check_shape, load_image

if TYPE_CHECKING:
    from PIL import Image

AUTO_WORKERS_FROM = 128  # fewer images than this are decoded in-process: starting workers costs more


def pil_transforms(preprocess: Any) -> tuple[Any | None, int | None]:
    """The leading PIL-to-PIL steps of a model's preprocess (Resize, CenterCrop) or None, and
    the model's side for `check_shape`. Everything from the tensor conversion on stays here."""
    import torchvision.transforms as T

    steps = []
    for step in getattr(preprocess, "transforms", []):
        if not isinstance(step, (T.Resize, T.CenterCrop)):
            break
        steps.append(step)
    return (T.Compose(steps) if steps else None), getattr(preprocess, "side", None)


def default_workers(count: int) -> int:
    """Workers for `count` images: none for a few, else one per spare core (at most 8)."""
    if count < AUTO_WORKERS_FROM:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class _Images:
    """A map-style dataset: item i is (path, image shrunk by `transform`) or (path, ImageError)."""

    def __init__(self, paths: list[Path], transform: Any | None, side: int | None):
        self.paths, self.transform, self.side = paths, transform, side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, Image.Image | ImageError]:
        path = self.paths[i]
        try:
            image = load_image(path)
            if self.side is not None:  # the bound SafePreprocess checks, at the model's size, before shrinking
                check_shape(image.size, str(path), self.side)
        except ImageError as e:
            return str(path), e
        if self.transform is not None:
            info = dict(image.info)
            image = self.transform(image)
            image.info.update(info)  # keeps the source name for later errors
        return str(path), image


def _as_list(batch: list) -> list:
    return batch


def iter_image_batches(
    paths: list[Path],
    batch_size: int = 64,
    workers: int | None = None,
    transform: Any | None = None,
    side: int | None = None,
) -> Iterator[list[tuple[str, Image.Image | ImageError]]]:
    """Batches of (path, image) in the order of `paths`; an unreadable file gives its ImageError
    in place of the image, so one bad file never stops the rest.

    Args:
        workers: decoding processes; 0 decodes here, None chooses (`default_workers`).
        transform, side: PIL-side steps to run in the workers and the model's side for the
            shape check before them (both from `pil_transforms(model.preprocess)`).
    """
    from torch.utils.data import DataLoader

    workers = default_workers(len(paths)) if workers is None else workers
    if not paths:
        return
    images: Any = _Images(paths, transform, side if transform is not None else None)  # map-style, duck-typed
    loader: Any = DataLoader(
        images,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_as_list,
        prefetch_factor=2 if workers else None,
    )
    yield from loader
