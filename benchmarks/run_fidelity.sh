#!/usr/bin/env bash
# The fidelity run (issue 13) on one GPU, as committed in benchmarks/results/fidelity_smollm2_h100/:
# convert + calibrate SmolLM2 at 8K (bf16), stage 1 with three recipes, the needle diagnosis, the accuracy suite.
#   bash benchmarks/run_fidelity.sh OUTDIR
# Recipes (all 8K windows, lr 3e-3, STEPS steps):
#   default — today's defaults: retrieval events in the windows, block-level KL weighted by far mass, local prior;
#   noprior — the same without the local prior (--local-prior none);
#   prose   — the earlier recipe: KJV prose only, token-level KL, uniform rows, no prior.
# Environment: STEPS (150), LENGTHS ("8000 2048 4096"), MODES (all), REUSE ("NAME=DIR ..." indexers trained
# earlier, used instead of training that recipe), REUSE_ROLES (the rtpurbo.json they were trained with: if its
# roles differ from this conversion's, every recipe is trained).
set -uo pipefail
OUT=${1:?usage: run_fidelity.sh OUTDIR}
STEPS=${STEPS:-150}
LENGTHS=${LENGTHS:-8000 2048 4096}
REUSE=${REUSE:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[run_fidelity] $1 at $(( $(date +%s) - t0 ))s"; }

python -m convert --model smollm2 --out "$OUT/converted" --calib-len 8192 --calib-docs 4 --dtype bfloat16 || exit 1
stamp converted
declare -A IX
if [ -n "$REUSE" ] && [ -n "${REUSE_ROLES:-}" ] && ! python - "$OUT/converted/rtpurbo.json" "$REUSE_ROLES" <<'PY'
import json, sys
a, b = (json.load(open(f))["sparse_config"]["roles"] for f in sys.argv[1:])
print("[run_fidelity] roles of the reused indexers", "match" if a == b else "differ: training every recipe")
sys.exit(a != b)
PY
then REUSE=""; fi
for spec in $REUSE; do IX[${spec%%=*}]=${spec#*=}; done
for recipe in default noprior prose; do
  [ -n "${IX[$recipe]:-}" ] && continue
  case $recipe in
    default) extra=() ;;
    noprior) extra=(--local-prior none) ;;
    prose) extra=(--events 0 --loss-level token --loss-weight uniform --local-prior none) ;;
  esac
  python -m train.distill --model "$OUT/converted" --run-dir "$OUT/$recipe" --seq-len 8192 --steps "$STEPS" \
    --lr 3e-3 --eval-passkey 0 --log-every 10 --ckpt-every 50 "${extra[@]}" > "$OUT/$recipe.log" 2>&1 || exit 1
  grep "\[distill\]" "$OUT/$recipe.log"
  IX[$recipe]=$OUT/$recipe/indexer
  stamp "trained $recipe"
done
args=(--indexer "${IX[default]}")
diag=(--indexer "default=${IX[default]}")
for r in noprior prose; do args+=(--indexer "$r=${IX[$r]}"); diag+=(--indexer "$r=${IX[$r]}"); done
python -m train.diagnose --converted "$OUT/converted" "${diag[@]}" --length 8000 --prompts 8 \
  --out "$OUT/diagnose.json" 2>&1 | grep "\[diagnose\]"
stamp diagnosed
modes=()
[ -n "${MODES:-}" ] && modes=(--modes $MODES)
# shellcheck disable=SC2086
python -m benchmarks.accuracy --converted "$OUT/converted" "${args[@]}" --lengths $LENGTHS --prompts 20 \
  --windows 512 1024 4096 "${modes[@]}" --out "$OUT/accuracy" > "$OUT/accuracy.log" 2>&1
stamp "accuracy done"
