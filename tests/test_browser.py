"""Pages checked in a real browser (headless Chromium): the model card HTML and the documentation site's home page.

Each page must render what it promises (tables, the per-group plots with their images decoded, the caveats; the
site's title and navigation) and log nothing to the console: no script error, no ``console.error``, no resource
that failed to load. Chromium is driven with Playwright (``pip install -e '.[docs]'``) as a system browser, so no
browser download is needed. Without Chromium on ``PATH`` (``chromium``, ``chromium-browser``, ``google-chrome``)
or in ``$MEDSEG_CHROMIUM`` the tests skip; with ``$MEDSEG_CHROMIUM`` set (as ``.ci/run`` does) they never skip.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from medseg_lightning.reporting.model_card import SECTIONS, build_card, generated_caveats
from medseg_lightning.reporting.model_card_render import write_card
from tests.test_modelcard import _inputs

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """``$MEDSEG_CHROMIUM``, else the first of :data:`NAMES` on ``PATH``."""
    return os.environ.get("MEDSEG_CHROMIUM") or next(filter(None, map(shutil.which, NAMES)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    required = bool(os.environ.get("MEDSEG_CHROMIUM"))  # CI installed Chromium for these tests: never skip
    executable = find_chromium()
    if executable is None:
        pytest.skip(f"no Chromium: none of {', '.join(NAMES)} is on PATH and MEDSEG_CHROMIUM is not set "
                    "(apt-get install chromium, or point MEDSEG_CHROMIUM at a Chromium/Chrome binary)")
    if not (Path(executable).is_file() and os.access(executable, os.X_OK)):
        pytest.fail(f"MEDSEG_CHROMIUM={executable} is not an executable file")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = f"Chromium found ({executable}) but not Playwright, which drives it: pip install -e '.[docs]'"
        pytest.fail(message) if required else pytest.skip(message)
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses to start its sandbox as root (CI containers); the pages are our own files
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def visit(browser: Any, url: str) -> tuple[Any, list[str]]:
    """Opens ``url`` in a fresh page; returns the page and what went wrong while it loaded.

    Problems are console messages of type error or warning (Chromium reports a resource that failed to load as a
    console error too), uncaught exceptions, and failed requests.
    """
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(f"console.{message.type}: {message.text}")
            if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url} ({request.failure})"))
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")  # scripts that fetch after load (the site's search index) have run
    return page, problems


IMAGES = """selector => Array.from(document.querySelectorAll(selector)).map(img => ({
    alt: img.alt, complete: img.complete, width: img.naturalWidth, shown: img.getBoundingClientRect().width}))"""


def test_the_checks_catch_a_broken_page(browser: Any, tmp_path: Path) -> None:
    """The detectors below are not vacuous: a missing image, a console error and an exception are all seen."""
    page_file = tmp_path / "broken.html"
    page_file.write_text("<!DOCTYPE html><html><head><title>x</title></head><body><img src='missing.png' alt='m'>"
                         "<script>console.error('boom'); null.x;</script></body></html>")
    page, problems = visit(browser, page_file.as_uri())
    assert page.evaluate(IMAGES, "img") == [{"alt": "m", "complete": True, "width": 0, "shown": page.evaluate(
        "document.images[0].getBoundingClientRect().width")}]
    assert any("console.error: boom" in text for text in problems), problems
    assert any(text.startswith("uncaught:") for text in problems), problems
    assert any("missing.png" in text for text in problems), problems


def test_model_card_renders_tables_plots_and_caveats(browser: Any, tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    card = build_card(inputs)
    html_file = write_card(card, tmp_path / "card")[2]
    page, problems = visit(browser, html_file.as_uri())
    assert problems == []
    assert page.title().startswith("Model card: hippo-unet")
    headings = page.locator("section > h2").all_inner_texts()
    assert headings == list(SECTIONS.values())
    for key in SECTIONS:
        assert page.locator(f"section#{key}").is_visible(), key

    # every table laid out with its header and rows; the overall table holds one row per metric
    tables = page.evaluate("""() => Array.from(document.querySelectorAll('table')).map(t => ({
        section: t.closest('section').id, rows: t.rows.length, height: t.getBoundingClientRect().height,
        header: Array.from(t.rows[0].cells).map(c => c.tagName)}))""")
    assert len(tables) >= 6
    for table in tables:
        assert table["rows"] >= 2 and table["height"] > 0 and set(table["header"]) == {"TH"}, table
    overall = page.locator("#quantitative_analyses h3:text-is('Overall') + table")
    assert overall.locator("tr").count() == 1 + len(card["quantitative_analyses"]["overall"])
    assert "0.823" in overall.inner_text() and "[0.801, 0.841]" in overall.inner_text()

    # one per-group plot per measured attribute (sex, age; ethnicity is not in the manifest), decoded and shown
    images = page.evaluate(IMAGES, "#quantitative_analyses figure img")
    assert [image["alt"].split(":")[0] for image in images] == ["sex", "age"]
    for image in images:
        assert image["complete"] and image["width"] > 0 and image["shown"] > 0, image
    assert page.locator("#quantitative_analyses h3:text-is('By sex') ~ figure").first.is_visible()

    caveats = page.locator("#caveats_and_recommendations h3:text-is('Caveats') + ul > li").all_inner_texts()
    expected = [*generated_caveats(inputs), "Trained on one scanner vendor."]
    assert caveats == [re.sub(r"`|\*\*", "", text) for text in expected]  # `code` and **bold** are markup there
    recommendations = page.locator("#caveats_and_recommendations h3:text-is('Recommendations') + ul > li")
    assert recommendations.all_inner_texts() == ["Validate locally first."]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="mkdocs is in the docs extra: pip install -e '.[docs]'")
    folder = tmp_path_factory.mktemp("site")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return folder


@pytest.fixture
def served(site: Path) -> Iterator[str]:
    """The built site over HTTP on 127.0.0.1 (the search worker and its index are not loaded from file:// URLs)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_docs_home_page_has_title_and_nav_and_no_errors(browser: Any, served: str) -> None:
    page, problems = visit(browser, served + "index.html")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    assert page.title() == config["site_name"]
    assert page.locator("h1").first.inner_text().startswith("medseg-lightning")
    tabs = [text.strip() for text in page.locator("nav.md-tabs a.md-tabs__link").all_inner_texts()]
    assert tabs == [next(iter(entry)) for entry in config["nav"]]
    assert page.locator("nav.md-tabs").is_visible()
    for link in ("Getting started", "How-to guides", "Reference"):
        target = page.locator(f"nav.md-tabs a.md-tabs__link:text-is('{link}')").get_attribute("href")
        response = page.request.get(served + target.lstrip("./"))
        assert response.ok, (link, target, response.status)
    assert problems == []
