"""The index page's effect tables are generated from the results files and must be up to date."""

from __future__ import annotations

import sys

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))

import effects  # noqa: E402  (tools/ is not a package)


def test_effect_tables_match_the_results_files():
    for path, text in effects.render().items():
        assert path.exists(), f"{path} is missing: run `python tools/effects.py`"
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run `python tools/effects.py`"


def test_the_index_pages_include_the_effect_tables():
    for page, table in (("README.md", "effects.md"), ("README.en.md", "effects.en.md")):
        text = (REPO_ROOT / "inference" / page).read_text(encoding="utf-8")
        assert f'--8<-- "inference/results/{table}"' in text


def test_every_effect_row_names_its_results_file():
    for path, text in effects.render().items():
        rows = [line for line in text.splitlines()[2:] if line.startswith("|")]
        assert len(rows) >= 7
        for row in rows:
            file = row.rstrip(" |").rsplit("`", 2)[-2]
            assert (REPO_ROOT / "inference" / file).exists(), f"{path.name}: {file} does not exist"
