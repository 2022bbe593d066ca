#!/bin/bash
# One device call on nvidia-h200 (about 9.5 minutes, `run` with timeout_s 600): the open
# questions session 8 left (benchmarks/results/2026-11-30-h200-s8/README.md, last section):
#   1. the backward's longest_first with the defaults, and split_dq (new), on the GPU against
#      the float64 reference;
#   2. the backward at T = 16k, head dims 128 and 64 (BWD_SCHEDULES: longest_first against the
#      16k causal drop at 128; split_dq, the 5-GEMM kernel that might beat the two at 128);
#   3. the forward at T = 1k, head dim 64 (SCHEDULES, with lazy_rescale and persistent; its
#      causal forward is 0.64x cuDNN there); lazy_rescale also runs in step 1's gpu_schedules;
#   4. the decode kernel with pages of 64 keys at 64x4k and 1x8k (paged 1.19x / 1.27x).
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_s9.sh
source benchmarks/device_setup.sh
export PYTHONPATH=$PYTHONPATH:benchmarks
L="$OUT/logs"
mkdir -p "$L"
echo "commit $C" > "$L/commit.txt"
timeout 150 python3 -m pytest -m gpu_schedules tests/test_gpu_schedules.py \
  -k "longest_first or split_dq or lazy_rescale" -v -rfE -p no:cacheprovider \
  -o faulthandler_timeout=140 > "$L/gpu_schedules.log" 2>&1
timeout "$(until_s 350)" python3 benchmarks/tune_mosaic.py "$L/tune_bwd16k.json" 128 64 \
  --only bwd --seq 16384 > "$L/tune_bwd16k.log" 2>&1
timeout "$(until_s 450)" python3 benchmarks/tune_mosaic.py "$L/tune_fwd1k.json" 64 \
  --only fwd --seq 1024 > "$L/tune_fwd1k.log" 2>&1
timeout "$(until_s 585)" python3 benchmarks/tune_decode.py "$L/tune_decode_paged64.json" \
  64x4k 1x8k --paged 64 > "$L/tune_decode_paged64.log" 2>&1
grep -E "FAILED|ERROR|passed|failed" "$L/gpu_schedules.log" | tail -5
grep -h -A4 "BEST\|configs.py:" "$L"/tune_*.log
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
