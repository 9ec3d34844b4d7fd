"""The `retriever` command line: a thin layer over the library.

Results go to stdout (a table, or one JSON object per line with --json); progress, warnings and
errors go to stderr. Library errors exit 1 with one line; usage errors exit 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from retriever.errors import ImageError, RetrieverError

app = typer.Typer(
    help="Caption ideas for images: CLIP retrieval over your own text corpus.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_INDEX_ROOT = Path("indexes")
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="toyworld (bundled, offline), an open_clip name like ViT-B-32, hf-hub:ORG/NAME or local-dir:PATH.")]
PretrainedOpt = Annotated[Optional[str], typer.Option(help="Pretrained tag (e.g. laion2b_s34b_b79k) or a checkpoint file, for an open_clip name.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cuda, mps or cpu; default: the best available.")]
PrecisionOpt = Annotated[str, typer.Option(help="fp32, or fp16/bf16 (for GPUs).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout.")]


def _friendly_errors(command):
    """Library errors become `error: ...` on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RetrieverError as e:
            _stderr(f"error: {e}")
            raise typer.Exit(1) from None

    return wrapper


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False, default=str), flush=True)


@app.command("build-index")
@_friendly_errors
def build_index_cmd(
    corpus: Annotated[Path, typer.Argument(help="Corpus file: .txt, .tsv, .csv, .parquet or .jsonl.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Index directory (default: indexes/CORPUS_NAME).")] = None,
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    column: Annotated[Optional[str], typer.Option(help="Text column (default: first of caption, title, text, prompt).")] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first bad row instead of skipping it.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 256,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing index at --out.")] = False,
    index_type: Annotated[str, typer.Option(help="auto (exact for small corpora, tuned ANN for large), flat, hnsw, ivf or ivfpq.")] = "auto",
    max_memory: Annotated[Optional[str], typer.Option(help="Memory the index may use, e.g. 4G; auto then picks an index that fits.")] = None,
    recall_target: Annotated[float, typer.Option(min=0.0, max=1.0, help="Recall@10 vs exact search that ANN indexes are tuned to.")] = 0.95,
    chunk_size: Annotated[int, typer.Option(min=1, help="Texts per shard: bounds memory; an interrupted build resumes from the last shard.")] = 65536,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or warnings.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed every text of CORPUS with CLIP's text tower into a FAISS index.

    Example: retriever build-index captions.tsv --model toyworld --out indexes/toy
    """
    from retriever.ann import parse_bytes
    from retriever.build import build_index
    from retriever.models import load_model

    out = out or DEFAULT_INDEX_ROOT / corpus.stem
    if out.exists() and not overwrite:
        raise RetrieverError(f"{out} already exists (use --overwrite to replace it)")
    loaded = load_model(model, pretrained, device=device, precision=precision)

    bad_rows = 0

    def warn_bad_row(bad) -> None:
        nonlocal bad_rows
        bad_rows += 1
        if not quiet and bad_rows <= 10:
            _stderr(f"warning: skipped {bad}")

    result = build_index(corpus, out, loaded, column=column, strict=strict, batch_size=batch_size,
                         overwrite=overwrite, show_progress_bar=False if quiet else None, on_bad_row=warn_bad_row,
                         chunk_size=chunk_size, index_type=index_type, max_memory=parse_bytes(max_memory),
                         recall_target=recall_target, use_gpu=False if device == "cpu" else None)
    if bad_rows > 10 and not quiet:
        _stderr(f"warning: ... and {bad_rows - 10} more bad rows")
    summary = result.as_dict()
    if as_json:
        _emit_json(summary)
    elif not quiet:
        resumed = f", resumed after {result.resumed_shards} finished shards" if result.resumed_shards else ""
        recall = f", recall@10 {summary['recall_at_10']:.3f} at {summary['search_params']}" if "recall_at_10" in summary else ""
        _stderr(f"indexed {summary['kept']} texts ({summary['embedded']} embedded now{resumed}) in {summary['seconds']}s "
                f"-> {summary['index']} [{summary['index_type']}{recall}]; skipped {summary['duplicates']} duplicates, "
                f"{summary['empty']} empty, {summary['bad_rows']} bad rows")


GeneratorOpt = Annotated[Optional[str], typer.Option(help="CoCa model that writes captions: toyworld-coca, or NAME:TAG (default for generate/hybrid: coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k).")]
DecodingOpt = Annotated[str, typer.Option(help="greedy, beam, top_k or top_p.")]
BeamsOpt = Annotated[int, typer.Option(min=2, help="Beams for beam search.")]
BeamGroupsOpt = Annotated[int, typer.Option(min=1, help="Beam groups (beams must divide into them).")]
TopKOpt = Annotated[int, typer.Option(min=1, help="Sample among the K likeliest tokens (top_k).")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Sample from the smallest set with this probability (top_p).")]
TemperatureOpt = Annotated[float, typer.Option(min=0.01, help="Sampling temperature.")]
MinLenOpt = Annotated[int, typer.Option(min=1, help="No end of caption before this many tokens (start token included).")]
MaxLenOpt = Annotated[int, typer.Option(min=2, help="At most this many tokens (capped by the model's context).")]
RepetitionOpt = Annotated[float, typer.Option(min=0.01, help="Repetition penalty (1 = none).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed for sampling.")]
NGenerateOpt = Annotated[int, typer.Option(min=1, help="Captions to generate per image.")]


@app.command()
@_friendly_errors
def query(
    images: Annotated[Optional[list[str]], typer.Argument(help="Image files, folders or globs.", show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="Texts per query.")] = 10,
    index: Annotated[Optional[Path], typer.Option("--index", "-i", help="Index directory (default: the only one under indexes/).")] = None,
    text: Annotated[Optional[str], typer.Option("--text", "-t", help="Query with this text instead of images.")] = None,
    mode: Annotated[str, typer.Option(help="retrieve (indexed texts), generate (captions from --generator) or hybrid (both, reranked).")] = "retrieve",
    generator: GeneratorOpt = None,
    min_score: Annotated[Optional[float], typer.Option(help="hybrid: generate when the best retrieved score is below this (default: per model, see README).")] = None,
    always_generate: Annotated[bool, typer.Option(help="hybrid: generate whatever the retrieved scores.")] = False,
    n_generate: NGenerateOpt = 1,
    decoding: DecodingOpt = "beam",
    beams: BeamsOpt = 6,
    beam_groups: BeamGroupsOpt = 1,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 0.9,
    temperature: TemperatureOpt = 1.0,
    min_len: MinLenOpt = 5,
    max_len: MaxLenOpt = 30,
    repetition_penalty: RepetitionOpt = 1.0,
    seed: SeedOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Override the model recorded in the index (same weights, e.g. a moved checkpoint).")] = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    as_json: JsonOpt = False,
) -> None:
    """Caption ideas for each image: the K nearest texts of an index, generated captions, or both.

    Example: retriever query cat.jpg photos/ -k 5 --index indexes/coco --json
    """
    from retriever.api import MODES, Retriever
    from retriever.decoding import DecodeOptions

    if mode not in MODES:
        raise typer.BadParameter(f"choose from {', '.join(MODES)}", param_hint="--mode")
    if not images and text is None:
        raise typer.BadParameter("give one or more images, or --text", param_hint="IMAGES")
    if images and text is not None:
        raise typer.BadParameter("give images or --text, not both", param_hint="--text")
    if text is not None and mode != "retrieve":
        raise typer.BadParameter("--text queries only retrieve", param_hint="--mode")
    if mode != "retrieve" and generator is None:
        from retriever.captioner import DEFAULT_GENERATOR, DEFAULT_GENERATOR_PRETRAINED

        generator = f"{DEFAULT_GENERATOR}:{DEFAULT_GENERATOR_PRETRAINED}"
    index_path = index if mode == "generate" else _find_index(index)
    retriever = Retriever.open(index_path, model=model, pretrained=pretrained, device=device, precision=precision,
                               generator=generator if mode != "retrieve" else None)
    decode = DecodeOptions(decoding, beams, beam_groups, top_k, top_p, temperature, min_len, max_len, repetition_penalty, seed)
    options = {"mode": mode, "decode": decode, "min_score": min_score, "always_generate": always_generate,
               "n_generate": n_generate}
    if not _answer(retriever, images or [], text, k, options, as_json):
        raise typer.Exit(1)


@app.command()
@_friendly_errors
def caption(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.", show_default=False)],
    generator: GeneratorOpt = None,
    n: NGenerateOpt = 1,
    decoding: DecodingOpt = "beam",
    beams: BeamsOpt = 6,
    beam_groups: BeamGroupsOpt = 1,
    top_k: TopKOpt = 50,
    top_p: TopPOpt = 0.9,
    temperature: TemperatureOpt = 1.0,
    min_len: MinLenOpt = 5,
    max_len: MaxLenOpt = 30,
    repetition_penalty: RepetitionOpt = 1.0,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    as_json: JsonOpt = False,
) -> None:
    """Write captions for images with a CoCa model (query --mode generate, without an index).

    Example: retriever caption cat.jpg --beams 6 --generator coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k
    """
    from retriever.api import Retriever
    from retriever.captioner import DEFAULT_GENERATOR, DEFAULT_GENERATOR_PRETRAINED
    from retriever.decoding import DecodeOptions

    generator = generator or f"{DEFAULT_GENERATOR}:{DEFAULT_GENERATOR_PRETRAINED}"
    retriever = Retriever.open(None, device=device, precision=precision, generator=generator)
    decode = DecodeOptions(decoding, beams, beam_groups, top_k, top_p, temperature, min_len, max_len, repetition_penalty, seed)
    if not _answer(retriever, images, None, n, {"mode": "generate", "decode": decode, "n_generate": n}, as_json):
        raise typer.Exit(1)


def _answer(retriever, images: list[str], text: str | None, k: int, options: dict, as_json: bool) -> bool:
    """Query and print results (a table, or JSON lines); returns False if any image failed."""
    from retriever.images import expand_image_paths, load_image

    rows: list[tuple[str, int, float | None, str, str]] = []
    ok = True

    def show(label_key: str, label: str, hits) -> None:
        for rank, hit in enumerate(hits, start=1):
            if as_json:
                _emit_json({label_key: label, "rank": rank, **hit.to_dict()})
            else:
                rows.append((label, rank, hit.score, hit.source, hit.text))

    if text is not None:
        show("query_text", text, retriever.query_text(text, k=k))
    paths = expand_image_paths(images)
    for start in range(0, len(paths), 64):
        loaded = []
        for path in paths[start:start + 64]:
            try:
                loaded.append((str(path), load_image(path)))
            except ImageError as e:
                ok = False
                _stderr(f"error: {e}")
        if loaded:
            for (label, _), hits in zip(loaded, retriever.query_many([im for _, im in loaded], k=k, **options)):
                show("image", label, hits)
    if rows:
        _print_table(rows, with_source=options.get("mode", "retrieve") != "retrieve")
    return ok


@app.command()
@_friendly_errors
def info(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Print an index's manifest: model, counts, corpus and versions.

    Example: retriever info indexes/coco
    """
    from retriever.index import read_manifest

    manifest = read_manifest(index)
    if as_json:
        _emit_json(manifest)
    else:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))


@app.command()
@_friendly_errors
def models(as_json: JsonOpt = False) -> None:
    """List the models: bundled ones, and open_clip's pretrained tags (and whether each is downloaded).

    Example: retriever models --json
    """
    from retriever.models import list_models

    rows = list_models()
    if as_json:
        for row in rows:
            _emit_json(row)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "pretrained", "source", "offline")
    for row in rows:
        table.add_row(row["model"], row["pretrained"] or "-", row["source"], "yes" if row["available_offline"] else "no")
    Console().print(table)


@app.command()
@_friendly_errors
def serve(
    index: Annotated[Optional[list[Path]], typer.Option("--index", "-i", help="Index directory; repeat for several (named by directory).")] = None,
    generator: GeneratorOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    max_upload: Annotated[str, typer.Option(help="Largest accepted request body, e.g. 10M.")] = "10M",
    max_pending: Annotated[int, typer.Option(min=1, help="Queries waiting or running at once; more get 503.")] = 32,
    device: DeviceOpt = None,
) -> None:
    """Serve the HTTP API (POST /v1/query, GET /v1/indexes, /healthz, /openapi.json) and a web page at /.

    Example: retriever serve --index indexes/coco --generator toyworld-coca --port 8000
    """
    from retriever.ann import parse_bytes
    from retriever.api import Retriever
    from retriever.server import ServerSettings, create_app

    try:
        import uvicorn
    except ImportError:
        raise RetrieverError("the server needs its extra: pip install 'retriever[serve]'") from None
    if not index and not generator:
        raise typer.BadParameter("give at least one --index, or a --generator", param_hint="--index")
    shared_generator = Retriever.open(None, device=device, generator=generator).generator if generator else None
    retrievers = {}
    for path in index or []:
        if path.name in retrievers:
            raise RetrieverError(f"two indexes are named {path.name!r}; rename one directory")
        retrievers[path.name] = Retriever.open(path, device=device, generator=shared_generator)
    if not retrievers:
        retrievers["generator"] = Retriever.open(None, generator=shared_generator)
    settings = ServerSettings(max_upload_bytes=parse_bytes(max_upload), max_pending=max_pending)
    _stderr(f"serving {', '.join(retrievers)} on http://{host}:{port}/")
    uvicorn.run(create_app(retrievers, settings), host=host, port=port, log_level="warning")


@app.command("toy-images")
@_friendly_errors
def toy_images(
    out: Annotated[Path, typer.Argument(help="Folder to write PNGs and captions.tsv into.")],
    n: Annotated[int, typer.Option("-n", min=1, help="How many images.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write toy-world images (the world the bundled model knows) with a captions.tsv.

    Example: retriever toy-images demo/ -n 4
    """
    from retriever import toyworld

    out.mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i, (image, caption) in enumerate(toyworld.sample(n, seed=seed)):
        name = f"{i:04d}_{caption.replace(' ', '_')}.png"
        image.save(out / name)
        lines.append(f"{name}\t{caption}")
    (out / "captions.tsv").write_text("\n".join(lines) + "\n")
    _stderr(f"wrote {n} images and captions.tsv to {out}")


@app.command()
@_friendly_errors
def finetune(
    train: Annotated[Path, typer.Argument(help="Pairs file (.tsv, .csv, .parquet, .jsonl) with image paths and captions.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the fine-tuned model (load it with --model local-dir:OUT).")],
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    val: Annotated[Optional[Path], typer.Option(help="Held-out pairs: validation loss, caption R@1 and (CoCa) exact match after each epoch.")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training pairs.")] = 3,
    batch_size: Annotated[int, typer.Option(min=2, help="Pairs per step.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (cosine schedule after warmup).")] = 1e-5,
    warmup: Annotated[Optional[int], typer.Option(min=0, help="Warmup steps (default: 5% of all steps, at most 1000).")] = None,
    wd: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay.")] = 0.1,
    caption_loss_weight: Annotated[float, typer.Option(min=0.0, help="CoCa: weight of the captioning loss.")] = 1.0,
    contrastive_loss_weight: Annotated[float, typer.Option(min=0.0, help="CoCa: weight of the contrastive loss (CLIP models always use it).")] = 0.0,
    image_column: Annotated[str, typer.Option(help="Column of image paths (absolute, or relative to the pairs file).")] = "filepath",
    caption_column: Annotated[str, typer.Option(help="Column of captions.")] = "title",
    resume: Annotated[bool, typer.Option(help="Continue the run saved in --out (same command; only --epochs may change).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a previous run in --out.")] = False,
    from_scratch: Annotated[bool, typer.Option(help="Start from random weights: the architecture of --model only.")] = False,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Image-loading processes (default: up to 4).")] = None,
    train_precision: Annotated[str, typer.Option("--precision", help="auto (amp on CUDA, else fp32), fp32, amp or bf16.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for data order and augmentation.")] = 0,
    checkpoint_minutes: Annotated[float, typer.Option(min=0.0, help="Save the resumable state this often (also each epoch and on Ctrl-C).")] = 10.0,
    device: DeviceOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-epoch lines.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a CLIP or CoCa model on your own (image, caption) pairs.

    Example: retriever finetune train.tsv --val val.tsv --model toyworld-coca --out models/mine
    """
    import time as _time

    from retriever.finetune import TrainOptions, finetune as run_finetune

    options = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup, wd=wd,
                           caption_loss_weight=caption_loss_weight, contrastive_loss_weight=contrastive_loss_weight,
                           precision=train_precision, workers=workers, seed=seed, checkpoint_minutes=checkpoint_minutes)
    warned = {"bad_row": 0, "unreadable_image": 0}
    show_bar = False if quiet else None
    last_line = [_time.monotonic()]

    def on_event(kind: str, details: dict) -> None:
        if quiet:
            return
        if kind in warned:
            warned[kind] += 1
            if warned[kind] <= 10:
                _stderr(f"warning: skipped {details.get('row') or details.get('error')}")
        elif kind == "epoch":
            _stderr(_epoch_line(details))
        elif kind == "step" and not sys.stderr.isatty() and _time.monotonic() - last_line[0] > 30:
            # No progress bar when stderr is a log file: a line every 30 s instead.
            last_line[0] = _time.monotonic()
            loss = "-" if details["loss"] is None else f"{details['loss']:.4f}"
            _stderr(f"epoch {details['epoch']} step {details['step']}/{details['steps']} loss {loss} lr {details['lr']:.2e}")

    try:
        result = run_finetune(train, out, model, pretrained, val=val, options=options, resume=resume, overwrite=overwrite,
                              from_scratch=from_scratch, device=device, image_column=image_column,
                              caption_column=caption_column, show_progress_bar=show_bar, on_event=on_event)
    except KeyboardInterrupt:
        _stderr(f"interrupted: the state is saved; add --resume to the same command to continue ({out})")
        raise typer.Exit(130) from None
    summary = result.as_dict()
    for kind, count in warned.items():
        if count > 10 and not quiet:
            _stderr(f"warning: ... and {count - 10} more ({kind.replace('_', ' ')}s)")
    if as_json:
        _emit_json(summary)
    elif not quiet:
        _stderr(f"fine-tuned {summary['model']} on {summary['train']['kept']} pairs in {summary['seconds']}s -> {out} "
                f"(use --model local-dir:{out}); skipped {summary['train']['bad_rows']} bad rows "
                f"({summary['train']['missing_images']} missing images), {summary['unreadable_images']} unreadable images")


def _epoch_line(report: dict) -> str:
    parts = [f"epoch {report['epoch']}: train loss {report['train_loss']:.4f} ({report['steps']} steps, {report['seconds']}s)"]
    for key, label in (("val_loss", "val loss"), ("recall_at_1", "R@1"), ("exact_match", "exact match")):
        if report.get(key) is not None:
            parts.append(f"{label} {report[key]:.4f}")
    return ", ".join(parts)


corpus_app = typer.Typer(help="Turn public caption datasets into corpus files for build-index.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("coco")
@_friendly_errors
def corpus_coco(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .tsv (or .txt with --captions-only); with --karpathy, a directory that receives train.tsv, val.tsv and test.tsv.")],
    annotations: Annotated[Optional[list[Path]], typer.Option(help="COCO captions file, e.g. captions_train2014.json; repeat for several. Optional with --karpathy: its captions then replace Karpathy's for the images it covers.")] = None,
    karpathy: Annotated[Optional[Path], typer.Option(help="Karpathy's dataset_coco.json: split into train/val/test, with restval going to train.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder with the images, found as DIR/NAME or DIR/SPLIT/NAME (SPLIT: train2014 etc., or Karpathy's filepath); rows hold paths relative to the output's folder. Optional with --captions-only.")] = None,
    captions_only: Annotated[bool, typer.Option(help="Write only the captions (a 'caption' column, or one per line for .txt), duplicates dropped: a text corpus for build-index.")] = False,
    keep_missing: Annotated[bool, typer.Option(help="Also write rows whose image is not in --images (by default they are skipped and counted).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")] = False,
) -> None:
    """Convert COCO captions (official annotations and/or Karpathy splits) to image/caption TSVs.

    Example: retriever corpus coco --annotations captions_train2014.json --images coco/train2014 --out train.tsv
    """
    from retriever.coco import convert_coco

    if not annotations and karpathy is None:
        raise typer.BadParameter("give --annotations, --karpathy, or both", param_hint="--annotations")
    if images is None and not captions_only:
        raise typer.BadParameter("the images folder is needed for image paths (or use --captions-only)", param_hint="--images")
    report = convert_coco(out, annotations=annotations or [], karpathy=karpathy, images=images,
                          captions_only=captions_only, keep_missing=keep_missing, overwrite=overwrite)
    if as_json:
        _emit_json(report.as_dict())
        return
    for split in report.splits.values():
        extra = f", {split.duplicates} duplicates dropped" if captions_only else ""
        _stderr(f"wrote {split.captions} captions of {split.images} images to {split.path}{extra}")
    totals = report.totals
    if totals["missing_images"]:
        fate = "written anyway" if keep_missing else f"their {totals['skipped_captions']} captions skipped"
        _stderr(f"warning: {totals['missing_images']} images referenced by the annotations are not in {images} ({fate})")
    if not report.images_checked:
        _stderr("note: image files were not checked (no --images)")
    dropped = {"empty captions dropped": totals["empty_captions"], "images without a caption": totals["uncaptioned_images"],
               "captions of images not in the annotations' image list": report.unmatched_captions,
               "captions taken from Karpathy's file (images not in --annotations)": report.karpathy_captions_used}
    for what, count in dropped.items():
        if count:
            _stderr(f"note: {count} {what}")


BuiltinOpt = Annotated[str, typer.Option(help="clip-interrogator tables, comma-separated (artists, flavors, mediums, movements, trendings, negative), all or none.")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(help="Where tables are cached (default: $RETRIEVER_CACHE, else $XDG_CACHE_HOME/retriever or ~/.cache/retriever).")]


@app.command()
@_friendly_errors
def interrogate(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.", show_default=False)],
    mode: Annotated[str, typer.Option(help="best (grow the prompt while it gets more similar), fast (top terms), classic (medium by artist, trending, movement, flavors) or negative (terms least like the image).")] = "best",
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    caption_model: Annotated[Optional[str], typer.Option(help="CoCa model that writes the base caption: toyworld-coca, or NAME:TAG (default: coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k).")] = None,
    index: Annotated[Optional[Path], typer.Option("--index", "-i", help="Base caption: the nearest text of this index, instead of a generated one.")] = None,
    caption: Annotated[Optional[str], typer.Option(help="Base caption for every image, instead of a generated one.")] = None,
    no_caption: Annotated[bool, typer.Option("--no-caption", help="No base caption: the prompt is made of terms only.")] = False,
    builtin: BuiltinOpt = "all",
    table: Annotated[Optional[list[str]], typer.Option("--table", help="Your own table NAME=PATH: an index built by build-index with the same --model, or a .txt list (one label a line, embedded once); repeatable; a built-in name replaces that table.")] = None,
    max_flavors: Annotated[Optional[int], typer.Option(min=0, help="Most terms (default: 32; classic: 3 flavors).")] = None,
    min_flavors: Annotated[int, typer.Option(min=0, help="best: terms added before the chain may stop.")] = 8,
    intermediate_count: Annotated[int, typer.Option(min=1, help="best/negative: chain from this many best (worst) terms.")] = 2048,
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
    from retriever.images import expand_image_paths, load_image
    from retriever.interrogate import MODES, Interrogator

    if mode not in MODES:
        raise typer.BadParameter(f"choose from {', '.join(MODES)}", param_hint="--mode")
    builtin_names = _builtin_tables(builtin)
    if sum([caption_model is not None, index is not None, caption is not None, no_caption]) > 1:
        raise typer.BadParameter("choose one base caption: --caption-model, --index, --caption or --no-caption",
                                 param_hint="--caption-model")
    user_tables: dict[str, str] = {}
    for spec in table or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise typer.BadParameter(f"{spec!r}: use NAME=PATH", param_hint="--table")
        user_tables[name.strip()] = path.strip()
    if mode != "negative" and caption is None and index is None and not no_caption and caption_model is None:
        from retriever.captioner import DEFAULT_GENERATOR, DEFAULT_GENERATOR_PRETRAINED

        caption_model = f"{DEFAULT_GENERATOR}:{DEFAULT_GENERATOR_PRETRAINED}"
    def note_embedding(name: str, count: int) -> None:
        if not quiet:
            _stderr(f"embedding the {name} table ({count:,} labels) once for {model}; it is cached for next time")

    interrogator = Interrogator.open(
        model, pretrained, builtin=builtin_names, tables=user_tables, cache_dir=cache_dir, device=device,
        precision=precision, caption_model=caption_model if mode != "negative" else None,
        caption_index=index if mode != "negative" else None, flavor_intermediate_count=intermediate_count,
        show_progress_bar=False if quiet else None, on_embed=note_embedding)
    paths = expand_image_paths(images)
    ok = True
    for start in range(0, len(paths), 64):
        loaded_images = []
        for path in paths[start:start + 64]:
            try:
                loaded_images.append((str(path), load_image(path)))
            except ImageError as e:
                ok = False
                _stderr(f"error: {e}")
        if not loaded_images:
            continue
        results = interrogator.interrogate_many([im for _, im in loaded_images], mode=mode, caption="" if no_caption else caption,
                                                min_flavors=min_flavors, max_flavors=max_flavors)
        for (label, _), result in zip(loaded_images, results):
            result.image = label
            if as_json:
                _emit_json(result.to_dict())
            else:
                print(result.prompt if len(paths) == 1 else f"{label}\t{result.prompt}", flush=True)
    if not ok:
        raise typer.Exit(1)


@app.command("interrogate-tables")
@_friendly_errors
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
    from retriever.label_tables import ensure_builtin_tables
    from retriever.models import load_model

    names = _builtin_tables(builtin)
    loaded = load_model(model, pretrained, device=device, precision=precision)
    for name in names:
        status = ensure_builtin_tables(loaded, [name], cache_dir, batch_size=batch_size,
                                       show_progress_bar=False if quiet else None)[0]
        if as_json:
            _emit_json(status.as_dict())
        elif not quiet:
            done = f"embedded in {status.seconds:.1f}s" if status.built else "cached"
            _stderr(f"{name}: {status.count:,} labels, {done} -> {status.path}")


def _builtin_tables(builtin: str) -> tuple[str, ...]:
    from retriever.label_tables import parse_builtin

    try:
        return parse_builtin(builtin)
    except RetrieverError as e:
        raise typer.BadParameter(str(e), param_hint="--builtin") from None


def _find_index(index: Path | None) -> Path:
    if index is not None:
        return index
    candidates = sorted(p for p in DEFAULT_INDEX_ROOT.glob("*") if (p / "manifest.json").is_file()) if DEFAULT_INDEX_ROOT.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(str(c) for c in candidates) or "none"
    raise RetrieverError(f"name the index with --index (indexes found under {DEFAULT_INDEX_ROOT}/: {found})")


def _print_table(rows: list[tuple[str, int, float | None, str, str]], with_source: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("query", "rank", "score", *(["source"] if with_source else []), "text")
    for label, rank, score, source, text in rows:
        table.add_row(label if rank == 1 else "", str(rank), "-" if score is None else f"{score:.3f}",
                      *([source] if with_source else []), text)
    # Piped output keeps each hit on one line, however long, so grep and cut work on it.
    Console(width=None if sys.stdout.isatty() else 100_000).print(table)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        _stderr("interrupted (an interrupted build-index resumes where it stopped when run again)")
        sys.exit(130)
