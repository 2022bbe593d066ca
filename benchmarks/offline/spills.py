"""Which of configs.py's Mosaic kernels spill registers, offline: every config the public op picks
at the bench's shapes (head dims 64/128/256, causal and not, 512..16k rows), each compiled once
for the H200 by `dump.py` in its own process, with ptxas' spill bytes per kernel and, per loop of
its SASS that issues wgmmas (`sass_mix.loops`), the spill reloads and stores (LDL / STL) and the
instruction count: a reload inside a key loop runs every step.

Session 26 found this way that the kernels' hoisted position tiles spilled in causal calls
(forward with overlap_qk at head dim 128: 180 bytes, none once they were made per step).
Usage, from the repo root, with the offline venv (about a minute per config on two cores):
  PATH=/usr/local/cuda/bin:$PATH PYTHONPATH=.:benchmarks .sm90venv/bin/python \
      benchmarks/offline/spills.py OUT_DIR [--head-dims 64,128] [--jobs 2]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SEQS = (512, 1024, 2048, 4096, 8192, 16384)
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
FUNCTION = re.compile(r"Function properties for (\w+)")


def distinct_calls(head_dims) -> dict[tuple, tuple[str, int, int, bool]]:
    """(kernel, head dim, causal, config) -> the first call (kernel, head dim, seq, causal)
    that picks it: each config compiled once."""
    from pallas_kernels import configs
    from pallas_kernels.mosaic import api

    calls = {}
    for head_dim in head_dims:
        for causal in (False, True):
            for seq in SEQS:
                calls.setdefault(
                    ("fwd", head_dim, causal, api.forward_config(head_dim, seq, causal)),
                    ("fwd", head_dim, seq, causal),
                )
                if head_dim not in configs.MOSAIC_BACKWARD_ON_TRITON:
                    calls.setdefault(
                        ("bwd", head_dim, causal, api.backward_config(head_dim, seq, causal)),
                        ("bwd", head_dim, seq, causal),
                    )
    return calls


def compile_one(out: pathlib.Path, call) -> tuple[str, str]:
    """dump.py for one call in its own process; (its folder's name, its stdout + stderr)."""
    kernel, head_dim, seq, causal = call
    name = f"{kernel}-d{head_dim}-{seq}-{'causal' if causal else 'full'}"
    cmd = [sys.executable, str(HERE / "dump.py"), str(out / name), kernel]
    cmd += ["--head-dim", str(head_dim), "--seq", str(seq)] + (["--causal"] if causal else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    return name, done.stdout + done.stderr


def loop_spills(sass: pathlib.Path) -> list[str]:
    """Per wgmma loop of a SASS listing: "N instr, L LDL, S STL"."""
    import sass_mix

    rows, labels = sass_mix.instructions(sass.read_text(errors="replace"))
    found = []
    for start, end in sass_mix.loops(rows, labels):
        mix = collections.Counter(op.split(".")[0] for a, op, _ in rows if start <= a <= end)
        if mix["HGMMA"]:
            found.append(f"{sum(mix.values())} instr, {mix['LDL']} LDL, {mix['STL']} STL")
    return found


def report(out: pathlib.Path, name: str, text: str) -> list[str]:
    """One config's lines: each kernel's spill bytes, then its loops' reloads."""
    lines = [name]
    function = None
    for line in text.splitlines():
        if m := FUNCTION.search(line):
            function = m.group(1)
        elif (m := SPILL.search(line)) and function is not None and "warning" not in line:
            lines.append(f"  {function}: {m.group(1)} B spill stores, {m.group(2)} B loads")
    if len(lines) == 1:
        lines.append("  failed: " + " | ".join(text.strip().splitlines()[-3:]))
    for sass in sorted((out / name).glob("*.sass")):
        for loop in loop_spills(sass)[:4]:  # the innermost come first
            lines.append(f"    {sass.stem} loop: {loop}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--head-dims", default="64,128,256")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    import offline  # noqa: F401  (before jax: the compile-only environment)

    calls = distinct_calls([int(d) for d in args.head_dims.split(",")])
    print(f"{len(calls)} distinct configs", flush=True)
    summary = args.out / "spills.txt"
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool, open(summary, "w") as f:
        for (*_, cfg), (name, text) in zip(
            calls, pool.map(lambda c: compile_one(args.out, c), calls.values())
        ):
            lines = report(args.out, name, text) + [f"  {cfg}"]
            print("\n".join(lines), flush=True)
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
