"""Prefix-shared text encoding: the same vectors as full encoding, and the same prompts."""

import pytest

from retriever.models import toyworld
from retriever.models.prefix import PrefixScorer, can_share_prefix, is_plain
from retriever.prompts.interrogate import Interrogator
from retriever.prompts.label_tables import builtin_labels, ensure_table, load_table

EDGE_SUFFIXES = [
    "emoji 🎨 art",
    "café au lait",
    "fish &amp; chips",
    "a &lt; b",
    "  spaced   out  ",
    "",
    "x" * 300,
    "trending on artstation",
    "it's",
    "!!!",
    "'s",
    "déjà vu",
    "ＦＵＬＬ width",
    "\u00a0nbsp",
    # shared leading tokens (one tree node), and two labels that tokenize the same
    "by Claude Monet",
    "by Claude Lorrain",
    "inspired by Claude Monet",
    "By Claude Monet",
    "by",
]


def full(scorer, prefix, suffixes):
    return scorer.encoder.encode_text([prefix + ", " + s for s in suffixes], show_progress_bar=False)


@pytest.mark.parametrize(
    "prefix",
    [
        "a large red star on the left",
        "oil painting, by someone 2",
        "ends with punctuation!",
        "naïve prefix",
        "fish & chips",
    ],
)
def test_vectors_match_full_encoding(toy_model, prefix):
    scorer = PrefixScorer(toy_model)
    suffixes = builtin_labels("flavors")[:300] + EDGE_SUFFIXES
    fitting = [s for s in suffixes if scorer.fits(scorer.tokens(prefix), s) or not is_plain(s)]
    ours = scorer.encode(prefix, fitting)
    cos = (ours * full(scorer, prefix, fitting)).sum(axis=1)
    assert cos.min() >= 0.9999
    if scorer.shareable(prefix):
        assert scorer.shared > len(fitting) // 2  # the shared path really ran
    else:
        assert scorer.shared == 0


def test_chain_of_prefixes_reuses_the_cache(toy_model):
    """Each prefix extends, cuts or replaces the last one's cached keys and values: still exact."""
    scorer = PrefixScorer(toy_model)
    suffixes = builtin_labels("flavors")[:60] + EDGE_SUFFIXES[-5:]
    prefixes = [
        "a large red star",
        "a large red star, on the left",
        "a large red star, on the left, by Claude Monet",
        "a large red star",
        "a small blue circle",
        "a small blue circle, 2",
    ]
    for prefix in prefixes:
        cos = (scorer.encode(prefix, suffixes) * full(scorer, prefix, suffixes)).sum(axis=1)
        assert cos.min() >= 0.9999, prefix
    assert scorer.full == 0


def test_only_exact_towers_share(toy_model):
    assert can_share_prefix(toy_model.model)
    from retriever.models.loading import load_model

    assert not can_share_prefix(load_model("toyworld-coca", device="cpu").model)  # CoCa appends a CLS token


@pytest.mark.slow
def test_full_size_vit_b_32_matches(tmp_path):
    """A full-size ViT-B-32 (random weights, the real tower) through both paths."""
    import open_clip
    import torch

    from retriever.models.loading import ModelSpec, wrap_model

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    loaded = wrap_model(
        ModelSpec("ViT-B-32", "random"),
        model.eval(),
        preprocess,
        open_clip.get_tokenizer("ViT-B-32"),
        "ViT-B-32/random",
        "cpu",
    )
    scorer = PrefixScorer(loaded)
    prefix = "a photograph of a lighthouse at dusk, oil on canvas, by a painter, highly detailed"
    suffixes = builtin_labels("flavors")[:400] + EDGE_SUFFIXES
    suffixes = [s for s in suffixes if scorer.fits(scorer.tokens(prefix), s) or not is_plain(s)]
    cos = (scorer.encode(prefix, suffixes) * full(scorer, prefix, suffixes)).sum(axis=1)
    assert cos.min() >= 0.9999 and scorer.shared > 300


@pytest.fixture(scope="module")
def tables(toy_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    lists = {
        "colours": list(toyworld.COLOURS),
        "shapes": list(toyworld.SHAPES),
        "flavors": builtin_labels("flavors")[:400],
    }
    return [
        load_table(n, ensure_table(n, labels, toy_model, root, show_progress_bar=False).path, toy_model)
        for n, labels in lists.items()
    ]


@pytest.mark.parametrize("mode, caption", [("best", ""), ("best", "a large shape"), ("negative", None)])
def test_same_prompts_with_and_without_sharing(toy_model, tables, mode, caption):
    images = [toyworld.render(s, seed=40 + i) for i, s in enumerate(toyworld.all_scenes()[::43])]
    shared = Interrogator(toy_model, tables, flavor_intermediate_count=64)
    plain = Interrogator(toy_model, tables, flavor_intermediate_count=64)
    plain.builder.scorer.exact = False  # the path before prefix sharing: every text in full
    a = [r.prompt for r in shared.interrogate_many(images, mode=mode, caption=caption)]
    b = [r.prompt for r in plain.interrogate_many(images, mode=mode, caption=caption)]
    assert a == b
    assert shared.builder.scorer.shared > 0 and plain.builder.scorer.shared == 0
