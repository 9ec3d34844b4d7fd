import json
import time

import pytest
import torch

from retriever.errors import ModelError
from retriever.models.loading import bundled_models, list_models, load_model


def test_toyworld_is_bundled_and_listed():
    assert "toyworld" in bundled_models()
    rows = list_models()
    toy = next(r for r in rows if r["model"] == "toyworld")
    assert toy["available_offline"] and toy["source"] == "bundled"
    assert any(r["model"] == "ViT-B-32" and r["pretrained"] == "laion2b_s34b_b79k" for r in rows)


def test_toyworld_loads_with_its_tokenizer_and_transform(toy_model):
    assert toy_model.embed_dim == 128
    assert toy_model.context_length == 32
    assert toy_model.fingerprint.startswith("sha256:")
    assert toy_model.preprocess.transforms[0].size in (64, [64], (64, 64))


@pytest.mark.parametrize(
    "name,pretrained", [("ViT-B-32", "laion2b_s34b_b79k"), ("hf-hub:timm/nonexistent-model", None)]
)
def test_hub_download_fails_fast_offline(name, pretrained):
    import open_clip  # noqa: F401  (import time is not what this measures)

    start = time.perf_counter()
    with pytest.raises(ModelError, match="--model toyworld"):
        load_model(name, pretrained)
    assert time.perf_counter() - start < 2.0


def test_hub_fails_fast_without_offline_flag(monkeypatch):
    """No network and no HF_HUB_OFFLINE: a connection probe, not open_clip's 46 s of retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(ModelError, match="cannot be reached"):
        load_model("ViT-B-32", "laion2b_s34b_b79k")
    assert time.perf_counter() - start < 2.0


def test_unknown_model_and_tag_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        load_model("NoSuchNet-99", "x")
    with pytest.raises(ModelError, match="neither a pretrained tag"):
        load_model("ViT-B-32", str(tmp_path / "missing.pt"))
    with pytest.raises(ModelError, match="needs weights"):
        load_model("ViT-B-32", None)
    with pytest.raises(ModelError, match="not a model directory"):
        load_model(f"local-dir:{tmp_path}")


@pytest.fixture(scope="module")
def toy_arch(tmp_path_factory):
    """The toyworld architecture registered as an open_clip built-in name, plus its weights as .pt and .safetensors."""
    import open_clip
    from safetensors.torch import save_file

    from retriever.models.loading import BUNDLED_DIR

    config = json.loads((BUNDLED_DIR / "toyworld" / "open_clip_config.json").read_text())
    root = tmp_path_factory.mktemp("arch")
    (root / "ToyArch-T.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(root / "ToyArch-T.json")
    model = load_model("toyworld", device="cpu").model
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, root / "weights.pt")
    save_file(state, str(root / "weights.safetensors"))
    return root


@pytest.mark.parametrize("weights", ["weights.pt", "weights.safetensors"])
def test_checkpoint_file_loads_same_weights(toy_arch, toy_model, weights):
    loaded = load_model("ToyArch-T", str(toy_arch / weights), device="cpu")
    assert loaded.fingerprint.startswith("sha256:")
    tokens = toy_model.tokenizer(["a large red star on the left"])
    with torch.inference_mode():
        # default (OpenAI) preprocessing matches toyworld's, so the text tower alone shows the weights
        assert torch.allclose(loaded.model.encode_text(tokens), toy_model.model.encode_text(tokens), atol=1e-5)


def test_local_dir_loads(toy_model):
    from retriever.models.loading import BUNDLED_DIR

    loaded = load_model(f"local-dir:{BUNDLED_DIR / 'toyworld'}", device="cpu")
    assert loaded.fingerprint == toy_model.fingerprint
