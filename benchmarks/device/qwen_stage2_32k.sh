#!/usr/bin/env bash
# Device pipeline, ready for the next GPU session (issue 16; not yet run): stage 2 of Qwen2.5-Coder-0.5B-Instruct on
# 32K windows of --data tasks+kjv — the window that holds the remaining gap (rtpurbo vs full at 32K: -5.75 points
# after stage 2 on 16K windows, benchmarks/results/stage2_qwen25coder05b_16k_mix/). The same conversion and 8K stage-1
# indexer as the 16K runs, so only the training window differs; suites before / after at 16000 and 32000.
# Time on an H100 (16K runs: convert 100 s, stage 1 115 s, stage 2 410 s, suites 220 s): about 17 minutes with stage 2
# twice as long per step. Run: the nine carried Qwen parts, then
#   bash benchmarks/device/start.sh benchmarks/device/qwen_stage2_32k.sh ; N=110 bash benchmarks/device/poll.sh /tmp/s2x
source benchmarks/device/common.sh /tmp/s2x
stamp start
convert_model /tmp/qwen.gguf
stage1_shipped
stage2_before_after 32768 tasks+kjv
stamp done
touch $O/DONE
