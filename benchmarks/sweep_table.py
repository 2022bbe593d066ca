"""The standard sweep's table for a results README: `python benchmarks/sweep_table.py CSV...`
(the `bench/bench.csv` of one or more `python -m flashjax bench` runs of the same session) prints
a markdown table, a row per (head dim, causal, seq): TFLOP/s forward / backward of flashjax's
Mosaic kernels, cuDNN and tokamax's Mosaic kernels, the ratios against both anchors (forward,
backward and, against cuDNN, fwd+bwd) and the forward's share of the matmul ceiling measured in
the same run.
"""

from __future__ import annotations

import csv
import sys

OURS, CUDNN, TOKAMAX = "flashjax_mosaic", "jax_cudnn", "tokamax_mosaic"
MODES = ("fwd", "bwd", "fwd+bwd")


def _seq(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 else str(n)


def load(paths: list[str]) -> dict[tuple, dict]:
    """(head dim, causal, seq, backend, mode) -> the csv row, for rows that ran."""
    rows = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["status"] == "ok":
                    key = (int(r["head_dim"]), r["causal"] == "True", int(r["seq_q"]))
                    rows[(*key, r["backend"], r["mode"])] = r
    return rows


def table(rows: dict[tuple, dict]) -> list[str]:
    shapes = sorted({key[:3] for key in rows})
    lines = [
        "| head dim | causal | seq | flashjax fwd / bwd | cuDNN fwd / bwd "
        "| tokamax Mosaic fwd / bwd | fwd, bwd, fwd+bwd vs cuDNN | fwd, bwd vs tokamax "
        "| fwd / ceiling |",
        "|---:|---|---:|---|---|---|---|---|---:|",
    ]

    def tf(shape, backend, mode) -> float | None:
        r = rows.get((*shape, backend, mode))
        return float(r["tflops"]) if r else None

    def pair(shape, backend) -> str:
        values = (tf(shape, backend, mode) for mode in MODES[:2])
        return " / ".join(f"{x:.0f}" if x else "-" for x in values)

    def ratios(shape, anchor, modes) -> str:
        out = []
        for m in modes:
            a, b = tf(shape, OURS, m), tf(shape, anchor, m)
            out.append(f"{a / b:.2f}" if a and b else "-")
        return ", ".join(out)

    for shape in shapes:
        d, causal, seq = shape
        fwd = rows.get((*shape, OURS, "fwd"))
        share = f"{float(fwd['frac_of_ceiling']):.2f}" if fwd else "-"
        lines.append(
            f"| {d} | {'yes' if causal else 'no'} | {_seq(seq)} | {pair(shape, OURS)} "
            f"| {pair(shape, CUDNN)} | {pair(shape, TOKAMAX)} | {ratios(shape, CUDNN, MODES)} "
            f"| {ratios(shape, TOKAMAX, MODES[:2])} | {share} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(table(load(sys.argv[1:]))))
