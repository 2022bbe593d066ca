#!/bin/bash
# One device call (about 9 minutes, `run` with timeout_s 600): the GPU tier, then the Mosaic tile
# sweep and a short bench of the default kernels against cuDNN and tokamax, each stage cut by its
# own time limit so that the logs always come back (as one tar, the device returns <= 8 files).
# Usage (device tool, from the repo root; carry .tokamax from ../shared/tools/tokamax-wheels.sh):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call.sh
# On nvidia-h200-x2 the 2-GPU ring tests run too (they skip on one GPU).
source benchmarks/device_setup.sh
mkdir -p "$OUT/logs"
stamp() { while IFS= read -r l; do echo "$SECONDS $l"; done; }
timeout 330 python3 -m pytest -m gpu tests/ -v -rfE --durations=30 -p no:cacheprovider \
  -o faulthandler_timeout=300 2>&1 | stamp > "$OUT/logs/gpu_tier.log"
grep -E "FAILED|ERROR|passed|failed" "$OUT/logs/gpu_tier.log" | tail -20
timeout "$(until_s 420)" python3 benchmarks/tune_mosaic.py "$OUT/logs/tune_mosaic.json" 128 64 256 \
  > "$OUT/logs/tune.log" 2>&1
grep -A3 BEST "$OUT/logs/tune.log"
timeout "$(until_s 560)" python3 -m flashjax bench --backends flashjax_mosaic,jax_cudnn,tokamax_mosaic \
  --seqlens 512,16k --max-minutes 1.5 --commit "$C" --out "$OUT/logs/bench" > "$OUT/logs/bench.log" 2>&1
tail -40 "$OUT/logs/bench.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
