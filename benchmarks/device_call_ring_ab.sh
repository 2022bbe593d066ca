#!/bin/bash
# One device call on nvidia-h200-x2 (about 6 minutes): the ring's pair dispatch A/B at 32k per
# GPU, causal (zigzag) and full, forward and forward+backward: the default `lax.switch` on each
# pair's state ("ring") against no conditionals ("ring_kernel", ring_attention(pair_dispatch=
# "kernel")), beside one GPU on the whole sequence. Session 6 measured the causal forward at
# 0.906 of one GPU (bar 0.95); one hypothesis is the host round trip of each conditional.
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_ring_ab.sh
source benchmarks/device_setup.sh
mkdir -p "$OUT/logs"
timeout 330 python3 -m flashjax bench --ring --seqs-per-device 32k --masks causal,full \
  --impls single,ring,ring_kernel --studies scaling --max-minutes 4.5 --commit "$C" \
  --out "$OUT/logs/ring_ab" > "$OUT/logs/ring_ab.log" 2>&1
tail -30 "$OUT/logs/ring_ab.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
