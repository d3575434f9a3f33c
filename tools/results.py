"""`make results` / `make results-gpu`: run every bench preset of one kind, then the effect tables.

    python tools/results.py cpu      # the CPU presets (tens of minutes on 2 cores)
    python tools/results.py h200     # the GPU presets, on a machine with an H200

Each bench script under bench/ declares its presets; this runs `python bench/<topic>.py --preset
<name>` for every script that has one of that name, so the commands live in one place (the
presets), and finally regenerates the index page's effect tables from the new results files.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def preset_names(bench: Path) -> set[str]:
    """The keys of the module-level PRESETS dict, read without importing the script."""
    for node in ast.parse(bench.read_text(encoding="utf-8")).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in targets) and isinstance(node.value, ast.Dict):
            return {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
    return set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="preset name to run in every bench script that has it (cpu, h200)")
    args = parser.parse_args()
    benches = [b for b in sorted((REPO_ROOT / "bench").glob("*.py")) if args.preset in preset_names(b)]
    if not benches:
        parser.error(f"no bench script has a preset named {args.preset!r}")
    for bench in benches:
        command = [sys.executable, bench.relative_to(REPO_ROOT).as_posix(), "--preset", args.preset]
        print(f"==> python {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
            sys.exit(f"error: {bench.name} --preset {args.preset} failed; its output is above")
        print(f"    {time.perf_counter() - start:.0f} s", flush=True)
    subprocess.run([sys.executable, "tools/effects.py"], cwd=REPO_ROOT, check=True)


if __name__ == "__main__":
    main()
