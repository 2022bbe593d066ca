#!/bin/bash
# One short device call (about 4 minutes): the forward's schedule options at a short sequence
# (T = 512, B = 32; the bench's weakest forward shapes, where per-CTA costs count most) at head
# dims 64 and 128, then the backward's option sets without the ping-pong at head dim 128
# (benchmarks/tune_mosaic.py BWD_SCHEDULES).
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_short.sh
source benchmarks/device_setup.sh
export PYTHONPATH=$PYTHONPATH:benchmarks
mkdir -p "$OUT/logs"
echo "commit $C" > "$OUT/logs/commit.txt"
timeout 200 python3 benchmarks/tune_mosaic.py "$OUT/logs/tune_fwd512.json" 64 128 --only fwd \
  --seq 512 > "$OUT/logs/tune_fwd512.log" 2>&1
grep -A4 BEST "$OUT/logs/tune_fwd512.log"
timeout "$(until_s 330)" python3 benchmarks/tune_mosaic.py "$OUT/logs/tune_bwd128.json" 128 \
  --only bwd > "$OUT/logs/tune_bwd128.log" 2>&1
grep -A4 BEST "$OUT/logs/tune_bwd128.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
