"""`python -m flashjax bench`: the attention benchmark sweep (see `--help`)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashjax.bench.options import (
    default_out_dir,
    header,
    parse_backends,
    parse_dtype,
    parse_ints,
    parse_modes,
    parse_percents,
    parse_shapes,
    parse_window,
)

GPU_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_QUICK_SEQLENS = (1024, 4096, 16384)
CPU_SEQLENS = (128, 256, 512)
CPU_QUICK_SEQLENS = (128, 256)
CPU_HEAD_DIMS = (64,)
# The CPU sweep's backends: the kernels (interpreted), the path CPU users get (implementation=None
# runs xla_chunked there) and standard attention.
CPU_BACKENDS = ("flashjax", "flashjax_chunked", "jax_xla")
# --io (one forward shape, tiles swept) and --memory (forward+backward, lengths up to 64k).
IO_GPU = {
    "seqlens": (1024, 2048, 4096, 8192),
    "blocks": (32, 64, 128, 256),
    "heads": 16,
    "head_dim": 64,
}
IO_CPU = {"seqlens": (64, 128), "blocks": (16, 32, 64), "heads": 2, "head_dim": 32}
MEMORY_GPU = {"seqlens": tuple(1024 << i for i in range(7)), "heads": 16, "head_dim": 128}
MEMORY_CPU = {"seqlens": (256, 512, 1024, 2048), "heads": 2, "head_dim": 32}
# --sparsity: block-sparse time against density. GPU: heads * head_dim = 2048 (N=32 at D=64, N=16
# at D=128, the sweep's protocol), B=1, mask block 128; the longest-sequence search from 64k.
SPARSITY_GPU = {
    "seqlens": (4096, 16384, 65536),
    "head_dims": (64, 128),
    "hidden": 2048,
    "block": 128,
    "longest_from": 65536,
    "longest_max": 1 << 24,
    "longest_minutes": 1.0,
    "max_minutes": 4.5,
    "flex_head_dims": (128,),
}
SPARSITY_GPU_QUICK = SPARSITY_GPU | {"seqlens": (4096, 16384), "head_dims": (128,)}
SPARSITY_CPU = {
    "seqlens": (256, 512),
    "head_dims": (32,),
    "hidden": 64,
    "block": 16,
    "longest_from": 512,
    "longest_max": 4096,
    "longest_minutes": 0.5,
    "max_minutes": None,
    "flex_head_dims": None,
}
SPARSITY_CPU_QUICK = SPARSITY_CPU | {"seqlens": (256,), "longest_from": None}
# --decode on a GPU: no shape starts after this many minutes (one device call is at most 10).
DECODE_GPU_MAX_MINUTES = 7.0

DESCRIPTION = """\
Benchmark attention implementations on the protocol of FlashAttention's papers.

Every backend available here runs every shape; each is first checked against flashjax's float32
reference (relative L2 error of the output, and of dq, dk, dv for the backward) and only then
timed: jitted, warmed up, median of repeated timed batches. A backend that raises, runs out of
memory or fails the check becomes a row saying so; the sweep goes on.

Defaults on a GPU (the standard sweep): bf16, batch*seq = 16384 tokens, heads*head_dim = 2048,
seq 512..16k, head dims 64, 128 and 256, causal and not, modes fwd, bwd (fwd+bwd minus fwd) and
fwd+bwd, and a bf16 8192^3 matmul for the machine's ceiling, timed at the start (provisional) and
at the end of the run, the higher counting (about 10 minutes on an H200). On a CPU: a small sweep
(seq 128..512, head dim 64, 1024 tokens, hidden 128) of flashjax's interpreted kernels,
flashjax_chunked (what implementation=None runs on a CPU; the table's ratios are its) and XLA, whose
numbers are labeled as CPU numbers.

FLOPs: forward 4*B*N*T*S*H, half of it for causal, the visible fraction for a window; backward
2.5x forward. Results: bench.json, bench.csv and bench.png (with matplotlib) in --out (default: a
folder under the system's temporary directory, outside the repository; printed at the start and
the end), written after every shape, and a table on stdout at the end.

Other measurements replace the sweep:

  --ring    ring attention across this host's devices (flashjax.ring_attention): weak scaling
            against the all-gather baseline and one device, memory per device, ppermute
            bandwidth, and a model of n = 2..64 devices; its own options:
            `python -m flashjax bench --ring --help`.

  --io      FlashAttention's IO complexity (its Theorem 2 and Fig. 2): for one forward shape
            (bf16, B=1, N=16, H=64, non-causal; seq 1k..8k) and each tile size of flashjax's
            forward kernel, the HBM bytes an analytic model predicts, the DRAM (and L2) bytes
            Nsight Compute measures (ncu on the PATH; "no ncu" otherwise, "cpu" on a CPU), and
            the runtime; standard attention (jax.nn, XLA) beside it. io.json, io.csv, io.png.
  --memory  XLA temp memory of forward+backward (jax.grad) against sequence length, 1k..64k
            (bf16, B=1, N=16, H=128): flashjax, standard attention and cuDNN, compiled only and
            compared with the device's memory ("would not fit"); flashjax also run at each
            length to confirm that it fits. memory.json, memory.csv, memory.png.
  --sparsity  block-sparse attention time against density (FlashAttention's Fig. 2, right):
            bf16, B=1, heads*head_dim=2048, seq 4k, 16k, 64k, head dims 64 and 128, causal and
            not, fwd and fwd+bwd; patterns dense (the reference), butterfly and random (seeded,
            diagonal kept) at 5, 10, 25, 50% of 128x128 blocks. Per row: ms, density (exact
            visible pairs / T*S), TFLOP/s on visible pairs, time / dense time against the bar
            1.15*density + 0.03 (pass/fail). Beside flashjax with the same pattern: jax.nn XLA
            with the dense mask (skipped past --xla-max-gib), torch FlexAttention (torch with
            CUDA; head dim 128, --flex-head-dims); tokamax has no block-sparse attention (dense
            mask only): skipped, saying so. Then butterfly fwd+bwd from 64k, doubling until out
            of memory. About 5 minutes on an H200: no shape starts after 4.5 minutes
            (--max-minutes; shapes left out become rows saying so), then 1 minute for the
            doubling (--longest-minutes). CPU: seq 256, 512, interpreted kernels, the chunked
            path and XLA. sparsity.json, sparsity.csv, sparsity.png.
  --decode  a decode step's attention (one new token per row over a full KV cache) against the
            device's read bandwidth, measured in the same run (a sum over 4 GiB): bf16, 32 query
            heads / 8 KV heads, head dim 128, B x S = 1x8k, 1x64k, 8x16k, 32x8k, 64x4k; each
            backend timed over many chained steps inside one jitted loop (CUDA graph for torch),
            so dispatch is excluded. flashjax's decode kernel, contiguous and paged (pages of 16
            and 64), its training kernel, jax.nn cuDNN and XLA, JAX's Pallas decode op, tokamax,
            FlashAttention-2 (flash_attn_with_kvcache) and torch SDPA; the bars (>= 90% of the
            read bandwidth, 1x8k <= 15 us, paged <= 1.1x contiguous) judged per row. Then a
            Flax study: a decode step of nnx.MultiHeadAttention(decode=True), Flax's attention
            against flashjax.nnx (the decode kernel), projections included (1x8k, 32x8k).
            About 4 minutes on an H200 (no shape starts after 7: --max-minutes). CPU: a tiny
            stand-in. decode.json, decode.csv, decode.png.
"""

EPILOG = """\
backends (each runs only where available; `--list-backends` says which):
  flashjax          flashjax.dot_product_attention(implementation="triton")
  flashjax_mosaic   flashjax.dot_product_attention(implementation="mosaic") (sm90)
  flashjax_chunked  flashjax.dot_product_attention(implementation="xla_chunked")
  jax_cudnn         jax.nn.dot_product_attention(implementation="cudnn")
  jax_xla           jax.nn.dot_product_attention(implementation="xla"); skipped past --xla-max-gib
  tokamax_triton    tokamax.dot_product_attention(implementation="triton")
  tokamax_mosaic    tokamax.dot_product_attention(implementation="mosaic")
  torch_cudnn       torch SDPA, cuDNN backend (needs torch with CUDA)
  torch_flash       torch SDPA, FlashAttention-2 backend
  torch_flex        torch FlexAttention with a block mask (--sparsity only)

examples:
  python -m flashjax bench                                  # the standard sweep
  python -m flashjax bench --quick                          # seq 1k, 4k, 16k at D=128
  python -m flashjax bench --head-dims 256 --seqlens 4k,16k
  python -m flashjax bench --backends flashjax,jax_cudnn --modes fwd --causal yes
  python -m flashjax bench --io                             # HBM traffic vs tile size
  python -m flashjax bench --io --blocks 64,128 --vary q --causal yes
  python -m flashjax bench --memory                         # memory vs seq, up to 64k
  python -m flashjax bench --memory --no-run --seqlens 16k,32k
  python -m flashjax bench --sparsity                       # block-sparse time vs density
  python -m flashjax bench --ring                           # ring attention, all devices
  python -m flashjax bench --sparsity --seqlens 8k,32k --head-dims 128 --max-minutes 3
  python -m flashjax bench --decode                         # decode GB/s vs read bandwidth
  python -m flashjax bench --decode --shapes 1x8k,16x32k --page-sizes 16 --backends flashjax
"""


def hbm_vary() -> tuple[str, ...]:
    """The choices of `--vary`."""
    from flashjax.bench.hbm import VARY

    return VARY


def hbm_timeout() -> float:
    """The default of `--ncu-timeout`."""
    from flashjax.bench.hbm_entries import DEFAULT_NCU_TIMEOUT_S

    return DEFAULT_NCU_TIMEOUT_S


def build_parser() -> argparse.ArgumentParser:
    """The `bench` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m flashjax bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shapes = p.add_argument_group("shapes")
    shapes.add_argument(
        "--seqlens", type=parse_ints, metavar="LIST", help="sequence lengths, e.g. 512,1k,16k"
    )
    shapes.add_argument(
        "--head-dims", type=parse_ints, metavar="LIST", help="head dims (GPU default 64,128,256)"
    )
    shapes.add_argument(
        "--causal",
        choices=("both", "yes", "no"),
        help="default: both (sweep), no (--io, --memory, which take yes or no)",
    )
    shapes.add_argument(
        "--window",
        type=parse_window,
        metavar="L[,R]",
        help="sliding window (left, right) for every shape (default: none)",
    )
    shapes.add_argument(
        "--batch-tokens",
        type=int,
        metavar="N",
        help="batch * seq, held fixed (default 16384 on GPU, 1024 on CPU)",
    )
    shapes.add_argument(
        "--hidden",
        type=int,
        metavar="N",
        help="heads * head_dim, held fixed (default 2048 on GPU, 128 on CPU)",
    )
    shapes.add_argument(
        "--dtype", type=parse_dtype, default="bfloat16", help="bfloat16 (default), float16, float32"
    )
    shapes.add_argument(
        "--batch", type=int, metavar="B", help="batch size of --io and --memory (default 1)"
    )
    shapes.add_argument(
        "--heads",
        type=int,
        metavar="N",
        help="heads of --io and --memory (default 16; 2 on CPU); query heads of --decode "
        "(default 32; 4 on CPU)",
    )
    shapes.add_argument(
        "--kv-heads", type=int, metavar="K", help="--decode: KV heads (default 8; 2 on CPU)"
    )
    shapes.add_argument(
        "--shapes",
        type=parse_shapes,
        metavar="LIST",
        help="--decode: B x S shapes (default 1x8k,1x64k,8x16k,32x8k,64x4k; CPU 1x256,2x128)",
    )
    other = p.add_argument_group(
        "other measurements (each replaces the sweep)",
        "--seqlens, --head-dims (one), --dtype, --causal, --batch and --heads set their shape; "
        "--reps, --seed and the output options apply too; --memory takes --backends among "
        "flashjax, jax_xla, jax_cudnn. --sparsity takes several --head-dims, --hidden, --modes "
        "fwd and fwd+bwd, --max-minutes, --xla-max-gib and --backends among flashjax, "
        "flashjax_chunked, jax_xla, torch_flex.",
    )
    which = other.add_mutually_exclusive_group()
    which.add_argument(
        "--io",
        action="store_true",
        help="HBM traffic (analytic model and Nsight Compute) and runtime of one forward against "
        "flashjax's tile size, beside standard attention (default seq 1k..8k, head dim 64)",
    )
    which.add_argument(
        "--memory",
        action="store_true",
        help="memory of forward+backward against sequence length, 1k..64k (head dim 128): "
        "flashjax, standard attention, cuDNN",
    )
    which.add_argument(
        "--sparsity",
        action="store_true",
        help="block-sparse attention time against density (butterfly and random block patterns "
        "vs dense), beside XLA with the dense mask and torch FlexAttention; then the longest "
        "butterfly fwd+bwd that fits",
    )
    which.add_argument(
        "--decode",
        action="store_true",
        help="decode-step attention (one new token over a KV cache) in GB/s against the read "
        "bandwidth: flashjax contiguous and paged, jax.nn, JAX's Pallas decode op, tokamax, "
        "FlashAttention-2",
    )
    other.add_argument(
        "--page-sizes",
        type=parse_ints,
        metavar="LIST",
        help="--decode: page sizes of the paged flashjax rows (default 16,64)",
    )
    other.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="--decode: chained steps per timed loop (default: about 20 ms of work)",
    )
    other.add_argument(
        "--flax-shapes",
        type=parse_shapes,
        metavar="LIST",
        help="--decode: shapes of the Flax study, nnx.MultiHeadAttention(decode=True) with "
        "Flax's attention vs flashjax.nnx (default 1x8k,32x8k; CPU 1x64); --no-flax skips it",
    )
    other.add_argument("--no-flax", action="store_true", help="--decode: skip the Flax study")
    other.add_argument(
        "--blocks",
        type=parse_ints,
        metavar="LIST",
        help="--io: tile sizes of flashjax's forward (default 32,64,128,256; CPU 16,32,64)",
    )
    other.add_argument(
        "--vary",
        choices=hbm_vary(),
        default="both",
        help="--io: what --blocks sets: both (block_q = block_k, default), q or k (the other "
        "from configs.py). The model's bytes depend on block_q only",
    )
    other.add_argument(
        "--ncu",
        metavar="PATH",
        help="--io: the Nsight Compute CLI (default: ncu on PATH, then under /usr/local/cuda* "
        "and /opt/nvidia/nsight-compute)",
    )
    other.add_argument("--no-ncu", action="store_true", help="--io: skip Nsight Compute")
    other.add_argument(
        "--ncu-timeout",
        type=float,
        default=hbm_timeout(),
        metavar="S",
        help="--io: seconds allowed to each of its two ncu runs (default %(default).0f)",
    )
    other.add_argument(
        "--no-run",
        action="store_true",
        help="--memory: compile only (skip the run that confirms flashjax fits)",
    )
    other.add_argument(
        "--memory-limit-gib",
        type=float,
        metavar="GIB",
        help="--memory: the memory to compare with (default: the device's bytes_limit)",
    )
    other.add_argument(
        "--densities",
        type=parse_percents,
        metavar="LIST",
        help="--sparsity: block densities of the random patterns, in percent (default 5,10,25,50)",
    )
    other.add_argument(
        "--mask-block",
        type=int,
        metavar="N",
        help="--sparsity: the block mask's block size (default 128; 16 on CPU)",
    )
    other.add_argument(
        "--longest-from",
        type=parse_ints,
        metavar="T",
        help="--sparsity: first length of the longest-sequence search (default 64k; 512 on CPU)",
    )
    other.add_argument(
        "--flex-head-dims",
        type=parse_ints,
        metavar="LIST",
        help="--sparsity: head dims FlexAttention runs at (default 128 on GPU: each shape costs "
        "it two torch.compile runs)",
    )
    other.add_argument(
        "--longest-minutes",
        type=float,
        metavar="M",
        help="--sparsity: time for the longest-sequence search, 0 to skip it (default 1.5)",
    )
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--modes",
        type=parse_modes,
        default=None,
        metavar="LIST",
        help="fwd, bwd, fwd+bwd or all (default: all)",
    )
    what.add_argument(
        "--backends",
        type=parse_backends,
        default=None,
        metavar="LIST",
        help="comma list (default: all that are available here)",
    )
    what.add_argument(
        "--quick",
        action="store_true",
        help="a short run: GPU seq 1k,4k,16k at D=128 (3 reps); CPU seq 128,256",
    )
    what.add_argument("--reps", type=int, metavar="N", help="timed batches per measurement")
    what.add_argument(
        "--max-minutes",
        type=float,
        metavar="M",
        help="start no new shape after M minutes (longest sequences run first); then report "
        "(default: none; --sparsity on a GPU 4.5)",
    )
    what.add_argument(
        "--xla-max-gib",
        type=float,
        default=20.0,
        metavar="GIB",
        help="skip jax_xla where its float32 (B, N, T, S) scores exceed this (default 20)",
    )
    what.add_argument(
        "--compile-workers",
        type=int,
        metavar="N",
        help="threads compiling Pallas/cuDNN programs of a shape at once before any timing "
        "(default min(8, cores) on GPU, 1 on CPU; 1 = one after the other)",
    )
    what.add_argument("--seed", type=int, default=0, help="PRNG seed of the inputs")
    what.add_argument("--list-backends", action="store_true", help="say what is available; exit")
    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="results folder (default <tmp>/flashjax-bench/<date>-<device>[-mode], outside the "
        "repository)",
    )
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")
    out.add_argument(
        "--commit",
        metavar="HASH",
        help="the commit to record where the tree has no .git (e.g. a copy sent to a GPU machine)",
    )
    return p


def _quiet_autotuning(record: logging.LogRecord) -> bool:
    """Drop tokamax's "Autotuning cache miss" warnings (one per shape and kernel, each long)."""
    return not str(record.msg).startswith("Autotuning cache miss")


def _resolve(args: argparse.Namespace, on_gpu: bool) -> dict[str, Any]:
    """Fill the platform-dependent defaults."""
    if on_gpu:
        seqlens = GPU_QUICK_SEQLENS if args.quick else GPU_SEQLENS
        head_dims = (128,) if args.quick else (64, 128, 256)
        batch_tokens, hidden = 16384, 2048
    else:
        seqlens = CPU_QUICK_SEQLENS if args.quick else CPU_SEQLENS
        head_dims = CPU_HEAD_DIMS
        batch_tokens, hidden = 1024, 128
    from flashjax.bench.flops import MODES

    return {
        "seqlens": args.seqlens or seqlens,
        "head_dims": args.head_dims or head_dims,
        "causal": {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal or "both"],
        "batch_tokens": args.batch_tokens or batch_tokens,
        "hidden": args.hidden or hidden,
        "modes": args.modes or MODES,
        "reps": args.reps or (3 if args.quick or not on_gpu else 5),
        "compile_workers": args.compile_workers or (min(8, os.cpu_count() or 1) if on_gpu else 1),
    }


def _policy(on_gpu: bool, reps: int) -> Any:
    """The timing policy every mode uses: `reps` timed batches after warm-up; on a GPU three
    rounds per program, the backends of a case interleaved (`timing.interleaved`)."""
    from flashjax.bench import timing

    return timing.TimingPolicy(
        reps=reps,
        warmup=2 if on_gpu else 1,
        target_batch_s=0.025 if on_gpu else 0.02,
        rounds=3 if on_gpu else 1,
    )


def _out_dir(args: argparse.Namespace, meta: dict[str, Any], suffix: str = "") -> Path:
    """--out, or `default_out_dir`."""
    return args.out or default_out_dir(meta, suffix)


def _one_shape(
    p: argparse.ArgumentParser, args: argparse.Namespace, mode: str, head_dim: int
) -> tuple[int, bool]:
    """The single head dim and causal setting of --io / --memory (errors exit with usage)."""
    if args.head_dims is not None and len(args.head_dims) != 1:
        p.error(f"{mode} takes one head dim, got --head-dims {args.head_dims}")
    if args.causal == "both":
        p.error(f"{mode} takes --causal yes or no")
    for name in ("batch", "heads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return (args.head_dims or (head_dim,))[0], args.causal == "yes"


def _available(registry: Sequence[Any], wanted: Sequence[str] | None) -> tuple[list, dict]:
    """The backends of `registry` named in `wanted` (None: all of them) that run here, and why
    the others named cannot (`{name: reason}`)."""
    chosen, unavailable = [], {}
    for b in registry:
        if wanted is None or b.name in wanted:
            why = b.unavailable()
            if why is None:
                chosen.append(b)
            else:
                unavailable[b.name] = why
    return chosen, unavailable


def _say_skipped(chosen: Sequence[Any], unavailable: dict[str, str]) -> bool:
    """Print each backend skipped and why; False, after saying so, when none is left to run."""
    for name, why in unavailable.items():
        print(f"skip {name}: {why}", flush=True)
    if not chosen:
        print("no backend available", file=sys.stderr)
    return bool(chosen)


def main_io(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """`--io`: model, ncu and runtime per sequence length and tile size (see flashjax.bench.hbm)."""
    import jax

    from flashjax.bench import hbm, hbm_entries, hbm_report, machine, report
    from flashjax.bench import ncu as ncu_mod

    started = time.perf_counter()
    on_gpu = jax.devices()[0].platform == "gpu"
    defaults = IO_GPU if on_gpu else IO_CPU
    head_dim, causal = _one_shape(p, args, "--io", defaults["head_dim"])
    if not on_gpu:
        ncu_path, ncu_status = None, "cpu"
    elif args.no_ncu:
        ncu_path, ncu_status = None, "disabled"
    else:
        ncu_path = ncu_mod.find_ncu(args.ncu)
        ncu_status = (
            "not profiled" if ncu_path else "no ncu" + (f" at {args.ncu}" if args.ncu else "")
        )
    cfg = hbm_entries.IOConfig(
        seqlens=args.seqlens or defaults["seqlens"],
        blocks=args.blocks or defaults["blocks"],
        batch=args.batch or 1,
        heads=args.heads or defaults["heads"],
        head_dim=head_dim,
        causal=causal,
        dtype=args.dtype,
        vary=args.vary,
        ncu=ncu_path,
        ncu_status=ncu_status,
        ncu_timeout_s=args.ncu_timeout,
        seed=args.seed,
    )
    meta = machine.describe(args.commit)
    header(meta, "--io")
    meta |= _shape_meta("io", cfg) | {
        "blocks": list(cfg.blocks),
        "vary": cfg.vary,
        "ncu": cfg.ncu,
        "ncu_metrics": list(ncu_mod.METRICS),
        "reps": args.reps or (5 if on_gpu else 2),
        "model": "flashjax/bench/hbm_model.py: standard = 2e(T+S)H + (8+2e)TS bytes per head; "
        "flashjax = Q, O, lse once + K, V once per visited key block per query block",
        "timing": "median of timed batches after warm-up, outside ncu",
        "argv": argv,
    }
    out_dir = _out_dir(args, meta, "-io")
    print(
        f"{len(cfg.seqlens)} lengths x (standard + {len(cfg.blocks)} tiles); ncu: "
        f"{cfg.ncu or cfg.ncu_status}; results in {out_dir}",
        flush=True,
    )
    policy = _policy(on_gpu, meta["reps"])
    rows = hbm.run(
        cfg,
        policy,
        out_dir,
        log=lambda line: print(line, flush=True),
        on_progress=lambda rows: hbm_report.write(out_dir, meta, rows, with_plot=False),
    )
    return report.finish(
        hbm_report.write,
        hbm_report.format_table,
        out_dir,
        meta,
        rows,
        started,
        with_plot=not args.no_plot,
    )


def _shape_meta(mode: str, cfg: Any) -> dict[str, Any]:
    """The shape fields every single-shape mode (`--io`, `--memory`) records in its metadata."""
    fields = ("dtype", "batch", "heads", "head_dim", "causal")
    return {"mode": mode, **{f: getattr(cfg, f) for f in fields}, "seqlens": list(cfg.seqlens)}


def main_memory(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """`--memory`: XLA temp memory of forward+backward per length (see flashjax.bench.memory)."""
    import jax

    from flashjax.bench import machine, memory, report

    started = time.perf_counter()
    on_gpu = jax.devices()[0].platform == "gpu"
    defaults = MEMORY_GPU if on_gpu else MEMORY_CPU
    head_dim, causal = _one_shape(p, args, "--memory", defaults["head_dim"])
    wanted = args.backends or memory.BACKENDS
    if unknown := [b for b in wanted if b not in memory.BACKENDS]:
        p.error(f"--memory compares {', '.join(memory.BACKENDS)}; not {', '.join(unknown)}")
    limit = memory.device_limit()
    if args.memory_limit_gib is not None:
        limit = int(args.memory_limit_gib * 2**30)
    cfg = memory.MemoryConfig(
        seqlens=args.seqlens or defaults["seqlens"],
        batch=args.batch or 1,
        heads=args.heads or defaults["heads"],
        head_dim=head_dim,
        causal=causal,
        dtype=args.dtype,
        backends=tuple(wanted),
        limit_bytes=limit,
        run=not args.no_run,
        seed=args.seed,
    )
    meta = machine.describe(args.commit)
    header(meta, "--memory")
    meta |= _shape_meta("memory", cfg) | {
        "backends": list(cfg.backends),
        "limit_bytes": cfg.limit_bytes,
        "limit": "--memory-limit-gib" if args.memory_limit_gib is not None else "bytes_limit",
        "memory": "jit(jax.grad(sum of attention)).lower(...).compile().memory_analysis(); "
        "fits: argument + output + temp - alias <= limit_bytes; peak_bytes: JAX's process-wide "
        "peak after the run",
        "argv": argv,
    }
    out_dir = _out_dir(args, meta, "-memory")
    limit_text = "unknown" if limit is None else f"{limit / 2**30:.4g} GiB"
    print(
        f"{len(cfg.seqlens)} lengths x {', '.join(cfg.backends)}; device memory {limit_text}; "
        f"results in {out_dir}",
        flush=True,
    )
    rows = memory.run(
        cfg,
        on_gpu,
        log=lambda line: print(line, flush=True),
        on_progress=lambda rows: memory.write(out_dir, meta, rows, with_plot=False),
    )
    return report.finish(
        memory.write, memory.format_table, out_dir, meta, rows, started, with_plot=not args.no_plot
    )


def _sparsity_defaults(args: argparse.Namespace, on_gpu: bool) -> dict[str, Any]:
    if on_gpu:
        return SPARSITY_GPU_QUICK if args.quick else SPARSITY_GPU
    return SPARSITY_CPU_QUICK if args.quick else SPARSITY_CPU


def _sparsity_config(
    p: argparse.ArgumentParser, args: argparse.Namespace, on_gpu: bool
) -> tuple[Any, float]:
    """The `SparsityConfig` of --sparsity and the longest-search budget in seconds."""
    from flashjax.bench import sparsity

    defaults = _sparsity_defaults(args, on_gpu)
    modes = args.modes or sparsity.MODES
    if "bwd" in modes:
        p.error("--sparsity times fwd and fwd+bwd; leave out bwd")
    minutes = defaults["longest_minutes"] if args.longest_minutes is None else args.longest_minutes
    longest_from = defaults["longest_from"] if args.longest_from is None else args.longest_from[0]
    cfg = sparsity.SparsityConfig(
        seqlens=args.seqlens or defaults["seqlens"],
        head_dims=args.head_dims or defaults["head_dims"],
        causal={"both": (False, True), "yes": (True,), "no": (False,)}[args.causal or "both"],
        densities=args.densities or sparsity.SparsityConfig.densities,
        block=args.mask_block or defaults["block"],
        modes=modes,
        batch=args.batch or 1,
        hidden=args.hidden or defaults["hidden"],
        dtype=args.dtype,
        seed=args.seed,
        longest_from=None if minutes <= 0 else longest_from,
        longest_max=defaults["longest_max"],
        longest_budget_s=60 * minutes,
    )
    return cfg, 60 * minutes


def _sparsity_backends(
    p: argparse.ArgumentParser, args: argparse.Namespace, on_gpu: bool
) -> tuple[list, dict[str, str]]:
    """The --sparsity backends that run here, and why the others do not."""
    from flashjax.bench import sparsity_backends

    flex_dims = args.flex_head_dims or _sparsity_defaults(args, on_gpu)["flex_head_dims"]
    registry = sparsity_backends.all_backends(int(args.xla_max_gib * 2**30), flex_dims)
    default = sparsity_backends.GPU_DEFAULT if on_gpu else sparsity_backends.CPU_DEFAULT
    wanted = args.backends or default
    if unknown := [b for b in wanted if b not in sparsity_backends.NAMES]:
        p.error(
            f"--sparsity compares {', '.join(sparsity_backends.NAMES)}; not {', '.join(unknown)}"
        )
    chosen, unavailable = _available(registry, wanted)
    return chosen, {"tokamax": sparsity_backends.TOKAMAX_SKIPPED} | unavailable


def main_sparsity(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """`--sparsity`: block-sparse time against density (see flashjax.bench.sparsity)."""
    import jax

    from flashjax.bench import machine, report, sparsity, sparsity_report

    started = time.perf_counter()
    on_gpu = jax.devices()[0].platform == "gpu"
    cfg, longest_s = _sparsity_config(p, args, on_gpu)
    chosen, unavailable = _sparsity_backends(p, args, on_gpu)
    meta = machine.describe(args.commit)
    header(meta, "--sparsity")
    if not _say_skipped(chosen, unavailable):
        return 1
    reps = args.reps or 3
    max_minutes = args.max_minutes or _sparsity_defaults(args, on_gpu)["max_minutes"]
    meta |= {
        "mode": "sparsity",
        "dtype": cfg.dtype,
        "batch": cfg.batch,
        "hidden": cfg.hidden,
        "block": cfg.block,
        "seqlens": list(cfg.seqlens),
        "head_dims": list(cfg.head_dims),
        "causal": list(cfg.causal),
        "densities": list(cfg.densities),
        "modes": list(cfg.modes),
        "backends": [b.name for b in chosen],
        "unavailable": unavailable,
        "reps": reps,
        "longest_from": cfg.longest_from,
        "longest_budget_s": longest_s,
        "max_minutes": max_minutes,
        "timing": "median of timed batches after warm-up",
        "flops": "4*B*N*H*visible pairs (exact, flops.visible_pairs), x3.5 for fwd+bwd",
        "bar": f"time / dense time <= {sparsity.BAR_SLOPE} * rel + {sparsity.BAR_OFFSET}, rel = "
        "visible pairs / the dense call's visible pairs",
        "argv": argv,
    }
    out_dir = _out_dir(args, meta, "-sparsity")
    print(
        f"{len(cfg.cases())} shapes x {len(cfg.densities) + 2} patterns x "
        f"{', '.join(meta['backends'])}; modes {', '.join(cfg.modes)}; results in {out_dir}",
        flush=True,
    )

    def save(rows: list[dict[str, Any]]) -> None:
        sparsity_report.write(out_dir, meta, sparsity.finalize(rows), with_plot=False)

    rows = sparsity.run(
        cfg,
        chosen,
        _policy(on_gpu, reps),
        workers=args.compile_workers or (min(8, os.cpu_count() or 1) if on_gpu else 1),
        deadline=None if max_minutes is None else started + 60 * max_minutes,
        log=lambda line: print(line, flush=True),
        on_progress=save,
    )
    meta["longest_fit"] = sparsity.longest_fit(rows)
    return report.finish(
        sparsity_report.write,
        sparsity_report.format_table,
        out_dir,
        meta,
        sparsity.finalize(rows),
        started,
        with_plot=not args.no_plot,
    )


def _decode_config(p: argparse.ArgumentParser, args: argparse.Namespace, on_gpu: bool) -> Any:
    """The `DecodeBench` of --decode: the platform's defaults with the options given."""
    from flashjax.bench import decode

    base = decode.DecodeBench() if on_gpu else decode.CPU_BENCH
    if args.head_dims is not None and len(args.head_dims) != 1:
        p.error(f"--decode takes one head dim, got --head-dims {args.head_dims}")
    changes = {
        "shapes": args.shapes,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": None if args.head_dims is None else args.head_dims[0],
        "page_sizes": args.page_sizes,
        "reps": args.reps,
        "steps": args.steps,
        "seed": args.seed,
        "dtype": args.dtype,
    }
    cfg = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
    if cfg.kv_heads < 1 or cfg.heads % cfg.kv_heads:
        p.error(f"--heads ({cfg.heads}) must be a multiple of --kv-heads ({cfg.kv_heads})")
    return cfg


def _decode_backends(
    args: argparse.Namespace, page_sizes: tuple[int, ...], on_gpu: bool
) -> tuple[list, dict[str, str]]:
    """The --decode backends that run here, and why the others do not."""
    from flashjax.bench import decode_backends

    registry = decode_backends.all_backends(page_sizes)
    default = [b.name for b in registry]
    if not on_gpu:  # the interpreted kernels and XLA
        default = [n for n in default if n.startswith("flashjax") or n == "jax_xla"]
        default.remove("flashjax_triton")
    wanted = args.backends or default
    chosen, unavailable = _available(registry, wanted)
    for name in wanted:
        if name not in {b.name for b in registry}:
            unavailable[name] = "not a --decode backend (or a page size not in --page-sizes)"
    return chosen, unavailable


def main_decode(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """`--decode`: decode-step GB/s against the read bandwidth (see flashjax.bench.decode)."""
    import jax

    from flashjax.bench import decode, decode_report, machine, report

    started = time.perf_counter()
    on_gpu = jax.devices()[0].platform == "gpu"
    cfg = _decode_config(p, args, on_gpu)
    chosen, unavailable = _decode_backends(args, cfg.page_sizes, on_gpu)
    meta = machine.describe(args.commit)
    header(meta, "--decode")
    if not _say_skipped(chosen, unavailable):
        return 1
    start_read = decode.read_bandwidth(cfg)
    print(f"read bandwidth (start): {start_read['gbps']:.0f} GB/s ({start_read['what']})")
    meta |= {
        "mode": "decode",
        "dtype": cfg.dtype,
        "heads": cfg.heads,
        "kv_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "shapes": [s.label for s in cfg.shapes],
        "page_sizes": list(cfg.page_sizes),
        "backends": [b.name for b in chosen],
        "unavailable": unavailable,
        "reps": cfg.reps,
        "read": start_read,
        "timing": "chained steps (each query depends on the previous output) in one jitted "
        "lax.fori_loop, CUDA graph for torch; median of reps runs / steps",
        "gbps": "cache bytes (2 * B * S * K * H * itemsize) / time per step",
        "bars": f"flashjax >= {decode.BANDWIDTH_BAR:.0%} of read at "
        f"{', '.join(f'{b}x{s}' for b, s in decode.BANDWIDTH_SHAPES)}; "
        f"{decode.LATENCY_BARS_US}; paged <= {decode.PAGED_BAR}x contiguous",
        "argv": argv,
    }
    out_dir = _out_dir(args, meta, "-decode")
    names = ", ".join(meta["backends"])
    print(f"{len(cfg.shapes)} shapes x {names}; results in {out_dir}", flush=True)

    def save(rows: list[dict[str, Any]]) -> None:
        final = decode.finalize(rows, meta["read"]["gbps"], on_gpu)
        decode_report.write(out_dir, meta, final, with_plot=False)

    max_minutes = args.max_minutes or (DECODE_GPU_MAX_MINUTES if on_gpu else None)
    meta["max_minutes"] = max_minutes
    rows = decode.run(
        cfg,
        chosen,
        start_read["gbps"],
        deadline=None if max_minutes is None else started + 60 * max_minutes,
        log=lambda s: print(s, flush=True),
        on_progress=save,
    )
    end_read = decode.read_bandwidth(cfg)
    # The higher counts (as the matmul ceiling's rule): a bar against it is the harder one.
    best = max((start_read, end_read), key=lambda r: r["gbps"])
    meta["read"] = best | {"start_gbps": start_read["gbps"], "end_gbps": end_read["gbps"]}
    print(
        f"read bandwidth that counts: {best['gbps']:.0f} GB/s (start "
        f"{start_read['gbps']:.0f}, end {end_read['gbps']:.0f}; the higher)",
        flush=True,
    )
    if not args.no_flax:
        meta["flax"] = _flax_study(args, cfg, on_gpu)
    final = decode.finalize(rows, best["gbps"], on_gpu)
    return report.finish(
        decode_report.write,
        decode_report.format_table,
        out_dir,
        meta,
        final,
        started,
        with_plot=not args.no_plot,
    )


def _flax_study(args: argparse.Namespace, cfg: Any, on_gpu: bool) -> list[dict[str, Any]]:
    """--decode's Flax study (flashjax.bench.decode_flax), printed as it finishes."""
    from flashjax.bench import decode, decode_flax, decode_report

    default = (decode.Shape(1, 8192), decode.Shape(32, 8192)) if on_gpu else (decode.Shape(1, 64),)
    steps = cfg.steps or 64
    found = decode_flax.rows(cfg, args.flax_shapes or default, steps)
    for line in decode_report.flax_lines(found):
        print(line, flush=True)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep (or --io / --memory); returns the process exit code (0 even if some
    backends failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ring" in argv:  # its own options (flashjax.bench.ring); JAX's devices not started yet
        from flashjax.bench import ring

        return ring.main([a for a in argv if a != "--ring"])
    parser = build_parser()
    args = parser.parse_args(argv)
    # JAX must not grab 75% of the GPU up front: torch backends share the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    logging.getLogger("absl").addFilter(_quiet_autotuning)
    if args.io:
        return main_io(parser, args, argv)
    if args.memory:
        return main_memory(parser, args, argv)
    if args.sparsity:
        return main_sparsity(parser, args, argv)
    if args.decode:
        return main_decode(parser, args, argv)

    import jax

    from flashjax.bench import backends as backends_mod
    from flashjax.bench import cases as cases_mod
    from flashjax.bench import machine, report, sweep

    started = time.perf_counter()
    registry = backends_mod.all_backends(int(args.xla_max_gib * 2**30))
    on_gpu = jax.devices()[0].platform == "gpu"
    if args.list_backends:
        for b in registry:
            why = b.unavailable()
            print(f"{b.name:<17} {'available' if why is None else 'unavailable: ' + why}")
            print(f"{'':<17} {b.description}")
        return 0

    cfg = _resolve(args, on_gpu)
    meta = machine.describe(args.commit)
    policy = _policy(on_gpu, cfg["reps"])
    header(meta)
    chosen, unavailable = _available(registry, args.backends or (None if on_gpu else CPU_BACKENDS))
    if not _say_skipped(chosen, unavailable):
        return 1

    ceiling = machine.provisional_ceiling(machine.matmul_ceiling(policy))
    print(f"ceiling: {machine.describe_ceiling(ceiling)}", flush=True)
    cases = cases_mod.sweep_cases(
        cfg["seqlens"],
        cfg["head_dims"],
        cfg["causal"],
        batch_tokens=cfg["batch_tokens"],
        hidden=cfg["hidden"],
        dtype=args.dtype,
        window=args.window,
    )
    meta |= {
        "dtype": args.dtype,
        "batch_tokens": cfg["batch_tokens"],
        "hidden": cfg["hidden"],
        "seqlens": list(cfg["seqlens"]),
        "head_dims": list(cfg["head_dims"]),
        "window": None if args.window is None else list(args.window),
        "modes": list(cfg["modes"]),
        "backends": [b.name for b in chosen],
        "unavailable": unavailable,
        "reps": cfg["reps"],
        "timing": "median of timed batches after warm-up; bwd = fwd+bwd - fwd",
        "flops": "fwd 4*B*N*T*S*H (x0.5 causal, x visible fraction for a window); bwd 2.5x fwd",
        "ceiling": ceiling,
        "memory": "temp_bytes: XLA temp allocation of the compiled program (torch: peak minus "
        "inputs and outputs); peak_bytes: JAX's process-wide peak so far (it cannot be reset), "
        "torch's peak during the backend's runs",
        "argv": argv,
    }
    if not on_gpu:
        meta["note"] = report.CPU_NOTE
    out_dir = _out_dir(args, meta, "-quick" if args.quick else "")
    print(
        f"{len(cases)} shapes x {len(chosen)} backends ({', '.join(meta['backends'])}), "
        f"modes {', '.join(cfg['modes'])}; results in {out_dir}",
        flush=True,
    )

    def save_partial(rows: list[dict[str, Any]]) -> None:
        report.write_all(out_dir, meta, report.finalize(rows, meta), with_plot=False)

    rows = sweep.run_sweep(
        cases,
        chosen,
        cfg["modes"],
        policy,
        seed=args.seed,
        compile_workers=cfg["compile_workers"],
        log=lambda line: print(line, flush=True),
        on_case_done=save_partial,
        deadline=None if args.max_minutes is None else started + 60 * args.max_minutes,
    )
    meta["ceiling"] = machine.final_ceiling(ceiling, machine.matmul_ceiling(policy))
    print(f"ceiling that counts: {machine.describe_ceiling(meta['ceiling'])}", flush=True)
    meta["shapes_run"] = len({(r["seq_q"], r["head_dim"], r["causal"]) for r in rows})
    meta["shapes_planned"] = len(cases)
    subject = report.table_subject(meta["platform"], meta["backends"])
    return report.finish(
        report.write_all,
        functools.partial(report.format_table, subject=subject),
        out_dir,
        meta,
        report.finalize(rows, meta),
        started,
        with_plot=not args.no_plot,
    )
