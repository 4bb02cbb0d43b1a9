#!/usr/bin/env bash
# One device call, nothing carried (issues 17 and 16; prepared in session 26, not yet run):
#   1. the whole model at 128K (Llama-3.1-8B shape, random weights, 4 layers scaled to 32): cuDNN dense against
#      RTPurbo with index keys per retrieval head and shared per KV group (`rtpurbo_shared_keys`), B=1 and 8;
#   2. stage 2's step at Qwen2.5-0.5B's shape on 32K windows, Triton backend: eq. 7, the tail loss on every row and on
#      a task window's answer rows only (`step_tail_answers`: the row chunks without a weighted row skip the
#      vocabulary's logsumexp).
# usage (device tool): bash benchmarks/device/e2e_shared_keys_and_tail_step.sh   (~5 min; results under $OUT,
# then commit them under benchmarks/results/ with the device named). CPU check of both commands: --small.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?the device tool sets OUT}
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/env.log 2>&1
python -c "import jax; print(jax.__version__, jax.devices())" >> $OUT/env.log 2>&1
python -m benchmarks.e2e --contexts 131072 --layers 4 --batches 1 8 --modes dense_cudnn rtpurbo rtpurbo_shared_keys \
  --out $OUT/e2e_h100_shared_keys_128k > $OUT/e2e.log 2>&1
echo "e2e rc=$?"
python -m benchmarks.stage2_step --steps qwen25_05b:32768 --ops --backends triton \
  --out $OUT/stage2_step_h100_tail > $OUT/stage2_step.log 2>&1
echo "stage2_step rc=$?"
tail -4 $OUT/e2e.log; grep -h '"phase"' $OUT/stage2_step.log | cut -c1-200
