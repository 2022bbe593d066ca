#!/bin/bash
# Sourced by the benchmarks/device_call*.sh scripts on the device machine: unbuffered Python, the
# commit being run (the device copy has no .git), tokamax from its wheels when `.tokamax` was
# carried, and `until_s MARK` (seconds left until MARK seconds since the start, at least 5).
export PYTHONUNBUFFERED=1
C=${COMMIT:?set COMMIT to the commit being run (the device copy has no .git)}
if [ -d .tokamax ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tk .tokamax/*.whl &&
    cp -r .tokamax/stub/xprof /tmp/tk/
fi
export PYTHONPATH=.:/tmp/tk
until_s() { local t=$(($1 - SECONDS)); echo $((t > 5 ? t : 5)); }
