for i in $(seq 1 ${N:-112}); do [ -f /tmp/s2/DONE ] && break; sleep 5; done
cat /tmp/s2/stamps.log; tail -3 /tmp/pipeline.log; cd /tmp/s2 && grep -h "tokens/s\|\[stage2\] after\|before:" run/*.log | tail -8
tar czf $OUT/res.tgz --exclude='*/checkpoints' --exclude='*/model' --exclude='*/indexer' --exclude='*/teacher' --exclude=conv *.log run 2>/dev/null; ls -la $OUT
