"""Where a kernel's warps wait, from ncu's source page (`ncu_kernels.py --sass`: one CSV line per
SASS instruction with its warp-stall samples and execution count), on this machine.

For each CSV (plain or .gz): the instructions executed by opcode (the instruction mix: two
kernels doing the same math differ in their bookkeeping), and the most-sampled instructions with
the few before them (a spin loop's `BRA` only says a wait; the `TRYWAIT` before it names the
barrier, the `UTMALDG` before that what it waits for).

Usage: python benchmarks/sass_stalls.py FILE.csv[.gz] ... [--top 12] [--context 4]
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
# Shared-memory wavefronts of the LSU's instructions: their count, the count without bank
# conflicts, and the difference. Unlike the kernel-wide `l1tex__data_bank_conflicts_*` metrics,
# which also count the LSU waiting on the banks for other units (TMA, wgmma operand reads), these
# are the instruction's own conflicts.
WAVEFRONTS = "L1 Wavefronts Shared"
EXCESSIVE = "L1 Wavefronts Shared Excessive"


def instructions(path: Path) -> list[dict[str, str]]:
    """The CSV's instruction lines (the lines under an "Address" header that have an address),
    in address order, as dicts by column name."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows, header = [], None
        for r in csv.reader(f):
            if r and r[0] == "Address":
                header = r
            elif header and len(r) == len(header) and r[0].startswith("0x"):
                rows.append(dict(zip(header, r)))
    return rows


def opcode(source: str) -> str:
    """`@!P1 BRA 0x...` -> `BRA`; `HGMMA.64x64x16.F32.BF16 ...` -> `HGMMA`."""
    words = [w for w in source.split() if not w.startswith("@")]
    return words[0].split(".")[0] if words else ""


def _count(row: dict[str, str], column: str) -> int:
    """A counter column of the row (ncu writes thousands separators; empty is 0)."""
    return int(float(row.get(column, "").replace(",", "") or 0))


def shared_wavefronts(rows: list[dict[str, str]]) -> list[str]:
    """Shared-memory wavefronts by opcode (all, and the excess over a conflict-free access),
    and the instructions with the most excess; none where the page has no such columns."""
    if not rows or WAVEFRONTS not in rows[0]:
        return []
    total, excess = collections.Counter(), collections.Counter()
    for r in rows:
        total[opcode(r["Source"])] += _count(r, WAVEFRONTS)
        excess[opcode(r["Source"])] += _count(r, EXCESSIVE)
    lines = [
        "  shared wavefronts (excess) by opcode: "
        + ", ".join(f"{op} {n:,} ({excess[op]:,})" for op, n in total.most_common(6) if n)
    ]
    worst = sorted(rows, key=lambda r: -_count(r, EXCESSIVE))[:4]
    for r in worst:
        if _count(r, EXCESSIVE):
            lines.append(
                f"    {r['Source'].strip()[:60]:60s} wavefronts {_count(r, WAVEFRONTS):,} "
                f"excess {_count(r, EXCESSIVE):,}"
            )
    return lines


def report(path: Path, top: int, context: int) -> str:
    rows = instructions(path)
    samples = [int(r[SAMPLES]) for r in rows]
    total = sum(samples) or 1
    mix = collections.Counter()
    for r in rows:
        mix[opcode(r["Source"])] += int(r[EXECUTED])
    lines = [
        f"== {path.name}: {len(rows)} instructions, {sum(samples)} stall samples",
        "  executed by opcode: " + ", ".join(f"{op} {n:,}" for op, n in mix.most_common(16)),
    ]
    lines += shared_wavefronts(rows)
    hottest = sorted(range(len(rows)), key=lambda i: -samples[i])[:top]
    for i in sorted(hottest):
        lines.append(f"  -- #{i}: {100 * samples[i] / total:.1f}% of samples")
        for j in range(max(0, i - context), i + 1):
            r = rows[j]
            lines.append(
                f"    {j:5d} {r['Source'].strip()[:80]:80s} exec {int(r[EXECUTED]):>9,} "
                f"samples {samples[j]}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=12, help="most-sampled instructions shown")
    p.add_argument("--context", type=int, default=4, help="instructions shown before each")
    args = p.parse_args(argv)
    for path in args.files:
        print(report(path, args.top, args.context))


if __name__ == "__main__":
    main()
