#!/bin/bash
# One device call on nvidia-h200-x2 (about 5 minutes): why the ring's forward runs at 0.89-0.92
# of one GPU per GPU (session 8). At 32k rows per GPU, full then causal, forward only: one
# dense 32k x 32k and 16k x 16k kernel call on one GPU (`pair`, the ring's step compute), the
# ring against one GPU (`scaling`), and a profile of the ring forward whose `trace_breakdown`
# splits each GPU's time into flashjax kernels, NCCL, other kernels alone (the merges) and idle.
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_ring_profile.sh
source benchmarks/device_setup.sh
mkdir -p "$OUT/logs"
for mask in full causal; do
  timeout "$(until_s $([ $mask = full ] && echo 150 || echo 290))" python3 -m flashjax bench \
    --ring --seqs-per-device 32k --masks $mask --modes fwd --impls single,ring \
    --studies pair,scaling --profile --max-minutes 2 --commit "$C" --out "$OUT/logs/$mask" \
    > "$OUT/logs/$mask.log" 2>&1
  grep -E "profile of|pair |ring |single " "$OUT/logs/$mask.log" | cut -c1-400 | tail -12
  find "$OUT/logs/$mask/profile" -name "*.xplane.pb" -delete  # keep the trace.json.gz only
done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
