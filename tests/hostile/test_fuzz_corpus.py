"""Random corpus files through `read_corpus`: texts come back clean, or one CorpusError; nothing else."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retriever.corpus.reader import read_corpus
from retriever.errors import CorpusError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that break readers: separators, quotes, NUL and other controls, BOM, lone surrogates.
_NASTY = st.sampled_from(list("\t,\"'\n\r \x00\x01\x7f\ufeff\u2028\\{}[]:") + ["\ud800", "\udfff", "é", "猫"])
_TEXTISH = st.lists(st.one_of(_NASTY, st.characters()), max_size=80).map("".join)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXTISH,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXTISH, inner, max_size=3),
    max_leaves=8,
)


def _raw_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # lone surrogates become the invalid bytes ED A0 80


@st.composite
def _jsonl(draw) -> bytes:
    keys = st.sampled_from(["caption", "title", "text", "id", "corpus_id", "meta"]) | _TEXTISH
    lines = draw(
        st.lists(
            st.one_of(st.dictionaries(keys, _JSON, max_size=4).map(json.dumps), _JSON.map(json.dumps), _TEXTISH),
            max_size=8,
        )
    )
    return _raw_bytes("\n".join(lines))


def _check(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"corpus{suffix}"
        path.write_bytes(data)
        try:
            corpus = read_corpus(path)
        except CorpusError as e:
            assert str(path) in str(e)
            return
    assert corpus.texts and len(corpus.texts) == len(corpus.metadata) == corpus.report.kept
    for text in corpus.texts:
        assert isinstance(text, str) and text == text.strip() and text
        text.encode("utf-8")  # raises on a surrogate
        assert "\x00" not in text
    assert len(set(corpus.texts)) == len(corpus.texts)
    for meta in corpus.metadata:
        for key, value in meta.items():
            key.encode("utf-8")
            assert value is None or isinstance(value, (bool, int, float, str))
            if isinstance(value, str):
                value.encode("utf-8")
            if isinstance(value, int) and not isinstance(value, bool):
                assert -(2**63) <= value < 2**63


@pytest.mark.parametrize("suffix", [".txt", ".tsv", ".csv"])
@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(_TEXTISH, max_size=8).map(lambda ls: _raw_bytes("\n".join(ls))),
        st.lists(st.lists(_TEXTISH, min_size=1, max_size=4), max_size=6).map(
            lambda rows: _raw_bytes("caption\tn,x\n" + "\n".join("\t".join(r) for r in rows))
        ),
    )
)
def test_fuzz_delimited_and_txt(suffix, data):
    _check(data, suffix)


@FUZZ
@given(data=st.one_of(_jsonl(), st.binary(max_size=300)))
def test_fuzz_jsonl(data):
    _check(data, ".jsonl")
