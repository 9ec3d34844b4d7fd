"""--where: parsed safely, evaluated over whole columns, checked against plain Python."""

import numpy as np
import pyarrow as pa
import pytest

from retriever.search.filters import FilterError, parse_where, where_mask


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    n = 500
    texts = [" ".join(["word"] * int(rng.integers(1, 20))) + (" cat" if rng.random() < 0.3 else "") for _ in range(n)]
    return pa.table(
        {
            "id": np.arange(n),
            "text": texts,
            "source": rng.choice(["coco", "sd", "own"], n),
            "lang": [None if rng.random() < 0.1 else str(v) for v in rng.choice(["en", "zh", "de"], n)],
            "score": rng.random(n),
            "n": rng.integers(0, 100, n),
            # numbers as a TSV file gives them: text, of different lengths, some missing or not numbers
            "likes": [str(v) if v < 900 else ("" if v < 950 else "n/a") for v in rng.integers(0, 1000, n)],
            "weight": [f" {v:.3g} " if v < 0.9 else "+1e1" for v in rng.random(n) * 2],
        }
    )


def rows(table):
    return table.to_pylist()


CASES = [
    ('source = "coco"', lambda r: r["source"] == "coco"),
    ("source == 'sd'", lambda r: r["source"] == "sd"),
    ("len < 60", lambda r: len(r["text"]) < 60),
    ('lang in ("en", "zh")', lambda r: r["lang"] in ("en", "zh")),
    ('text contains "cat"', lambda r: "cat" in r["text"]),
    ("n >= 50 and score < 0.5", lambda r: r["n"] >= 50 and r["score"] < 0.5),
    ('not (source = "coco") or n = 3', lambda r: r["source"] != "coco" or r["n"] == 3),
    (
        'source != "own" and (lang = "de" or len > 80)',
        lambda r: r["source"] != "own" and (r["lang"] == "de" or len(r["text"]) > 80),
    ),
    ("lang = null", lambda r: r["lang"] is None),
    ("lang != null", lambda r: r["lang"] is not None),
    ('lang != "en"', lambda r: r["lang"] is not None and r["lang"] != "en"),  # missing never matches
    ("score > 1e-1", lambda r: r["score"] > 0.1),
    ("likes > 50", lambda r: r["likes"].isdigit() and int(r["likes"]) > 50),
    ("likes <= 9 or likes = 100", lambda r: r["likes"].isdigit() and (int(r["likes"]) <= 9 or int(r["likes"]) == 100)),
    ("likes in (7, 70, 700)", lambda r: r["likes"] in ("7", "70", "700")),
    ("likes in (9, 10, null)", lambda r: r["likes"] in ("9", "10")),  # a null in the list matches nothing
    ('likes = "n/a"', lambda r: r["likes"] == "n/a"),  # a quoted value still compares as text
    ("weight >= 0.5", lambda r: float(r["weight"]) >= 0.5),
]


@pytest.mark.parametrize("expression, expected", CASES)
def test_matches_plain_python(table, expression, expected):
    mask = where_mask(table, expression)
    assert mask.tolist() == [bool(expected(r)) for r in rows(table)]


@pytest.mark.parametrize(
    "expression, message",
    [
        ("", "empty"),
        ("source =", "expected a value"),
        ('source = "coco" and', "expected a column name"),
        ('(source = "coco"', "expected ')'"),
        ('source ~ "x"', "unexpected"),
        ("__import__('os').system('true')", "unexpected"),
        ("nope = 1", "no column 'nope'"),
        ('n < "abc"', "cannot compare"),
        ("n contains 3", "quoted string"),
        ("(" * 60 + "n = 1" + ")" * 60, "nested too deeply"),
    ],
)
def test_errors_say_where(table, expression, message):
    with pytest.raises(FilterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        where_mask(table, expression)


def test_tree_shape_and_precedence():
    assert parse_where("a = 1 or b = 2 and not c = 3") == (
        "or",
        ("==", "a", 1),
        ("and", ("==", "b", 2), ("not", ("==", "c", 3))),
    )
    assert parse_where('t contains "say \\"hi\\""') == ("contains", "t", 'say "hi"')


def test_a_text_column_is_parsed_as_numbers_once_per_table(table):
    from retriever.search.filters import _as_numbers

    first = _as_numbers(table, "likes", table["likes"])
    assert _as_numbers(table, "likes", table["likes"]) is first and str(first.type) == "int64"
    assert where_mask(table, "likes < 10").sum() == sum(
        r["likes"].isdigit() and int(r["likes"]) < 10 for r in rows(table)
    )
    other = pa.table({"likes": ["1", "2"]})
    assert _as_numbers(other, "likes", other["likes"]).to_pylist() == [1, 2]  # another table: its own
