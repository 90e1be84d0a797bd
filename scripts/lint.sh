#!/usr/bin/env bash
# Lint, format check and type check, as CI runs them (fix with: .venv/bin/ruff check --fix . && .venv/bin/ruff format .).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
