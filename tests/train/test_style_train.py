"""`retriever style train`: text-only training, its folder, resume after Ctrl-C, CLI and voice transfer."""

import json
import os
import signal

import pytest
import torch

from retriever.errors import RetrieverError
from retriever.generate.decoding import DecodeOptions
from retriever.generate.style import StyleCaptioner
from retriever.generate.style_model import load_weights
from retriever.models import toyworld
from retriever.train.style import StyleOptions, train_style

TINY = dict(width=32, layers=1, heads=2, batch_size=16, lr=3e-3)


def restyled(scene):
    return f"{scene.colour} {scene.shape}, {scene.size}, {scene.position} side"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "lines.tsv"
    # A bad row (wrong field count), an empty text and a duplicate, as real corpora have.
    rows = (
        ["caption\tnote"]
        + [f"{c}\tok" for c in toyworld.all_captions()[:40]]
        + ["broken", "\tempty", "a small red circle on the left\tdup"]
    )
    path.write_text("\n".join(rows) + "\n")
    return path


def test_folder_records_the_clip_model_vocab_and_memory(tmp_path, corpus, toy_model):
    events = []
    result = train_style(
        corpus,
        tmp_path / "out",
        "toyworld",
        val=corpus,
        device="cpu",
        show_progress_bar=False,
        options=StyleOptions(epochs=2, memory_size=10, **TINY),
        on_event=lambda k, d: events.append((k, d)),
    )
    config = json.loads((tmp_path / "out" / "style.json").read_text())
    assert config["kind"] == "retriever-style-decoder" and config["clip"]["fingerprint"] == toy_model.fingerprint
    assert config["clip"]["name"] == "toyworld" and config["projection"] == "memory"
    # Compact vocabulary: pad, start, end, then only the corpus's tokens (mapped back to CLIP ids).
    words = {w for c in toyworld.all_captions()[:40] for w in c.split()}
    assert config["decoder"]["vocab"][:3] == [0, 49406, 49407] and len(config["decoder"]["vocab"]) == 3 + len(words)
    assert load_weights(tmp_path / "out" / "memory.safetensors")["memory"].shape == (10, toy_model.embed_dim)
    assert result.train["kept"] == 40 and result.train["bad_rows"] == 1 and result.train["duplicates"] == 1
    assert [k for k, _ in events].count("bad_row") == 2  # once for the corpus, once for --val
    epochs = [d for k, d in events if k == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and epochs[2]["train_loss"] < epochs[1]["train_loss"] + 1
    assert epochs[2]["val_loss"] < epochs[0]["val_loss"]
    assert not any(p.suffix in (".pt", ".pkl") for p in (tmp_path / "out").rglob("*"))  # no pickles anywhere


def test_overwrite_only_replaces_a_style_decoder(tmp_path, corpus):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(RetrieverError, match="not empty .*choose another --out"):
        train_style(corpus, foreign, "toyworld", options=StyleOptions(epochs=1, **TINY), device="cpu")
    with pytest.raises(RetrieverError, match="not a style decoder; --overwrite only replaces those"):
        train_style(corpus, foreign, "toyworld", options=StyleOptions(epochs=1, **TINY), device="cpu", overwrite=True)
    assert (foreign / "cat.jpg").exists()
    out = tmp_path / "style"
    train_style(corpus, out, "toyworld", options=StyleOptions(epochs=1, **TINY), device="cpu", show_progress_bar=False)
    with pytest.raises(RetrieverError, match="add --resume to continue it, or --overwrite"):
        train_style(corpus, out, "toyworld", options=StyleOptions(epochs=1, **TINY), device="cpu")
    train_style(
        corpus,
        out,
        "toyworld",
        options=StyleOptions(epochs=1, **TINY),
        device="cpu",
        overwrite=True,
        show_progress_bar=False,
    )
    with pytest.raises(RetrieverError, match="settings changed since the run started .*width 32 -> 64"):
        train_style(
            corpus, out, "toyworld", options=StyleOptions(epochs=2, **{**TINY, "width": 64}), device="cpu", resume=True
        )


def test_ctrl_c_is_deferred_to_a_step_boundary_and_resume_is_exact(tmp_path, corpus):
    """A real SIGINT mid-epoch saves a consistent state; the resumed run ends bit-identical to an
    uninterrupted one (noise projection, so the restored RNG matters too)."""
    options = StyleOptions(epochs=2, projection="noise", **TINY)
    train_style(corpus, tmp_path / "whole", "toyworld", options=options, device="cpu", show_progress_bar=False)

    def interrupt(kind, details):
        if kind == "step" and details["epoch"] == 1 and details["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train_style(
            corpus,
            tmp_path / "cut",
            "toyworld",
            options=options,
            device="cpu",
            show_progress_bar=False,
            on_event=interrupt,
        )
    state = json.loads((tmp_path / "cut" / "state" / "state.json").read_text())
    assert (state["epoch"], state["batch"]) == (0, 2)
    result = train_style(
        corpus, tmp_path / "cut", "toyworld", options=options, device="cpu", resume=True, show_progress_bar=False
    )
    assert result.resumed_at == (0, 2)
    whole = load_weights(tmp_path / "whole" / "decoder.safetensors")
    cut = load_weights(tmp_path / "cut" / "decoder.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_cli_trains_then_writes_captions_with_the_decoder(tmp_path, corpus, run, toy_images):
    out = tmp_path / "styles" / "toy"
    result = run(
        "style",
        "train",
        corpus,
        "--model",
        "toyworld",
        "--out",
        out,
        "--width",
        32,
        "--layers",
        1,
        "--heads",
        2,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--device",
        "cpu",
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["train"]["kept"] == 40 and summary["epochs"][-1]["epoch"] == 1
    result = run("query", toy_images[0][0], "--mode", "generate", "--generator", f"style:{out}", "--json")
    assert result.exit_code == 0, result.output
    hit = json.loads(result.stdout.strip().splitlines()[0])
    assert hit["source"] == "styled" and isinstance(hit["text"], str)
    result = run("query", toy_images[0][0], "--mode", "generate", "--generator", f"style:{tmp_path / 'missing'}")
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.output
    result = run("style", "train", corpus, "--model", "toyworld", "--out", out, "--heads", 3, "--width", 32)
    assert result.exit_code == 1 and "width (32) must be divisible by heads (3)" in result.stderr


@pytest.mark.slow
def test_voice_transfer_captions_images_in_the_users_style(tmp_path, toy_model):
    """(c): trained only on restyled lines ("red star, large, left side"), captions of toy images
    come out in that voice, and right."""
    corpus = tmp_path / "restyled.txt"
    corpus.write_text("\n".join(restyled(s) for s in toyworld.all_scenes()) + "\n")
    options = StyleOptions(width=128, layers=2, heads=4, epochs=30, batch_size=32, lr=1e-3)
    train_style(corpus, tmp_path / "style", "toyworld", options=options, device="cpu", show_progress_bar=False)
    rng = __import__("numpy").random.default_rng(5)
    scenes = [toyworld.all_scenes()[int(rng.integers(256))] for _ in range(100)]
    images = [toyworld.render(s, seed=50_000 + i) for i, s in enumerate(scenes)]
    captions = StyleCaptioner(tmp_path / "style", clip=toy_model).caption(images, DecodeOptions(method="beam"))
    assert sum(c == restyled(s) for c, s in zip(captions, scenes)) / len(scenes) >= 0.8, captions[:5]
