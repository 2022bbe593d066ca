#!/bin/bash
# One device call on nvidia-h200-x2 (about 9.5 minutes, `run` with timeout_s 600) for issue 11:
# 2M tokens (1M rows per GPU, causal, zigzag) ring forward + backward timed once, then the weak
# scaling study (32k and 128k rows per GPU, causal and full, ring against the all-gather baseline
# and one GPU, memory plans, the profile of two ring calls), each cut by its own time limit.
# Usage (device tool, from the repo root):
#   COMMIT=<sha> bash benchmarks/device_call_ring.sh
source benchmarks/device_setup.sh
mkdir -p "$OUT/logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/logs/gpus.txt"
timeout 170 python3 -m flashjax bench --ring --seqs-per-device 1024k --masks causal \
  --modes fwd+bwd --impls ring --studies scaling --no-plot --commit "$C" --out "$OUT/logs/ring2m" \
  > "$OUT/logs/ring2m.log" 2>&1
tail -5 "$OUT/logs/ring2m.log"
timeout "$(until_s 585)" python3 -m flashjax bench --ring --seqs-per-device 32k,128k \
  --masks causal,full --profile --max-minutes 4.5 --commit "$C" --out "$OUT/logs/ring" \
  > "$OUT/logs/ring.log" 2>&1
tail -40 "$OUT/logs/ring.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
