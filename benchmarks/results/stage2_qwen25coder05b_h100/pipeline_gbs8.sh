#!/usr/bin/env bash
# Device pipeline 2 (session 20, one H100, after pipeline.sh on a fresh machine): the same conversion and stage 1,
# then stage 2 at the paper's global batch 8 (--accumulate 8; pipeline.sh used 2) for 80 steps (640 windows of 8K,
# --data tasks, answer rows, lr 3e-6, 20 warm-up steps), then the suite on the stage-2 model (full, rtpurbo at
# 8000 and 16000, one process per length). The "before" rows are pipeline.sh's (same conversion and stage-1
# configuration; not re-run, for device time).
# Ran verbatim at commit 89a125b; its conversion and stage 1 since rewritten onto common.sh's convert_model
# and stage1_shipped (same commands).
source benchmarks/device/common.sh /tmp/s2g
stamp start
convert_model /tmp/qwen.gguf
stage1_shipped
python -m train.distill --stage 2 --model $O/conv --indexer $O/run/stage1/indexer --run-dir $O/run/stage2 --seq-len 8192 \
  --steps 80 --accumulate 8 --lr 3e-6 --warmup 20 --data tasks --events 0 --positions answer --log-every 5 \
  --ckpt-every 1000 --eval-batches 6 > $O/run/stage2.log 2>&1 || { stamp "stage2 FAILED"; touch $O/DONE; exit 1; }
stamp "stage 2 trained"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
for L in 8000 16000; do
  mkdir -p $O/run/L$L
  python -m benchmarks.accuracy --converted $O/run/stage2/model --indexer $O/run/stage1/indexer --lengths $L --prompts 20 \
    --tasks niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery --modes full rtpurbo \
    --out $O/run/L$L/acc_stage2 > $O/run/L$L/acc_stage2.log 2>&1 &
done
wait; stamp "accuracy after done"
touch $O/DONE
