#!/bin/bash
# One device call on nvidia-h200-x2 (about 9.5 minutes, `run` with timeout_s 600; carry
# .tokamax), two GPUs busy at once:
#   GPU 0: the GPU tier (`pytest -m gpu`; the 2-GPU ring tests skip: benchmarks/device_call.sh
#          on the pair runs them);
#   GPU 1: the schedule options' GPU tests (`pytest -m gpu_schedules`, `-k "$K"` when K is
#          set), then the standard bench of the default kernels at HEAD_DIMS against cuDNN and
#          tokamax, then (GEN=1) GPT-2 small generation at batch 1 (with `--attention none`,
#          the floor without attention) in the time left.
# Usage (device tool, from the repo root):
#   COMMIT=<sha> [K=prefetch_q] [HEAD_DIMS=64] [GEN=1] \
#     bash benchmarks/device_call_pair.sh
source benchmarks/device_setup.sh
L="$OUT/logs"
mkdir -p "$L"
echo "commit $C" > "$L/commit.txt"
(CUDA_VISIBLE_DEVICES=0 gpu_tier 420 "$L/gpu_tier.log") &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 200 python3 -m pytest -m gpu_schedules tests/ ${K:+-k "$K"} -v -rfE \
    -p no:cacheprovider -o faulthandler_timeout=180 > "$L/gpu_schedules.log" 2>&1
  timeout "$(until_s 500)" python3 -m flashjax bench --head-dims "${HEAD_DIMS:-64}" \
    --backends flashjax_mosaic,jax_cudnn,tokamax_mosaic \
    --max-minutes "$(( ($(until_s 470)) / 6 ))e-1" --commit "$C" --out "$L/bench" \
    > "$L/bench.log" 2>&1
  if [ "${GEN:-0}" = 1 ]; then gen 1 "$L" 585; fi
) &
wait
grep -E "FAILED|ERROR|passed|failed" "$L/gpu_tier.log" "$L/gpu_schedules.log" | tail -30
tail -40 "$L/bench.log"
tail -8 "$L"/gpt2-generate-b1.log 2>/dev/null
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
