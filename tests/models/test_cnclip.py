"""Chinese-CLIP models: retriever's own modules and tokenizer against cn_clip's reference code."""

import json
import time

import numpy as np
import pytest
import torch

from retriever.errors import ModelError
from retriever.models import toyworld
from retriever.models.encoder import Encoder
from retriever.models.loading import load_model
from retriever.models.wordpiece import WordPieceTokenizer

TEXTS = [
    "左边有一个大的红色五角星",
    "一只猫坐在窗台上，阳光很好。",
    "Ａｂｃ　全角 and half-width abc",
    "Café naïve 😀",
    "中文，标点。“引号”【括号】",
    "x" * 300,
    "長" * 80,
    "",
]
REFERENCE_EXTRA = {
    "text_attention_probs_dropout_prob": 0.1,
    "text_hidden_act": "gelu",
    "text_hidden_dropout_prob": 0.1,
    "text_initializer_range": 0.02,
}
TINY_VIT = {
    "embed_dim": 32,
    "image_resolution": 32,
    "vision_layers": 2,
    "vision_width": 64,
    "vision_patch_size": 8,
    "vision_head_width": 32,
}
TINY_RN = {
    "embed_dim": 512,
    "image_resolution": 64,
    "vision_layers": [1, 1, 1, 1],
    "vision_width": 16,
    "vision_patch_size": None,
}
TINY_BERT = {
    "vocab_size": 21128,
    "text_hidden_size": 64,
    "text_intermediate_size": 128,
    "text_max_position_embeddings": 64,
    "text_num_attention_heads": 2,
    "text_num_hidden_layers": 2,
    "text_type_vocab_size": 2,
}


def reference_model(cfg: dict, seed: int):
    """cn_clip's own CLIP with random weights, every parameter perturbed (LayerNorm gains included)."""
    clip_model = pytest.importorskip("cn_clip.clip.model")
    torch.manual_seed(seed)
    model = clip_model.CLIP(**{**cfg, **REFERENCE_EXTRA}).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for b in model.buffers():
            if b.dtype.is_floating_point:
                b.add_(torch.rand_like(b) * 0.1)  # BatchNorm statistics of the ResNet
    return model


def images(n: int = 6):
    return [img for img, _ in toyworld.sample(n, seed=5, style="random")]


@pytest.mark.parametrize("vision", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_random_cn_clip_checkpoint_gives_cn_clips_own_vectors(tmp_path, vision):
    """A cn_clip-format checkpoint (fp16, `module.` keys, the pooler) through retriever = through cn_clip."""
    cn_clip = pytest.importorskip("cn_clip.clip")
    cfg = {**vision, **TINY_BERT}
    ref = reference_model(cfg, seed=1)
    state = {f"module.{k}": v.half() for k, v in ref.state_dict().items()}
    (tmp_path / "m").mkdir()
    torch.save({"epoch": 3, "name": "tiny", "state_dict": state}, tmp_path / "m" / "epoch_latest.pt")
    (tmp_path / "m" / "cn_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "context_length": 52}))
    ref.load_state_dict({k[len("module.") :]: v.float() for k, v in state.items()})  # the same fp16-rounded weights

    loaded = load_model(f"local-dir:{tmp_path / 'm'}", device="cpu")
    enc = Encoder(loaded)
    with torch.inference_mode():
        want_t = torch.nn.functional.normalize(ref.encode_text(cn_clip.tokenize(TEXTS)), dim=-1).numpy()
        transform = cn_clip.image_transform(cfg["image_resolution"])
        want_i = torch.nn.functional.normalize(
            ref.encode_image(torch.stack([transform(im) for im in images()])), dim=-1
        ).numpy()
    got_t = enc.encode_text(TEXTS, batch_size=3)
    got_i = enc.encode_image(images())
    assert (got_t * want_t).sum(1).min() >= 0.9999
    assert (got_i * want_i).sum(1).min() >= 0.9999
    assert loaded.fingerprint.startswith("sha256:") and loaded.embed_dim == cfg["embed_dim"]


def test_padding_is_masked_so_trimming_is_exact():
    """One text alone, or in a batch with a long one (more padding), gives the same vector."""
    loaded = load_model("toyworld-zh", device="cpu")
    enc = Encoder(loaded)
    assert not enc.trim_padding  # the Encoder's own trimming is for causal towers only
    tokens = loaded.tokenizer(["红色", "左边有一个大的红色五角星，" * 3])
    with torch.inference_mode():
        full = loaded.model.bert(tokens, tokens.ne(0))[:, 0] @ loaded.model.text_projection  # all 52 positions
        cut = loaded.model.encode_text(tokens)
        alone = loaded.model.encode_text(tokens[:1])
    assert torch.allclose(full, cut, atol=1e-5) and torch.allclose(full[:1], alone, atol=1e-5)


def test_tokenizer_matches_cn_clip():
    cn_clip = pytest.importorskip("cn_clip.clip")
    rng = np.random.default_rng(0)
    ours = WordPieceTokenizer()
    vocab = list(ours.vocab)
    texts = TEXTS + ["".join(vocab[i] for i in rng.integers(100, len(vocab), rng.integers(0, 15))) for _ in range(300)]
    assert torch.equal(ours(texts), cn_clip.tokenize(texts))
    assert ours.decode(ours(["左边有一个大的红色五角星"])[0].tolist()) == "左边有一个大的红色五角星"


def test_released_architectures_build_from_their_configs():
    """Each released name resolves to cn_clip's own config (checked against its model_configs JSONs)."""
    from importlib import resources

    from retriever.models import cnclip

    pytest.importorskip("cn_clip")
    folder = resources.files("cn_clip.clip") / "model_configs"
    for arch, (text, _, _) in cnclip.ARCHS.items():
        want = {
            **json.loads((folder / f"{arch}.json").read_text()),
            **json.loads((folder / f"{text}.json").read_text()),
        }
        if isinstance(want["vision_layers"], str):
            want["vision_layers"] = json.loads(want["vision_layers"])
        got = cnclip.arch_config(arch)
        assert {k: want[k] for k in got} == got, arch
        cnclip.check_config(got, arch)


@pytest.mark.slow
def test_random_vit_b_16_matches_cn_clip_at_full_size(tmp_path):
    """The real ViT-B-16 architecture (188M parameters), random weights, via `cn-clip:ViT-B-16 --pretrained FILE`."""
    cn_clip = pytest.importorskip("cn_clip.clip")
    from retriever.models import cnclip

    ref = reference_model(cnclip.arch_config("ViT-B-16"), seed=2)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "vit-b-16.pt")
    enc = Encoder(load_model("cn-clip:ViT-B-16", str(tmp_path / "vit-b-16.pt"), device="cpu"))
    with torch.inference_mode():
        want_t = torch.nn.functional.normalize(ref.encode_text(cn_clip.tokenize(TEXTS[:3])), dim=-1).numpy()
        want_i = torch.nn.functional.normalize(
            ref.encode_image(torch.stack([cn_clip.image_transform(224)(im) for im in images(2)])), dim=-1
        ).numpy()
    assert (enc.encode_text(TEXTS[:3]) * want_t).sum(1).min() >= 0.9999
    assert (enc.encode_image(images(2)) * want_i).sum(1).min() >= 0.9999


def test_released_weights_fail_fast_offline(monkeypatch):
    start = time.perf_counter()
    with pytest.raises(ModelError, match="chinese-clip-vit-base-patch16.*clip_cn_vit-b-16.pt"):
        load_model("cn-clip:ViT-B-16", None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    with pytest.raises(ModelError, match="cannot be reached"):
        load_model("cn-clip:RN50", None)
    assert time.perf_counter() - start < 3.0


def test_bad_names_files_and_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown Chinese-CLIP architecture"):
        load_model("cn-clip:ViT-Z-99", None)
    with pytest.raises(ModelError, match="no such checkpoint file"):
        load_model("cn-clip:RN50", str(tmp_path / "missing.pt"))
    (tmp_path / "wrong.pt").write_bytes(b"")
    with pytest.raises(ModelError, match="empty file"):
        load_model("cn-clip:RN50", str(tmp_path / "wrong.pt"))
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="do not fit this Chinese-CLIP architecture.*missing"):
        load_model("cn-clip:RN50", str(tmp_path / "other.pt"))
    (tmp_path / "huge").mkdir()
    cfg = {**TINY_VIT, **TINY_BERT, "text_num_hidden_layers": 100000, "text_hidden_size": 4096}
    (tmp_path / "huge" / "cn_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    (tmp_path / "huge" / "w.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="parameters"):
        load_model(f"local-dir:{tmp_path / 'huge'}")
