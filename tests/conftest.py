"""Shared fixtures: the offline models, the corpus, and runners for teaching scripts and benches.

Tests import a teaching script by path (`import_example`, the one import helper, from
bench/common.py) and compare values themselves: both paths run inside the test. A subprocess run
(`run_script`) checks the script as a reader runs it; `run_bench` runs a bench preset on the tiny
model with --quick and returns the results JSON it wrote. Fixtures that cannot build their
prerequisite fail the test with one line saying what is missing; they never skip silently.
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
sys.path.insert(0, str(REPO_ROOT / "bench"))

import assets  # noqa: E402  (tools/ and bench/ are not packages; the paths are set just above)
from common import load_script as import_example  # noqa: E402,F401  (the one import helper)

QUANT_EXAMPLES = REPO_ROOT / "inference" / "quantization" / "examples"
ACCEL_EXAMPLES = REPO_ROOT / "inference" / "inference-acceleration" / "examples"
BENCH = REPO_ROOT / "bench"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run by `make test-gpu` on the GPU machine")
    config.addinivalue_line("markers", "slow: takes more than a minute on the 2-core CI machine")
    config.addinivalue_line("markers", "llamacpp: needs llama-cpp-python (make setup compiles it; SKIP_LLAMA_CPP=1 leaves it out)")


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


# Triton's interpreter runs kernels on the CPU with NumPy, but TRITON_INTERPRET=1 must be set
# before triton compiles anything in the process: a file's `interpreted` tests run in a pytest
# process of their own, started by that file's one test that calls run_interpreted_tests.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETER, reason="run in a pytest process with "
                                 "TRITON_INTERPRET=1 by its file's run_interpreted_tests")


def run_interpreted_tests(test_file: str) -> None:
    """Run `test_file`'s `interpreted` tests in a pytest process with TRITON_INTERPRET=1."""
    if INTERPRETER:
        pytest.skip("this process is the interpreted one")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (its CPU interpreter runs the kernels)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-k", "interpreted",
                           "-p", "no:cacheprovider"], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-2000:]


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


def run_bench(name: str, preset: str, out_dir: Path, *args: str, model: Path | None = None,
              timeout: float = 900) -> dict[str, Any]:
    """Run `bench/<name>.py --preset <preset> --quick --out <out_dir>` and return its results JSON.

    The preset's results stem is `<stem>-<preset>`; exactly one JSON file must appear.
    """
    extra = ["--model", str(model)] if model else []
    run_script(BENCH / f"{name}.py", "--preset", preset, "--quick", "--out", str(out_dir), *extra, *args,
               timeout=timeout)
    written = sorted(out_dir.glob(f"*-{preset}.json"))
    assert len(written) >= 1, f"bench/{name}.py --preset {preset} wrote no results JSON in {out_dir}"
    return json.loads(written[0].read_text())


def assert_results_header(result: dict[str, Any]) -> None:
    """Every results file names its hardware, versions, preset, command and date (design.md)."""
    for key in ("hardware", "versions", "preset", "command", "date", "settings"):
        assert key in result, f"results JSON lacks {key!r}"
    assert "torch" in result["versions"]
    assert result["command"].startswith("python bench/"), result["command"]


def assert_refusal(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    """A refusal: exit code 2, one `error:` line naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith(("error:", f"{Path(proc.args[1]).name}: error:")), proc.stderr
    for word in words:
        assert word in lines[-1], (word, lines[-1])


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
