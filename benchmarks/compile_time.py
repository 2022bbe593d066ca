"""Where the compile time of a jitted forward + backward goes (issue 9: no worse than cuDNN's).

One process per (backend, case) so that no compiled kernel is cached from an earlier one: trace +
lower (Python: the Pallas kernels' bodies become MLIR) and XLA's compile (for Mosaic GPU kernels:
Mosaic's MLIR passes, LLVM, ptxas), each timed. With `--ptxas DIR`, Mosaic dumps each kernel's
PTX into DIR (MOSAIC_GPU_DUMP_PTX / MOSAIC_GPU_DUMP_TO) and ptxas is timed on every file alone,
so the compile splits into ptxas and the rest.
Usage on the GPU:
  python benchmarks/compile_time.py OUT_JSON [--cases d128-causal-4k,...] [--ptxas DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

# name: (batch, seq, heads, head_dim, causal): the standard bench's shapes (16k tokens, 2048 wide)
CASES = {
    "d64-full-1k": (16, 1024, 32, 64, False),
    "d64-causal-4k": (4, 4096, 32, 64, True),
    "d128-full-4k": (4, 4096, 16, 128, False),
    "d128-causal-4k": (4, 4096, 16, 128, True),
}
BACKENDS = {"flashjax": "mosaic", "cudnn": "cudnn"}


def worker(backend: str, case: str) -> dict:
    """Compile one forward + backward in this process; seconds of each phase."""
    import jax
    import jax.numpy as jnp

    import flashjax

    b, t, n, h, causal = CASES[case]
    spec = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)

    def loss(q, k, v):
        if backend == "cudnn":
            out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        else:
            out = flashjax.dot_product_attention(
                q, k, v, is_causal=causal, implementation=BACKENDS[backend]
            )
        return out.astype(jnp.float32).sum()

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    start = time.perf_counter()
    lowered = fn.trace(spec, spec, spec).lower()
    traced = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return dict(backend=backend, case=case, lower_s=traced - start, compile_s=done - traced)


def ptxas_seconds(folder: str) -> list[dict]:
    """Each dumped PTX file through ptxas alone (the flags Mosaic uses for sm_90a), timed."""
    root = os.environ.get("MOSAIC_GPU_CUDA_ROOT", "/usr/local/cuda")
    ptxas = os.path.join(root, "bin", "ptxas")
    rows = []
    for path in sorted(glob.glob(f"{folder}/**/*.ptx", recursive=True)):
        start = time.perf_counter()
        r = subprocess.run(
            [ptxas, "-arch=sm_90a", "-O3", path, "-o", "/dev/null"], capture_output=True, text=True
        )
        rows.append(
            dict(
                file=os.path.relpath(path, folder),
                bytes=os.path.getsize(path),
                ptxas_s=time.perf_counter() - start,
                rc=r.returncode,
                err=r.stderr[-300:],
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--ptxas", help="dump Mosaic's PTX here and time ptxas on each file")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker)), flush=True)
        return
    rows = []
    for case in args.cases.split(","):
        for backend in args.backends.split(","):
            env = dict(os.environ)
            dump = None
            if args.ptxas and backend == "flashjax":
                dump = os.path.join(args.ptxas, case)
                os.makedirs(dump, exist_ok=True)
                env |= dict(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=dump)
            r = subprocess.run(
                [sys.executable, __file__, "x", "--worker", backend, case],
                capture_output=True,
                text=True,
                env=env,
            )
            lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else dict(backend=backend, case=case)
            if not lines:
                row["error"] = r.stderr[-500:]
            if dump:
                row["ptxas"] = ptxas_seconds(dump)
                row["ptxas_s"] = sum(x["ptxas_s"] for x in row["ptxas"])
            rows.append(row)
            print(
                f"{case:16s} {backend:9s} lower {row.get('lower_s', float('nan')):6.2f} s, "
                f"compile {row.get('compile_s', float('nan')):6.2f} s"
                + (f", of which ptxas alone {row['ptxas_s']:.2f} s" if dump else "")
                + (f"  ERROR {row['error'][-200:]}" if "error" in row else ""),
                flush=True,
            )
            for x in row.get("ptxas", []):
                print(f"    {x['file']}: {x['bytes'] / 1e3:.0f} kB PTX, ptxas {x['ptxas_s']:.2f} s")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
