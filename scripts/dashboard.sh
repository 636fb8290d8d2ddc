#!/usr/bin/env bash
# Set up (first run only) and start the dashboard on http://localhost:${PORT:-8501}
#
#   bash scripts/dashboard.sh [--models SPEC.toml]... [streamlit options]
#
# --models (repeatable) adds the models of a spec file to the catalogue, like VISLIB_MODELS=a.toml:b.toml
# (both can be used; paths are taken relative to the current directory). Spec files are trusted
# configuration: a factory they name runs as the server's code. Never point them at user uploads.
set -euo pipefail
specs="${VISLIB_MODELS:-}"
rest=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --models)
      [[ $# -ge 2 ]] || { echo "dashboard.sh: --models needs a spec file" >&2; exit 2; }
      path="$2"; shift 2 ;;
    --models=*)
      path="${1#--models=}"; shift ;;
    *)
      rest+=("$1"); shift; continue ;;
  esac
  [[ -f "$path" ]] || { echo "dashboard.sh: spec file not found: $path" >&2; exit 2; }
  path="$(cd "$(dirname "$path")" && pwd)/$(basename "$path")"
  specs="${specs:+$specs:}$path"
done
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VISLIB_MODELS="$specs"
exec .venv/bin/streamlit run app.py --server.port "${PORT:-8501}" --server.fileWatcherType none ${rest[@]+"${rest[@]}"}
