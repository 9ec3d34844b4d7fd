"""The web page in a real browser: Debian's Chromium driven by Playwright, against `retriever serve`."""

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
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed (.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(toy_index):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "retriever", "serve", "--index", str(toy_index),
                             "--generator", "toyworld-coca", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
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
    page.click("li.hit .search >> nth=1")  # search with the second caption: it comes back first
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('“')")
    assert page.input_value("#text") == second, page.inner_text("#error")
    assert page.inner_text("li.hit .text >> nth=0") == second

    page.select_option("#mode", "hybrid")
    page.fill("#text", "")
    page.click("#go")  # the image chosen before, now in hybrid mode
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('hybrid')")
    assert page.inner_text("li.hit .text >> nth=0") == scene.caption


def test_errors_are_shown_on_the_page(server, page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    page.goto(server)
    page.wait_for_selector("#index option", state="attached")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error", state="visible")
    assert "not an image" in page.inner_text("#error")
