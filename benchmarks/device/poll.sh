#!/usr/bin/env bash
# On the device machine: wait (up to N x 5 s, default 100) for a pipeline's DIR/DONE, print its stamps and the
# last lines of its logs, and pack DIR's logs, JSON and plots (no checkpoints, models or indexers) into $OUT/res.tgz.
# usage: N=100 bash benchmarks/device/poll.sh DIR
DIR=${1:?usage: poll.sh DIR}
for i in $(seq 1 ${N:-100}); do [ -f $DIR/DONE ] && break; sleep 5; done
cat $DIR/stamps.log; tail -3 /tmp/pipeline.log
cd $DIR && for f in run/*.log; do echo "== $f"; grep -v "it/s" $f | tail -4; done
tar czf $OUT/res.tgz --exclude='*/checkpoints' --exclude='*/model' --exclude='*/indexer' --exclude='*/teacher' \
  --exclude=conv *.log run 2>/dev/null; ls -la $OUT
