#!/usr/bin/env bash
# Device pipeline (session 22, one H100, runs detached; started by benchmarks/device/start.sh after the Qwen GGUF came
# over in nine carried parts): issue 16's next run — stage 2 on 16K windows of --data tasks+kjv (task prompts trained on
# their answer rows, prose on every row, alternating micro-step by micro-step), otherwise session 21's recipe
# (global batch 8 = --accumulate 8, 40 steps, lr 3e-6, 10 warm-up steps). Qwen2.5-Coder-0.5B-Instruct convert +
# calibrate (4 x 8K, bf16) -> stage 1 (shipped recipe) -> stage 2 alone on the GPU -> the suite "after" (full, rtpurbo
# at 16000 and 32000, same prompts) -> --compare against the "before" suites of session 21's run (the same conversion
# and stage 1, which reproduced exactly in three runs: stage2_qwen25coder05b_16k_h100/provenance.json) -> then, with
# the GPU to itself, issue 17's whole-model benchmark on the H100 (4 layers, 32K and 128K) into run/e2e_h100.
source benchmarks/device/common.sh /tmp/s2m
stamp start
convert_model /tmp/qwen.gguf
stage1_shipped
TASKS=(--tasks niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery)
PREV=benchmarks/results/stage2_qwen25coder05b_16k_h100
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python -m train.distill --stage 2 --model $O/conv --indexer $O/run/stage1/indexer \
  --run-dir $O/run/stage2 --seq-len 16384 --steps 40 --accumulate 8 --lr 3e-6 --warmup 10 --data tasks+kjv --events 0 \
  --positions answer --log-every 5 --ckpt-every 1000 --eval-batches 4 > $O/run/stage2.log 2>&1 \
  || { stamp "stage2 FAILED"; touch $O/DONE; exit 1; }
stamp "stage 2 trained"
for L in 16000 32000; do
  mkdir -p $O/run/L$L && XLA_PYTHON_CLIENT_MEM_FRACTION=$([ $L = 16000 ] && echo 0.3 || echo 0.45) \
    python -m benchmarks.accuracy --converted $O/run/stage2/model --indexer $O/run/stage1/indexer --lengths $L \
    --prompts 20 "${TASKS[@]}" --modes full rtpurbo --out $O/run/L$L/acc_stage2 > $O/run/L$L/acc_stage2.log 2>&1 &
done
wait; stamp "accuracy after done"
for L in 16000 32000; do
  cp $PREV/L$L/acc_stage1.json $O/run/L$L/acc_stage1.json
  mkdir -p $O/run/L$L/stage2 && cp $O/run/stage2/summary.json $O/run/L$L/stage2/ 2>/dev/null
  python -m benchmarks.stage2_summary $O/run/L$L > $O/run/L$L/summary.log 2>&1
  python -m benchmarks.accuracy --compare $O/run/L$L/acc_stage1.json $O/run/L$L/acc_stage2.json > $O/run/compare_$L.log 2>&1
done
stamp "stage 2 part done"
touch $O/STAGE2_DONE
python -m benchmarks.e2e --contexts 32768 131072 --layers 4 --out $O/run/e2e_h100 > $O/run/e2e.log 2>&1
stamp "e2e done rc=$?"
touch $O/DONE
