#!/bin/bash
# One device call (about 9.5 minutes, `run` with timeout_s 600): the Mosaic kernels' on/off
# options, the candidates timed interleaved over rounds (benchmarks/tune_mosaic.py: forward
# SCHEDULES, backward BWD_SCHEDULES). First, those options against the float64 reference on
# feature-rich cases (`pytest -m gpu_schedules`, `-k "$K"` when K is set; none with K=none), in 4
# pytest-xdist workers as the GPU tier (compiling dominates; a fifth of the GPU's memory each).
# Each sweep candidate is also checked against configs.py's choice; a hang shows in the log as
# the last "checked" line.
# SWEEPS: space-separated DIMS:ONLY:SEQ[:tiles[:with[:group[:retile[:causal]]]]] (ONLY fwd, bwd
# or empty for both; tiles: the tile grid too; with: that sweep's option sets only those that
# include this option; group: query heads per KV head of its shape, tune_mosaic.py --group,
# default GROUP; retile: QxKVxST, that sweep's RETILE, e.g. 128:fwd:4096::configured::64x128x3;
# causal: yes or no, one mode only, e.g. 128:fwd:512:::8::yes), run in
# order within the time left; default one sweep of head dims 128, 64, 256 at 8k, both kernels.
# WITH: the `with` of every sweep that names none. REGISTERS (C,P): every sweep's candidates also
# with that setmaxnreg split (tune_mosaic.py --registers); with `configured` as a sweep's `with`,
# configs.py's choice against its copy alone, e.g. SWEEPS="128:bwd:4096::configured". GROUP:
# the `group` of every sweep that names none (`pack_heads` needs 2+), e.g.
# SWEEPS="128:fwd:256::pack_heads:8 128:bwd:4096:tiles". FMA_COLUMNS (N,...): every exp2_fma
# candidate also with that many columns on the FMA pipe (tune_mosaic.py --fma-columns). RETILE
# (Q:KV:ST): every forward candidate also with those tiles (tune_mosaic.py --retile), e.g.
# RETILE=64:64:2 SWEEPS="256:fwd:4096::configured". ALSO (an on/off option): every candidate
# also with it on (tune_mosaic.py --also), e.g. ALSO=row_stats SWEEPS="128:bwd:2048::configured".
# REPRO_SETS (forward option sets, e.g. "named_free,named_barriers"): first, each set run alone
# in its own process at REPRO_AT ("HEAD_DIM SEQ", default "128 1024"), causal and not, against
# the default forward (benchmarks/repro_overlap.py: a fault kills only that process).
# DEADLINE (s, default 585): no sweep runs past it. TIER (seconds): first, the whole GPU tier
# (`gpu_tier`) within that limit (TIER_K: only its tests that `pytest -k` selects). BENCH: then one
# `python -m flashjax bench` with these arguments (e.g. the anchors of a sweep's shapes), within
# BENCH_S seconds (default 150).
# Usage (device tool, from the repo root):
#   COMMIT=<sha> [TIER=270] [BENCH="--head-dims 256 --seqlens 4096"] [BENCH_S=150] [K=async_store] [SWEEPS="64:fwd:1024:tiles 128:bwd:4096"] \
#     [WITH=async_store] [REGISTERS=240,24] [GROUP=8] [REPRO_SETS=named_free] [FMA_COLUMNS=16,24] \
#     [RETILE=64:64:2] [ALSO=row_stats] \
#     bash benchmarks/device_call_tune.sh
source benchmarks/device_setup.sh
export PYTHONPATH=$PYTHONPATH:benchmarks
L="$OUT/logs"
mkdir -p "$L"
echo "commit $C" > "$L/commit.txt"
if [ -n "$TIER" ]; then
  gpu_tier "$TIER" "$L/gpu_tier.log"
  grep -E "FAILED|ERROR|passed|failed" "$L/gpu_tier.log" | tail -20
fi
if [ -n "$BENCH" ]; then
  timeout "${BENCH_S:-150}" python3 -m flashjax bench $BENCH --no-ncu --commit "$C" --out "$L/bench" \
    > "$L/bench.log" 2>&1
  tail -30 "$L/bench.log"
fi
if [ -n "$REPRO_SETS" ]; then
  REPRO_SETS=$REPRO_SETS REPRO_REPS=${REPRO_REPS:-3} timeout 120 python3 \
    benchmarks/repro_overlap.py ${REPRO_AT:-128 1024} > "$L/repro.log" 2>&1
  cat "$L/repro.log"
fi
rc=0
if [ "$K" != none ]; then  # K=none: no schedule tests
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout 200 python3 -m pytest -m gpu_schedules tests/ -n 4 \
    ${K:+-k "$K"} -v -rfE -p no:cacheprovider -o faulthandler_timeout=180 > "$L/gpu_schedules.log" 2>&1
  rc=$?
  grep -E "FAILED|ERROR|passed|failed" "$L/gpu_schedules.log" | tail -20
fi
# WITHOUT (an option): every sweep leaves out the candidates with it on. Set it by hand, or it is
# set to named_barriers when a K-filtered schedule run timed out (a hang there would hang the
# sweeps too; an unfiltered run is long enough to time out without one).
if [ -n "$K" ] && [ $rc = 124 ]; then
  WITHOUT=${WITHOUT:-named_barriers}
  echo "schedule tests timed out: sweeps without $WITHOUT"
fi
for sweep in ${SWEEPS:-128,64,256::8192}; do
  IFS=: read -r dims only seq tiles with group retile causal <<< "$sweep"
  with=${with:-$WITH}
  group=${group:-$GROUP}
  retile=${retile:-$RETILE}
  retile=${retile//x/:}
  name="tune_${dims//,/-}_${only:-both}_$seq${with:+_$with}${group:+_g$group}${retile:+_${retile//:/x}}${causal:+_causal-$causal}"
  timeout "$(until_s "${DEADLINE:-585}")" python3 benchmarks/tune_mosaic.py "$L/$name.json" ${dims//,/ } \
    ${only:+--only "$only"} --seq "$seq" ${tiles:+--tiles} ${with:+--with "$with"} \
    ${WITHOUT:+--without "$WITHOUT"} ${REGISTERS:+--registers "$REGISTERS"} \
    ${group:+--group "$group"} ${FMA_COLUMNS:+--fma-columns "$FMA_COLUMNS"} ${retile:+--retile "$retile"} \
    ${causal:+--causal "$causal"} ${ALSO:+--also "$ALSO"} > "$L/$name.log" 2>&1
  grep -A4 BEST "$L/$name.log"
done
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
