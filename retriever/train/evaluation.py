"""Held-out quality of a model on image-caption pairs: caption retrieval R@1 and CoCa exact match.

Captions are deduplicated before ranking: in COCO an image has five captions and in the toy
world many images share one, so "the caption at the image's own row" (open_clip_train's
`get_clip_metrics`) would count an identical caption of another row as a miss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from retriever.models.loading import LoadedModel


def caption_recall_at_1(
    loaded: LoadedModel, images: Sequence[Image.Image], captions: Sequence[set[str]], batch_size: int = 64
) -> float:
    """Share of images whose most similar caption, among all distinct captions given, is one of theirs.

    Args:
        loaded: the CLIP (or CoCa) model to score with.
        images: the images.
        captions: for each image, the set of its correct captions.
    """
    from retriever.models.encoder import Encoder

    if not images:
        return float("nan")
    texts = sorted(set().union(*captions))
    encoder = Encoder(loaded)
    xb = encoder.encode_text(texts, batch_size=256, show_progress_bar=False)
    xq = encoder.encode_image(list(images), batch_size=batch_size, show_progress_bar=False)
    best = (xq @ xb.T).argmax(axis=1)
    return sum(texts[int(i)] in caps for i, caps in zip(best, captions)) / len(images)


def exact_match(
    loaded: LoadedModel, images: Sequence[Image.Image], captions: Sequence[set[str]], batch_size: int = 16
) -> float:
    """Share of images whose greedy CoCa caption is exactly one of theirs (useful when captions repeat)."""
    from retriever.generate.captioner import Captioner
    from retriever.generate.decoding import DecodeOptions

    if not images:
        return float("nan")
    written = Captioner(loaded).caption(list(images), DecodeOptions(method="greedy"), batch_size=batch_size)
    return sum(" ".join(text.split()) in caps for text, caps in zip(written, captions)) / len(images)
