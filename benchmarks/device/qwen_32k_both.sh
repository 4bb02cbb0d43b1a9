#!/usr/bin/env bash
# Device pipeline (issue 16; ran in session 25: benchmarks/results/stage2_qwen25coder05b_32k_both/): both stages of
# Qwen2.5-Coder-0.5B-Instruct on 32K windows — stage 1's
# indexer trained on 32K windows (60 steps, lr 3e-3: accuracy_qwen25coder05b_h200_stage1_32k.json, 66.75 at 32K against
# 63.0 from 8K windows) and stage 2 on 32K windows of --data tasks+kjv from it (session 23's recipe:
# stage2_qwen25coder05b_32k_mix/, +4.5 points for rtpurbo at 32K from the 8K indexer). Too long for one device
# session (stage 1 ~620 s, stage 2 ~770 s), so in two parts, each after the nine carried Qwen parts:
#   PART=stage1 bash benchmarks/device/start.sh benchmarks/device/qwen_32k_both.sh ; N=110 bash benchmarks/device/poll.sh /tmp/s2y
#     convert, stage 1 at 32K (~750 s in all); the indexer comes back as run/stage1_32k.tgz in the poll's res.tgz
#     (~100 KB): commit it under benchmarks/results/ and copy it into a carry folder (e.g. .carry9/) for part 2;
#   PART=stage2 ... (with stage1_32k.tgz carried): convert (its roles checked against part 1's), that indexer, stage2_before_after 32768.
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
