"""`python -m flashjax bench --sparsity`: block-sparse attention time against density.

FlashAttention's Fig. 2 (right): block-sparse FlashAttention's runtime falls in proportion to the
fraction of blocks it computes. For each shape (`B, T = S, N = hidden / H, H`; causal or not) and
each block pattern, every backend (`sparsity_backends`) runs the forward and forward+backward with
the same pattern, and each row reports

  ms         median of timed batches (`flashjax.bench.timing`)
  density    visible pairs / (T * S): the pattern ANDed with the causal rule, counted exactly by
             `flops.visible_pairs` (THE visibility rule)
  rel        visible pairs / the dense call's visible pairs: the fraction of the dense work left
             (= density without causal; about 2 * density with it)
  tflops     FLOPs on the visible pairs only (4 * B * N * pairs * H; x3.5 for fwd+bwd)
  ratio      ms / the same backend's dense ms at the same shape and mode
  bar        1.15 * rel + 0.03; `verdict` "pass" when ratio <= bar, else "fail" ("ref" for the
             dense row itself)

Patterns (block size 128 on a GPU): `dense` (no mask: the reference point), `butterfly` (the
paper's flat butterfly, `flashjax.block_masks.butterfly`) and `random` at block densities 5, 10,
25, 50% (`random_blocks`: seeded, the diagonal blocks always kept, the other blocks drawn without
replacement until the block density is reached; the same pattern for causal and non-causal calls).

A forward's output is checked against standard attention in float32 on batch row 0 and head 0
(up to `REFERENCE_MAX_SEQ`; beyond, rows are "unchecked"). A backend that raises, runs out of
memory or is over its memory budget becomes a row saying so.

Then `longest`: butterfly, forward+backward, non-causal, at the largest head dim, from 64k up,
doubling the length until a call fails (out of memory) or the time budget is spent: the first
step is the 64k forward+backward butterfly row, the last "ok" one the longest sequence that fits.

Outputs (`sparsity_report`): sparsity.json, sparsity.csv, sparsity.png and a table on stdout.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flashjax.bench import cases, flops, sweep, timing
from flashjax.bench.cases import Case
from flashjax.bench.sparsity_backends import SparseBackend, SparseRunner, reference_output
from flashjax.bench.sparsity_patterns import Pattern, butterfly, from_blocks, random_blocks

Row = dict[str, Any]
Log = Callable[[str], None]
BAR_SLOPE, BAR_OFFSET = 1.15, 0.03
REFERENCE_MAX_SEQ = 16384  # one head's float32 (T, T) scores: 1 GiB
KIND_OF_MODE = {"fwd": "fwd", "fwd+bwd": "fwd_bwd"}
MODES = tuple(KIND_OF_MODE)


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """One `--sparsity` run. Heads are `hidden // head_dim` (>= 1)."""

    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...]
    causal: tuple[bool, ...] = (False, True)
    densities: tuple[float, ...] = (0.05, 0.10, 0.25, 0.50)
    block: int = 128
    modes: tuple[str, ...] = MODES
    batch: int = 1
    hidden: int = 2048
    dtype: str = "bfloat16"
    seed: int = 0
    longest_from: int | None = 65536  # None: no longest-sequence search
    longest_max: int = 1 << 24
    longest_budget_s: float = 90.0

    def heads(self, head_dim: int) -> int:
        return max(1, self.hidden // head_dim)

    def cases(self) -> list[Case]:
        """The shapes, longest sequences first (a run cut short keeps the headline numbers)."""
        return [
            Case(self.batch, seq, self.heads(h), h, causal, self.dtype)
            for seq in sorted(set(self.seqlens), reverse=True)
            for h in self.head_dims
            for causal in self.causal
        ]


# --------------------------------------------------------------------------------------------------
# Patterns and their exact pair counts
# --------------------------------------------------------------------------------------------------


def patterns(seq: int, cfg: SparsityConfig) -> list[Pattern]:
    """Dense first (every ratio's reference), then butterfly, then random at each density."""
    n = -(-seq // cfg.block)
    found = [Pattern("dense", cfg.block), butterfly(seq, cfg.block)]
    for i, d in enumerate(cfg.densities):
        blocks = random_blocks(n, d, cfg.seed + i)
        found.append(from_blocks("random", blocks, cfg.block, d))
    return found


def pair_counts(case: Case, found: Sequence[Pattern]) -> dict[str, int]:
    """Exact visible pairs of one (batch row, head) for each pattern, and for dense attention."""
    return {
        p.label: flops.visible_pairs(case.seq, case.seq, case.causal, None, p.mask) for p in found
    }


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def base_row(case: Case, pattern: Pattern, pairs: int | None, study: str) -> Row:
    """The shape and pattern fields of a row (nothing measured yet)."""
    seq = case.seq
    return {
        "study": study,
        "dtype": case.dtype,
        "batch": case.batch,
        "seq_q": seq,
        "seq_k": seq,
        "heads": case.heads,
        "head_dim": case.head_dim,
        "causal": case.causal,
        "pattern": pattern.name,
        "target_density": pattern.target,
        "label": pattern.label,
        "block": pattern.block,
        "block_density": pattern.block_density,
        "pairs": pairs,
        "density": None if pairs is None else pairs / (seq * seq),
    }


def measured(
    row: Row,
    backend: str,
    mode: str,
    status: str,
    error: str = "",
    *,
    seconds: float | None = None,
    rel_err: float | None = None,
) -> Row:
    """`row` with one backend's result in one mode; FLOPs count visible pairs only."""
    case_flops = None
    if row["pairs"] is not None:
        dense = 4.0 * row["batch"] * row["heads"] * row["pairs"] * row["head_dim"]
        case_flops = dense * flops.MODE_FACTORS[mode]
    ms = None if seconds is None else seconds * 1e3
    ok = seconds is not None and seconds > 0 and case_flops is not None
    return row | {
        "backend": backend,
        "mode": mode,
        "ms": ms,
        "flops": case_flops,
        "tflops": case_flops / seconds / 1e12 if ok else None,
        "status": status,
        "rel_err": rel_err,
        "error": error,
    }


def _shape_key(row: Row) -> tuple:
    return (row["study"], row["backend"], row["seq_q"], row["head_dim"], row["causal"], row["mode"])


def finalize(rows: Sequence[Row]) -> list[Row]:
    """New rows with `rel`, `ratio`, `bar` and `verdict` against the same backend's dense row."""
    dense = {_shape_key(r): r for r in rows if r["pattern"] == "dense"}
    out = []
    for r in rows:
        ref = dense.get(_shape_key(r))
        rel = ratio = bar = verdict = None
        if ref is not None and ref["pairs"] and r["pairs"] is not None:
            rel = r["pairs"] / ref["pairs"]
            bar = BAR_SLOPE * rel + BAR_OFFSET
        if ref is not None and r["ms"] is not None and ref["ms"]:
            ratio = r["ms"] / ref["ms"]
        if r["pattern"] == "dense" and r["ms"] is not None:
            verdict = "ref"
        elif ratio is not None and bar is not None:
            verdict = "pass" if ratio <= bar else "fail"
        out.append(r | {"rel": rel, "ratio": ratio, "bar": bar, "verdict": verdict})
    return out


# --------------------------------------------------------------------------------------------------
# Measuring one shape
# --------------------------------------------------------------------------------------------------


class Check:
    """The float32 reference outputs of one shape, per pattern, computed on first use; disabled
    past `REFERENCE_MAX_SEQ`."""

    def __init__(self, case: Case, inputs: tuple, enabled: bool) -> None:
        self.case, self.inputs, self.enabled = case, inputs, enabled
        self._outputs: dict[str, np.ndarray] = {}

    def rel_err(self, pattern: Pattern, output: Callable[[], np.ndarray]) -> float | None:
        """`output()`'s relative L2 error, or None (not run) when the check is disabled."""
        if not self.enabled:
            return None
        if pattern.label not in self._outputs:
            self._outputs[pattern.label] = reference_output(pattern, self.case, self.inputs)
        return sweep.rel_l2(output(), self._outputs[pattern.label])


def _failed_rows(
    base: Row, backend: str, modes: Sequence[str], error: BaseException | str, status="skipped"
) -> list[Row]:
    """One row per mode saying why nothing was measured (`error`: an exception or a reason)."""
    if isinstance(error, BaseException):
        status, error = sweep.describe_error(error)
    return [measured(base, backend, m, status, error) for m in modes]


def _compile_ahead(
    runner: SparseRunner, kinds: Sequence[str], found: Sequence[Pattern], workers: int
) -> dict[tuple[str, bool], BaseException]:
    """Compile the dense and the masked program of each kind in threads; failures by program."""
    jobs = {(kind, p.mask is not None): p for kind in kinds for p in found[:2]}
    failures: dict[tuple[str, bool], BaseException] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {key: pool.submit(runner.prepare, key[0], p) for key, p in jobs.items()}
        for key, future in futures.items():
            if (error := future.exception()) is not None:
                failures[key] = error
    return failures


def _measure_pattern(
    runner: SparseRunner,
    backend: str,
    row: Row,
    pattern: Pattern,
    modes: Sequence[str],
    check: Check,
    policy: timing.TimingPolicy,
) -> list[Row]:
    """Check the forward against the reference, then time each mode; failures become rows."""
    tol = sweep.TOLERANCES.get(row["dtype"], sweep.TOLERANCES["float32"])[0]
    try:
        rel_err = check.rel_err(pattern, lambda: runner.output(pattern))
    except Exception as e:
        return _failed_rows(row, backend, modes, e)
    if rel_err is not None and not rel_err <= tol:
        why = f"out rel L2 err {rel_err:.3g} > {tol:g}"
        return [measured(row, backend, m, "check_failed", why, rel_err=rel_err) for m in modes]
    status = "ok" if rel_err is not None else "unchecked"
    rows = []
    for mode in modes:
        try:
            run = runner.program(KIND_OF_MODE[mode], pattern)
            seconds = timing.median_time(run, runner.measure, policy).seconds
            rows.append(measured(row, backend, mode, status, seconds=seconds, rel_err=rel_err))
        except Exception as e:
            rows.append(measured(row, backend, mode, *sweep.describe_error(e), rel_err=rel_err))
    return rows


def measure_backend(
    backend: SparseBackend,
    case: Case,
    inputs: tuple,
    found: Sequence[Pattern],
    base: dict[str, Row],
    modes: Sequence[str],
    check: Check,
    policy: timing.TimingPolicy,
    workers: int,
) -> list[Row]:
    """Every (pattern, mode) row of one backend on one shape."""
    if (why := backend.limit(case)) is not None:
        return [r for p in found for r in _failed_rows(base[p.label], backend.name, modes, why)]
    try:
        runner = backend.bind(case, inputs)
    except Exception as e:
        return [r for p in found for r in _failed_rows(base[p.label], backend.name, modes, e)]
    try:
        kinds = [KIND_OF_MODE[m] for m in modes]
        failures = {}
        if backend.compile_lane == "parallel" and workers > 1:
            failures = _compile_ahead(runner, kinds, found, workers)
        rows = []
        for p in found:
            failed = [
                failures[k, p.mask is not None]
                for k in kinds
                if (k, p.mask is not None) in failures
            ]
            if failed:
                rows += _failed_rows(base[p.label], backend.name, modes, failed[0])
            else:
                rows += _measure_pattern(
                    runner, backend.name, base[p.label], p, modes, check, policy
                )
        return rows
    finally:
        runner.close()


def measure_case(
    case: Case,
    cfg: SparsityConfig,
    chosen: Sequence[SparseBackend],
    policy: timing.TimingPolicy,
    workers: int,
    log: Log,
) -> list[Row]:
    """Every row of one shape: patterns, exact pair counts, then each backend."""
    found = patterns(case.seq, cfg)
    counts = pair_counts(case, found)
    base = {p.label: base_row(case, p, counts[p.label], "grid") for p in found}
    inputs = cases.make_inputs(case, cfg.seed)
    check = Check(case, inputs, enabled=case.seq <= REFERENCE_MAX_SEQ)
    rows: list[Row] = []
    for backend in chosen:
        new = measure_backend(backend, case, inputs, found, base, cfg.modes, check, policy, workers)
        log(progress_line(case, backend.name, new))
        rows += new
    del inputs
    gc.collect()
    return rows


def progress_line(case: Case, backend: str, rows: Sequence[Row]) -> str:
    """One stdout line per (shape, backend): ms per pattern and mode, or the failure."""
    parts = []
    for r in rows:
        if r["ms"] is not None:
            parts.append(f"{r['label']} {r['mode']} {r['ms']:.3g}")
        elif r["status"] != "ok":
            parts.append(f"{r['label']} {r['mode']} {r['status'].upper()}")
    errors = sorted({r["error"] for r in rows if r["error"]})
    line = f"{case.label:<26} {backend:<16} ms: " + ", ".join(parts)
    return line + ("  -- " + " / ".join(errors)[:300] if errors else "")


# --------------------------------------------------------------------------------------------------
# The longest sequence that fits (butterfly, forward+backward)
# --------------------------------------------------------------------------------------------------


def _longest_step(
    backend: SparseBackend, case: Case, cfg: SparsityConfig, policy: timing.TimingPolicy
) -> Row:
    """One length of the search: time butterfly fwd+bwd (no check), then count its pairs."""
    pattern = butterfly(case.seq, cfg.block)
    row = base_row(case, pattern, None, "longest")
    runner = None
    try:
        inputs = cases.make_inputs(case, cfg.seed)
        runner = backend.bind(case, inputs)
        runner.prepare("fwd_bwd", pattern)
        timed = timing.median_time(runner.program("fwd_bwd", pattern), runner.measure, policy)
    except Exception as e:
        return measured(row, backend.name, "fwd+bwd", *sweep.describe_error(e))
    finally:
        if runner is not None:
            runner.close()
        inputs = None
        gc.collect()
    try:
        row = base_row(case, pattern, pair_counts(case, [pattern])[pattern.label], "longest")
    except Exception:  # the count needs (T / block)^2 block states; the timing stands without it
        pass
    return measured(row, backend.name, "fwd+bwd", "ok", seconds=timed.seconds)


def longest(
    backend: SparseBackend,
    cfg: SparsityConfig,
    policy: timing.TimingPolicy,
    deadline: float,
    log: Log,
) -> list[Row]:
    """Butterfly fwd+bwd from `cfg.longest_from`, doubling until a call fails, the length passes
    `cfg.longest_max` or `deadline` (a `time.perf_counter()` value) has passed."""
    head_dim = max(cfg.head_dims)
    rows: list[Row] = []
    seq = cfg.longest_from
    while seq is not None and seq <= cfg.longest_max:
        if time.perf_counter() > deadline:
            log(f"longest: time budget spent before T={seq}")
            break
        case = Case(1, seq, cfg.heads(head_dim), head_dim, False, cfg.dtype)
        row = _longest_step(backend, case, cfg, policy)
        rows.append(row)
        shown = "" if row["ms"] is None else f" {row['ms']:.4g} ms"
        log(f"longest: T={seq} butterfly fwd+bwd {row['status'].upper()}{shown} {row['error']}")
        if row["status"] != "ok":
            break
        seq *= 2
    return rows


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def skipped_rows(
    case: Case, cfg: SparsityConfig, chosen: Sequence[SparseBackend], why: str
) -> list[Row]:
    """Rows for a shape the time budget left out (no pair counts: nothing was computed)."""
    return [
        row
        for p in patterns(case.seq, cfg)
        for b in chosen
        for row in _failed_rows(base_row(case, p, None, "grid"), b.name, cfg.modes, why)
    ]


def run(
    cfg: SparsityConfig,
    chosen: Sequence[SparseBackend],
    policy: timing.TimingPolicy,
    *,
    workers: int = 1,
    deadline: float | None = None,
    log: Log = print,
    on_progress: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Every row: each shape (none started after `deadline`), then the longest-sequence search
    with flashjax, which has its own budget (`cfg.longest_budget_s`, from its start)."""
    rows: list[Row] = []
    for case in cfg.cases():
        if deadline is not None and time.perf_counter() > deadline:
            rows += skipped_rows(case, cfg, chosen, "time budget (--max-minutes) spent")
            continue
        started = time.perf_counter()
        rows += measure_case(case, cfg, chosen, policy, workers, log)
        log(f"{case.label} took {time.perf_counter() - started:.1f} s")
        if on_progress is not None:
            on_progress(rows)
    flash = next((b for b in chosen if b.name == "flashjax"), None)
    if cfg.longest_from is not None and flash is not None:
        rows += longest(flash, cfg, policy, time.perf_counter() + cfg.longest_budget_s, log)
        if on_progress is not None:
            on_progress(rows)
    return rows


def longest_fit(rows: Sequence[Row]) -> int | None:
    """The longest sequence the search ran ("ok"), or None."""
    ok = [r["seq_q"] for r in rows if r["study"] == "longest" and r["status"] == "ok"]
    return max(ok, default=None)
