"""Fine-tuning a CLIP or CoCa model on (image path, caption) pairs: `retriever finetune`.

The loop is the project's own, built from open_clip's parts: the model factory and its training
transform, `ClipLoss` / `CoCaLoss`, open_clip_train's cosine schedule and its optimizer recipe
(AdamW, no weight decay on gains, biases and the logit scale; logit scale clamped at 100).
open_clip_train's `main()` itself is not driven, because on this job it would need as much code
around it as the loop: it opens image paths relative to the working directory and stops on the
first unreadable image; it resumes only from whole epochs; it picks the CoCa loss by looking for
"coca" in the model name (a `local-dir:` fine-tune of a CoCa has none); its R@1 treats identical
captions of other rows as misses; and it writes `epoch_N.pt` files, not loadable model folders.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from retriever.train.checkpoints import (
    STATE_NAME,
    load_state,
    model_config,
    publish_model_dir,
    save_model_dir,
    save_state,
    write_json,
)
from retriever.errors import ModelError, RetrieverError
from retriever.corpus.pairs import DEFAULT_CAPTION_COLUMN, DEFAULT_IMAGE_COLUMN, Pairs, PairsReport, read_pairs

PRECISIONS = ("auto", "fp32", "amp", "bf16")
# Options that must stay the same when a run is resumed (epochs may grow).
_FIXED_ON_RESUME = ("batch_size", "lr", "warmup", "wd", "caption_loss_weight", "contrastive_loss_weight", "seed")


@dataclass
class TrainOptions:
    """Hyperparameters. Defaults follow open_clip's fine-tuning recipe for CoCa on COCO
    (lr 1e-5, weight decay 0.1, caption loss 1, contrastive loss 0)."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-5
    warmup: int | None = None  # steps; None: 5% of all steps
    wd: float = 0.1
    caption_loss_weight: float = 1.0
    contrastive_loss_weight: float = 0.0
    precision: str = "auto"  # auto: amp on CUDA, fp32 elsewhere
    workers: int | None = None  # data-loading processes; None: up to 4, one core left free
    seed: int = 0
    checkpoint_minutes: float = 10.0  # also saved at each epoch end and on Ctrl-C
    eval_images: int = 500  # images scored for R@1 / exact match after each epoch

    def check(self) -> None:
        """Raise RetrieverError for values that cannot work."""
        problems = []
        if self.epochs < 1:
            problems.append("epochs must be at least 1")
        if self.batch_size < 2:
            problems.append("batch size must be at least 2 (the contrastive loss compares within a batch)")
        if not self.lr > 0:
            problems.append("lr must be positive")
        if self.wd < 0 or (self.warmup is not None and self.warmup < 0):
            problems.append("wd and warmup cannot be negative")
        if self.caption_loss_weight < 0 or self.contrastive_loss_weight < 0:
            problems.append("loss weights cannot be negative")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}")
        if problems:
            raise RetrieverError("; ".join(problems))


@dataclass
class EpochReport:
    """What one epoch did, and how the model scored on the validation pairs after it (epoch 0:
    the starting model, before any training)."""

    epoch: int
    steps: int
    train_loss: float | None
    seconds: float
    val_loss: float | None = None
    recall_at_1: float | None = None
    exact_match: float | None = None


@dataclass
class FinetuneResult:
    """The finished run: where the model is, per-epoch reports and data counts."""

    out: Path
    model: str
    epochs: list[EpochReport]
    train: PairsReport
    val: PairsReport | None
    unreadable_images: list[str] = field(default_factory=list)
    resumed_at: tuple[int, int] | None = None  # (epoch, step in epoch) a resumed run started from
    seconds: float = 0.0
    before: EpochReport | None = None  # the validation scores of the starting model

    def as_dict(self) -> dict:
        return {"out": str(self.out), "model": self.model,
                "before": asdict(self.before) if self.before else None, "epochs": [asdict(e) for e in self.epochs],
                "train": self.train.as_dict(), "val": self.val.as_dict() if self.val else None,
                "unreadable_images": len(self.unreadable_images), "resumed_at": self.resumed_at,
                "seconds": round(self.seconds, 1)}


def finetune(
    train: str | Path,
    out: str | Path,
    model: str,
    pretrained: str | None = None,
    *,
    val: str | Path | None = None,
    options: TrainOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
    from_scratch: bool = False,
    device: str | None = None,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    caption_column: str = DEFAULT_CAPTION_COLUMN,
    show_progress_bar: bool | None = None,
    on_event: Callable[[str, dict], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `model` on the pairs in `train`; the result is a `local-dir:` model folder at `out`.

    After each epoch `out` holds the latest model (load it with `load_model(f"local-dir:{out}")`),
    `out/checkpoints/epoch_N/` keeps each epoch's, and `out/checkpoints/state.pt` what `resume`
    needs. The state is also saved every `options.checkpoint_minutes` and on KeyboardInterrupt.

    Args:
        train: pairs file (`filepath` and `title` columns by default; see `retriever.pairs`).
        out: output folder.
        model, pretrained: as for `load_model` (a CLIP or a CoCa).
        val: held-out pairs: validation loss, caption R@1 and, for CoCa, exact match are
            reported after each epoch.
        options: hyperparameters.
        resume: continue the run saved in `out` (same data and settings; `epochs` may grow).
        overwrite: replace a previous run in `out`.
        from_scratch: start from random weights (the architecture of `model` only).
        device: `cuda`, `mps`, `cpu`, or None for the best available.
        image_column, caption_column: column names in the pairs files.
        show_progress_bar: None shows one on stderr when it is a terminal.
        on_event: called with ("step" | "epoch" | "unreadable_image" | "checkpoint", details).

    Raises:
        CorpusError: unusable pairs file. ModelError: model cannot be loaded or trained.
        RetrieverError: bad options, or `out` holds something `resume`/`overwrite` do not allow.
    """
    import torch

    from retriever.generate.coca import is_coca
    from retriever.models.loading import load_model, pick_device
    from retriever.progress import progress

    started = time.perf_counter()
    options = options or TrainOptions()
    options.check()
    device = pick_device(device)
    autocast, scaler = _mixed_precision(options.precision, device)
    out = Path(out)
    emit = on_event or (lambda kind, details: None)
    state_path = out / "checkpoints" / STATE_NAME
    state = _prepare_out(out, state_path, resume, overwrite)

    bad_row = (lambda row: emit("bad_row", {"row": str(row)}))
    pairs = read_pairs(train, image_column, caption_column, on_bad_row=bad_row)
    val_pairs = read_pairs(val, image_column, caption_column, on_bad_row=bad_row) if val else None
    data_id = {"path": str(Path(train).resolve()), "pairs": len(pairs)}
    if state is not None:
        _check_resumable(state, options, data_id)
        model, pretrained, from_scratch = state["model"]["name"], state["model"]["pretrained"], state["model"]["from_scratch"]

    loaded = load_model(model, pretrained, device=device, random_weights=from_scratch)
    pretrained = loaded.spec.pretrained
    net = loaded.model
    coca = is_coca(net)
    config = model_config(loaded)
    if hasattr(net, "output_dict"):
        net.output_dict = True
    loss_fn = _loss(coca, options)
    train_transform = _train_transform(net)
    optimizer = _optimizer(net, options)
    steps_per_epoch = max(1, len(pairs) // options.batch_size)
    total_steps = steps_per_epoch * options.epochs
    warmup = options.warmup if options.warmup is not None else min(1000, total_steps // 20)
    from open_clip_train.scheduler import cosine_lr

    schedule = cosine_lr(optimizer, options.lr, warmup, total_steps)

    history: list[EpochReport] = []
    unreadable: list[str] = []
    epoch, batch_in_epoch, elapsed, losses = 0, 0, 0.0, []
    torch.manual_seed(options.seed)
    if state is not None:
        net.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, batch_in_epoch, losses = state["epoch"], state["batch"], list(state["losses"])
        torch.set_rng_state(state["rng"])  # augmentation continues exactly where it stopped
        history = [EpochReport(**e) for e in state["history"]]
        unreadable, elapsed = list(state["unreadable"]), state["seconds"]
    resumed_at = (epoch, batch_in_epoch) if state is not None else None
    before = EpochReport(**state["before"]) if state is not None and state.get("before") else None
    if val_pairs is not None and state is None:
        before = EpochReport(0, 0, None, 0.0)
        _evaluate(loaded, loss_fn, val_pairs, options, coca, autocast, before)
        emit("epoch", asdict(before))

    def snapshot() -> dict:
        return {"model": {"name": model, "pretrained": pretrained, "from_scratch": from_scratch},
                "options": asdict(options), "data": data_id, "epoch": epoch, "batch": batch_in_epoch,
                "losses": losses, "rng": torch.get_rng_state(),
                "model_state": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "history": [asdict(e) for e in history], "unreadable": unreadable,
                "before": asdict(before) if before else None,
                "seconds": elapsed + time.perf_counter() - started}

    def result() -> FinetuneResult:
        return FinetuneResult(out, str(loaded.spec) + (" from scratch" if from_scratch else ""), history, pairs.report,
                              val_pairs.report if val_pairs else None, unreadable, resumed_at,
                              elapsed + time.perf_counter() - started, before)

    workers = options.workers if options.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    dataset = _PairDataset(pairs, train_transform, loaded.tokenizer)
    last_save = time.perf_counter()
    try:
        while epoch < options.epochs:
            net.train()
            batches = _epoch_batches(len(pairs), options.batch_size, options.seed, epoch)[batch_in_epoch:]
            # Its own generator: creating a loader must not draw from the global RNG that a resumed
            # run restores (with workers=0 an interrupted and resumed run is then bit-identical).
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                                 collate_fn=_collate, pin_memory=device.startswith("cuda"),
                                                 generator=torch.Generator().manual_seed(options.seed * 1000 + epoch))
            epoch_start = time.perf_counter()
            with progress(len(batches), f"epoch {epoch + 1}/{options.epochs}", "steps", show_progress_bar) as advance:
                for pixels, tokens, errors in loader:
                    for error in errors:
                        unreadable.append(error)
                        emit("unreadable_image", {"error": error})
                    if pixels is not None:
                        schedule(epoch * steps_per_epoch + batch_in_epoch)
                        loss = _train_step(net, loss_fn, optimizer, scaler, autocast, pixels.to(device), tokens.to(device))
                        losses.append(loss)
                    batch_in_epoch += 1
                    info = f"loss {losses[-1]:.4f}" if losses else ""
                    advance(1, info)
                    emit("step", {"epoch": epoch + 1, "step": batch_in_epoch, "steps": steps_per_epoch,
                                  "loss": losses[-1] if losses else None, "lr": optimizer.param_groups[0]["lr"]})
                    if time.perf_counter() - last_save > options.checkpoint_minutes * 60:
                        save_state(state_path, snapshot())
                        last_save = time.perf_counter()
                        emit("checkpoint", {"path": str(state_path), "epoch": epoch + 1, "step": batch_in_epoch})
            report = EpochReport(epoch + 1, len(losses), sum(losses) / max(1, len(losses)), round(time.perf_counter() - epoch_start, 1))
            if val_pairs is not None:
                _evaluate(loaded, loss_fn, val_pairs, options, coca, autocast, report)
            # One statement: a Ctrl-C cannot land between recording the epoch and moving past it.
            history, epoch, batch_in_epoch, losses = [*history, report], epoch + 1, 0, []
            info = {"epochs": options.epochs, "data": data_id, "model": {"name": model, "pretrained": pretrained},
                    "report": asdict(report)}
            publish_model_dir(save_model_dir(net, config, out / "checkpoints" / f"epoch_{report.epoch}", info), out)
            save_state(state_path, snapshot())
            last_save = time.perf_counter()
            write_json(out / "finetune.json", result().as_dict())
            emit("epoch", asdict(report))
    except KeyboardInterrupt:
        save_state(state_path, snapshot())
        raise
    return result()


def _mixed_precision(precision: str, device: str) -> tuple[Callable[[], Any], Any]:
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


class _PairDataset:
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


def _collate(items: list[tuple[Any, str | None]]) -> tuple[Any, Any, list[str]]:
    import torch

    good = [item for item, _ in items if item is not None]
    errors = [error for item, error in items if item is None]
    if not good:
        return None, None, errors
    return torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), errors


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches, the same on every run, so a resumed epoch skips exactly what was done."""
    import numpy as np

    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    if n < batch_size:
        return [order]
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _train_step(net: Any, loss_fn: Any, optimizer: Any, scaler: Any, autocast: Any, pixels: Any, tokens: Any) -> float:
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


def _evaluate(loaded: Any, loss_fn: Any, pairs: Pairs, options: TrainOptions, coca: bool, autocast: Any,
              report: EpochReport) -> None:
    """Fill in the report's validation loss, caption R@1 and (CoCa) greedy exact match.

    Exact match is only informative where captions come from a closed set that repeats (the toy
    world, templated data); on free-form captions like COCO's it stays near zero.
    """
    import torch

    from retriever.errors import ImageError
    from retriever.train.evaluation import caption_recall_at_1, exact_match
    from retriever.models.images import load_image

    net = loaded.model
    net.eval()
    losses, weights = [], []
    dataset = _PairDataset(pairs, loaded.preprocess, loaded.tokenizer)
    with torch.inference_mode():
        for start in range(0, len(pairs), options.batch_size):
            pixels, tokens, _ = _collate([dataset[i] for i in range(start, min(len(pairs), start + options.batch_size))])
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


def _loss(coca: bool, options: TrainOptions) -> Any:
    from open_clip.loss import ClipLoss, CoCaLoss

    if coca:
        return CoCaLoss(caption_loss_weight=options.caption_loss_weight, clip_loss_weight=options.contrastive_loss_weight)
    return ClipLoss()


def _train_transform(net: Any) -> Any:
    """open_clip's training transform for this model (random resized crop at 90-100% scale, no flips)."""
    from open_clip.model import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = get_model_preprocess_cfg(net)
    return image_transform_v2(PreprocessCfg(**{k: v for k, v in cfg.items() if k in {f.name for f in fields(PreprocessCfg)}}),
                              is_train=True)


def _optimizer(net: Any, options: TrainOptions) -> Any:
    """AdamW as open_clip_train builds it: no weight decay on gains, biases and the logit scale."""
    import torch

    def no_decay(name: str, p: Any) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": options.wd}]
    return torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.98), eps=1e-6)


def _prepare_out(out: Path, state_path: Path, resume: bool, overwrite: bool) -> dict | None:
    """The saved state to resume from, or None for a fresh run (after clearing `out` if allowed)."""
    if resume and overwrite:
        raise RetrieverError("--resume and --overwrite contradict each other")
    if resume:
        if not state_path.is_file():
            raise RetrieverError(f"{out}: nothing to resume (no {state_path.relative_to(out)})")
        return load_state(state_path)
    if out.exists() and any(out.iterdir()):
        ours = state_path.is_file() or (out / "finetune.json").is_file()
        if not overwrite:
            hint = "add --resume to continue it, or --overwrite to start over" if ours else "choose another --out"
            raise RetrieverError(f"{out} is not empty ({hint})")
        if not ours:
            raise RetrieverError(f"{out} holds files that are not a fine-tuning run; --overwrite only replaces runs")
        shutil.rmtree(out)
    return None


def _check_resumable(state: dict, options: TrainOptions, data_id: dict) -> None:
    saved = state["options"]
    changed = [f"{name} {saved[name]} -> {getattr(options, name)}" for name in _FIXED_ON_RESUME
               if saved.get(name) != getattr(options, name)]
    if changed:
        raise RetrieverError(f"settings changed since the run started ({'; '.join(changed)}); "
                             "resume with the same settings (only --epochs may change)")
    if state["data"] != data_id:
        raise RetrieverError(f"the training data changed since the run started "
                             f"({state['data']['path']}, {state['data']['pairs']} pairs then; "
                             f"{data_id['path']}, {data_id['pairs']} pairs now)")
    if options.epochs < state["epoch"]:
        raise ModelError(f"the run already finished {state['epoch']} epochs; --epochs must be at least that")
