"""Run every backend on every case: compile, check against the reference, then time.

Each (case, backend) yields one row per requested mode. A backend that is skipped, raises, runs
out of memory or fails the check becomes a row whose `status` says so ("skipped", "error", "oom",
"check_failed"; "unchecked" when the reference itself could not run); the sweep goes on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import flashjax
from flashjax.bench import timing
from flashjax.bench.backends import KINDS, OUTPUT_NAMES, Backend, Inputs, Runner
from flashjax.bench.cases import Case, make_inputs, reference_slice
from flashjax.bench.flops import MODES

Row = dict[str, Any]
Log = Callable[[str], None]
OK_STATUSES = ("ok", "unchecked")
DEFAULT_REFERENCE_BUDGET = 2 * 2**30

# Relative L2 error allowed against the float32 reference: (output, gradients), by input dtype.
# bf16 rounding alone gives ~4e-3 on the output; a wrong kernel gives O(1).
TOLERANCES: dict[str, tuple[float, float]] = {
    "bfloat16": (2e-2, 5e-2),
    "float16": (5e-3, 1e-2),
    "float32": (5e-3, 1e-2),
}


def kinds_for(modes: Sequence[str]) -> tuple[str, ...]:
    """The programs the modes need: fwd -> "fwd", fwd+bwd -> "fwd_bwd", bwd -> both."""
    needed = set()
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
        needed |= {"fwd"} if mode == "fwd" else {"fwd_bwd"} if mode == "fwd+bwd" else set(KINDS)
    return tuple(k for k in KINDS if k in needed)


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    """`||got - want|| / ||want||` in float64 (NaN anywhere gives NaN)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-30))


def describe_error(e: BaseException) -> tuple[str, str]:
    """`(status, message)` for an exception: "oom" for out-of-memory, else "error"."""
    text = str(e).strip()
    lowered = text.lower()
    oom = (
        "resource_exhausted" in lowered
        or "out of memory" in lowered
        or "outofmemory" in type(e).__name__.lower()
    )
    first = text.splitlines()[0] if text else ""
    return ("oom" if oom else "error"), f"{type(e).__name__}: {first}"[:400]


class Reference:
    """The float32 reference (`flashjax`'s `implementation="xla"`) on a leading (batch, head) slice.

    Computed once per case, on first use, at the highest matmul precision.
    """

    def __init__(self, case: Case, inputs: Inputs, budget_bytes: int) -> None:
        self.case = case
        self.batch, self.heads = reference_slice(case, budget_bytes)
        self._inputs = inputs
        self._result: tuple[np.ndarray, ...] | None = None
        self._error: str | None = None
        self.seconds = 0.0

    def _compute(self) -> tuple[np.ndarray, ...]:
        case = self.case

        def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            return flashjax.dot_product_attention(
                q, k, v, is_causal=case.causal, local_window_size=case.window, implementation="xla"
            )

        def fwd_bwd(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array) -> tuple:
            out, pullback = jax.vjp(attention, q, k, v)
            return (out, *pullback(do))

        q, k, v, do = (x[: self.batch, :, : self.heads].astype(jnp.float32) for x in self._inputs)
        with jax.default_matmul_precision("highest"):
            lowered = jax.jit(fwd_bwd).lower(q, k, v, do)
        # Its speed is irrelevant: no GEMM autotuning (seconds per new shape on a GPU).
        options = {"xla_gpu_autotune_level": 0} if q.devices().pop().platform == "gpu" else {}
        results = lowered.compile(compiler_options=options)(q, k, v, do)
        return tuple(np.asarray(jax.device_get(x), np.float32) for x in results)

    def get(self, kind: str) -> tuple[np.ndarray, ...]:
        """The reference outputs of program `kind` (raises RuntimeError if it cannot run)."""
        if self._result is None and self._error is None:
            start = time.perf_counter()
            try:
                self._result = self._compute()
            except Exception as e:
                self._error = describe_error(e)[1]
            self.seconds = time.perf_counter() - start
        if self._result is None:
            raise RuntimeError(f"reference failed: {self._error}")
        return self._result[: len(OUTPUT_NAMES[kind])]


@dataclasses.dataclass
class KindResult:
    """What one program ("fwd" or "fwd_bwd") of one backend gave on one case."""

    status: str
    error: str = ""
    seconds: float | None = None
    temp_bytes: int | None = None
    peak_bytes: int | None = None
    rel_err: float | None = None
    rel_errs: dict[str, float] = dataclasses.field(default_factory=dict)
    compile_s: float | None = None


def check(
    got: Sequence[np.ndarray], want: Sequence[np.ndarray], kind: str, dtype: str
) -> tuple[bool, dict[str, float], str]:
    """Compare a backend's outputs with the reference's: `(passed, rel errors, message)`."""
    names = OUTPUT_NAMES[kind]
    if len(got) != len(want):
        return False, {}, f"{kind} returned {len(got)} arrays, expected {len(want)}"
    out_tol, grad_tol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    errs: dict[str, float] = {}
    bad = []
    for name, g, w in zip(names, got, want, strict=True):
        if g.shape != w.shape:
            return False, errs, f"{name} has shape {g.shape}, expected {w.shape}"
        errs[name] = rel_l2(g, w)
        tol = out_tol if name == "out" else grad_tol
        if not errs[name] <= tol:  # NaN fails too
            bad.append(f"{name} rel L2 err {errs[name]:.3g} > {tol:g}")
    return not bad, errs, "; ".join(bad)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The outcome of compiling one program: its temp bytes, or the exception it raised."""

    temp_bytes: int | None = None
    error: BaseException | None = None
    seconds: float | None = None


def prepare(runner: Runner, kind: str) -> Prepared:
    """Compile program `kind` of `runner`, catching any failure (safe to call from a thread)."""
    start = time.perf_counter()
    try:
        temp = runner.prepare(kind)
    except Exception as e:
        return Prepared(None, e, time.perf_counter() - start)
    return Prepared(temp, None, time.perf_counter() - start)


def check_kind(
    runner: Runner,
    kind: str,
    case: Case,
    reference: Reference,
    prepared: Prepared | None = None,
) -> KindResult:
    """Compile (unless `prepared`) and check one program, untimed; failures become the status."""
    prepared = prepared or prepare(runner, kind)
    if prepared.error is not None:
        return KindResult(*describe_error(prepared.error), compile_s=prepared.seconds)
    result = functools.partial(
        KindResult, temp_bytes=prepared.temp_bytes, compile_s=prepared.seconds
    )
    try:
        got = runner.outputs(kind, reference.batch, reference.heads)
    except Exception as e:
        return result(*describe_error(e))
    status, message, errs = "ok", "", {}
    try:
        want = reference.get(kind)
    except RuntimeError as e:
        status, message = "unchecked", str(e)
    else:
        passed, errs, why = check(got, want, kind, case.dtype)
        if not passed:
            worst = max(errs.values(), default=None)
            return result("check_failed", why, rel_err=worst, rel_errs=errs)
    return result(status, message, rel_err=max(errs.values(), default=None), rel_errs=errs)


def with_timing(
    result: KindResult, timed: timing.Timing | Exception | None, runner: Runner
) -> KindResult:
    """A checked program's result with its time (None: it was not timed, having failed)."""
    if timed is None:
        return result
    if isinstance(timed, Exception):
        status, error = describe_error(timed)
        return dataclasses.replace(result, status=status, error=error, rel_err=None)
    return dataclasses.replace(result, seconds=timed.seconds, peak_bytes=runner.peak_bytes())


def _row(case: Case, backend: str, mode: str, result: KindResult, seconds: float | None) -> Row:
    flops = case.flops(mode)
    ms = None if seconds is None else seconds * 1e3
    tflops = flops / seconds / 1e12 if seconds is not None and seconds > 0 else None
    return {
        "dtype": case.dtype,
        "batch": case.batch,
        "seq_q": case.seq,
        "seq_k": case.seq,
        "heads": case.heads,
        "head_dim": case.head_dim,
        "causal": case.causal,
        "window": None if case.window is None else list(case.window),
        "backend": backend,
        "mode": mode,
        "ms": ms,
        "tflops": tflops,
        "flops": flops,
        "status": result.status,
        "rel_err": result.rel_err,
        "rel_errs": result.rel_errs,
        "temp_bytes": result.temp_bytes,
        "peak_bytes": result.peak_bytes,
        "compile_s": result.compile_s,
        "error": result.error,
    }


def rows_for_modes(
    case: Case, backend: str, modes: Sequence[str], results: dict[str, KindResult]
) -> list[Row]:
    """One row per mode; "bwd" is fwd_bwd's time minus fwd's, with fwd_bwd's memory."""
    rows = []
    for mode in modes:
        if mode == "fwd":
            rows.append(_row(case, backend, mode, results["fwd"], results["fwd"].seconds))
        elif mode == "fwd+bwd":
            fb = results["fwd_bwd"]
            rows.append(_row(case, backend, mode, fb, fb.seconds))
        else:
            fwd, fb = results["fwd"], results["fwd_bwd"]
            pair = (("fwd_bwd", fb), ("fwd", fwd))
            failed = [(k, r) for k, r in pair if r.status not in OK_STATUSES]
            if failed:
                kind, bad = failed[0]
                error = bad.error if fwd.error == fb.error else f"{kind}: {bad.error}"
                result = dataclasses.replace(bad, error=error, temp_bytes=fb.temp_bytes)
                rows.append(_row(case, backend, mode, result, None))
                continue
            seconds = fb.seconds - fwd.seconds
            result = fb
            if seconds <= 0:
                result = dataclasses.replace(fb, error="fwd+bwd not slower than fwd (timing noise)")
            rows.append(_row(case, backend, mode, result, seconds))
    return rows


def bench_case(
    case: Case,
    backends: Sequence[Backend],
    modes: Sequence[str],
    policy: timing.TimingPolicy,
    *,
    seed: int = 0,
    reference_budget: int = DEFAULT_REFERENCE_BUDGET,
    compile_workers: int = 1,
    log: Callable[[str, list[Row]], None] | None = None,
    phases: dict[str, float] | None = None,
) -> list[Row]:
    """All rows of every backend on one case; a backend's failure never raises.

    With `compile_workers` > 1, phase 1 compiles ahead: backends in the "parallel" compile lane
    in a pool of `compile_workers` threads and, beside it, those in the "serial" lane one at a
    time in one more thread (see `Backend.compile_lane`). Phase 2 goes through the backends one
    at a time: compile what is left, run once, check; then every program that passed is timed,
    `policy.rounds` times, the backends interleaved (`timing.interleaved`). Nothing is timed
    while anything compiles. `phases` (if given) receives the seconds spent in each part.
    """
    start = time.perf_counter()
    inputs = make_inputs(case, seed)
    reference = Reference(case, inputs, reference_budget)
    kinds = kinds_for(modes)
    runners: dict[str, Runner | KindResult] = {}
    for backend in backends:
        why = backend.unsupported(case)
        if why is not None:
            runners[backend.name] = KindResult("skipped", why)
            continue
        try:
            runners[backend.name] = backend.runner(case, inputs)
        except Exception as e:
            runners[backend.name] = KindResult(*describe_error(e))

    def jobs(lane: str) -> list[tuple[str, str]]:
        return [
            (b.name, kind)
            for b in backends
            if b.compile_lane == lane and isinstance(runners[b.name], Runner)
            for kind in kinds
        ]

    prepared: dict[tuple[str, str], Prepared] = {}
    setup_done = time.perf_counter()
    if compile_workers > 1:
        with (
            concurrent.futures.ThreadPoolExecutor(compile_workers) as pool,
            concurrent.futures.ThreadPoolExecutor(1) as lane,
        ):
            futures = {
                job: pool.submit(prepare, runners[job[0]], job[1]) for job in jobs("parallel")
            }
            for job in jobs("serial"):
                futures[job] = lane.submit(prepare, runners[job[0]], job[1])
            prepared = {job: future.result() for job, future in futures.items()}
    compiled = time.perf_counter()

    live = {name: r for name, r in runners.items() if isinstance(r, Runner)}
    try:
        checked = {
            name: {
                kind: check_kind(runner, kind, case, reference, prepared.pop((name, kind), None))
                for kind in kinds
            }
            for name, runner in live.items()
        }
        jobs = {
            (name, kind): functools.partial(live[name].time, kind, policy)
            for name, results in checked.items()
            for kind, result in results.items()
            if result.status in OK_STATUSES
        }
        timings = timing.interleaved(jobs, policy.rounds)
    finally:
        for runner in live.values():
            try:
                runner.close()
            except Exception:
                pass
    rows: list[Row] = []
    for backend in backends:
        runner = runners[backend.name]
        if isinstance(runner, KindResult):
            results = dict.fromkeys(KINDS, runner)
        else:
            results = {
                kind: with_timing(result, timings.get((backend.name, kind)), runner)
                for kind, result in checked[backend.name].items()
            }
        new = rows_for_modes(case, backend.name, modes, results)
        rows.extend(new)
        if log is not None:
            log(backend.name, new)
    if phases is not None:
        end = time.perf_counter()
        phases["setup"] = setup_done - start
        phases["compile_ahead"] = compiled - setup_done
        phases["reference"] = reference.seconds
        phases["check_and_time"] = end - compiled - reference.seconds
    return rows


def _fmt_row(row: Row) -> str:
    if row["status"] in OK_STATUSES and row["ms"] is not None:
        text = f"{row['mode']} {row['ms']:.3f} ms"
        if row["tflops"] is not None:
            text += f" {row['tflops']:.4g} TF/s"
        return text + ("" if row["status"] == "ok" else " (unchecked)")
    return f"{row['mode']} {row['status'].upper()}"


def progress_line(index: int, total: int, case: Case, backend: str, rows: Sequence[Row]) -> str:
    """One stdout line per (case, backend)."""
    parts = [_fmt_row(r) for r in rows]
    errs = [r["rel_err"] for r in rows if r["rel_err"] is not None]
    temps = [r["temp_bytes"] for r in rows if r["temp_bytes"] is not None]
    tail = []
    if errs:
        tail.append(f"err {max(errs):.1e}")
    if temps:
        tail.append(f"temp {max(temps) / 2**20:.1f} MiB")
    errors = sorted({r["error"] for r in rows if r["error"]})
    line = f"[{index}/{total}] {case.label:<28} {backend:<16} " + " | ".join(parts + tail)
    if errors:
        line += "  -- " + " / ".join(errors)[:300]
    return line


def run_sweep(
    cases: Sequence[Case],
    backends: Sequence[Backend],
    modes: Sequence[str] = MODES,
    policy: timing.TimingPolicy | None = None,
    *,
    seed: int = 0,
    reference_budget: int = DEFAULT_REFERENCE_BUDGET,
    compile_workers: int = 1,
    log: Log = print,
    on_case_done: Callable[[list[Row]], None] | None = None,
    deadline: float | None = None,
) -> list[Row]:
    """Benchmark `backends` (assumed available) on `cases`; returns every row.

    Logs one progress line per (case, backend); `on_case_done(rows_so_far)` runs after each case
    (the CLI writes partial results there). No case starts after `deadline` (a
    `time.perf_counter()` value).
    """
    policy = policy or timing.TimingPolicy()
    rows: list[Row] = []
    for i, case in enumerate(cases, 1):
        if deadline is not None and time.perf_counter() > deadline:
            log(f"time budget spent: {len(cases) - i + 1} of {len(cases)} shapes not run")
            break
        start, phases = time.perf_counter(), {}

        def log_backend(name: str, new: list[Row], i: int = i, case: Case = case) -> None:
            log(progress_line(i, len(cases), case, name, new))

        rows += bench_case(
            case,
            backends,
            modes,
            policy,
            seed=seed,
            reference_budget=reference_budget,
            compile_workers=compile_workers,
            log=log_backend,
            phases=phases,
        )
        parts = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
        log(f"[{i}/{len(cases)}] {case.label} took {time.perf_counter() - start:.1f} s ({parts})")
        if on_case_done is not None:
            on_case_done(rows)
    return rows
