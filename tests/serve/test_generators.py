"""A server started with several generators (`retriever serve --generator A --generator B`): the
query's `generator` field picks the one that writes captions, a style decoder's hits are
`styled`, and a style decoder only serves the indexes of the CLIP model it was trained with.
Real bundled models throughout: toyworld (CLIP), toyworld-coca, style:toyworld-style."""

import base64
import io
import json
import shutil

import pytest

from retriever.errors import RetrieverError
from retriever.models import toyworld
from retriever.models.loading import BUNDLED_DIR
from retriever.serve.app import create_app
from retriever.serve.generators import open_served

pytest.importorskip("fastapi", reason="the serve extra is not installed")

STYLE = "style:toyworld-style"
SCENE = toyworld.Scene("large", "green", "triangle", "top")


@pytest.fixture(scope="module")
def partial_index(tmp_path_factory, toy_model):
    """The toy captions but SCENE's: its image's best retrieved score is weak, so hybrid generates."""
    from retriever.index.build import build_index

    corpus = tmp_path_factory.mktemp("partial") / "partial.txt"
    corpus.write_text("\n".join(s.caption for s in toyworld.all_scenes() if s.caption != SCENE.caption) + "\n")
    out = tmp_path_factory.mktemp("indexes-partial") / "partial"
    build_index(corpus, out, toy_model, show_progress_bar=False)
    return out


@pytest.fixture(scope="module")
def other_clip_index(tmp_path_factory, toy_corpus):
    """An index built with another CLIP model: the toy weights saved with other metadata (another fingerprint)."""
    from safetensors.torch import load_file, save_file

    from retriever.index.build import build_index
    from retriever.models.loading import load_model

    model_dir = tmp_path_factory.mktemp("other-clip")
    shutil.copy(BUNDLED_DIR / "toyworld" / "open_clip_config.json", model_dir)
    weights = load_file(BUNDLED_DIR / "toyworld" / "open_clip_model.safetensors")
    save_file(weights, model_dir / "open_clip_model.safetensors", metadata={"variant": "another model"})
    out = tmp_path_factory.mktemp("indexes-other") / "other"
    build_index(toy_corpus, out, load_model(f"local-dir:{model_dir}", device="cpu"), show_progress_bar=False)
    return out


@pytest.fixture(scope="module")
def served(toy_index, partial_index, other_clip_index):
    # what `retriever serve --index ... --generator toyworld-coca --generator style:toyworld-style` builds
    return open_served([toy_index, partial_index, other_clip_index], ["toyworld-coca", STYLE], device="cpu")


@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient

    with TestClient(create_app(served.retrievers, generators=served.generators), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def image():
    buffer = io.BytesIO()
    toyworld.render(SCENE, seed=9).save(buffer, format="PNG")
    return buffer.getvalue()


def style_of_another_clip(tmp_path):
    """The bundled style decoder, recorded as trained with a CLIP model that built no index here."""
    folder = tmp_path / "elsewhere"
    shutil.copytree(BUNDLED_DIR / "toyworld-style", folder)
    config = json.loads((folder / "style.json").read_text())
    config["clip"]["fingerprint"] = "sha256:" + "0" * 64
    (folder / "style.json").write_text(json.dumps(config))
    return folder


def upload(client, data, **fields):
    return client.post(
        "/v1/query", files={"image": ("x.png", data, "image/png")}, data={k: str(v) for k, v in fields.items()}
    )


def test_each_generator_is_loaded_once(served):
    coca = {id(served.generators[name]["toyworld-coca"]) for name in ("toy", "partial", "other")}
    style = {id(served.generators[name][STYLE]) for name in ("toy", "partial")}
    assert len(coca) == 1 and len(style) == 1  # toy and partial share the CLIP model, so one decoder
    assert served.retrievers["toy"].generator is served.generators["toy"]["toyworld-coca"]  # the first is the default


def test_generate_with_each_generator(client, image):
    default = upload(client, image, mode="generate", k=1)
    coca = upload(client, image, mode="generate", k=1, generator="toyworld-coca")
    styled = upload(client, image, mode="generate", k=1, generator=STYLE)
    for response in (default, coca, styled):
        assert response.status_code == 200, response.text
        assert response.json()["hits"][0]["text"] == SCENE.caption
    assert default.json()["generator"] == coca.json()["generator"] == "toyworld-coca"
    assert default.json()["hits"][0]["source"] == coca.json()["hits"][0]["source"] == "generated"
    assert styled.json()["generator"] == STYLE and styled.json()["hits"][0]["source"] == "styled"


def test_hybrid_with_the_style_decoder(client, image):
    body = {
        "image_base64": base64.b64encode(image).decode(),
        "mode": "hybrid",
        "index": "partial",
        "k": 3,
        "generator": STYLE,
    }
    response = client.post("/v1/query", json=body)
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert hits[0]["text"] == SCENE.caption and hits[0]["source"] == "styled" and hits[0]["score"] > 0.8
    assert {h["source"] for h in hits[1:]} == {"retrieved"}


def test_indexes_lists_the_generators_of_each_index(client):
    described = client.get("/v1/indexes").json()
    by_name = {ix["name"]: ix for ix in described["indexes"]}
    assert by_name["toy"]["generators"] == ["toyworld-coca", STYLE] and by_name["toy"]["generator"] == "toyworld-coca"
    assert by_name["other"]["generators"] == ["toyworld-coca"]  # trained with another CLIP: not offered
    assert {g["name"]: (g["source"], g["indexes"]) for g in described["generators"]} == {
        "toyworld-coca": ("generated", ["toy", "partial", "other"]),
        STYLE: ("styled", ["toy", "partial"]),
    }


@pytest.mark.parametrize(
    "field, status, message",
    [
        ("nope", 400, "unknown generator 'nope'; loaded: toyworld-coca, style:toyworld-style"),
        (["toyworld-coca"], 400, "generator must be a string, not an array"),
        (3, 400, "generator must be a string, not a number"),
        ("\ud800", 400, "generator is not valid Unicode"),
    ],
)
def test_unknown_or_ill_typed_generator_is_a_400(client, image, field, status, message):
    body = {"image_base64": base64.b64encode(image).decode(), "mode": "generate", "generator": field}
    response = client.post(
        "/v1/query",
        content=json.dumps(body).encode("utf-8", "surrogatepass"),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == status and message in response.json()["error"]["message"], response.text


def test_generator_refusals_that_need_the_indexes(client, image):
    response = upload(client, image, mode="generate", index="other", generator=STYLE)
    assert response.status_code == 400
    assert "does not serve index 'other'" in response.json()["error"]["message"]
    response = upload(client, image, index="toy", generator=STYLE)  # retrieve: no captions are written
    assert response.status_code == 400 and "mode generate or hybrid" in response.json()["error"]["message"]


def test_a_style_decoder_that_fits_no_index_is_refused_at_start(toy_index, tmp_path):
    folder = style_of_another_clip(tmp_path)
    with pytest.raises(RetrieverError, match="which built none of the indexes: toyworld") as refused:
        open_served([toy_index], ["toyworld-coca", f"style:{folder}"], device="cpu")
    assert "\n" not in str(refused.value)
    with pytest.raises(RetrieverError, match="given twice"):
        open_served([toy_index], [STYLE, STYLE], device="cpu")


def test_a_server_without_an_index_offers_every_generator(image):
    from fastapi.testclient import TestClient

    served = open_served([], ["toyworld-coca", STYLE], device="cpu")
    with TestClient(create_app(served.retrievers, generators=served.generators), base_url="http://127.0.0.1") as c:
        assert c.get("/v1/indexes").json()["indexes"][0]["generators"] == ["toyworld-coca", STYLE]
        response = upload(c, image, generator=STYLE)  # mode defaults to generate without an index
        assert response.status_code == 200, response.text
        assert response.json()["hits"][0] | {"text": SCENE.caption, "source": "styled"} == response.json()["hits"][0]


def test_the_cli_refuses_a_style_decoder_that_fits_no_index_in_one_line(run, toy_index, tmp_path):
    import socket

    folder = style_of_another_clip(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run(
        "serve", "--index", toy_index, "--generator", "toyworld-coca", "--generator", f"style:{folder}", "--port", port
    )
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "which built none of the indexes" in result.stderr
