#!/bin/bash
# One device call on nvidia-h200 (up to 9.5 minutes; each of the 10 runs is a fresh process under
# ncu): Nsight Compute sections, pipe utilisation, stall reasons and shared-memory bank conflicts
# of the kernels where the Hopper issue's bars are missed, flashjax's beside cuDNN's
# (benchmarks/ncu_kernels.py; OUT/logs/ncu/summary.txt, one CSV per run).
# Usage (device tool, from the repo root):
#   COMMIT=<sha> [CASES=fwd-d64-causal-1k,...] [BACKENDS=flashjax_mosaic] \
#     [SASS=1] [OPTIONS="persistent persistent,prefetch_q"] bash benchmarks/device_call_ncu.sh
# SASS=1: each run also writes the kernels' SASS with its stall samples (a second ncu run each:
# name two or three cases). OPTIONS: space-separated candidates, each comma-separated
# options: flashjax_mosaic's kernel of the case (the forward of a fwd- case, the backward of a
# bwd- one) run with exactly those (its configs.py rules off; `ncu_kernels.py --options`), in
# place of its configured one.
source benchmarks/device_setup.sh
mkdir -p "$OUT/logs"
echo "commit $C" > "$OUT/logs/commit.txt"
timeout 560 python3 benchmarks/ncu_kernels.py "$OUT/logs/ncu" ${CASES:+--cases "$CASES"} \
  ${BACKENDS:+--backends "$BACKENDS"} ${SASS:+--sass} \
  $(for o in $OPTIONS; do echo "--options $o"; done) \
  > "$OUT/logs/ncu.log" 2>&1
cat "$OUT/logs/ncu/summary.txt" 2>/dev/null || tail -20 "$OUT/logs/ncu.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
