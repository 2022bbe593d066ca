#!/bin/bash
# One device call (about 9.5 minutes, `run` with timeout_s 600): the Mosaic kernels' on/off
# options on configs.py's tiles, the candidates timed interleaved over rounds
# (benchmarks/tune_mosaic.py: forward SCHEDULES; backward no_auto_barriers, fused_dq (the
# single-kernel backward) and overlap_dv), head dims 128, 64, 256, causal and not. First, those
# options against the float64 reference on feature-rich cases (`pytest -m gpu_schedules`).
# Each sweep candidate is also checked against configs.py's choice; a hang shows in the log as
# the last "checked" line.
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_tune.sh
source benchmarks/device_setup.sh
export PYTHONPATH=$PYTHONPATH:benchmarks
mkdir -p "$OUT/logs"
echo "commit $C" > "$OUT/logs/commit.txt"
timeout 200 python3 -m pytest -m gpu_schedules tests/ -v -rfE -p no:cacheprovider \
  -o faulthandler_timeout=180 > "$OUT/logs/gpu_schedules.log" 2>&1
grep -E "FAILED|ERROR|passed|failed" "$OUT/logs/gpu_schedules.log" | tail -20
timeout "$(until_s 585)" python3 benchmarks/tune_mosaic.py "$OUT/logs/tune_mosaic.json" 128 64 256 \
  > "$OUT/logs/tune_mosaic.log" 2>&1
grep -A4 BEST "$OUT/logs/tune_mosaic.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
