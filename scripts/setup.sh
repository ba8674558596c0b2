#!/usr/bin/env bash
# Create .venv and install difflm into it (torch first: a CPU build, so deepspeed does not pull a CUDA one).
# Idempotent: skips the installs when pyproject.toml has not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.difflm-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
start=$(date +%s)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -vE "^WARNING: Location|BuildBackendWarning|^ *$" || true
.venv/bin/python -c "import difflm, torch, transformers, datasets, deepspeed, evaluate" >/dev/null 2>&1 || {
  echo "setup: difflm did not install cleanly into .venv" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: installed into .venv in $(( $(date +%s) - start )) s" >&2
