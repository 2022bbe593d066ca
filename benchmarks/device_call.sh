#!/bin/bash
# One device call (about 9.5 minutes, `run` with timeout_s 600; carry .tokamax): the whole GPU
# tier first, then the paged decode cache against the contiguous one, then the standard bench
# of the default kernels against cuDNN and tokamax at HEAD_DIMS, each stage cut by its own time
# limit so that the logs always come back (as one tar: the device returns <= 8 files).
# Usage (device tool, from the repo root):
#   COMMIT=<sha> [HEAD_DIMS=64] [DECODE=0] bash benchmarks/device_call.sh
# On nvidia-h200-x2 the 2-GPU ring tests run too (they skip on one GPU).
source benchmarks/device_setup.sh
mkdir -p "$OUT/logs"
gpu_tier 420 "$OUT/logs/gpu_tier.log"
grep -E "FAILED|ERROR|passed|failed" "$OUT/logs/gpu_tier.log" | tail -20
if [ "${DECODE:-1}" = 1 ]; then
  timeout "$(until_s 490)" python3 -m flashjax bench --decode --no-flax --shapes 1x64k,32x8k \
    --backends flashjax,flashjax_paged16,flashjax_paged64,jax_cudnn --max-minutes 0.8 \
    --commit "$C" --out "$OUT/logs/decode" > "$OUT/logs/decode.log" 2>&1
  tail -14 "$OUT/logs/decode.log"
fi
# The standard sweep (seq 512..16k, causal and not, fwd/bwd/fwd+bwd) at HEAD_DIMS (default
# 128,256), longest first, starting no new shape in the last 70 s.
timeout "$(until_s 585)" python3 -m flashjax bench --head-dims "${HEAD_DIMS:-128,256}" \
  --backends flashjax_mosaic,jax_cudnn,tokamax_mosaic --max-minutes "$(( ($(until_s 515)) / 6 ))e-1" \
  --commit "$C" --out "$OUT/logs/bench" > "$OUT/logs/bench.log" 2>&1
tail -40 "$OUT/logs/bench.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
