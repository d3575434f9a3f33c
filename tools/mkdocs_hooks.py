"""mkdocs hooks for the offline bilingual site.

* **One search index per language.** mkdocs-static-i18n builds both languages into one site and
  merges their search entries into one index, where an English query is stemmed and ranked
  against Chinese pages too. After the merge, the index is split: Chinese pages keep
  `search/search_index.json`, English pages get `en/search/search_index.json` (locations made
  relative to `en/`), and every English page's theme config points its `base` at `en/`.
* **Titles from the page's own heading.** The navigation keeps short labels ("科普版" under
  "量化"), but a browser tab, a bookmark, a search result and the header shown while scrolling
  need the page's full name, so they take the page's first heading.
* **Numbered figures.** An image alone in a paragraph becomes a figure whose caption is its alt
  text, numbered per page ("图 1" / "Figure 1"); glightbox makes it open at full size on a click.
* **Sitemaps beside every page.** mkdocs-material's language selector fetches `sitemap.xml` next
  to every `<link rel="alternate">`; mkdocs-static-i18n points those links at the page's twin
  (`/en/glossary/`), so a copy of the language's sitemap beside each page avoids a 404.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

from mkdocs.plugins import event_priority

ENGLISH = "en"
FIGURE_PREFIX = {"zh": "图 {}：", "en": "Figure {}. "}
LONE_IMAGE = re.compile(r"<p>\s*(<img\b[^>]*?\balt=\"([^\"]*)\"[^>]*>)\s*</p>")
THEME_CONFIG = re.compile(r'(<script id="__config" type="application/json">)(.*?)(</script>)', re.S)
TITLE_TAG = re.compile(r"<title>.*?</title>", re.S)
HEADER_TOPIC = re.compile(r'(data-md-component="header-topic">\s*<span class="md-ellipsis">).*?(</span>)', re.S)

full_titles: dict[str, str] = {}  # page url -> its first heading, for the search index


def page_language(url: str) -> str:
    return ENGLISH if url == ENGLISH + "/" or url.startswith(ENGLISH + "/") else "zh"


def first_heading(page) -> str | None:
    items = list(page.toc)
    return html.unescape(items[0].title) if items and items[0].level == 1 else None


def number_figures(content: str, language: str) -> str:
    counter = 0

    def figure(match: re.Match) -> str:
        nonlocal counter
        counter += 1
        caption = FIGURE_PREFIX[language].format(counter) + match.group(2)
        return f"<figure class=\"numbered\">{match.group(1)}<figcaption>{caption}</figcaption></figure>"

    return LONE_IMAGE.sub(figure, content)


@event_priority(50)  # before glightbox wraps each image in its link
def on_page_content(html_text: str, page, config, files) -> str:
    heading = first_heading(page)
    if heading:
        full_titles[page.url] = heading
    return number_figures(html_text, page_language(page.url))


def on_post_page(output: str, page, config) -> str:
    heading = full_titles.get(page.url)
    if heading:
        site_name = html.escape(config["site_name"])
        output = TITLE_TAG.sub(lambda _: f"<title>{html.escape(heading)} - {site_name}</title>", output, count=1)
        # the header shows the page's name once the reader scrolls past the first heading
        output = HEADER_TOPIC.sub(lambda m: m.group(1) + html.escape(heading) + m.group(2), output, count=1)
    if page_language(page.url) == ENGLISH:
        output = THEME_CONFIG.sub(point_base_at_english_root, output, count=1)
    return output


def point_base_at_english_root(match: re.Match) -> str:
    theme = json.loads(match.group(2))
    theme["base"] = theme["base"].rstrip("/") + "/" + ENGLISH + "/"  # a folder: URLs resolve inside it
    return match.group(1) + json.dumps(theme, ensure_ascii=False) + match.group(3)


def split_search_index(site: Path) -> None:
    merged_path = site / "search" / "search_index.json"
    if not merged_path.exists():
        return
    merged = json.loads(merged_path.read_text(encoding="utf-8"))
    by_language: dict[str, list[dict]] = {"zh": [], ENGLISH: []}
    for doc in merged["docs"]:
        page_url = doc["location"].split("#", 1)[0]
        if "#" not in doc["location"] and page_url in full_titles:
            doc["title"] = full_titles[page_url]
        language = page_language(doc["location"])
        if language == ENGLISH:
            doc["location"] = doc["location"][len(ENGLISH) + 1:]
        by_language[language].append(doc)
    for language, docs in by_language.items():
        folder = site / "search" if language == "zh" else site / ENGLISH / "search"
        folder.mkdir(parents=True, exist_ok=True)
        index = {"config": {**merged["config"], "lang": [language]}, "docs": docs}
        (folder / "search_index.json").write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")


def copy_sitemaps(site: Path) -> None:
    root_sitemap = site / "sitemap.xml"
    if not root_sitemap.exists():
        return
    for index in site.rglob("index.html"):
        folder = index.parent
        if (folder / "sitemap.xml").exists() or {"assets", "search"} & set(folder.relative_to(site).parts):
            continue
        language_root = site / ENGLISH if folder.relative_to(site).parts[:1] == (ENGLISH,) else site
        source = language_root / "sitemap.xml" if (language_root / "sitemap.xml").exists() else root_sitemap
        shutil.copyfile(source, folder / "sitemap.xml")


@event_priority(-200)  # after mkdocs-static-i18n (-100) has merged both languages' search entries
def on_post_build(config, **kwargs) -> None:
    site = Path(config["site_dir"])
    split_search_index(site)
    copy_sitemaps(site)
