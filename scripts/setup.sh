#!/usr/bin/env bash
# Create .venv and install reasonscope with its dev extras (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned exactly (2.13.0): a looser pin would pull the CUDA build's multi-GB dependencies.
.venv/bin/python -m pip install -q -e ".[dev,distributed]"
