"""Distributed builds (--engine ray) on a real local Ray cluster, with the bundled toy model.

One Ray session serves the whole module (starting one costs seconds on a small machine); the
CLI tests join it by its address, as a user joins a `ray start --head` cluster.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from retriever.index.build import build_index
from retriever.index.store import read_index
from retriever.index.verify import verify_index


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def ivf_corpus(tmp_path_factory):
    """2,000 distinct toy-world captions (enough for a 32-list IVF), one per line."""
    from retriever.models import toyworld

    rng = random.Random(0)
    scenes = toyworld.all_scenes()
    words = "bright dark tiny huge shiny matte old new".split()
    texts: set[str] = set()
    while len(texts) < 2000:
        texts.add(f"{rng.choice(words)} {rng.choice(scenes).caption} {rng.randint(0, 99)}")
    path = tmp_path_factory.mktemp("ivf") / "captions.txt"
    path.write_text("\n".join(sorted(texts)) + "\n")
    return path


def _ray(workers=2):
    from retriever.index.distributed import RayOptions

    return RayOptions(workers=workers)


def _same_index(a, b, vectors_equal=True):
    A, B = read_index(a), read_index(b)
    assert A.texts.to_pylist() == B.texts.to_pylist()
    va, vb = (np.load(p / "vectors.f16.npy").astype(np.float32) for p in (a, b))
    assert va.shape == vb.shape
    assert np.abs(va - vb).max() <= 1e-3  # fp16 rounding; identical on one machine in practice
    xq = np.random.default_rng(0).normal(size=(40, A.faiss_index.d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return A, B, xq


def test_merged_on_disk_ivf_answers_like_the_in_memory_one(toy_model, ivf_corpus, tmp_path, ray_cluster):
    import faiss

    local = build_index(
        ivf_corpus, tmp_path / "local", toy_model, chunk_size=300, index_type="ivf", show_progress_bar=False
    )
    result = build_index(
        ivf_corpus,
        tmp_path / "ray",
        toy_model,
        chunk_size=300,
        index_type="ivf",
        show_progress_bar=False,
        engine="ray",
        ray=_ray(),
    )
    A, B, xq = _same_index(result.path, local.path)
    assert A.manifest["format_version"] == 2 and "index.ivfdata" in A.manifest["files"]
    assert not B.manifest.get("files", {}).get("index.ivfdata")
    invlists = faiss.extract_index_ivf(A.faiss_index).invlists
    assert "OnDisk" in type(faiss.downcast_InvertedLists(invlists)).__name__  # served from the mapped file
    assert A.manifest["search_params"] == B.manifest["search_params"]
    for nprobe in (A.manifest["search_params"]["nprobe"], faiss.extract_index_ivf(A.faiss_index).nlist):
        for index in (A, B):
            faiss.extract_index_ivf(index.faiss_index).nprobe = nprobe
        (Da, Ia), (Db, Ib) = A.search(xq, 10), B.search(xq, 10)
        assert np.array_equal(Ia, Ib) and np.allclose(Da, Db, atol=1e-5)
    verify_index(result.path)  # the manifest's SHA-256 covers index.ivfdata too

    moved = tmp_path / "moved"  # the lists are found beside index.faiss, wherever the index goes
    os.rename(result.path, moved)
    B = read_index(local.path)
    assert np.array_equal(read_index(moved).search(xq, 10)[1], B.search(xq, 10)[1])
    with open(moved / "index.ivfdata", "r+b") as f:
        f.truncate(100)
    with pytest.raises(Exception, match="index.ivfdata is 100 bytes"):
        read_index(moved)


@pytest.fixture(scope="module")
def local_toy(toy_model, toy_corpus, tmp_path_factory):
    """The single-process build every distributed one must equal."""
    return build_index(
        toy_corpus, tmp_path_factory.mktemp("local") / "toy", toy_model, chunk_size=64, show_progress_bar=False
    )


def test_ray_build_matches_the_local_one_after_a_killed_worker(
    toy_model, toy_corpus, local_toy, tmp_path, ray_cluster, monkeypatch
):
    marker = tmp_path / "killed"
    monkeypatch.setenv("RETRIEVER_TEST_KILL_WORKER", f"2:{marker}")  # SIGKILL, mid-shard, once
    result = build_index(
        toy_corpus, tmp_path / "ray", toy_model, chunk_size=64, show_progress_bar=False, engine="ray", ray=_ray()
    )
    assert int(marker.read_text()) != os.getpid()  # a real worker process died (Ray restarted it)
    from retriever.index.distributed import last_timings

    assert last_timings["parts"] == 5  # the actors read the corpus in parts (257 lines, 64 per chunk)
    assert result.embedded == 256 and result.report.as_dict() == local_toy.report.as_dict()
    A, B, xq = _same_index(result.path, local_toy.path)
    assert A.manifest["build"]["engine"] == "ray" and A.manifest["build"]["shards"] == 4
    assert np.array_equal(A.search(xq, 10)[1], B.search(xq, 10)[1])
    assert not (tmp_path / ".ray.building").exists()


def test_a_worker_with_other_weights_is_a_one_line_error(toy_model, toy_corpus, tmp_path, ray_cluster):
    import dataclasses

    from retriever.errors import RetrieverError

    driver = dataclasses.replace(toy_model, fingerprint="sha256:" + "0" * 64)  # as if the nodes' weights differed
    with pytest.raises(RetrieverError) as caught:
        build_index(
            toy_corpus,
            tmp_path / "idx",
            driver,
            chunk_size=64,
            show_progress_bar=False,
            engine="ray",
            ray=_ray(workers=1),
        )
    message = str(caught.value)
    assert "install the same weights on every node" in message and "\n" not in message
    assert not (tmp_path / "idx").exists()


def _cli(*args, env=None, address=None):
    command = [
        sys.executable,
        "-m",
        "retriever",
        "build-index",
        *args,
        "--model",
        "toyworld",
        "--engine",
        "ray",
        "--workers",
        "2",
        "--json",
        "-q",
    ]
    if address:
        command += ["--ray-address", address]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_a_killed_driver_resumes_on_an_existing_cluster(toy_corpus, local_toy, tmp_path, ray_cluster):
    out = tmp_path / "idx"
    args = (str(toy_corpus), "--out", str(out), "--chunk-size", "64")
    killed = _cli(*args, env={"RETRIEVER_TEST_KILL_DRIVER": "2"}, address=ray_cluster)
    assert killed.returncode == -9, killed.stderr[-2000:]
    finished = sorted(p.name for p in (tmp_path / ".idx.building").glob("emb-*.npy"))
    assert len(finished) >= 2 and not out.exists()

    resumed = _cli(*args, address=ray_cluster)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    summary = json.loads(resumed.stdout)  # faiss's own printing stays off stdout
    assert summary["resumed_shards"] >= len(finished) and summary["embedded"] == 256 - 64 * summary["resumed_shards"]
    _same_index(out, local_toy.path)


@pytest.mark.slow
def test_a_ray_start_head_cluster_is_reached_by_address(toy_corpus, tmp_path, ray_cluster):
    """A second cluster started by `ray start --head --block` (stopped by its pid, never `ray stop`,
    which would stop every Ray on the machine)."""
    import shutil
    import socket
    import time

    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    if ray_bin is None:
        pytest.skip("no ray command beside this Python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        result = None
        while time.monotonic() < deadline:
            result = _cli(str(toy_corpus), "--out", str(tmp_path / "idx"), "--index-type", "flat", address=address)
            if result.returncode == 0 or "reach the Ray cluster" not in result.stderr:
                break
            time.sleep(2)  # the head is still starting
        assert result is not None and result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout)["kept"] == 256
    finally:
        os.killpg(head.pid, 15)
        head.wait(timeout=60)
        current = "/tmp/ray/ray_current_cluster"  # left pointing at the stopped head: ours to remove
        if os.path.exists(current):
            with open(current) as f:
                ours = f.read().strip().endswith(f":{port}")
            if ours:
                os.remove(current)


def test_without_ray_the_error_is_one_line_naming_the_extra(run, toy_corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    result = run(
        "build-index", str(toy_corpus), "--model", "toyworld", "--out", str(tmp_path / "idx"), "--engine", "ray"
    )
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert "retriever[ray]" in message and len(message.splitlines()) == 1 and "Traceback" not in message


def test_an_unreachable_cluster_is_one_line(run, toy_corpus, tmp_path):
    import socket

    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run(
        "build-index",
        str(toy_corpus),
        "--model",
        "toyworld",
        "--out",
        str(tmp_path / "idx"),
        "--engine",
        "ray",
        "--ray-address",
        f"127.0.0.1:{port}",
    )
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]


def test_ray_options_need_the_ray_engine(run, toy_corpus, tmp_path):
    result = run(
        "build-index", str(toy_corpus), "--model", "toyworld", "--out", str(tmp_path / "idx"), "--workers", "2"
    )
    assert result.exit_code == 1 and "--engine ray" in result.stderr and "Traceback" not in result.stderr


def test_ray_is_imported_only_by_the_ray_engine():
    code = "import sys, retriever.index.build, retriever.index.distributed, retriever.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
