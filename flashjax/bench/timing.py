"""Timing: warm up, then the median of repeated timed batches, each ending in a device sync.

A batch runs the function `inner` times back to back and waits for the last result
(`block_until_ready` for JAX, CUDA events for torch), so launch overhead overlaps the previous
call's work as it does in a training step. `inner` is chosen from one calibration call so that a
batch lasts about `target_batch_s`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

Measure = Callable[[Callable[[], Any], int], float]


@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    """How long to measure: `warmup` calls, then `reps` batches of about `target_batch_s` each;
    the bench does that `rounds` times per program, its backends interleaved (`interleaved`)."""

    reps: int = 5
    warmup: int = 2
    target_batch_s: float = 0.025
    max_inner: int = 200
    rounds: int = 1


@dataclasses.dataclass(frozen=True)
class Timing:
    """The median seconds per call, each batch's seconds per call, and calls per batch."""

    seconds: float
    samples: tuple[float, ...]
    inner: int


def measure_jax(run: Callable[[], Any], n: int) -> float:
    """Wall seconds for `n` back-to-back calls of `run`, waiting for the last result."""
    out = None
    start = time.perf_counter()
    for _ in range(n):
        out = run()
    jax.block_until_ready(out)
    return time.perf_counter() - start


def measure_torch(run: Callable[[], Any], n: int) -> float:
    """GPU seconds for `n` back-to-back calls of `run`, between two CUDA events."""
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def median_time(
    run: Callable[[], Any], measure: Measure = measure_jax, policy: TimingPolicy | None = None
) -> Timing:
    """Median seconds per call of `run` (already compiled), after `policy.warmup` calls."""
    policy = policy or TimingPolicy()
    for _ in range(policy.warmup):
        measure(run, 1)
    one = max(measure(run, 1), 1e-7)
    inner = max(1, min(policy.max_inner, math.ceil(policy.target_batch_s / one)))
    samples = tuple(measure(run, inner) / inner for _ in range(max(1, policy.reps)))
    return Timing(statistics.median(samples), samples, inner)


def interleaved(
    jobs: dict[Any, Callable[[], Timing]], rounds: int
) -> dict[Any, Timing | Exception]:
    """Each job (one program's `median_time`) run once per round, the jobs in an order rotated
    each round, so that a drift of the clocks over a case reaches every backend alike (single
    timings of one program moved by up to 12% between runs on the H100 and H200, while
    benchmarks/tune.py's interleaved rounds held); the fastest round's Timing of each, its
    samples every round's median. A job that raises keeps its exception and runs no more."""
    keys = list(jobs)
    best: dict[Any, Timing | Exception] = {}
    medians: dict[Any, list[float]] = {key: [] for key in keys}
    for r in range(max(1, rounds)):
        shift = r % len(keys) if keys else 0
        for key in keys[shift:] + keys[:shift]:
            if isinstance(best.get(key), Exception):
                continue
            try:
                t = jobs[key]()
            except Exception as e:
                best[key] = e
                continue
            medians[key].append(t.seconds)
            if key not in best or t.seconds < best[key].seconds:
                best[key] = t
    return {
        key: t if isinstance(t, Exception) else dataclasses.replace(t, samples=tuple(medians[key]))
        for key, t in best.items()
    }
