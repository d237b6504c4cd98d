#!/usr/bin/env bash
# Set up (bash scripts/setup.sh --test), lint with ruff, check the layer contracts (import-linter), and run the
# whole test suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest -q -n 2 "$@"
