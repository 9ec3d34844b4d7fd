"""clip-interrogator-style prompts: interrogate, interrogate-tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from retriever.cli.common import (
    DeviceOpt,
    ImageBatches,
    JsonOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    app,
    emit_json,
    friendly_errors,
    stderr,
)
from retriever.errors import RetrieverError

BuiltinOpt = Annotated[
    str,
    typer.Option(
        help="clip-interrogator tables, comma-separated (artists, flavors, mediums, movements, trendings, negative), all or none."
    ),
]
CacheDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        help="Where tables are cached (default: $RETRIEVER_CACHE, else $XDG_CACHE_HOME/retriever or ~/.cache/retriever)."
    ),
]


@app.command()
@friendly_errors
def interrogate(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.", show_default=False)],
    mode: Annotated[
        str,
        typer.Option(
            help="best (grow the prompt while it gets more similar), fast (top terms), classic (medium by artist, trending, movement, flavors) or negative (terms least like the image)."
        ),
    ] = "best",
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    caption_model: Annotated[
        Optional[str],
        typer.Option(
            help="CoCa model that writes the base caption: toyworld-coca, or NAME:TAG (default: coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k)."
        ),
    ] = None,
    index: Annotated[
        Optional[Path],
        typer.Option("--index", "-i", help="Base caption: the nearest text of this index, instead of a generated one."),
    ] = None,
    caption: Annotated[
        Optional[str], typer.Option(help="Base caption for every image, instead of a generated one.")
    ] = None,
    no_caption: Annotated[
        bool, typer.Option("--no-caption", help="No base caption: the prompt is made of terms only.")
    ] = False,
    builtin: BuiltinOpt = "all",
    table: Annotated[
        Optional[list[str]],
        typer.Option(
            "--table",
            help="Your own table NAME=PATH: an index built by build-index with the same --model, or a .txt list (one label a line, embedded once); repeatable; a built-in name replaces that table.",
        ),
    ] = None,
    max_flavors: Annotated[
        Optional[int], typer.Option(min=0, help="Most terms (default: 32; classic: 3 flavors).")
    ] = None,
    min_flavors: Annotated[int, typer.Option(min=0, help="best: terms added before the chain may stop.")] = 8,
    intermediate_count: Annotated[
        int, typer.Option(min=1, help="best/negative: chain from this many best (worst) terms.")
    ] = 2048,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A Stable Diffusion style prompt for each image: a base caption plus terms chosen by CLIP, as clip-interrogator.

    Prints the prompt, or IMAGE<TAB>PROMPT lines for several images. Missing tables are embedded once per model, on first use.

    Example: retriever interrogate cat.jpg --mode fast --model toyworld --caption-model toyworld-coca
    """
    from retriever.prompts.interrogate import MODES, Interrogator

    if mode not in MODES:
        raise typer.BadParameter(f"choose from {', '.join(MODES)}", param_hint="--mode")
    builtin_names = _builtin_tables(builtin)
    if sum([caption_model is not None, index is not None, caption is not None, no_caption]) > 1:
        raise typer.BadParameter(
            "choose one base caption: --caption-model, --index, --caption or --no-caption", param_hint="--caption-model"
        )
    user_tables: dict[str, str] = {}
    for spec in table or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise typer.BadParameter(f"{spec!r}: use NAME=PATH", param_hint="--table")
        user_tables[name.strip()] = path.strip()
    if mode != "negative" and caption is None and index is None and not no_caption and caption_model is None:
        from retriever.generate.captioner import DEFAULT_GENERATOR, DEFAULT_GENERATOR_PRETRAINED

        caption_model = f"{DEFAULT_GENERATOR}:{DEFAULT_GENERATOR_PRETRAINED}"

    def note_embedding(name: str, count: int) -> None:
        if not quiet:
            stderr(f"embedding the {name} table ({count:,} labels) once for {model}; it is cached for next time")

    interrogator = Interrogator.open(
        model,
        pretrained,
        builtin=builtin_names,
        tables=user_tables,
        cache_dir=cache_dir,
        device=device,
        precision=precision,
        caption_model=caption_model if mode != "negative" else None,
        caption_index=index if mode != "negative" else None,
        flavor_intermediate_count=intermediate_count,
        show_progress_bar=False if quiet else None,
        on_embed=note_embedding,
    )
    batches = ImageBatches(images)
    for loaded_images in batches:
        results = interrogator.interrogate_many(
            [im for _, im in loaded_images],
            mode=mode,
            caption="" if no_caption else caption,
            min_flavors=min_flavors,
            max_flavors=max_flavors,
            on_progress=None if quiet else ChainProgress(mode),
        )
        for (label, _), result in zip(loaded_images, results):
            result.image = label
            if as_json:
                emit_json(result.to_dict())
            else:
                print(result.prompt if len(batches.paths) == 1 else f"{label}\t{result.prompt}", flush=True)
    if batches.failed:
        raise typer.Exit(1)


class ChainProgress:
    """A progress line on stderr for best and negative mode's chain once it has run a second:
    rewritten in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, mode: str):
        import sys
        import time

        self.mode, self.tty, self.clock = mode, sys.stderr.isatty(), time.perf_counter
        self.start = self.last = self.clock()
        self.shown = False

    def __call__(self, step: int, most: int, similarity: float) -> None:
        import sys

        now = self.clock()
        if now - self.start < 1.0 or (not self.tty and now - self.last < 10.0):
            return
        line = f"{self.mode}: step {step} of at most {most}, similarity {similarity:.4f}"
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            sys.stderr.flush()
        else:
            stderr(line)
        self.last, self.shown = now, True

    def __del__(self) -> None:
        import sys

        if self.shown and self.tty:
            sys.stderr.write("\n")


@app.command("interrogate-tables")
@friendly_errors
def interrogate_tables(
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    builtin: BuiltinOpt = "all",
    cache_dir: CacheDirOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 256,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed clip-interrogator's label tables for a model into the cache, once (interrogate does it on first use).

    Needs clip-interrogator's word lists: pip install --no-deps clip-interrogator==0.6.0

    Example: retriever interrogate-tables --model toyworld --builtin mediums,movements
    """
    from retriever.models.loading import load_model
    from retriever.prompts.label_tables import ensure_builtin_tables

    names = _builtin_tables(builtin)
    loaded = load_model(model, pretrained, device=device, precision=precision)
    for name in names:
        status = ensure_builtin_tables(
            loaded, [name], cache_dir, batch_size=batch_size, show_progress_bar=False if quiet else None
        )[0]
        if as_json:
            emit_json(status.as_dict())
        elif not quiet:
            done = f"embedded in {status.seconds:.1f}s" if status.built else "cached"
            stderr(f"{name}: {status.count:,} labels, {done} -> {status.path}")


def _builtin_tables(builtin: str) -> tuple[str, ...]:
    from retriever.prompts.label_tables import parse_builtin

    try:
        return parse_builtin(builtin)
    except RetrieverError as e:
        raise typer.BadParameter(str(e), param_hint="--builtin") from None
