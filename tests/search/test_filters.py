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
            "title": [f"title {i} {'cat' if i % 7 == 0 else 'dog'}" for i in range(n)],  # all distinct
            "stars": [None if i % 9 == 0 else int(v) for i, v in enumerate(rng.integers(-300, 300, n))],
            "rating": [None if i % 11 == 0 else int(v) for i, v in enumerate(rng.integers(1, 6, n))],
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
    # each way a comparison is made: numbers (narrow integers, with missing values), dictionary
    # codes (text with few distinct values), and Arrow (text with many, text order)
    ("n < 2.5", lambda r: r["n"] < 2.5),
    ("stars >= -5 and stars < 200", lambda r: r["stars"] is not None and -5 <= r["stars"] < 200),
    ("stars != 0", lambda r: r["stars"] is not None and r["stars"] != 0),
    ("stars in (-1, 1, 299.0, 1e9)", lambda r: r["stars"] in (-1, 1, 299)),
    ("not (stars > 0)", lambda r: not (r["stars"] is not None and r["stars"] > 0)),
    ("n > 100000000000", lambda r: False),
    # few distinct integers: a bitmap per value
    ("rating = 3", lambda r: r["rating"] == 3),
    ("rating != 3", lambda r: r["rating"] is not None and r["rating"] != 3),
    ("rating in (1, 5, 9)", lambda r: r["rating"] in (1, 5)),
    ("not (rating = 2) and rating = 2.5", lambda r: False),
    ("not (rating = 2)", lambda r: r["rating"] != 2),
    ("rating > 3 or rating = 1", lambda r: r["rating"] is not None and (r["rating"] > 3 or r["rating"] == 1)),
    ('source in ("coco", "nope")', lambda r: r["source"] == "coco"),
    ('source != "coco" and lang in ("xx", "yy")', lambda r: False),
    ('lang != "fr"', lambda r: r["lang"] is not None),
    ('not (lang = "en")', lambda r: r["lang"] != "en"),  # `not` of a missing value matches
    ('lang contains "e"', lambda r: r["lang"] is not None and "e" in r["lang"]),
    ('title = "title 7 cat"', lambda r: r["title"] == "title 7 cat"),
    ('title != "title 7 cat" and title contains "cat"', lambda r: r["title"] != "title 7 cat" and "cat" in r["title"]),
    ('title in ("title 1 dog", "title 2 dog")', lambda r: r["title"] in ("title 1 dog", "title 2 dog")),
    ('source < "d"', lambda r: r["source"] < "d"),
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


def test_a_filter_that_is_not_text_is_refused(table):
    with pytest.raises(FilterError, match="must be text, got list"):
        where_mask(table, ["source = 'coco'"])


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


def test_columns_are_prepared_once_in_their_narrowest_form(table):
    from retriever.search.filters import _codes, _numbers

    numbers = _numbers(table, "n", table["n"])  # 0..99
    assert _numbers(table, "n", table["n"]) is numbers and numbers.values.dtype == np.int8 and numbers.valid is None
    stars = _numbers(table, "stars", table["stars"])  # -300..299 with missing values
    assert stars.values.dtype == np.int16 and stars.valid.count == len(table) - table["stars"].null_count
    codes = _codes(table, "source", table["source"])
    assert _codes(table, "source", table["source"]) is codes and sorted(codes.values) == ["coco", "own", "sd"]
    assert _codes(table, "title", table["title"]) is None  # every title differs: Arrow compares them
    assert _numbers(table, "rating", table["rating"]).few_values and not stars.few_values


def test_equality_on_few_values_reuses_one_bitmap_per_value(table):
    from retriever.search.filters import where_rows

    assert where_rows(table, "rating = 4") is where_rows(table, "rating = 4")  # no pass over the rows
    assert where_rows(table, 'lang = "zh"') is where_rows(table, 'lang = "zh"')
    both = where_rows(table, 'rating = 4 or lang = "zh"')
    assert both.count == sum(r["rating"] == 4 or r["lang"] == "zh" for r in rows(table))
