"""The web page in a real browser: Debian's Chromium driven by Playwright, against `retriever serve`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from retriever.models import toyworld

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, toy_model):
    """A second index of the toy model, named `more`: the small shapes only."""
    from retriever.index.build import build_index

    corpus = tmp_path_factory.mktemp("small") / "small.txt"
    # reversed, so an id names another text here than in `toy`
    corpus.write_text("\n".join(s.caption for s in toyworld.all_scenes()[::-1] if s.size == "small") + "\n")
    out = tmp_path_factory.mktemp("indexes2") / "more"
    build_index(corpus, out, toy_model, show_progress_bar=False)
    return out


@pytest.fixture(scope="module")
def server(toy_index, small_index):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "retriever",
            "serve",
            "--index",
            str(toy_index),
            "--index",
            str(small_index),
            "--generator",
            "toyworld-coca",
            "--generator",
            "style:toyworld-style",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read()) from None
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        yield page
        browser.close()


def test_upload_shows_the_right_caption_first(server, page, tmp_path):
    scene = toyworld.Scene("large", "orange", "circle", "bottom")
    image = tmp_path / "orange.png"
    toyworld.render(scene, seed=3).resize((256, 256), resample=0).save(image)
    page.goto(server)
    page.wait_for_selector("#index option", state="attached")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("li.hit")
    assert page.inner_text("li.hit .text >> nth=0") == scene.caption
    assert page.is_visible("#preview")
    assert "retrieved" in page.inner_text("li.hit .meta >> nth=0")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

    second = page.inner_text("li.hit .text >> nth=1")
    page.click("li.hit .search >> nth=1")  # search with the second caption (alone): it comes back first
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('“')")
    assert page.input_value("#text") == second, page.inner_text("#error")
    assert page.inner_text("li.hit .text >> nth=0") == second
    assert not page.is_visible("#preview")

    page.select_option("#mode", "hybrid")
    page.fill("#text", "")
    page.set_input_files("#file", str(image))  # the image again, now in hybrid mode
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('hybrid')")
    assert page.inner_text("li.hit .text >> nth=0") == scene.caption


def test_the_style_generator_writes_styled_captions(server, page, tmp_path):
    """Two generators (repeated --generator): the page offers a choice, and the style decoder's hits are badged."""
    scene = toyworld.Scene("large", "blue", "square", "right")
    image = tmp_path / "blue.png"
    toyworld.render(scene, seed=5).resize((256, 256), resample=0).save(image)
    page.goto(server)
    page.wait_for_selector("#index option", state="attached")
    assert page.is_visible("#generator-box") and page.is_disabled("#generator")  # retrieve mode writes nothing
    assert page.locator("#generator option").all_inner_texts() == ["toyworld-coca", "style:toyworld-style"]
    page.select_option("#mode", "generate")
    page.select_option("#generator", "style:toyworld-style")
    _do(page, lambda: page.set_input_files("#file", str(image)))
    assert not page.is_visible("#error"), page.inner_text("#error")
    assert _texts(page)[0] == scene.caption
    assert page.inner_text("li.hit .badge.styled >> nth=0") == "styled"
    _do(page, lambda: page.select_option("#generator", "toyworld-coca"))  # a new choice re-runs the query
    assert page.inner_text("li.hit .badge >> nth=0") == "generated" and page.locator(".badge.styled").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-generators.png"), full_page=True)
    page.select_option("#mode", "retrieve")


def test_errors_are_shown_on_the_page(server, page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    page.goto(server)
    page.wait_for_selector("#index option", state="attached")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error", state="visible")
    assert "not an image" in page.inner_text("#error")


RED_STAR = "a large red star on the left"


def _answered(page) -> int:
    return int(page.get_attribute("#status", "data-answered") or 0)


def _next_answer(page, before: int) -> None:
    """Wait until the page has finished a query after the `before`-th."""
    page.wait_for_function(f"() => Number(document.querySelector('#status').dataset.answered || 0) > {before}")


def _texts(page) -> list[str]:
    return page.locator("li.hit .text").all_inner_texts()


def _do(page, action) -> None:
    before = _answered(page)
    action()
    _next_answer(page, before)


def test_steering_diversity_filter_more_like_and_pins(server, page, tmp_path):
    page.goto(server)
    page.evaluate("() => localStorage.clear()")
    page.reload()
    page.wait_for_selector("#index option", state="attached")
    page.fill("#text", RED_STAR)
    _do(page, lambda: page.press("#text", "Enter"))
    plain = _texts(page)
    assert plain[0] == RED_STAR and len(plain) == 10

    # the diversity slider: at 1 the list changes, the first hit stays
    _do(page, lambda: (page.focus("#diversity"), page.keyboard.press("End")))
    assert page.inner_text("#diversity-value") == "1"
    diverse = _texts(page)
    assert diverse[0] == RED_STAR and diverse != plain
    assert sum("red star" in t for t in diverse) < sum("red star" in t for t in plain)
    _do(page, lambda: page.keyboard.press("Home"))
    assert _texts(page) == plain

    # a plus chip pushes the results towards blue; clicking the chip removes it
    page.fill("#plus-input", "blue")
    _do(page, lambda: page.press("#plus-input", "Enter"))
    assert page.inner_text("#chips-plus .chip") == "+ blue" and page.input_value("#plus-input") == ""
    assert "blue" in _texts(page)[0]
    _do(page, lambda: page.click("#chips-plus .chip"))
    assert page.locator("#chips-plus .chip").count() == 0 and _texts(page) == plain
    page.fill("#minus-input", "red:2")
    _do(page, lambda: page.press("#minus-input", "Enter"))
    assert not any("red" in t for t in _texts(page)[:3])
    _do(page, lambda: page.click("#chips-minus .chip"))

    # the filter box: matching hits only; a bad expression is shown under the box, not as a page error
    page.fill("#where", 'shape = "circle"')
    _do(page, lambda: page.press("#where", "Enter"))
    assert all("circle" in t for t in _texts(page)) and _texts(page)[0] == "a large red circle on the left"
    page.fill("#where", "shape = ")
    _do(page, lambda: page.press("#where", "Enter"))
    assert page.is_visible("#where-error") and not page.is_visible("#error")
    assert "where: expected a value" in page.inner_text("#where-error")
    page.fill("#where", 'colour = "red" and shape = "circle" and len < 30')
    _do(page, lambda: page.press("#where", "Enter"))
    assert not page.is_visible("#where-error") and page.is_visible("#note")
    assert "indexed texts match where" in page.inner_text("#note")
    page.fill("#where", "")
    _do(page, lambda: page.press("#where", "Enter"))
    assert _texts(page) == plain and not page.is_visible("#note")

    # more like this: the hit's own text comes back first
    third = _texts(page)[2]
    _do(page, lambda: page.click("li.hit .more >> nth=2"))
    assert _texts(page)[0] == third and "more like" in page.inner_text("#status")

    # pins survive a reload and export as .txt and .jsonl
    page.click("li.hit .pin >> nth=0")
    page.click("li.hit .pin >> nth=1")
    pinned = _texts(page)[:2]
    assert page.get_attribute("li.hit .pin >> nth=0", "aria-pressed") == "true"
    assert page.locator("#pins li span").all_inner_texts() == pinned
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-steering.png"), full_page=True)
    page.reload()
    page.wait_for_selector("#pins li")
    assert page.locator("#pins li span").all_inner_texts() == pinned
    with page.expect_download() as download:
        page.click("#export-txt")
    assert download.value.suggested_filename == "captions.txt"
    assert Path(download.value.path()).read_text().splitlines() == pinned
    with page.expect_download() as download:
        page.click("#export-jsonl")
    rows = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert [r["text"] for r in rows] == pinned and all(r["index"] == "toy" and isinstance(r["id"], int) for r in rows)
    page.click("#pins li button >> nth=0")
    assert page.locator("#pins li span").all_inner_texts() == pinned[1:]


def test_image_and_text_together(server, page, tmp_path):
    scene = toyworld.Scene("large", "green", "triangle", "top")
    image = tmp_path / "green.png"
    toyworld.render(scene, seed=9).resize((128, 128), resample=0).save(image)
    page.goto(server)
    page.wait_for_selector("#index option", state="attached")
    _do(page, lambda: page.set_input_files("#file", str(image)))
    alone = _texts(page)
    assert alone[0] == scene.caption
    page.fill("#text", "blue")
    _do(page, lambda: page.press("#text", "Enter"))
    assert page.is_visible("#preview") and "the image + “blue”" in page.inner_text("#status")
    assert _texts(page) != alone and any("blue" in t for t in _texts(page)[:3])
    _do(page, lambda: page.click("#clear-image"))  # the text alone
    assert not page.is_visible("#preview") and "“blue”" in page.inner_text("#status")


def test_every_index_of_one_model_at_once(server, page):
    page.goto(server)
    page.wait_for_selector("#index option", state="attached")
    assert page.is_visible("#all-label") and not page.is_checked("#all-indexes")
    page.uncheck("#dedupe")  # the same text from both indexes: keep both
    page.check("#all-indexes")
    page.fill("#text", "a small red star on the left")
    _do(page, lambda: page.press("#text", "Enter"))
    assert "toy + more" in page.inner_text("#status")
    assert _texts(page)[:2] == ["a small red star on the left"] * 2
    badges = page.locator("li.hit .badge").all_inner_texts()[:2]
    assert sorted(badges) == ["retrieved · more", "retrieved · toy"]
    # more like this on the hit from `more`: the id is a row of that index, not of `toy`
    from_more = badges.index("retrieved · more")
    _do(page, lambda: page.click(f"li.hit .more >> nth={from_more}"))
    assert not page.is_visible("#error"), page.inner_text("#error")
    assert _texts(page)[:2] == ["a small red star on the left"] * 2 and "more like" in page.inner_text("#status")
    page.uncheck("#all-indexes")
    page.check("#dedupe")


def test_narrow_screen_keeps_one_column(server, page):
    page.set_viewport_size({"width": 390, "height": 800})
    try:
        page.goto(server)
        page.wait_for_selector("#index option", state="attached")
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone ({width} px)"
    finally:
        page.set_viewport_size({"width": 1280, "height": 800})
