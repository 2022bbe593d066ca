#!/bin/bash
# One device call (about 9.5 minutes, `run` with timeout_s 600): the backward's option sets
# (backward.OPTIONS: overlap_dv, early_dp, no_pingpong, longest_first, no_auto_barriers, and the
# single kernel fused_dq with pooled_dq) on the GPU, first against the float64 reference
# (`pytest -m gpu_schedules -k backward`), then timed interleaved at head dims 128 and 64
# (benchmarks/tune_mosaic.py --only bwd, BWD_SCHEDULES).
# Usage (device tool, from the repo root):
#   COMMIT=<sha> bash benchmarks/device_call_bwd.sh
source benchmarks/device_setup.sh
export PYTHONPATH=$PYTHONPATH:benchmarks
mkdir -p "$OUT/logs"
echo "commit $C" > "$OUT/logs/commit.txt"
timeout 220 python3 -m pytest -m gpu_schedules tests/test_gpu_schedules.py -k "backward or dkdv" \
  -v -rfE -p no:cacheprovider -o faulthandler_timeout=200 > "$OUT/logs/gpu_schedules.log" 2>&1
grep -E "FAILED|ERROR|passed|failed" "$OUT/logs/gpu_schedules.log" | tail -20
timeout "$(until_s 585)" python3 benchmarks/tune_mosaic.py "$OUT/logs/tune_bwd.json" 128 64 \
  --only bwd > "$OUT/logs/tune_bwd.log" 2>&1
grep -A4 BEST "$OUT/logs/tune_bwd.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
