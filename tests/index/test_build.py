"""Streaming, sharded, resumable builds."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from retriever.index.build import build_index
from retriever.index.shards import ShardDir
from retriever.index.store import read_index


def _interrupt_after(monkeypatch, shards_written: int):
    original = ShardDir.write
    calls = {"n": 0}

    def write(self, number, vectors, table):
        if calls["n"] == shards_written:
            raise KeyboardInterrupt
        calls["n"] += 1
        original(self, number, vectors, table)

    monkeypatch.setattr(ShardDir, "write", write)


def test_resume_skips_finished_shards_and_matches_a_fresh_build(toy_model, toy_corpus, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        build_index(toy_corpus, tmp_path / "idx", toy_model, chunk_size=50, show_progress_bar=False)
    assert not (tmp_path / "idx").exists()
    monkeypatch.undo()

    resumed = build_index(toy_corpus, tmp_path / "idx", toy_model, chunk_size=50, show_progress_bar=False)
    assert resumed.resumed_shards == 2 and resumed.embedded == 256 - 100
    assert not (tmp_path / ".idx.building").exists()

    fresh = build_index(toy_corpus, tmp_path / "fresh", toy_model, chunk_size=50, show_progress_bar=False)
    a, b = read_index(resumed.path), read_index(fresh.path)
    assert a.texts.to_pylist() == b.texts.to_pylist()
    xq = np.eye(128, dtype=np.float32)[:5]
    assert np.array_equal(a.search(xq, 10)[1], b.search(xq, 10)[1])


def test_changed_corpus_discards_stale_shards(toy_model, toy_corpus, tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build_index(toy_corpus, tmp_path / "idx", toy_model, chunk_size=50, show_progress_bar=False)
    monkeypatch.undo()
    changed = tmp_path / "changed.txt"
    changed.write_text("a red star\na blue circle\n")
    result = build_index(changed, tmp_path / "idx", toy_model, chunk_size=50, show_progress_bar=False)
    assert result.resumed_shards == 0 and len(read_index(result.path)) == 2


def test_ids_metadata_and_reserved_columns_across_shards(toy_model, tmp_path):
    corpus = tmp_path / "c.jsonl"
    lines = [{"caption": f"caption number {i}", "id": f"user-{i}", "n": i} for i in range(120)]
    lines[70]["n"] = "seventy"  # a type change inside one shard
    corpus.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    index = read_index(build_index(corpus, tmp_path / "idx", toy_model, chunk_size=50, show_progress_bar=False).path)
    rows = index.rows([0, 70, 119])
    assert [r["id"] for r in rows] == [0, 70, 119]
    assert [r["corpus_id"] for r in rows] == ["user-0", "user-70", "user-119"]
    assert rows[1]["text"] == "caption number 70" and rows[1]["n"] == "seventy"


@pytest.mark.slow
def test_kill_9_mid_build_then_resume(toy_model, tmp_path):
    """A real SIGKILL while shards are being written; the rerun resumes and the index is whole."""
    corpus = tmp_path / "big.txt"
    words = ["red", "green", "blue", "small", "large", "star", "circle", "square", "left", "right", "top", "bottom"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=6)) + f" {i}" for i in range(60_000)) + "\n")
    out = tmp_path / "idx"
    cmd = [
        sys.executable,
        "-m",
        "retriever",
        "build-index",
        str(corpus),
        "--model",
        "toyworld",
        "--out",
        str(out),
        "--chunk-size",
        "2000",
        "--quiet",
        "--json",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    building = tmp_path / ".idx.building"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(building.glob("emb-*.npy"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(building.glob("emb-*.npy")))
    assert 3 <= done < 30 and not out.exists()

    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_shards"] >= done and summary["kept"] == 60_000
    assert summary["embedded"] == 60_000 - 2000 * summary["resumed_shards"]
    index = read_index(out)
    assert len(index) == 60_000 and index.rows([59_999])[0]["text"].endswith(" 59999")
