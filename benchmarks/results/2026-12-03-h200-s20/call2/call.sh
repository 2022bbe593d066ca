#!/bin/bash
# Session 20 call 2 (temporary): forward sweeps of 240/24 on configs.py's choice (interleaved),
# then the standard bench at head dims 128,64 with the candidate rules (cand_s20's configs.py).
source benchmarks/device_setup.sh
L="$OUT/logs"; mkdir -p "$L"; echo "commit $C (bench: cand_s20 rules)" > "$L/commit.txt"
for sweep in $SWEEPS; do
  IFS=: read -r dims only seq <<< "$sweep"
  name="tune_${dims}_${only}_$seq"
  PYTHONPATH=$PYTHONPATH:benchmarks timeout "$(until_s 250)" python3 benchmarks/tune_mosaic.py \
    "$L/$name.json" $dims --only "$only" --seq "$seq" --with configured --registers 240,24 \
    > "$L/$name.log" 2>&1
  grep -A3 BEST "$L/$name.log"
done
cd cand_s20 && timeout "$(until_s 585)" python3 -m flashjax bench \
  --head-dims 128,64 --backends flashjax_mosaic,jax_cudnn,tokamax_mosaic \
  --max-minutes "$(( ($(until_s 520)) / 6 ))e-1" --commit "$C-cand" --out "$L/bench" \
  > "$L/bench.log" 2>&1
cd ..; tail -45 "$L/bench.log"
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
