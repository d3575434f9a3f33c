"""What every benchmark shares: presets, errors, devices, timing, bandwidth, results files.

The teaching scripts under `inference/*/examples/` stay standalone (pip packages only); the
measurements live here. A benchmark script (one per topic, `bench/<topic>.py`) loads the teaching
script it measures by path (`load_script`), adds workloads, baselines, timing and plots, and
writes one results file set through `write_results`:

    <results dir>/<name>-<preset>.json     hardware, versions, preset, command, date, metrics
    <results dir>/<name>-<preset>.md       the table in Chinese (the guide includes it)
    <results dir>/<name>-<preset>.en.md    the same table in English
    <results dir>/<name>-<preset>*.png     plots

Every benchmark takes the same four flags (`bench_parser`):

    --preset NAME   the named settings behind a committed results file (cpu, h200, ...)
    --model PATH    replace the preset's model (tests pass the random tiny model)
    --out DIR       write there instead of the module's results/ folder
    --quick         shrink every size for a test run (the file records quick: true)

Run a preset from the repository root: `python bench/<topic>.py --preset cpu`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

REPO_ROOT = Path(__file__).resolve().parent.parent
QUANT = REPO_ROOT / "inference" / "quantization"
ACCEL = REPO_ROOT / "inference" / "inference-acceleration"
SMOLLM2_DIR = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"

# Llama-3-8B's shape: speed does not depend on weight values, so random bf16 weights of this
# shape measure decode and serving speed honestly on a GPU (quality needs real weights).
LLAMA3_8B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

# The preset "model" that builds Llama-3-8B's shape with random weights instead of loading one.
RANDOM_8B = "llama3-8b-random"

# The offline corpus: Python's bundled pydoc topics joined in key order and cut at the first
# paragraph break after 40 % of the characters. Calibration text is the first part, evaluation
# text the rest, so the two never overlap.
CALIBRATION_FRACTION = 0.4


# ---------------------------------------------------------------------------------------------
# One error path: a refusal is one line on stderr and exit code 2, never a traceback.
# ---------------------------------------------------------------------------------------------
class BenchError(RuntimeError):
    """A run-time refusal; the message names the problem and the fix."""


def fail(message: str) -> NoReturn:
    raise BenchError(message)


def run_main(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> None:
    """Parse the flags and run `main`, turning a BenchError into `error: ...` and exit code 2."""
    args = parser.parse_args()
    try:
        main(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Presets and the shared command line.
# ---------------------------------------------------------------------------------------------
def bench_parser(description: str, presets: dict[str, dict[str, Any]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(presets),
                        help="named settings of a committed results file: "
                             + "; ".join(f"{name}: {p.get('about', '')}" for name, p in presets.items()))
    parser.add_argument("--model", help="replace the preset's model (a local folder or hub id)")
    parser.add_argument("--out", type=Path, help="folder for the results files (default: the module's results/)")
    parser.add_argument("--quick", action="store_true",
                        help="shrink every size for a test run; the file records quick: true")
    return parser


def resolve_preset(presets: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The preset's settings, with its `quick` overrides under --quick and --model applied."""
    settings = {key: value for key, value in presets[args.preset].items() if key != "quick"}
    if args.quick:
        settings.update(presets[args.preset].get("quick", {}))
    if args.model:
        settings["model"] = args.model
    if "model" in settings:
        settings["model"] = model_path(settings["model"])
    return settings


def model_path(name: str) -> str:
    """`smollm2` names the converted small model; anything else is passed through."""
    if name != "smollm2":
        return name
    if not (SMOLLM2_DIR / "config.json").exists():
        fail(f"the small model is not prepared at {SMOLLM2_DIR}: run `make setup`")
    return str(SMOLLM2_DIR)


def command_line() -> str:
    """The command that made a results file, as a reader would type it from the repository root.

    `--out DIR` is left out: where the files were written is not part of the measurement.
    """
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO_ROOT)
    args = sys.argv[1:]
    if "--out" in args:
        at = args.index("--out")
        args = args[:at] + args[at + 2:]
    return shlex.join(["python", str(script), *args])


def load_script(path: Path) -> ModuleType:
    """Import a teaching script by its path (they are pages, not packages).

    It is registered in sys.modules first: dataclasses look their module up while the file runs.
    """
    if not path.exists():
        fail(f"{path} does not exist")
    path = path.resolve()
    where = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else Path(path.name)
    name = "script_" + "_".join(part.replace("-", "_") for part in where.with_suffix("").parts)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Devices, hardware and versions.
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("this preset needs a CUDA GPU and none is visible: run it on a GPU machine, or use --preset cpu")
    return torch.device(name)


def dtype_of(name: str) -> "torch.dtype":
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        fail(f"unknown dtype {name!r}: use one of {', '.join(dtypes)}")
    return dtypes[name]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: "torch.device") -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def versions(*packages: str) -> dict[str, str]:
    """Python, torch, transformers and the named packages that are installed."""
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", *packages):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    import torch

    if torch.version.cuda and torch.cuda.is_available():
        found["cuda"] = torch.version.cuda
    return found


def results_header(settings: dict[str, Any], args: argparse.Namespace, device: "torch.device",
                   packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys every results file starts with (design.md, Measurement)."""
    return {
        "hardware": hardware(device),
        "versions": versions(*packages),
        "preset": args.preset,
        "quick": bool(args.quick),
        "command": command_line(),
        "settings": settings,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# Timing: warm-up excluded, CUDA events on a GPU, a spread rather than one number.
# ---------------------------------------------------------------------------------------------
def sync(device: "torch.device") -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(fn: Callable[[], Any]) -> tuple["torch.cuda.CUDAGraph", Any]:
    """Record fn() in a CUDA graph after two warm-up calls on a side stream (cuBLAS handles,
    Triton autotuning and allocations happen there, not in the graph): (graph, fn's output,
    which each replay rewrites in place)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_ms(fn: Callable[[], Any], device: "torch.device", warmup: int = 1,
            repeats: int = 3) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn, after `warmup` calls that are not counted."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def spread(samples: list[float]) -> dict[str, float]:
    """Median and interquartile range of a list of timings."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return {"median": ordered[0], "q1": ordered[0], "q3": ordered[0], "n": 1}
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "n": len(ordered)}


def copy_bandwidth_gbs(device: "torch.device", gib: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written): the decode roofline's ceiling."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda: dst.copy_(src), device, warmup=2, repeats=repeats))
    del src, dst
    return 2 * n * 2 / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# Models and text.
# ---------------------------------------------------------------------------------------------
def llama3_8b_config(**overrides: Any) -> "transformers.LlamaConfig":
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA3_8B, **overrides})


def random_model(config: Any, device: "torch.device", dtype: "torch.dtype") -> "torch.nn.Module":
    """A causal LM of `config`'s shape with random weights, built straight on the device."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def pydoc_corpus() -> tuple[str, str]:
    """(calibration_text, evaluation_text) from Python's bundled pydoc topics; they never overlap."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    cut = text.index("\n\n", int(len(text) * CALIBRATION_FRACTION))
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------------------------
# Results files: checked writable first, written whole or not at all.
# ---------------------------------------------------------------------------------------------
def results_dir(args: argparse.Namespace, default: Path) -> Path:
    """The output folder, created and checked writable before any work starts."""
    folder = args.out or default
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        fail(f"cannot write results to {folder} ({error.strerror}): pass --out with a writable folder")
    return folder


def start(presets: dict[str, dict[str, Any]], args: argparse.Namespace,
          results: Path) -> tuple[dict[str, Any], Path, "torch.device", "torch.dtype"]:
    """The opening a timing bench shares: the preset's settings, the results folder (checked
    writable), the device and dtype it names, its CPU thread count (if it sets one), autograd
    off (timing only: eager warm-ups would otherwise keep tensors saved for a backward)."""
    import torch

    settings = resolve_preset(presets, args)
    folder = results_dir(args, results)
    device, dtype = resolve_device(settings["device"]), dtype_of(settings["dtype"])
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    torch.set_grad_enabled(False)
    return settings, folder, device, dtype


def markdown_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one letter per column, l or r (numbers right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *[[str(cell) for cell in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def write_results(folder: Path, stem: str, result: dict[str, Any], tables: dict[str, str],
                  plots: dict[str, Callable[[Path], None]] | None = None) -> list[Path]:
    """Write stem.json, stem.md (zh), stem.en.md and each plot (suffix -> draw(path)).

    Everything goes to temporary names first and is renamed at the end, so a failure leaves
    no half-written set behind.
    """
    if set(tables) != {"zh", "en"}:
        raise ValueError("tables needs a 'zh' and an 'en' entry")
    staged: list[tuple[Path, Path]] = []
    try:
        for target, writer in _result_writers(folder, stem, result, tables, plots or {}):
            tmp = target.with_name(f".{target.name}.partial")
            writer(tmp)
            staged.append((tmp, target))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, target in staged:
        os.replace(tmp, target)
    return [target for _, target in staged]


def _result_writers(folder: Path, stem: str, result: dict[str, Any], tables: dict[str, str],
                    plots: dict[str, Callable[[Path], None]]) -> Iterator[tuple[Path, Callable[[Path], None]]]:
    def text(content: str) -> Callable[[Path], None]:
        return lambda path: path.write_text(content, encoding="utf-8")

    yield folder / f"{stem}.json", text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    yield folder / f"{stem}.md", text(tables["zh"])
    yield folder / f"{stem}.en.md", text(tables["en"])
    for suffix, draw in plots.items():
        yield folder / f"{stem}{suffix}.png", draw


def new_figure(width: float = 6.4, height: float = 4.0) -> tuple[Any, Any]:
    """One matplotlib figure sized to read in the page column (one idea per figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11})
    return plt.subplots(figsize=(width, height), dpi=120)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
