#!/bin/bash
# One device call on nvidia-h200 (about 9.5 minutes): where flashjax's Mosaic kernels wait, and
# GPT-2 end to end.
#   1. Mosaic GPU's own dumps of the kernels of four cases (ptxas' register / spill report, PTX,
#      SASS; MOSAIC_GPU_DUMP_*), compiled and run once each outside ncu: OUT/logs/dump/CASE/;
#   2. GPT-2 training throughput at seq 1024, small and medium, packed segments and none,
#      flashjax against cuDNN (issue 9's end-to-end bar): OUT/logs/gpt2*;
#   3. ncu's source page (SASS with warp-stall samples per instruction) of CASES' flashjax
#      kernels (benchmarks/ncu_kernels.py --sass): OUT/logs/ncu/.
# Usage (device tool, from the repo root):
#   COMMIT=<sha> [CASES=fwd-d64-full-1k,bwd-d128-full-4k] \
#     bash benchmarks/device_call_sass.sh
source benchmarks/device_setup.sh
L="$OUT/logs"
mkdir -p "$L/dump"
echo "commit $C" > "$L/commit.txt"
for c in fwd-d64-causal-1k fwd-d64-full-1k fwd-d128-full-16k bwd-d128-full-4k; do
  mkdir -p "$L/dump/$c"
  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTX=1 \
    MOSAIC_GPU_DUMP_TO="$L/dump/$c" timeout 90 python3 benchmarks/ncu_kernels.py \
    --worker flashjax_mosaic "$c" > "$L/dump/$c.log" 2>&1
  echo "$SECONDS s: dump $c rc $?"
done
timeout "$(until_s 390)" python3 -m examples.gpt2.bench --out "$L/gpt2" --only throughput \
  --throughput small:1024,medium:1024 --backends cudnn,flashjax \
  --budget-s "$(($(until_s 390) - 15))" --grace-s 10 > "$L/gpt2.log" 2>&1
echo "$SECONDS s: gpt2 rc $?"
timeout "$(until_s 565)" python3 benchmarks/ncu_kernels.py "$L/ncu" \
  --cases "${CASES:-fwd-d64-full-1k,bwd-d128-full-4k}" --backends flashjax_mosaic --sass \
  > "$L/ncu.log" 2>&1
echo "$SECONDS s: ncu rc $?"
tail -30 "$L/gpt2.log"
cat "$L/ncu/summary.txt" 2>/dev/null || tail -20 "$L/ncu.log"
grep -h -i "spill\|registers" -r "$L/dump" | sort | uniq -c | head -40
ls -la "$L/dump"/* | head -40
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
