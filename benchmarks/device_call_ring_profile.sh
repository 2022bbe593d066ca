#!/bin/bash
# One device call on nvidia-h200-x2 (about 5 minutes; 9.5 with TIER=1): why the ring's forward
# runs at 0.89-0.92 of one GPU per GPU (session 8). At 32k rows per GPU, full then causal,
# forward only: one dense 32k x 32k and 16k x 16k kernel call on one GPU (`pair`, the ring's step
# compute), the ring against one GPU (`scaling`), and a profile of the ring forward whose
# `trace_breakdown` splits each GPU's time into flashjax kernels, NCCL, other kernels alone (the
# merges) and idle. TIER=1 runs the whole GPU tier first (290 s; the 2-GPU ring tests included).
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) [TIER=1] bash benchmarks/device_call_ring_profile.sh
source benchmarks/device_setup.sh
mkdir -p "$OUT/logs"
base=0
if [ "${TIER:-0}" = 1 ]; then
  gpu_tier 290 "$OUT/logs/gpu_tier.log"
  grep -E "FAILED|ERROR|passed|failed" "$OUT/logs/gpu_tier.log" | tail -20
  base=$SECONDS
fi
for mask in full causal; do
  timeout "$(until_s $((base + $([ $mask = full ] && echo 145 || echo 285))))" python3 -m flashjax bench \
    --ring --seqs-per-device 32k --masks $mask --modes fwd --impls single,ring \
    --studies pair,scaling --profile --max-minutes 2 --commit "$C" --out "$OUT/logs/$mask" \
    > "$OUT/logs/$mask.log" 2>&1
  grep -E "profile of|pair |ring |single " "$OUT/logs/$mask.log" | cut -c1-400 | tail -12
  find "$OUT/logs/$mask/profile" -name "*.xplane.pb" -delete  # keep the trace.json.gz only
done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
