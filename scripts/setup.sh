#!/usr/bin/env bash
# Create .venv and install difflm into it (torch first: a CPU build, so deepspeed does not pull a CUDA one).
# Idempotent: skips the installs when pyproject.toml has not changed since the last successful run. pip's own
# output goes to .venv/setup.log; the terminal gets one line (or, on failure, the log's end).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.difflm-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
start=$(date +%s)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
log=.venv/setup.log
: > "$log"
step() {  # run one install step into the log; on failure show what pip said
  if ! "$@" >> "$log" 2>&1; then
    echo "setup: '$*' failed; the end of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}
step .venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || step .venv/bin/python -m pip install -q "$TORCH_SPEC"
step .venv/bin/python -m pip install -q -e ".[test]"
step .venv/bin/python -c "import difflm, torch, transformers, datasets, deepspeed, evaluate"
echo "$want" > "$stamp"
echo "setup: installed difflm, $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)') into .venv" \
     "in $(( $(date +%s) - start )) s (pip's output: $log)" >&2
