"""The built site in headless Chromium (Debian's), served on localhost with no network.

Every page loads without console errors, every Mermaid block becomes an SVG without a syntax
error, no request leaves localhost, and the language switch leads to the page's twin.
mkdocs-material draws diagrams into closed shadow roots, so they are found through the DevTools
protocol (`DOM.getFlattenedDocument` with `pierce: true`), which sees inside them.
"""

from __future__ import annotations

import functools
import shutil
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="module")
def site_url(built_site: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(built_site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: apt-get install chromium", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def site_pages(built_site: Path) -> list[str]:
    pages = [p for p in built_site.rglob("index.html") if "assets" not in p.parts and "search" not in p.parts]
    return sorted("/" + p.parent.relative_to(built_site).as_posix().strip(".").strip("/") for p in pages)


def mermaid_state(cdp) -> tuple[int, int, int]:
    """(diagram hosts, rendered SVGs, error SVGs) seen through every shadow root."""
    nodes = cdp.send("DOM.getFlattenedDocument", {"depth": -1, "pierce": True})["nodes"]
    hosts = rendered = errors = 0
    for node in nodes:
        attrs = node.get("attributes", [])
        values = dict(zip(attrs[::2], attrs[1::2]))
        if node.get("nodeName") == "DIV" and "mermaid" in values.get("class", "").split():
            hosts += 1
        if node.get("nodeName", "").lower() == "svg" and values.get("id", "").startswith("__mermaid"):
            role = values.get("aria-roledescription", "")
            if role == "error":
                errors += 1
            else:
                rendered += 1
    return hosts, rendered, errors


def expected_diagrams(built_site: Path, path: str) -> int:
    html = (built_site / path.strip("/") / "index.html").read_text(encoding="utf-8")
    return html.count('class="mermaid"')


def test_every_page_loads_offline_renders_its_diagrams_and_switches_language(built_site, site_url, browser):
    pages = site_pages(built_site)
    assert "/" in pages and "/en" in pages
    problems: list[str] = []
    for path in pages:
        context = browser.new_context()
        page = context.new_page()
        outside: list[str] = []
        console_errors: list[str] = []

        def guard(route, request):
            if request.url.startswith(site_url):
                route.continue_()
            else:
                outside.append(request.url)
                route.abort()

        page.route("**/*", guard)
        page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda error: console_errors.append(str(error)))
        page.on("response", lambda r: console_errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
        page.goto(site_url + path + "/", wait_until="load")
        cdp = context.new_cdp_session(page)
        cdp.send("DOM.enable")
        want = expected_diagrams(built_site, path)
        deadline = time.monotonic() + 20
        while True:
            hosts, rendered, errors = mermaid_state(cdp)
            if rendered + errors >= want or time.monotonic() > deadline:
                break
            page.wait_for_timeout(250)
        if rendered != want or errors:
            problems.append(f"{path}: {want} diagrams, {rendered} rendered, {errors} with syntax errors")
        if console_errors:
            problems.append(f"{path}: console errors {console_errors}")
        if outside:
            problems.append(f"{path}: requests left localhost: {outside}")
        problems.extend(check_language_switch(page, site_url, path))
        context.close()
    assert not problems, "\n".join(problems)


def check_language_switch(page, site_url: str, path: str) -> list[str]:
    """The selector's link to the other language leads to this page's twin, which loads."""
    english = path == "/en" or path.startswith("/en/")
    target_lang = "zh" if english else "en"
    twin = (path[len("/en"):] or "/") if english else ("/en" + path).rstrip("/")
    link = page.locator(f'a.md-select__link[hreflang="{target_lang}"]')
    if link.count() != 1:
        return [f"{path}: no language switch to {target_lang}"]
    with page.expect_navigation(wait_until="load", timeout=15000):
        link.first.evaluate("a => a.click()")  # the menu opens on hover; a scripted click needs no hover
    landed = page.url[len(site_url):].rstrip("/") or "/"
    if landed != (twin.rstrip("/") or "/"):
        return [f"{path}: language switch led to {landed}, expected {twin}"]
    return []
