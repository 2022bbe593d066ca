"""ptxas' register and spill report of Mosaic backward configs, each beside its time.

For each named option set (head dim D, the standard shape at T rows: B*T = 16k, N*D = 2048),
compiles `api.backward` with Mosaic's dumps on (MOSAIC_GPU_DUMP_PTXAS, MOSAIC_GPU_DUMP_TO: one
folder per config, each in its own process so no kernel is cached), prints ptxas' lines about
registers, spills and stack, and the backward's median time. It answers whether a config's
kernels spill (HOPPER_PLAN 7f: the 5-GEMM backward at head dim 128 loses to the two kernels,
"the float32 dQ part ... spills or stalls?").
Usage on the GPU:
  python benchmarks/ptxas_report.py OUT_DIR [--head-dim 128] [--seq 4096] [--causal]
      [--sets default,fused_dq+pooled_dq+split_dq+early_dp+overlap_dv+no_pingpong+no_auto_barriers]
      [--registers 240,24]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import subprocess
import sys

FUSED = "fused_dq+pooled_dq+split_dq+early_dp+overlap_dv+no_pingpong+no_auto_barriers"


def worker(head_dim: int, seq: int, causal: bool, options: str, registers: str | None) -> None:
    """Compile and time one backward config in this process."""
    import jax
    from tune import operands, timeit

    from pallas_kernels.mosaic import api
    from pallas_kernels.mosaic.backward import with_options

    ops, do = operands(seq, head_dim, causal)
    out, lse2 = api.forward(ops, interpret=False)
    cfg = api.backward_config(head_dim)
    if options != "default":
        cfg = with_options(cfg, options.split("+"))
    if registers:  # consumers' and producer's setmaxnreg, e.g. FA3's 240,24
        cfg = dataclasses.replace(cfg, registers=tuple(int(x) for x in registers.split(",")))
    fn = jax.jit(lambda ops, out, lse2, do: api.backward(ops, out, lse2, do, None, False, cfg))
    seconds = timeit(fn, ops, out, lse2, do, reps=10)
    print(f"TIME {seconds * 1e3:.3f} ms {cfg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--sets", default=f"default,{FUSED}")
    p.add_argument("--registers", help="consumer,producer setmaxnreg (e.g. 240,24)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.head_dim, args.seq, args.causal, args.worker, args.registers)
        return
    for options in args.sets.split(","):
        folder = os.path.join(args.out, options.replace("+", "_")[:80])
        os.makedirs(folder, exist_ok=True)
        env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=folder)
        cmd = [sys.executable, __file__, args.out, "--head-dim", str(args.head_dim)]
        cmd += ["--seq", str(args.seq), "--worker", options] + (["--causal"] if args.causal else [])
        cmd += ["--registers", args.registers] if args.registers else []
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        with open(os.path.join(folder, "worker.log"), "w") as f:
            f.write(r.stdout + r.stderr)
        print(f"== {options} (rc {r.returncode})", flush=True)
        for line in r.stdout.splitlines():
            if line.startswith("TIME"):
                print("  " + line[:140])
        pattern = re.compile(r"registers|spill|stack frame|Compiling entry", re.I)
        texts = [r.stdout + r.stderr]
        for path in glob.glob(f"{folder}/**/*ptxas*", recursive=True):
            with open(path, errors="replace") as f:
                texts.append(f.read())
        for text in texts:
            for line in text.splitlines():
                if pattern.search(line):
                    print("  " + line.strip()[:160])
        for path in glob.glob(f"{folder}/**/*", recursive=True):
            name = os.path.basename(path)
            if os.path.isfile(path) and not name.endswith(".log") and "ptxas" not in name:
                os.remove(path)  # keep ptxas' reports and the log only (the dumps are large)


if __name__ == "__main__":
    main()
