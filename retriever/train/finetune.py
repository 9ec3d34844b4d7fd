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

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retriever.corpus.pairs import (
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_IMAGE_COLUMN,
    Pairs,
    PairsReport,
    read_pairs,
)
from retriever.errors import ModelError, RetrieverError
from retriever.train.checkpoints import (
    STATE_NAME,
    check_state_fields,
    file_sha256,
    load_state,
    model_config,
    publish_model_dir,
    remove_leftovers,
    restore_tensors,
    save_epoch_dir,
    save_state,
    training_tensors,
    unreadable,
    write_json,
)
from retriever.train.loop import (
    PairDataset,
    collate,
    deferred_interrupt,
    epoch_batches,
    evaluate,
    ignore_sigint,
    make_loss,
    make_optimizer,
    mixed_precision,
    train_step,
    train_transform,
)
from retriever.train.outdir import check_out, clear, guard_inputs

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
        return {
            "out": str(self.out),
            "model": self.model,
            "before": asdict(self.before) if self.before else None,
            "epochs": [asdict(e) for e in self.epochs],
            "train": self.train.as_dict(),
            "val": self.val.as_dict() if self.val else None,
            "unreadable_images": len(self.unreadable_images),
            "resumed_at": self.resumed_at,
            "seconds": round(self.seconds, 1),
        }


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
    `out/checkpoints/epoch_N/` keeps each epoch's, and `out/checkpoints/state.json` (with the
    safetensors file it names) what `resume` needs. The state is also saved every
    `options.checkpoint_minutes`, and on Ctrl-C, which takes effect at the end of the current step.

    Args:
        train: pairs file (`filepath` and `title` columns by default; see `retriever.pairs`).
        out: output folder.
        model: as for `load_model` (a CLIP or a CoCa).
        pretrained: as for `load_model`.
        val: held-out pairs: validation loss, caption R@1 and, for CoCa, exact match are
            reported after each epoch.
        options: hyperparameters.
        resume: continue the run saved in `out` (same data and settings; `epochs` may grow).
        overwrite: replace a previous run in `out` (only the files a run writes are deleted).
        from_scratch: start from random weights (the architecture of `model` only).
        device: `cuda`, `mps`, `cpu`, or None for the best available.
        image_column: the image column's name in the pairs files.
        caption_column: the caption column's name in the pairs files.
        show_progress_bar: None shows one on stderr when it is a terminal.
        on_event: called with ("step" | "epoch" | "unreadable_image" | "checkpoint" | "bad_row", details).

    Raises:
        CorpusError: unusable pairs file. ModelError: model cannot be loaded or trained, or the
            saved state is unreadable. RetrieverError: bad options, `out` holds something
            `resume`/`overwrite` do not allow, or an epoch had no readable image.
        KeyboardInterrupt: after Ctrl-C, once the state is saved.
    """
    from retriever.models.loading import pick_device

    started = time.perf_counter()
    options = options or TrainOptions()
    options.check()
    device = pick_device(device)
    precision = mixed_precision(options.precision, device)
    out = Path(out)
    emit = on_event or (lambda kind, details: None)
    # Everything that can be checked cheaply is, before anything is deleted or loaded.
    to_clear = check_out(out, resume, overwrite)

    def bad_row(row: object) -> None:
        emit("bad_row", {"row": str(row)})

    pairs = read_pairs(train, image_column, caption_column, on_bad_row=bad_row)
    val_pairs = read_pairs(val, image_column, caption_column, on_bad_row=bad_row) if val else None
    data_id = {"path": str(Path(train).resolve()), "pairs": len(pairs), "sha256": file_sha256(train)}
    checkpoints = out / "checkpoints"
    saved = None
    if resume:
        saved = load_state(checkpoints)
        check_state_fields(saved[0], checkpoints / STATE_NAME)
        _check_resumable(saved[0], options, data_id)
        model, pretrained, from_scratch = (saved[0]["model"][k] for k in ("name", "pretrained", "from_scratch"))
        remove_leftovers(checkpoints, keep=saved[0]["tensors"]["file"])
    local = model[len("local-dir:") :] if model.startswith("local-dir:") else None
    guard_inputs(
        to_clear, {"--model": local, "--pretrained": pretrained if pretrained and Path(pretrained).exists() else None}
    )
    clear(to_clear)

    run = _Run(
        Path(train), out, options, pairs, val_pairs, data_id, device, precision, emit, show_progress_bar, started
    )
    run.build(model, pretrained, from_scratch)
    if saved is not None:
        run.restore(*saved, path=checkpoints / STATE_NAME)
    else:
        run.evaluate_before()
    return run.train()


class _Run:
    """One fine-tuning run: the model, optimizer and schedule, and where in the data it stands."""

    def __init__(
        self,
        train: Path,
        out: Path,
        options: TrainOptions,
        pairs: Pairs,
        val_pairs: Pairs | None,
        data_id: dict,
        device: str,
        precision: tuple[Callable[[], Any], Any],
        emit: Callable[[str, dict], None],
        show_progress_bar: bool | None,
        started: float,
    ):
        self.train_path, self.out, self.options, self.pairs, self.val_pairs = train, out, options, pairs, val_pairs
        self.data_id, self.device, self.emit, self.show_bar, self.started = (
            data_id,
            device,
            emit,
            show_progress_bar,
            started,
        )
        self.autocast, self.scaler = precision
        self.epoch, self.batch = 0, 0
        self.losses: list[float] = []
        self.history: list[EpochReport] = []
        self.unreadable: list[str] = []
        self.elapsed = 0.0
        self.before: EpochReport | None = None
        self.resumed_at: tuple[int, int] | None = None
        # `consistent`: the live objects describe a step boundary, so saving them now is safe.
        # `dirty`: steps were taken since the last save.
        self.consistent, self.dirty = True, False
        self.last_save = time.perf_counter()

    def build(self, model: str, pretrained: str | None, from_scratch: bool) -> None:
        """Load the model and set up the loss, data, optimizer and learning-rate schedule."""
        import torch
        from open_clip_train.scheduler import cosine_lr

        from retriever.generate.coca import is_coca
        from retriever.models.loading import load_model

        self.loaded = load_model(model, pretrained, device=self.device, random_weights=from_scratch)
        self.model = {"name": model, "pretrained": self.loaded.spec.pretrained, "from_scratch": from_scratch}
        self.net = self.loaded.model
        self.coca = is_coca(self.net)
        self.config = model_config(self.loaded)
        if hasattr(self.net, "output_dict"):
            self.net.output_dict = True
        self.loss_fn = make_loss(self.coca, self.options)
        self.dataset = PairDataset(self.pairs, train_transform(self.net), self.loaded.tokenizer)
        self.optimizer = make_optimizer(self.net, self.options)
        self.steps_per_epoch = max(1, len(self.pairs) // self.options.batch_size)
        total_steps = self.steps_per_epoch * self.options.epochs
        warmup = self.options.warmup if self.options.warmup is not None else min(1000, total_steps // 20)
        self.schedule = cosine_lr(self.optimizer, self.options.lr, warmup, total_steps)
        torch.manual_seed(self.options.seed)

    def restore(self, meta: dict, tensors: dict[str, Any], path: Path) -> None:
        """Put the live objects where the saved state left them."""
        restore_tensors(path, meta, tensors, self.net, self.optimizer, self.scaler, str(self.loaded.spec))
        try:
            self.history = [EpochReport(**e) for e in meta["history"]]
            self.before = EpochReport(**meta["before"]) if meta["before"] else None
        except TypeError as e:
            raise unreadable(path, f"a history entry does not fit: {e}") from None
        self.epoch, self.batch, self.losses = meta["epoch"], meta["batch"], list(meta["losses"])
        self.unreadable, self.elapsed = list(meta["unreadable"]), float(meta["seconds"])
        self.resumed_at = (self.epoch, self.batch)

    def evaluate_before(self) -> None:
        """Score the starting model on the validation pairs (epoch 0), so the effect of training shows."""
        if self.val_pairs is None:
            return
        self.before = EpochReport(0, 0, None, 0.0)
        evaluate(self.loaded, self.loss_fn, self.val_pairs, self.options, self.coca, self.autocast, self.before)
        self.emit("epoch", asdict(self.before))

    def train(self) -> FinetuneResult:
        """Run the remaining epochs; on Ctrl-C, stop at a step boundary, save and raise KeyboardInterrupt."""
        with deferred_interrupt() as interrupted:
            try:
                while self.epoch < self.options.epochs and not interrupted():
                    self.train_epoch(interrupted)
                    if not interrupted():
                        self.finish_epoch()
            except KeyboardInterrupt:
                if self.consistent and self.dirty:
                    self.save_state()
                raise
            if self.epoch < self.options.epochs:
                if self.dirty:
                    self.save_state()
                raise KeyboardInterrupt
        return self.result()

    def train_epoch(self, interrupted: Callable[[], bool]) -> None:
        """Train on the rest of the current epoch's batches, or until Ctrl-C."""
        import torch

        from retriever.progress import progress

        self.net.train()
        self.epoch_start, self.tried = time.perf_counter(), 0
        self.failed: list[str] = []
        options = self.options
        batches = epoch_batches(len(self.pairs), options.batch_size, options.seed, self.epoch)[self.batch :]
        # Its own generator: creating a loader must not draw from the global RNG that a resumed
        # run restores (with workers=0 an interrupted and resumed run is then bit-identical).
        loader: Any = torch.utils.data.DataLoader(
            self.dataset,  # type: ignore[arg-type]
            batch_sampler=batches,
            num_workers=self._workers(),
            collate_fn=collate,
            pin_memory=self.device.startswith("cuda"),
            worker_init_fn=ignore_sigint,
            generator=torch.Generator().manual_seed(options.seed * 1000 + self.epoch),
        )
        label = f"epoch {self.epoch + 1}/{options.epochs}"
        with progress(len(batches), label, "steps", self.show_bar) as advance:
            for pixels, tokens, errors in loader:
                self.step(pixels, tokens, errors, len(batches[0]) if batches else 0)
                advance(1, f"loss {self.losses[-1]:.4f}" if self.losses else "")
                self.emit(
                    "step",
                    {
                        "epoch": self.epoch + 1,
                        "step": self.batch,
                        "steps": self.steps_per_epoch,
                        "loss": self.losses[-1] if self.losses else None,
                        "lr": self.optimizer.param_groups[0]["lr"],
                    },
                )
                if time.perf_counter() - self.last_save > options.checkpoint_minutes * 60:
                    self.save_state()
                    self.emit(
                        "checkpoint",
                        {
                            "path": str(self.out / "checkpoints" / STATE_NAME),
                            "epoch": self.epoch + 1,
                            "step": self.batch,
                        },
                    )
                if interrupted():
                    return

    def step(self, pixels: Any, tokens: Any, errors: list[str], size: int) -> None:
        """One batch: note its unreadable images, train on the rest, move one batch on."""
        self.consistent = False
        for error in errors:
            self.unreadable.append(error)
            self.failed.append(error)
            self.emit("unreadable_image", {"error": error})
        self.tried += len(errors) + (0 if pixels is None else len(pixels))
        if pixels is not None:
            self.schedule(self.epoch * self.steps_per_epoch + self.batch)
            self.losses.append(
                train_step(
                    self.net,
                    self.loss_fn,
                    self.optimizer,
                    self.scaler,
                    self.autocast,
                    pixels.to(self.device),
                    tokens.to(self.device),
                )
            )
        self.batch += 1
        self.dirty = True
        self.consistent = True

    def finish_epoch(self) -> None:
        """Evaluate, save the epoch's model folder, publish it as `out`, then move to the next epoch."""
        number = self.epoch + 1
        if not self.losses:
            raise RetrieverError(_no_steps_message(self.train_path, number, self.tried, self.failed))
        report = EpochReport(
            number,
            len(self.losses),
            sum(self.losses) / len(self.losses),
            round(time.perf_counter() - self.epoch_start, 1),
        )
        if self.val_pairs is not None:
            evaluate(self.loaded, self.loss_fn, self.val_pairs, self.options, self.coca, self.autocast, report)
        info = {
            "epochs": self.options.epochs,
            "data": self.data_id,
            "model": {"name": self.model["name"], "pretrained": self.model["pretrained"]},
            "report": asdict(report),
        }
        folder = save_epoch_dir(self.net, self.config, self.out / "checkpoints" / f"epoch_{number}", info)
        publish_model_dir(folder, self.out)
        self.consistent = False  # until the position below is whole again
        self.history, self.epoch, self.batch, self.losses = [*self.history, report], number, 0, []
        self.consistent = True
        self.save_state()
        write_json(self.out / "finetune.json", self.result().as_dict())
        self.emit("epoch", asdict(report))

    def save_state(self) -> None:
        """Save what `resume` needs: tensors as safetensors, the rest as JSON."""
        tensors, groups = training_tensors(self.net, self.optimizer)
        meta = {
            "model": self.model,
            "options": asdict(self.options),
            "data": self.data_id,
            "epoch": self.epoch,
            "batch": self.batch,
            "losses": self.losses,
            "history": [asdict(e) for e in self.history],
            "unreadable": self.unreadable,
            "before": asdict(self.before) if self.before else None,
            "seconds": self._seconds(),
            "optimizer_groups": groups,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        save_state(self.out / "checkpoints", tensors, meta)
        self.dirty, self.last_save = False, time.perf_counter()

    def result(self) -> FinetuneResult:
        """The run so far, as reported to the caller and written to `finetune.json`."""
        name = str(self.loaded.spec) + (" from scratch" if self.model["from_scratch"] else "")
        return FinetuneResult(
            self.out,
            name,
            self.history,
            self.pairs.report,
            self.val_pairs.report if self.val_pairs else None,
            self.unreadable,
            self.resumed_at,
            self._seconds(),
            self.before,
        )

    def _seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def _workers(self) -> int:
        import os

        if self.options.workers is not None:
            return self.options.workers
        return min(4, max(0, (os.cpu_count() or 1) - 1))


def _no_steps_message(train: Path, epoch: int, tried: int, failed: list[str]) -> str:
    first = f"; the first: {failed[0]}" if failed else ""
    what = (
        f"all {tried} images were unreadable"
        if tried == len(failed)
        else f"{len(failed)} of {tried} images were unreadable"
    )
    return f"{train}: no trainable pairs in epoch {epoch}: {what}{first}; fix or remove those images"


def _check_resumable(state: dict, options: TrainOptions, data_id: dict) -> None:
    saved = state["options"]
    changed = [
        f"{name} {saved.get(name)} -> {getattr(options, name)}"
        for name in _FIXED_ON_RESUME
        if saved.get(name) != getattr(options, name)
    ]
    if changed:
        raise RetrieverError(
            f"settings changed since the run started ({'; '.join(changed)}); "
            "resume with the same settings (only --epochs may change)"
        )
    then = state["data"]
    differences = [
        f"{what} {then[key]} then, {data_id[key]} now"
        for key, what in (("path", "file"), ("pairs", "pairs"))
        if then[key] != data_id[key]
    ]
    if not differences and then["sha256"] != data_id["sha256"]:
        differences.append(
            f"same file and row count, but its content changed (sha256 {then['sha256'][:12]} then, "
            f"{data_id['sha256'][:12]} now)"
        )
    if differences:
        raise RetrieverError(
            f"the training data changed since the run started ({'; '.join(differences)}); "
            "resume with the same pairs file, or start again with --overwrite"
        )
    if options.epochs < state["epoch"]:
        raise ModelError(f"the run already finished {state['epoch']} epochs; --epochs must be at least that")
