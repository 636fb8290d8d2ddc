#!/usr/bin/env bash
# Set up (first run only, optional extras included), lint, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --extras
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
