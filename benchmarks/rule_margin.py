"""How close a call comes to the tolerance rule (DESIGN.md: max error <= 2x the naive same-dtype
error, 3x for gradients, + a tiny atol), run after run: for a failing GPU test, whether the kernel
is wrong (ratio far above 1 every run), near the bound (ratio about 1), or racy (outputs that
differ run to run, now and then far off).

    python3 benchmarks/rule_margin.py HEAD_DIM ROWS FEATURES [--repeats R] [--no-rules]

FEATURES: the test suite's features joined by '+' (`lengths+softcap`, `causal+segments`). The
call is the one tests/test_mosaic.py::test_every_rule_on_gpu makes (B=1, N=4, keys = rows + 100
unless causal). `--no-rules`: configs.py's rows without their rules (the call's default config).
Prints one line per run and output: error, bound, error / bound, and whether the output is
bitwise the first run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import NAMES, Case, make_inputs, run, run_reference64  # noqa: E402

from pallas_kernels import configs  # noqa: E402


def margins(got, naive, ref64) -> list[tuple[str, float, float]]:
    """(name, error, bound) per output, by helpers.assert_close's rule (non-finite mismatches
    count as an infinite error)."""
    rows = []
    for name, g, n, r in zip(NAMES, got, naive, ref64):
        g, n = np.asarray(g, np.float64), np.asarray(n, np.float64)
        finite = np.isfinite(r)
        if not np.array_equal(np.isfinite(g), finite):
            rows.append((name, float("inf"), 0.0))
            continue
        err = float(np.max(np.abs(g[finite] - r[finite]), initial=0.0))
        naive_err = float(np.max(np.abs(n[finite] - r[finite]), initial=0.0))
        factor = 2.0 if name in ("out", "lse") else 3.0
        atol = 1e-5 * max(1.0, float(np.max(np.abs(r[finite]), initial=0.0)))
        rows.append((name, err, factor * naive_err + atol))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("head_dim", type=int)
    p.add_argument("rows", type=int)
    p.add_argument("features")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-rules", action="store_true")
    args = p.parse_args()
    features = tuple(args.features.split("+"))
    if args.no_rules:
        for table in (configs.MOSAIC_FORWARD, configs.MOSAIC_BACKWARD):
            for h, row in table.items():
                table[h] = dataclasses.replace(row, rules=())
    keys = args.rows if "causal" in features else args.rows + 100
    case = Case(B=1, T=args.rows, S=keys, N=4, K=4, H=args.head_dim, features=features)
    q, k, v, dout, kw = make_inputs(case)
    naive, ref64 = run("xla", q, k, v, dout, kw), run_reference64(q, k, v, dout, kw)
    tag = f"{case.id} rules={'off' if args.no_rules else 'on'}"
    first = None
    for i in range(args.repeats):
        got = [np.asarray(x) for x in run("mosaic", q, k, v, dout, kw)]
        first = first or got
        for (name, err, bound), g, f in zip(margins(got, naive, ref64), got, first):
            same = np.array_equal(g, f, equal_nan=True)
            print(
                f"{tag} run {i} {name:3s} err {err:.3e} bound {bound:.3e} "
                f"ratio {err / bound if bound else float('inf'):.3f} same_as_run0 {same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
