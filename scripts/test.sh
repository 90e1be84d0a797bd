#!/usr/bin/env bash
# Set up (if needed), lint and type-check, then run the whole test suite (fast inner loop: pytest -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
