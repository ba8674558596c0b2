#!/usr/bin/env bash
# The GPU run: everything a GPU must show, in one command, in under 9 minutes on one H200 (docs/benchmarks.md).
#
#   bash scripts/gpu-check.sh OUT             # on the GPU machine, from the repository root's copy
#   bash scripts/gpu-check.sh OUT --dry-run   # on a CPU with the tiny configs, in about a minute: it starts
#
# 1. `difflm bench` on configs/e2e.yaml's 87M model: training, engines (plain PyTorch, DeepSpeed ZeRO 0-3),
#    peak memory by length, sampling; each row into OUT/bench.md and OUT/bench.jsonl as it is measured.
# 2. quality: configs/e2e-fast.yaml trained for about 3 minutes on E2E, a small GPT-2 teacher for 1 minute,
#    512 samples at 200 DDIM steps: lm-score, diversity (OUT/quality/).
# 3. OUT/summary.md: the figures the GPU issue asks for, beside its targets.
# Each stage has its own time limit, so a stage that hangs costs only its share, and whatever finished is kept.
#
# On the GPU machine (no network): the E2E CSVs in .e2e/ and the wheels of ../shared/gpu/prepare-wheels.sh in
# .whl/ (both named in .git/info/exclude and carried along); the wheels are installed into .site/ when the
# machine lacks deepspeed, datasets or evaluate. E2E_DIR overrides the data folder.
set -uo pipefail
out=${1:?usage: bash scripts/gpu-check.sh OUT [--dry-run]}
dry=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out/quality"
out=$(cd "$out" && pwd)
work=${WORK:-$(mktemp -d)}  # the trained models stay here (hundreds of MB); OUT gets their small files
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if ! "$PY" -c "import deepspeed, datasets, evaluate" 2>/dev/null && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl \
    > "$out/pip.log" 2>&1 || { echo "gpu-check: installing .whl failed (see $out/pip.log)"; exit 1; }
fi
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # 9.0a breaks DeepSpeed's op builds (../shared/gpu)
difflm=("$PY" -m difflm.cli)  # no console script there: the package runs from PYTHONPATH
stages="$out/stages.jsonl"
: > "$stages"

stage() {  # stage NAME SECONDS CMD...: CMD under a time limit; stdout to OUT/NAME.md, stderr to OUT/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$out/$name.md" 2> "$out/$name.log"
  rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit\": $limit}" >> "$stages"
  echo "gpu-check: $name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)"
}

if [ "$dry" = "--dry-run" ]; then  # the same commands on the tiny configs and the embedded grammar
  bench_args=(--config configs/tiny.yaml --steps 1 --warmup 1 --batch 16 --sample-batch 8 --vocab 50
              --quality-sequences 0)
  data=(data.source=builtin:restaurants data.dev_source= data.text_column=text data.mr_column= data.seq_len=24
        data.builtin_train=2000 data.builtin_dev=200)
  train_cfg=configs/tiny.yaml
  train_args=(train.max_steps=40 train.eval_every=20 train.max_minutes=2 train.precision=fp32 train.compile=false
              model.output=logits model.embedding_norm=true model.mse_weight=0 model.ce_weight=1
              model.self_condition=true model.attributes=true diffusion.time_warp_bins=10)
  teacher_args=(teacher.max_steps=40 teacher.max_minutes=1 teacher.hidden_size=32 teacher.num_layers=1
                teacher.num_heads=2 teacher.eval_every=20)
  samples=32 eval_steps=50 limits=(240 120 60 120)
elif [ "$dry" = "" ]; then
  e2e=${E2E_DIR:-.e2e}
  [ -f "$e2e/trainset.csv" ] || { echo "gpu-check: no $e2e/trainset.csv: copy ../shared/data/e2e there (or set E2E_DIR)"; exit 1; }
  bench_args=(--config configs/e2e.yaml --steps 15 --warmup 5 --quality-sequences 0)
  data=(data.source="$e2e/trainset.csv" data.dev_source="$e2e/devset.csv")
  train_cfg=configs/e2e-fast.yaml
  # about 3 minutes: a step budget the H100 figures of ../shared/gpu/README.md put near it, the time cap beside it
  train_args=(train.max_steps=2500 train.warmup_steps=200 train.max_minutes=3.5 train.eval_every=500
              train.save_every=100000)
  teacher_args=(teacher.max_minutes=1 teacher.max_steps=3000 teacher.hidden_size=256 teacher.num_layers=4
                teacher.num_heads=4 teacher.lr=1e-3 teacher.warmup_steps=200 teacher.eval_every=1000)
  samples=512 eval_steps=200 limits=(200 260 100 90)
else
  echo "gpu-check: unknown option $dry (only --dry-run)"; exit 2
fi

stage bench "${limits[0]}" "${difflm[@]}" bench "${bench_args[@]}" --json "$out/bench.jsonl"
stage train "${limits[1]}" "${difflm[@]}" train --config "$train_cfg" "${data[@]}" "${train_args[@]}" \
  train.out_dir="$work/model" --no-progress --overwrite
stage teacher "${limits[2]}" "${difflm[@]}" train-teacher --model "$work/model" "${data[@]}" "${teacher_args[@]}" \
  teacher.out_dir="$work/teacher" --no-progress --overwrite
stage eval "${limits[3]}" "${difflm[@]}" eval --model "$work/model" --teacher "$work/teacher" \
  --metrics lm_score,diversity --num-samples "$samples" --steps "$eval_steps" --out "$out/quality/eval" --no-progress
for run in model teacher; do  # curves, metrics and model cards back; weights and optimizer state stay
  mkdir -p "$out/quality/$run"
  cp "$work/$run/metrics.jsonl" "$work/$run/training.png" "$out/quality/$run/" 2>/dev/null
  cp "$work/$run/model/README.md" "$out/quality/$run/card.md" 2>/dev/null
done
"$PY" -m difflm.gpucheck "$out" | tee "$out/summary.md"
