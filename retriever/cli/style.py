"""`retriever style`: train a text-only decoder that writes captions in a corpus's voice."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from retriever.cli.common import (
    CappedWarnings,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    PretrainedOpt,
    app,
    emit_json,
    friendly_errors,
    stderr,
)

style_app = typer.Typer(
    help="Captions in your corpus's voice: a decoder trained on text alone (DeCap / CapDec).", no_args_is_help=True
)
app.add_typer(style_app, name="style")


@style_app.command("train")
@friendly_errors
def train(
    corpus: Annotated[
        Path,
        typer.Argument(help="Corpus file in the voice you want: .txt, .tsv, .csv, .parquet or .jsonl (no images)."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the decoder (use it with --generator style:OUT).")
    ],
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    val: Annotated[
        Optional[Path], typer.Option(help="Held-out lines: loss and reconstruction exact match after each epoch.")
    ] = None,
    column: Annotated[
        Optional[str], typer.Option(help="Text column (default: first of caption, title, text, prompt).")
    ] = None,
    width: Annotated[int, typer.Option(min=8, help="Decoder width.")] = 512,
    layers: Annotated[int, typer.Option(min=1, help="Decoder layers.")] = 4,
    heads: Annotated[int, typer.Option(min=1, help="Attention heads (must divide the width).")] = 8,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the corpus.")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Lines per step.")] = 256,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (cosine schedule after warmup).")] = 2e-4,
    warmup: Annotated[
        Optional[int], typer.Option(min=0, help="Warmup steps (default: 5% of all steps, at most 1000).")
    ] = None,
    projection: Annotated[
        str,
        typer.Option(
            help="Bridging images to text: memory (DeCap: project onto the corpus's text embeddings), noise (CapDec: train with noise) or none. Recorded; overridable at caption time."
        ),
    ] = "memory",
    noise_variance: Annotated[
        float, typer.Option(min=0.0, help="CapDec's noise variance on the normalised embedding (--projection noise).")
    ] = 0.016,
    memory_size: Annotated[
        int,
        typer.Option(
            min=0,
            help="Corpus text embeddings stored for the memory projection (fp16; a sample if the corpus is larger).",
        ),
    ] = 200_000,
    memory_temperature: Annotated[
        float, typer.Option(min=1e-6, help="Softmax temperature of the memory projection (DeCap: 0.01).")
    ] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, data order and noise.")] = 0,
    checkpoint_minutes: Annotated[
        float, typer.Option(min=0.0, help="Save the resumable state this often (also each epoch and on Ctrl-C).")
    ] = 10.0,
    eval_lines: Annotated[
        int, typer.Option(min=1, help="Held-out lines decoded for exact match after each epoch.")
    ] = 500,
    resume: Annotated[
        bool, typer.Option(help="Continue the run saved in --out (same command; only --epochs may change).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a previous style decoder in --out (never anything else).")
    ] = False,
    device: DeviceOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-epoch lines.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a decoder on text alone that writes new lines in CORPUS's voice from CLIP embeddings.

    Example: retriever style train haiku.txt --model ViT-B-32 --out styles/haiku
    then:    retriever caption cat.jpg --generator style:styles/haiku
    """
    from retriever.train.style import StyleOptions, train_style

    options = StyleOptions(
        width=width,
        layers=layers,
        heads=heads,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        projection=projection,
        noise_variance=noise_variance,
        memory_size=memory_size,
        memory_temperature=memory_temperature,
        seed=seed,
        checkpoint_minutes=checkpoint_minutes,
        eval_lines=eval_lines,
    )
    warnings = CappedWarnings(quiet)
    last_line = [time.monotonic()]

    def on_event(kind: str, details: dict) -> None:
        if quiet:
            return
        if kind == "bad_row":
            warnings.warn("bad rows", f"skipped {details['row']}")
        elif kind == "epoch":
            stderr(_epoch_line(details))
        elif kind == "step" and not sys.stderr.isatty() and time.monotonic() - last_line[0] > 30:
            last_line[0] = time.monotonic()  # no progress bar in a log file: a line every 30 s
            stderr(f"epoch {details['epoch']} step {details['step']}/{details['steps']} loss {details['loss']:.4f}")

    try:
        result = train_style(
            corpus,
            out,
            model,
            pretrained,
            val=val,
            options=options,
            resume=resume,
            overwrite=overwrite,
            device=device,
            column=column,
            show_progress_bar=False if quiet else None,
            on_event=on_event,
        )
    except KeyboardInterrupt:
        stderr(f"interrupted: the state is saved; add --resume to the same command to continue ({out})")
        raise typer.Exit(130) from None
    warnings.finish()
    summary = result.as_dict()
    if as_json:
        emit_json(summary)
    elif not quiet:
        rate = result.extra.get("tokens_per_second")
        stderr(
            f"trained a style decoder ({summary['parameters']:,} parameters, {summary['vocab_size']} tokens) on "
            f"{summary['train']['kept']} lines with {summary['model']} in {summary['seconds']}s"
            f"{f' ({rate:,.0f} tokens/s)' if rate else ''} -> {out} (use --generator style:{out}); skipped "
            f"{summary['train']['duplicates']} duplicates, {summary['train']['empty']} empty, "
            f"{summary['train']['bad_rows']} bad rows"
        )


def _epoch_line(report: dict) -> str:
    if report["epoch"] == 0:
        parts = ["before training"]
    else:
        parts = [
            f"epoch {report['epoch']}: train loss {report['train_loss']:.4f} ({report['steps']} steps, "
            f"{report['seconds']}s, {report['tokens_per_second'] or 0:,.0f} tokens/s)"
        ]
    for key, label in (("val_loss", "val loss"), ("exact_match", "exact match")):
        if report.get(key) is not None:
            parts.append(f"{label} {report[key]:.4f}")
    return ", ".join(parts)
