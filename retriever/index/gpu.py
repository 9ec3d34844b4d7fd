"""Putting a FAISS index on the GPU only where faiss-gpu can hold and search it.

faiss-gpu has GPU forms of flat and IVF indexes (IVF-Flat, IVF-SQ, IVF-PQ), not of HNSW (CAGRA
is a different graph, built on the GPU from the vectors: not a copy of an HNSW index). Its
k-selection stops at `GPU_MAX_K` (2,048 in current releases), for k and for nprobe alike. IVF-PQ
scans with a lookup table of M x 2^nbits distances in shared memory (48 KiB): in float32 that
holds at most 48 one-byte sub-quantizers, so 56- and 64-byte codes need float16 tables.

`place` clones what fits (and says why not otherwise); the CPU index is kept beside the GPU
copy, and `search` uses the CPU one for what the GPU cannot do: k or nprobe above the limit, or
search parameters (id selectors for --where) that GPU indexes do not take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GPU_MAX_K = 2048  # faiss/gpu/utils/DeviceDefs.cuh GPU_MAX_SELECTION_K
SHARED_MEMORY = 48 * 1024  # bytes of shared memory per block that every CUDA GPU faiss supports has


@dataclass
class Placement:
    """Where an index searches: `gpu` (the GPU copy, or None) and why, for `info` and logs."""

    gpu: Any = None
    reason: str = "faiss has no GPU"
    float16_lookup: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None


def gpu_count(faiss: Any) -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except RuntimeError:
        return 0


def describe(faiss: Any, index: Any) -> tuple[str, dict]:
    """The kind of a CPU index ('flat', 'ivf', 'ivfpq', 'hnsw', 'other') and what matters for the GPU."""
    index = faiss.downcast_index(index)
    name = type(index).__name__
    if name.startswith("IndexFlat"):
        return "flat", {}
    if name.startswith("IndexHNSW"):
        return "hnsw", {}
    if name == "IndexIVFPQ":
        return "ivfpq", {"M": int(index.pq.M), "nbits": int(index.pq.nbits), "nprobe": int(index.nprobe)}
    if name in ("IndexIVFFlat", "IndexIVFScalarQuantizer"):
        return "ivf", {"nprobe": int(index.nprobe)}
    return "other", {"class": name}


def needs_float16_lookup(M: int, nbits: int) -> bool:
    """Whether IVF-PQ's float32 lookup table (M x 2^nbits floats) is too big for shared memory."""
    return M * (1 << nbits) * 4 > SHARED_MEMORY


def plan_placement(faiss: Any, index: Any) -> tuple[bool, str, bool]:
    """(can go to the GPU, why, needs float16 lookup tables) for a CPU index, without moving it."""
    if gpu_count(faiss) == 0:
        return False, "faiss has no GPU", False
    kind, info = describe(faiss, index)
    if kind == "hnsw":
        return False, "HNSW has no faiss-gpu form; searching on the CPU", False
    if kind == "other":
        return False, f"{info['class']} has no faiss-gpu form; searching on the CPU", False
    if info.get("nprobe", 1) > GPU_MAX_K:
        return False, f"nprobe {info['nprobe']} is above faiss-gpu's limit of {GPU_MAX_K}; searching on the CPU", False
    fp16 = kind == "ivfpq" and needs_float16_lookup(info["M"], info["nbits"])
    return True, f"{kind} on {gpu_count(faiss)} GPU(s)" + (", float16 lookup tables" if fp16 else ""), fp16


def place(faiss: Any, index: Any) -> Placement:
    """A GPU copy of `index` where faiss-gpu supports it (see the module docstring), else why not."""
    ok, reason, fp16 = plan_placement(faiss, index)
    if not ok:
        return Placement(None, reason)
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16LookupTables = fp16
    options.shard = False  # each GPU holds the whole index (replicas): the fastest search
    try:
        gpu = faiss.index_cpu_to_all_gpus(index, co=options)
    except (RuntimeError, MemoryError) as e:  # out of GPU memory, an unsupported layout
        why = " ".join(str(e).split()).rsplit("Error: ", 1)[-1][:160]
        return Placement(None, f"faiss-gpu refused this index ({why}); searching on the CPU")
    return Placement(gpu, reason, fp16)


def gpu_search(placement: Placement, cpu: Any, xq: Any, k: int, params: Any = None) -> tuple[Any, Any]:
    """Search on the GPU copy when it can answer, else on the CPU index."""
    if placement.gpu is not None and k <= GPU_MAX_K and params is None:
        return placement.gpu.search(xq, k)
    if params is not None:
        return cpu.search(xq, k, params=params)
    return cpu.search(xq, k)


def set_gpu_params(faiss: Any, placement: Placement, params: dict) -> None:
    """Set tuned search parameters (nprobe) on the GPU copy too."""
    if placement.gpu is None or not params:
        return
    space = faiss.GpuParameterSpace()
    from retriever.index.ann import faiss_params

    for name, value in faiss_params(params).items():
        space.set_index_parameter(placement.gpu, name, value)


def training_quantizer(faiss: Any, d: int) -> Any | None:
    """A GPU flat index for IVF's k-means (training only ever needs a flat one), or None."""
    if gpu_count(faiss) == 0:
        return None
    try:
        return faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(d))
    except (RuntimeError, MemoryError):
        return None
