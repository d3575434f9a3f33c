"""The built site in headless Chromium (Debian's), served on localhost with no network, as a reader sees it.

Each page, in both languages, at a 1400-px window: it loads without console errors and with no
request leaving localhost; every Mermaid block becomes an SVG whose smallest text is at least
11 px on screen; every formula is typeset by KaTeX without an error; nothing in the main column
scrolls sideways except code blocks and tables marked wide; its title is unique within its
language; the language switch leads to its twin. Search finds pages of the reader's language.
A full-page screenshot of every page (`screenshots/zh/*.jpg`, `screenshots/en/*.jpg`) and one of
an English search (`screenshots/search-en-perplexity.png`) land in `screenshots/`, which git
ignores and the latest-dependencies workflow uploads.

mkdocs-material draws diagrams into closed shadow roots, so they are reached through the DevTools
protocol (`DOM.getFlattenedDocument` with `pierce: true`, then `DOM.resolveNode`).
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

from conftest import REPO_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = REPO_ROOT / "screenshots"
WINDOW = {"width": 1400, "height": 900}
SMALLEST_DIAGRAM_TEXT_PX = 11.0
# (query, language, what a reader of that language expects first)
SEARCHES = [("perplexity", "en"), ("KV cache", "en"), ("batching", "en"), ("困惑度", "zh"), ("连续批处理", "zh")]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the browser dropping a connection when it navigates away is not a failure


@pytest.fixture(scope="module")
def site_url(built_site: Path) -> Iterator[str]:
    server = QuietServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(built_site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: apt-get install chromium fonts-noto-cjk", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class Reader:
    """One browser tab that records console errors, failed responses and requests leaving localhost."""

    def __init__(self, browser, site_url: str) -> None:
        self.site_url = site_url
        self.context = browser.new_context(viewport=WINDOW)
        self.page = self.context.new_page()
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.page.route("**/*", self.guard)
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("response", lambda r: self.errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
        self.cdp = self.context.new_cdp_session(self.page)
        self.cdp.send("DOM.enable")

    def guard(self, route, request) -> None:
        if request.url.startswith(self.site_url):
            route.continue_()
        else:
            self.outside.append(request.url)
            route.abort()

    def open(self, path: str) -> None:
        self.outside.clear()
        self.errors.clear()
        self.page.goto(self.site_url + path.rstrip("/") + "/", wait_until="load")
        self.page.evaluate("document.fonts.ready.then(() => true)")

    def close(self) -> None:
        self.context.close()


def site_pages(built_site: Path) -> list[str]:
    pages = [p for p in built_site.rglob("index.html") if "assets" not in p.parts and "search" not in p.parts]
    return sorted("/" + p.parent.relative_to(built_site).as_posix().strip(".").strip("/") for p in pages)


def is_english(path: str) -> bool:
    return path == "/en" or path.startswith("/en/")


def screenshot_name(path: str) -> str:
    language = "en" if is_english(path) else "zh"
    rest = path[len("/en"):] if is_english(path) else path
    return f"{language}/{rest.strip('/').replace('/', '-') or 'index'}.jpg"


# --- diagrams ------------------------------------------------------------------------------------

SMALLEST_TEXT_JS = """function () {
  // on-screen size of the smallest text in this SVG: font size times the scale the SVG is drawn at
  let smallest = Infinity, label = "";
  for (const el of this.querySelectorAll("*")) {
    const ownText = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!ownText || !el.getBoundingClientRect().width) continue;
    const holder = el instanceof SVGElement ? el : el.closest("foreignObject");
    if (!holder) continue;
    const px = parseFloat(getComputedStyle(el).fontSize) * holder.getScreenCTM().a;
    if (px < smallest) { smallest = px; label = el.textContent.trim().slice(0, 40); }
  }
  return [smallest, label];
}"""


def mermaid_svgs(cdp) -> tuple[int, list[int], int]:
    """(diagram hosts, backend ids of rendered SVGs, error SVGs) seen through every shadow root."""
    nodes = cdp.send("DOM.getFlattenedDocument", {"depth": -1, "pierce": True})["nodes"]
    hosts, rendered, errors = 0, [], 0
    for node in nodes:
        attrs = node.get("attributes", [])
        values = dict(zip(attrs[::2], attrs[1::2]))
        if node.get("nodeName") == "DIV" and "mermaid" in values.get("class", "").split():
            hosts += 1
        if node.get("nodeName", "").lower() == "svg" and values.get("id", "").startswith("__mermaid"):
            if values.get("aria-roledescription", "") == "error":
                errors += 1
            else:
                rendered.append(node["backendNodeId"])
    return hosts, rendered, errors


def check_diagrams(reader: Reader, built_site: Path, path: str) -> list[str]:
    html = (built_site / path.strip("/") / "index.html").read_text(encoding="utf-8")
    want = html.count('class="mermaid"')
    deadline = time.monotonic() + 20
    while True:
        hosts, rendered, errors = mermaid_svgs(reader.cdp)
        if len(rendered) + errors >= want or time.monotonic() > deadline:
            break
        reader.page.wait_for_timeout(250)
    problems = []
    if len(rendered) != want or errors:
        problems.append(f"{path}: {want} diagrams, {len(rendered)} rendered, {errors} with syntax errors")
    for number, backend_id in enumerate(rendered, 1):
        handle = reader.cdp.send("DOM.resolveNode", {"backendNodeId": backend_id})["object"]["objectId"]
        result = reader.cdp.send("Runtime.callFunctionOn", {
            "objectId": handle, "functionDeclaration": SMALLEST_TEXT_JS, "returnByValue": True})
        smallest, label = result["result"]["value"]
        if smallest < SMALLEST_DIAGRAM_TEXT_PX:
            problems.append(f"{path}: diagram {number}: text {smallest:.1f} px on screen ({label!r})")
    return problems


# --- formulas, width, titles ---------------------------------------------------------------------

FORMULAS_JS = """() => [...document.querySelectorAll(".md-content .arithmatex")].map(el =>
  el.querySelector(".katex-error") ? "error: " + el.textContent.slice(0, 60)
  : el.querySelector(".katex") ? "ok" : "not typeset: " + el.textContent.slice(0, 60))"""

# Scroll boxes in the main column: allowed inside code blocks and inside tables marked wide.
SIDEWAYS_JS = """() => {
  const article = document.querySelector(".md-content__inner");
  const page = document.documentElement;
  const found = [];
  if (page.scrollWidth > page.clientWidth + 1) found.push("the whole page " + page.scrollWidth + " px");
  for (const el of article.querySelectorAll("*")) {
    if (el.scrollWidth <= el.clientWidth + 1) continue;
    const overflow = getComputedStyle(el).overflowX;
    if (overflow !== "auto" && overflow !== "scroll") continue;
    if (el.closest("pre, .highlight, .wide")) continue;
    found.push(el.tagName.toLowerCase() + "." + [...el.classList].join(".") + " " +
               el.scrollWidth + " px in " + el.clientWidth + ": " + el.textContent.trim().slice(0, 50));
  }
  return found;
}"""


def check_page(reader: Reader, built_site: Path, path: str) -> list[str]:
    problems = check_diagrams(reader, built_site, path)
    for formula in reader.page.evaluate(FORMULAS_JS):
        if formula != "ok":
            problems.append(f"{path}: formula {formula}")
    for box in reader.page.evaluate(SIDEWAYS_JS):
        problems.append(f"{path}: scrolls sideways at {WINDOW['width']} px: {box}")
    return problems


def check_language_switch(reader: Reader, path: str) -> list[str]:
    """The selector's link to the other language leads to this page's twin, which loads."""
    english = is_english(path)
    target_lang = "zh" if english else "en"
    twin = (path[len("/en"):] or "/") if english else ("/en" + path).rstrip("/")
    link = reader.page.locator(f'a.md-select__link[hreflang="{target_lang}"]')
    if link.count() != 1:
        return [f"{path}: no language switch to {target_lang}"]
    with reader.page.expect_navigation(wait_until="load", timeout=15000):
        link.first.evaluate("a => a.click()")  # the menu opens on hover; a scripted click needs no hover
    landed = reader.page.url[len(reader.site_url):].rstrip("/") or "/"
    if landed != (twin.rstrip("/") or "/"):
        return [f"{path}: language switch led to {landed}, expected {twin}"]
    return []


def test_every_page_reads_well_offline_in_both_languages(built_site, site_url, browser):
    pages = site_pages(built_site)
    assert "/" in pages and "/en" in pages
    problems: list[str] = []
    titles: dict[tuple[str, str], list[str]] = {}
    reader = Reader(browser, site_url)
    for path in pages:
        reader.open(path)
        problems.extend(check_page(reader, built_site, path))
        titles.setdefault(("en" if is_english(path) else "zh", reader.page.title()), []).append(path)
        shot = SCREENSHOTS / screenshot_name(path)
        shot.parent.mkdir(parents=True, exist_ok=True)
        reader.page.screenshot(path=str(shot), full_page=True, type="jpeg", quality=70)  # jpeg: about half png's time
        if reader.errors:
            problems.append(f"{path}: console errors {reader.errors}")
        if reader.outside:
            problems.append(f"{path}: requests left localhost: {reader.outside}")
        problems.extend(check_language_switch(reader, path))
    reader.close()
    for (language, title), paths in titles.items():
        if len(paths) > 1:
            problems.append(f"{language}: {len(paths)} pages titled {title!r}: {paths}")
    assert not problems, "\n".join(problems)


# --- search --------------------------------------------------------------------------------------

def first_search_hit(reader: Reader, home: str, query: str) -> str:
    """Type the query until the search worker (which builds its index after the page loads) answers."""
    reader.open(home)
    box = reader.page.locator("input.md-search__input")
    box.click()
    hit = reader.page.locator(".md-search-result__list a.md-search-result__link").first
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        box.fill("")
        box.fill(query)
        box.press("End")  # the theme reads the query on keyup
        try:
            hit.wait_for(state="visible", timeout=1000)
            return hit.get_attribute("href") or ""
        except Exception:  # noqa: BLE001 (playwright's timeout: the index is not ready yet, type again)
            continue
    return ""


@pytest.mark.parametrize("query,language", SEARCHES, ids=[q for q, _ in SEARCHES])
def test_search_finds_a_page_in_the_readers_language_first(built_site, site_url, browser, query, language):
    reader = Reader(browser, site_url)
    href = first_search_hit(reader, "/en/" if language == "en" else "/", query)
    if query == "perplexity":
        SCREENSHOTS.mkdir(exist_ok=True)
        reader.page.screenshot(path=str(SCREENSHOTS / "search-en-perplexity.png"))
    landed = href[len(site_url):] if href.startswith(site_url) else href
    reader.close()
    assert href, f"{query!r}: no result"
    assert ("/en/" in href) == (language == "en"), f"{query!r}: the first hit {landed} is not a page in {language}"
    assert not reader.errors and not reader.outside, (reader.errors, reader.outside)
