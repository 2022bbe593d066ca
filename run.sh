#!/usr/bin/env bash
# flashjax's two commands, set-up included:
#   bash run.sh test  [pytest args]   # CPU tier by default; `bash run.sh test -m gpu` on a GPU
#                                     # (TEST_WORKERS=N pytest-xdist workers, default 2)
#   bash run.sh bench [bench args]    # python -m flashjax bench
# Uses the current python3 when it already has jax 0.11.2 + flax + optax + chex (the GPU image);
# otherwise makes .venv (Python 3.12) with the pinned versions of requirements.txt.
set -euo pipefail
cd "$(dirname "$0")"

have_deps() {
  "$1" - <<'PY' 2>/dev/null
import jax, flax, optax, chex, pytest
assert jax.__version__ == "0.11.2", jax.__version__
PY
}

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif have_deps python3; then
  PY=python3
else
  if [ ! -x .venv/bin/python ]; then
    PYENV_VERSION=3.12.1 python3.12 -m venv .venv
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  PY=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

cmd=${1:-test}
shift || true
case "$cmd" in
  test)
    # Lint fails the run (ruff is pinned in requirements.txt); skipped where ruff is missing
    # (the GPU image).
    if "$PY" -m ruff --version >/dev/null 2>&1; then
      "$PY" -m ruff check . || exit 1
      "$PY" -m ruff format --check . || exit 1
    fi
    # pytest-xdist workers (TEST_WORKERS, default 2; 0: one process): the CPU tier is mostly
    # single-threaded compiling and interpreting. Workers on a GPU share it, a fifth of its
    # memory each unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
    workers=${TEST_WORKERS:-2}
    if [ "$workers" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
      export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.2}
      set -- -n "$workers" --dist worksteal "$@"
    fi
    "$PY" -m pytest -q "$@"
    ;;
  bench)
    "$PY" -m flashjax bench "$@"
    ;;
  *)
    echo "usage: bash run.sh test|bench [args]" >&2
    exit 2
    ;;
esac
