"""A stand-in for faiss-gpu on machines without a GPU: real faiss (CPU) plus faiss-gpu's limits.

`FakeFaissGpu()` is a module-like object to put in `sys.modules["faiss"]`. Everything is the
real faiss except the GPU API, which behaves as faiss-gpu's does where it matters:

- `index_cpu_to_gpu` / `index_cpu_to_all_gpus` refuse HNSW and other index types without a GPU
  form (RuntimeError, as faiss-gpu raises), and refuse IVF-PQ whose float32 lookup table
  (M x 2^nbits x 4 bytes) exceeds 48 KiB of shared memory unless `useFloat16LookupTables`;
- a GPU index's search refuses k above 2,048 and nprobe above 2,048, and takes no search
  parameters (id selectors);
- GPU indexes answer like the CPU index they were cloned from (a copy searched on the CPU).

It records what was cloned (`.cloned`) and searched (`.gpu_searches`) for tests to check.
"""

from __future__ import annotations

import types

import faiss as real_faiss

GPU_MAX_K = 2048


class FakeGpuIndex:
    """A 'GPU' index: a CPU copy with faiss-gpu's search limits."""

    def __init__(self, owner: FakeFaissGpu, cpu_index, kind: str, float16_lookup: bool):
        self._owner = owner
        self.index = real_faiss.clone_index(cpu_index)
        self.kind = kind
        self.float16_lookup = float16_lookup
        self.d, self.ntotal, self.metric_type = cpu_index.d, cpu_index.ntotal, cpu_index.metric_type

    def search(self, xq, k, params=None, **_):
        if params is not None:
            raise RuntimeError("Error in faiss::gpu::GpuIndex::search: search params not supported for GPU indexes")
        if k > GPU_MAX_K:
            raise RuntimeError(f"Error in faiss::gpu::GpuIndex::search: k must be <= {GPU_MAX_K} (got {k})")
        ivf = real_faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.nprobe > GPU_MAX_K:
            raise RuntimeError(f"Error: nprobe must be <= {GPU_MAX_K}")
        self._owner.gpu_searches.append(k)
        return self.index.search(xq, k)


class GpuParameterSpace:
    def set_index_parameter(self, index, name, value):
        if not isinstance(index, FakeGpuIndex):
            raise RuntimeError("GpuParameterSpace: not a GPU index")
        real_faiss.ParameterSpace().set_index_parameter(index.index, name, value)


class GpuMultipleClonerOptions:
    def __init__(self):
        self.useFloat16 = False
        self.useFloat16LookupTables = False
        self.usePrecomputed = False
        self.shard = False


class FakeFaissGpu(types.ModuleType):
    """The faiss module as faiss-gpu with `ngpu` GPUs would look to the code under test."""

    def __init__(self, ngpu: int = 1):
        super().__init__("faiss")
        self.ngpu = ngpu
        self.cloned: list[FakeGpuIndex] = []
        self.refused: list[str] = []
        self.gpu_searches: list[int] = []
        self.GpuParameterSpace = GpuParameterSpace
        self.GpuMultipleClonerOptions = GpuMultipleClonerOptions
        self.GpuClonerOptions = GpuMultipleClonerOptions

    def __getattr__(self, name):
        return getattr(real_faiss, name)

    def get_num_gpus(self) -> int:
        return self.ngpu

    def StandardGpuResources(self):
        return object()

    def index_cpu_to_gpu(self, resources, device, index, co=None):
        return self.index_cpu_to_all_gpus(index, co=co)

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        original, index = index, real_faiss.downcast_index(index)  # the wrapper does not own: keep the original
        name = type(index).__name__
        fp16 = bool(co is not None and co.useFloat16LookupTables)
        if name.startswith("IndexFlat"):
            kind = "flat"
        elif name in ("IndexIVFFlat", "IndexIVFScalarQuantizer"):
            kind = "ivf"
        elif name == "IndexIVFPQ":
            kind = "ivfpq"
            needed = index.pq.M * (1 << index.pq.nbits) * (2 if fp16 else 4)
            if needed > 48 * 1024:
                self.refused.append(name)
                raise RuntimeError(
                    f"Error in faiss::gpu::GpuIndexIVFPQ::verifySettings_: Device 0 has 49152 bytes "
                    f"of shared memory, while 8 bits per code and {index.pq.M} sub-quantizers requires "
                    f"{needed} bytes. Consider useFloat16LookupTables and/or reduce parameters"
                )
        else:
            self.refused.append(name)
            raise RuntimeError(
                f"Error in faiss::gpu::index_cpu_to_gpu: This index type is not implemented on GPU ({name})"
            )
        gpu = FakeGpuIndex(self, original, kind, fp16)
        self.cloned.append(gpu)
        return gpu
