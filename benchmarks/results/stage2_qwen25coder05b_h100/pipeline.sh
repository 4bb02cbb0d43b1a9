#!/usr/bin/env bash
# Device pipeline (session 20, one H100, runs detached; started by benchmarks/device/start.sh after the Qwen GGUF
# came over in nine carried parts): Qwen2.5-Coder-0.5B-Instruct convert + calibrate (4 x 8K, bf16: the committed
# accuracy_qwen25coder05b_h100 setup) -> stage 1 (shipped recipe, 100 steps at 8K) -> the suite "before" (full,
# dense_retrieval, rtpurbo at 8000 and 16000, one process per length) beside stage 2 (250 steps x 2 accumulated
# 8K windows of --data tasks, loss on the answer rows, lr 3e-6, 50 warm-up steps) -> the suite "after" on the
# stage-2 model (same prompts), then benchmarks.stage2_summary per length.
# Ran verbatim at commit b097814; its conversion and stage 1 since rewritten onto common.sh's convert_model
# and stage1_shipped (same commands).
source benchmarks/device/common.sh /tmp/s2q
stamp start
convert_model /tmp/qwen.gguf
stage1_shipped
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
TASKS=(--tasks niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery)
acc() {  # acc CONVERTED NAME LENGTH: the suite into $O/run/L<LENGTH>/NAME.{json,png,log}, in the background
  mkdir -p $O/run/L$3
  python -m benchmarks.accuracy --converted $1 --indexer $O/run/stage1/indexer --lengths $3 --prompts 20 "${TASKS[@]}" \
    --modes full dense_retrieval rtpurbo --out $O/run/L$3/$2 > $O/run/L$3/$2.log 2>&1 &
}
acc $O/conv acc_stage1 8000; b8=$!
acc $O/conv acc_stage1 16000; b16=$!
python -m train.distill --stage 2 --model $O/conv --indexer $O/run/stage1/indexer --run-dir $O/run/stage2 --seq-len 8192 \
  --steps 250 --accumulate 2 --lr 3e-6 --warmup 50 --data tasks --events 0 --positions answer --log-every 10 \
  --ckpt-every 1000 --eval-batches 6 > $O/run/stage2.log 2>&1 || { stamp "stage2 FAILED"; wait; touch $O/DONE; exit 1; }
stamp "stage 2 trained"
acc $O/run/stage2/model acc_stage2 8000; a8=$!
acc $O/run/stage2/model acc_stage2 16000; a16=$!
wait $b8; wait $b16; stamp "accuracy before done"
wait $a8; wait $a16; stamp "accuracy after done"
for L in 8000 16000; do
  mkdir -p $O/run/L$L/stage2 && cp $O/run/stage2/summary.json $O/run/L$L/stage2/ 2>/dev/null
  python -m benchmarks.stage2_summary $O/run/L$L > $O/run/L$L/summary.log 2>&1
done
python -m benchmarks.accuracy --compare $O/run/L8000/acc_stage1.json $O/run/L8000/acc_stage2.json > $O/run/compare_8000.log 2>&1
python -m benchmarks.accuracy --compare $O/run/L16000/acc_stage1.json $O/run/L16000/acc_stage2.json > $O/run/compare_16000.log 2>&1
stamp done
touch $O/DONE
