"""Hostile clients against the HTTP server: bodies built to crash it, exhaust it or hold it,
and requests from places that must not reach it (other Host names, other sites' pages, no key).

Most cases run on FastAPI's TestClient; time and connection behaviour (slow loris, the pending
gate, the start-up warning) run against a real `retriever serve` on a free loopback port.
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from hostile_checks import assert_clean_error

from retriever.search.api import Retriever
from retriever.serve import security
from retriever.serve.app import ServerSettings, create_app
from retriever.serve.security import allowed_hosts, exposure_warning

LIMIT = 100_000
KEY = "s3cret-key-for-tests"
ORIGIN = "http://127.0.0.1"


@pytest.fixture(scope="module")
def retriever(toy_index):
    return Retriever.open(toy_index)


@pytest.fixture(scope="module")
def client(retriever):
    from fastapi.testclient import TestClient

    app = create_app({"toy": retriever}, ServerSettings(max_upload_bytes=LIMIT, max_text_chars=300))
    with TestClient(app, base_url=ORIGIN, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(retriever):
    from fastapi.testclient import TestClient

    settings = ServerSettings(api_key=KEY, allowed_hosts=allowed_hosts("127.0.0.1", ["retriever.lan"]))
    with TestClient(create_app({"toy": retriever}, settings), base_url=ORIGIN, raise_server_exceptions=False) as c:
        yield c


def assert_refused(response, status: int, phrase: str = "") -> str:
    """A JSON refusal with `status` whose message holds `phrase`; never a traceback."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert error["status"] == status and phrase in error["message"], error
    return error["message"]


def post_raw(client, body: bytes | str, content_type="application/json", **headers):
    return client.post("/v1/query", content=body, headers={"content-type": content_type, **headers})


# --- bodies that once gave 500s ---------------------------------------------------------------

RAW_JSON = [
    # (name, raw JSON body, status, phrase)
    ("k Infinity", '{"text": "a star", "k": Infinity}', 400, "Infinity is not a JSON number"),
    ("k -Infinity", '{"text": "a star", "k": -Infinity}', 400, "not a JSON number"),
    ("k NaN", '{"text": "a star", "k": NaN}', 400, "NaN is not a JSON number"),
    ("k 1e309 overflows to inf", '{"text": "a star", "k": 1e309}', 400, "k must be an integer"),
    ("k negative", '{"text": "a star", "k": -5}', 400, "between 1 and 1000"),
    ("k huge", '{"text": "a star", "k": ' + "9" * 100 + "}", 400, "between 1 and 1000"),
    ("k of 5000 digits", '{"text": "a star", "k": ' + "9" * 5000 + "}", 400, "malformed JSON"),
    ("k a string of 40 digits", '{"text": "a star", "k": "' + "9" * 40 + '"}', 400, "between 1 and 1000"),
    ("k a list", '{"text": "a star", "k": [3]}', 400, "k must be an integer, got an array"),
    ("k an object", '{"text": "a star", "k": {"n": 3}}', 400, "k must be an integer, got an object"),
    ("k null", '{"text": "a star", "k": null}', 400, "k must be an integer"),
    ("index a list", '{"text": "a star", "index": ["toy"]}', 400, "index must be a string, not an array"),
    ("index an object", '{"text": "a star", "index": {"toy": 1}}', 400, "index must be a string, not an object"),
    ("index a number", '{"text": "a star", "index": 7}', 400, "index must be a string"),
    ("mode a list", '{"text": "a star", "mode": ["retrieve"]}', 400, "mode must be a string"),
    ("text lone surrogate", '{"text": "\\ud800"}', 400, "lone surrogate"),
    ("text ends in a lone surrogate", '{"text": "a red star \\udfff"}', 400, "lone surrogate"),
    ("index lone surrogate", '{"text": "a star", "index": "\\ud800"}', 400, "lone surrogate"),
    ("field name lone surrogate", '{"text": "a star", "\\ud800": 1}', 400, "unknown field"),
    ("deeply nested array", "[" * 40_000 + "]" * 40_000, 400, "nested too deeply"),
    ("deeply nested field", '{"text": ' + "[" * 40_000 + "]" * 40_000 + "}", 400, "nested too deeply"),
    ("null body", "null", 400, "must be an object, not null"),
    ("string body", '"a star"', 400, "must be an object, not a string"),
    ("number body", "3", 400, "must be an object, not a number"),
    ("boolean body", "true", 400, "must be an object"),
    ("image a list", '{"image_base64": ["AAAA"]}', 400, "base64 string, not an array"),
    ("image twice", '{"image": "AAAA", "image_base64": "AAAA"}', 400, "once"),
    ("dedupe an object", '{"text": "a star", "dedupe": {}}', 400, "dedupe must be true, false or a cosine"),
    # the query options (issue 12): each field typed and bounded before use
    ("dedupe zero", '{"text": "a star", "dedupe": 0}', 400, "a cosine in (0, 1], got 0"),
    ("dedupe above 1", '{"text": "a star", "dedupe": 1.5}', 400, "a cosine in (0, 1]"),
    ("dedupe a word", '{"text": "a star", "dedupe": "maybe"}', 400, "dedupe must be true, false or a cosine"),
    ("dedupe nan string", '{"text": "a star", "dedupe": "nan"}', 400, "dedupe must be"),
    ("diversity NaN", '{"text": "a star", "diversity": NaN}', 400, "NaN is not a JSON number"),
    ("diversity 1e309", '{"text": "a star", "diversity": 1e309}', 400, "diversity must be between 0 and 1"),
    ("diversity nan string", '{"text": "a star", "diversity": "nan"}', 400, "diversity must be between 0 and 1"),
    ("diversity 2", '{"text": "a star", "diversity": 2}', 400, "diversity must be between 0 and 1, got 2"),
    ("diversity negative", '{"text": "a star", "diversity": -0.1}', 400, "between 0 and 1"),
    ("diversity a list", '{"text": "a star", "diversity": [0.5]}', 400, "diversity must be a number, got an array"),
    ("diversity a boolean", '{"text": "a star", "diversity": true}', 400, "diversity must be a number"),
    ("diversity a word", '{"text": "a star", "diversity": "lots"}', 400, "diversity must be a number"),
    ("fetch_k zero", '{"text": "a star", "fetch_k": 0}', 400, "fetch_k must be between 1 and 10000"),
    ("fetch_k huge", '{"text": "a star", "fetch_k": 1000000000}', 400, "fetch_k must be between 1 and 10000"),
    ("fetch_k a float", '{"text": "a star", "fetch_k": 2.5}', 400, "fetch_k must be an integer"),
    ("where a list", '{"text": "a star", "where": ["len < 3"]}', 400, "where must be a string, not an array"),
    ("where empty", '{"text": "a star", "where": "  "}', 400, "where must be a non-empty string"),
    ("where lone surrogate", '{"text": "a star", "where": "shape = \\"\\ud800\\""}', 400, "lone surrogate"),
    ("where too long", '{"text": "a star", "where": "' + "len < 3 or " * 300 + 'len < 3"}', 400, "the limit is 300"),
    ("where syntax", '{"text": "a star", "where": "shape = = 3"}', 400, "where: expected a value"),
    ("where python", '{"text": "a star", "where": "__import__(\'os\').system(\'id\')"}', 400, "where:"),
    (
        "where deep parentheses",
        '{"text": "a star", "where": "' + "(" * 60 + "len < 3" + ")" * 60 + '"}',
        400,
        "nested too deeply",
    ),
    ("where unknown column", '{"text": "a star", "where": "flavour = 1"}', 400, "no column 'flavour'"),
    ("where wrong type", '{"text": "a star", "where": "len = \\"long\\""}', 400, "cannot compare column 'len'"),
    ("plus a number", '{"text": "a star", "plus": 3}', 400, "plus[0] must be a text or an object"),
    ("plus item a list", '{"text": "a star", "plus": [["blue"]]}', 400, "plus[0] must be a text or an object"),
    ("plus empty text", '{"text": "a star", "plus": [""]}', 400, "plus[0] must be a non-empty string"),
    ("plus only a weight", '{"text": "a star", "plus": [":0.5"]}', 400, "empty modifier"),
    ("plus weight zero", '{"text": "a star", "plus": ["blue:0"]}', 400, "positive number"),
    ("plus lone surrogate", '{"text": "a star", "minus": ["\\udfff"]}', 400, "lone surrogate"),
    ("plus object without text", '{"text": "a star", "plus": [{"weight": 2}]}', 400, "plus[0] needs a text"),
    ("plus object extra key", '{"text": "a star", "plus": [{"text": "blue", "w": 2}]}', 400, "unknown key(s) 'w'"),
    (
        "plus weight Infinity",
        '{"text": "a star", "plus": [{"text": "blue", "weight": 1e309}]}',
        400,
        "plus[0].weight must be between",
    ),
    ("plus weight negative", '{"text": "a star", "minus": [{"text": "blue", "weight": -1}]}', 400, "minus[0].weight"),
    (
        "plus weight a string",
        '{"text": "a star", "plus": [{"text": "blue", "weight": "heavy"}]}',
        400,
        "must be a number",
    ),
    (
        "plus too many",
        '{"text": "a star", "plus": [' + ", ".join(['"blue"'] * 17) + "]}",
        400,
        "plus holds 17 items; the limit is 16",
    ),
    ("plus text too long", '{"text": "a star", "plus": ["' + "b" * 301 + '"]}', 400, "the limit is 300"),
    ("modifiers cancel the query", '{"text": "a star", "minus": ["a star"]}', 400, "cancel the query out"),
    ("images not a list", '{"images": "AAAA"}', 400, "images must be an array of base64 strings, not a string"),
    ("images empty", '{"images": []}', 400, "images is empty"),
    ("images too many", '{"images": [' + ", ".join(['"AAAA"'] * 9) + "]}", 400, "images holds 9 items; the limit is 8"),
    ("images item a number", '{"images": ["AAAA", 7]}', 400, "images[1] must be a base64 string, not a number"),
    ("images item bad base64", '{"images": ["AAAA", "%%%"]}', 400, "images[1] is not valid base64"),
    ("images of text", '{"images": ["' + base64.b64encode(b"words").decode() + '", "AAAA"]}', 400, "not an image"),
    ("image and images", '{"image": "AAAA", "images": ["AAAA"]}', 400, "image or images, not both"),
    ("weights without images", '{"text": "a star", "weights": [1]}', 400, "weights are for blending images"),
    ("weights count", '{"images": ["AAAA", "AAAA"], "weights": [1, 2, 3]}', 400, "3 weights for 2 image(s)"),
    ("weights zero", '{"images": ["AAAA", "AAAA"], "weights": [1, 0]}', 400, "weights[1] must be a positive number"),
    ("weights NaN string", '{"images": ["AAAA", "AAAA"], "weights": ["1", "nan"]}', 400, "weights[1] must be between"),
    ("weights an object", '{"images": ["AAAA", "AAAA"], "weights": {"a": 1}}', 400, "weights[0] must be a number"),
    ("like negative", '{"like": -1}', 400, "like must be between 0 and"),
    ("like a word", '{"like": "first"}', 400, "like must be an integer"),
    ("like a float", '{"like": 1.5}', 400, "like must be an integer"),
    ("like huge", '{"like": 99999999999999999999}', 400, "like must be between"),
    ("like past the end", '{"like": 5000}', 400, "no row 5000 (ids run from 0 to 255)"),
    ("like with a text", '{"like": 1, "text": "a star"}', 400, "like queries with an indexed text alone"),
    ("like_index alone", '{"text": "a star", "like_index": "toy"}', 400, "send like (an id) too"),
    ("like_index unknown", '{"like": 1, "like_index": "nope"}', 404, "unknown index 'nope'"),
    ("like_index a list", '{"like": 1, "like_index": ["toy"]}', 400, "like_index must be a string"),
    ("indexes a number", '{"text": "a star", "indexes": [1]}', 400, "indexes[0] must be an index name"),
    ("indexes empty string", '{"text": "a star", "indexes": [""]}', 400, "indexes[0] must be an index name"),
    ("indexes empty", '{"text": "a star", "indexes": []}', 400, "indexes is empty"),
    (
        "indexes over the loaded count",
        '{"text": "a star", "indexes": ["toy", "b", "toy"]}',
        400,
        "holds 2 names; the limit is 1",
    ),
    ("indexes unknown", '{"text": "a star", "indexes": ["nope"]}', 404, "unknown index 'nope'"),
    ("indexes lone surrogate", '{"text": "a star", "indexes": ["\\ud800"]}', 400, "lone surrogate"),
    ("index and indexes", '{"text": "a star", "index": "toy", "indexes": ["toy"]}', 400, "not both"),
    ("empty body", "", 400, "malformed JSON"),
]


@pytest.mark.parametrize("name,body,status,phrase", RAW_JSON, ids=[case[0] for case in RAW_JSON])
def test_hostile_json_gets_a_clear_4xx(client, name, body, status, phrase):
    assert_refused(post_raw(client, body.encode("utf-8")), status, phrase)


CONTENT_TYPES = [
    # a cross-site <form> can send these three without a preflight; JSON must not pass as them
    ("text/plain", b'{"text": "a star"}', 415, "unsupported content type 'text/plain'"),
    ("application/x-www-form-urlencoded", b"text=a+star", 415, "unsupported content type"),
    ("multipart/form-data", b"--x\r\n", 400, "malformed multipart"),  # no boundary
    ("multipart/mixed; boundary=x", b"--x--\r\n", 415, "multipart/form-data"),
    ("application/json; charset=utf-8", b"\xff\xfe\xfa not utf-8", 400, "malformed JSON"),
    ("", b'{"text": "a star"}', 415, "(none)"),
]


@pytest.mark.parametrize("content_type,body,status,phrase", CONTENT_TYPES, ids=[c[0] or "none" for c in CONTENT_TYPES])
def test_wrong_content_types_are_refused(client, content_type, body, status, phrase):
    assert_refused(post_raw(client, body, content_type), status, phrase)


def test_a_valid_text_query_still_answers(client):
    response = client.post("/v1/query", json={"text": "a small red star on the left", "k": "2"})
    assert response.status_code == 200 and response.json()["hits"][0]["text"] == "a small red star on the left"


def test_form_filename_that_cannot_be_encoded_is_replaced(client):
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="\xed\xa0\x80.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + buffer.getvalue() + b"\r\n--b--\r\n"
    )
    response = post_raw(client, body, "multipart/form-data; boundary=b")
    assert response.status_code == 200, response.text
    json.dumps(response.json(), ensure_ascii=False).encode("utf-8")


# --- body size ------------------------------------------------------------------------------------


def test_declared_oversize_body_is_refused_before_reading(client):
    response = post_raw(client, b'{"text": "' + b"a" * (LIMIT + 10) + b'"}')
    assert_refused(response, 413, "limit is 0.1 MB")


def test_chunked_oversize_body_is_counted_and_refused(client):
    sent = []

    def chunks():  # a generator body goes out chunked, with no Content-Length
        for _ in range(50):
            sent.append(1)
            yield b"x" * 10_000

    response = client.post("/v1/query", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_refused(response, 413, "over the limit")


# --- damaged index --------------------------------------------------------------------------------


def test_damaged_index_found_at_start_is_refused_and_reported(toy_index, tmp_path):
    pytest.importorskip("retriever.index.verify")
    from fastapi.testclient import TestClient

    copy = tmp_path / "toy"
    shutil.copytree(toy_index, copy)
    # a byte of the stored vectors: same size, other hash; only the start-up check can tell
    target = next(copy / name for name in ("vectors.f16.npy", "index.faiss") if (copy / name).exists())
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    app = create_app({"toy": Retriever.open(copy)}, ServerSettings())
    with TestClient(app, base_url=ORIGIN) as c:
        app.state.health.thread.join(30)
        health = c.get("/healthz").json()
        assert health["status"] == "degraded" and health["indexes"]["toy"]["state"] == "damaged"
        assert target.name in health["indexes"]["toy"]["detail"]
        message = assert_refused(c.post("/v1/query", json={"text": "a star"}), 503, "index toy is damaged")
        assert target.name in message


def test_good_index_is_verified_ok(client):
    client.app.state.health.thread.join(30)
    assert client.get("/healthz").json()["indexes"]["toy"]["state"] == "ok"


# --- Host, origin, API key -----------------------------------------------------------------------


def test_dns_rebinding_host_is_refused(client):
    assert_refused(client.get("/v1/indexes", headers={"host": "evil.example"}), 400, "'evil.example' is not served")
    assert_refused(client.post("/v1/query", json={"text": "a star"}, headers={"host": "evil.example:8000"}), 400)
    assert client.get("/v1/indexes", headers={"host": "localhost:8000"}).status_code == 200


def test_allowed_host_option_admits_a_lan_name(keyed):
    response = keyed.get("/v1/indexes", headers={"host": "retriever.lan:8000", "x-api-key": KEY})
    assert response.status_code == 200


def _form_post(client, **headers):
    return client.post("/v1/query", files={"image": ("x.png", b"not an image", "image/png")}, headers=headers)


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "null"},  # a sandboxed iframe or a file:// page
        {"origin": "http://127.0.0.1:9999"},  # another port is another origin
        {"sec-fetch-site": "cross-site"},
        {"referer": "http://evil.example/page.html"},
    ],
    ids=["other origin", "null origin", "other port", "sec-fetch-site", "referer"],
)
def test_cross_site_form_post_is_refused(client, headers):
    assert_refused(_form_post(client, **headers), 403, "cross-site request refused")


def test_same_origin_post_passes(client):
    response = client.post(
        "/v1/query",
        json={"text": "a small red star on the left", "k": 1},
        headers={"origin": ORIGIN, "sec-fetch-site": "same-origin"},
    )
    assert response.status_code == 200, response.text
    assert_refused(_form_post(client, origin=ORIGIN, referer=ORIGIN + "/"), 400, "not an image")


def test_api_key_missing_wrong_and_right(keyed, monkeypatch):
    compared = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    query = {"text": "a small red star on the left", "k": 1}
    response = keyed.post("/v1/query", json=query)
    assert_refused(response, 401, "needs an API key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_refused(keyed.post("/v1/query", json=query, headers={"x-api-key": KEY[:-1]}), 401, "wrong API key")
    assert_refused(keyed.post("/v1/query", json=query, headers={"authorization": "Basic " + KEY}), 401)
    assert keyed.post("/v1/query", json=query, headers={"authorization": "Bearer " + KEY}).status_code == 200
    assert keyed.post("/v1/query", json=query, headers={"x-api-key": KEY}).status_code == 200
    assert (KEY[:-1].encode(), KEY.encode()) in compared and (KEY.encode(), KEY.encode()) in compared


def test_api_key_guards_everything_but_the_page(keyed):
    assert_refused(keyed.get("/v1/indexes"), 401)
    assert_refused(keyed.get("/healthz"), 401)
    page = keyed.get("/")
    assert page.status_code == 200 and 'id="auth"' in page.text
    assert keyed.get("/openapi.json").status_code == 200
    assert_refused(keyed.post("/", headers={"origin": ORIGIN}), 401)  # the page is public to read only


def test_api_key_from_file_and_environment(tmp_path, run_cli):
    key_file = tmp_path / "key"
    key_file.write_text("  abc123\n")
    assert security.read_api_key(key_file, {}) == "abc123"
    assert security.read_api_key(None, {"RETRIEVER_API_KEY": "from-env"}) == "from-env"
    assert security.read_api_key(None, {}) is None
    key_file.write_text("\n")
    result = run_cli("serve", "--generator", "toyworld-coca", "--api-key-file", key_file, timeout=60)
    assert_clean_error(result, "is empty")


def test_exposure_warning_only_beyond_loopback_without_a_key():
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("localhost", None) is None
    assert exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert "without an API key" in exposure_warning("192.168.1.5", None)
    assert "0.0.0.0" not in allowed_hosts("0.0.0.0") and "192.168.1.5" in allowed_hosts("192.168.1.5")


# --- a real server: time and connections ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RETRIEVER_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "retriever", "serve", *args, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def server(toy_index):
    port = _free_port()
    proc = _start(
        "--index", str(toy_index), "--max-pending", "1", "--read-timeout", "2", "--max-upload", "1M", port=port
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read()) from None
            time.sleep(0.3)
    yield port
    proc.terminate()
    proc.wait(10)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _head(port: int, length: int) -> bytes:
    return (
        f"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _read_response(sock: socket.socket) -> bytes:
    """One response, status line to the end of its Content-Length body (or to the close)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0
    )
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Trickle `trickle` a byte every 0.25 s until the server closes; seconds it took (or inf)."""
    start = time.monotonic()
    sock.settimeout(0.25)
    i = 0
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - start
        try:
            sock.sendall(trickle[i % len(trickle) : i % len(trickle) + 1] if trickle else b"")
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        i += 1
    return float("inf")


def _pending(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return json.load(r)["pending"]


def test_slow_loris_body_is_cut_off(server):
    with _connect(server) as sock:
        sock.sendall(_head(server, 1000) + b'{"text": ')
        took = _closed_within(sock, 10, trickle=b'"' + b"a" * 900)
    assert took < 5, f"a 1-byte-per-0.25-s body held the connection for {took:.1f} s (--read-timeout 2)"
    deadline = time.monotonic() + 5
    while _pending(server) and time.monotonic() < deadline:  # the slot comes back
        time.sleep(0.1)
    assert _pending(server) == 0


def test_slow_loris_headers_are_cut_off(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        took = _closed_within(sock, 10, trickle=b"X-Slow: " + b"a" * 200)
    assert took < 5, f"headers trickled for {took:.1f} s without a cut"


def test_silent_connection_is_cut_off(server):
    with _connect(server) as sock:
        took = _closed_within(sock, 10)
    assert took < 5


def test_pending_gate_answers_503_without_reading_the_body(server):
    holder = _connect(server)
    try:
        holder.sendall(_head(server, 500) + b'{"text": "a st')  # holds the only slot, reading its body
        deadline = time.monotonic() + 5
        while _pending(server) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pending(server) == 1
        with _connect(server) as second:
            started = time.monotonic()
            second.sendall(_head(server, 900_000))  # headers only: its body is never sent
            response = _read_response(second)
            assert time.monotonic() - started < 2
        assert response.startswith(b"HTTP/1.1 503"), response[:200]
        assert b"retry-after: 1" in response.lower() and b"busy" in response
    finally:
        holder.close()


def test_declared_oversize_is_refused_before_the_body_is_sent(server):
    with _connect(server) as sock:
        sock.sendall(_head(server, 50 * 2**20))
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 413") and b"the limit is 1.0 MB" in response


def test_chunked_oversize_on_a_real_server(server):
    with _connect(server) as sock:
        sock.sendall(
            f"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1:{server}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"a" * 64 * 1024)
        response = b""
        try:
            for _ in range(40):  # 2.5 MB against a 1 MB limit
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]


def test_evil_host_on_a_real_server(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /v1/indexes HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 400")


def test_port_in_use_is_a_clean_error(server, toy_index, run_cli):
    result = run_cli("serve", "--index", toy_index, "--port", server, timeout=60)
    assert_clean_error(result, f"cannot listen on 127.0.0.1:{server}")


def test_warning_when_binding_beyond_loopback_without_a_key(toy_index):
    """The real process with --host 0.0.0.0: stopped as soon as it warns, before it listens."""
    import threading

    proc = _start("--index", str(toy_index), "--host", "0.0.0.0", port=_free_port())
    guard = threading.Timer(60, proc.kill)  # readline below must not wait forever
    guard.start()
    try:
        line = proc.stderr.readline()  # the warning is the first thing it prints
    finally:
        guard.cancel()
        proc.kill()
        proc.wait(10)
    assert line.startswith("warning: serving on 0.0.0.0 without an API key"), line
