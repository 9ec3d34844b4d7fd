"""open_clip's multilingual models (XLM-RoBERTa text towers): offline errors, cached tokenizers, full padding."""

import json
import time

import pytest
import torch

from retriever.errors import ModelError
from retriever.models.encoder import Encoder, can_trim_padding
from retriever.models.loading import load_model

NAME, TAG = "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"


def test_offline_error_is_fast_and_names_the_download():
    import huggingface_hub  # noqa: F401  (import time is not what this measures)
    import open_clip  # noqa: F401

    start = time.perf_counter()
    with pytest.raises(
        ModelError, match=r"xlm-roberta-base on the Hugging Face hub.*huggingface-cli download xlm-roberta-base"
    ):
        load_model(NAME, TAG)
    assert time.perf_counter() - start < 3.0


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding a tiny XLM-RoBERTa config and tokenizer under `xlm-roberta-base`,
    as `huggingface-cli download` leaves them (refs/main -> snapshots/REV/...)."""
    pytest.importorskip("transformers")
    import huggingface_hub.constants
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import XLMRobertaConfig

    words = [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
        *"红色五角星左边有一个大的蓝圆形",
        "a",
        "red",
        "star",
        "on",
        "the",
        "left",
        "▁",
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    # Words of Latin letters, and each other character alone (as a Chinese character would be).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[a-z]+|\S"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    snapshot = tmp_path / "models--xlm-roberta-base" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--xlm-roberta-base" / "refs").mkdir()
    (tmp_path / "models--xlm-roberta-base" / "refs" / "main").write_text("0123abc")
    tok.save(str(snapshot / "tokenizer.json"))
    (snapshot / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "XLMRobertaTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "cls_token": "<s>",
                "sep_token": "</s>",
                "mask_token": "<unk>",
                "model_max_length": 77,
            }
        )
    )
    XLMRobertaConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=1,
    ).save_pretrained(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    return snapshot


def test_cached_tokenizer_is_used_and_padding_is_never_trimmed(hub_cache, monkeypatch):
    """With the config and tokenizer cached, nothing asks the hub (its address points nowhere), and
    a bidirectional tower gets its texts with full padding: one text alone = in a batch."""
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    loaded = load_model(NAME, random_weights=True, device="cpu")
    assert loaded.tokenizer.tokenizer.name_or_path == str(hub_cache)
    assert loaded.extra["open_clip_name"] == NAME
    enc = Encoder(loaded)
    assert not can_trim_padding(loaded.model) and not enc.trim_padding
    texts = ["红色", "左边有一个大的红色五角星", "a red star on the left"]
    batch = enc.encode_text(texts)
    for i, text in enumerate(texts):
        assert float(batch[i] @ enc.encode_text(text)) > 0.9999
    with torch.inference_mode():  # padding matters to this tower's pooling unless masked: it is masked
        tokens = loaded.tokenizer(texts)
        assert (tokens[0] == 1).sum() > 0  # XLM-R pads with id 1, not 0
