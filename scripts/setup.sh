#!/usr/bin/env bash
# Create .venv and install requirements.txt into it when it changed (idempotent, offline-safe after once).
# With --extras, also requirements-extras.txt (transformers, ray[data], zennit: the optional features)
# and requirements-dev.txt (the wheel build, the API reference and the type checker).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
install() {  # install() FILE STAMP: pip install -r FILE unless FILE's hash is the one in .venv/STAMP
  local want
  want="$(sha256sum "$1" | cut -d' ' -f1)"
  if [ "$(cat ".venv/$2" 2>/dev/null || true)" != "$want" ]; then
    echo "setup: installing $1"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r "$1"
    echo "$want" > ".venv/$2"
  fi
}
install requirements.txt .requirements.sha256
if [ "${1:-}" = "--extras" ]; then
  install requirements-extras.txt .requirements-extras.sha256
  install requirements-dev.txt .requirements-dev.sha256
fi
