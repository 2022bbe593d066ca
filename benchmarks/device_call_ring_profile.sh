#!/bin/bash
# One device call on nvidia-h200-x2 (about 5 minutes; 9.5 with TIER=1): why the ring's forward
# runs at 0.89-0.92 of one GPU per GPU (session 8). At 32k rows per GPU, full then causal,
# forward only: one dense 32k x 32k and 16k x 16k kernel call on one GPU (`pair`, the ring's step
# compute), the ring against one GPU (`scaling`), and a profile of the ring forward whose
# `trace_breakdown` splits each GPU's time into flashjax kernels, NCCL, other kernels alone (the
# merges) and idle. TIER=1 runs the whole GPU tier first (290 s; the 2-GPU ring tests included).
# XLA_EXTRA (XLA flags): the causal run once more with them, in the same call (logs/causal-xla),
# the ring sending K and V as two buffers (`ring_pair`: no stacked copy) and profiled. E.g.
# `--xla_gpu_collective_permute_combine_threshold_bytes=1073741824` (XLA may combine the two
# hops into one collective: the 0.32 ms stack gone) and
# `--xla_gpu_enable_dynamic_slice_fusion=true` (the kernels may read the K/V pieces in place
# instead of the ~0.45 ms of copies per call; session 9's profile).
# IMPLS: the full and causal runs' implementations (default single,ring; e.g.
# single,ring,ring_in_place: the forward's kernels reading the key pieces in place); the profile
# is of the first ring variant among them.
# Usage (device tool, from the repo root):
#   COMMIT=<sha> [TIER=1] [XLA_EXTRA=...] [IMPLS=...] \
#     bash benchmarks/device_call_ring_profile.sh
source benchmarks/device_setup.sh
mkdir -p "$OUT/logs"
base=0
if [ "${TIER:-0}" = 1 ]; then
  gpu_tier 290 "$OUT/logs/gpu_tier.log"
  grep -E "FAILED|ERROR|passed|failed" "$OUT/logs/gpu_tier.log" | tail -20
  base=$SECONDS
fi
runs="full:145 causal:285"
[ -n "${XLA_EXTRA:-}" ] && runs="full:120 causal:240 causal-xla:330"
for run in $runs; do
  IFS=: read -r name until <<< "$run"
  (
    [ "$name" = causal-xla ] && export XLA_FLAGS="${XLA_FLAGS:-} $XLA_EXTRA"
    timeout "$(until_s $((base + until)))" python3 -m flashjax bench \
      --ring --seqs-per-device 32k --masks "${name%-xla}" --modes fwd \
      --impls "$([ "$name" = causal-xla ] && echo single,ring_pair || echo "${IMPLS:-single,ring}")" \
      --studies pair,scaling --profile --max-minutes 2 --commit "$C" --out "$OUT/logs/$name" \
      > "$OUT/logs/$name.log" 2>&1
  )
  grep -E "profile of|pair |ring |ring_[a-z_]+ |single " "$OUT/logs/$name.log" | cut -c1-400 | tail -12
  find "$OUT/logs/$name/profile" -name "*.xplane.pb" -delete  # keep the trace.json.gz only
done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
