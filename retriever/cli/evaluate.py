"""`retriever eval`: retrieval quality and result diversity on your own (image, caption) pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from retriever.cli.common import DeviceOpt, JsonOpt, app, emit_json, find_index, friendly_errors, stderr


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """`diversity=0,0.3,0.6` -> ("diversity", [0, 0.3, 0.6]); numbers become int/float, `none` None."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name.isidentifier() or not values.strip():
        raise typer.BadParameter("write it as NAME=V1,V2,... (e.g. diversity=0,0.3,0.6)", param_hint="--sweep")
    return name, [_value(v.strip()) for v in values.split(",") if v.strip()]


def _value(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@app.command("eval")
@friendly_errors
def eval_cmd(
    pairs: Annotated[
        Path, typer.Argument(help="Pairs file (filepath and title columns; .tsv, .csv, .parquet, .jsonl).")
    ],
    index: Annotated[
        Optional[Path], typer.Option("--index", "-i", help="Index directory (default: the only one under indexes/).")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="Hits per image for the result metrics.")] = 10,
    sweep: Annotated[
        Optional[str], typer.Option(help="One row per value of a query option, e.g. diversity=0,0.3,0.6.")
    ] = None,
    image_column: Annotated[str, typer.Option(help="Column of image paths.")] = "filepath",
    caption_column: Annotated[str, typer.Option(help="Column of captions.")] = "title",
    rank_depth: Annotated[
        int, typer.Option(min=1, help="How deep to look for the true caption (MRR, median rank).")
    ] = 1000,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recall@1/5/10, MRR and median rank of the true captions, text-to-image recall, and the
    diversity and relevance of the top-k results.

    Example: retriever eval val.tsv --index indexes/coco --sweep k=5,10,20
    """
    from retriever.corpus.pairs import read_pairs
    from retriever.search.api import Retriever
    from retriever.search.evaluate import evaluate

    swept = parse_sweep(sweep) if sweep else None
    data = read_pairs(pairs, image_column, caption_column)
    retriever = Retriever.open(find_index(index), device=device)
    result = evaluate(
        retriever,
        data,
        k=k,
        sweep=swept,
        rank_depth=rank_depth,
        on_progress=None if as_json else (lambda message: stderr(f"eval: {message}")),
    )
    if as_json:
        for row in result.as_dicts():
            emit_json(row)
        return
    _print(result)


def _print(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"{result.images} images, {result.captions} captions, index {result.index}")
    retrieval = Table("metric", "value")
    for key, value in result.retrieval.items():
        retrieval.add_row(key, f"{value:.3f}" if value == value and abs(value) != float("inf") else str(value))
    console.print(retrieval)
    rows = Table("options", "k", "top-1 true", "intra-list sim", "relevance", "distinct per list")
    for row in result.rows:
        rows.add_row(
            json.dumps(row["options"], ensure_ascii=False, default=str),
            str(row["k"]),
            f"{row['top1_true_caption']:.3f}",
            f"{row['intra_list_similarity']:.3f}",
            f"{row['mean_relevance']:.3f}",
            ", ".join(f"{c} {v:.2f}" for c, v in row["distinct_per_list"].items()) or "-",
        )
    console.print(rows)
