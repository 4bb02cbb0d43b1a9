#!/usr/bin/env bash
# One model end to end on one GPU, with the shipped defaults: convert + calibrate, stage 1 (today's default recipe),
# then the accuracy suite (full / dense_retrieval / rtpurbo / oracle_topp). As committed in
# benchmarks/results/accuracy_qwen25coder05b_h100/ for Qwen2.5-Coder-0.5B-Instruct (a GGUF: see
# ../shared/docs/models.md — installed on request, hash-checked, never a default dependency).
#   bash benchmarks/run_model.sh MODEL OUTDIR        # MODEL: a .gguf, an HF directory, or smollm2
# Environment: CALIB_LEN (8192), CALIB_DOCS (4), SEQ (8192, stage 1 windows), STEPS (100), LR (3e-3),
# LENGTHS ("8000 16000 32000"), PROMPTS (20), MODES ("full dense_retrieval rtpurbo oracle_topp"),
# TASKS (the five NIAH tasks), DTYPE (bfloat16), CKPT_EVERY (20 stage-1 steps).
set -uo pipefail
MODEL=${1:?usage: run_model.sh MODEL OUTDIR}
OUT=${2:?usage: run_model.sh MODEL OUTDIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[run_model] $1 at $(( $(date +%s) - t0 ))s"; }
# Run again with the same OUTDIR to go on after an interruption: a finished conversion and stage 1 are kept,
# stage 1 resumes from its checkpoints, the suite keeps the cells it saved (--resume).
if [ -f "$OUT/converted/rtpurbo.json" ]; then
  echo "[run_model] keeping $OUT/converted"
else
  python -m convert --model "$MODEL" --out "$OUT/converted" --calib-len "${CALIB_LEN:-8192}" \
    --calib-docs "${CALIB_DOCS:-4}" --dtype "${DTYPE:-bfloat16}" > "$OUT/convert.log" 2>&1 || { tail -20 "$OUT/convert.log"; exit 1; }
  grep "\[convert\]\|\[calibrate\]" "$OUT/convert.log" | tail -5
fi
stamp converted
if [ -d "$OUT/stage1/indexer" ]; then
  echo "[run_model] keeping $OUT/stage1/indexer"
else
  resume=(); [ -d "$OUT/stage1" ] && resume=(--resume)
  python -m train.distill --model "$OUT/converted" --run-dir "$OUT/stage1" --seq-len "${SEQ:-8192}" \
    --steps "${STEPS:-100}" --lr "${LR:-3e-3}" --eval-passkey 0 --log-every 10 --ckpt-every "${CKPT_EVERY:-20}" \
    "${resume[@]}" >> "$OUT/stage1.log" 2>&1 || { tail -30 "$OUT/stage1.log"; exit 1; }
  grep "\[distill\]" "$OUT/stage1.log"
fi
stamp "stage 1 trained"
python -m benchmarks.accuracy --converted "$OUT/converted" --indexer "$OUT/stage1/indexer" --resume \
  --lengths ${LENGTHS:-8000 16000 32000} --prompts "${PROMPTS:-20}" \
  --modes ${MODES:-full dense_retrieval rtpurbo oracle_topp} \
  --tasks ${TASKS:-niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery} \
  --out "$OUT/accuracy" > "$OUT/accuracy.log" 2>&1 || { tail -30 "$OUT/accuracy.log"; exit 1; }
grep "\[accuracy\]" "$OUT/accuracy.log"
stamp done
