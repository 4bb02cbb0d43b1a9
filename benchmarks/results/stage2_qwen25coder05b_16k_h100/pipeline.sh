#!/usr/bin/env bash
# Device pipeline (session 21, one H100, runs detached; started by benchmarks/device/start.sh after the Qwen GGUF came
# over in nine carried parts): issue 16's open run — stage 2 on windows longer than the local heads' window.
# Qwen2.5-Coder-0.5B-Instruct convert + calibrate (4 x 8K, bf16) -> stage 1 (shipped recipe, 100 steps at 8K: the
# session-20 setup) -> the suite "before" (full, rtpurbo at 16000 and 32000, one process per length) beside stage 2
# (16K windows of --data tasks: a needle past 8192 + 4 sinks is out of the local heads' reach, so sparse mode differs
# from dense there; global batch 8 = --accumulate 8, 40 steps, lr 3e-6, 10 warm-up steps, loss on the answer rows)
# -> the suite "after" on the stage-2 model (same prompts), --compare per length, benchmarks.stage2_summary.
# Ran verbatim at commit ea19b28; its stage 1 since rewritten onto common.sh's stage1_shipped (same command).
source benchmarks/device/common.sh /tmp/s2l
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
  --run-dir $O/run/stage2 --seq-len 16384 --steps 40 --accumulate 8 --lr 3e-6 --warmup 10 --data tasks --events 0 \
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
stamp done
touch $O/DONE
