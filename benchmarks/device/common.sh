# Sourced by a device pipeline (benchmarks/results/<run>/pipeline.sh) run by start.sh: O (the output dir, $1),
# the carried site-packages on PYTHONPATH, stamp MSG (elapsed seconds into $O/stamps.log), the environment in
# $O/env.log, and convert_model SOURCE / convert_smollm2 (-> $O/conv, bf16, calibration 4 x 8K: the committed runs'
# setup).
set -uo pipefail
O=${1:?usage: source common.sh OUTDIR}; mkdir -p $O/run
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
t0=$(date +%s); stamp() { echo "[pipeline] $1 at $(( $(date +%s) - t0 ))s" | tee -a $O/stamps.log; }
python -c "import jax; print(jax.__version__, jax.devices())" > $O/env.log 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >> $O/env.log 2>&1
date -u >> $O/env.log
convert_model() {  # convert_model SOURCE: python -m convert of SOURCE (smollm2, a GGUF, an HF dir) -> $O/conv
  python -m convert --model "$1" --out $O/conv --calib-len 8192 --calib-docs 4 --dtype bfloat16 > $O/convert.log 2>&1 \
    || { stamp "convert FAILED"; touch $O/DONE; exit 1; }
  stamp converted
}
convert_smollm2() { convert_model smollm2; }
# stage1_shipped: stage 1's shipped recipe (100 steps at 8K, lr 3e-3) on $O/conv into $O/run/stage1 (log stage1.log);
# the pipeline stops (DONE) if it fails.
stage1_shipped() {
  python -m train.distill --model $O/conv --run-dir $O/run/stage1 --seq-len 8192 --steps 100 --lr 3e-3 --eval-passkey 0 \
    --log-every 10 --ckpt-every 1000 > $O/run/stage1.log 2>&1 || { stamp "stage1 FAILED"; touch $O/DONE; exit 1; }
  stamp "stage 1 done"
}
# stage1 NAME FLAGS...: train.distill with the pipeline's S1 array and FLAGS into $O/run/NAME (log NAME.log), stamped.
stage1() {
  local name=$1; shift
  python -m train.distill "${S1[@]}" --run-dir $O/run/$name "$@" > $O/run/$name.log 2>&1
  stamp "stage 1 $name rc=$?"
}
# indexers FIRST_MODE NAME...: IX (--indexer NAME=DIR for each trained one) and MODES (FIRST_MODE.. as the caller
# preset them, then rtpurbo for the first indexer and rtpurbo@NAME for the others).
indexers() {
  local n0=${#MODES[@]} name; IX=()
  for name in "$@"; do
    [ -d $O/run/$name/indexer ] || continue
    IX+=(--indexer $name=$O/run/$name/indexer)
    if [ ${#MODES[@]} -eq $n0 ]; then MODES+=(rtpurbo); else MODES+=(rtpurbo@$name); fi
  done
}
# suite LENGTH FLAGS...: the accuracy suite (5 NIAH tasks x 20 prompts) on $O/conv at LENGTH in the background,
# into $O/run/acc_LENGTH.{json,png,log}; the caller waits.
suite() {
  local L=$1; shift
  python -m benchmarks.accuracy --converted $O/conv --lengths $L --prompts 20 "$@" \
    --tasks niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery \
    --out $O/run/acc_$L > $O/run/acc_$L.log 2>&1 &
}
