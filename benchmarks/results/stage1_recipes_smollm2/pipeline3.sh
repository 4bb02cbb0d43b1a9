#!/usr/bin/env bash
# Device pipeline 3 (session 18): pipeline 2's machine was released (idle) while its suite ran, so only its stage-1
# logs and full attention's rows came back. With the device time left: the run-to-run spread of stage 1 — the
# 'tasks' recipe and the shipped one (prose + events) again with --seed 1 (other windows, events and PCA window) —
# through the suite at 4096 and 8000 (5 NIAH tasks x 20 prompts, the same prompts as pipelines 1 and 2).
source benchmarks/device/common.sh /tmp/s3
stamp start
convert_smollm2
S1=(--model $O/conv --seq-len 8192 --steps 150 --lr 3e-3 --eval-passkey 0 --log-every 10 --ckpt-every 1000 --seed 1
    --eval-lengths 1024,4096,8192)
stage1() {
  local name=$1; shift
  python -m train.distill "${S1[@]}" --run-dir $O/run/$name "$@" > $O/run/$name.log 2>&1
  stamp "stage 1 $name rc=$?"
}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
stage1 tasks_seed1 --data tasks & stage1 base_seed1 & wait
for L in 4096 8000; do
  python -m benchmarks.accuracy --converted $O/conv --indexer tasks_seed1=$O/run/tasks_seed1/indexer \
    --indexer base_seed1=$O/run/base_seed1/indexer --lengths $L --prompts 20 --modes rtpurbo rtpurbo@base_seed1 \
    --tasks niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery \
    --out $O/run/acc_$L > $O/run/acc_$L.log 2>&1 &
done
wait; stamp "accuracy done"
touch $O/DONE
