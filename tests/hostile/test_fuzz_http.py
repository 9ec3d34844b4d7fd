"""Random request bodies through the real app: every answer is 200 or a JSON 4xx/503, never a 500."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retriever.search.api import Retriever
from retriever.serve.app import ServerSettings, create_app

FUZZ = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

_NASTY = st.sampled_from(
    [
        "\ud800",
        "\udfff",
        "\x00",
        "\ufeff",
        "猫",
        "é",
        "",
        " ",
        "toy",
        "retrieve",
        "generate",
        "hybrid",
        "data:,",
        "AAAA",
        "Infinity",
        "NaN",
        "1e309",
        "-1",
        "0.5",
        "nan",
        'shape = "star"',
        "len <",
        "(((",
        "blue:0.5",
        ":2",
        "toy,toy",
        "off",
    ]
)
_TEXTISH = st.one_of(_NASTY, st.text(max_size=40))
_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXTISH,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXTISH, inner, max_size=3),
    max_leaves=6,
)
_FIELDS = (
    st.sampled_from(
        [
            "text",
            "k",
            "mode",
            "index",
            "dedupe",
            "image",
            "image_base64",
            "images",
            "weights",
            "diversity",
            "fetch_k",
            "where",
            "plus",
            "minus",
            "like",
            "like_index",
            "indexes",
            "generator",
        ]
    )
    | _TEXTISH
)
_OBJECTS = st.dictionaries(_FIELDS, _VALUE, max_size=5)
# A valid text query with random query options: gets past the first refusal, so each option's own checks run.
_OPTION_NAMES = [
    "diversity",
    "fetch_k",
    "dedupe",
    "where",
    "plus",
    "minus",
    "like",
    "like_index",
    "indexes",
    "weights",
    "mode",
    "k",
    "generator",
]
_NUMBERISH = st.one_of(st.floats(), st.integers(-5, 300), st.sampled_from(["0.5", "nan", "1", "-1", "inf"]))
_OPTIONS = st.fixed_dictionaries(
    {"text": st.sampled_from(["a small red star on the left", "blue"])},
    optional={
        name: st.one_of(_VALUE, _NUMBERISH, st.lists(_TEXTISH | _NUMBERISH, max_size=3)) for name in _OPTION_NAMES
    },
)


@pytest.fixture(scope="module")
def client(toy_index):
    from fastapi.testclient import TestClient

    app = create_app({"toy": Retriever.open(toy_index)}, ServerSettings(max_upload_bytes=50_000, max_text_chars=300))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c


def _assert_answered(response) -> None:
    assert response.status_code != 500 and "Traceback" not in response.text, response.text
    body = response.json()
    if response.status_code == 200:
        assert isinstance(body["hits"], list)
    else:
        assert 400 <= response.status_code < 600 and body["error"]["status"] == response.status_code


def _post(client, body: bytes, content_type: str = "application/json"):
    return client.post("/v1/query", content=body, headers={"content-type": content_type})


@FUZZ
@given(_OBJECTS)
def test_random_json_objects(client, obj):
    # surrogatepass: lone surrogates reach the server as the invalid UTF-8 a hostile client sends
    _assert_answered(_post(client, json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")))


@FUZZ
@given(_OBJECTS)
def test_random_json_objects_escaped(client, obj):
    _assert_answered(_post(client, json.dumps(obj).encode()))  # "\ud800" as a JSON escape


@FUZZ
@given(_OPTIONS)
def test_random_query_options(client, obj):
    _assert_answered(_post(client, json.dumps(obj).encode()))


@FUZZ
@given(
    st.binary(max_size=300),
    st.sampled_from(["application/json", "multipart/form-data; boundary=x", "multipart/form-data", "text/plain"]),
)
def test_random_bytes(client, body, content_type):
    _assert_answered(_post(client, body, content_type))


@FUZZ
@given(st.dictionaries(_FIELDS.filter(lambda s: "\x00" not in s), _TEXTISH, max_size=4), st.binary(max_size=200))
def test_random_multipart_forms(client, fields, image):
    safe = {
        k.encode("utf-8", "surrogatepass").decode("utf-8", "replace"): v.encode("utf-8", "surrogatepass").decode(
            "utf-8", "replace"
        )
        for k, v in fields.items()
    }
    _assert_answered(client.post("/v1/query", data=safe, files={"image": ("x.png", image, "image/png")}))
