#!/usr/bin/env bash
# The test suite (CPU, no network); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
python -m pytest -q "$@"
