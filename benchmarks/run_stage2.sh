#!/usr/bin/env bash
# Stage 2 on one GPU, as committed in benchmarks/results/stage2_smollm2_h100/: sparse-mode self-distillation of
# a converted model against its dense self with a frozen stage-1 indexer, then the accuracy suite on the same
# prompts for the model before (rows "full", "dense_retrieval", "rtpurbo") and after stage 2 (the same modes
# with "_stage2"), merged into one accuracy JSON. The "before" suite runs beside the training (both processes
# share the GPU: XLA_PYTHON_CLIENT_MEM_FRACTION splits its memory).
#   bash benchmarks/run_stage2.sh OUTDIR CONVERTED INDEXER
# Environment: SEQ (4096), STEPS (300), LR (3e-6), WARMUP (50), ACCUMULATE (0: the paper's global batch 8), DATA (kjv),
# EVENTS (0), POSITIONS (answer),
# LENGTHS ("4096"), PROMPTS (20), TASKS ("niah_single_noise niah_single_prose niah_multikey"),
# MODES ("full dense_retrieval rtpurbo").
set -uo pipefail
OUT=${1:?usage: run_stage2.sh OUTDIR CONVERTED INDEXER}
CONV=${2:?converted checkpoint}
IX=${3:?stage-1 indexer dir}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.45}
t0=$(date +%s)
stamp() { echo "[run_stage2] $1 at $(( $(date +%s) - t0 ))s"; }
mkdir -p "$OUT"
common=(--indexer "$IX" --lengths ${LENGTHS:-4096} --prompts "${PROMPTS:-20}" --modes ${MODES:-full dense_retrieval rtpurbo}
        --tasks ${TASKS:-niah_single_noise niah_single_prose niah_multikey})
python -m benchmarks.accuracy --converted "$CONV" "${common[@]}" --out "$OUT/acc_stage1" > "$OUT/acc_stage1.log" 2>&1 &
before=$!
python -m train.distill --stage 2 --model "$CONV" --indexer "$IX" --run-dir "$OUT/stage2" --seq-len "${SEQ:-4096}" \
  --steps "${STEPS:-300}" --lr "${LR:-3e-6}" --warmup "${WARMUP:-50}" --accumulate "${ACCUMULATE:-0}" --data "${DATA:-kjv}" --events "${EVENTS:-0}" \
  --positions "${POSITIONS:-answer}" --log-every 10 --ckpt-every 50 --eval-batches "${EVAL_BATCHES:-5}" \
  > "$OUT/stage2.log" 2>&1 || { tail -30 "$OUT/stage2.log"; exit 1; }
grep "\[stage2\]" "$OUT/stage2.log"
stamp "stage 2 trained"
python -m benchmarks.accuracy --converted "$OUT/stage2/model" "${common[@]}" --out "$OUT/acc_stage2" \
  > "$OUT/acc_stage2.log" 2>&1
stamp "accuracy after stage 2"
wait $before || { tail -30 "$OUT/acc_stage1.log"; exit 1; }
stamp "accuracy before stage 2"
python -m benchmarks.stage2_summary "$OUT"
stamp done
