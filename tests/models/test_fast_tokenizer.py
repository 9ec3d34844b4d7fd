"""FastClipTokenizer gives open_clip's token ids exactly; any text where they differ fails."""

import pickle

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from retriever.models import fast_tokenizer as ft  # noqa: E402
from retriever.models.fast_tokenizer import FastClipTokenizer, fast_tokenizer, supports  # noqa: E402

EDGE_CASES = [
    "",
    " ",
    "\n\t ",
    "a",
    "A",
    "a photo of a cat",
    "  Hello   WORLD!!  ",
    "don't it's we're I'M they'LL",
    "'s 't 're 've 'm 'll 'd''s '''",
    "x" * 500,
    " ".join(["word"] * 100),
    "supercalifragilistic" * 8,
    # Unicode: accents, scripts without spaces, case folding that changes length, combining marks
    "café naïve résumé",
    "日本語のテキスト、句読点。",
    "Ελληνικά ΣΊΣΥΦΟΣ",
    "İstanbul ǅemal ß ẞ ﬀ",
    "e\u0301 combining",
    "Привет, мир",
    "عربي مع أرقام ١٢٣",
    "हिन्दी पाठ",
    "한국어 텍스트",
    "\u0130\u0131",
    # emoji and symbols
    "😀 emoji 👩‍👩‍👧‍👦 family 🏳️‍🌈",
    "★☆✓✔ ♥",
    "a😀b",
    "™ © ® ° ± µ",
    # HTML entities, once and twice escaped, and not entities at all
    "tom &amp; jerry",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;lt;b&amp;gt;",
    "&#39;quoted&#39; &#x2019;",
    "AT&T",
    "&",
    "&&&",
    "<b>tags &amp; entities</b>",
    "&nbsp;spaces&nbsp;",
    "&hellip;",
    "&#0; &#1; &#127; &#xD800;",
    # ftfy fixes: mojibake, wide forms, ligatures, curly quotes, terminal escapes, controls
    "âœ” No problems",
    "sÃ³ voilÃ le travail",
    "ＬＯＵＤ　ＮＯＩＳＥＳ",
    "ﬂubberiﬁc",
    "“curly” ‘quotes’",
    "\x1b[31mred\x1b[0m",
    "bell\x07 null\x00 del\x7f",
    "tab\tnew\nline\r\nfeed\x0cvt\x0b",
    "\u2028\u2029\x85",
    "\ufeffbom",
    "\u200bzero\u200cwidth\u200d",
    "\x1c\x1d\x1e\x1f separators",
    "\ud83d lone surrogate",
    # numbers and punctuation runs
    "123,456.78",
    "2024-01-01T12:00",
    "...!!!???",
    "--==**",
    "@user #tag $5 %20 ^_^ ~/path",
    # special tokens named in the text
    "<start_of_text>",
    "<end_of_text>",
    "a<start_of_text>b",
    "&<start_of_text>",
    "<START_OF_TEXT> upper",
    "<end_of_text",
    "start_of_text>",
    "x <|endoftext|> y",
]

COCO_STYLE = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park",
    "A kitchen with stainless steel appliances and granite countertops.",
    "a plate of food with broccoli, rice, and chicken",
    "A group of people standing around a table with laptops.",
    "An old red double-decker bus driving down a street.",
    "A cat laying on a bed next to a remote control.",
    "The giraffe is eating leaves from the tall tree.",
    "A bathroom with a toilet, sink and shower.",
    "Several zebras grazing in the grass near some trees.",
    "A baseball player swinging a bat at a ball",
    "A close up of a pizza with pepperoni and cheese on it",
    "a young boy holding a teddy bear while sitting on a couch ",
    "A person on skis going down a snowy hill",
    "Traffic lights and signs at an intersection in the city.",
    "A woman's hand holding a cell phone.",
    "There are 3 elephants walking along the river bank.",
    "A 747 airplane taking off from the runway at LAX",
    "A vase filled with flowers sitting on a window sill",
    "Man in a suit & tie standing in front of a building.",
]


@pytest.fixture(scope="module")
def slow():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module", params=[True, False], ids=["rust", "python"])
def fast(request, slow):
    if request.param:
        pytest.importorskip("tokenizers")
    return FastClipTokenizer(slow, rust=request.param)


def assert_same(slow, fast, texts, context_length=None):
    expected = slow(texts, context_length=context_length)
    got = fast(texts, context_length=context_length)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    bad = [t for t, a, b in zip(texts, expected, got) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} texts differ, first {bad[0]!r}"


def test_open_clip_tokenizer_is_supported_and_others_are_left_alone(slow):
    assert supports(slow)
    assert isinstance(fast_tokenizer(slow), FastClipTokenizer)
    canonical = open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")
    assert fast_tokenizer(canonical) is canonical
    extra = open_clip.tokenizer.SimpleTokenizer(additional_special_tokens=["<x>"])
    assert fast_tokenizer(extra) is extra
    masked = open_clip.tokenizer.SimpleTokenizer(reduction_mask="random")
    assert fast_tokenizer(masked) is masked
    fast = fast_tokenizer(slow)
    assert fast_tokenizer(fast) is fast


@pytest.mark.parametrize("context_length", [None, 32, 5, 3, 2, 1])
def test_edge_cases_match_open_clip(slow, fast, context_length):
    assert_same(slow, fast, EDGE_CASES, context_length)
    for text in EDGE_CASES:  # alone as well as in a batch (nothing leaks between texts)
        assert fast.encode(text) == slow.encode(text), repr(text)


def test_overlong_texts_keep_the_end_token(slow, fast):
    texts = ["word " * 200, "a" * 2000, "😀" * 300, "1" * 100]
    got = fast(texts)
    assert (got[:, -1] == slow.eot_token_id).all() and (got[:, 0] == slow.sot_token_id).all()
    assert_same(slow, fast, texts)
    exact = "a " * 75  # 75 words + sot + eot = 77: not cut
    assert_same(slow, fast, [exact, exact + "b", "a " * 74])


def test_coco_style_captions_match(slow, fast):
    assert_same(slow, fast, COCO_STYLE)
    assert_same(slow, fast, [c.upper() for c in COCO_STYLE] + [c.lower() + " &amp; more" for c in COCO_STYLE])


def test_single_string_and_empty_list(slow, fast):
    assert torch.equal(fast("a photo of a cat"), slow("a photo of a cat"))
    assert fast([]).shape == slow([]).shape == (0, 77)


def test_plain_ascii_is_left_unchanged_by_ftfy_and_html(slow):
    """The fast path skips open_clip's cleaning for printable ASCII without '&': check that the
    cleaning is the identity there, on random strings of every printable character."""
    import random

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    for _ in range(3000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        assert open_clip.tokenizer._clean_lower(text) == " ".join(text.split()).lower(), repr(text)


def test_random_text_matches(slow, fast):
    import random

    rng = random.Random(1)
    pools = [
        [chr(c) for c in range(0x20, 0x7F)],
        [chr(c) for c in range(0, 0x250)] + list("😀👍🏽‍♀️—–…“”‘’«»€£¥"),
        [chr(rng.randint(0, 0x2FFFF)) for _ in range(2000)],
        list("ab cd'sltrvem&;#x0123<>_of_text"),
    ]
    texts = ["".join(rng.choices(pool, k=rng.randint(0, 60))) for pool in pools for _ in range(400)]
    texts = [
        t.encode("utf-8", "replace").decode("utf-8") if any(0xD800 <= ord(c) < 0xE000 for c in t) else t for t in texts
    ]
    assert_same(slow, fast, texts)
    assert_same(slow, fast, texts, context_length=8)


def test_flavors_sample_matches(slow, fast):
    label_tables = pytest.importorskip("retriever.prompts.label_tables")
    try:
        flavors = label_tables.builtin_labels("flavors")
    except Exception as e:  # clip-interrogator not installed
        pytest.skip(str(e))
    sample = flavors[:3000] + [t for t in flavors if not (t.isascii() and t.isprintable()) or "&" in t]
    assert_same(slow, fast, sample)


@pytest.mark.slow
def test_all_flavors_match(slow, fast):
    """Every one of clip-interrogator's ~100k flavors, and its artists, mediums and movements."""
    from retriever.prompts.label_tables import builtin_labels

    for table in ("flavors", "artists", "mediums", "movements", "trendings", "negative"):
        labels = builtin_labels(table)
        assert_same(slow, fast, labels)


def test_small_word_cache_still_matches(slow, monkeypatch):
    monkeypatch.setattr(ft, "CACHE_WORDS", 20)
    fast = FastClipTokenizer(slow)
    for _ in range(2):
        assert_same(slow, fast, COCO_STYLE)
    assert len(fast._cache) <= 20 + 200


def test_pickles_and_delegates(slow):
    fast = FastClipTokenizer(slow)
    copy = pickle.loads(pickle.dumps(fast))
    assert torch.equal(copy(COCO_STYLE), slow(COCO_STYLE))
    assert fast.decode(fast.encode("a photo of a cat")) == slow.decode(slow.encode("a photo of a cat"))
    assert fast.vocab_size == slow.vocab_size and fast.context_length == 77


def test_loaded_models_use_it_unless_told_not_to(monkeypatch):
    from retriever.models.loading import load_model

    toy = load_model("toyworld", device="cpu")
    assert isinstance(toy.tokenizer, FastClipTokenizer) and toy.tokenizer.context_length == 32
    monkeypatch.setenv("RETRIEVER_TOKENIZER", "open_clip")
    assert type(load_model("toyworld", device="cpu").tokenizer) is open_clip.tokenizer.SimpleTokenizer
