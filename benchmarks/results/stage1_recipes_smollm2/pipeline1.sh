#!/usr/bin/env bash
# Device pipeline (session 18): does stage 1 on several window lengths, or on the suite's task generators (train
# split), close the indexer's gap at 1K and 4K? SmolLM2 converted as before (bf16, calibration 4 x 8K), then four
# stage-1 runs of 150 steps at lr 3e-3 (two at a time on the GPU): base (the shipped recipe: prose + retrieval
# events, 8K windows), mix (the same, windows of 1K/2K/4K/8K in turn), tasks (--data tasks, 8K), tasks_mix; each
# reports held-out needle-block hit at 1K/4K/8K. Then the accuracy suite (5 NIAH tasks x 20 prompts) with full
# attention, dense retrieval heads and the four indexers, one process per length (1024, 4096, 8000) side by side.
# Ran verbatim at commit de97ac0 (as stage1_length_mix_smollm2/pipeline.sh); since rewritten onto benchmarks/device/common.sh's helpers (same commands).
source benchmarks/device/common.sh /tmp/s1
stamp start
convert_smollm2
S1=(--model $O/conv --seq-len 8192 --steps 150 --lr 3e-3 --eval-passkey 0 --log-every 10 --ckpt-every 1000
    --eval-lengths 1024,4096,8192)
MIX=(--length-mix 1024,2048,4096,8192)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
stage1 base & stage1 mix "${MIX[@]}" & wait
stage1 tasks --data tasks & stage1 tasks_mix --data tasks "${MIX[@]}" & wait
MODES=(full dense_retrieval); indexers base mix tasks tasks_mix
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
for L in 1024 4096 8000; do suite $L "${IX[@]}" --modes "${MODES[@]}"; done
wait; stamp "accuracy done"
touch $O/DONE
