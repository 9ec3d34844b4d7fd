"""Caption generation with the project's own decoding loop, checked against open_clip."""

import subprocess
import sys

import pytest
import torch

from retriever.errors import ModelError, RetrieverError
from retriever.generate.captioner import Captioner
from retriever.generate.decoding import DecodeOptions
from retriever.models import toyworld
from retriever.models.loading import load_model


@pytest.fixture(scope="module")
def coca():
    return load_model("toyworld-coca", device="cpu")


@pytest.fixture(scope="module")
def heldout():
    return list(toyworld.sample(64, seed=777))


def open_clip_tokens(model, pixels, **kwargs):
    """open_clip's own generate (needs transformers 4.56.x), as lists of tokens up to the end token."""
    with torch.inference_mode():
        out = model.generate(pixels, seq_len=10, **kwargs)
    return [_until_eos(row) for row in out.tolist()]


def _until_eos(tokens, eos=49407):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_exact_match_on_heldout_images(coca, heldout, method):
    captions = Captioner(coca).caption([im for im, _ in heldout], DecodeOptions(method=method, beams=4))
    match = sum(c == truth for c, (_, truth) in zip(captions, heldout)) / len(heldout)
    print(f"{method}: exact match {match:.3f}")
    assert match >= 0.9


def test_output_is_clean_text(coca, heldout):
    (caption,) = Captioner(coca).caption([heldout[0][0]], DecodeOptions(method="greedy"))
    assert "<" not in caption and caption == " ".join(caption.split()) and caption.startswith("a ")


def test_greedy_equals_open_clip_top_k_1_token_for_token(coca, heldout):
    pytest.importorskip("transformers")
    images = [im for im, _ in heldout[:12]]
    pixels = torch.stack([coca.preprocess(im) for im in images])
    ours = [
        _until_eos(t[0]) for t in Captioner(coca).generate_tokens(images, DecodeOptions(method="greedy", max_len=10))
    ]
    assert ours == open_clip_tokens(coca.model, pixels, generation_type="top_k", top_k=1)


@pytest.mark.parametrize("beams", [2, 4])
def test_beam_search_equals_open_clip(coca, heldout, beams):
    pytest.importorskip("transformers")
    images = [im for im, _ in heldout[:6]]
    pixels = torch.stack([coca.preprocess(im) for im in images])
    ours = [
        _until_eos(t[0])
        for t in Captioner(coca).generate_tokens(images, DecodeOptions(method="beam", beams=beams, max_len=10))
    ]
    assert ours == open_clip_tokens(
        coca.model, pixels, generation_type="beam_search", num_beams=beams, num_beam_groups=1
    )


def test_generation_works_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from retriever.models import toyworld\n"
        "from retriever.generate.captioner import Captioner\n"
        "from retriever.generate.decoding import DecodeOptions\n"
        "from retriever.models.loading import load_model\n"
        "image, truth = next(toyworld.sample(1, seed=3))\n"
        "print(Captioner(load_model('toyworld-coca', device='cpu')).caption([image], DecodeOptions(method='beam'))[0] == truth)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "True", result.stderr


@pytest.mark.parametrize("method", ["top_k", "top_p"])
def test_sampling_is_reproducible_with_a_seed_and_respects_lengths(coca, heldout, method):
    images = [im for im, _ in heldout[:4]]
    opts = DecodeOptions(method=method, seed=5, temperature=1.5, top_k=5, top_p=0.8, min_len=6, max_len=9)
    captioner = Captioner(coca)
    first, second = captioner.generate_tokens(images, opts), captioner.generate_tokens(images, opts)
    assert first == second
    for (tokens,) in first:
        assert len(tokens) <= 9
        body = _until_eos(tokens)
        assert len(body) >= 6 or 49407 not in tokens  # no end token before min_len


def test_repetition_penalty_changes_scores():
    from retriever.generate.decoding import process_logits

    ids = torch.tensor([[49406, 5, 7]])
    scores = torch.tensor([[0.0] * 5 + [2.0, 1.0, -2.0] + [0.0] * 49400])
    out = process_logits(ids, scores, DecodeOptions(repetition_penalty=2.0, min_len=1), eos=49407)
    assert out[0, 5] == 1.0 and out[0, 7] == -4.0 and out[0, 6] == 1.0


def test_non_coca_model_is_a_clear_error(toy_model):
    with pytest.raises(ModelError, match="needs a CoCa model"):
        Captioner(toy_model)


def test_bad_options_are_clear_errors(coca, heldout):
    with pytest.raises(RetrieverError, match="unknown decoding method"):
        Captioner(coca).caption([heldout[0][0]], DecodeOptions(method="magic"))
    with pytest.raises(RetrieverError, match="at least 2 beams"):
        Captioner(coca).caption([heldout[0][0]], DecodeOptions(method="beam", beams=1))
