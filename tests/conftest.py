"""Shared fixtures: the offline models, the corpus, and a runner for the example scripts.

Every example is tested the way a reader runs it: as a subprocess with `--json PATH`, then
the JSON it wrote is asserted. Fixtures that cannot build their prerequisite fail the test
with one line saying what is missing; they never skip silently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))

import assets  # noqa: E402  (tools/ is not a package; the path is set just above)

QUANT_EXAMPLES = REPO_ROOT / "inference" / "quantization" / "examples"
ACCEL_EXAMPLES = REPO_ROOT / "inference" / "inference-acceleration" / "examples"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run by `make test-gpu` on the GPU machine")
    config.addinivalue_line("markers", "slow: takes more than a minute on the 2-core CI machine")
    config.addinivalue_line("markers", "llamacpp: needs llama-cpp-python (compiled from source, about 4 minutes)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are reported as skipped with their reason on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _build(builder, *args) -> Path:
    try:
        return builder(*args)
    except assets.AssetError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A random 2-layer Llama folder (GQA, byte-level BPE tokenizer); built in seconds."""
    return _build(assets.build_tiny_llama)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder, converted once from its GGUF file."""
    return _build(assets.build_smollm2)


@pytest.fixture(scope="session")
def corpus() -> tuple[str, str]:
    """(calibration_text, evaluation_text) from pydoc_data; the two parts never overlap."""
    return assets.pydoc_corpus()


@pytest.fixture(scope="session")
def corpus_files() -> tuple[Path, Path]:
    """The same two parts written to `.cache/corpus/` for scripts that take `--*-file` paths."""
    return assets.write_corpus()


def import_example(script: Path):
    """Import an example script as a module, so tests can call its functions directly.

    It is registered in sys.modules first: dataclasses look their module up while the file executes.
    """
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_script(script: Path, *args: str, timeout: float = 600, env: dict[str, str] | None = None,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an example script as a reader would; on failure show its output in the test report."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO_ROOT,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{script.name} {' '.join(map(str, args))} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}",
            pytrace=False,
        )
    return proc


def run_script_json(script: Path, json_path: Path, *args: str, timeout: float = 600,
                    env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a script with `--json json_path` and return what it wrote."""
    run_script(script, *args, "--json", str(json_path), timeout=timeout, env=env)
    return json.loads(json_path.read_text())


def assert_results_header(result: dict[str, Any]) -> None:
    """Every results file names its hardware, versions, command and date (design.md)."""
    for key in ("hardware", "versions", "command", "date"):
        assert key in result, f"results JSON lacks {key!r}"
    assert "torch" in result["versions"]


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built once with `mkdocs build --strict` (a warning fails the build)."""
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}", pytrace=False)
    return site
