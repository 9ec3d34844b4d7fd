"""Reading a corpus in parts (what Ray's actors do, here in one process) gives exactly the texts,
order, duplicates, counts and bad-row line numbers of a sequential read."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retriever.corpus.parts import Deduper, chunk_segments, piece_path, read_segments, scan_part, split_corpus
from retriever.corpus.reader import CorpusReport, iter_corpus
from retriever.errors import CorpusError

TEXTS = [
    "a red star",
    "",
    "a blue circle",
    "a red star",  # a duplicate, in another part once cut
    "ａ ｒｅｄ ｓｔａｒ",  # full-width: a duplicate too
    "星星 在 左边",
    "   ",
    "emoji 🎨 and an &amp; entity",
    "a blue circle",
    "the last one",
] * 3 + [f"caption number {i}" for i in range(40)]


def _write(path, texts):
    """`texts` in the format of `path`'s suffix, with bad rows mixed in."""
    suffix = path.suffix
    if suffix == ".txt":
        body = b"\xef\xbb\xbf" + b"".join(
            t.encode() + b"\n" if i % 9 else b"\xff bad utf-8\n" + t.encode() + b"\r\n" for i, t in enumerate(texts)
        )
        path.write_bytes(body)
    elif suffix == ".tsv":
        lines = ["caption\tsource"]
        for i, t in enumerate(texts):
            lines.append(f"{t}\tsrc{i % 4}")
            if i % 11 == 5:
                lines.append("too\tmany\tfields")
        body = "\r\n".join(lines[:20]) + "\n" + "\n".join(lines[20:]) + "\n"
        body = body.replace("src3\n", "src3\r", 2)  # a lone CR ends a line for the csv module
        path.write_bytes(body.encode())
    elif suffix == ".jsonl":
        lines = []
        for i, t in enumerate(texts):
            lines.append(json.dumps({"text": t, "n": i, "tags": ["x"] if i % 2 else None}, ensure_ascii=False))
            if i % 13 == 4:
                lines += ["{not json", "", "[1, 2]", json.dumps({"other": 1})]
        path.write_text("\n".join(lines))  # no final newline
    else:
        table = pa.table(
            {"caption": [t if i % 17 != 3 else None for i, t in enumerate(texts)], "n": list(range(len(texts)))}
        )
        pq.write_table(table, path, row_group_size=6)


def _parallel(path, work, parts, chunk_size, strict=False):
    layout = split_corpus(path, None, parts)
    assert layout is not None
    report, bad = CorpusReport(), []
    dedupe = Deduper(layout, report, strict, bad.append)
    kept = []
    for part in layout.parts:
        scan = scan_part(layout, part, piece_path(work, part.number))
        kept.append((part.number, dedupe.add(scan)))
    dedupe.finish()
    chunks = [read_segments(work, segments) for segments in chunk_segments(kept, chunk_size)]
    return layout, chunks, report, bad


@pytest.mark.parametrize("suffix", [".txt", ".tsv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("parts", [2, 3, 7, 500])
def test_parts_read_exactly_as_the_sequential_reader(tmp_path, suffix, parts):
    path = tmp_path / f"corpus{suffix}"
    _write(path, TEXTS)
    expected_report, expected_bad = CorpusReport(), []
    expected = list(iter_corpus(path, report=expected_report, on_bad_row=expected_bad.append))
    layout, chunks, report, bad = _parallel(path, tmp_path, parts, chunk_size=7)
    assert len(layout.parts) > 1
    assert [pair for chunk in chunks for pair in chunk] == expected
    assert [len(c) for c in chunks[:-1]] == [7] * (len(chunks) - 1)
    assert report.as_dict() == expected_report.as_dict()
    assert [str(b) for b in bad] == [str(b) for b in expected_bad]
    assert bad or suffix == ".parquet"  # a parquet column holds one type: no bad rows to make
    assert report.duplicates > 0 and report.empty > 0


def test_strict_raises_on_the_first_bad_row_with_its_line(tmp_path):
    path = tmp_path / "corpus.tsv"
    _write(path, TEXTS)
    with pytest.raises(CorpusError) as sequential:
        list(iter_corpus(path, strict=True))
    with pytest.raises(CorpusError) as parted:
        _parallel(path, tmp_path, 4, 7, strict=True)
    assert str(parted.value) == str(sequential.value)


def test_csv_and_single_parts_are_not_cut(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text('text,n\n"a caption\nover two lines",1\nplain,2\n')
    assert split_corpus(path, None, 4) is None
    tsv = tmp_path / "corpus.tsv"
    tsv.write_text("text\nonly\n")
    assert split_corpus(tsv, None, 1) is None


def test_a_corpus_of_nothing_usable_is_the_same_error(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n \n\n" * 5)
    with pytest.raises(CorpusError, match="no usable text"):
        _parallel(path, tmp_path, 3, 4)
