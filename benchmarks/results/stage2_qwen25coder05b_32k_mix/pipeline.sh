#!/usr/bin/env bash
# Device pipeline (issues 16 and 17; session 23): stage 2 of Qwen2.5-Coder-0.5B-Instruct on 32K windows of
# --data tasks+kjv — the window that holds the remaining gap (rtpurbo vs full at 32K: -5.75 points after stage 2 on
# 16K windows, benchmarks/results/stage2_qwen25coder05b_16k_mix/) — and, in the same "before" suites, an indexer
# trained with --share-index-keys (one key map per KV group) beside the per-head one.
# The same conversion and 8K stage-1 recipe as the 16K runs (the two stage-1 runs side by side, same steps and seed;
# only --share-index-keys differs), so only the training window differs for stage 2; global batch 8, 40 steps as at
# 16K (twice the tokens). Suites before (modes full, rtpurbo, rtpurbo@shared) / after (full, rtpurbo) at 16000 and
# 32000. Time on an H100 (16K runs: convert 100 s, stage 1 115 s, stage 2 410 s, suites 220 s): about 20 minutes.
# Run: the nine carried Qwen parts, then
#   bash benchmarks/device/start.sh benchmarks/device/qwen_stage2_32k.sh ; N=110 bash benchmarks/device/poll.sh /tmp/s2x
source benchmarks/device/common.sh /tmp/s2x
stamp start
convert_model /tmp/qwen.gguf
S1=(--model $O/conv --seq-len 8192 --steps 100 --lr 3e-3 --eval-passkey 0 --log-every 10 --ckpt-every 1000)
XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 stage1 shared --share-index-keys & shared=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 stage1_shipped
wait $shared
BEFORE=(--modes full rtpurbo)
[ -d $O/run/shared/indexer ] && BEFORE=(--indexer shared=$O/run/shared/indexer --modes full rtpurbo rtpurbo@shared)
stage2_before_after 32768 tasks+kjv "${BEFORE[@]}"
stamp done
touch $O/DONE
