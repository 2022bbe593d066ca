#!/bin/bash
# One device call (about 7 minutes): the decode kernel's GPU tests, the decode bench beside cuDNN
# and XLA, GPT-2 small generation at batch 1 and 32, and contiguous against paged tiles at 1 x 8k
# (benchmarks/tune_decode.py, same loop). Logs tarred into $OUT/logs.tgz.
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_decode.sh
source benchmarks/device_setup.sh
L="$OUT/logs"
mkdir -p "$L"
echo "commit $C" > "$L/commit.txt"
timeout 150 python3 -m pytest -m gpu tests/test_decode.py tests/test_gpu_lowering.py -q -rfE \
  -p no:cacheprovider > "$L/dtests.log" 2>&1
timeout "$(until_s 300)" python3 -m flashjax bench --decode --no-flax --max-minutes 2 \
  --backends flashjax,flashjax_paged16,flashjax_paged64,jax_cudnn,jax_xla \
  --out "$L/bench" > "$L/decode.log" 2>&1
gen 1 "$L" 360
gen 32 "$L" 420
export PYTHONPATH=$PYTHONPATH:benchmarks
timeout "$(until_s 470)" python3 benchmarks/tune_decode.py "$L/tune_c.json" 1x8k \
  --tiles 128:4:3,64:4:3 --splits 8,16,33,48 > "$L/tune_c.log" 2>&1
timeout "$(until_s 530)" python3 benchmarks/tune_decode.py "$L/tune_p16.json" 1x8k --paged 16 \
  --tiles 128:4:3,64:4:3,64:4:2,32:4:4 --splits 8,16,33,48 > "$L/tune_p16.log" 2>&1
tail -5 "$L"/dtests.log; grep -v "^$" "$L/decode.log" | tail -25; tail -8 "$L"/gpt2*.log
tail -12 "$L"/tune_*.log
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
