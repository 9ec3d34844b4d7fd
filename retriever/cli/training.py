"""Commands for your own data: finetune, and corpus converters (corpus coco)."""

from __future__ import annotations

import sys
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


@app.command()
@friendly_errors
def finetune(
    train: Annotated[
        Path, typer.Argument(help="Pairs file (.tsv, .csv, .parquet, .jsonl) with image paths and captions.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the fine-tuned model (load it with --model local-dir:OUT).")
    ],
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    val: Annotated[
        Optional[Path],
        typer.Option(help="Held-out pairs: validation loss, caption R@1 and (CoCa) exact match after each epoch."),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training pairs.")] = 3,
    batch_size: Annotated[int, typer.Option(min=2, help="Pairs per step.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (cosine schedule after warmup).")] = 1e-5,
    warmup: Annotated[
        Optional[int], typer.Option(min=0, help="Warmup steps (default: 5% of all steps, at most 1000).")
    ] = None,
    wd: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay.")] = 0.1,
    caption_loss_weight: Annotated[float, typer.Option(min=0.0, help="CoCa: weight of the captioning loss.")] = 1.0,
    contrastive_loss_weight: Annotated[
        float, typer.Option(min=0.0, help="CoCa: weight of the contrastive loss (CLIP models always use it).")
    ] = 0.0,
    image_column: Annotated[
        str, typer.Option(help="Column of image paths (absolute, or relative to the pairs file).")
    ] = "filepath",
    caption_column: Annotated[str, typer.Option(help="Column of captions.")] = "title",
    resume: Annotated[
        bool, typer.Option(help="Continue the run saved in --out (same command; only --epochs may change).")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace a previous run in --out (only the files a run writes; anything else there is an error)."
        ),
    ] = False,
    from_scratch: Annotated[
        bool, typer.Option(help="Start from random weights: the architecture of --model only.")
    ] = False,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Image-loading processes (default: up to 4).")] = None,
    train_precision: Annotated[
        str, typer.Option("--precision", help="auto (amp on CUDA, else fp32), fp32, amp or bf16.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for data order and augmentation.")] = 0,
    checkpoint_minutes: Annotated[
        float, typer.Option(min=0.0, help="Save the resumable state this often (also each epoch and on Ctrl-C).")
    ] = 10.0,
    eval_images: Annotated[
        int, typer.Option(min=1, help="Held-out images scored for R@1 and exact match after each epoch.")
    ] = 500,
    device: DeviceOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-epoch lines.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a CLIP or CoCa model on your own (image, caption) pairs.

    Example: retriever finetune train.tsv --val val.tsv --model toyworld-coca --out models/mine
    """
    import time as _time

    from retriever.train.finetune import TrainOptions
    from retriever.train.finetune import finetune as run_finetune

    options = TrainOptions(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        wd=wd,
        caption_loss_weight=caption_loss_weight,
        contrastive_loss_weight=contrastive_loss_weight,
        precision=train_precision,
        workers=workers,
        seed=seed,
        checkpoint_minutes=checkpoint_minutes,
        eval_images=eval_images,
    )
    warnings = CappedWarnings(quiet)
    show_bar = False if quiet else None
    last_line = [_time.monotonic()]

    def on_event(kind: str, details: dict) -> None:
        if quiet:
            return
        if kind == "bad_row":
            warnings.warn("bad rows", f"skipped {details['row']}")
        elif kind == "unreadable_image":
            warnings.warn("unreadable images", f"skipped {details['error']}")
        elif kind == "epoch":
            stderr(_epoch_line(details))
        elif kind == "step" and not sys.stderr.isatty() and _time.monotonic() - last_line[0] > 30:
            # No progress bar when stderr is a log file: a line every 30 s instead.
            last_line[0] = _time.monotonic()
            loss = "-" if details["loss"] is None else f"{details['loss']:.4f}"
            stderr(
                f"epoch {details['epoch']} step {details['step']}/{details['steps']} loss {loss} lr {details['lr']:.2e}"
            )

    try:
        result = run_finetune(
            train,
            out,
            model,
            pretrained,
            val=val,
            options=options,
            resume=resume,
            overwrite=overwrite,
            from_scratch=from_scratch,
            device=device,
            image_column=image_column,
            caption_column=caption_column,
            show_progress_bar=show_bar,
            on_event=on_event,
        )
    except KeyboardInterrupt:
        from retriever.train.checkpoints import has_state

        if has_state(out / "checkpoints"):
            stderr(f"interrupted: the state is saved; add --resume to the same command to continue ({out})")
        else:
            stderr("interrupted before the first step: nothing to resume; run the same command again to start over")
        raise typer.Exit(130) from None
    summary = result.as_dict()
    warnings.finish()
    if as_json:
        emit_json(summary)
    elif not quiet:
        stderr(
            f"fine-tuned {summary['model']} on {summary['train']['kept']} pairs in {summary['seconds']}s -> {out} "
            f"(use --model local-dir:{out}); skipped {summary['train']['bad_rows']} bad rows "
            f"({summary['train']['missing_images']} missing images), {summary['unreadable_images']} unreadable images"
        )


def _epoch_line(report: dict) -> str:
    if report["epoch"] == 0:
        parts = ["before training"]
    else:
        parts = [
            f"epoch {report['epoch']}: train loss {report['train_loss']:.4f} ({report['steps']} steps, {report['seconds']}s)"
        ]
    for key, label in (("val_loss", "val loss"), ("recall_at_1", "R@1"), ("exact_match", "exact match")):
        if report.get(key) is not None:
            parts.append(f"{label} {report[key]:.4f}")
    return ", ".join(parts)


corpus_app = typer.Typer(help="Turn public caption datasets into corpus files for build-index.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("coco")
@friendly_errors
def corpus_coco(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output .tsv (or .txt with --captions-only); with --karpathy, a directory that receives train.tsv, val.tsv and test.tsv.",
        ),
    ],
    annotations: Annotated[
        Optional[list[Path]],
        typer.Option(
            help="COCO captions file, e.g. captions_train2014.json; repeat for several. Optional with --karpathy: its captions then replace Karpathy's for the images it covers."
        ),
    ] = None,
    karpathy: Annotated[
        Optional[Path],
        typer.Option(help="Karpathy's dataset_coco.json: split into train/val/test, with restval going to train."),
    ] = None,
    images: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder with the images, found as DIR/NAME or DIR/SPLIT/NAME (SPLIT: train2014 etc., or Karpathy's filepath); rows hold paths relative to the output's folder. Optional with --captions-only."
        ),
    ] = None,
    captions_only: Annotated[
        bool,
        typer.Option(
            help="Write only the captions (a 'caption' column, or one per line for .txt), duplicates dropped: a text corpus for build-index."
        ),
    ] = False,
    keep_missing: Annotated[
        bool,
        typer.Option(help="Also write rows whose image is not in --images (by default they are skipped and counted)."),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")] = False,
) -> None:
    """Convert COCO captions (official annotations and/or Karpathy splits) to image/caption TSVs.

    Example: retriever corpus coco --annotations captions_train2014.json --images coco/train2014 --out train.tsv
    """
    from retriever.corpus.coco import convert_coco

    if not annotations and karpathy is None:
        raise typer.BadParameter("give --annotations, --karpathy, or both", param_hint="--annotations")
    if images is None and not captions_only:
        raise typer.BadParameter(
            "the images folder is needed for image paths (or use --captions-only)", param_hint="--images"
        )
    report = convert_coco(
        out,
        annotations=annotations or [],
        karpathy=karpathy,
        images=images,
        captions_only=captions_only,
        keep_missing=keep_missing,
        overwrite=overwrite,
    )
    if as_json:
        emit_json(report.as_dict())
        return
    for split in report.splits.values():
        extra = f", {split.duplicates} duplicates dropped" if captions_only else ""
        stderr(f"wrote {split.captions} captions of {split.images} images to {split.path}{extra}")
    totals = report.totals
    if totals["missing_images"]:
        fate = "written anyway" if keep_missing else f"their {totals['skipped_captions']} captions skipped"
        stderr(f"warning: {totals['missing_images']} images referenced by the annotations are not in {images} ({fate})")
    if not report.images_checked:
        stderr("note: image files were not checked (no --images)")
    dropped = {
        "empty captions dropped": totals["empty_captions"],
        "images without a caption": totals["uncaptioned_images"],
        "captions of images not in the annotations' image list": report.unmatched_captions,
        "captions taken from Karpathy's file (images not in --annotations)": report.karpathy_captions_used,
    }
    for what, count in dropped.items():
        if count:
            stderr(f"note: {count} {what}")
