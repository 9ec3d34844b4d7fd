"""Shared pieces of the command line: the app, option types, error handling and output.

Results go to stdout (a table, or one JSON object per line with --json); progress, warnings and
errors go to stderr. Library errors exit 1 with one line; usage errors exit 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from retriever.errors import RetrieverError

app = typer.Typer(
    help="Caption ideas for images: CLIP retrieval over your own text corpus.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_INDEX_ROOT = Path("indexes")
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="toyworld or toyworld-zh (bundled, offline), an open_clip name like ViT-B-32 or xlm-roberta-base-ViT-B-32, a Chinese-CLIP model like cn-clip:ViT-B-16, hf-hub:ORG/NAME or local-dir:PATH.",
    ),
]
PretrainedOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Pretrained tag (e.g. laion2b_s34b_b79k) or a checkpoint file, for an open_clip name; for cn-clip:ARCH a checkpoint in cn_clip's format (default: the released weights)."
    ),
]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cuda, mps or cpu; default: the best available.")]
PrecisionOpt = Annotated[str, typer.Option(help="fp32, or fp16/bf16 (for GPUs).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout.")]


def friendly_errors(command):
    """Library errors become `error: ...` on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RetrieverError as e:
            stderr(f"error: {e}")
            raise typer.Exit(1) from None

    return wrapper


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False, default=str), flush=True)


GeneratorOpt = Annotated[
    Optional[str],
    typer.Option(
        help="What writes captions: a CoCa model (toyworld-coca, or NAME:TAG; default for generate/hybrid: coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k), or a style decoder trained on your text: style:PATH (options: style:PATH?projection=noise&memory=index&fetch_k=256)."
    ),
]
DecodingOpt = Annotated[str, typer.Option(help="greedy, beam, top_k or top_p.")]
BeamsOpt = Annotated[int, typer.Option(min=2, help="Beams for beam search.")]
BeamGroupsOpt = Annotated[int, typer.Option(min=1, help="Beam groups (beams must divide into them).")]
TopKOpt = Annotated[int, typer.Option(min=1, help="Sample among the K likeliest tokens (top_k).")]
TopPOpt = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Sample from the smallest set with this probability (top_p).")
]
TemperatureOpt = Annotated[float, typer.Option(min=0.01, help="Sampling temperature.")]
MinLenOpt = Annotated[
    int, typer.Option(min=1, help="No end of caption before this many tokens (start token included).")
]
MaxLenOpt = Annotated[int, typer.Option(min=2, help="At most this many tokens (capped by the model's context).")]
RepetitionOpt = Annotated[float, typer.Option(min=0.01, help="Repetition penalty (1 = none).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed for sampling.")]
NGenerateOpt = Annotated[int, typer.Option(min=1, help="Captions to generate per image.")]


def find_index(index: Path | None) -> Path:
    if index is not None:
        return index
    candidates = (
        sorted(p for p in DEFAULT_INDEX_ROOT.glob("*") if (p / "manifest.json").is_file())
        if DEFAULT_INDEX_ROOT.is_dir()
        else []
    )
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(str(c) for c in candidates) or "none"
    raise RetrieverError(f"name the index with --index (indexes found under {DEFAULT_INDEX_ROOT}/: {found})")


def print_table(rows: list[tuple[str, int, float | None, str, str]], with_source: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("query", "rank", "score", *(["source"] if with_source else []), "text")
    for label, rank, score, source, text in rows:
        table.add_row(
            label if rank == 1 else "",
            str(rank),
            "-" if score is None else f"{score:.3f}",
            *([source] if with_source else []),
            text,
        )
    # Piped output keeps each hit on one line, however long, so grep and cut work on it.
    Console(width=None if sys.stdout.isatty() else 100_000).print(table)


class ImageBatches:
    """Images named by files, folders or globs, loaded `size` at a time as (label, image) pairs,
    decoded in `workers` processes (None: chosen by count; see image_stream.py).

    An unreadable image prints `error: FILE: reason` and is left out (`failed` is then True), so
    one bad file never stops the others. `preprocess`: the model's, whose resize and crop then run
    in the workers too.
    """

    def __init__(self, images: list[str], size: int = 64, workers: int | None = None, preprocess: Any = None):
        from retriever.models.images import expand_image_paths

        self.paths = expand_image_paths(images)
        self.size = size
        self.workers = workers
        self.preprocess = preprocess
        self.failed = False

    def __iter__(self):
        from retriever.errors import ImageError
        from retriever.models.image_stream import iter_image_batches, pil_transforms

        transform, side = pil_transforms(self.preprocess) if self.preprocess is not None else (None, None)
        for loaded in iter_image_batches(self.paths, self.size, self.workers, transform, side):
            batch = []
            for label, image in loaded:
                if isinstance(image, ImageError):
                    self.failed = True
                    stderr(f"error: {image}")
                else:
                    batch.append((label, image))
            if batch:
                yield batch


class CappedWarnings:
    """`warn(kind, text)` prints the first `limit` warnings of each kind on stderr; `finish()` says
    how many more were left out (so a file with 100,000 bad rows does not flood the terminal)."""

    def __init__(self, quiet: bool = False, limit: int = 10):
        self.quiet, self.limit = quiet, limit
        self.counts: dict[str, int] = {}

    def warn(self, kind: str, text: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if not self.quiet and self.counts[kind] <= self.limit:
            stderr(f"warning: {text}")

    def finish(self) -> None:
        for kind, count in self.counts.items():
            if count > self.limit and not self.quiet:
                stderr(f"warning: ... and {count - self.limit} more {kind}")
