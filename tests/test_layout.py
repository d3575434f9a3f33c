"""The repository's shape: teaching scripts are standalone pages, measurements live in bench/.

* a teaching script imports only the standard library and installed packages (no sibling script,
  no repository module, no sys.path edits), stays at or under 450 lines, reads in the agreed order
  and starts its "Run it" section with the command `make demo` runs;
* every results file under inference/*/results/ was written by a bench preset that the JSON names;
* every bench script defines presets with an `about` line and `quick` overrides.
"""

from __future__ import annotations

import ast
import importlib.machinery
import json
import sys
from pathlib import Path

import pytest

from conftest import BENCH, REPO_ROOT, import_example

sys.path.insert(0, str(REPO_ROOT / "tools"))

import demo  # noqa: E402  (tools/ is not a package)

SCRIPTS = sorted(REPO_ROOT.glob("inference/*/examples/*.py"))
MAX_LINES = 450
# Optional libraries a script may import lazily and refuse without (module name -> pip package).
OPTIONAL = {"llama_cpp": "llama-cpp-python", "triton": "triton", "flash_attn": "flash-attn", "vllm": "vllm"}
SEED_NAMES = {"gptq_example.py", "awq_example.py", "vllm_example.py", "kv_cache_optimization.py"}


def top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add("." * node.level + (node.module or ""))
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


def installed_spec(name: str):
    """Where `name` comes from when the repository's own folders are not on the path."""
    outside = [entry for entry in sys.path
               if not Path(entry or ".").resolve().is_relative_to(REPO_ROOT)
               or ".venv" in Path(entry).parts]
    return importlib.machinery.PathFinder.find_spec(name, outside)


def test_the_seed_scripts_keep_their_names() -> None:
    assert SEED_NAMES <= {path.name for path in SCRIPTS}


def import_problems(script: Path) -> list[str]:
    """Every import of `script` that does not come from the standard library or an installed package."""
    text = script.read_text(encoding="utf-8")
    imported = top_level_imports(script)
    problems = [f"relative import {name}" for name in imported if name.startswith(".")]
    siblings = {path.stem for path in script.parent.glob("*.py")} - {script.stem}
    problems += [f"sibling script {name}" for name in imported & siblings]
    if "sys.path" in text:
        problems.append("edits sys.path")
    for name in sorted(imported - {"__future__"} - siblings):
        if name.startswith(".") or name in sys.stdlib_module_names:
            continue
        spec = installed_spec(name)
        if spec is None and name in OPTIONAL:
            continue
        if spec is None:
            problems.append(f"{name}: neither standard library nor installed")
            continue
        origin = Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve()
        if origin.is_relative_to(REPO_ROOT) and ".venv" not in origin.parts:
            problems.append(f"{name} comes from the repository ({origin})")
    return problems


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_teaching_script_imports_only_installed_packages(script: Path) -> None:
    assert import_problems(script) == [], script.name


def test_the_import_check_catches_repository_imports(tmp_path: Path) -> None:
    (tmp_path / "sibling.py").write_text("X = 1\n")
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport sibling\nfrom common import fail\nfrom . import x\n")
    problems = import_problems(bad)
    print(problems)
    assert len(problems) == 3 and any("common" in p for p in problems) and any("sibling" in p for p in problems)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_teaching_script_is_at_most_450_lines(script: Path) -> None:
    lines = len(script.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{script.name} has {lines} lines (at most {MAX_LINES}): split it by concept"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_teaching_script_reads_in_the_agreed_order(script: Path) -> None:
    tree = ast.parse(script.read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{script.name} has no module docstring"
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert "build_parser" in functions and "main" in functions, script.name
    assert functions.index("build_parser") < functions.index("main"), script.name
    assert functions[-1] == "main", f"{script.name}: main() should be the last function"
    flags = script.read_text(encoding="utf-8").count("add_argument(")
    assert flags <= 10, f"{script.name} has {flags} flags (about 8 at most)"
    assert '"--json"' not in script.read_text(encoding="utf-8"), f"{script.name}: results files belong to bench/"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_docstring_starts_its_run_section_with_the_demo_command(script: Path) -> None:
    command = demo.docstring_command(script)
    assert command[0] == "python" and command[1] == script.relative_to(REPO_ROOT).as_posix(), command
    assert demo.HUB_ID in command, f"{script.name}: the demo command should name {demo.HUB_ID}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_teaching_script_parser_has_help_for_every_flag(script: Path) -> None:
    parser = import_example(script).build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{script.name}: {action.option_strings[0]} has no help text"


BENCHES = sorted(path for path in BENCH.glob("*.py") if path.name != "common.py")


@pytest.mark.parametrize("bench", BENCHES, ids=lambda p: p.name)
def test_bench_presets_are_described(bench: Path) -> None:
    module = import_example(bench)
    assert module.PRESETS, bench.name
    for name, preset in module.PRESETS.items():
        assert preset.get("about"), f"{bench.name} preset {name} has no 'about' line"
        assert isinstance(preset.get("quick"), dict), f"{bench.name} preset {name} has no 'quick' overrides"


RESULTS = sorted(REPO_ROOT.glob("inference/*/results/*.json"))


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_results_file_names_the_bench_preset_that_wrote_it(path: Path) -> None:
    result = json.loads(path.read_text(encoding="utf-8"))
    command = result["command"].split()
    assert command[:2][0] == "python" and command[1].startswith("bench/"), result["command"]
    bench = REPO_ROOT / command[1]
    assert bench.exists(), f"{path.name}: {command[1]} does not exist"
    preset = command[command.index("--preset") + 1]
    assert preset in import_example(bench).PRESETS, f"{path.name}: preset {preset} is not in {command[1]}"
    assert not result.get("quick"), f"{path.name} was written by a --quick test run"
    assert path.stem.endswith(f"-{preset}") or f"-{preset}-" in path.stem, (path.name, preset)
    for table in (path.with_suffix(".md"), path.with_suffix(".en.md")):
        assert table.exists(), f"{table.name} is missing beside {path.name}"
