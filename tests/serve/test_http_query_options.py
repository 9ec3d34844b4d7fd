"""The query options of the HTTP API on a real toy index and a real Retriever: each field's effect.

diversity, fetch_k, dedupe, where, plus/minus, image + text, blends, like and several indexes
mean what `retriever query`'s options mean; these tests check that they reach the search (the
answer changes the way the option says) and that the answer reports what the CLI reports.
"""

import base64
import io

import pytest

from retriever.models import toyworld
from retriever.search.api import Retriever
from retriever.serve.app import ServerSettings, create_app

RED_STAR = "a large red star on the left"


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, toy_model):
    """A second index of the same model: the small shapes only, in a directory named `more`."""
    from retriever.index.build import build_index

    corpus = tmp_path_factory.mktemp("small") / "small.tsv"
    scenes = [s for s in toyworld.all_scenes()[::-1] if s.size == "small"]  # reversed: ids differ from `toy`'s
    corpus.write_text(
        "\n".join(["caption\tshape\tcolour"] + [f"{s.caption}\t{s.shape}\t{s.colour}" for s in scenes]) + "\n"
    )
    out = tmp_path_factory.mktemp("indexes2") / "more"
    build_index(corpus, out, toy_model, show_progress_bar=False)
    return out


@pytest.fixture(scope="module")
def client(toy_index, small_index):
    from fastapi.testclient import TestClient

    retrievers = {"toy": Retriever.open(toy_index), "more": Retriever.open(small_index)}
    app = create_app(retrievers, ServerSettings(verify_on_start=False))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def png(scene: toyworld.Scene, seed: int = 9) -> bytes:
    buffer = io.BytesIO()
    toyworld.render(scene, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


GREEN_TRIANGLE = toyworld.Scene("large", "green", "triangle", "top")
BLUE_CIRCLE = toyworld.Scene("large", "blue", "circle", "left")


def ask(client, **fields) -> dict:
    response = client.post("/v1/query", json=fields)
    assert response.status_code == 200, response.text
    return response.json()


def texts(body: dict) -> list[str]:
    return [h["text"] for h in body["hits"]]


def refused(client, status=400, **fields) -> str:
    response = client.post("/v1/query", json=fields)
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_diversity_changes_the_list_but_keeps_the_first_hit(client):
    plain = ask(client, text=RED_STAR, k=10, diversity=0, dedupe=False)
    diverse = ask(client, text=RED_STAR, k=10, diversity=1, dedupe=False)
    assert texts(plain)[0] == texts(diverse)[0] == RED_STAR
    assert texts(plain) != texts(diverse)
    # plain order is by score; MMR at 1 picks far-apart texts, so later hits score lower
    assert [h["score"] for h in plain["hits"]] == sorted((h["score"] for h in plain["hits"]), reverse=True)
    assert sum(h["score"] for h in diverse["hits"][1:]) < sum(h["score"] for h in plain["hits"][1:])
    assert sum("red star" in t for t in texts(diverse)) < sum("red star" in t for t in texts(plain))


def test_fetch_k_bounds_the_candidates_that_diversity_reorders(client):
    plain = texts(ask(client, text=RED_STAR, k=10, dedupe=False))
    narrow = texts(ask(client, text=RED_STAR, k=10, diversity=1, fetch_k=10, dedupe=False))
    wide = texts(ask(client, text=RED_STAR, k=10, diversity=1, fetch_k=256, dedupe=False))
    assert sorted(narrow) == sorted(plain) and narrow != plain  # only the 10 nearest, reordered
    assert set(wide) - set(plain)


def test_dedupe_cosine_collapses_near_duplicates(client):
    # the query is the first hit's own text, so each later hit's score is its cosine to the first
    off = ask(client, text=RED_STAR, k=10, dedupe=False)
    assert off["hits"][1]["score"] >= 0.6
    collapsed = ask(client, text=RED_STAR, k=10, dedupe=0.6)
    assert texts(collapsed)[0] == RED_STAR and len(collapsed["hits"]) == 10
    assert all(h["score"] < 0.6 for h in collapsed["hits"][1:])
    default = ask(client, text=RED_STAR, k=10)  # like `retriever query`: cosine 0.95, on by default
    assert texts(default) == texts(ask(client, text=RED_STAR, k=10, dedupe=True))
    form = client.post(
        "/v1/query", files={"image": ("t.png", png(GREEN_TRIANGLE), "image/png")}, data={"dedupe": "0.6", "k": "5"}
    )
    assert form.status_code == 200, form.text
    assert all(h["score"] < form.json()["hits"][0]["score"] for h in form.json()["hits"][1:])


def test_where_returns_only_matching_metadata(client):
    body = ask(client, text=RED_STAR, k=10, where='shape = "circle" and colour != "white"')
    assert len(body["hits"]) == 10 and body["note"] is None
    assert all(h["metadata"]["shape"] == "circle" and h["metadata"]["colour"] != "white" for h in body["hits"])
    assert texts(body)[0] == "a large red circle on the left"
    short = ask(client, text=RED_STAR, k=10, where='shape = "circle" and colour = "red" and len < 30')
    assert texts(short) == ["a small red circle on the top"] or len(short["hits"]) == 2
    assert all(len(t) < 30 for t in texts(short))
    assert short["note"] == (
        f'only {len(short["hits"])} indexed texts match where \'shape = "circle" and colour = "red" and len < 30\''
    )


@pytest.mark.parametrize(
    "where,phrase",
    [
        ("shape = ", "where: expected a value"),
        ('shape = "star" and', "where: expected a column name, got the end at character 19"),
        ('flavour = "sweet"', "where: no column 'flavour' in this index (columns: text, shape, colour, len)"),
        ('len < "long"', "where: cannot compare column 'len'"),
        ('__import__("os")', "where:"),
    ],
)
def test_where_errors_are_400s_naming_the_problem(client, where, phrase):
    assert phrase in refused(client, text=RED_STAR, where=where)


def test_plus_and_minus_steer_the_results(client):
    assert texts(ask(client, text=RED_STAR, k=3))[0] == RED_STAR
    blue = ask(client, text=RED_STAR, k=3, plus=["blue"])
    assert "blue" in texts(blue)[0] and "star" in texts(blue)[0]
    weighted = ask(client, text=RED_STAR, k=5, plus=[{"text": "blue", "weight": 2}], minus=["red:0.5"])
    assert all("blue" in t for t in texts(weighted)) and not any("red" in t for t in texts(weighted))
    faint = ask(client, text=RED_STAR, k=3, plus=[{"text": "blue", "weight": 0.05}])
    assert texts(faint)[0] == RED_STAR
    image = png(GREEN_TRIANGLE)
    form = client.post(
        "/v1/query", files={"image": ("t.png", image, "image/png")}, data={"plus": ["blue", "circle:1.5"], "k": "3"}
    )  # a repeated field: both count
    assert form.status_code == 200, form.text
    b64 = base64.b64encode(image).decode()
    assert texts(form.json()) == texts(
        ask(client, image_base64=b64, k=3, plus=["blue", {"text": "circle", "weight": 1.5}])
    )
    assert texts(form.json()) != texts(ask(client, image_base64=b64, k=3, plus=["blue"]))
    assert "blue" in texts(ask(client, image_base64=b64, k=3, plus=["blue:2"]))[0]


def test_image_and_text_together(client):
    image = base64.b64encode(png(GREEN_TRIANGLE)).decode()
    alone = ask(client, image_base64=image, k=3)
    assert texts(alone)[0] == GREEN_TRIANGLE.caption and "query_text" not in alone["hits"][0]
    both = ask(client, image_base64=image, text="blue", k=3)
    assert texts(both) != texts(alone) and any("blue" in t for t in texts(both))
    assert both["hits"][0]["query_text"] == "blue" and both["hits"][0]["image"] == "upload"


def test_blends_follow_their_weights(client):
    a, b = base64.b64encode(png(GREEN_TRIANGLE)).decode(), base64.b64encode(png(BLUE_CIRCLE)).decode()
    assert texts(ask(client, images=[a, b], weights=[1, 0.02], k=1)) == [GREEN_TRIANGLE.caption]
    towards_b = ask(client, images=[a, b], weights=[0.02, 1], k=1)
    assert texts(towards_b) == [BLUE_CIRCLE.caption] and towards_b["hits"][0]["blend"] == "images[0]:0.02 + images[1]:1"
    even = texts(ask(client, images=[a, b], k=5))
    assert even != texts(ask(client, images=[a], k=5))
    form = client.post(
        "/v1/query",
        files=[
            ("image", ("a.png", png(GREEN_TRIANGLE), "image/png")),
            ("image", ("b.png", png(BLUE_CIRCLE), "image/png")),
        ],
        data={"weights": "0.02,1", "k": "1"},
    )
    assert form.status_code == 200, form.text
    assert form.json()["hits"][0]["text"] == BLUE_CIRCLE.caption
    assert "weights for 2 image(s)" in refused(client, images=[a, b], weights=[1])
    assert "only retrieve" in refused(client, images=[a, b], mode="hybrid")


def test_like_returns_the_ids_own_text_first(client):
    first = ask(client, text="a small purple square on the bottom", k=1)["hits"][0]
    like = ask(client, like=first["id"], k=5)
    assert texts(like)[0] == first["text"] and like["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert like["hits"][0]["like"] == first["id"] and len(like["hits"]) == 5
    steered = ask(client, like=first["id"], k=3, plus=["red:2"])
    assert "red" in texts(steered)[0]
    assert "no row 99999" in refused(client, like=99999)
    assert "alone" in refused(client, like=1, text="a star")


def test_several_indexes_are_searched_together_and_hits_name_theirs(client):
    body = ask(client, text="a small red star on the left", k=2, indexes=["toy", "more"], dedupe=False)
    assert body["indexes"] == ["toy", "more"] and body["index"] == "toy"
    assert texts(body) == ["a small red star on the left"] * 2
    assert {h["index"] for h in body["hits"]} == {"toy", "more"}
    # more like this on a hit of the second index: its id is a row of that index
    from_more = next(h for h in body["hits"] if h["index"] == "more")
    from_toy = next(h for h in body["hits"] if h["index"] == "toy")
    assert from_more["id"] != from_toy["id"]
    like = ask(client, like=from_more["id"], like_index="more", indexes=["toy", "more"], k=2, dedupe=False)
    assert texts(like) == [from_more["text"]] * 2
    only_more = ask(client, like=from_more["id"], like_index="more", k=1)
    assert only_more["indexes"] == ["more"] and texts(only_more) == [from_more["text"]]
    large = ask(client, text="a large red star on the left", k=3, indexes="toy,more")
    assert all(h["index"] == "toy" for h in large["hits"][:1])
    form = client.post(
        "/v1/query",
        data={"text": "a small red star on the left", "indexes": ["toy", "more"], "k": "2", "dedupe": "off"},
        files={"none": ("x", b"", "text/plain")},
    )
    assert form.status_code == 200 and {h["index"] for h in form.json()["hits"]} == {"toy", "more"}
    assert "unknown index 'nope'" in refused(client, 404, text="a star", indexes=["toy", "nope"])
    assert "not both" in refused(client, text="a star", index="toy", indexes=["more"])
    assert "not among the searched" in refused(client, like=1, like_index="more", index="toy")


def test_openapi_documents_the_options(client):
    schema = client.get("/openapi.json").json()["paths"]["/v1/query"]["post"]["requestBody"]["content"]
    for kind in ("application/json", "multipart/form-data"):
        fields = schema[kind]["schema"]["properties"]
        assert {
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
            "text",
            "k",
            "mode",
            "index",
        } <= set(fields)
    assert "images" in schema["application/json"]["schema"]["properties"]


def test_indexes_of_different_models_are_refused_together(toy_index, tmp_path):
    """An index built with another model answers alone, but not merged with another model's hits."""
    from fastapi.testclient import TestClient

    from retriever.index.build import build_index
    from retriever.models.loading import load_model

    corpus = tmp_path / "other.txt"
    corpus.write_text("a small red star on the left\na large blue circle on the top\n")
    build_index(corpus, tmp_path / "other", load_model("toyworld-coca", device="cpu"), show_progress_bar=False)
    retrievers = {"toy": Retriever.open(toy_index), "other": Retriever.open(tmp_path / "other")}
    with TestClient(create_app(retrievers, ServerSettings(verify_on_start=False)), base_url="http://127.0.0.1") as c:
        assert ask(c, text="a small red star on the left", index="other", k=1)["hits"][0]["index"] == "other"
        message = refused(c, text="a small red star on the left", indexes=["toy", "other"])
        assert message.startswith("toy, other cannot be searched together:") and "built with toyworld-coca" in message
