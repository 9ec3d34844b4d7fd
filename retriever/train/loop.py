"""The parts of the fine-tuning loop: data, optimizer, one step, evaluation, and Ctrl-C handling.

`retriever.train.finetune` puts them together; each part is open_clip's where open_clip has one.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from retriever.corpus.pairs import Pairs
from retriever.errors import RetrieverError

if TYPE_CHECKING:
    from retriever.train.finetune import EpochReport, TrainOptions


def mixed_precision(precision: str, device: str) -> tuple[Callable[[], Any], Any]:
    """(autocast context factory, gradient scaler or None) for a precision setting on a device."""
    import torch

    cuda = device.startswith("cuda")
    if precision == "auto":
        precision = "amp" if cuda else "fp32"
    if precision == "fp32":
        return nullcontext, None
    if precision == "amp" and not cuda:
        raise RetrieverError("precision amp needs a CUDA device; use fp32 or bf16")
    # amp: bf16 where the GPU has it (no scaler needed), else fp16 with a gradient scaler.
    dtype = torch.bfloat16 if precision == "bf16" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.split(":")[0], dtype=dtype)), scaler


class PairDataset:
    """Training pairs as (pixels, tokens); an unreadable image gives its error instead."""

    def __init__(self, pairs: Pairs, transform: Any, tokenizer: Any):
        self.images, self.captions = pairs.images, pairs.captions
        self.transform, self.tokenizer = transform, tokenizer

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[Any, str | None]:
        from retriever.errors import ImageError
        from retriever.models.images import load_image

        try:
            image = load_image(self.images[i])
        except ImageError as e:
            return None, str(e)
        return (self.transform(image), self.tokenizer([self.captions[i]])[0]), None


def collate(items: list[tuple[Any, str | None]]) -> tuple[Any, Any, list[str]]:
    """(pixels, tokens, errors) of a batch; pixels and tokens are None when no image was readable."""
    import torch

    good = [item for item, _ in items if item is not None]
    errors = [str(error) for item, error in items if item is None]
    if not good:
        return None, None, errors
    return torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), errors


def ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops at a step boundary.

    A terminal sends SIGINT to the whole process group; a worker that took it would exit, and the
    main process would then fail with "DataLoader worker exited unexpectedly" instead of saving.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches, the same on every run, so a resumed epoch skips exactly what was done."""
    import numpy as np

    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    if n < batch_size:
        return [order]
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train_step(net: Any, loss_fn: Any, optimizer: Any, scaler: Any, autocast: Any, pixels: Any, tokens: Any) -> float:
    """One optimizer step on a batch; returns its loss."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    with autocast():
        total = sum(loss_fn(**net(pixels, tokens), output_dict=True).values())
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()
    with torch.no_grad():
        net.logit_scale.clamp_(0, math.log(100))
    return float(total.detach())


def evaluate(
    loaded: Any, loss_fn: Any, pairs: Pairs, options: TrainOptions, coca: bool, autocast: Any, report: EpochReport
) -> None:
    """Fill in the report's validation loss, caption R@1 and (CoCa) greedy exact match.

    Exact match is only informative where captions come from a closed set that repeats (the toy
    world, templated data); on free-form captions like COCO's it stays near zero. The global RNG
    is left as it was, so that evaluating cannot change what training draws next.
    """
    import torch

    from retriever.errors import ImageError
    from retriever.models.images import load_image
    from retriever.train.evaluation import caption_recall_at_1, exact_match

    net = loaded.model
    net.eval()
    losses, weights = [], []
    dataset = PairDataset(pairs, loaded.preprocess, loaded.tokenizer)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        for start in range(0, len(pairs), options.batch_size):
            pixels, tokens, _ = collate([dataset[i] for i in range(start, min(len(pairs), start + options.batch_size))])
            if pixels is None or len(pixels) < 2:
                continue
            with autocast():
                out = net(pixels.to(loaded.device), tokens.to(loaded.device))
                losses.append(float(sum(loss_fn(**out, output_dict=True).values())) * len(pixels))
            weights.append(len(pixels))
        report.val_loss = sum(losses) / sum(weights) if weights else None
        by_image = list(pairs.unique_images().items())[: options.eval_images]
        images, captions = [], []
        for path, caps in by_image:
            try:
                images.append(load_image(path))
                captions.append(caps)
            except ImageError:
                continue
        report.recall_at_1 = caption_recall_at_1(loaded, images, captions)
        if coca:
            report.exact_match = exact_match(loaded, images, captions)
    net.train()


def make_loss(coca: bool, options: TrainOptions) -> Any:
    """CoCa's loss (captioning + weighted contrastive) or CLIP's contrastive loss."""
    from open_clip.loss import ClipLoss, CoCaLoss

    if coca:
        return CoCaLoss(
            caption_loss_weight=options.caption_loss_weight, clip_loss_weight=options.contrastive_loss_weight
        )
    return ClipLoss()


def train_transform(net: Any) -> Any:
    """open_clip's training transform for this model (random resized crop at 90-100% scale, no flips)."""
    from open_clip.model import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = get_model_preprocess_cfg(net)
    return image_transform_v2(
        PreprocessCfg(**{k: v for k, v in cfg.items() if k in {f.name for f in fields(PreprocessCfg)}}), is_train=True
    )


def make_optimizer(net: Any, options: TrainOptions) -> Any:
    """AdamW as open_clip_train builds it: no weight decay on gains, biases and the logit scale."""
    import torch

    def no_decay(name: str, p: Any) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": options.wd},
    ]
    return torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.98), eps=1e-6)


@contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """While inside, a first Ctrl-C only sets a flag the loop checks at step boundaries.

    A second Ctrl-C raises KeyboardInterrupt at once, for a user who will not wait. Signal
    handlers can only be set from the main thread; elsewhere the flag never rises.
    """
    hit = [False]
    if threading.current_thread() is not threading.main_thread():
        yield lambda: hit[0]
        return

    def handler(signum: int, frame: Any) -> None:
        if hit[0]:
            raise KeyboardInterrupt
        hit[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: hit[0]
    finally:
        signal.signal(signal.SIGINT, previous)
