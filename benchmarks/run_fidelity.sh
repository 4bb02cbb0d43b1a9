#!/usr/bin/env bash
# The fidelity run (issue 13) on one GPU, as committed in benchmarks/results/fidelity_smollm2_<device>/:
# convert + calibrate SmolLM2 at 8K (bf16), stage 1 with two recipes, the needle diagnosis, the accuracy suite.
#   bash benchmarks/run_fidelity.sh OUTDIR [STEPS]
# Recipes: "fixed" = today's defaults (retrieval events in the training windows, block-level KL weighted by
# far mass); "prose" = the earlier recipe (KJV prose only, token-level KL, uniform rows). Both lr 3e-3, 8K.
set -uo pipefail
OUT=${1:?usage: run_fidelity.sh OUTDIR [STEPS]}
STEPS=${2:-150}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[run_fidelity] $1 at $(( $(date +%s) - t0 ))s"; }

python -m convert --model smollm2 --out "$OUT/converted" --calib-len 8192 --calib-docs 4 --dtype bfloat16 \
  || exit 1
stamp converted
for recipe in fixed prose; do
  if [ "$recipe" = fixed ]; then extra=(); else extra=(--events 0 --loss-level token --loss-weight uniform); fi
  python -m train.distill --model "$OUT/converted" --run-dir "$OUT/$recipe" --seq-len 8192 --steps "$STEPS" \
    --lr 3e-3 --eval-passkey 0 --log-every 10 --ckpt-every 50 "${extra[@]}" 2>&1 | grep -v "it/s\]" \
    | tee "$OUT/$recipe.log" || exit 1
  stamp "trained $recipe"
done
python -m train.diagnose --converted "$OUT/converted" --indexer "fixed=$OUT/fixed/indexer" \
  --indexer "prose=$OUT/prose/indexer" --length 8000 --prompts 8 --out "$OUT/diagnose.json" | tee "$OUT/diagnose.log"
stamp diagnosed
python -m benchmarks.accuracy --converted "$OUT/converted" --indexer "$OUT/fixed/indexer" \
  --indexer "prose=$OUT/prose/indexer" --lengths 8000 4096 2048 --prompts 20 --windows 512 1024 \
  --out "$OUT/accuracy" 2>&1 | tee "$OUT/accuracy.log"
stamp "accuracy done"
