#!/usr/bin/env bash
# `make results`: re-measure the committed CPU results files on this machine (tens of minutes).
# GPU results (files named *-h100.*, *-h200x2.*) come from the commands recorded inside them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL=.cache/models/SmolLM2-135M-Instruct
run() { echo "==> $*"; "$PY" "$@"; }
