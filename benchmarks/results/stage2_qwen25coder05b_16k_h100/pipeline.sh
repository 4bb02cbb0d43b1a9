#!/usr/bin/env bash
# Device pipeline (session 21, one H100, runs detached; started by benchmarks/device/start.sh after the Qwen GGUF came
# over in nine carried parts): issue 16's open run — stage 2 on windows longer than the local heads' window.
# Qwen2.5-Coder-0.5B-Instruct convert + calibrate (4 x 8K, bf16) -> stage 1 (shipped recipe, 100 steps at 8K: the
# session-20 setup) -> the suite "before" (full, rtpurbo at 16000 and 32000, one process per length) beside stage 2
# (16K windows of --data tasks: a needle past 8192 + 4 sinks is out of the local heads' reach, so sparse mode differs
# from dense there; global batch 8 = --accumulate 8, 40 steps, lr 3e-6, 10 warm-up steps, loss on the answer rows)
# -> the suite "after" on the stage-2 model (same prompts), --compare per length, benchmarks.stage2_summary.
# Ran verbatim at commit ea19b28; its stage 1 and stage 2 with the suites since rewritten onto common.sh's
# stage1_shipped and stage2_before_after (the same commands).
source benchmarks/device/common.sh /tmp/s2l
stamp start
convert_model /tmp/qwen.gguf
stage1_shipped
stage2_before_after 16384 tasks
stamp done
touch $O/DONE
