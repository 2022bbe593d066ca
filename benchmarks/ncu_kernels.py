"""Nsight Compute profile of the kernels where the Hopper issue's bars are missed ("profile (ncu:
tensor-pipe utilisation, stalls, SMEM bank conflicts)"), flashjax's beside cuDNN's.

Each (case, backend) runs in its own worker process under ncu, which profiles only the one call
inside `flashjax.bench.ncu.profiler_range()` (after compiling it and one warm-up call), with the
SECTIONS and METRICS below: every pipe's utilisation, the warps' stall reasons per issued
instruction, shared-memory bank conflicts. Per kernel it prints (and appends to
OUT/summary.txt as each run ends) the duration, SM throughput, registers, occupancy, the busiest
pipes, the top stall reasons and the bank conflicts; each run's CSV is OUT/CASE-BACKEND.csv.

With `--sass`, each run is followed by a second one that writes ncu's source page,
OUT/CASE-BACKEND-sass.csv: the attention kernels' SASS, one line per instruction with its
warp-stall samples (SourceCounters), to find the instructions behind a stall reason (session 10:
flashjax's kernels stall on the long scoreboard 5x as often as cuDNN's).

Usage (a GPU with ncu; benchmarks/device_call_ncu.sh):
  python3 benchmarks/ncu_kernels.py OUT [--cases NAME,...] [--backends NAME,...] [--sass]
    [--options persistent,prefetch_q ...]   (flashjax_mosaic's profiled kernel: candidates)

The metric runs replay only the attention kernels (ATTENTION_KERNELS: XLA's fusions around them,
cuDNN's dO.O and dQ convert, flashjax's delta prologue, are left out); with every fusion of a
forward+backward program replayed for each metric pass, the backward cases outran TIMEOUT_S even
at 4k (session 26).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flashjax.bench import ncu
from flashjax.bench.cases import Case

# The cells of session 8's bench (results/2026-11-30-h200-s8/call2) furthest from the bars, at
# the bench's shapes (batch x seq = 16k tokens, heads x head dim = 2048): (case, program).
CASES: dict[str, tuple[Case, str]] = {
    "fwd-d64-causal-1k": (Case(16, 1024, 32, 64, True), "fwd"),  # 0.64x cuDNN
    "fwd-d64-full-1k": (Case(16, 1024, 32, 64, False), "fwd"),  # 0.91x
    "fwd-d128-full-16k": (Case(1, 16384, 16, 128, False), "fwd"),  # 0.84 of the ceiling
    "bwd-d128-full-4k": (Case(4, 4096, 16, 128, False), "fwd_bwd"),  # backward 0.81x
    "bwd-d128-causal-16k": (Case(1, 16384, 16, 128, True), "fwd_bwd"),  # backward 0.81x
    # the widest backward gap since s24 (0.91x cuDNN); 16k under ncu outruns TIMEOUT_S (s25)
    "bwd-d128-causal-4k": (Case(4, 4096, 16, 128, True), "fwd_bwd"),
    # tokamax's sm90 forward runs these tiles at 1.04-1.11x ours (HOPPER_PLAN 7z, 7za)
    "fwd-d128-causal-512": (Case(32, 512, 16, 128, True), "fwd"),  # 0.96x cuDNN (s29)
}
BACKENDS = ("flashjax_mosaic", "jax_cudnn")
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats")
PIPES = r"regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active"
# Instructions issued to each pipe against its peak: xu (MUFU: exp2) has no cycles-active metric
# above, and whether it binds the head dim 64 softmax decides `ForwardConfig.exp2_fma`.
ISSUED = r"regex:sm__inst_executed_pipe_[a-z]+\.avg\.pct_of_peak_sustained_active"
STALLS = r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
CONFLICTS = (
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
)
# Sectors of local memory (register spills) loaded and stored, and of global loads: session 10's
# profile showed flashjax's kernels stalled on the long scoreboard (L1TEX: global or local
# memory) 5x as often per instruction as cuDNN's.
MEMORY = (
    "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum",
    "l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
)
# L1TEX's throughput and its parts (ncu's `breakdown:`): the shared-memory data banks, which
# wgmma's shared-memory operands, the TMA's writes and the kernels' own stores all go through.
# Does the 5-GEMM backward (three of its five matmuls read both operands from shared memory at
# N = 64) run into them where the two kernels do not? (HOPPER_PLAN 7y)
L1TEX = "breakdown:l1tex__throughput.avg.pct_of_peak_sustained_active"
# DRAM bytes read and L2's hit rate: does a launch order re-read K/V from DRAM (HOPPER_PLAN 7z)?
DRAM = ("dram__bytes_read.sum", "lts__t_sector_hit_rate.pct")
METRICS = ("gpu__time_duration.sum", PIPES, ISSUED, STALLS, *CONFLICTS, *MEMORY, L1TEX, *DRAM)
TIMEOUT_S = 240
# The attention kernels of each backend (not XLA's fusions around them), for the SASS page.
ATTENTION_KERNELS = r"flashjax_mosaic|sdpa|flash_attention_sm90"  # ours, cuDNN's, tokamax's


def worker(backend_name: str, case_name: str, options: str | None = None) -> int:
    """Inside ncu: compile the case's program, run it once, then once inside the profiler
    range. `options` (comma-separated, maybe empty): the Mosaic kernel the case is about (the
    forward for a `fwd` case, the backward for a `fwd_bwd` one) runs its head dim's configs.py
    row with exactly these on/off options and none of its rules (`registers=C:P` among them:
    setmaxnreg's consumer and producer registers)."""
    import dataclasses

    import jax

    from flashjax.bench import backends, cases
    from pallas_kernels import configs

    case, kind = CASES[case_name]
    if options is not None:
        table = configs.MOSAIC_FORWARD if kind == "fwd" else configs.MOSAIC_BACKWARD
        row = table[case.head_dim]
        pinned = tuple(o for o in options.split(",") if o and not o.startswith("registers="))
        changes = {"options": pinned, "rules": ()}
        for o in options.split(","):  # `registers=240:24`: setmaxnreg's (consumer, producer)
            if o.startswith("registers="):
                if not hasattr(row, "registers"):
                    raise ValueError(f"--options {o}: only a backward row has registers")
                changes["registers"] = tuple(int(n) for n in o.split("=")[1].split(":"))
        table[case.head_dim] = dataclasses.replace(row, **changes)
    backend = next(b for b in backends.all_backends() if b.name == backend_name)
    if (why := backend.unavailable() or backend.unsupported(case)) is not None:
        print(f"{backend_name} cannot run {case_name}: {why}", file=sys.stderr)
        return 2
    runner = backend.runner(case, cases.make_inputs(case))
    runner.prepare(kind)
    jax.block_until_ready(runner.run(kind))
    with ncu.profiler_range():
        jax.block_until_ready(runner.run(kind))
    return 0


def _top(metrics: dict[str, float], prefix: str, suffix: str, count: int) -> str:
    """The `count` largest metrics named `prefix` + X + `suffix`, as "X value" pairs; of the
    ones with equal values (ncu's aliases: the tensor pipe under five names, "shared" among them)
    the shortest, a tensor pipe's first."""
    found = {
        name[len(prefix) : -len(suffix)]: value
        for name, value in metrics.items()
        if name.startswith(prefix) and name.endswith(suffix)
    }
    distinct: dict[float, str] = {}
    for name, value in sorted(
        found.items(), key=lambda kv: (not kv[0].startswith("tensor"), len(kv[0]))
    ):
        distinct.setdefault(value, name)
    best = sorted(((n, v) for v, n in distinct.items()), key=lambda kv: -kv[1])[:count]
    return ", ".join(f"{name} {value:.3g}" for name, value in best) or "-"


def summary(kernel: ncu.Kernel) -> str:
    """One kernel's line: what limits it, in ncu's words."""
    m = kernel.metrics
    duration = m.get("gpu__time_duration.sum")
    fields = [
        kernel.name[:60],
        f"{duration * 1e6:.1f} us" if duration is not None else "? us",
        f"SM {m.get('Compute (SM) Throughput', float('nan')):.0f}%",
        f"mem {m.get('Memory Throughput', float('nan')):.0f}%",
        f"regs {m.get('Registers Per Thread', float('nan')):.0f}",
        f"occupancy {m.get('Achieved Occupancy', float('nan')):.1f}%",
        "pipes: " + _top(m, "sm__pipe_", "_cycles_active.avg.pct_of_peak_sustained_active", 4),
        "issued: " + _top(m, "sm__inst_executed_pipe_", ".avg.pct_of_peak_sustained_active", 4),
        "stalls: " + _top(m, "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio", 5),
        "l1tex: " + _top(m, "l1tex__", ".avg.pct_of_peak_sustained_active", 4),
        "bank conflicts ld/st: " + "/".join(f"{m[c]:.3g}" if c in m else "?" for c in CONFLICTS),
        "sectors local ld/st, global ld: "
        + "/".join(f"{m[c]:.3g}" if c in m else "?" for c in MEMORY),
        "DRAM read bytes, L2 hit %: " + "/".join(f"{m[c]:.3g}" if c in m else "?" for c in DRAM),
    ]
    return " | ".join(fields)


def _target(backend_name: str, case_name: str, options: str | None) -> list[str]:
    """The worker's command line."""
    target = [sys.executable, __file__, "--worker", backend_name, case_name]
    return target + (["--options", options] if options is not None else [])


def _run_names(case_name: str, backend_name: str, options: str | None) -> tuple[str, str]:
    """A run's name in the summary ("CASE BACKEND") and its files' stem ("CASE-BACKEND"), each
    with the forward's options when they are given (`+`-joined, or `none`)."""
    tag = "" if options is None else options.replace(",", "+") or "none"
    return (
        f"{case_name} {backend_name}" + (f" {tag}" if tag else ""),
        f"{case_name}-{backend_name}" + (f"-{tag}" if tag else ""),
    )


def _failed(stem: Path, code: int | None, stdout: str, stderr: str) -> str:
    """Why a run failed, in one line; its stderr (the profiled program's traceback with ncu's
    lines) kept beside its CSV as STEM.err."""
    stem.with_name(stem.name + ".err").write_text(stderr)
    return "timed out" if code is None else ncu.failure_reason(stdout + stderr, code)


def profile(
    out: Path,
    case_name: str,
    backend_name: str,
    ncu_path: str,
    options: str | None = None,
) -> list[str]:
    """Run one worker under ncu; its CSV in `out`, the summary lines."""
    target = _target(backend_name, case_name, options)
    cmd = ncu.command(ncu_path, target, METRICS, kernel_regex=ATTENTION_KERNELS, sections=SECTIONS)
    code, stdout, stderr = ncu.run(cmd, TIMEOUT_S)
    if code != 0 and ncu.unknown_metric(stdout + stderr):  # a pattern this ncu lacks: sections
        cmd = ncu.command(
            ncu_path,
            target,
            ("gpu__time_duration.sum",),
            kernel_regex=ATTENTION_KERNELS,
            sections=SECTIONS,
        )
        code, stdout, stderr = ncu.run(cmd, TIMEOUT_S)
    head, stem = _run_names(case_name, backend_name, options)
    (out / f"{stem}.csv").write_text(stdout)
    if code != 0:
        return [f"{head}: {_failed(out / stem, code, stdout, stderr)}"]
    return [head] + ["  " + summary(k) for k in ncu.parse_csv(stdout)]


def profile_sass(
    out: Path,
    case_name: str,
    backend_name: str,
    ncu_path: str,
    options: str | None = None,
) -> str:
    """Run one worker under ncu for its source page; the CSV in `out`, one line saying how
    many lines it has or why it failed."""
    target = _target(backend_name, case_name, options)
    cmd = ncu.command(
        ncu_path,
        target,
        ("gpu__time_duration.sum",),
        kernel_regex=ATTENTION_KERNELS,
        sections=("SourceCounters",),
        sass=True,
    )
    code, stdout, stderr = ncu.run(cmd, TIMEOUT_S)
    head, stem = _run_names(case_name, backend_name, options)
    path = out / f"{stem}-sass.csv"
    path.write_text(stdout)
    head += " sass"
    if code != 0:
        return f"{head}: {_failed(path.with_suffix(''), code, stdout, stderr)}"
    return f"{head}: {len(stdout.splitlines())} lines in {path.name}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", type=Path)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--worker", nargs=2, metavar=("BACKEND", "CASE"))
    p.add_argument("--ncu", default=None, help="the ncu executable (default: found)")
    p.add_argument("--sass", action="store_true", help="also each kernel's SASS with its stalls")
    p.add_argument(
        "--options",
        action="append",
        help="comma-separated: flashjax_mosaic's kernel of the case (a fwd case's forward, a "
        "fwd_bwd case's backward) with exactly these options (its row's "
        "rules off), to profile a candidate; empty for none; repeat for several candidates",
    )
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker, *(args.options or [])[-1:])
    if args.out is None:
        p.error("OUT is required")
    names = args.cases.split(",")
    if unknown := [n for n in names if n not in CASES]:
        p.error(f"unknown cases {unknown}; known: {list(CASES)}")
    ncu_path = ncu.find_ncu(args.ncu)
    if ncu_path is None:
        p.error("ncu not found (--ncu)")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "summary.txt", "w") as summary_file:  # written as each run ends
        for name in names:
            for backend in args.backends.split(","):
                candidates = args.options if backend == "flashjax_mosaic" else None
                for options in candidates or [None]:
                    lines = profile(args.out, name, backend, ncu_path, options)
                    if args.sass:
                        lines.append(profile_sass(args.out, name, backend, ncu_path, options))
                    text = "\n".join(lines)
                    print(text, flush=True)
                    summary_file.write(text + "\n")
                    summary_file.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
