#!/bin/bash
# One device call on nvidia-h200-x2 (about 9 minutes, `run` with timeout_s 600; carry .tokamax):
# the end-to-end measurements of issues 9-11 in one go, two GPUs busy at once, then both:
#   GPU 0: GPT-2 training end to end at seq 1024, small and medium, with and without packed
#          segments, flashjax against cuDNN (issue 9);
#   GPU 1: the decode bench (issue 10; all shapes, paged caches), then GPT-2 small generation at
#          batch 1 and 32 (1k prompt + 1k new tokens; flashjax / XLA / cuDNN);
# then the ring's pair dispatch A/B at 32k per GPU (issue 11): "ring" (lax.switch per pair)
# against "ring_kernel" (no conditionals) beside one GPU on the whole sequence.
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_s8.sh
source benchmarks/device_setup.sh
L="$OUT/logs"
mkdir -p "$L"
echo "commit $C" > "$L/commit.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$L/gpus.txt"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 310 python3 -m examples.gpt2.bench --out "$L/gpt2" --only throughput \
    --throughput small:1024,medium:1024 --backends cudnn,flashjax --budget-s 290 --grace-s 10 \
    > "$L/gpt2.log" 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 150 python3 -m flashjax bench --decode --no-flax --max-minutes 1.5 --commit "$C" \
    --out "$L/decode" > "$L/decode.log" 2>&1
  gen 1 "$L" 235
  gen 32 "$L" 310
) &
wait
timeout "$(until_s 545)" python3 -m flashjax bench --ring --seqs-per-device 32k \
  --masks causal,full --impls single,ring,ring_kernel --studies scaling \
  --max-minutes "$(( ($(until_s 530)) / 6 ))e-1" --commit "$C" --out "$L/ring_ab" \
  > "$L/ring_ab.log" 2>&1
for f in gpt2.log decode.log gpt2-generate-b1.log gpt2-generate-b32.log ring_ab.log; do
  echo "== $f"; tail -22 "$L/$f"
done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
