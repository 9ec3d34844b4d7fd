import json

import numpy as np
import pytest

from retriever.errors import ImageError, IndexFormatError
from retriever.index.build import build_index
from retriever.index.store import read_index, read_manifest
from retriever.models import toyworld
from retriever.search.api import Retriever


def test_manifest_records_model_corpus_and_versions(toy_index, toy_model, toy_corpus):
    manifest = read_manifest(toy_index)
    assert manifest["format_version"] == 1
    assert manifest["count"] == 256 and manifest["embedding_dim"] == 128
    assert manifest["model"]["name"] == "toyworld"
    assert manifest["model"]["fingerprint"] == toy_model.fingerprint
    assert manifest["corpus"]["path"] == str(toy_corpus.resolve())
    assert len(manifest["corpus"]["sha256"]) == 64
    assert {"open_clip_torch", "torch", "numpy"} <= set(manifest["versions"])
    assert manifest["created"]


def test_index_search_is_exact_inner_product(toy_index, toy_model):
    from retriever.models.encoder import Encoder

    index = read_index(toy_index)
    xb = Encoder(toy_model).encode_text(index.texts.column("text").to_pylist(), show_progress_bar=False)
    xq = xb[[3, 77, 200]] + 0.01
    D, I = index.search(xq / np.linalg.norm(xq, axis=1, keepdims=True), k=5)
    scores = (xq / np.linalg.norm(xq, axis=1, keepdims=True)) @ xb.T
    assert np.array_equal(I, np.argsort(-scores, axis=1)[:, :5])
    # the index holds the vectors as rounded through fp16 shards: scores agree to ~1e-4
    assert np.allclose(D, np.sort(scores, axis=1)[:, ::-1][:, :5], atol=1e-3)


def test_query_returns_the_true_caption_with_metadata(toy_index, toy_images):
    retriever = Retriever.open(toy_index)
    path, caption = toy_images[0]
    hits = retriever.query(path, k=3)
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    assert hits[0].text == caption
    assert hits[0].metadata["shape"] in caption and set(hits[0].metadata) == {"shape", "colour"}
    assert hits[0].id == toyworld.all_captions().index(caption)
    json.dumps([h.to_dict() for h in hits])


def test_query_text_and_k_larger_than_index(toy_index):
    hits = Retriever.open(toy_index).query_text("a large red star on the left", k=1000)
    assert len(hits) == 256
    assert hits[0].text == "a large red star on the left"


def test_bad_image_raises_image_error(toy_index, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(ImageError, match="x.png"):
        Retriever.open(toy_index).query(tmp_path / "x.png")


def test_opening_with_another_model_is_an_error(toy_index, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from retriever.models.loading import BUNDLED_DIR

    other = tmp_path / "other"
    shutil.copytree(BUNDLED_DIR / "toyworld", other)
    state = load_file(str(other / "open_clip_model.safetensors"))
    state["logit_scale"] = state["logit_scale"] + 1  # different weights, same architecture
    save_file(state, str(other / "open_clip_model.safetensors"))
    with pytest.raises(IndexFormatError, match="was built with toyworld"):
        Retriever.open(toy_index, model=f"local-dir:{other}")


def test_interrupted_build_leaves_nothing_that_loads(toy_model, toy_corpus, tmp_path, monkeypatch):
    import retriever.index.store

    def interrupt(directory):
        raise KeyboardInterrupt

    out = tmp_path / "idx"
    monkeypatch.setattr(retriever.index.store, "_fsync_dir", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_index(toy_corpus, out, toy_model, show_progress_bar=False)
    assert [p.name for p in tmp_path.iterdir()] == [".idx.building"]  # finished shards, kept for resuming


def test_interrupted_rebuild_keeps_the_old_index(toy_model, toy_corpus, tmp_path, monkeypatch):
    import retriever.index.store

    out = tmp_path / "idx"
    build_index(toy_corpus, out, toy_model, show_progress_bar=False)
    before = read_manifest(out)["created"]
    monkeypatch.setattr(retriever.index.store, "_fsync_dir", lambda d: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        build_index(toy_corpus, out, toy_model, overwrite=True, show_progress_bar=False)
    assert read_manifest(out)["created"] == before and len(read_index(out)) == 256
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.building", "idx"]


def test_existing_index_needs_overwrite(toy_model, toy_corpus, toy_index):
    with pytest.raises(IndexFormatError, match="--overwrite"):
        build_index(toy_corpus, toy_index, toy_model, show_progress_bar=False)


def test_not_an_index_and_wrong_version(tmp_path, toy_index):
    import shutil

    with pytest.raises(IndexFormatError, match="no such index"):
        read_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError, match="not an index"):
        read_index(tmp_path / "empty")
    copy = tmp_path / "copy"
    shutil.copytree(toy_index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format 99"):
        read_index(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "texts.parquet").unlink()
    with pytest.raises(IndexFormatError, match="texts.parquet is missing"):
        read_index(copy)


def _flavors() -> list[str]:
    """clip-interrogator's 100k flavor phrases, read from its package data without importing its code."""
    from retriever.prompts.label_tables import builtin_labels

    return builtin_labels("flavors")


def test_toyworld_quality_with_10k_distractors(toy_model, tmp_path):
    """Held-out images against the 256 captions plus >= 10,000 distractors: R@1 >= 0.9."""
    distractors = [f for f in _flavors() if f.strip()][:20_000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(toyworld.all_captions() + distractors) + "\n")
    out = build_index(corpus, tmp_path / "idx", toy_model, show_progress_bar=False)
    assert out.report.kept >= 256 + 10_000
    retriever = Retriever.open(out.path)
    pairs = list(toyworld.sample(300, seed=2024))
    results = retriever.query_many([im for im, _ in pairs], k=1)
    r_at_1 = np.mean([hits[0].text == caption for hits, (_, caption) in zip(results, pairs)])
    print(f"toyworld R@1 with {out.report.kept - 256} distractors: {r_at_1:.3f}")
    assert r_at_1 >= 0.9
