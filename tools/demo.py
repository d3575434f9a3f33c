"""`make demo`: run every example script on the small model, quickly, and say where results went.

Each entry of DEMO_RUNS is one example with the arguments of its demo run. `{model}` is the
SmolLM2 folder, `{out}` the folder for demo results (`.cache/demo-results`, so the committed
results under `inference/*/results/` stay as measured). A test checks that every example
script in the tree has an entry here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from assets import REPO_ROOT, SMOLLM2_DIR, AssetError, build_smollm2

OUT_DIR = REPO_ROOT / ".cache" / "demo-results"
QUANT = "inference/quantization/examples"
ACCEL = "inference/inference-acceleration/examples"

DEMO_RUNS: dict[str, list[str]] = {
    f"{QUANT}/gptq_example.py": [
        "--model", "{model}", "--method", "scratch", "--calib-samples", "4", "--calib-seqlen", "256",
        "--eval-tokens", "512", "--ctx", "256", "--json", "{out}/gptq_example.json",
    ],
    f"{QUANT}/awq_example.py": [
        "--model", "{model}", "--method", "scratch", "--calib-samples", "4", "--calib-seqlen", "256",
        "--eval-tokens", "512", "--ctx", "256", "--search-tokens", "512", "--json", "{out}/awq_example.json",
    ],
    f"{QUANT}/compare_methods.py": [
        "--model", "{model}", "--no-library", "--no-sweep",
        "--rows", "fp-reference-w16-g-1-sym,rtn-scratch-w8-g64-sym,rtn-scratch-w4-g64-asym,rtn-scratch-w3-g64-asym",
        "--calib-samples", "2", "--calib-seqlen", "256", "--eval-tokens", "512", "--ctx", "256",
        "--cache-dir", "{out}/compare-cache",
    ],
    f"{QUANT}/quant_basics.py": [
        "--model", "{model}", "--max-layers", "1", "--bits", "4", "8", "--group-size", "0", "64", "32",
        "--json", "{out}/quant_basics-cpu.json", "--quiet",
    ],
    f"{QUANT}/gguf_example.py": [
        "--model", "{model}", "--bits", "4", "--no-perplexity", "--out-dir", "{out}/gguf", "--threads", "1",
        "--max-new-tokens", "16", "--repeats", "1", "--json", "{out}/gguf_example-cpu.json", "--quiet",
    ],
    f"{ACCEL}/kv_cache_optimization.py": [
        "--model", "{model}", "--max-new-tokens", "16", "--lengths", "32,128", "--repeats", "1",
        "--threads", "1", "--quiet", "--json", "{out}/kv_cache_optimization-cpu.json",
    ],
    f"{ACCEL}/flash_attention.py": [
        "--device", "cpu", "--lengths", "128,256,512", "--repeats", "2", "--warmup", "1", "--threads", "1",
        "--quiet", "--json", "{out}/flash_attention-cpu.json",
    ],
    f"{ACCEL}/fast_decode.py": [
        "--model", "{model}", "--device", "cpu", "--threads", "1", "--batch-sizes", "1", "--prompt-len", "16",
        "--slow-new-tokens", "4", "--group-size", "64", "--ppl-tokens", "128", "--ppl-context", "64",
        "--quiet", "--json", "{out}/fast_decode-cpu.json",
    ],
    f"{ACCEL}/paged_attention.py": [
        "--model", "{model}", "--check-prompts", "3", "--check-new-tokens", "12", "--num-requests", "12",
        "--prompt-len", "8", "48", "--output-len", "8", "32", "--max-num-seqs", "6", "--hf-batch-size", "6",
        "--hf-single", "2", "--kv-cache-gib", "0.05", "--max-model-len", "256", "--quiet",
        "--json", "{out}/paged_attention-cpu.json",
    ],
    f"{ACCEL}/vllm_example.py": [
        "--model", "{model}", "--num-prompts", "8", "--max-tokens", "16", "--loop-prompts", "4", "--quiet",
        "--json", "{out}/vllm_example-cpu.json",
    ],
    f"{ACCEL}/tensor_parallel.py": ["--model", "{model}", "--new-tokens", "16", "--json", "{out}/tensor_parallel-cpu.json"],
}

# Scripts launched by torchrun, with their number of processes (gloo on the CPU).
TORCHRUN_PROCESSES = {f"{ACCEL}/tensor_parallel.py": 2}


def example_scripts() -> list[str]:
    """Every example script in the tree, as repository-relative paths."""
    found = sorted(REPO_ROOT.glob("inference/*/examples/*.py"))
    return [path.relative_to(REPO_ROOT).as_posix() for path in found]


def run_demo(script: str, args: list[str]) -> float:
    filled = [arg.format(model=SMOLLM2_DIR, out=OUT_DIR) for arg in args]
    start = time.perf_counter()
    launcher = [sys.executable]
    if script in TORCHRUN_PROCESSES:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TORCHRUN_PROCESSES[script]}"]
    print(f"\n=== {' '.join(['python', *launcher[1:], script, *filled])}", flush=True)
    subprocess.run([*launcher, script, *filled], cwd=REPO_ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    missing = [script for script in example_scripts() if script not in DEMO_RUNS]
    if missing:
        sys.exit(f"error: no demo run listed in tools/demo.py for: {', '.join(missing)}")
    build_smollm2()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    timings = {script: run_demo(script, args) for script, args in DEMO_RUNS.items()}
    print("\nDemo finished:")
    for script, seconds in timings.items():
        print(f"  {seconds:7.1f} s  {script}")
    print(f"Results of this demo run: {OUT_DIR}")
    print("Measured results committed with the guides: inference/*/results/")


if __name__ == "__main__":
    try:
        main()
    except AssetError as error:
        sys.exit(f"error: {error}")
    except subprocess.CalledProcessError as error:
        sys.exit(f"error: the demo stopped at `{' '.join(map(str, error.cmd[1:]))}` (exit {error.returncode}); its output is above")
