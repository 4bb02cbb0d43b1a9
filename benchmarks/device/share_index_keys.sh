#!/usr/bin/env bash
# Device pipeline, ready for the next GPU session (issue 17, smaller index keys; not yet run): does one key map per KV
# group keep the accuracy of one per head? Qwen2.5-Coder-0.5B-Instruct (14 query heads per 2 KV heads, so retrieval
# heads share KV heads often) converted and calibrated as in the committed runs, stage 1 with the shipped recipe twice
# — per head, and --share-index-keys — then the accuracy suite (5 NIAH tasks x 20 prompts) at 16000 and 32000 with
# modes full, rtpurbo (per head) and rtpurbo@shared on the same prompts. CPU evidence so far:
# benchmarks/results/share_index_keys_smollm2_cpu/. About 10 minutes on an H100. Run: the nine carried Qwen parts, then
#   bash benchmarks/device/start.sh benchmarks/device/share_index_keys.sh ; N=110 bash benchmarks/device/poll.sh /tmp/sik
source benchmarks/device/common.sh /tmp/sik
stamp start
convert_model /tmp/qwen.gguf
S1=(--model $O/conv --seq-len 8192 --steps 100 --lr 3e-3 --eval-passkey 0 --log-every 10 --ckpt-every 1000)
stage1 own
stage1 shared --share-index-keys
MODES=(full); indexers full own shared
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # two suites side by side
for L in 16000 32000; do suite $L --modes "${MODES[@]}" "${IX[@]}"; done
wait; stamp "suites done"
touch $O/DONE
