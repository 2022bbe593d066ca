"""`python -m flashjax bench --decode`: a decode step's attention against the device's bandwidth.

A decode step reads the whole KV cache once and does little arithmetic with it, so its speed is a
bandwidth: GB/s = cache bytes (keys and values, 2 x B x S x K x H x itemsize) / time per step,
set against the device's read bandwidth measured in the same run (`read_bandwidth`: a sum over a
large array inside a jitted loop, the best of `reps`).

Shapes on a GPU: B x S = 1 x 8k, 1 x 64k, 8 x 16k, 32 x 8k, 64 x 4k (B rows of S cached tokens,
one new token per row), 32 query heads over 8 KV heads, head dim 128, bf16, caches full. On a
CPU a tiny stand-in (interpreted kernels; the numbers say nothing about GPUs).

Timing (`decode_backends`): `steps` chained steps in one jitted loop (a CUDA graph for torch), the
median of `reps` runs, per step; dispatch is excluded. `loop_us` is the same loop around a step
that reads nothing: the part of every step's time that is the loop's.

Bars (GPU shapes, flashjax rows): the contiguous cache at >= 90% of the read bandwidth at 1 x 64k,
8 x 16k, 32 x 8k and 64 x 4k; 1 x 8k in <= 15 us; paged caches within 1.1x of contiguous.

Rows (one per shape and backend): the shape, `us` per step, `gbps`, `frac_read` (of the read
bandwidth), `vs_flashjax` (this backend's time over flashjax's: > 1, flashjax is faster),
`paged_ratio` (paged rows: time over the contiguous flashjax time), `bar`, `verdict`, `status`,
`rel_err` (batch row 0 against a float32 reference), `error`.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flashjax.bench import sweep
from flashjax.bench.decode_backends import (
    DecodeBackend,
    DecodeInputs,
    JaxRunner,
    loop_overhead_step,
    reference_output,
)

Row = dict[str, Any]
Log = Callable[[str], None]

BANDWIDTH_BAR = 0.90
BANDWIDTH_SHAPES = ((1, 65536), (8, 16384), (32, 8192), (64, 4096))
LATENCY_BARS_US = {(1, 8192): 15.0}
PAGED_BAR = 1.10


@dataclasses.dataclass(frozen=True)
class Shape:
    """B rows of S cached tokens."""

    batch: int
    seq: int

    @property
    def label(self) -> str:
        seq = f"{self.seq // 1024}k" if self.seq % 1024 == 0 else str(self.seq)
        return f"{self.batch}x{seq}"


GPU_SHAPES = (Shape(1, 8192), Shape(1, 65536), Shape(8, 16384), Shape(32, 8192), Shape(64, 4096))
CPU_SHAPES = (Shape(1, 256), Shape(2, 128))


@dataclasses.dataclass(frozen=True)
class DecodeBench:
    """One `--decode` run.

    Attributes:
      shapes: the (B, S) shapes, in order.
      heads, kv_heads, head_dim, dtype: the attention's shape.
      page_sizes: page sizes of the paged flashjax rows.
      reps: timed runs per measurement (and of the bandwidth reduction).
      steps: chained steps per timed run; None: enough for about `target_s` per run.
      unroll: loop iterations unrolled (fewer loop round trips per step).
      bandwidth_bytes, bandwidth_passes: the reduction's array size and passes per run.
      seed: of the inputs and the page tables.
    """

    shapes: tuple[Shape, ...] = GPU_SHAPES
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    page_sizes: tuple[int, ...] = (16, 64)
    reps: int = 5
    steps: int | None = None
    target_s: float = 0.02
    unroll: int = 8
    bandwidth_bytes: int = 4 * 2**30
    bandwidth_passes: int = 16
    seed: int = 0

    def cache_bytes(self, shape: Shape) -> int:
        return 2 * shape.batch * shape.seq * self.kv_heads * self.head_dim * self.itemsize

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize


CPU_BENCH = DecodeBench(
    shapes=CPU_SHAPES,
    heads=4,
    kv_heads=2,
    head_dim=32,
    reps=1,
    steps=2,
    unroll=1,
    bandwidth_bytes=64 * 2**20,
    bandwidth_passes=2,
)


# --------------------------------------------------------------------------------------------------
# Inputs and the device's read bandwidth
# --------------------------------------------------------------------------------------------------


def make_inputs(shape: Shape, cfg: DecodeBench) -> DecodeInputs:
    """Random query and full caches; per page size, pools with the same keys and values behind
    a shuffled page table (a sequence's pages scattered over the pool, as in a serving engine)."""
    key = jax.random.key(cfg.seed)
    kq, kk, kv = jax.random.split(key, 3)
    dt = jnp.dtype(cfg.dtype)
    b, s = shape.batch, shape.seq
    q = jax.random.normal(kq, (b, 1, cfg.heads, cfg.head_dim), dt)
    k = jax.random.normal(kk, (b, s, cfg.kv_heads, cfg.head_dim), dt)
    v = jax.random.normal(kv, (b, s, cfg.kv_heads, cfg.head_dim), dt)
    rng = np.random.default_rng(cfg.seed)
    pools = {}
    for page in cfg.page_sizes:
        if s % page:
            continue
        per_row = s // page
        table = jnp.asarray(rng.permutation(b * per_row).reshape(b, per_row), jnp.int32)
        pools[page] = tuple(_to_pool(x, table, page) for x in (k, v)) + (table,)
    lengths = jnp.full((b,), s, jnp.int32)
    return DecodeInputs(q, k, v, lengths, pools)


def _to_pool(cache: jax.Array, table: jax.Array, page: int) -> jax.Array:
    """`(B, S, K, H)` -> a pool `(B * S / page, page, K, H)` with row b's page j at table[b, j]."""
    b, s, kh, h = cache.shape
    pages = cache.reshape(b * (s // page), page, kh, h)
    return jnp.zeros_like(pages).at[table.reshape(-1)].set(pages)


def read_bandwidth(cfg: DecodeBench) -> dict[str, Any]:
    """The device's read bandwidth: a sum over `bandwidth_bytes` of bf16, `bandwidth_passes`
    times in one jitted loop (each pass made to depend on the last, so none is hoisted), the
    best of `reps` runs."""
    x = jnp.ones((cfg.bandwidth_bytes // 2,), jnp.bfloat16)
    passes = cfg.bandwidth_passes

    def loop(x: jax.Array) -> jax.Array:
        def body(_, total):
            read, _ = lax.optimization_barrier((x, total))
            return total + jnp.sum(read, dtype=jnp.float32)

        return lax.fori_loop(0, passes, body, jnp.zeros((), jnp.float32))

    compiled = jax.jit(loop).lower(x).compile()
    compiled(x).block_until_ready()
    times = []
    for _ in range(max(3, cfg.reps)):
        start = time.perf_counter()
        compiled(x).block_until_ready()
        times.append(time.perf_counter() - start)
    best = min(times) / passes
    del x
    return {
        "gbps": cfg.bandwidth_bytes / best / 1e9,
        "median_gbps": cfg.bandwidth_bytes / (statistics.median(times) / passes) / 1e9,
        "what": f"sum of {cfg.bandwidth_bytes / 2**30:.3g} GiB bf16, {passes} passes per jitted "
        "loop, best of the runs",
    }


def steps_for(cfg: DecodeBench, shape: Shape, read_gbps: float) -> int:
    """Chained steps per timed run: `cfg.steps`, or about `cfg.target_s` of work at the read
    bandwidth (plus 5 us per step), a multiple of `cfg.unroll` in [unroll, 4096]."""
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.cache_bytes(shape) / (read_gbps * 1e9) + 5e-6
    steps = int(np.clip(round(cfg.target_s / per_step), cfg.unroll, 4096))
    return -(-steps // cfg.unroll) * cfg.unroll


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def base_row(shape: Shape, cfg: DecodeBench, backend: str) -> Row:
    page = None
    if backend.startswith("flashjax_paged"):
        page = int(backend.removeprefix("flashjax_paged"))
    return {
        "shape": shape.label,
        "batch": shape.batch,
        "seq": shape.seq,
        "heads": cfg.heads,
        "kv_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "dtype": cfg.dtype,
        "backend": backend,
        "page_size": page,
        "cache_bytes": cfg.cache_bytes(shape),
    }


def measured(row: Row, status: str, error: str = "", **fields: Any) -> Row:
    """`row` with a result: `seconds` per step (-> us, gbps) and any other fields."""
    seconds = fields.pop("seconds", None)
    us = gbps = None
    if seconds is not None and seconds > 0:
        us, gbps = seconds * 1e6, row["cache_bytes"] / seconds / 1e9
    return row | {"us": us, "gbps": gbps, "status": status, "error": error} | fields


def measure_backend(
    backend: DecodeBackend,
    shape: Shape,
    cfg: DecodeBench,
    x: DecodeInputs,
    steps: int,
    want: np.ndarray,
) -> Row:
    """Check batch row 0 against the reference, then time `steps` chained steps."""
    row = base_row(shape, cfg, backend.name)
    if row["page_size"] is not None and row["page_size"] not in x.pools:
        return measured(row, "skipped", f"S={shape.seq} is not a multiple of the page size")
    tol = sweep.TOLERANCES.get(cfg.dtype, sweep.TOLERANCES["float32"])[0]
    try:
        runner = backend.bind(x)
        rel_err = sweep.rel_l2(runner.output(), want)
        if not rel_err <= tol:
            return measured(row, "check_failed", f"rel L2 err {rel_err:.3g} > {tol:g}")
        seconds = runner.seconds_per_step(steps, cfg.reps, cfg.unroll)
    except Exception as e:  # a backend that fails is a row saying so
        return measured(row, *sweep.describe_error(e))
    return measured(row, "ok", seconds=seconds, rel_err=rel_err, steps=steps)


def measure_shape(
    shape: Shape,
    cfg: DecodeBench,
    chosen: Sequence[DecodeBackend],
    read_gbps: float,
    log: Log,
) -> list[Row]:
    """Every backend's row at one shape, and the loop's own cost per step (`loop_us`)."""
    x = make_inputs(shape, cfg)
    steps = steps_for(cfg, shape, read_gbps)
    want = reference_output(x)
    loop_us = JaxRunner(loop_overhead_step, x).seconds_per_step(steps, cfg.reps, cfg.unroll) * 1e6
    rows = []
    for backend in chosen:
        row = measure_backend(backend, shape, cfg, x, steps, want) | {"loop_us": loop_us}
        log(progress_line(row))
        rows.append(row)
    del x
    gc.collect()
    return rows


def progress_line(row: Row) -> str:
    if row["us"] is None:
        return f"{row['shape']:<8} {row['backend']:<18} {row['status'].upper()} {row['error']}"
    return (
        f"{row['shape']:<8} {row['backend']:<18} {row['us']:9.2f} us/step "
        f"{row['gbps']:8.1f} GB/s (loop {row['loop_us']:.2f} us/step)"
    )


def _verdict(row: Row, bar: str, ok: bool) -> Row:
    return row | {"bar": bar, "verdict": "pass" if ok else "fail"}


def finalize(rows: Sequence[Row], read_gbps: float, on_gpu: bool) -> list[Row]:
    """Rows with `frac_read`, `vs_flashjax`, `paged_ratio` and, on a GPU, the bars' verdicts."""
    flash = {r["shape"]: r["us"] for r in rows if r["backend"] == "flashjax" and r["us"]}
    out = []
    for r in rows:
        r = r | {"frac_read": None, "vs_flashjax": None, "paged_ratio": None}
        r |= {"bar": None, "verdict": None}
        base = flash.get(r["shape"])
        if r["us"] is not None:
            r["frac_read"] = r["gbps"] / read_gbps if read_gbps else None
            r["vs_flashjax"] = r["us"] / base if base else None
            if r["page_size"] is not None:
                r["paged_ratio"] = r["vs_flashjax"]
        out.append(_with_bar(r, on_gpu))
    return out


def _with_bar(r: Row, on_gpu: bool) -> Row:
    """The row's bar and verdict (flashjax rows on a GPU at the bars' shapes)."""
    flashjax_row = r["backend"] == "flashjax" or r["page_size"] is not None
    if not on_gpu or r["us"] is None or not flashjax_row:
        return r
    key = (r["batch"], r["seq"])
    if r["page_size"] is not None:
        ratio = r["paged_ratio"]
        return (
            r if ratio is None else _verdict(r, f"<= {PAGED_BAR}x contiguous", ratio <= PAGED_BAR)
        )
    if key in LATENCY_BARS_US:
        limit = LATENCY_BARS_US[key]
        return _verdict(r, f"<= {limit:g} us", r["us"] <= limit)
    if key in BANDWIDTH_SHAPES and r["frac_read"] is not None:
        return _verdict(r, f">= {BANDWIDTH_BAR:.0%} of read", r["frac_read"] >= BANDWIDTH_BAR)
    return r


def run(
    cfg: DecodeBench,
    chosen: Sequence[DecodeBackend],
    read_gbps: float,
    *,
    deadline: float | None = None,
    log: Log = print,
    on_progress: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Every shape's rows, in order (partial results handed to `on_progress` after each); no
    shape starts after `deadline` (a `time.perf_counter()` value): its rows say so."""
    rows: list[Row] = []
    for shape in cfg.shapes:
        started = time.perf_counter()
        if deadline is not None and started > deadline:
            why = "time budget (--max-minutes) spent"
            rows += [measured(base_row(shape, cfg, b.name), "skipped", why) for b in chosen]
            continue
        rows += measure_shape(shape, cfg, chosen, read_gbps, log)
        log(f"{shape.label} took {time.perf_counter() - started:.1f} s")
        if on_progress is not None:
            on_progress(rows)
    return rows
