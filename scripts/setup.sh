#!/usr/bin/env bash
# Create .venv and install reasonscope with its dev extras (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned exactly (2.13.0): a looser pin would pull the CUDA build's multi-GB dependencies.
# bench: scikit-learn, the reference of bench/probes.py and of the fitter's equivalence test
.venv/bin/python -m pip install -q -e ".[dev,distributed,bench]"
# The explorer's browser test drives Debian's chromium through Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "setup: chromium is missing; install it (apt-get install chromium) for tests/test_app.py's browser test" >&2
    fi
fi
