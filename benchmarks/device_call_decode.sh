#!/bin/bash
# One device call: the decode kernel's GPU tests and the decode bench (flashjax contiguous and
# paged beside cuDNN and XLA), about 4 minutes; with TUNE=1 also contiguous against paged tiles
# (benchmarks/tune_decode.py, same loop), with PROFILE=1 the steps' GPU kernels
# (benchmarks/profile_decode.py), with GEN=1 GPT-2 small generation at batch 1 (GEN=32: also
# batch 32), with AB=1 the merge kernel against XLA's merge (benchmarks/merge_ab.py), with
# GPT2=1 GPT-2 small's decode step (12 query / 12 KV heads, head dim 64: bench, kernel profile,
# split sweep); all about 10 minutes. Logs tarred into $OUT/logs.tgz.
# Usage (device tool, from the repo root):
#   COMMIT=<sha> [TUNE=1] [PROFILE=1] [AB=1] [GPT2=1] [GEN=1|32] \
#     bash benchmarks/device_call_decode.sh
source benchmarks/device_setup.sh
L="$OUT/logs"
mkdir -p "$L"
echo "commit $C" > "$L/commit.txt"
export PYTHONPATH=$PYTHONPATH:benchmarks
timeout 150 python3 -m pytest -m gpu tests/test_decode.py tests/test_gpu_lowering.py -q -rfE \
  -p no:cacheprovider > "$L/dtests.log" 2>&1
tune() {  # tune NAME DEADLINE ARGS...
  local name=$1 deadline=$2
  shift 2
  timeout "$(until_s "$deadline")" python3 benchmarks/tune_decode.py "$L/$name.json" "$@" \
    > "$L/$name.log" 2>&1
}
if [ -n "$TUNE" ]; then
  tune tune_c 240 1x8k 1x64k --tiles 128:4:3,64:4:3,64:4:2 --splits 16,33
  tune tune_p16 340 1x8k 1x64k --paged 16 --tiles 64:4:3,128:4:3 --splits 16,33,48
fi
timeout 120 python3 -m flashjax bench --decode --no-flax \
  --max-minutes 1.5 --backends flashjax,flashjax_paged16,flashjax_paged64,jax_cudnn,jax_xla \
  --out "$L/bench" > "$L/decode.log" 2>&1
if [ -n "$AB" ]; then
  timeout 150 python3 benchmarks/merge_ab.py "$L/merge_ab.json" 1x64k 1x8k 8x16k \
    > "$L/merge_ab.log" 2>&1
fi
if [ -n "$PROFILE" ]; then
  timeout 60 python3 benchmarks/profile_decode.py "$L/profile.json" 1x8k 1x64k \
    --steps flashjax,paged16,jax_cudnn > "$L/profile.log" 2>&1
fi
if [ -n "$GPT2" ]; then
  timeout 90 python3 -m flashjax bench --decode --no-flax --heads 12 --kv-heads 12 \
    --head-dims 64 --shapes 1x1k,1x2k,32x2k --max-minutes 1 \
    --backends flashjax,jax_cudnn,jax_xla --out "$L/gpt2_bench" > "$L/gpt2_decode.log" 2>&1
  timeout 60 python3 benchmarks/profile_decode.py "$L/gpt2_profile.json" 1x1k 1x2k \
    --heads 12,12,64 --steps flashjax,jax_cudnn > "$L/gpt2_profile.log" 2>&1
  tune gpt2_splits $((SECONDS + 70)) 1x2k --heads 12,12,64 --tiles 128:4:3,64:4:3 --splits 2,4,8,12,16,24
fi
if [ -n "$GEN" ]; then gen 1 "$L" $((SECONDS + 75)); fi
if [ "$GEN" = 32 ]; then gen 32 "$L" $((SECONDS + 75)); fi
tail -5 "$L/dtests.log"
for f in "$L"/tune_*.log; do [ -f "$f" ] && tail -14 "$f"; done
grep -v "^$" "$L/decode.log" | tail -25
for f in "$L"/gpt2_decode.log; do [ -f "$f" ] && grep -v "^$" "$f" | tail -12; done
for f in "$L"/gpt2_profile.log "$L"/merge_ab.log "$L"/profile.log "$L"/gpt2*.log; do [ -f "$f" ] && tail -40 "$f"; done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
