#!/usr/bin/env bash
# Device pipeline (session 22, one GPU, runs detached; started by benchmarks/device/start.sh after the Qwen GGUF came
# over in nine carried parts): issue 16's next run — stage 2 on 16K windows of --data tasks+kjv (task prompts trained on
# their answer rows, prose on every row, alternating micro-step by micro-step), otherwise session 21's recipe
# (global batch 8 = --accumulate 8, 40 steps, lr 3e-6, 10 warm-up steps). Qwen2.5-Coder-0.5B-Instruct convert +
# calibrate (4 x 8K, bf16) -> stage 1 (shipped recipe) -> stage 2 -> the suite "after" (full, rtpurbo
# at 16000 and 32000, same prompts; the suite "before" runs beside stage 2 as in session 21, on this device) ->
# --compare per length -> then, with the GPU to itself, issue 17's whole-model benchmark (4 layers, 32K and 128K)
# into run/e2e.
source benchmarks/device/common.sh /tmp/s2m
stamp start
convert_model /tmp/qwen.gguf
stage1_shipped
TASKS=(--tasks niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery)
acc() {  # acc CONVERTED NAME LENGTH MEM: the suite into $O/run/L<LENGTH>/NAME.{json,png,log}, in the background
  mkdir -p $O/run/L$3
  XLA_PYTHON_CLIENT_MEM_FRACTION=$4 python -m benchmarks.accuracy --converted $1 --indexer $O/run/stage1/indexer \
    --lengths $3 --prompts 20 "${TASKS[@]}" --modes full rtpurbo --out $O/run/L$3/$2 > $O/run/L$3/$2.log 2>&1 &
}
acc $O/conv acc_stage1 16000 0.18; b16=$!
acc $O/conv acc_stage1 32000 0.22; b32=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 python -m train.distill --stage 2 --model $O/conv --indexer $O/run/stage1/indexer \
  --run-dir $O/run/stage2 --seq-len 16384 --steps 40 --accumulate 8 --lr 3e-6 --warmup 10 --data tasks+kjv --events 0 \
  --positions answer --log-every 5 --ckpt-every 1000 --eval-batches 4 > $O/run/stage2.log 2>&1 \
  || { stamp "stage2 FAILED"; wait; touch $O/DONE; exit 1; }
stamp "stage 2 trained"
wait $b16; wait $b32; stamp "accuracy before done"
acc $O/run/stage2/model acc_stage2 16000 0.3; a16=$!
acc $O/run/stage2/model acc_stage2 32000 0.4; a32=$!
wait $a16; wait $a32; stamp "accuracy after done"
for L in 16000 32000; do
  mkdir -p $O/run/L$L/stage2 && cp $O/run/stage2/summary.json $O/run/L$L/stage2/ 2>/dev/null
  python -m benchmarks.stage2_summary $O/run/L$L > $O/run/L$L/summary.log 2>&1
  python -m benchmarks.accuracy --compare $O/run/L$L/acc_stage1.json $O/run/L$L/acc_stage2.json > $O/run/compare_$L.log 2>&1
done
stamp "stage 2 part done"
touch $O/STAGE2_DONE
python -m benchmarks.e2e --contexts 32768 131072 --layers 4 --out $O/run/e2e > $O/run/e2e.log 2>&1
stamp "e2e done rc=$?"
touch $O/DONE
