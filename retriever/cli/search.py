"""Commands that build indexes and answer queries: build-index, query, caption, info, models,
serve, toy-images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from retriever.cli.common import (
    DEFAULT_INDEX_ROOT,
    BeamGroupsOpt,
    BeamsOpt,
    CappedWarnings,
    DecodingOpt,
    DeviceOpt,
    GeneratorOpt,
    ImageBatches,
    JsonOpt,
    MaxLenOpt,
    MinLenOpt,
    ModelOpt,
    NGenerateOpt,
    PrecisionOpt,
    PretrainedOpt,
    RepetitionOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    app,
    emit_json,
    find_index,
    friendly_errors,
    json,
    print_table,
    stderr,
)
from retriever.errors import RetrieverError
from retriever.models.image_stream import AUTO_WORKERS_FROM
from retriever.search.options import DEFAULT_QUERY_DEDUPE


@app.command("build-index")
@friendly_errors
def build_index_cmd(
    corpus: Annotated[Path, typer.Argument(help="Corpus file: .txt, .tsv, .csv, .parquet or .jsonl.")],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Index directory (default: indexes/CORPUS_NAME).")
    ] = None,
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    column: Annotated[
        Optional[str], typer.Option(help="Text column (default: first of caption, title, text, prompt).")
    ] = None,
    strict: Annotated[bool, typer.Option(help="Fail on the first bad row instead of skipping it.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 256,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing index at --out.")] = False,
    index_type: Annotated[
        str, typer.Option(help="auto (exact for small corpora, tuned ANN for large), flat, hnsw, ivf or ivfpq.")
    ] = "auto",
    max_memory: Annotated[
        Optional[str], typer.Option(help="Memory the index may use, e.g. 4G; auto then picks an index that fits.")
    ] = None,
    recall_target: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Recall@10 vs exact search that ANN indexes are tuned to.")
    ] = 0.95,
    chunk_size: Annotated[
        int,
        typer.Option(min=1, help="Texts per shard: bounds memory; an interrupted build resumes from the last shard."),
    ] = 65536,
    vectors: Annotated[
        bool,
        typer.Option(
            "--vectors/--no-vectors",
            help="Keep exact fp16 vectors (2 bytes x dim per text) for --diversity, --dedupe and --like on approximate indexes.",
        ),
    ] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="local (this process) or ray (an actor pool on a Ray cluster; --out must be on storage every node sees)."
        ),
    ] = "local",
    ray_address: Annotated[
        Optional[str],
        typer.Option(help="--engine ray: the cluster to join, auto or HOST:PORT (default: start a local Ray)."),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            min=1, help="--engine ray: embedding actors (default: one per GPU, or per CPU core without GPUs)."
        ),
    ] = None,
    gpus_per_worker: Annotated[
        Optional[float],
        typer.Option(min=0.0, help="--engine ray: GPUs per actor (default: 1 when the cluster has GPUs, else 0)."),
    ] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or warnings.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed every text of CORPUS with CLIP's text tower into a FAISS index.

    Example: retriever build-index captions.tsv --model toyworld --out indexes/toy
    """
    from retriever.corpus.reader import check_corpus_file

    check_corpus_file(corpus)  # a typo costs milliseconds, not a model load
    ray_options = None
    if engine not in ("local", "ray"):
        raise RetrieverError(f"unknown --engine {engine!r}; choose local or ray")
    if engine == "ray":
        from retriever.index.distributed import RayOptions, check_address, import_ray

        import_ray()  # a missing extra is one line, before a model load
        if ray_address:
            check_address(ray_address)  # seconds, not the minutes ray.init retries for
        ray_options = RayOptions(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
    elif ray_address is not None or workers is not None or gpus_per_worker is not None:
        raise RetrieverError("--ray-address, --workers and --gpus-per-worker need --engine ray")
    from retriever.index.ann import parse_bytes
    from retriever.index.build import build_index
    from retriever.index.lock import check_unlocked
    from retriever.index.publish import check_out
    from retriever.models.loading import load_model

    out = out or DEFAULT_INDEX_ROOT / corpus.stem
    out = check_out(out, overwrite)  # refuse a folder that is not an index before loading a model
    check_unlocked(out)
    parse_bytes(max_memory)
    loaded = load_model(model, pretrained, device=device, precision=precision)

    warnings = CappedWarnings(quiet)

    result = build_index(
        corpus,
        out,
        loaded,
        column=column,
        strict=strict,
        batch_size=batch_size,
        overwrite=overwrite,
        show_progress_bar=False if quiet else None,
        on_bad_row=lambda bad: warnings.warn("bad rows", f"skipped {bad}"),
        chunk_size=chunk_size,
        index_type=index_type,
        max_memory=parse_bytes(max_memory),
        recall_target=recall_target,
        use_gpu=False if device == "cpu" else None,
        store_vectors=vectors,
        engine=engine,
        ray=ray_options,
    )
    warnings.finish()
    summary = result.as_dict()
    if as_json:
        emit_json(summary)
    elif not quiet:
        resumed = f", resumed after {result.resumed_shards} finished shards" if result.resumed_shards else ""
        recall = (
            f", recall@10 {summary['recall_at_10']:.3f} at {summary['search_params']}"
            if "recall_at_10" in summary
            else ""
        )
        stderr(
            f"indexed {summary['kept']} texts ({summary['embedded']} embedded now{resumed}) in {summary['seconds']}s "
            f"-> {summary['index']} [{summary['index_type']}{recall}]; skipped {summary['duplicates']} duplicates, "
            f"{summary['empty']} empty, {summary['bad_rows']} bad rows"
        )


@app.command()
@friendly_errors
def query(
    images: Annotated[
        Optional[list[str]],
        typer.Argument(help="Image files, folders or globs (PATH:WEIGHT with --blend).", show_default=False),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="Texts per query.")] = 10,
    index: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--index",
            "-i",
            help="Index directory (default: the only one under indexes/); repeat to search several built with one model.",
        ),
    ] = None,
    text: Annotated[
        Optional[str],
        typer.Option("--text", "-t", help="Query with this text; with images, combine it with each image."),
    ] = None,
    plus: Annotated[
        Optional[list[str]],
        typer.Option(
            "--plus", help='Push results towards a text, optionally weighted: --plus "film noir" --plus autumn:0.5.'
        ),
    ] = None,
    minus: Annotated[
        Optional[list[str]], typer.Option("--minus", help="Push results away from a text (TEXT or TEXT:WEIGHT).")
    ] = None,
    blend: Annotated[bool, typer.Option(help="Blend all images into one query (weights as PATH:WEIGHT).")] = False,
    like: Annotated[
        Optional[int],
        typer.Option("--like", help="More like this: query with the stored vector of this id in the (first) index."),
    ] = None,
    diversity: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="0 = plain nearest, 1 = most diverse (MMR over --fetch-k candidates)."),
    ] = 0.0,
    fetch_k: Annotated[
        Optional[int],
        typer.Option(min=1, max=100_000, help="Candidates to re-rank, from each index (default: max(10 k, 100))."),
    ] = None,
    dedupe: Annotated[
        Optional[str],
        typer.Option(
            help=f"Collapse hits whose texts' cosine is at least this (default {DEFAULT_QUERY_DEDUPE}); 'off' keeps near-duplicates."
        ),
    ] = None,
    where: Annotated[
        Optional[str],
        typer.Option(
            help='Filter on metadata: source = "coco" and len < 60; lang in ("en", "zh"); title contains "cat".'
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(help="retrieve (indexed texts), generate (captions from --generator) or hybrid (both, reranked)."),
    ] = "retrieve",
    generator: GeneratorOpt = None,
    min_score: Annotated[
        Optional[float],
        typer.Option(
            help="hybrid: generate when the best retrieved score is below this (default: per model, see README)."
        ),
    ] = None,
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
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model", "-m", help="Override the model recorded in the index (same weights, e.g. a moved checkpoint)."
        ),
    ] = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = "fp32",
    workers: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            max=64,
            help="Processes decoding and resizing images while the model encodes (0: none; "
            f"default: none under {AUTO_WORKERS_FROM} images, else one per spare core).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Caption ideas for each image: the K nearest texts of an index, generated captions, or both.

    Results can be steered (--plus, --minus, --text), spread out (--diversity), filtered
    (--where) and drawn from several indexes (--index a --index b).

    Example: retriever query cat.jpg -k 5 --plus "film noir" --diversity 0.5 --index indexes/coco --json
    """
    from retriever.generate.decoding import DecodeOptions
    from retriever.search.api import MODES, Retriever

    if mode not in MODES:
        raise typer.BadParameter(f"choose from {', '.join(MODES)}", param_hint="--mode")
    if not images and text is None and like is None:
        raise typer.BadParameter("give one or more images, --text or --like", param_hint="IMAGES")
    if like is not None and (images or text is not None):
        raise typer.BadParameter("--like queries with an indexed text alone", param_hint="--like")
    if text is not None and not text.strip():
        raise typer.BadParameter("the text is empty", param_hint="--text")
    if (text is not None and not images or like is not None) and mode != "retrieve":
        raise typer.BadParameter("text and --like queries only retrieve", param_hint="--mode")
    if blend and len(images or []) < 2:
        raise typer.BadParameter("--blend needs two or more images", param_hint="--blend")
    if blend and mode != "retrieve":
        raise typer.BadParameter("blended queries only retrieve", param_hint="--mode")
    if mode != "retrieve" and generator is None:
        from retriever.generate.captioner import DEFAULT_GENERATOR, DEFAULT_GENERATOR_PRETRAINED

        generator = f"{DEFAULT_GENERATOR}:{DEFAULT_GENERATOR_PRETRAINED}"
    indexes = None if mode == "generate" else (index or [find_index(None)])
    retriever = Retriever.open(
        indexes,
        model=model,
        pretrained=pretrained,
        device=device,
        precision=precision,
        generator=generator if mode != "retrieve" else None,
    )
    result_options = {
        "diversity": diversity,
        "fetch_k": fetch_k,
        "where": where,
        "dedupe": _dedupe(dedupe, retriever),
        "plus": plus or [],
        "minus": minus or [],
    }
    decode = DecodeOptions(
        decoding, beams, beam_groups, top_k, top_p, temperature, min_len, max_len, repetition_penalty, seed
    )
    options = {
        "mode": mode,
        "decode": decode,
        "min_score": min_score,
        "always_generate": always_generate,
        "n_generate": n_generate,
    }
    if mode != "generate":
        options.update(result_options)
    if like is not None or blend or (text is not None and not images):
        _answer_single(retriever, images or [], text, like, k, result_options, as_json, where)
        return
    if not _answer(retriever, images or [], text, k, options, as_json, where, workers):
        raise typer.Exit(1)


def _dedupe(value: str | None, retriever) -> float | None:
    """--dedupe: a cosine, 'off', or (None) the default where every index can re-rank exactly."""
    from retriever.search.options import can_rerank

    if value is None:
        if retriever.indexes and all(can_rerank(index) for index in retriever.indexes):
            return DEFAULT_QUERY_DEDUPE
        return None
    if value.strip().lower() in ("off", "none", "no"):
        return None
    try:
        cosine = float(value)
    except ValueError:
        raise typer.BadParameter(f"a cosine such as 0.95, or off (got {value!r})", param_hint="--dedupe") from None
    if not 0.0 < cosine <= 1.0:
        raise typer.BadParameter(f"a cosine in (0, 1], or off (got {value})", param_hint="--dedupe")
    return cosine


def _answer_single(
    retriever,
    images: list[str],
    text: str | None,
    like: int | None,
    k: int,
    options: dict,
    as_json: bool,
    where: str | None,
) -> None:
    """One result list: a text query, a blend of images (with --text steering it), or --like."""
    from retriever.search.steering import parse_weighted

    if like is not None:
        label_key, label, hits = "like", str(like), retriever.more_like(like, k=k, **options)
    elif images:
        pairs = [parse_weighted(image) for image in images]
        label_key, label = "blend", " + ".join(f"{p}:{w:g}" for p, w in pairs)
        hits = retriever.query_blend([p for p, _ in pairs], [w for _, w in pairs], k=k, text=text, **options)
    else:
        label_key, label, hits = "query_text", text or "", retriever.query_text(text, k=k, **options)
    _note_short(hits, k, where)
    if as_json:
        for rank, hit in enumerate(hits, start=1):
            emit_json({label_key: label, "rank": rank, **hit.to_dict()})
    else:
        print_table(
            [(label, rank, h.score, h.source, h.text) for rank, h in enumerate(hits, start=1)], with_source=False
        )


def _note_short(hits: list, k: int, where: str | None) -> None:
    if where and len(hits) < k:
        stderr(f"note: only {len(hits)} indexed texts match --where {where!r}")


@app.command()
@friendly_errors
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
    from retriever.generate.captioner import DEFAULT_GENERATOR, DEFAULT_GENERATOR_PRETRAINED
    from retriever.generate.decoding import DecodeOptions
    from retriever.search.api import Retriever

    generator = generator or f"{DEFAULT_GENERATOR}:{DEFAULT_GENERATOR_PRETRAINED}"
    retriever = Retriever.open(None, device=device, precision=precision, generator=generator)
    decode = DecodeOptions(
        decoding, beams, beam_groups, top_k, top_p, temperature, min_len, max_len, repetition_penalty, seed
    )
    if not _answer(retriever, images, None, n, {"mode": "generate", "decode": decode, "n_generate": n}, as_json):
        raise typer.Exit(1)


def _answer(
    retriever,
    images: list[str],
    text: str | None,
    k: int,
    options: dict,
    as_json: bool,
    where: str | None = None,
    workers: int | None = None,
) -> bool:
    """Query and print results (a table, or JSON lines); returns False if any image failed."""
    rows: list[tuple[str, int, float | None, str, str]] = []

    def show(label_key: str, label: str, hits) -> None:
        for rank, hit in enumerate(hits, start=1):
            if as_json:
                emit_json({label_key: label, "rank": rank, **hit.to_dict()})
            else:
                rows.append((label, rank, hit.score, hit.source, hit.text))

    # Retrieval alone feeds the CLIP model, whose resize and crop can then run in the workers too.
    preprocess = retriever.model.preprocess if options.get("mode", "retrieve") == "retrieve" else None
    batches = ImageBatches(images, workers=workers, preprocess=preprocess)
    for batch in batches:
        for (label, _), hits in zip(batch, retriever.query_many([im for _, im in batch], k=k, text=text, **options)):
            _note_short(hits, k, where)
            show("image", label, hits)
    if rows:
        print_table(rows, with_source=options.get("mode", "retrieve") != "retrieve")
    return not batches.failed


@app.command()
@friendly_errors
def info(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Also check every file against the SHA-256 in the manifest (reads it all).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print an index's manifest (model, counts, corpus, versions) after checking the index opens.

    With --verify, every file is read and checked against its recorded SHA-256: a damaged
    index is an error naming the file (exit 1).

    Example: retriever info indexes/coco --verify
    """
    from retriever.index.store import read_index, read_manifest
    from retriever.index.verify import can_verify, verify_index

    verified = None
    if verify and can_verify(read_manifest(index)):
        verify_index(index)  # first: a changed byte is best named by its file's hash
        verified = "ok"
    manifest = read_index(index, use_gpu=False, mmap=True).manifest  # sizes, dimension, counts, columns
    if as_json:
        emit_json({**manifest, **({"verified": verified} if verify else {})})
    else:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
        if verified:
            print(f"OK: {index}: {len(manifest['files'])} files match their recorded SHA-256")
    if not can_verify(manifest):
        stderr(
            f"note: {index} was built before file checksums were recorded, so it cannot be verified; "
            "rebuild it with build-index ... --overwrite to add them"
        )


@app.command()
@friendly_errors
def models(as_json: JsonOpt = False) -> None:
    """List the models: bundled ones, and open_clip's pretrained tags (and whether each is downloaded).

    Example: retriever models --json
    """
    from retriever.models.loading import list_models

    rows = list_models()
    if as_json:
        for row in rows:
            emit_json(row)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "pretrained", "source", "offline")
    for row in rows:
        table.add_row(
            row["model"], row["pretrained"] or "-", row["source"], "yes" if row["available_offline"] else "no"
        )
    Console().print(table)


@app.command()
@friendly_errors
def serve(
    index: Annotated[
        Optional[list[Path]],
        typer.Option("--index", "-i", help="Index directory; repeat for several (named by directory)."),
    ] = None,
    generator: Annotated[
        Optional[list[str]],
        typer.Option(
            "--generator",
            help="What writes captions for generate/hybrid: a CoCa (toyworld-coca, NAME:TAG) or a style decoder (style:PATH); repeat to offer several (a query's `generator` field picks one; the first is the default).",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    max_upload: Annotated[str, typer.Option(help="Largest accepted request body, e.g. 10M.")] = "10M",
    max_pending: Annotated[int, typer.Option(min=1, help="Queries waiting or running at once; more get 503.")] = 32,
    api_key_file: Annotated[
        Optional[Path],
        typer.Option(
            help="File holding an API key that clients must send (Authorization: Bearer KEY or X-API-Key); else $RETRIEVER_API_KEY."
        ),
    ] = None,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Another Host name clients may use (this machine's LAN name or IP, the proxy's name); repeat for several; '*' for any."
        ),
    ] = None,
    read_timeout: Annotated[
        float,
        typer.Option(
            min=0.1, help="Seconds a request (headers and body) may take to arrive; slower clients are cut off."
        ),
    ] = 60.0,
    device: DeviceOpt = None,
) -> None:
    """Serve the HTTP API (POST /v1/query, GET /v1/indexes, /healthz, /openapi.json) and a web page at /.

    Example: retriever serve --index indexes/toy --generator toyworld-coca --generator style:toyworld-style
    """
    from retriever.index.ann import parse_bytes
    from retriever.serve.app import ServerSettings, create_app
    from retriever.serve.generators import open_served
    from retriever.serve.run import listen
    from retriever.serve.run import serve as run_server
    from retriever.serve.security import allowed_hosts, exposure_warning, read_api_key

    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise RetrieverError("the server needs its extra: pip install 'caption-retriever[serve]'") from None
    if not index and not generator:
        raise typer.BadParameter("give at least one --index, or a --generator", param_hint="--index")
    api_key = read_api_key(api_key_file)
    warning = exposure_warning(host, api_key)
    if warning:
        stderr(f"warning: {warning}")
    sock = listen(host, port)  # before the models load: a taken port fails in a second, not a minute
    served = open_served(index or [], generator or [], device=device)
    settings = ServerSettings(
        max_upload_bytes=parse_bytes(max_upload) or 0,
        max_pending=max_pending,
        allowed_hosts=allowed_hosts(host, allowed_host or ()),
        api_key=api_key,
        read_timeout_s=read_timeout,
    )
    for name, per_index in served.generators.items() if index else ():
        left_out = [g.strip() for g in generator or [] if g.strip() not in per_index]
        if left_out:
            stderr(f"note: {', '.join(left_out)} not offered for {name} (trained with another CLIP model)")
    stderr(
        f"serving {', '.join(served.retrievers)} on http://{host}:{port}/" + (" (API key required)" if api_key else "")
    )
    run_server(create_app(served.retrievers, settings, generators=served.generators), sock, settings)


@app.command("toy-images")
@friendly_errors
def toy_images(
    out: Annotated[Path, typer.Argument(help="Folder to write PNGs and captions.tsv into.")],
    n: Annotated[int, typer.Option("-n", min=1, help="How many images.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    lang: Annotated[
        str,
        typer.Option(
            help="Caption language: en (for toyworld) or zh (for toyworld-zh, e.g. 左边有一个大的红色五角星)."
        ),
    ] = "en",
) -> None:
    """Write toy-world images (the world the bundled model knows) with a captions.tsv.

    Example: retriever toy-images demo/ -n 4   (Chinese captions: --lang zh)
    """
    from retriever.models import toyworld

    if lang not in toyworld.LANGS:
        raise typer.BadParameter(f"use one of {', '.join(toyworld.LANGS)}", param_hint="--lang")
    out.mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i, (image, caption) in enumerate(toyworld.sample(n, seed=seed, lang=lang)):
        name = f"{i:04d}_{caption.replace(' ', '_')}.png"
        image.save(out / name)
        lines.append(f"{name}\t{caption}")
    (out / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    stderr(f"wrote {n} images and captions.tsv to {out}")
