"""Which overlap_qk option set faults or goes wrong on the GPU (session 11: one of the D64 1k
sweep's overlapped candidates raised CUDA_ERROR_MISALIGNED_ADDRESS during timing, after every
candidate had passed its first check). Each set runs in its own process (a fault kills the
context), REPS times at the sweep's shape, each output compared with the default forward's.
Usage on the GPU: python3 benchmarks/repro_overlap.py [HEAD_DIM SEQ] (one set: --one INDEX).
REPRO_SETS="a+b,c" runs those option sets instead (session 22: `named_free`, under
compute-sanitizer's synccheck with `--one`), REPRO_REPS the runs of each, REPRO_REGISTERS
setmaxnreg's (consumers, producer) split."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

SETS = [
    ("longest_first", "fold_scale", "overlap_qk"),
    ("longest_first", "fold_scale", "overlap_qk", "lazy_rescale"),
    ("longest_first", "fold_scale", "overlap_qk", "no_auto_barriers"),
    ("longest_first", "fold_scale", "overlap_qk", "async_store", "persistent"),
]
if os.environ.get("REPRO_SETS"):
    SETS = [tuple(x.split("+")) for x in os.environ["REPRO_SETS"].split(",")]
REPS = int(os.environ.get("REPRO_REPS", 30))


def one(index: int, head_dim: int, seq: int, causal: bool) -> None:
    import jax
    import jax.numpy as jnp
    from tune import operands

    from pallas_kernels.mosaic import api
    from pallas_kernels.mosaic.forward import with_options

    ops, _ = operands(seq, head_dim, causal)
    ref, _ = jax.jit(lambda o: api.forward(o, interpret=False))(ops)
    cfg = with_options(api.forward_config(head_dim), SETS[index])
    if os.environ.get("REPRO_REGISTERS"):  # setmaxnreg's (consumers, producer), e.g. 216,80
        registers = tuple(int(x) for x in os.environ["REPRO_REGISTERS"].split(","))
        cfg = dataclasses.replace(cfg, registers=registers)
    fn = jax.jit(lambda o: api.forward(o, interpret=False, config=cfg))
    worst = 0.0
    for _ in range(REPS):
        out, _ = fn(ops)
        worst = max(
            worst, float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        )
    print(f"set {index} {SETS[index]} causal={causal}: max |diff| over {REPS} runs {worst:.3g}")


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--one":
        one(int(args[1]), int(args[2]), int(args[3]), args[4] == "1")
        return
    head_dim, seq = (int(args[0]), int(args[1])) if args else (64, 1024)
    for causal in (False, True):
        for index in range(len(SETS)):
            cmd = [sys.executable, __file__, "--one", str(index), str(head_dim), str(seq)]
            r = subprocess.run([*cmd, "1" if causal else "0"], capture_output=True, text=True)
            tail = (r.stdout + r.stderr).strip().splitlines()
            last = [x for x in tail if "set " in x or "Error" in x][-1:] or tail[-1:]
            print(f"rc {r.returncode}: {last[0][:200] if last else ''}", flush=True)


if __name__ == "__main__":
    main()
