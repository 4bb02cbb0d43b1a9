#!/usr/bin/env bash
# device pipeline, second machine: convert (same calibration) + stage 2 with the carried stage-1 indexer + accuracy after
set -uo pipefail
O=/tmp/s2; mkdir -p $O/run; R=$(pwd)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
t0=$(date +%s); stamp() { echo "[pipeline] $1 at $(( $(date +%s) - t0 ))s" | tee -a $O/stamps.log; }
stamp start
python -m convert --model smollm2 --out $O/conv --calib-len 8192 --calib-docs 4 --dtype bfloat16 > $O/convert.log 2>&1 || { stamp "convert FAILED"; touch $O/DONE; exit 1; }
python - $O/conv/rtpurbo.json .s/ix/roles_ref.json <<'PY' || { stamp "roles differ"; touch $O/DONE; exit 1; }
import json, sys
a, b = (json.load(open(f))["sparse_config"]["roles"] for f in sys.argv[1:]); sys.exit(a != b)
PY
stamp "converted, roles equal to run 1"
python -m train.distill --stage 2 --model $O/conv --indexer $R/.s/ix/indexer --run-dir $O/run/stage2 --seq-len 8192 \
  --steps ${STEPS:-250} --lr 3e-6 --warmup ${WARMUP:-50} --data tasks --events 0 --positions answer --log-every 10 \
  --ckpt-every 1000 --eval-batches 6 > $O/run/stage2.log 2>&1 || { stamp "stage2 FAILED"; touch $O/DONE; exit 1; }
stamp "stage 2 trained"
python -m benchmarks.accuracy --converted $O/run/stage2/model --indexer $R/.s/ix/indexer --lengths 4096 8000 --prompts 20 \
  --modes full rtpurbo --tasks niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery \
  --out $O/run/acc_stage2 > $O/run/acc_stage2.log 2>&1
stamp "accuracy after rc=$?"
touch $O/DONE
