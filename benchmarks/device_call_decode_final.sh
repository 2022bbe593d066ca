#!/bin/bash
# One short device call (about 4 minutes; 6 with PROFILE=1 GEN=1): the decode kernel's GPU tests,
# the decode bench (flashjax contiguous and paged beside cuDNN), with PROFILE=1 a profile of the
# 1 x 64k and 1 x 8k steps' kernels, with GEN=1 GPT-2 small generation at batch 1. Logs tarred
# into $OUT/logs.tgz.
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_decode_final.sh
source benchmarks/device_setup.sh
L="$OUT/logs"
mkdir -p "$L"
echo "commit $C" > "$L/commit.txt"
timeout 140 python3 -m pytest -m gpu tests/test_decode.py -q -rfE -p no:cacheprovider \
  > "$L/dtests.log" 2>&1
timeout "$(until_s 260)" python3 -m flashjax bench --decode --no-flax --max-minutes 1.5 \
  --backends flashjax,flashjax_paged16,flashjax_paged64,jax_cudnn \
  --out "$L/bench" > "$L/decode.log" 2>&1
export PYTHONPATH=$PYTHONPATH:benchmarks
if [ -n "$PROFILE" ]; then
  timeout "$(until_s 290)" python3 benchmarks/profile_decode.py "$L/profile.json" 1x64k 1x8k \
    --steps flashjax,paged16 > "$L/profile.log" 2>&1
fi
if [ -n "$GEN" ]; then gen 1 "$L" 360; fi
tail -4 "$L/dtests.log"
grep -v "^$" "$L/decode.log" | tail -22
cat "$L"/profile.log 2>/dev/null
tail -8 "$L"/gpt2-generate-b1.log 2>/dev/null
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
