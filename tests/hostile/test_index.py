"""Hostile cases for index building and opening: what --out may replace, concurrent builds, builds
killed at every step, damaged and tampered indexes, and the usage errors around them.

Each case asserts the exact outcome: the one-line error, the old index intact, nothing else gone.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile_checks import assert_clean_error

from retriever.errors import IndexFormatError
from retriever.index import publish
from retriever.index.ann import recall_at_k
from retriever.index.build import build_index
from retriever.index.lock import BuildLock
from retriever.index.store import read_index, read_manifest
from retriever.index.verify import file_records, verify_index
from retriever.models import toyworld
from retriever.search.api import Retriever

CAPTIONS = toyworld.all_captions()


def _corpus(path: Path, captions: list[str]) -> Path:
    path.write_text("\n".join(captions) + "\n")
    return path


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: 'nothing changed' is compared on this."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def corpora(tmp_path):
    """Two different small corpora (A: 60 captions, B: 40 others) in their own folder."""
    folder = tmp_path / "corpora"
    folder.mkdir()
    return _corpus(folder / "a.txt", CAPTIONS[:60]), _corpus(folder / "b.txt", CAPTIONS[100:140])


def _corpus_of(index: Path) -> str:
    return read_manifest(index)["corpus"]["sha256"]


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. --out replaces only an index ---------------------------------------------------------------


def _victim(d: Path) -> tuple[Path, str]:
    (d / "victim").mkdir()
    (d / "victim" / "thesis.pdf").write_bytes(b"%PDF years of work")
    (d / "victim" / "photos").mkdir()
    (d / "victim" / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    return d / "victim", "not an index (holds 2 files, e.g. photos, thesis.pdf); choose another --out"


def _web_manifest(d: Path) -> tuple[Path, str]:
    (d / "site").mkdir()
    (d / "site" / "manifest.json").write_text('{"name": "my web app"}')
    (d / "site" / "index.html").write_text("<html>")
    return d / "site", "not an index (holds 2 files"


def _index_plus_thesis(d: Path) -> tuple[Path, str]:
    out = d / "idx"
    build_index(_corpus(d / "c.txt", CAPTIONS[:5]), out, _MODEL[0], show_progress_bar=False)
    (out / "thesis.pdf").write_bytes(b"%PDF")
    return out, "an index that also holds other files (thesis.pdf); move them out"


def _a_file(d: Path) -> tuple[Path, str]:
    (d / "notes.txt").write_text("keep me")
    return d / "notes.txt", "not an index (a file is there)"


def _under_a_file(d: Path) -> tuple[Path, str]:
    (d / "notes.txt").write_text("keep me")
    return d / "notes.txt" / "sub" / "idx", "notes.txt is a file, not a folder"


def _symlink_to_victim(d: Path) -> tuple[Path, str]:
    victim, _ = _victim(d)
    (d / "link").symlink_to(victim)
    return d / "link", "not an index (holds 2 files"


def _foreign_work_dir(d: Path) -> tuple[Path, str]:
    (d / ".idx.building").mkdir()
    (d / ".idx.building" / "draft.docx").write_bytes(b"mine")
    return d / "idx", ".idx.building: not a build work directory (it holds draft.docx); move it away"


def _lock_is_a_folder(d: Path) -> tuple[Path, str]:
    (d / ".idx.lock").mkdir()
    (d / ".idx.lock" / "keep.txt").write_text("mine")
    return d / "idx", ".idx.lock: cannot be used as the build lock (Is a directory); move it away"


_MODEL: list = []


@pytest.fixture(autouse=True)
def _model(toy_model):
    _MODEL[:] = [toy_model]


@pytest.mark.parametrize(
    "make",
    [
        _victim,
        _web_manifest,
        _index_plus_thesis,
        _a_file,
        _under_a_file,
        _symlink_to_victim,
        _foreign_work_dir,
        _lock_is_a_folder,
    ],
)
def test_overwrite_replaces_only_an_index(make, tmp_path, run, corpora):
    place = tmp_path / "place"
    place.mkdir()
    out, message = make(place)
    before = _tree(place)
    names = sorted(p.name for p in place.iterdir())
    result = run("build-index", corpora[0], "--model", "toyworld", "--out", out, "--overwrite", "--quiet")
    assert_clean_error(result, message)
    assert _tree(place) == before and sorted(p.name for p in place.iterdir()) == names  # nothing deleted or added


def test_an_empty_folder_is_used_and_an_index_needs_overwrite(tmp_path, run, corpora):
    (tmp_path / "empty").mkdir()
    assert run("build-index", corpora[0], "--model", "toyworld", "--out", tmp_path / "empty", "--quiet").exit_code == 0
    assert read_manifest(tmp_path / "empty")["count"] == 60
    result = run("build-index", corpora[1], "--model", "toyworld", "--out", tmp_path / "empty", "--quiet")
    assert_clean_error(result, "already exists (use --overwrite to replace it)")
    assert read_manifest(tmp_path / "empty")["count"] == 60


# --- 2. one build at a time -------------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_build_and_leaves_both_alone(tmp_path, run, corpora):
    out = tmp_path / "idx"
    build_index(corpora[0], out, _MODEL[0], show_progress_bar=False)
    before = _tree(out)
    with BuildLock(out):  # another build (this process, another open file) is writing
        result = run("build-index", corpora[1], "--model", "toyworld", "--out", out, "--overwrite", "--quiet")
        assert_clean_error(result, f"another build is writing to idx (pid {os.getpid()})")
        with pytest.raises(IndexFormatError, match="another build is writing"):
            build_index(corpora[1], out, _MODEL[0], overwrite=True, show_progress_bar=False)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpora", "idx"]  # the lock file went with the lock


def _big_corpus(path: Path, n: int, tag: str) -> Path:
    words = ["red", "green", "blue", "small", "large", "star", "circle", "square", "left", "right"]
    rng = np.random.default_rng(len(tag))
    path.write_text("\n".join(f"{tag} " + " ".join(rng.choice(words, size=5)) + f" {i}" for i in range(n)) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("same_corpus", [True, False])
def test_two_real_builds_on_one_out(tmp_path, run_cli, same_corpus):
    """Two `retriever build-index` processes on one --out: the second gets the lock error, the
    first finishes, and the index is consistent with the one corpus its manifest names."""
    a = _big_corpus(tmp_path / "a.txt", 30_000, "alpha")
    b = a if same_corpus else _big_corpus(tmp_path / "b.txt", 20_000, "beta")
    out = tmp_path / "idx"
    args = ["build-index", "--model", "toyworld", "--out", str(out), "--overwrite", "--quiet", "--chunk-size", "2000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "retriever", args[0], str(a), *args[1:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = tmp_path / ".idx.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.02)
    second = run_cli(args[0], b, *args[1:])
    assert first.poll() is None, "the first build ended before the second started: make the corpus larger"
    assert_clean_error(second, f"another build is writing to idx (pid {first.pid})")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    manifest = read_manifest(out)
    assert manifest["corpus"]["sha256"] == _sha(a) and manifest["count"] == 30_000
    texts = read_index(out).texts.column("text").to_pylist()
    assert all(t.startswith("alpha ") for t in texts) and texts[-1].endswith(" 29999")
    verify_index(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"a.txt", "b.txt", "idx"} if not same_corpus else {"a.txt", "idx"}
    )


def test_assembly_refuses_shards_of_another_build(tmp_path, corpora, monkeypatch):
    from retriever.index.shards import ShardDir

    out = tmp_path / "idx"
    original = ShardDir.write

    def stop_after_one(self, number, vectors, table):
        if number == 1:
            raise KeyboardInterrupt
        original(self, number, vectors, table)

    monkeypatch.setattr(ShardDir, "write", stop_after_one)
    for corpus, name in ((corpora[1], "other"), (corpora[0], "idx")):
        with pytest.raises(KeyboardInterrupt):
            build_index(corpus, tmp_path / name, _MODEL[0], chunk_size=20, show_progress_bar=False)
    monkeypatch.undo()
    # A shard of the other build (its corpus B) slipped into this one's work directory.
    for name in ("emb-00000.npy", "meta-00000.parquet"):
        shutil.copy(tmp_path / ".other.building" / name, tmp_path / ".idx.building" / name)
    with pytest.raises(IndexFormatError, match="shard 0 belongs to another build"):
        build_index(corpora[0], out, _MODEL[0], chunk_size=20, show_progress_bar=False)
    assert not out.exists()


# --- 3. publishing: old or new, whatever fails -----------------------------------------------------


class _Fail(Exception):
    pass


@pytest.mark.parametrize(
    "fallback,step",
    [(False, 1), (False, 2), (True, 1), (True, 2), (True, 3)],
    ids=["exchange", "after-exchange", "swap-rename-1", "swap-rename-2", "swap-remove-old"],
)
def test_publish_fault_leaves_old_or_new_and_the_next_run_recovers(tmp_path, corpora, monkeypatch, fallback, step):
    """Fail at each step of publishing over an old index; readers see the old index or the new
    one, and the next build (or reader) cleans up."""
    out = tmp_path / "idx"
    build_index(corpora[0], out, _MODEL[0], show_progress_bar=False)
    old, new = _sha(corpora[0]), _sha(corpora[1])
    if fallback:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    # The steps: exchange or first rename; second rename (fallback only); removing the old index.
    calls = {"rename": 0, "exchange": 0, "rmtree": 0}
    real_rename, real_exchange, real_rmtree = os.rename, publish._exchange, shutil.rmtree

    def rename(a, b):
        calls["rename"] += 1
        if fallback and calls["rename"] == step:
            raise _Fail
        return real_rename(a, b)

    def exchange(a, b):
        if not fallback and step == 1:
            raise _Fail
        return real_exchange(a, b)

    def rmtree(path, *args, **kwargs):
        if (fallback and step == 3 and Path(path).name == ".idx.old") or (
            not fallback and step == 2 and Path(path).name.startswith(".idx.new-")
        ):
            raise _Fail
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(publish.os, "rename", rename)
    monkeypatch.setattr(publish, "_exchange", exchange)
    monkeypatch.setattr(publish.shutil, "rmtree", rmtree)
    with pytest.raises(_Fail):
        build_index(corpora[1], out, _MODEL[0], overwrite=True, show_progress_bar=False)
    monkeypatch.undo()
    published = step >= (2 if not fallback else 3)
    assert _corpus_of(out) == (new if published else old)  # a reader restores .idx.old if it must
    assert len(read_index(out)) == (40 if published else 60)
    result = build_index(corpora[1], out, _MODEL[0], overwrite=True, show_progress_bar=False)
    assert _corpus_of(result.path) == new
    verify_index(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpora", "idx"]


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "rename-swap"])
def test_a_folder_named_like_the_old_index_is_never_deleted(tmp_path, corpora, monkeypatch, fallback):
    out = tmp_path / "idx"
    build_index(corpora[0], out, _MODEL[0], show_progress_bar=False)
    (tmp_path / ".idx.old").mkdir()
    (tmp_path / ".idx.old" / "thesis.pdf").write_bytes(b"%PDF")
    if fallback:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
        with pytest.raises(IndexFormatError, match=r"\.idx\.old: not an index \(holds 1 file, e.g. thesis.pdf\)"):
            build_index(corpora[1], out, _MODEL[0], overwrite=True, show_progress_bar=False)
        assert _corpus_of(out) == _sha(corpora[0])
    else:  # the exchange never needs the name
        build_index(corpora[1], out, _MODEL[0], overwrite=True, show_progress_bar=False)
        assert _corpus_of(out) == _sha(corpora[1])
    assert (tmp_path / ".idx.old" / "thesis.pdf").read_bytes() == b"%PDF"
    kept_shards = [".idx.building"] if fallback else []  # the failed build keeps its shards to resume
    assert sorted(p.name for p in tmp_path.iterdir()) == kept_shards + [".idx.old", "corpora", "idx"]


def test_a_reader_between_the_two_renames_waits_for_the_new_index(tmp_path, corpora, monkeypatch):
    out = tmp_path / "idx"
    build_index(corpora[0], out, _MODEL[0], show_progress_bar=False)
    monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    real_rename = os.rename
    seen = []

    def rename(a, b):
        if Path(b) == out:  # the old index is away, the new one not yet in place
            reader = threading.Thread(target=lambda: seen.append(_corpus_of(out)))
            reader.start()
            time.sleep(0.3)
            real_rename(a, b)
            reader.join()
            return None
        return real_rename(a, b)

    monkeypatch.setattr(publish.os, "rename", rename)
    build_index(corpora[1], out, _MODEL[0], overwrite=True, show_progress_bar=False)
    assert seen == [_sha(corpora[1])]


_KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    target, nth, fallback, *argv = sys.argv[1:]
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), [0]
    def killer(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(owner, name, killer)
    if fallback == "1":
        import retriever.index.publish as publish
        publish._exchange = lambda a, b: False
    from retriever.cli import app
    app(argv, prog_name="retriever")
""")

# (what to kill in, at which call, rename-swap instead of the exchange, whether the new index is in
# place, what is left beside it): the leftovers prove where the kill landed.
_BUSY = {".idx.building", ".idx.lock"}
_KILL_POINTS = [
    ("retriever.index.shards:ShardDir.write", 2, False, False, _BUSY),  # embedding, 1 shard done
    ("retriever.index.build:_assemble", 1, False, False, _BUSY),  # every shard done
    ("retriever.index.store:_fsync_dir", 1, False, False, _BUSY | {".idx.new-*"}),  # written, unpublished
    ("retriever.index.publish:_exchange", 1, False, False, _BUSY | {".idx.new-*"}),  # just before the swap
    ("retriever.index.shards:ShardDir.remove", 1, False, True, _BUSY),  # published
    ("retriever.index.publish:os.rename", 1, True, False, _BUSY | {".idx.new-*"}),  # swap: before the renames
    ("retriever.index.publish:os.rename", 2, True, False, _BUSY | {".idx.new-*", ".idx.old"}),  # between them
    ("retriever.index.publish:shutil.rmtree", 2, True, True, _BUSY | {".idx.old"}),  # swap: old not yet removed
]


def _beside(folder: Path) -> set[str]:
    import re

    return {re.sub(r"^\.idx\.new-\w{8}\.tmp$", ".idx.new-*", p.name) for p in folder.iterdir()} - {"corpora", "idx"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "target,nth,fallback,published,left",
    _KILL_POINTS,
    ids=[f"{t.split(':')[1]}#{n}{'-swap' if f else ''}" for t, n, f, _, _ in _KILL_POINTS],
)
def test_sigkill_at_each_step_then_rebuild(tmp_path, corpora, target, nth, fallback, published, left):
    out = tmp_path / "idx"
    build_index(corpora[0], out, _MODEL[0], show_progress_bar=False)
    args = [
        "build-index",
        str(corpora[1]),
        "--model",
        "toyworld",
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        "--chunk-size",
        "16",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, target, str(nth), "1" if fallback else "0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _beside(tmp_path) == left
    assert _corpus_of(out) == _sha(corpora[1] if published else corpora[0])  # old or new, never neither
    assert len(read_index(out)) == (40 if published else 60)
    rebuilt = subprocess.run(
        [sys.executable, "-m", "retriever", *args, "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["kept"] == 40
    assert _corpus_of(out) == _sha(corpora[1])
    verify_index(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpora", "idx"]


# --- 4. bad options: one line, before any work -------------------------------------------------------


@pytest.mark.parametrize("size", ["1.2.3G", "G", "-1G", "1..2M", "4 GB extra", "nan"])
def test_unreadable_max_memory(size, tmp_path, run, corpora):
    result = run("build-index", corpora[0], "--model", "toyworld", "--out", tmp_path / "idx", "--max-memory", size)
    assert_clean_error(result, f"cannot read memory size {size!r}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpora"]


def test_ivfpq_on_too_few_texts_fails_before_embedding(tmp_path, run, corpora, monkeypatch):
    from retriever.models.encoder import Encoder

    monkeypatch.setattr(Encoder, "encode_text", lambda *a, **k: pytest.fail("embedded before planning"))
    result = run("build-index", corpora[0], "--model", "toyworld", "--out", tmp_path / "idx", "--index-type", "ivfpq")
    assert_clean_error(result, "--index-type ivfpq needs at least 256 texts", "use --index-type flat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpora"]


# --- 5. damaged indexes: query and info say so in one line ------------------------------------------


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _set_manifest(d: Path, manifest) -> None:
    (d / "manifest.json").write_text(json.dumps(manifest))


def _rerecord(d: Path) -> None:
    """Make the recorded sizes and hashes match again, so that a deeper check has to catch it."""
    manifest = _manifest(d)
    manifest["files"] = file_records(d, manifest["files"])
    _set_manifest(d, manifest)


def _unrecord(d: Path) -> None:
    """An index from before sizes and hashes were recorded."""
    manifest = _manifest(d)
    del manifest["files"]
    _set_manifest(d, manifest)


def _truncate(d: Path, name: str, size: int | None = None) -> None:
    path = d / name
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2 if size is None else size)


def _write_texts(d: Path, table: pa.Table) -> None:
    pq.write_table(table, d / "texts.parquet")
    _rerecord(d)


def _other_faiss(d: Path, dim: int, n: int) -> None:
    import faiss

    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(x / np.linalg.norm(x, axis=1, keepdims=True))
    faiss.write_index(index, str(d / "index.faiss"))
    _rerecord(d)


def _edit(**changes):
    def apply(d: Path) -> None:
        manifest = _manifest(d)
        for key, value in changes.items():
            if value is _DELETE:
                del manifest[key]
            else:
                manifest[key] = value
        _set_manifest(d, manifest)

    return apply


_DELETE = object()
_texts = lambda d: pq.read_table(d / "texts.parquet")  # noqa: E731

DAMAGE = {
    "truncated-faiss": (lambda d: _truncate(d, "index.faiss"), "index.faiss is 65,"),
    "empty-faiss": (lambda d: _truncate(d, "index.faiss", 0), "index.faiss is 0 bytes, the manifest records"),
    "truncated-faiss-old": (lambda d: (_unrecord(d), _truncate(d, "index.faiss")), "index.faiss cannot be read"),
    "empty-faiss-old": (lambda d: (_unrecord(d), _truncate(d, "index.faiss", 0)), "index.faiss is empty"),
    "truncated-texts": (lambda d: _truncate(d, "texts.parquet"), "texts.parquet is "),
    "empty-texts-old": (lambda d: (_unrecord(d), _truncate(d, "texts.parquet", 0)), "texts.parquet cannot be read"),
    "truncated-vectors": (lambda d: _truncate(d, "vectors.f16.npy"), "vectors.f16.npy is 32,"),
    "renamed-text-column": (
        lambda d: _write_texts(d, _texts(d).rename_columns(["id", "caption", "shape", "colour"])),
        "texts.parquet has no 'text' column (it has id, caption",
    ),
    "null-ids": (
        lambda d: _write_texts(
            d, _texts(d).set_column(0, "id", pa.array([None] * 3 + list(range(3, 256)), pa.int64()))
        ),
        "texts.parquet's 'id' column has 3 null values",
    ),
    "null-texts": (
        lambda d: _write_texts(d, _texts(d).set_column(1, "text", pa.array([None] + CAPTIONS[1:]))),
        "texts.parquet's 'text' column has 1 null values",
    ),
    "shuffled-ids": (
        lambda d: _write_texts(d, _texts(d).set_column(0, "id", pa.array(list(range(255, -1, -1))))),
        "texts.parquet's row 0 has id 255",
    ),
    "manifest-array": (lambda d: _set_manifest(d, [1, 2]), "manifest.json holds a JSON list, not an object"),
    "manifest-not-json": (lambda d: (d / "manifest.json").write_bytes(b"\x00\xff{"), "manifest.json is not valid JSON"),
    "manifest-empty": (lambda d: (d / "manifest.json").write_bytes(b""), "manifest.json is not valid JSON"),
    "no-count": (_edit(count=_DELETE), "manifest.json has no 'count'"),
    "count-string": (_edit(count="256"), "manifest.json's 'count' is '256', not an integer"),
    "model-null": (_edit(model=None), "manifest.json's 'model' is None, not an object"),
    "fingerprint-missing": (lambda d: _edit(model={"name": "toyworld"})(d), "model 'fingerprint' is None"),
    "search-params-string": (_edit(search_params="fast"), "manifest.json's 'search_params' is 'fast', not an object"),
    "search-params-list": (_edit(search_params=[8]), "manifest.json's 'search_params' is [8], not an object"),
    "search-params-value": (_edit(search_params={"nprobe": "8"}), "search parameter 'nprobe' is '8'"),
    "search-params-unfit": (_edit(search_params={"nprobe": 8}), "search_params do not fit index.faiss"),
    "files-record-wrong": (_edit(files={"index.faiss": 12}), "record of 'index.faiss' is 12"),
    "other-dimension": (
        lambda d: _other_faiss(d, 64, 256),
        "index.faiss holds 64-dimensional vectors, the manifest says 128",
    ),
    "other-ntotal": (lambda d: _other_faiss(d, 128, 100), "index.faiss holds 100 vectors, the manifest says 256"),
    "count-differs": (_edit(count=255), "index.faiss holds 256 vectors, the manifest says 255"),
}


@pytest.fixture
def damaged_copy(toy_index, tmp_path):
    copy = tmp_path / "idx"
    shutil.copytree(toy_index, copy)
    return copy


@pytest.mark.parametrize("command", ["query", "info"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_index_is_one_line(case, command, damaged_copy, run):
    damage, what = DAMAGE[case]
    damage(damaged_copy)
    args = ["query", "--text", "a red star", "--index", damaged_copy] if command == "query" else ["info", damaged_copy]
    line = assert_clean_error(run(*args), f"{damaged_copy}: damaged index: ", what)
    assert line.endswith("(rebuild it with build-index ... --overwrite)")


def test_a_damaged_index_can_be_rebuilt_in_place(damaged_copy, run, tmp_path):
    _set_manifest(damaged_copy, [1, 2])
    corpus = _corpus(tmp_path / "c.txt", CAPTIONS[:30])
    result = run("build-index", corpus, "--model", "toyworld", "--out", damaged_copy, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert read_manifest(damaged_copy)["count"] == 30


# --- 6. silent wrong answers: checksums and impossible scores ---------------------------------------


def _flip_in_faiss(d: Path, row: int) -> None:
    """Flip the top exponent bit of a positive component of `row`'s vector in index.faiss (x 2^128)."""
    vector = read_index(d).faiss_index.reconstruct(row)
    data = bytearray((d / "index.faiss").read_bytes())
    offset = data.find(vector.tobytes())
    assert offset > 0 and data.find(vector.tobytes(), offset + 1) == -1
    data[offset + 4 * int(np.argmax(vector)) + 3] ^= 0x40
    (d / "index.faiss").write_bytes(bytes(data))


def _flip_in_vectors(d: Path, row: int) -> None:
    """The same in vectors.f16.npy (fp16: x 2^16)."""
    path = d / "vectors.f16.npy"
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        header = f.tell()
    vectors = np.load(path, mmap_mode="r")
    data = bytearray(path.read_bytes())
    data[header + 2 * (row * vectors.shape[1] + int(np.argmax(vectors[row]))) + 1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "file,flip,query_args,index_type",
    [
        ("index.faiss", _flip_in_faiss, ["--dedupe", "off"], "flat"),  # scores straight from the FAISS index
        # re-ranked from the stored vectors: an IVF index's (flat and HNSW re-rank with FAISS's own)
        ("vectors.f16.npy", _flip_in_vectors, [], "ivf"),
    ],
)
def test_one_flipped_byte_is_found_by_verify_and_by_the_score(
    file, flip, query_args, index_type, damaged_copy, run, toy_corpus, toy_model
):
    if index_type != "flat":
        build_index(toy_corpus, damaged_copy, toy_model, index_type=index_type, overwrite=True, show_progress_bar=False)
    row = 77
    text = read_index(damaged_copy).rows([row])[0]["text"]
    flip(damaged_copy, row)
    assert run("info", damaged_copy).exit_code == 0  # same size: the cheap check on open cannot see it
    assert_clean_error(run("info", damaged_copy, "--verify"), f"{damaged_copy}: damaged index: {file} has SHA-256")
    with pytest.raises(IndexFormatError, match=f"{file} has SHA-256"):
        verify_index(damaged_copy)
    result = run("query", "--text", text, "--index", damaged_copy, "-k", "3", *query_args)
    assert_clean_error(result, f"{damaged_copy}: damaged index: a search scored", "info --verify")
    assert result.stdout == ""
    with pytest.raises(IndexFormatError, match="impossible for normalised vectors"):
        Retriever.open(damaged_copy).query_text(text, k=3, dedupe=None if file == "index.faiss" else 0.95)


def test_flipped_byte_in_texts_is_found_by_verify(damaged_copy, run):
    data = bytearray((damaged_copy / "texts.parquet").read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged_copy / "texts.parquet").write_bytes(bytes(data))
    assert_clean_error(run("info", damaged_copy, "--verify"), "damaged index: texts.parquet has SHA-256")


def test_verify_ok_and_old_indexes_still_open(damaged_copy, run):
    result = run("info", damaged_copy, "--verify")
    assert result.exit_code == 0 and f"OK: {damaged_copy}: 3 files match their recorded SHA-256" in result.stdout
    assert json.loads(run("info", damaged_copy, "--verify", "--json").stdout)["verified"] == "ok"
    _unrecord(damaged_copy)
    result = run("info", damaged_copy, "--verify")
    assert result.exit_code == 0 and "cannot be verified" in result.stderr and "OK" not in result.stdout
    verify_index(damaged_copy)  # nothing recorded to check against: passes
    assert (
        Retriever.open(damaged_copy).query_text("a large red star on the left", k=1)[0].text
        == "a large red star on the left"
    )


# --- 7. small things ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\t\n"])
def test_empty_query_text_is_a_usage_error(text, toy_index, run):
    result = run("query", "--text", text, "--index", toy_index)
    assert result.exit_code == 2 and "the text is empty" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_recall_of_a_tiny_exhaustive_index_is_one(kind, tmp_path, run):
    corpus = _corpus(tmp_path / "three.txt", CAPTIONS[:3])  # fewer texts than k = 10
    result = run(
        "build-index",
        corpus,
        "--model",
        "toyworld",
        "--out",
        tmp_path / "idx",
        "--index-type",
        kind,
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["recall_at_10"] == 1.0
    assert read_manifest(tmp_path / "idx")["tuning"]["recall_at_10"] == 1.0


def test_recall_counts_only_neighbours_that_exist():
    gt = np.array([[2, 0, 1, -1, -1], [1, -1, -1, -1, -1]])
    assert recall_at_k(np.array([[0, 1, 2, -1, -1], [1, -1, -1, -1, -1]]), gt, k=5) == 1.0
    assert recall_at_k(np.array([[0, 1, -1, -1, -1], [2, -1, -1, -1, -1]]), gt, k=5) == 0.5


def test_same_name_other_weights_shows_the_fingerprints(toy_index, tmp_path, toy_model):
    manifest = read_manifest(toy_index)
    copy = tmp_path / "idx"
    shutil.copytree(toy_index, copy)
    _set_manifest(copy, {**manifest, "model": {**manifest["model"], "fingerprint": "sha256:" + "ab" * 32}})
    with pytest.raises(IndexFormatError) as error:
        Retriever.open(copy)
    message = str(error.value)
    assert "weights sha256:abababababab, not these (" in message and toy_model.fingerprint[:19] in message
