#!/usr/bin/env bash
# Device pipeline (session 22, one GPU, runs detached; started by benchmarks/device/start.sh after the Qwen GGUF came
# over in nine carried parts): issue 16's next run — stage 2 on 16K windows of --data tasks+kjv (task prompts trained on
# their answer rows, prose on every row, alternating micro-step by micro-step), otherwise session 21's recipe
# (global batch 8 = --accumulate 8, 40 steps, lr 3e-6, 10 warm-up steps). Qwen2.5-Coder-0.5B-Instruct convert +
# calibrate (4 x 8K, bf16) -> stage 1 (shipped recipe) -> stage 2 -> the suite "after" (full, rtpurbo
# at 16000 and 32000, same prompts; the suite "before" runs beside stage 2 as in session 21, on this device) ->
# --compare per length -> then, with the GPU to itself, issue 17's whole-model benchmark (4 layers, 32K and 128K)
# into run/e2e. Ran verbatim at commit 3310950 (then in folder stage2_qwen25coder05b_16k_mix_h100); its stage 2
# with the suites since rewritten onto common.sh's stage2_before_after (the same commands).
source benchmarks/device/common.sh /tmp/s2m
stamp start
convert_model /tmp/qwen.gguf
stage1_shipped
stage2_before_after 16384 tasks+kjv
stamp "stage 2 part done"
touch $O/STAGE2_DONE
python -m benchmarks.e2e --contexts 32768 131072 --layers 4 --out $O/run/e2e > $O/run/e2e.log 2>&1
stamp "e2e done rc=$?"
touch $O/DONE
