"""The HTTP API on the real app (FastAPI TestClient), with the toy models: answers and refusals."""

import base64
import io
import json
import threading

import pytest
from PIL import Image

from retriever.models import toyworld
from retriever.search.api import Retriever
from retriever.serve.app import ServerSettings, create_app

LIMIT = 200_000  # a small upload cap, so over-limit bodies stay cheap


@pytest.fixture(scope="module")
def client(toy_index):
    from fastapi.testclient import TestClient

    retrievers = {
        "toy": Retriever.open(toy_index, generator="toyworld-coca"),
        "captions-only": Retriever.open(generator="toyworld-coca"),
    }
    with TestClient(
        create_app(retrievers, ServerSettings(max_upload_bytes=LIMIT, max_text_chars=300)), base_url="http://127.0.0.1"
    ) as c:
        yield c


@pytest.fixture(scope="module")
def sample():
    scene = toyworld.Scene("large", "green", "triangle", "top")
    buffer = io.BytesIO()
    toyworld.render(scene, seed=9).save(buffer, format="PNG")
    return buffer.getvalue(), scene.caption


def upload(client, data: bytes, name="x.png", mime="image/png", **fields):
    return client.post("/v1/query", files={"image": (name, data, mime)}, data={k: str(v) for k, v in fields.items()})


def test_multipart_query_returns_the_cli_hit_schema(client, sample):
    response = upload(client, sample[0], k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index"] == "toy" and body["mode"] == "retrieve" and body["k"] == 3
    hits = body["hits"]
    assert hits[0]["text"] == sample[1] and hits[0]["image"] == "x.png"
    assert set(hits[0]) == {"image", "rank", "text", "score", "id", "metadata", "source", "index"}
    assert [h["rank"] for h in hits] == [1, 2, 3]


def test_json_base64_text_and_modes(client, sample):
    b64 = base64.b64encode(sample[0]).decode()
    r = client.post("/v1/query", json={"image_base64": b64, "k": 2})
    assert r.status_code == 200 and r.json()["hits"][0]["text"] == sample[1]
    r = client.post("/v1/query", json={"image": "data:image/png;base64," + b64, "mode": "hybrid", "k": 2})
    assert r.status_code == 200 and r.json()["hits"][0]["text"] == sample[1]
    r = client.post("/v1/query", json={"image_base64": b64, "mode": "generate", "index": "captions-only"})
    assert (
        r.status_code == 200 and r.json()["hits"][0] | {"text": sample[1], "source": "generated"} == r.json()["hits"][0]
    )
    r = client.post("/v1/query", json={"text": "a small red star on the left", "k": 1, "dedupe": True})
    assert r.json()["hits"][0]["text"] == "a small red star on the left" and r.json()["hits"][0]["query_text"]
    # an image and a text together (not one or the other): the text steers the image's query
    r = client.post("/v1/query", json={"image_base64": b64, "text": "blue", "k": 3, "mode": "hybrid"})
    assert r.status_code == 200, r.text
    assert r.json()["hits"][0]["image"] == "upload" and r.json()["hits"][0]["query_text"] == "blue"


def test_indexes_health_and_openapi(client):
    indexes = client.get("/v1/indexes").json()
    assert indexes["default"] == "toy"
    toy = next(i for i in indexes["indexes"] if i["name"] == "toy")
    assert toy["count"] == 256 and toy["model"] == "toyworld" and toy["modes"] == ["retrieve", "generate", "hybrid"]
    assert client.get("/healthz").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert "/v1/query" in schema["paths"] and "multipart/form-data" in json.dumps(schema["paths"]["/v1/query"])
    page = client.get("/")
    assert page.status_code == 200 and "<title>retriever" in page.text


def _png(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG")  # 144M pixels > 2x Pillow's default limit
    return buffer.getvalue()


HOSTILE = [
    # (name, request kwargs, status, phrase in the message)
    ("not an image", {"files": {"image": ("x.png", b"hello, not a picture", "image/png")}}, 400, "not an image"),
    ("empty upload", {"files": {"image": ("x.png", b"", "image/png")}}, 400, "empty"),
    ("truncated png", {"files": {"image": ("x.png", _png((64, 64))[:60], "image/png")}}, 400, "truncated"),
    ("decompression bomb", {"files": {"image": ("b.png", _bomb(), "image/png")}}, 413, "decompression bomb"),
    (
        "over the size cap",
        {"files": {"image": ("big.png", b"\x89PNG" + b"0" * (LIMIT + 10), "image/png")}},
        413,
        "limit",
    ),
    (
        "plain text body",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported content type",
    ),
    ("no content type", {"content": b"hello"}, 415, "unsupported content type"),
    ("xml body", {"content": b"<a/>", "headers": {"content-type": "application/xml"}}, 415, "multipart"),
    ("malformed json", {"content": b'{"k": 3', "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ("json array", {"json": [1, 2]}, 400, "must be an object"),
    ("bad base64", {"json": {"image_base64": "not base64!!"}}, 400, "base64"),
    ("base64 not a string", {"json": {"image_base64": 12}}, 400, "base64 string"),
    ("base64 of text", {"json": {"image_base64": base64.b64encode(b"plain words").decode()}}, 400, "not an image"),
    ("k zero", {"json": {"text": "a star", "k": 0}}, 400, "between 1 and 1000"),
    ("k too big", {"json": {"text": "a star", "k": 1001}}, 400, "between 1 and 1000"),
    (
        "k negative form",
        {"files": {"image": ("x.png", _png(), "image/png")}, "data": {"k": "-3"}},
        400,
        "between 1 and 1000",
    ),
    ("k not a number", {"json": {"text": "a star", "k": "ten"}}, 400, "integer"),
    ("k a float", {"json": {"text": "a star", "k": 2.5}}, 400, "integer"),
    ("k a boolean", {"json": {"text": "a star", "k": True}}, 400, "integer"),
    ("unknown index", {"json": {"text": "a star", "index": "nope"}}, 404, "unknown index"),
    ("unknown mode", {"json": {"text": "a star", "mode": "poetry"}}, 400, "mode"),
    ("text with generate", {"json": {"text": "a star", "mode": "generate"}}, 400, "only retrieve"),
    ("text too long", {"json": {"text": "star " * 100}}, 400, "limit is 300"),
    ("empty text", {"json": {"text": "   "}}, 400, "non-empty"),
    ("text not a string", {"json": {"text": ["a"]}}, 400, "non-empty string"),
    ("neither image nor text", {"json": {"k": 3}}, 400, "send an image (or images), a text, or like"),
    ("text with hybrid", {"json": {"text": "a star", "mode": "hybrid"}}, 400, "only retrieve"),
    (
        "steering with generate",
        {"json": {"image_base64": base64.b64encode(_png()).decode(), "mode": "generate", "plus": ["blue"]}},
        400,
        "mode=generate writes captions without an index: plus",
    ),
    ("unknown json field", {"json": {"text": "a star", "colour": "red"}}, 400, "unknown field"),
    ("bad dedupe", {"json": {"text": "a star", "dedupe": "maybe"}}, 400, "dedupe"),
    ("multipart without image", {"files": {"other": ("x.txt", b"abc", "text/plain")}}, 400, "send an image"),
    (
        "broken multipart",
        {"content": b"--xyz\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
        400,
        "",
    ),
    ("retrieve on a generator-only index", {"json": {"text": "a star", "index": "captions-only"}}, 400, "no index"),
]


@pytest.mark.parametrize("name,kwargs,status,phrase", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_a_clear_4xx(client, name, kwargs, status, phrase):
    response = client.post("/v1/query", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and phrase in error["message"]
    assert "Traceback" not in response.text


def test_wrong_method_and_path_are_json_errors(client):
    assert client.get("/v1/query").status_code == 405
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["status"] == 404


def test_full_queue_answers_503_with_retry_after(toy_index, sample):
    """With room for one query, a second concurrent one is refused, not queued."""
    from fastapi.testclient import TestClient

    retriever = Retriever.open(toy_index)
    started, release = threading.Event(), threading.Event()
    original = retriever.query

    def slow_query(*args, **kwargs):
        started.set()
        release.wait(10)
        return original(*args, **kwargs)

    retriever.query = slow_query
    with TestClient(create_app({"toy": retriever}, ServerSettings(max_pending=1)), base_url="http://localhost") as c:
        first = {}
        thread = threading.Thread(target=lambda: first.update(r=upload(c, sample[0])))
        thread.start()
        assert started.wait(10)
        second = upload(c, sample[0])
        release.set()
        thread.join(10)
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "busy" in second.json()["error"]["message"]
    assert first["r"].status_code == 200
