"""GPU placement through a fake faiss-gpu (tests/index/fake_faiss_gpu.py) with faiss-gpu's limits:
only flat and IVF go to the GPU, IVF-PQ with 64-byte codes gets float16 lookup tables, HNSW
stays on the CPU, and k above 2,048 or an id selector searches on the CPU."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_faiss_gpu import FakeFaissGpu  # noqa: E402

from retriever.index import gpu  # noqa: E402
from retriever.index.build import build_index  # noqa: E402
from retriever.index.store import read_index  # noqa: E402
from retriever.models import toyworld  # noqa: E402

N = 2600  # above faiss-gpu's k limit, so that k = N must be answered on the CPU


@pytest.fixture(scope="module")
def built(tmp_path_factory, toy_model):
    """One index of each type over the same N toy captions (real faiss): a flat one built by
    build_index, the others from its stored vectors, written by write_index (small lists,
    no tuning: quick)."""
    import faiss
    import pyarrow.parquet as pq

    from retriever.index.store import read_manifest, write_index

    root = tmp_path_factory.mktemp("gpu")
    captions = toyworld.all_captions()
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"{captions[i % len(captions)]} number {i}\n" for i in range(N)))
    flat = build_index(corpus, root / "flat", toy_model, index_type="flat", show_progress_bar=False).path
    xb = np.load(flat / "vectors.f16.npy").astype(np.float32)
    texts = pq.read_table(flat / "texts.parquet")
    out = {"flat": flat}
    for kind, factory, params in (
        ("ivf", "IVF16,Flat", {"nprobe": 4}),
        ("hnsw", "HNSW16,Flat", {"efSearch": 32}),
        ("ivfpq", "IVF16,PQ64x8", {"nprobe": 4}),
    ):
        index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        index.train(xb)
        index.add(xb)
        manifest = {**read_manifest(flat), "index_type": kind, "faiss_factory": factory, "search_params": params}
        out[kind] = write_index(root / kind, index, [texts], texts.schema, manifest, vectors=[xb])
    return out


@pytest.fixture
def fake(monkeypatch):
    fake = FakeFaissGpu()
    monkeypatch.setitem(sys.modules, "faiss", fake)
    return fake


def queries(n=5, d=128, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_fake_has_faiss_gpus_limits(built, fake):
    import faiss

    hnsw = faiss.read_index(str(built["hnsw"] / "index.faiss"))
    with pytest.raises(RuntimeError, match="not implemented on GPU"):
        fake.index_cpu_to_all_gpus(hnsw)
    ivfpq = faiss.read_index(str(built["ivfpq"] / "index.faiss"))
    assert faiss.downcast_index(ivfpq).pq.M == 64
    with pytest.raises(RuntimeError, match="useFloat16LookupTables"):
        fake.index_cpu_to_all_gpus(ivfpq)
    flat = fake.index_cpu_to_all_gpus(faiss.read_index(str(built["flat"] / "index.faiss")))
    with pytest.raises(RuntimeError, match="k must be <= 2048"):
        flat.search(queries(), 2049)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_flat_and_ivf_go_to_the_gpu_and_answer_like_the_cpu(built, kind, monkeypatch):
    cpu = read_index(built[kind], use_gpu=False)
    D_cpu, I_cpu = cpu.search(queries(), 10)
    fake = FakeFaissGpu()
    monkeypatch.setitem(sys.modules, "faiss", fake)
    index = read_index(built[kind])
    assert index.placement.on_gpu, index.placement.reason
    assert index.placement.float16_lookup == (kind == "ivfpq")  # 64 one-byte codes: 64 KiB of float32
    assert len(fake.cloned) == 1 and not fake.refused
    if kind != "flat":  # the tuned nprobe reaches the GPU copy too
        assert fake.cloned[0].index.nprobe == index.manifest["search_params"]["nprobe"]
    D, I = index.search(queries(), 10)
    assert fake.gpu_searches == [10]
    assert np.array_equal(I, I_cpu) and np.allclose(D, D_cpu)


def test_hnsw_stays_on_the_cpu(built, fake):
    index = read_index(built["hnsw"])
    assert not index.placement.on_gpu and "HNSW" in index.placement.reason
    assert not fake.cloned and not fake.refused  # never even tried
    D, I = index.search(queries(), 10)
    assert I.shape == (5, 10) and not fake.gpu_searches


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_k_above_the_gpu_limit_searches_on_the_cpu(built, kind, fake):
    index = read_index(built[kind])
    assert index.placement.on_gpu
    D, I = index.search(queries(2), N)
    assert I.shape == (2, N) and not fake.gpu_searches
    D2, I2 = index.search(queries(2), 2048)
    assert fake.gpu_searches == [2048]
    assert np.array_equal(I2, I[:, :2048])


def test_k_above_the_gpu_limit_through_the_retriever(built, fake):
    from retriever.search.api import Retriever

    r = Retriever.open(built["flat"])
    hits = r.query_text("a large red star on the left", k=N)
    assert len(hits) == N and not fake.gpu_searches
    assert len(r.query_text("a large red star on the left", k=5)) == 5 and fake.gpu_searches


def test_id_selectors_search_on_the_cpu(built, fake):
    from retriever.index.faiss_import import import_faiss

    faiss = import_faiss()
    index = read_index(built["ivf"])
    mask = np.zeros(N, dtype=bool)
    mask[::7] = True
    bits = np.packbits(mask, bitorder="little")
    params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBitmap(N, faiss.swig_ptr(bits)), nprobe=64)
    D, I = index.faiss_search(queries(), 10, params=params)
    assert not fake.gpu_searches and (I[I >= 0] % 7 == 0).all()


def test_use_gpu_false_memory_mapped_and_big_nprobe_stay_on_the_cpu(built, fake):
    assert not read_index(built["flat"], use_gpu=False).placement.on_gpu
    assert not read_index(built["ivf"], mmap=True).placement.on_gpu
    import faiss

    ivf = faiss.read_index(str(built["ivf"] / "index.faiss"))
    faiss.extract_index_ivf(ivf).nprobe = 4096
    ok, reason, _ = gpu.plan_placement(faiss, ivf)
    assert not ok and "nprobe 4096" in reason
    assert not fake.cloned


def test_without_gpus_nothing_moves(built, monkeypatch):
    fake = FakeFaissGpu(ngpu=0)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    index = read_index(built["flat"])
    assert not index.placement.on_gpu and index.placement.reason == "faiss has no GPU"
    assert not fake.cloned
