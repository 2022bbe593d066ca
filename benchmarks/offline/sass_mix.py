"""The instruction mix of each loop in a SASS listing (`dump.py`'s `*.sass`): for every backward
branch, the instructions between its target and itself by opcode (modifiers dropped), so that a
kernel change's cost in issue slots per key step (MUFU for exp2, FFMA / FMNMX / FADD for the
softmax, HGMMA and the barriers) can be compared offline, before any GPU time.
Usage: python benchmarks/offline/sass_mix.py FILE.sass [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import re

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^\.(L_x_\d+):")


def instructions(text: str):
    """(address, opcode, operands) of each instruction, and the address of each label."""
    rows, labels, pending = [], {}, []
    for line in text.splitlines():
        if m := LABEL.match(line.strip()):
            pending.append(m.group(1))
            continue
        if m := LINE.search(line):
            address = int(m.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            rows.append((address, m.group(2), m.group(3)))
    return rows, labels


def loops(rows, labels):
    """(start, end) addresses of every backward branch's loop."""
    spans = []
    for address, opcode, operands in rows:
        if opcode.startswith("BRA") and (m := re.search(r"\.(L_x_\d+)", operands)):
            target = labels.get(m.group(1))
            if target is not None and target < address:
                spans.append((target, address))
    return spans


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("sass")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    rows, labels = instructions(open(args.sass, errors="replace").read())
    for start, end in loops(rows, labels):
        body = [opcode.split(".")[0] for a, opcode, _ in rows if start <= a <= end]
        mix = collections.Counter(body)
        if mix["HGMMA"] == 0:
            continue  # a wait loop (barrier polling), not a key step
        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(args.top))
        print(f"loop {start:#06x}-{end:#06x}: {len(body)} instructions: {top}")


if __name__ == "__main__":
    main()
