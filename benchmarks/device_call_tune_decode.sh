#!/bin/bash
# One device call (about 9.5 minutes, `run` with timeout_s 600): the decode kernel's tiles and
# split counts (benchmarks/tune_decode.py), contiguous, paged, and at GPT-2 small's decode shape,
# the candidates timed interleaved over rounds in jitted loops of chained steps.
# Usage (device tool, from the repo root):
#   COMMIT=<sha> bash benchmarks/device_call_tune_decode.sh
source benchmarks/device_setup.sh
export PYTHONPATH=$PYTHONPATH:benchmarks
mkdir -p "$OUT/logs"
echo "commit $C" > "$OUT/logs/commit.txt"
timeout 300 python3 benchmarks/tune_decode.py "$OUT/logs/tune_decode.json" 1x8k 1x64k 8x16k \
  > "$OUT/logs/tune_decode.log" 2>&1
timeout "$(until_s 430)" python3 benchmarks/tune_decode.py "$OUT/logs/tune_decode_paged16.json" \
  1x64k --paged 16 > "$OUT/logs/tune_decode_paged16.log" 2>&1
timeout "$(until_s 585)" python3 benchmarks/tune_decode.py "$OUT/logs/tune_decode_gpt2.json" \
  1x2k 32x2k --heads 12,12,64 > "$OUT/logs/tune_decode_gpt2.log" 2>&1
tail -30 "$OUT/logs"/tune_decode*.log
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
