"""Compile for the H200 on a machine without a GPU: PTX, ptxas' register and spill report, and
the compile's time, for the Mosaic GPU (and Triton) kernels.

XLA's compile-only CUDA topology (`jax.experimental.topologies`, from `h200_target.txtpb`) lets
`jax.jit(f).lower(...).compile()` run everything a GPU compile runs (for a Mosaic GPU kernel:
its MLIR passes, LLVM, PTX and ptxas, with the `MOSAIC_GPU_DUMP_*` dumps), but nothing can run.
Needs the venv of `setup.sh` (jax's CUDA 13 plugin beside the project's pins) and a ptxas (CUDA
13.0 on the development machine, as on the GPU image). Import this module before jax.
Checked (session 22): the backward's ptxas report offline equals the H200's of session 18 (the
5-GEMM kernel at head dim 128, setmaxnreg 240/24: 188 bytes of spill stores, 224 of loads).
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no CUDA client: there is no GPU
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # nor cuDNN / cuBLAS wheels

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402

TARGET = pathlib.Path(__file__).resolve().parent / "h200_target.txtpb"


def h200_sharding() -> jax.sharding.NamedSharding:
    """One compile-only H200 as a sharding for `ShapeDtypeStruct`s."""
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=TARGET.read_text(), topology="1x1x1"
    )
    mesh = topologies.make_mesh(topology, (1,), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def on_h200(tree):
    """Every array of `tree` as a `ShapeDtypeStruct` on the compile-only H200."""
    sharding = h200_sharding()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_for_h200(f, *args):
    """`jax.jit(f)` lowered and compiled for the H200 at `args`' shapes (arrays or structs);
    returns (lowered, compiled)."""
    lowered = jax.jit(f).lower(*on_h200(args))
    return lowered, lowered.compile()


def assemble(out: pathlib.Path) -> None:
    """Every Mosaic GPU PTX dump in `out` through ptxas for sm_90a (register and spill report to
    stdout) and, where nvdisasm is found (setup.sh installs it), its SASS beside it (`.sass`)."""
    for log in out.glob("*.mlir-passes.log"):  # ~100 MB a kernel
        log.unlink()
    nvdisasm = shutil.which("nvdisasm") or next(
        iter(glob.glob(f"{sys.prefix}/lib/python*/site-packages/nvidia/*/bin/nvdisasm")), None
    )
    for ptx in sorted(out.glob("*.ptx")):
        cubin = ptx.with_suffix(".cubin")
        report = subprocess.run(
            ["ptxas", "-v", "-arch=sm_90a", str(ptx), "-o", str(cubin)],
            check=True,
            capture_output=True,
            text=True,
        )
        print(report.stderr, flush=True)
        if nvdisasm:
            sass = subprocess.run([nvdisasm, "-c", "-g", str(cubin)], capture_output=True)
            ptx.with_suffix(".sass").write_bytes(sass.stdout)
    print("dumps:", sorted(x.name for x in out.iterdir()))
