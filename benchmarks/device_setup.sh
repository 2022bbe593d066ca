#!/bin/bash
# Sourced by the benchmarks/device_call*.sh scripts on the device machine: unbuffered Python, the
# commit being run (the device copy has no .git), tokamax from its wheels when `.tokamax` was
# carried, `until_s MARK` (seconds left until MARK seconds since the start, at least 5),
# `gpu_tier LIMIT LOG` (the GPU test tier) and `gen BATCH DIR DEADLINE` (GPT-2 small generation).
export PYTHONUNBUFFERED=1
# COMMIT=<sha>: the commit being run, as `git rev-parse --short HEAD` reads it on this side (the
# device copy has no .git, or a stale one: `$(git rev-parse ...)` in the command reads that).
C=${COMMIT:?set COMMIT to the commit being run (the device copy has no .git, or a stale one)}
export FLASHJAX_COMMIT=$C  # what the bench writes into its results (flashjax.bench.machine)
if [ -d .tokamax ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tk .tokamax/*.whl &&
    cp -r .tokamax/stub/xprof /tmp/tk/
fi
export PYTHONPATH=.:/tmp/tk
until_s() { local t=$(($1 - SECONDS)); echo $((t > 5 ? t : 5)); }
# The GPU tier (`pytest -m gpu`) in 4 pytest-xdist workers sharing the GPU (a fifth of its memory
# each): compiling dominates and runs on the host's cores. Each line of LOG carries the seconds
# since the start. TIER_K: only the tests `pytest -k` selects with it (e.g. the rules a commit
# changed: TIER_K="every_rule_on_gpu and pair_tiles").
gpu_tier() {
  local limit=$1 log=$2
  stamp() { while IFS= read -r l; do echo "$SECONDS $l"; done; }
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout "$limit" python3 -m pytest -m gpu tests -n 4 \
    ${TIER_K:+-k "$TIER_K"} \
    -v -rfE --durations=15 -p no:cacheprovider -o faulthandler_timeout="$((limit - 20))" 2>&1 |
    stamp > "$log"
}
# GPT-2 small generation at batch BATCH, 1k prompt + 1k new tokens, every attention (and `none`,
# the floor without attention) until DEADLINE seconds since the start; log and JSON in DIR.
gen() {
  timeout "$(until_s "$3")" python3 -m examples.gpt2.generate --random-init --config small \
    --max-seq-len 2048 --prompt-len 1024 --new-tokens 1024 --batch-size "$1" \
    --attention flashjax,xla,cudnn,none --repeats 3 --json "$2/gpt2-generate-b$1.json" \
    > "$2/gpt2-generate-b$1.log" 2>&1
}
