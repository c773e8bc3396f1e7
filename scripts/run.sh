#!/usr/bin/env bash
# One entry point that does all set-up on a fresh machine, then runs a job:
#   bash scripts/run.sh demo [args]   -> the main job: train/evaluate the embedded tiny OmniMamba (omnimamba-hf demo)
#   bash scripts/run.sh test [args]   -> the test suite (pytest)
#   bash scripts/run.sh <any omnimamba-hf subcommand> [args]
# Set-up: a virtual environment in .venv (override with OMNIMAMBA_VENV), torch (the CPU build where the machine has it
# on disk: see docs/DEVELOPING.md), then this package with its test/demo extras. Re-runs skip what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OMNIMAMBA_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.omnimamba-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build where none is installed.
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==${OMNIMAMBA_TORCH_VERSION:-2.13.0}"
  "$VENV/bin/python" -m pip install -q -e ".[test,demo]"
  touch "$STAMP"
fi
job=${1:-demo}
shift || true
case "$job" in
  test) exec "$VENV/bin/python" -m pytest tests "$@" ;;
  *) exec "$VENV/bin/omnimamba-hf" "$job" "$@" ;;
esac
