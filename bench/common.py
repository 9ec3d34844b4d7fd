"""Shared helpers for the benchmarks: random-weight full-size models, corpora, timing."""

from __future__ import annotations

import platform
import time

import numpy as np


def machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def random_model(name: str = "ViT-B-32", seed: int = 0):
    """A full-size open_clip model with random weights (the real FLOPs), wrapped for the encoder."""
    import open_clip
    import torch

    from retriever.models.loading import ModelSpec, wrap_model

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return wrap_model(
        ModelSpec(name, "random"), model, preprocess, open_clip.get_tokenizer(name), f"{name}/random-{seed}", "cpu"
    )


def flavors() -> list[str]:
    """clip-interrogator's 100,970 flavor phrases (its package data; its code is not imported)."""
    from retriever.prompts.label_tables import builtin_labels

    return builtin_labels("flavors")


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """`n` short captions (~10 tokens): pairs of short flavor phrases, distinct up to rare repeats."""
    words = [w for w in flavors() if len(w.split()) <= 3]
    rng = np.random.default_rng(seed)
    a, b = rng.integers(len(words), size=n), rng.integers(len(words), size=n)
    return [f"{words[i]}, {words[j]}" for i, j in zip(a, b)]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matrix-multiply rate of this machine with torch's current threads, GFLOP/s (best of repeats)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(torch.mm, a, b)[1] for _ in range(repeats))
    return 2 * n**3 / best / 1e9
