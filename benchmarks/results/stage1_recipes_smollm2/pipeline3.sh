#!/usr/bin/env bash
# Device pipeline 3 (session 18): pipeline 2's machine was released (idle) while its suite ran, so only its stage-1
# logs and full attention's rows came back. With the device time left: the run-to-run spread of stage 1 — the
# 'tasks' recipe and the shipped one (prose + events) again with --seed 1 (other windows, events and PCA window) —
# through the suite at 4096 and 8000 (5 NIAH tasks x 20 prompts, the same prompts as pipelines 1 and 2).
# Ran verbatim at commit 887deb6; since rewritten onto benchmarks/device/common.sh's helpers (same commands).
source benchmarks/device/common.sh /tmp/s3
stamp start
convert_smollm2
S1=(--model $O/conv --seq-len 8192 --steps 150 --lr 3e-3 --eval-passkey 0 --log-every 10 --ckpt-every 1000 --seed 1
    --eval-lengths 1024,4096,8192)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
stage1 tasks_seed1 --data tasks & stage1 base_seed1 & wait
MODES=(); indexers tasks_seed1 base_seed1
for L in 4096 8000; do suite $L "${IX[@]}" --modes "${MODES[@]}"; done
wait; stamp "accuracy done"
touch $O/DONE
