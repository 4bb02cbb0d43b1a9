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
# accuracy_suite CONVERTED OUT LENGTH FLAGS...: the accuracy suite (5 NIAH tasks x 20 prompts) on CONVERTED at
# LENGTH in the background, into OUT.{json,png,log}; the caller waits ($!).
accuracy_suite() {
  local conv=$1 out=$2 L=$3; shift 3
  python -m benchmarks.accuracy --converted $conv --lengths $L --prompts 20 "$@" \
    --tasks niah_single_noise niah_single_prose niah_multikey niah_multivalue niah_multiquery \
    --out $out > $out.log 2>&1 &
}
# suite LENGTH FLAGS...: accuracy_suite on $O/conv into $O/run/acc_LENGTH.
suite() { local L=$1; shift; accuracy_suite $O/conv $O/run/acc_$L $L "$@"; }
# stage2_suite CONVERTED NAME LENGTH MEM [FLAGS...]: accuracy_suite with $O/run/stage1/indexer and FLAGS (default
# --modes $SUITE_MODES, itself by default "full rtpurbo") on CONVERTED into $O/run/L<LENGTH>/NAME, with
# XLA_PYTHON_CLIENT_MEM_FRACTION=MEM (it shares the GPU).
stage2_suite() {
  local conv=$1 name=$2 L=$3 mem=$4; shift 4
  # shellcheck disable=SC2206  # SUITE_MODES: modes split on spaces
  local flags=("$@"); [ ${#flags[@]} -gt 0 ] || flags=(--modes ${SUITE_MODES:-full rtpurbo})
  mkdir -p $O/run/L$L
  XLA_PYTHON_CLIENT_MEM_FRACTION=$mem accuracy_suite $conv $O/run/L$L/$name $L --indexer $O/run/stage1/indexer \
    "${flags[@]}"
}
# stage2_before_after SEQ_LEN DATA [BEFORE_FLAGS...]: the suite "before" (stage2_suite at 16000 and 32000, with
# BEFORE_FLAGS when given, e.g. a second indexer and its mode) beside stage 2 of $O/conv with
# $O/run/stage1/indexer on SEQ_LEN-token windows of --data DATA (session 21's recipe: global batch 8, 40 steps, lr 3e-6,
# 10 warm-up steps, answer rows, 4 held-out windows; S2FLAGS, when set, adds flags to it, e.g. "--trainable attention")
# (BEFORE_FROM=a committed results folder of the same model and indexer: its L*/acc_stage1.* stand for "before")
# into $O/run/stage2, then the suite "after" on its model (stage2_suite's default modes), and per
# length the merged summary and --compare into $O/run/compare_<LENGTH>.log. Stamped; the pipeline stops (DONE) if
# stage 2 fails.
stage2_before_after() {
  local b16 b32 a16 a32 L seq=$1 data=$2; shift 2
  if [ -n "${BEFORE_FROM:-}" ]; then  # a committed run's "before" suites (same model, indexer and prompts) reused
    for L in 16000 32000; do mkdir -p $O/run/L$L && cp $BEFORE_FROM/L$L/acc_stage1.* $O/run/L$L/ \
      || { stamp "no before in $BEFORE_FROM"; touch $O/DONE; exit 1; }; done
    b16=; b32=; stamp "accuracy before copied from $BEFORE_FROM"
  else
    stage2_suite $O/conv acc_stage1 16000 0.18 "$@"; b16=$!
    stage2_suite $O/conv acc_stage1 32000 0.22 "$@"; b32=$!
  fi
  # shellcheck disable=SC2086  # S2FLAGS: flags split on spaces
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 python -m train.distill --stage 2 --model $O/conv --indexer $O/run/stage1/indexer \
    --run-dir $O/run/stage2 --seq-len $seq --steps 40 --accumulate 8 --lr 3e-6 --warmup 10 --data $data --events 0 \
    --positions answer --log-every 5 --ckpt-every 1000 --eval-batches 4 ${S2FLAGS:-} > $O/run/stage2.log 2>&1 \
    || { stamp "stage2 FAILED"; wait; touch $O/DONE; exit 1; }
  stamp "stage 2 trained"
  [ -z "$b16" ] || { wait $b16; wait $b32; stamp "accuracy before done"; }
  stage2_suite $O/run/stage2/model acc_stage2 16000 0.3; a16=$!
  stage2_suite $O/run/stage2/model acc_stage2 32000 0.4; a32=$!
  wait $a16; wait $a32; stamp "accuracy after done"
  for L in 16000 32000; do
    mkdir -p $O/run/L$L/stage2 && cp $O/run/stage2/summary.json $O/run/L$L/stage2/ 2>/dev/null
    python -m benchmarks.stage2_summary $O/run/L$L > $O/run/L$L/summary.log 2>&1
    python -m benchmarks.accuracy --compare $O/run/L$L/acc_stage1.json $O/run/L$L/acc_stage2.json > $O/run/compare_$L.log 2>&1
  done
}
