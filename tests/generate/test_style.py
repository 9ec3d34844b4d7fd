"""Text-only style decoders (DeCap / CapDec): the KV-cached stepper, the shipped toy decoder,
projections, the CLIP check, and hybrid queries that mark styled captions."""

import json

import pytest
import torch

from retriever.errors import ModelError, RetrieverError
from retriever.generate.decoding import DecodeOptions, sample
from retriever.generate.style import StyleCaptioner, load_generator, parse_style_ref, project_to_memory
from retriever.generate.style_model import EOT, PAD, SOT, StyleConfig, StyleStepper, build_decoder
from retriever.models import toyworld


@pytest.fixture(scope="module")
def shipped(toy_model):
    return StyleCaptioner("style:toyworld-style", clip=toy_model)


@pytest.fixture(scope="module")
def heldout():
    return list(toyworld.sample(100, seed=4242))


def exact(captions, pairs):
    return sum(c == truth for c, (_, truth) in zip(captions, pairs)) / len(pairs)


def random_decoder(seed=0, prefix_length=2):
    torch.manual_seed(seed)
    config = StyleConfig(
        embed_dim=16, vocab=list(range(20)), width=32, layers=2, heads=4, prefix_length=prefix_length, max_tokens=12
    )
    return build_decoder(config).eval()


def test_stepper_logits_equal_the_full_forward_pass():
    decoder = random_decoder()
    emb = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    tokens = torch.cat([torch.full((3, 1), SOT), torch.randint(3, 20, (3, 7))], dim=1)
    with torch.inference_mode():
        full = decoder(emb, tokens)
        stepper = StyleStepper(decoder, emb, beams=1, max_len=12)
        stepped = torch.stack([stepper.step(tokens[:, i]) for i in range(tokens.shape[1])], dim=1)
    assert torch.allclose(full, stepped, atol=1e-5), (full - stepped).abs().max()


def test_greedy_and_reordered_rows_match_recomputation():
    """Greedy through the loop (with the cache) equals argmax over full re-runs; reorder moves caches."""
    decoder = random_decoder(seed=1)
    emb = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    opts = DecodeOptions(method="greedy", min_len=1, max_len=8)
    with torch.inference_mode():
        rows = sample(StyleStepper(decoder, emb, 1, 8), 2, opts, SOT, EOT, PAD)
        expected = torch.full((2, 1), SOT)
        for _ in range(rows.shape[1] - 1):
            expected = torch.cat([expected, decoder(emb, expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
        for row, want in zip(rows.tolist(), expected.tolist()):
            n = row.index(EOT) + 1 if EOT in row[:-1] else len(row) - 1  # the loop forces the end at max_len
            assert row[:n] == want[:n]
        stepper = StyleStepper(decoder, emb, beams=2, max_len=8)
        first = stepper.step(torch.full((4,), SOT))
        stepper.reorder(torch.tensor([1, 0, 3, 2]))
        swapped = stepper.step(torch.tensor([5, 6, 7, 8]))
        fresh = StyleStepper(decoder, emb, beams=2, max_len=8)
        fresh.step(torch.full((4,), SOT))
        assert torch.allclose(swapped, fresh.step(torch.tensor([5, 6, 7, 8])), atol=1e-5)
        assert first.shape == (4, 20)


def test_memory_projection_is_a_softmax_weighted_sum():
    memory = torch.nn.functional.normalize(torch.randn(1, 5, 8), dim=-1)
    xq = memory[0, 2:3] * 0.9 + 0.1 * memory[0, 0:1]
    sharp = project_to_memory(xq, memory, 1e-4)
    assert torch.allclose(sharp, memory[0, 2:3], atol=1e-4)
    flat = project_to_memory(xq, memory, 1e4)
    assert torch.allclose(flat, torch.nn.functional.normalize(memory[0].mean(0, keepdim=True), dim=-1), atol=1e-3)


@pytest.mark.parametrize("method", ["beam", "greedy"])
def test_shipped_decoder_writes_toy_captions_it_never_saw_an_image_of(shipped, heldout, method):
    """(a) same voice: trained on the 256 captions' text embeddings only, memory projection."""
    captions = shipped.caption([im for im, _ in heldout], DecodeOptions(method=method, beams=6))
    assert exact(captions, heldout) >= 0.85


def test_every_decoding_method_runs_and_sampling_is_reproducible(shipped, heldout):
    images = [im for im, _ in heldout[:4]]
    for method in ("top_k", "top_p"):
        opts = DecodeOptions(method=method, seed=3, repetition_penalty=1.3)
        first = shipped.caption_candidates(images, opts, n=2)
        assert first == shipped.caption_candidates(images, opts, n=2)
        assert all(1 <= len(c) <= 2 and all(isinstance(t, str) and t for t in c) for c in first)
    assert all(len(c) == 3 for c in shipped.caption_candidates(images, DecodeOptions(method="beam", beams=6), n=3))


def test_projection_override_changes_what_the_decoder_sees(toy_model, heldout):
    images = [im for im, _ in heldout[:8]]
    memory = StyleCaptioner("style:toyworld-style", clip=toy_model)
    raw = StyleCaptioner("style:toyworld-style?projection=none", clip=toy_model)
    assert raw.projection == "none" and memory.projection == "memory"
    assert not torch.allclose(memory.embed(images), raw.embed(images))
    # The projection lands on the text embeddings: each projected image is (nearly) one stored caption's.
    nearest = (memory.embed(images) @ memory.memory.float().T).max(dim=1).values
    assert (nearest > 0.99).all()


def test_a_decoder_refuses_another_clip_model_naming_both():
    from retriever.models.loading import load_model

    with pytest.raises(ModelError, match=r"trained with CLIP toyworld .*not toyworld-coca"):
        StyleCaptioner("style:toyworld-style", clip=load_model("toyworld-coca", device="cpu"))


def test_bad_references_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist: train one with `retriever style train"):
        load_generator(f"style:{tmp_path / 'nope'}")
    with pytest.raises(ModelError, match="not a style decoder"):
        load_generator(f"style:{tmp_path}")
    with pytest.raises(RetrieverError, match="unknown option 'beams'"):
        parse_style_ref("style:x?beams=3")
    with pytest.raises(RetrieverError, match="fetch_k must be a int"):
        parse_style_ref("style:x?fetch_k=many")
    assert parse_style_ref("style:a/b?projection=noise&memory=index&fetch_k=8") == (
        "a/b",
        {"projection": "noise", "memory": "index", "fetch_k": 8},
    )


def test_load_generator_gives_a_coca_captioner_for_coca_refs():
    from retriever.generate.captioner import Captioner

    assert isinstance(load_generator("toyworld-coca", device="cpu"), Captioner)


def test_hybrid_marks_styled_captions_and_scores_them_with_the_index_model(tmp_path, toy_model, toy_images):
    """An index that lacks the images' captions: hybrid writes them, marks them styled, ranks them first."""
    from retriever.index.build import build_index
    from retriever.search.api import Retriever

    truths = {truth for _, truth in toy_images}
    corpus = tmp_path / "others.txt"
    corpus.write_text("\n".join(c for c in toyworld.all_captions() if c not in truths)[:4000] + "\n")
    build_index(corpus, tmp_path / "index", toy_model, show_progress_bar=False)
    retriever = Retriever.open(tmp_path / "index", device="cpu", generator="style:toyworld-style")
    assert retriever.generator.clip is retriever.model  # one CLIP model, shared
    results = retriever.query_many([p for p, _ in toy_images], k=3, mode="hybrid", always_generate=True)
    right = 0
    for (_, truth), hits in zip(toy_images, results):
        styled = [h for h in hits if h.source == "styled"]
        assert len(styled) == 1 and {h.source for h in hits} == {"styled", "retrieved"}, hits
        assert all(h.score is not None for h in hits) and hits == sorted(hits, key=lambda h: -h.score)
        right += hits[0].text == truth and hits[0].source == "styled"
    assert right >= 7
    generated = retriever.query(toy_images[0][0], k=1, mode="generate")
    assert generated[0].source == "styled" and generated[0].text == toy_images[0][1]


def test_index_as_memory(toy_index, toy_images):
    from retriever.search.api import Retriever

    retriever = Retriever.open(toy_index, device="cpu", generator="style:toyworld-style?memory=index&fetch_k=16")
    assert retriever.generator.memory is None and retriever.generator.memory_lookup is not None
    hits = retriever.query_many([p for p, _ in toy_images], k=1, mode="generate")
    assert exact([h[0].text for h in hits], toy_images) >= 0.85
    alone = StyleCaptioner("style:toyworld-style?memory=index", clip=retriever.model)
    with pytest.raises(RetrieverError, match="memory=index needs an index built with toyworld"):
        alone.caption([toyworld.render(toyworld.all_scenes()[0], seed=1)])


def test_http_server_answers_with_a_style_generator(toy_index):
    """The server needs no change: a Retriever opened with `style:PATH` serves styled captions,
    and /v1/indexes names the generator."""
    import io

    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from retriever.search.api import Retriever
    from retriever.serve.app import create_app

    scene = toyworld.Scene("large", "green", "triangle", "top")
    buffer = io.BytesIO()
    toyworld.render(scene, seed=9).save(buffer, format="PNG")
    shared = Retriever.open(None, device="cpu", generator="style:toyworld-style").generator
    retrievers = {"toy": Retriever.open(toy_index, device="cpu", generator=shared)}
    with TestClient(create_app(retrievers), base_url="http://127.0.0.1") as client:
        response = client.post(
            "/v1/query", files={"image": ("x.png", buffer.getvalue(), "image/png")}, data={"mode": "generate", "k": "1"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["hits"][0] | {"text": scene.caption, "source": "styled"} == response.json()["hits"][0]
        described = client.get("/v1/indexes").json()
        assert "toyworld-style" in json.dumps(described)


def test_punctuation_is_written_as_a_user_would():
    from retriever.generate.style import detokenize

    assert detokenize("red star , large , left side .") == "red star, large, left side."
    assert detokenize("don 't ( really ) say it 's 50 %") == "don't (really) say it's 50%"
