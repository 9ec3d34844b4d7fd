"""Training a style decoder on text alone: `retriever style train` (DeCap / CapDec).

Each corpus line is embedded once with the CLIP text tower; the decoder (see
`retriever.generate.style_model`) learns to reconstruct the line from its embedding, with
CapDec's Gaussian noise on the embedding when the projection is `noise`. The loop behaves like
`finetune`'s: a progress bar with the loss, the same batches on every run (so a resumed epoch
skips exactly what was done), the state saved each epoch, every `checkpoint_minutes` and on
Ctrl-C, but as safetensors + JSON rather than a pickle, and a Ctrl-C is deferred to the end of
the current step so the state saved is always a consistent one.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retriever.errors import RetrieverError
from retriever.generate.style_model import (
    CONFIG_NAME,
    MEMORY_NAME,
    PAD,
    PROJECTIONS,
    WEIGHTS_NAME,
    StyleConfig,
    StyleFolder,
    build_decoder,
    is_style_folder,
    save_weights,
)
from retriever.train.checkpoints import (
    has_state,
    load_state,
    restore_tensors,
    save_state,
    training_tensors,
)
from retriever.train.loop import deferred_interrupt
from retriever.train.style_data import (
    clip_ids,
    compact,
    embed,
    evaluate,
    read_lines,
    validation_data,
    vocabulary,
)

STATE_DIR = "state"
# Must stay the same when a run is resumed (epochs may grow).
_FIXED_ON_RESUME = (
    "width",
    "layers",
    "heads",
    "prefix_length",
    "batch_size",
    "lr",
    "warmup",
    "wd",
    "projection",
    "noise_variance",
    "seed",
    "max_tokens",
)


@dataclass
class StyleOptions:
    """Hyperparameters. The defaults suit a corpus of about a million lines on one GPU (DeCap
    trains a 4-layer decoder from scratch); tiny corpora want a smaller width and more epochs."""

    width: int = 512
    layers: int = 4
    heads: int = 8
    prefix_length: int = 1
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-4
    warmup: int | None = None  # steps; None: 5% of all steps, at most 1000
    wd: float = 0.01
    projection: str = "memory"  # recorded; decides whether training adds noise
    noise_variance: float = 0.016  # CapDec's default
    memory_size: int = 200_000  # corpus text embeddings stored for the memory projection (fp16)
    memory_temperature: float = 0.01  # DeCap's τ
    max_tokens: int | None = None  # None: the CLIP tokenizer's context length
    seed: int = 0
    checkpoint_minutes: float = 10.0
    eval_lines: int = 500  # held-out lines decoded for exact match after each epoch

    def check(self) -> None:
        problems = []
        if min(self.width, self.layers, self.heads, self.prefix_length, self.epochs) < 1:
            problems.append("width, layers, heads, prefix length and epochs must be at least 1")
        elif self.width % self.heads:
            problems.append(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.batch_size < 1 or not self.lr > 0 or self.wd < 0:
            problems.append("batch size must be at least 1, lr positive, wd not negative")
        if self.projection not in PROJECTIONS:
            problems.append(f"projection must be one of {', '.join(PROJECTIONS)}")
        if self.noise_variance < 0 or self.memory_size < 0 or not self.memory_temperature > 0:
            problems.append("noise variance and memory size cannot be negative; memory temperature must be positive")
        if self.max_tokens is not None and self.max_tokens < 3:
            problems.append("max tokens must be at least 3 (start, one token, end)")
        if problems:
            raise RetrieverError("; ".join(problems))


@dataclass
class StyleEpoch:
    """One epoch's training loss and held-out reconstruction (epoch 0: before training)."""

    epoch: int
    steps: int
    train_loss: float | None
    seconds: float
    tokens_per_second: float | None = None
    val_loss: float | None = None
    exact_match: float | None = None


@dataclass
class StyleResult:
    out: Path
    model: str
    epochs: list[StyleEpoch]
    train: dict
    val: dict | None
    vocab_size: int
    parameters: int
    memory_rows: int
    resumed_at: tuple[int, int] | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "out": str(self.out),
            "model": self.model,
            "epochs": [asdict(e) for e in self.epochs],
            "train": self.train,
            "val": self.val,
            "vocab_size": self.vocab_size,
            "parameters": self.parameters,
            "memory_rows": self.memory_rows,
            "resumed_at": self.resumed_at,
            "seconds": round(self.seconds, 1),
        }


def train_style(
    corpus: str | Path,
    out: str | Path,
    model: str,
    pretrained: str | None = None,
    *,
    val: str | Path | None = None,
    options: StyleOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    column: str | None = None,
    show_progress_bar: bool | None = None,
    on_event: Callable[[str, dict], None] | None = None,
) -> StyleResult:
    """Train a style decoder on the lines of `corpus`; the result is a folder for `style:OUT`.

    Args:
        corpus: any corpus file `build-index` reads (.txt, .tsv, .csv, .parquet, .jsonl).
        out: output folder: `style.json`, `decoder.safetensors`, `memory.safetensors`, `state/`.
        model, pretrained: the CLIP model (as for `load_model`); captions later need the same one.
        val: held-out lines: loss and greedy reconstruction exact match after each epoch.
        options: hyperparameters.
        resume: continue the run saved in `out` (same data and settings; epochs may grow).
        overwrite: replace a previous style decoder run in `out` (never anything else).
        device: `cuda`, `mps`, `cpu`, or None for the best available.
        column: the text column (default: first of caption, title, text, prompt).
        show_progress_bar: None shows one on stderr when it is a terminal.
        on_event: called with ("bad_row" | "step" | "epoch" | "checkpoint", details).

    Raises:
        CorpusError: unusable corpus. ModelError: CLIP model cannot be loaded.
        RetrieverError: bad options, or `out` holds something resume/overwrite do not allow.
    """
    import numpy as np
    import torch

    from retriever.models.loading import load_model, pick_device
    from retriever.progress import progress

    started = time.perf_counter()
    options = options or StyleOptions()
    options.check()
    device = pick_device(device)
    out = Path(out)
    emit = on_event or (lambda kind, details: None)
    meta, saved_tensors = _prepare_out(out, resume, overwrite)
    lines, report = read_lines(corpus, column, emit)
    val_lines, val_report = read_lines(val, column, emit) if val else (None, None)
    data_id = {"path": str(Path(corpus).resolve()), "lines": len(lines)}
    if meta is not None:
        _check_resumable(meta, options, data_id)
        model, pretrained = meta["clip"]["name"], meta["clip"]["pretrained"]
    clip = load_model(model, pretrained, device=device)
    max_tokens = options.max_tokens or clip.context_length
    ids = clip_ids(clip, lines, max_tokens)
    vocab = meta["vocab"] if meta is not None else vocabulary(clip, ids)
    config = StyleConfig(
        clip.embed_dim, vocab, options.width, options.layers, options.heads, options.prefix_length, max_tokens
    )
    tokens = compact(ids, vocab)
    embeddings = embed(clip, lines, show_progress_bar)
    val_data = validation_data(clip, val_lines, vocab, max_tokens, options, show_progress_bar) if val_lines else None
    torch.manual_seed(options.seed)
    decoder = build_decoder(config).to(device)
    optimizer = _optimizer(decoder, options)
    steps_per_epoch = math.ceil(len(lines) / options.batch_size)
    total_steps = steps_per_epoch * options.epochs
    warmup = options.warmup if options.warmup is not None else min(1000, total_steps // 20)
    clip_info = {**clip.describe(), "name": clip.spec.name, "pretrained": clip.spec.pretrained}
    folder = StyleFolder(config, clip_info, options.projection, options.noise_variance, options.memory_temperature)

    history: list[StyleEpoch] = []
    epoch, batch_in_epoch, losses, elapsed, trained_tokens, train_seconds = 0, 0, [], 0.0, 0, 0.0
    if meta is not None and saved_tensors is not None:
        restore_tensors(
            out / STATE_DIR, meta, saved_tensors, decoder, optimizer, None, f"a style decoder of {clip.spec}"
        )
        epoch, batch_in_epoch, losses = meta["epoch"], meta["batch"], list(meta["losses"])
        history = [StyleEpoch(**e) for e in meta["history"]]
        elapsed, trained_tokens, train_seconds = meta["seconds"], meta["trained_tokens"], meta["train_seconds"]
    resumed_at = (epoch, batch_in_epoch) if meta is not None else None
    memory_rows = _write_memory(out, embeddings, options) if meta is None else meta["memory_rows"]
    if val_data is not None and meta is None:
        before = StyleEpoch(0, 0, None, 0.0)
        evaluate(decoder, val_data, options, before)
        history.append(before)
        emit("epoch", asdict(before))

    def snapshot() -> dict:
        return {
            "clip": clip_info,
            "options": asdict(options),
            "data": data_id,
            "vocab": vocab,
            "epoch": epoch,
            "batch": batch_in_epoch,
            "losses": losses,
            "history": [asdict(e) for e in history],
            "memory_rows": memory_rows,
            "trained_tokens": trained_tokens,
            "train_seconds": train_seconds,
            "seconds": elapsed + time.perf_counter() - started,
        }

    def result() -> StyleResult:
        return StyleResult(
            out,
            str(clip.spec),
            history,
            report.as_dict(),
            val_report.as_dict() if val_report else None,
            len(vocab),
            sum(p.numel() for p in decoder.parameters()),
            memory_rows,
            resumed_at,
            elapsed + time.perf_counter() - started,
            {"tokens_per_second": trained_tokens / train_seconds if train_seconds else None},
        )

    def save() -> None:
        tensors, groups = training_tensors(decoder, optimizer)
        save_state(out / STATE_DIR, tensors, {**snapshot(), "optimizer_groups": groups, "scaler": None})

    std = math.sqrt(options.noise_variance) if options.projection == "noise" else 0.0
    last_save = time.perf_counter()
    with deferred_interrupt() as interrupted:
        while epoch < options.epochs:
            decoder.train()
            order = np.random.default_rng([options.seed, epoch]).permutation(len(lines))
            batches = [order[i : i + options.batch_size] for i in range(0, len(lines), options.batch_size)][
                batch_in_epoch:
            ]
            epoch_start, epoch_tokens = time.perf_counter(), 0
            with progress(len(batches), f"epoch {epoch + 1}/{options.epochs}", "steps", show_progress_bar) as advance:
                for batch in batches:
                    _set_lr(optimizer, options.lr, warmup, total_steps, epoch * steps_per_epoch + batch_in_epoch)
                    step_start = time.perf_counter()
                    loss, n = _train_step(decoder, optimizer, embeddings[batch], tokens[batch], std, device)
                    train_seconds += time.perf_counter() - step_start
                    trained_tokens, epoch_tokens = trained_tokens + n, epoch_tokens + n
                    losses.append(loss)
                    batch_in_epoch += 1
                    advance(1, f"loss {loss:.4f}")
                    emit(
                        "step",
                        {
                            "epoch": epoch + 1,
                            "step": batch_in_epoch,
                            "steps": steps_per_epoch,
                            "loss": loss,
                            "lr": optimizer.param_groups[0]["lr"],
                        },
                    )
                    if interrupted():
                        save()
                        raise KeyboardInterrupt
                    if time.perf_counter() - last_save > options.checkpoint_minutes * 60:
                        save()
                        last_save = time.perf_counter()
                        emit("checkpoint", {"path": str(out / STATE_DIR), "epoch": epoch + 1, "step": batch_in_epoch})
            seconds = time.perf_counter() - epoch_start
            report_epoch = StyleEpoch(
                epoch + 1,
                len(losses),
                sum(losses) / max(1, len(losses)),
                round(seconds, 1),
                round(epoch_tokens / seconds, 1) if seconds else None,
            )
            if val_data is not None:
                evaluate(decoder, val_data, options, report_epoch)
            history, epoch, batch_in_epoch, losses = [*history, report_epoch], epoch + 1, 0, []
            folder.training = {"corpus": data_id, "options": asdict(options), "epochs": [asdict(e) for e in history]}
            _publish(out, decoder, folder)
            save()
            last_save = time.perf_counter()
            emit("epoch", asdict(report_epoch))
            if interrupted():
                raise KeyboardInterrupt
    return result()


def _optimizer(decoder: Any, options: StyleOptions) -> Any:
    """AdamW, no weight decay on gains, biases and embeddings (as finetune's recipe)."""
    import torch

    named = list(decoder.named_parameters())
    no_decay = [p for n, p in named if p.ndim < 2 or "embedding" in n]
    decay = [p for n, p in named if not (p.ndim < 2 or "embedding" in n)]
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": options.wd}],
        lr=options.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def _set_lr(optimizer: Any, peak: float, warmup: int, total: int, step: int) -> None:
    """Linear warmup, then cosine decay to zero (open_clip_train's `cosine_lr`)."""
    if step < warmup:
        lr = peak * (step + 1) / warmup
    else:
        lr = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * peak
    for group in optimizer.param_groups:
        group["lr"] = lr


def _train_step(
    decoder: Any, optimizer: Any, embeddings: Any, tokens: Any, noise_std: float, device: str
) -> tuple[float, int]:
    """One step of teacher-forced reconstruction; returns (loss, target tokens)."""
    import torch
    from torch.nn import functional as F

    tokens = tokens[:, : int((tokens != PAD).sum(dim=1).max())].to(device)
    embeddings = embeddings.to(device)
    if noise_std:
        embeddings = embeddings + torch.randn_like(embeddings) * noise_std  # CapDec: no renormalising
    logits = decoder(embeddings, tokens[:, :-1])
    targets = tokens[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach()), int((targets != PAD).sum())


def _write_memory(out: Path, embeddings: Any, options: StyleOptions) -> int:
    """Store up to `memory_size` corpus embeddings (a seeded sample when there are more), fp16."""
    import numpy as np
    import torch

    if options.memory_size == 0:
        return 0
    rows = np.arange(len(embeddings))
    if len(rows) > options.memory_size:
        rows = np.sort(np.random.default_rng(options.seed).choice(len(rows), options.memory_size, replace=False))
    save_weights({"memory": embeddings[torch.from_numpy(rows)].half()}, out / MEMORY_NAME)
    return len(rows)


def _publish(out: Path, decoder: Any, folder: StyleFolder) -> None:
    """Weights first, then the config: a folder with a config is complete."""
    import json

    from retriever.atomic import write_text_atomic

    save_weights(decoder.state_dict(), out / WEIGHTS_NAME)
    write_text_atomic(out / CONFIG_NAME, json.dumps(folder.to_json(), indent=1) + "\n")


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> tuple[dict | None, dict | None]:
    """The saved state (JSON part, tensors) to resume from, or Nones for a fresh run (after clearing
    `out` if allowed)."""
    if resume and overwrite:
        raise RetrieverError("--resume and --overwrite contradict each other")
    if resume:
        if not has_state(out / STATE_DIR):
            raise RetrieverError(f"{out}: nothing to resume (no {STATE_DIR}/state.json); start a run without --resume")
        return load_state(out / STATE_DIR)
    if out.exists() and any(out.iterdir()):
        ours = is_style_folder(out) or has_state(out / STATE_DIR)
        if not overwrite:
            hint = "add --resume to continue it, or --overwrite to start over" if ours else "choose another --out"
            raise RetrieverError(f"{out} is not empty ({hint})")
        if not ours:
            raise RetrieverError(f"{out} holds files that are not a style decoder; --overwrite only replaces those")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None, None


def _check_resumable(meta: dict, options: StyleOptions, data_id: dict) -> None:
    saved = meta["options"]
    changed = [
        f"{name} {saved[name]} -> {getattr(options, name)}"
        for name in _FIXED_ON_RESUME
        if saved.get(name) != getattr(options, name)
    ]
    if changed:
        raise RetrieverError(
            f"settings changed since the run started ({'; '.join(changed)}); "
            "resume with the same settings (only --epochs may change)"
        )
    if meta["data"] != data_id:
        raise RetrieverError(
            f"the corpus changed since the run started ({meta['data']['path']}, "
            f"{meta['data']['lines']} lines then; {data_id['path']}, {data_id['lines']} lines now)"
        )
    if options.epochs < meta["epoch"]:
        raise RetrieverError(f"the run already finished {meta['epoch']} epochs; --epochs must be at least that")
