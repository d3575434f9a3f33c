"""mkdocs hooks for the offline site.

mkdocs-material's language selector fetches `sitemap.xml` next to every `<link rel="alternate">`
of a page. mkdocs-static-i18n points those links at the page's twin (`/en/glossary/`, not `/en/`),
so the browser asks for `/en/glossary/sitemap.xml`, which no one writes: a 404 in the console of
every page. Material only uses that file to map a page to its twin, which the i18n links already
do, so a copy of the language's sitemap beside each page silences the 404s without changing
behaviour.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def on_post_build(config, **kwargs) -> None:
    site = Path(config["site_dir"])
    root_sitemap = site / "sitemap.xml"
    if not root_sitemap.exists():
        return
    for index in site.rglob("index.html"):
        folder = index.parent
        if (folder / "sitemap.xml").exists() or "assets" in folder.relative_to(site).parts:
            continue
        language_root = site / "en" if folder.relative_to(site).parts[:1] == ("en",) else site
        source = language_root / "sitemap.xml" if (language_root / "sitemap.xml").exists() else root_sitemap
        shutil.copyfile(source, folder / "sitemap.xml")
