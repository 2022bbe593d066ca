#!/bin/bash
# One device call (about 9 minutes): the decode kernel's GPU tests, contiguous against paged
# tiles (benchmarks/tune_decode.py, same loop), the decode bench beside cuDNN and XLA, a profile of
# the steps' kernels (benchmarks/profile_decode.py), GPT-2 small
# generation at batch 1 (and 32 with GEN32=1). Logs tarred into $OUT/logs.tgz.
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_decode.sh
source benchmarks/device_setup.sh
L="$OUT/logs"
mkdir -p "$L"
echo "commit $C" > "$L/commit.txt"
timeout 150 python3 -m pytest -m gpu tests/test_decode.py tests/test_gpu_lowering.py -q -rfE \
  -p no:cacheprovider > "$L/dtests.log" 2>&1
export PYTHONPATH=$PYTHONPATH:benchmarks
tune() {  # tune NAME DEADLINE ARGS...
  local name=$1 deadline=$2
  shift 2
  timeout "$(until_s "$deadline")" python3 benchmarks/tune_decode.py "$L/$name.json" "$@" \
    > "$L/$name.log" 2>&1
}
tune tune_c 240 1x8k 1x64k --tiles 128:4:3,64:4:3,64:4:2 --splits 16,33
tune tune_p16 340 1x8k 1x64k --paged 16 --tiles 64:4:3,128:4:3 --splits 16,33,48
timeout "$(until_s 450)" python3 -m flashjax bench --decode --no-flax --max-minutes 2 \
  --backends flashjax,flashjax_paged16,flashjax_paged64,jax_cudnn,jax_xla \
  --out "$L/bench" > "$L/decode.log" 2>&1
timeout "$(until_s 500)" python3 benchmarks/profile_decode.py "$L/profile.json" 1x8k 1x64k \
  --steps flashjax,paged16,jax_cudnn > "$L/profile.log" 2>&1
gen 1 "$L" 575
[ -n "$GEN32" ] && gen 32 "$L" 590
tail -5 "$L/dtests.log"
for f in "$L"/tune_*.log; do tail -14 "$f"; done
grep -v "^$" "$L/decode.log" | tail -25
cat "$L/profile.log"
for f in "$L"/gpt2*.log; do tail -8 "$f"; done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
