import json

import pandas as pd
import pytest

from retriever.corpus.reader import read_corpus
from retriever.errors import CorpusError


def test_txt_strips_skips_empty_and_dedupes(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\ufeffa red star\n  a red star  \n\n   \nblue circle\n")
    corpus = read_corpus(path)
    assert corpus.texts == ["a red star", "blue circle"]
    assert (corpus.report.rows, corpus.report.empty, corpus.report.duplicates, corpus.report.kept) == (5, 2, 1, 2)


def test_txt_invalid_utf8_is_reported_with_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"good one\nbad \xff\xfe line\ngood two\n")
    corpus = read_corpus(path)
    assert corpus.texts == ["good one", "good two"]
    (bad,) = corpus.report.bad_rows
    assert bad.line == 2 and "UTF-8" in bad.reason and str(path) in str(bad)
    with pytest.raises(CorpusError, match=r"c\.txt:2: invalid UTF-8"):
        read_corpus(path, strict=True)


@pytest.mark.parametrize("column", ["caption", "title", "text", "prompt", "Caption"])
def test_tsv_autodetects_text_column_and_keeps_metadata(tmp_path, column):
    path = tmp_path / "c.tsv"
    path.write_text(f'filepath\t{column}\n/a.jpg\ta "quoted" cat\n/b.jpg\ta dog\n')
    corpus = read_corpus(path)
    assert corpus.column == column
    assert corpus.texts == ['a "quoted" cat', "a dog"]
    assert corpus.metadata == [{"filepath": "/a.jpg"}, {"filepath": "/b.jpg"}]


def test_tsv_bad_field_count_reported_with_line(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("filepath\ttitle\n/a.jpg\tone\n/b.jpg\n/c.jpg\tthree\textra\n/d.jpg\tfour\n")
    corpus = read_corpus(path)
    assert corpus.texts == ["one", "four"]
    assert [(b.line, b.reason) for b in corpus.report.bad_rows] == [
        (3, "expected 2 fields, found 1"),
        (4, "expected 2 fields, found 3"),
    ]


def test_tsv_invalid_utf8_row(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_bytes(b"title\nfine\nbro\xc3ken\nfine too\n")
    corpus = read_corpus(path)
    assert corpus.texts == ["fine", "fine too"]
    assert corpus.report.bad_rows[0].line == 3


def test_csv_with_quotes_and_explicit_column(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('id,prompt,caption\n1,"a cat, sitting",ignored\n2,"a dog ""barking""",x\n')
    corpus = read_corpus(path, column="prompt")
    assert corpus.texts == ["a cat, sitting", 'a dog "barking"']
    assert corpus.metadata[0] == {"id": "1", "caption": "ignored"}


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(CorpusError, match="no text column found among a, b"):
        read_corpus(path)
    with pytest.raises(CorpusError, match="no column 'zzz'"):
        read_corpus(path, column="zzz")


def test_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    pd.DataFrame({"text": ["one", None, "two", "one"], "n": [1, 2, 3, 4]}).to_parquet(path)
    corpus = read_corpus(path)
    assert corpus.texts == ["one", "two"]
    assert corpus.metadata == [{"n": 1}, {"n": 3}]
    assert (corpus.report.empty, corpus.report.duplicates) == (1, 1)


def test_jsonl_bad_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"caption": "first", "url": "u1"}),
                "{not json",
                json.dumps(["a", "list"]),
                json.dumps({"other": "no caption key"}),
                json.dumps({"caption": "second", "url": "u2"}),
            ]
        )
        + "\n"
    )
    corpus = read_corpus(path)
    assert corpus.texts == ["first", "second"]
    assert [b.line for b in corpus.report.bad_rows] == [2, 3, 4]


@pytest.mark.parametrize("content,suffix", [("\n  \n\n", ".txt"), ("title\n\n", ".tsv")])
def test_no_usable_text_is_an_error(tmp_path, content, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(CorpusError, match="no usable text"):
        read_corpus(path)


def test_no_usable_text_counts_every_row(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": 5}\n{"text": null}\n{"text": ["x"]}\n{"other": 1}\n')
    with pytest.raises(CorpusError, match=r"no usable text \(4 rows: 1 empty, 3 bad\)"):
        read_corpus(path)


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_a_header_that_is_not_utf8_is_named(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(b"\x89\xfe\xa0caption\nhello\n")
    with pytest.raises(CorpusError, match=r"c\.(tsv|csv):1: the header line is not UTF-8 text"):
        read_corpus(path)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(tmp_path / "missing.tsv")
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(CorpusError, match="unknown format"):
        read_corpus(tmp_path / "c.xlsx")
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(CorpusError, match="not a readable parquet"):
        read_corpus(tmp_path / "c.parquet")
    (tmp_path / "e.tsv").write_text("")
    with pytest.raises(CorpusError, match="empty file"):
        read_corpus(tmp_path / "e.tsv")
