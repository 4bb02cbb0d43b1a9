# Sourced by a device pipeline (benchmarks/results/<run>/pipeline.sh) run by start.sh: O (the output dir, $1),
# the carried site-packages on PYTHONPATH, stamp MSG (elapsed seconds into $O/stamps.log), the environment in
# $O/env.log, and convert_smollm2 (SmolLM2 -> $O/conv, bf16, calibration 4 x 8K: the committed runs' setup).
set -uo pipefail
O=${1:?usage: source common.sh OUTDIR}; mkdir -p $O/run
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
t0=$(date +%s); stamp() { echo "[pipeline] $1 at $(( $(date +%s) - t0 ))s" | tee -a $O/stamps.log; }
python -c "import jax; print(jax.__version__, jax.devices())" > $O/env.log 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >> $O/env.log 2>&1
date -u >> $O/env.log
convert_smollm2() {
  python -m convert --model smollm2 --out $O/conv --calib-len 8192 --calib-docs 4 --dtype bfloat16 > $O/convert.log 2>&1 \
    || { stamp "convert FAILED"; touch $O/DONE; exit 1; }
  stamp converted
}
