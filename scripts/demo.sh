#!/usr/bin/env bash
# The main job on the embedded grammar (no download): train a small model, generate text, check it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
start=$(date +%s)
difflm train --config configs/demo.yaml "$@"
difflm generate --model runs/demo --num-samples 200 --steps 200 --sampler ddim --eta 2 --out runs/demo/samples.jsonl --show 10
difflm check-grammar --samples runs/demo/samples.jsonl
echo "demo: train + generate took $(( $(date +%s) - start )) s; samples in runs/demo/samples.jsonl"
