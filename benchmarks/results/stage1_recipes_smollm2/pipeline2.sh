#!/usr/bin/env bash
# Device pipeline 2 (session 18, after pipeline1.sh): how much of the 'tasks' indexer's gain is run-to-run noise,
# and does the indexer's width or training length limit its selection? Stage 1 on --data tasks at 8K, 150 steps at
# lr 3e-3 as in pipeline 1: tasks (seed 0, pipeline 1's run again), tasks_seed1, tasks_d32 / tasks_d64
# (--index-dim 32 / 64; 64 = head_dim: the map can equal the pre-RoPE q.k itself), tasks_400 (400 steps). Then the
# suite at 4096 and 8000 (full attention and the five indexers, 5 NIAH tasks x 20 prompts), one process per length.
# Ran verbatim at commit 2f13eb7; since rewritten onto benchmarks/device/common.sh's helpers (same commands).
source benchmarks/device/common.sh /tmp/s2
stamp start
convert_smollm2
S1=(--model $O/conv --seq-len 8192 --lr 3e-3 --eval-passkey 0 --log-every 10 --ckpt-every 1000 --data tasks
    --eval-lengths 1024,4096,8192)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
stage1 tasks --steps 150 & stage1 tasks_seed1 --steps 150 --seed 1 & stage1 tasks_400 --steps 400 & wait
stage1 tasks_d32 --steps 150 --index-dim 32 & stage1 tasks_d64 --steps 150 --index-dim 64 & wait
MODES=(full); indexers tasks tasks_seed1 tasks_d32 tasks_d64 tasks_400
for L in 4096 8000; do suite $L "${IX[@]}" --modes "${MODES[@]}"; done
wait; stamp "accuracy done"
touch $O/DONE
