import numpy as np
import pytest
import torch

from retriever.models import toyworld
from retriever.models.encoder import Encoder, can_trim_padding
from retriever.models.loading import load_model

TEXTS = [
    "a small red circle on the left",
    "star",
    "a large purple triangle on the bottom next to a much longer description of the scene",
    "",
    "an orange square",
    "word " * 300,  # far past the context length: truncated by the tokenizer, never a crash
]


def reference_text(loaded, texts):
    with torch.inference_mode():
        return torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(texts)), dim=-1).numpy()


def reference_image(loaded, images):
    with torch.inference_mode():
        pixels = torch.stack([loaded.preprocess(im) for im in images])
        return torch.nn.functional.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()


def assert_rows_match(a, b, min_cosine=0.9999):
    assert a.shape == b.shape
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min() >= min_cosine, cosines


def test_text_matches_open_clip_in_input_order(toy_model):
    encoder = Encoder(toy_model)
    assert encoder.trim_padding  # the toy CLIP's causal text tower takes the trimmed path
    ours = encoder.encode_text(TEXTS, batch_size=2, show_progress_bar=False)
    assert ours.dtype == np.float32
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert_rows_match(ours, reference_text(toy_model, TEXTS))


def test_trimmed_equals_full_padding(toy_model):
    encoder = Encoder(toy_model)
    trimmed = encoder.encode_text(TEXTS, show_progress_bar=False)
    encoder.trim_padding = False
    assert_rows_match(trimmed, encoder.encode_text(TEXTS, show_progress_bar=False))


def test_single_text_gives_vector_and_empty_list_gives_empty(toy_model):
    encoder = Encoder(toy_model)
    assert encoder.encode_text("a small red circle on the left").shape == (128,)
    assert encoder.encode_text([]).shape == (0, 128)


def test_image_matches_open_clip(toy_model):
    images = [im for im, _ in toyworld.sample(5, seed=3)]
    encoder = Encoder(toy_model)
    ours = encoder.encode_image(images, batch_size=2, show_progress_bar=False)
    assert_rows_match(ours, reference_image(toy_model, images))
    assert encoder.encode_image(images[0]).shape == (128,)


def test_unnormalized_output(toy_model):
    raw = Encoder(toy_model).encode_text(["a small red circle on the left"], normalize=False)
    with torch.inference_mode():
        expected = toy_model.model.encode_text(toy_model.tokenizer(["a small red circle on the left"])).numpy()
    assert np.allclose(raw, expected, atol=1e-5)


@pytest.fixture(scope="module")
def vit_b_32_random(tmp_path_factory):
    """Full-size ViT-B-32 with random weights, saved to a local file and loaded back like any checkpoint."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = tmp_path_factory.mktemp("vitb32") / "random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return load_model("ViT-B-32", str(path), device="cpu")


@pytest.mark.slow
def test_full_size_vit_b_32_matches_open_clip(vit_b_32_random):
    encoder = Encoder(vit_b_32_random)
    assert encoder.trim_padding and vit_b_32_random.context_length == 77
    assert_rows_match(
        encoder.encode_text(TEXTS, batch_size=4, show_progress_bar=False), reference_text(vit_b_32_random, TEXTS)
    )
    images = [im for im, _ in toyworld.sample(3, seed=4)]
    assert_rows_match(encoder.encode_image(images, show_progress_bar=False), reference_image(vit_b_32_random, images))


def test_towers_that_cannot_trim_are_detected():
    import open_clip

    coca = open_clip.create_model("coca_ViT-B-32")
    assert not can_trim_padding(coca)


def test_text_attention_leaves_out_cudnn_on_cuda_only():
    """On CUDA, text batches attend without cuDNN's fused attention (2.8x slower for short texts on
    an H200); the flags come back afterwards, and nothing changes on the CPU."""
    import torch

    from retriever.models.encoder import text_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with text_attention("cuda:0"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with text_attention("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_text_vectors_are_the_same_inside_the_cuda_attention_context(toy_model):
    """The restricted backends compute the same attention (run here on the CPU kernels)."""
    import numpy as np

    from retriever.models import encoder as encoder_module
    from retriever.models.encoder import Encoder

    texts = [s.caption for s in toyworld_scenes()[:64]]
    enc = Encoder(toy_model)
    plain = enc.encode_text(texts, batch_size=16, show_progress_bar=False)
    with encoder_module.text_attention("cuda"):
        forced = enc.encode_text(texts, batch_size=16, show_progress_bar=False)
    np.testing.assert_allclose(forced, plain, atol=1e-6)


def toyworld_scenes():
    from retriever.models import toyworld

    return toyworld.all_scenes()
