#!/bin/bash
# One device call on nvidia-h200-x2 (about 7 minutes, `run` with timeout_s 600, carry .tokamax):
# the follow-up checks of session 6, each cut by its own time limit:
# 1. the forward's folded scale against the float64 reference on the GPU (`-m gpu_schedules`);
# 2. the Mosaic forward with each on/off option flipped from configs.py's choice, head dims 64
#    and 128 (benchmarks/tune_mosaic.py --toggles --only fwd);
# 3. the decode split rule: `bench --decode` at every bar shape, contiguous and paged;
# 4. ring attention against the all-gather baseline on both GPUs: 128k rows per GPU full, then
#    32k causal and full with the profile.
# Usage (device tool, from the repo root):
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/device_call_followup.sh
source benchmarks/device_setup.sh
mkdir -p "$OUT/logs"
L=$OUT/logs
echo "commit $C" > "$L/commit.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$L/gpus.txt"
timeout 60 python3 -m pytest -m gpu_schedules tests/ -k fold_scale -v -rfE -p no:cacheprovider \
  -o faulthandler_timeout=50 > "$L/gpu_schedules.log" 2>&1
tail -3 "$L/gpu_schedules.log"
PYTHONPATH=$PYTHONPATH:benchmarks timeout "$(until_s 170)" python3 benchmarks/tune_mosaic.py \
  "$L/tune_toggles.json" 64 128 --toggles --only fwd > "$L/tune_toggles.log" 2>&1
grep -A4 BEST "$L/tune_toggles.log" | grep -v "^--" | cut -c1-220
timeout "$(until_s 260)" python3 -m flashjax bench --decode --no-flax \
  --shapes 1x8k,1x64k,8x16k,32x8k,64x4k \
  --backends flashjax,flashjax_paged16,flashjax_paged64,jax_cudnn,jax_xla --max-minutes 1.2 \
  --commit "$C" --out "$L/decode" > "$L/decode.log" 2>&1
grep -A14 "^shape" "$L/decode.log" | head -30
timeout "$(until_s 340)" python3 -m flashjax bench --ring --seqs-per-device 128k --masks full \
  --modes fwd,fwd+bwd --impls ring,all_gather --studies scaling --reps 3 --warmup 1 \
  --commit "$C" --out "$L/ring128kfull" > "$L/ring128kfull.log" 2>&1
grep -E "^(ring|all_gather) " "$L/ring128kfull.log"
timeout "$(until_s 450)" python3 -m flashjax bench --ring --seqs-per-device 32k --masks causal,full \
  --impls ring,all_gather,single --studies scaling --profile --commit "$C" --out "$L/ring32k" \
  > "$L/ring32k.log" 2>&1
grep -E "^(ring|all_gather|single) " "$L/ring32k.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
