#!/bin/bash
# One device call (about 9.5 minutes, `run` with timeout_s 600) of sweeps, the candidates of each
# timed interleaved over rounds: the Mosaic kernels' schedule options on configs.py's tiles
# (benchmarks/tune_mosaic.py: longest_first with heads varying fastest, no_auto_barriers,
# persistent), then the decode kernel's tiles and split counts, contiguous, paged and at GPT-2
# small's decode shape (benchmarks/tune_decode.py).
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_tune.sh
source benchmarks/device_setup.sh
export PYTHONPATH=$PYTHONPATH:benchmarks
mkdir -p "$OUT/logs"
echo "commit $C" > "$OUT/logs/commit.txt"
timeout 330 python3 benchmarks/tune_mosaic.py "$OUT/logs/tune_mosaic.json" 128 64 256 \
  > "$OUT/logs/tune_mosaic.log" 2>&1
grep -A4 BEST "$OUT/logs/tune_mosaic.log"
timeout "$(until_s 500)" python3 benchmarks/tune_decode.py "$OUT/logs/tune_decode.json" \
  1x8k 1x64k 8x16k > "$OUT/logs/tune_decode.log" 2>&1
timeout "$(until_s 545)" python3 benchmarks/tune_decode.py "$OUT/logs/tune_decode_paged16.json" \
  1x64k --paged 16 > "$OUT/logs/tune_decode_paged16.log" 2>&1
timeout "$(until_s 585)" python3 benchmarks/tune_decode.py "$OUT/logs/tune_decode_gpt2.json" \
  1x2k 32x2k --heads 12,12,64 > "$OUT/logs/tune_decode_gpt2.log" 2>&1
tail -30 "$OUT/logs"/tune_decode*.log
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
