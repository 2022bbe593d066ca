#!/bin/bash
# One device call on nvidia-h200-x2 (about 9.3 minutes, `run` with timeout_s 590; carry .tokamax)
# for the measurements issues 9-11 ask for, two GPUs busy at once:
#   GPU 0: the decode bench (issue 10; all shapes, paged caches, the Flax study), then GPT-2
#          small text generation at batch 1 and 32 (1k prompt + 1k new tokens, flashjax / XLA /
#          cuDNN);
#   GPU 1: GPT-2 training end to end at seq 1024, small and medium, with and without packed
#          segments, flashjax against cuDNN (issue 9);
# then both: the all-gather baseline's forward+backward (issue 11) beside one GPU.
# Usage (device tool, from the repo root):
#   COMMIT=<sha> bash benchmarks/device_call_measure.sh
source benchmarks/device_setup.sh
L="$OUT/logs"
mkdir -p "$L"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$L/gpus.txt"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 -m flashjax bench --decode --max-minutes 2 --commit "$C" \
    --out "$L/decode" > "$L/decode.log" 2>&1
  gen 1 "$L" 330
  gen 32 "$L" 410
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 410 python3 -m examples.gpt2.bench --out "$L/gpt2" --only throughput \
    --throughput small:1024,medium:1024 --backends cudnn,flashjax --budget-s 390 --grace-s 10 \
    > "$L/gpt2.log" 2>&1
) &
wait
timeout "$(until_s 555)" python3 -m flashjax bench --ring --seqs-per-device 32k \
  --masks causal,full --impls single,all_gather --studies scaling --max-minutes 1.5 \
  --commit "$C" --out "$L/ring_ag" > "$L/ring_ag.log" 2>&1
for f in decode.log gpt2-generate-b1.log gpt2-generate-b32.log gpt2.log ring_ag.log; do
  echo "== $f"; tail -25 "$L/$f"
done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
