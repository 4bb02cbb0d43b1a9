#!/usr/bin/env bash
# Device pipeline (session 17, one H200, runs detached): SmolLM2 convert (bf16, same calibration as
# ../stage2_smollm2_h200) -> stage 1 (150 steps at 8K, alone on the GPU: its tokens/s with the kernel teacher)
# -> generate's first call (compile) unrolled / scanned -> stage 2 variants on every row (--positions all),
# each followed by the accuracy suite on the same prompts; "before" accuracy runs beside the first variant.
# Ran verbatim at commit 167a725; since rewritten onto benchmarks/device/common.sh (same commands; common.sh also
# writes the date into env.log).
source benchmarks/device/common.sh /tmp/s2
stamp start
convert_smollm2
python -m train.distill --model $O/conv --run-dir $O/run/stage1 --seq-len 8192 --steps 150 --lr 3e-3 --eval-passkey 0 \
  --log-every 10 --ckpt-every 1000 > $O/run/stage1.log 2>&1 || { stamp "stage1 FAILED"; touch $O/DONE; exit 1; }
stamp "stage 1 done"
for s in none split; do
  flag=(); [ $s != none ] && flag=(--scan-layers $s)
  python -m benchmarks.generate --model $O/conv --indexer $O/run/stage1/indexer --dtype bfloat16 --max-new-tokens 32 \
    "${flag[@]}" --out $O/run/generate_$s.json > $O/run/generate_$s.log 2>&1
  stamp "generate $s rc=$?"
done
ACC=(--indexer $O/run/stage1/indexer --lengths 4096 8000 --prompts 20
     --tasks niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
python -m benchmarks.accuracy --converted $O/conv "${ACC[@]}" --modes full dense_retrieval rtpurbo \
  --out $O/run/acc_before > $O/run/acc_before.log 2>&1 &
before=$!
prev=""
for v in "all_lr3e-6 3e-6" "all_lr2e-5 2e-5"; do
  set -- $v; name=$1; lr=$2
  python -m train.distill --stage 2 --model $O/conv --indexer $O/run/stage1/indexer --run-dir $O/run/$name --seq-len 8192 \
    --steps 250 --lr $lr --warmup 50 --data tasks --events 0 --positions all --log-every 10 --ckpt-every 1000 \
    --eval-batches 6 > $O/run/$name.log 2>&1 || { stamp "$name FAILED"; continue; }
  stamp "$name trained"
  [ -n "$prev" ] && wait $prev
  python -m benchmarks.accuracy --converted $O/run/$name/model "${ACC[@]}" --modes full rtpurbo \
    --out $O/run/acc_$name > $O/run/acc_$name.log 2>&1 &
  prev=$!
done
wait $before; stamp "accuracy before rc=$?"
wait $prev; stamp "accuracy after rc=$?"
touch $O/DONE
