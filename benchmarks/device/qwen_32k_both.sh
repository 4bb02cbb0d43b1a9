#!/usr/bin/env bash
# Device pipeline (issue 16): both stages of Qwen2.5-Coder-0.5B-Instruct on 32K windows — stage 1's indexer trained on
# 32K windows (60 steps, lr 3e-3) and stage 2 on 32K windows of --data tasks+kjv from it (session 23's recipe). Ran in
# session 25 on one H100 lease, both parts back to back (part 1 358 s, part 2 1062 s):
# benchmarks/results/stage2_qwen25coder05b_32k_both/. Each part runs after the nine carried Qwen parts:
#   PART=stage1 bash benchmarks/device/start.sh benchmarks/device/qwen_32k_both.sh ; N=110 bash benchmarks/device/poll.sh /tmp/s2y
#     convert, stage 1 at 32K; the indexer comes back as run/stage1_32k.tgz in the poll's res.tgz (~400 KB);
#   PART=stage2 ... with stage1_32k.tgz in /tmp/wh/ (carried in a .carry folder, or copied there from part 1 on a
#     warm machine, then `mv /tmp/s2y /tmp/s2y_part1`): convert (its roles checked against part 1's), that indexer,
#     stage2_before_after 32768. Variants of part 2 from the committed indexer
#     (benchmarks/results/stage2_qwen25coder05b_32k_both/stage1_32k.tgz): S2FLAGS adds stage-2 flags, SUITE_MODES
#     sets the suites' modes and BEFORE_FROM reuses a committed run's "before" suites (stage 2 then has the GPU
#     alone), e.g. PART=stage2 S2FLAGS="--loss topk_tail" SUITE_MODES="full dense_retrieval rtpurbo"
#     BEFORE_FROM=benchmarks/results/stage2_qwen25coder05b_32k_both bash benchmarks/device/start.sh
#     benchmarks/device/qwen_32k_both.sh — session 26, 1198 s on the H100 (stage 2 with the tail loss 17 s a step;
#     benchmarks/results/stage2_qwen25coder05b_32k_tail/). With the tracked tree at ~10 MB a carry call holds one
#     Qwen part (.carry1-9) and a tenth the wheels + stage1_32k.tgz; --dense-weight doubles the step, so within one
#     30-minute lease it needs S2FLAGS="... --steps 20".
source benchmarks/device/common.sh /tmp/s2y
stamp "start ${PART:?PART=stage1 or PART=stage2}"
convert_model /tmp/qwen.gguf
if [ "$PART" = stage1 ]; then
  python -m train.distill --model $O/conv --run-dir $O/run/stage1 --seq-len 32768 --steps 60 --lr 3e-3 \
    --eval-passkey 0 --log-every 10 --ckpt-every 1000 > $O/run/stage1.log 2>&1 || { stamp "stage1 FAILED"; touch $O/DONE; exit 1; }
  cp $O/conv/rtpurbo.json $O/run/stage1/conv_rtpurbo.json  # the roles it was trained for, checked in part 2
  tar czf $O/run/stage1_32k.tgz -C $O/run/stage1 indexer conv_rtpurbo.json && stamp "stage 1 (32K windows) done"
  # no suite here: part 2's stage2_before_after measures this indexer "before" (and it was measured on the H200:
  # accuracy_qwen25coder05b_h200_stage1_32k.json)
else
  mkdir -p $O/run/stage1 && tar xzf /tmp/wh/stage1_32k.tgz -C $O/run/stage1 || { stamp "no carried stage1_32k.tgz"; touch $O/DONE; exit 1; }
  python -c "import json, sys; r = [json.load(open(f))['sparse_config']['roles'] for f in sys.argv[1:]]; sys.exit(r[0] != r[1])" \
    $O/conv/rtpurbo.json $O/run/stage1/conv_rtpurbo.json || { stamp "calibration chose other roles than part 1's"; touch $O/DONE; exit 1; }
  stamp "stage 1 indexer carried (same roles)"
  stage2_before_after 32768 tasks+kjv
fi
stamp done
touch $O/DONE
