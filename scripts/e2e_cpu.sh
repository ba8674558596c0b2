#!/usr/bin/env bash
# The foundation issue's E2E acceptance run on a CPU: train configs/e2e-cpu.yaml (20 minutes) on the local E2E
# CSVs, draw 64 samples, print ten and the dev-loss curve. Needs ../shared/data/e2e (or override data.source).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
difflm train --config configs/e2e-cpu.yaml --no-progress "$@"
difflm generate --model runs/e2e-cpu --num-samples 64 --steps 200 --out runs/e2e-cpu/samples.jsonl --show 10
python - <<'PY'
import json
rows = [json.loads(l) for l in open("runs/e2e-cpu/metrics.jsonl") if "dev_loss" in l]
print("| step | minutes | dev loss | dev loss (EMA) |\n| ---: | ---: | ---: | ---: |")
for r in rows:
    print(f"| {r['step']} | {r['elapsed_s'] / 60:.1f} | {r['dev_loss']:.4f} | {r['dev_loss_ema']:.4f} |")
PY
