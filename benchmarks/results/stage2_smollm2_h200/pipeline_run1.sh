#!/usr/bin/env bash
# device pipeline (session 15): SmolLM2 convert + stage 1 + stage 2 (+ accuracy before/after). Runs detached.
set -uo pipefail
O=/tmp/s2; mkdir -p $O
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
t0=$(date +%s); stamp() { echo "[pipeline] $1 at $(( $(date +%s) - t0 ))s" | tee -a $O/stamps.log; }
python -c "import jax; print(jax.__version__, jax.devices())" > $O/env.log 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >> $O/env.log 2>&1
stamp start
python -m convert --model smollm2 --out $O/conv --calib-len 8192 --calib-docs 4 --dtype bfloat16 > $O/convert.log 2>&1 || { stamp "convert FAILED"; touch $O/DONE; exit 1; }
stamp converted
python -m train.distill --model $O/conv --run-dir $O/stage1 --seq-len 8192 --steps 150 --lr 3e-3 --eval-passkey 0 \
  --log-every 10 --ckpt-every 50 > $O/stage1.log 2>&1 || { stamp "stage1 FAILED"; touch $O/DONE; exit 1; }
stamp "stage 1 done"
SEQ=8192 STEPS=${STEPS:-600} WARMUP=${WARMUP:-200} DATA=tasks EVENTS=0 POSITIONS=answer LENGTHS="4096 8000" PROMPTS=20 \
  TASKS="niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery" \
  MODES="full dense_retrieval rtpurbo" EVAL_BATCHES=10 bash benchmarks/run_stage2.sh $O/run $O/conv $O/stage1/indexer \
  > $O/run_stage2.log 2>&1
stamp "run_stage2 rc=$?"
touch $O/DONE
