#!/usr/bin/env python
"""B9: the overhead of `--engine ray` against the single-process build, on this machine.

Both build the same corpus (clip-interrogator's flavors, one per line) with the same model into
a flat index, so the difference is what Ray adds: starting actors (each imports torch and
loads the model), moving each chunk's texts through the object store, and writing shards from
another process. The Ray session is started once, before timing, as on a cluster that is
already up; actor start-up is timed apart, since it does not grow with the corpus.

    python bench/b9_ray.py --n 20000 --workers 2            # toy model: the worst case for overhead
    python bench/b9_ray.py --n 4000 --model ViT-B-32 --pretrained PATH.safetensors
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import flavors, machine

from retriever.index.build import build_index
from retriever.index.distributed import RayOptions, last_timings
from retriever.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="texts (of the 100,970 flavors)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="builds per engine (the best is reported)")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="b9-"))
    corpus = work / "flavors.txt"
    corpus.write_text("\n".join(flavors()[: args.n]) + "\n")
    model = load_model(args.model, args.pretrained, device="cpu")
    print(f"machine: {machine()}")
    t = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    print(f"ray.init (once per session, not timed below): {time.perf_counter() - t:.1f} s")
    options = RayOptions(workers=args.workers)

    def build(engine: str, i: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds of every process involved) of one build."""
        out = work / f"{engine}-{i}"
        cpu = time.process_time()
        result = build_index(
            corpus,
            out,
            model,
            chunk_size=args.chunk_size,
            index_type="flat",
            show_progress_bar=False,
            engine=engine,
            ray=options if engine == "ray" else None,
        )
        cpu = time.process_time() - cpu + (last_timings["workers_cpu_s"] if engine == "ray" else 0)
        shutil.rmtree(out)
        return result.seconds, cpu

    local = distributed = (float("inf"), float("inf"))
    startup = (0.0, 0.0)
    for i in range(args.repeats):  # alternating, so both engines see the same background load
        local = min(local, build("local", i))
        seconds = build("ray", i)
        if seconds < distributed:
            distributed, startup = seconds, (last_timings["actors_ready_s"], last_timings["actors_ready_cpu_s"])
    n = args.n
    print(f"model {args.model}, {n} texts, chunk {args.chunk_size}, {args.workers} workers, best of {args.repeats}")
    print("wall seconds depend on what else runs; CPU seconds (driver + workers, all threads) much less so")
    print(f"{'engine':<26}{'wall s':>8}{'vs local':>10}{'CPU s':>8}{'vs local':>10}{'texts/CPU-s':>13}")

    def row(name: str, wall: float, cpu: float) -> None:
        print(f"{name:<26}{wall:>8.1f}{wall / local[0]:>10.2f}{cpu:>8.1f}{cpu / local[1]:>10.2f}{n / cpu:>13.0f}")

    row("local (1 process)", *local)
    row("ray (all)", *distributed)
    row("ray less actor start-up", distributed[0] - startup[0], distributed[1] - startup[1])
    print(
        f"actor start-up inside that build (import torch, load the model; {args.workers} at once): "
        f"{startup[0]:.1f} s wall, {startup[1]:.1f} CPU-s"
    )
    shutil.rmtree(work)
    ray.shutdown()


if __name__ == "__main__":
    main()
