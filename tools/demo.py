"""`make demo`: run every teaching script as its docstring says, on the small model, offline.

Each teaching script's docstring has a "Run it" section whose first command runs it on
SmolLM2-135M-Instruct on the CPU. The demo runs exactly that command, with the hub id replaced by
the local copy that `make setup` converted (nothing is downloaded), so the command a reader sees
is the command that is tested. Teaching scripts write no results files: the committed results come
from `bench/` (`make results`).
"""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from assets import REPO_ROOT, SMOLLM2_DIR, AssetError, build_smollm2

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def teaching_scripts() -> list[Path]:
    return sorted(REPO_ROOT.glob("inference/*/examples/*.py"))


def docstring_command(script: Path) -> list[str]:
    """The first `python ...` command after the docstring's "Run it" heading (with \\ continuations)."""
    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().lower() == "run it")
    except StopIteration:
        raise SystemExit(f"error: {script.name} has no 'Run it' section in its docstring") from None
    for i in range(start + 1, len(lines)):
        if lines[i].strip().startswith("python "):
            text = lines[i].strip()
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            return shlex.split(text)
    raise SystemExit(f"error: {script.name}'s 'Run it' section has no `python ...` command")


def run_demo(script: Path) -> float:
    command = [SMOLLM2_DIR.as_posix() if word == HUB_ID else word for word in docstring_command(script)]
    print(f"\n=== {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, *command[1:]], cwd=REPO_ROOT, check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    build_smollm2()
    timings = {script: run_demo(script) for script in teaching_scripts()}
    print("\nDemo finished:")
    for script, seconds in timings.items():
        print(f"  {seconds:7.1f} s  {script.relative_to(REPO_ROOT)}")
    print("Measured results committed with the guides: inference/*/results/ (written by bench/, `make results`)")


if __name__ == "__main__":
    try:
        main()
    except AssetError as error:
        sys.exit(f"error: {error}")
    except subprocess.CalledProcessError as error:
        sys.exit(f"error: the demo stopped at `{shlex.join(map(str, error.cmd[1:]))}` (exit {error.returncode}); "
                 "its output is above")
