#!/usr/bin/env bash
# Set up (first run only, optional extras included), lint, build the API reference (warnings are errors;
# the site goes to site/, an artifact), type-check vislib/ (mypy), and run the whole test suite. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --extras
.venv/bin/ruff check .
.venv/bin/mkdocs build --strict --quiet
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
