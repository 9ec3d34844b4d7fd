#!/usr/bin/env python
"""Everything that runs on a GPU, run once and printed as one table (bench/gpu_check.sh runs this).

Rows: text and image encoding in fp16 and bf16 against fp32 (cosine of the vectors); faiss-gpu
flat and IVF-PQ indexes built, placed by retriever (retriever/index/gpu.py) and searched at k=10
and k=5,000 (above faiss-gpu's k limit: answered on the CPU), compared with the CPU index; CoCa
caption generation (greedy and beam search, same tokens as on the CPU); 20 fine-tuning steps
with amp; the HTTP server answering 100 queries; and B1 (build throughput), B2 (query latency)
and B5 (generation) at GPU batch sizes.

Without a CUDA GPU (torch or faiss) it stops at once, saying which is missing, unless run with
`--device cpu --quick`: the same code paths on tiny sizes, for tests (tests/test_gpu_check.py).

    bash bench/gpu_check.sh                      # on a GPU machine, < 8 minutes
    python bench/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

ROWS: list[tuple[str, str, str, bool]] = []  # (check, result, seconds, ok)


def row(check: str):
    """Run a check; a failure is a FAIL row with its one-line reason, and the rest still run."""

    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                result, ok = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every failure is a row, then the next check runs
                reason = " ".join(str(e).split())[:200] or type(e).__name__
                result, ok = f"FAIL: {type(e).__name__}: {reason}", False
                traceback.print_exc(file=sys.stderr)
            ROWS.append((check, result, f"{time.perf_counter() - start:.1f}", ok))
            print(f"[gpu_check] {check}: {result}", file=sys.stderr, flush=True)

        return run

    return wrap


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def require_gpu() -> str | None:
    """Why this machine cannot run the GPU checks, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (
            f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False; "
            f"CUDA build: {torch.version.cuda or 'none, a CPU-only torch'})"
        )
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "faiss is not installed: pip install 'caption-retriever[gpu]' (faiss-gpu-cu12)"
    return None


def faiss_without_gpu() -> str | None:
    """Why faiss cannot use the GPU, or None. The faiss rows then fail saying so; the torch rows still run."""
    import faiss

    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return (
            f"faiss {getattr(faiss, '__version__', '?')} has no GPU (faiss-cpu, or faiss-gpu without its CUDA "
            "runtime); pip uninstall faiss-cpu && pip install 'caption-retriever[gpu]'"
        )
    return None


def models(device: str, quick: bool):
    from common import random_model

    from retriever.models.loading import load_model

    if quick:
        return load_model("toyworld", device=device)
    loaded = random_model("ViT-B-32")
    loaded.model.to(device)
    loaded.device = device
    return loaded


def toy_images(n: int, seed: int = 0):
    import numpy as np

    from retriever.models import toyworld

    rng = np.random.default_rng(seed)
    scenes = toyworld.all_scenes()
    picked = [scenes[i] for i in rng.integers(len(scenes), size=n)]
    return [toyworld.render(s, seed=int(rng.integers(2**31))) for s in picked], [s.caption for s in picked]


@row("encode texts and images, fp16 / bf16 vs fp32")
def check_precision(loaded, texts, images, device, batch):
    """The model cast to each dtype, as `--precision` does (load_model), through retriever's Encoder;
    each timed after a warm-up batch, so the rates are the encoder's and not CUDA's start-up."""
    import torch

    from retriever.models.encoder import Encoder

    fp32_state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    out, parts = {}, []
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        loaded.model.load_state_dict(fp32_state)
        loaded.model.to(dtype=dtype)
        enc = Encoder(loaded)
        enc.encode_text(texts[:batch], batch_size=batch, show_progress_bar=False)
        enc.encode_image(images[:8], batch_size=batch, show_progress_bar=False)
        sync(device)
        start = time.perf_counter()
        t = enc.encode_text(texts, batch_size=batch, show_progress_bar=False)
        sync(device)
        middle = time.perf_counter()
        i = enc.encode_image(images, batch_size=batch, show_progress_bar=False)
        sync(device)
        out[name] = (t, i, len(texts) / (middle - start), len(images) / (time.perf_counter() - middle))
    loaded.model.load_state_dict(fp32_state)
    loaded.model.to(dtype=torch.float32)
    ok = True
    parts.append(f"fp32: {out['fp32'][2]:,.0f} texts/s, {out['fp32'][3]:,.0f} images/s")
    for name in ("fp16", "bf16"):
        cos_t = float((out[name][0] * out["fp32"][0]).sum(1).min())
        cos_i = float((out[name][1] * out["fp32"][1]).sum(1).min())
        ok &= bool(min(cos_t, cos_i) > 0.99)
        parts.append(
            f"{name}: min cosine texts {cos_t:.4f}, images {cos_i:.4f}; {out[name][2]:,.0f} texts/s, "
            f"{out[name][3]:,.0f} images/s"
        )
    return "; ".join(parts), ok


@row("faiss flat: place, search k=10 and k=5000")
def check_flat(n, d, device):
    return _check_faiss("Flat", n, d, device)


@row("faiss IVF-PQ: train, place, search k=10 and k=5000")
def check_ivfpq(n, d, nlist, m, device):
    return _check_faiss(f"IVF{nlist},PQ{m}x8", n, d, device)


def _check_faiss(factory, n, d, device):
    if device == "cuda" and (why := faiss_without_gpu()):
        raise RuntimeError(f"not run: {why}")
    from retriever.index.ann import exact_neighbors, recall_at_k
    from retriever.index.faiss_import import import_faiss
    from retriever.index.gpu import gpu_search, place, set_gpu_params, training_quantizer

    faiss = import_faiss()
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(n, 100, replace=False)] + 0.3 * rng.normal(size=(100, d)).astype(np.float32) / math.sqrt(d)
    xq = np.ascontiguousarray(xq / np.linalg.norm(xq, axis=1, keepdims=True), dtype=np.float32)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    start = time.perf_counter()
    if factory != "Flat":
        quantizer = training_quantizer(faiss, d)
        if quantizer is not None:
            faiss.extract_index_ivf(index).clustering_index = quantizer
        index.train(xb[: min(n, 100_000)])
    index.add(xb)
    params = {"nprobe": 64} if factory != "Flat" else {}
    if params:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", params["nprobe"])
    build_s = time.perf_counter() - start
    placement = place(faiss, index)
    set_gpu_params(faiss, placement, params)
    if device == "cuda" and not placement.on_gpu:
        return f"not placed on the GPU: {placement.reason}", False
    gt = exact_neighbors([xb], xq, 10)
    start = time.perf_counter()
    D, I = gpu_search(placement, index, xq, 10)
    search_s = time.perf_counter() - start
    D_cpu, I_cpu = index.search(xq, 10)
    big_k = min(5000, n)
    D5, I5 = gpu_search(placement, index, xq, big_k)  # above GPU_MAX_K: the CPU answers
    agree = recall_at_k(I, I_cpu, 10)
    recall = recall_at_k(I, gt, 10)
    ok = I5.shape == (100, big_k) and agree >= (0.999 if factory == "Flat" else 0.95) and bool((I5[:, :10] >= 0).all())
    where = "GPU" if placement.on_gpu else "CPU"
    return (
        f"{where} ({placement.reason}); n={n:,} d={d}; build {build_s:.1f} s; 100 queries k=10 in "
        f"{search_s * 1000:.1f} ms; recall@10 {recall:.3f}; same as CPU index {agree:.3f}; k={big_k} "
        f"gave {I5.shape[1]} ids"
    ), ok


@row("CoCa generation (toyworld-coca): greedy and beam x6, same tokens as on the CPU")
def check_coca(device, n_images, batch):
    from retriever.generate.captioner import Captioner
    from retriever.generate.decoding import DecodeOptions
    from retriever.models.loading import load_model

    images, captions = toy_images(n_images, seed=1)
    rows = []
    same = True
    cpu = Captioner(load_model("toyworld-coca", device="cpu"))
    dev = Captioner(load_model("toyworld-coca", device=device))
    for beams in (1, 6):
        opts = DecodeOptions(method="beam", beams=6) if beams > 1 else DecodeOptions(method="greedy")
        dev.caption(images[:2], opts)  # warm up
        sync(device)
        start = time.perf_counter()
        got = dev.caption(images, opts, batch_size=batch)
        sync(device)
        rate = len(images) / (time.perf_counter() - start)
        want = cpu.caption(images[:4], opts)
        same &= got[:4] == want
        exact = sum(g == c for g, c in zip(got, captions)) / len(captions)
        rows.append(
            f"{'greedy' if beams == 1 else 'beam x6'} {rate:.1f} captions/s at batch {batch}, exact {exact:.2f}"
        )
    return "; ".join(rows) + f"; same as CPU: {same}", same


@row("fine-tune toyworld, 20 steps, amp")
def check_finetune(device, batch, steps):
    from retriever.train.finetune import TrainOptions, finetune

    with tempfile.TemporaryDirectory() as tmp:
        images, captions = toy_images(batch * steps, seed=2)
        lines = ["filepath\ttitle"]
        for i, (im, cap) in enumerate(zip(images, captions)):
            im.save(Path(tmp) / f"{i}.png")
            lines.append(f"{i}.png\t{cap}")
        (Path(tmp) / "pairs.tsv").write_text("\n".join(lines) + "\n")
        losses = []
        opts = TrainOptions(
            epochs=1,
            batch_size=batch,
            lr=1e-5,
            precision="amp" if device == "cuda" else "fp32",
            workers=2,
            eval_images=8,
        )
        result = finetune(
            Path(tmp) / "pairs.tsv",
            Path(tmp) / "out",
            "toyworld",
            options=opts,
            device=device,
            show_progress_bar=False,
            on_event=lambda kind, info: losses.append(info.get("loss")) if kind == "step" else None,
        )
    losses = [x for x in losses if x is not None]
    ok = len(losses) == steps and all(math.isfinite(x) for x in losses)
    few = max(1, len(losses) // 4)  # one batch's loss swings with how many captions it repeats
    return (
        f"{len(losses)} steps, precision {opts.precision}, mean loss of the first {few} steps "
        f"{np.mean(losses[:few]):.4f}, of the last {few} {np.mean(losses[-few:]):.4f}"
        if losses
        else f"no steps ran ({result})",
        ok,
    )


@row("serve: 100 queries over HTTP")
def check_serve(index_dir, device, n_queries):
    import io

    from fastapi.testclient import TestClient

    from retriever.search.api import Retriever
    from retriever.serve.app import create_app

    client = TestClient(create_app({"toy": Retriever.open(index_dir, device=device)}), base_url="http://127.0.0.1")
    images, captions = toy_images(n_queries, seed=3)
    latencies, errors, right = [], 0, 0
    for im, cap in zip(images, captions):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        start = time.perf_counter()
        r = client.post("/v1/query", files={"image": ("q.png", buf.getvalue(), "image/png")}, data={"k": "5"})
        latencies.append(time.perf_counter() - start)
        if r.status_code != 200:
            errors += 1
            continue
        hits = r.json().get("hits") or r.json().get("results") or []
        right += bool(hits) and hits[0].get("text") == cap
    p50, p95 = np.percentile(latencies, [50, 95]) * 1000
    return (
        f"{n_queries} queries, {errors} errors, top-1 right {right}/{n_queries}, p50 {p50:.1f} ms, p95 {p95:.1f} ms",
        errors == 0,
    )


@row("B1: build throughput, fp32 and fp16")
def check_b1(loaded, texts, device, batch):
    import torch

    from retriever.index.build import build_index

    rates = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        loaded.model.to(dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.txt"
            corpus.write_text("\n".join(texts) + "\n")
            sync(device)
            start = time.perf_counter()
            result = build_index(
                corpus, Path(tmp) / "index", loaded, batch_size=batch, index_type="flat", show_progress_bar=False
            )
            sync(device)
            rates[name] = result.report.kept / (time.perf_counter() - start)
    loaded.model.to(dtype=torch.float32)
    return (
        f"{loaded.spec.name}, {result.report.kept:,} texts, batch {batch}: "
        + ", ".join(f"{name} {rate:,.0f} texts/s" for name, rate in rates.items()),
        result.report.kept > 0,
    )


@row("B2: single-image query latency")
def check_b2(index_dir, device, n_queries):
    from retriever.search.api import Retriever

    r = Retriever.open(index_dir, device=device)
    images, _ = toy_images(n_queries + 3, seed=4)
    for im in images[:3]:
        r.query(im, k=10)
    latencies = []
    for im in images[3:]:
        sync(device)
        start = time.perf_counter()
        r.query(im, k=10)
        sync(device)
        latencies.append(time.perf_counter() - start)
    p50, p95 = np.percentile(latencies, [50, 95]) * 1000
    return f"{len(r.index):,} captions, placement: {r.index.placement.reason}; p50 {p50:.1f} ms, p95 {p95:.1f} ms", True


def toy_index(tmp: Path, device: str, n: int) -> Path:
    from retriever.index.build import build_index
    from retriever.models import toyworld
    from retriever.models.loading import load_model

    captions = toyworld.all_captions()
    corpus = tmp / "toy.txt"
    corpus.write_text("\n".join(captions + [f"{captions[i % len(captions)]} #{i}" for i in range(n)]) + "\n")
    return build_index(corpus, tmp / "toy-index", load_model("toyworld", device=device), show_progress_bar=False).path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (with --device cpu: a dry run for tests)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        why = require_gpu()
        if why:
            print(
                f"gpu_check: cannot run: {why}. (For a dry run of the same code on the CPU: "
                "python bench/gpu_check.py --device cpu --quick)",
                file=sys.stderr,
            )
            return 2
    import torch

    torch.manual_seed(0)
    quick, device = args.quick, args.device
    from common import flavors

    try:
        texts = flavors()[: 2000 if quick else 50_000]
    except Exception:  # clip-interrogator missing: synthetic texts
        texts = [f"a photo number {i}" for i in range(2000 if quick else 50_000)]
    loaded = models(device, quick)
    images, _ = toy_images(16 if quick else 512)
    batch = 64 if quick else 1024
    start = time.perf_counter()
    check_precision(loaded, texts[: 200 if quick else 20_000], images, device, batch)
    check_flat(6_000 if quick else 1_000_000, 64 if quick else 512, device)
    check_ivfpq(5_000 if quick else 1_000_000, 64 if quick else 512, 16 if quick else 4096, 8 if quick else 64, device)
    check_coca(device, 8 if quick else 256, 8 if quick else 64)
    check_finetune(device, 4 if quick else 32, 5 if quick else 20)
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = toy_index(Path(tmp), device, 500 if quick else 100_000)
        check_serve(index_dir, device, 10 if quick else 100)
        check_b2(index_dir, device, 5 if quick else 30)
    check_b1(loaded, texts, device, batch)
    import faiss

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(
        f"\n{name}, torch {torch.__version__} (CUDA {torch.version.cuda}), faiss {faiss.__version__}, "
        f"{time.perf_counter() - start:.0f} s in all\n"
    )
    print("| check | result | s | ok |")
    print("| --- | --- | --- | --- |")
    for check, result, seconds, ok in ROWS:
        print(f"| {check} | {result} | {seconds} | {'yes' if ok else 'NO'} |")
    failed = [r for r in ROWS if not r[3]]
    if failed:
        print(
            f"\ngpu_check: {len(failed)} of {len(ROWS)} checks failed: {', '.join(r[0] for r in failed)}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
