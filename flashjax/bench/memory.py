"""`python -m flashjax bench --memory`: memory of forward+backward against sequence length.

For each sequence length (B=1, N=16, H=128, bf16 on a GPU; doubling from 1k to 64k) and each
implementation, the gradient `jax.grad(lambda q, k, v: attention(q, k, v).sum())` is compiled (not
run) and XLA's `memory_analysis()` of the compiled program gives its temp bytes (everything
beyond its arguments and outputs), argument and output bytes. Their sum (less aliased bytes) is
compared with the device's memory, `jax.devices()[0].memory_stats()["bytes_limit"]` (what JAX's
allocator may use, by default 75% of the GPU; `--memory-limit-gib` overrides): a program that
needs more "would not fit". flashjax is also run once at each length (unless `--no-run`) to
confirm that it fits; `peak_bytes` is JAX's process-wide peak so far (it cannot be reset; lengths
run in increasing order, so it is the largest run's).

Implementations: flashjax (`implementation="triton"` on a GPU, `"xla_chunked"` elsewhere),
standard attention (`jax.nn.dot_product_attention(implementation="xla")`: the `(B, N, T, S)`
float32 scores and their gradient in memory) and `jax.nn`'s cuDNN attention where there is a GPU.
Programs only compiled, never run, are compiled without XLA's GEMM autotuning
(`xla_gpu_autotune_level=0`): the autotuner runs candidate GEMMs on the real shapes and would
itself run out of memory where standard attention does; buffer sizes do not depend on which GEMM
algorithm is picked.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from flashjax.bench import backends, cases, report, sweep, timing

Row = dict[str, Any]
Log = Callable[[str], None]
STEM = "memory"
BACKENDS = ("flashjax", "jax_xla", "jax_cudnn")
FIELDS = (
    *report.META_FIELDS,
    *report.CALL_FIELDS,
    "backend",
    "implementation",
    "mode",
    "temp_bytes",
    "argument_bytes",
    "output_bytes",
    "alias_bytes",
    "total_bytes",
    "limit_bytes",
    "fits",
    "status",
    "compile_s",
    "run_status",
    "run_ms",
    "peak_bytes",
    "error",
)


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """One `--memory` run."""

    seqlens: tuple[int, ...]
    batch: int = 1
    heads: int = 16
    head_dim: int = 128
    causal: bool = False
    dtype: str = "bfloat16"
    backends: tuple[str, ...] = BACKENDS
    limit_bytes: int | None = None
    run: bool = True
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A compared implementation: its row name, what it calls, and why it cannot run here."""

    backend: str
    implementation: str
    attention: Callable
    unavailable: str | None = None


def implementations(on_gpu: bool) -> list[Implementation]:
    """flashjax (Triton kernels on a GPU, the chunked XLA path elsewhere), standard attention and
    cuDNN (GPU only), in `BACKENDS` order."""

    flash = "triton" if on_gpu else "xla_chunked"
    return [
        Implementation("flashjax", flash, backends.dpa_call("flashjax", flash)),
        Implementation("jax_xla", "xla", backends.dpa_call("jax.nn", "xla")),
        Implementation(
            "jax_cudnn",
            "cudnn",
            backends.dpa_call("jax.nn", "cudnn"),
            None if on_gpu else "needs a GPU",
        ),
    ]


def gradient(attention: Callable, case: Any) -> Callable:
    """`(q, k, v) -> (dq, dk, dv)` of `sum(attention(q, k, v))` (the forward in float32)."""

    def loss(q: Any, k: Any, v: Any) -> Any:
        return attention(q, k, v, case).astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


def breakdown(compiled: Any) -> dict[str, int] | None:
    """Temp, argument, output and aliased bytes of a compiled program, and their total
    (`argument + output + temp - alias`); None where the backend does not say."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    parts = {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    parts["total_bytes"] = (
        parts["argument_bytes"] + parts["output_bytes"] + parts["temp_bytes"] - parts["alias_bytes"]
    )
    return parts


def _memory_stat(name: str) -> int | None:
    """One of the default device's `memory_stats()` (None where it does not say)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return None if not stats else stats.get(name)


def device_limit() -> int | None:
    """The bytes JAX's allocator may use on the default device."""
    return _memory_stat("bytes_limit")


def peak_bytes() -> int | None:
    """JAX's process-wide peak bytes in use on the default device."""
    return _memory_stat("peak_bytes_in_use")


def _base_row(cfg: MemoryConfig, seq: int, impl: Implementation) -> Row:
    return {
        "dtype": cfg.dtype,
        "batch": cfg.batch,
        "seq_q": seq,
        "seq_k": seq,
        "heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "causal": cfg.causal,
        "backend": impl.backend,
        "implementation": impl.implementation,
        "mode": "fwd+bwd",
        "temp_bytes": None,
        "argument_bytes": None,
        "output_bytes": None,
        "alias_bytes": None,
        "total_bytes": None,
        "limit_bytes": cfg.limit_bytes,
        "fits": "unknown",
        "status": "ok",
        "compile_s": None,
        "run_status": "not run",
        "run_ms": None,
        "peak_bytes": None,
        "error": "",
    }


def measure(cfg: MemoryConfig, seq: int, impl: Implementation, on_gpu: bool) -> Row:
    """Compile one implementation's gradient at one length; run it too if it is flashjax's."""

    row = _base_row(cfg, seq, impl)
    if impl.unavailable is not None:
        row["status"], row["error"] = "unavailable", impl.unavailable
        return row
    case = cases.Case(cfg.batch, seq, cfg.heads, cfg.head_dim, cfg.causal, cfg.dtype)
    spec = jax.ShapeDtypeStruct(case.shape, jnp.dtype(cfg.dtype))
    will_run = cfg.run and impl.backend == "flashjax"
    options = {"xla_gpu_autotune_level": 0} if on_gpu and not will_run else {}
    start = time.perf_counter()
    try:
        lowered = jax.jit(gradient(impl.attention, case)).lower(spec, spec, spec)
        compiled = lowered.compile(compiler_options=options)
    except Exception as e:
        row["status"], row["error"] = sweep.describe_error(e)
        return row
    row["compile_s"] = time.perf_counter() - start
    parts = breakdown(compiled)
    if parts is not None:
        row |= parts
        if cfg.limit_bytes is not None:
            row["fits"] = "yes" if parts["total_bytes"] <= cfg.limit_bytes else "no"
    if not will_run:
        return row
    if row["fits"] == "no":
        row["run_status"] = "skipped"
        return row
    try:
        q, k, v, _ = cases.make_inputs(case, cfg.seed)
        jax.block_until_ready(compiled(q, k, v))
        row["run_ms"] = timing.measure_jax(lambda: compiled(q, k, v), 1) * 1e3
        row["run_status"], row["peak_bytes"] = "ok", peak_bytes()
    except Exception as e:
        row["run_status"], message = sweep.describe_error(e)
        row["error"] = f"run: {message}"
    return row


def progress(row: Row) -> str:
    """One stdout line per (length, implementation)."""
    head = f"T={report.seq_label(row['seq_q']):<5} {row['backend']:<9}"
    if row["status"] != "ok":
        return f"{head} {row['status'].upper()} {row['error']}"
    text = head
    if row["temp_bytes"] is not None:
        text += f" temp {row['temp_bytes'] / 2**30:.4g} GiB, total {row['total_bytes'] / 2**30:.4g}"
        text += " GiB" + {"no": ", would not fit", "yes": "", "unknown": ""}[row["fits"]]
    if row["run_status"] != "not run":
        text += f"; run {row['run_status']}"
        if row["run_ms"] is not None:
            text += f" ({row['run_ms']:.4g} ms)"
    if row["error"]:
        text += f"  -- {row['error']}"
    return text


def run(
    cfg: MemoryConfig,
    on_gpu: bool,
    log: Log = print,
    on_progress: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Every row of a `--memory` run, lengths in increasing order; `on_progress(rows)` runs after
    each length (the CLI saves partial results there)."""
    chosen = [i for i in implementations(on_gpu) if i.backend in cfg.backends]
    rows: list[Row] = []
    for seq in sorted(set(cfg.seqlens)):
        for impl in chosen:
            row = measure(cfg, seq, impl, on_gpu)
            log(progress(row))
            rows.append(row)
        if on_progress is not None:
            on_progress(rows)
    return rows


def _cell(row: Row | None, unit: float) -> str | None:
    if row is None:
        return None
    if row["status"] != "ok":
        return {"unavailable": "n/a", "oom": "OOM"}.get(row["status"], "err")
    if row["temp_bytes"] is None:
        return "?"
    cell = f"{row['temp_bytes'] / unit:.3g}"
    if row["fits"] == "no":
        cell += " (no fit)"
    if row["run_status"] in ("oom", "error"):
        cell += f" run {row['run_status'].upper()}"
    return cell


def format_table(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """Temp memory per sequence length (down) and implementation (across)."""
    names = list(dict.fromkeys(r["backend"] for r in rows))
    limit = meta.get("limit_bytes")
    unit, name = report.byte_unit(max((r["temp_bytes"] or 0 for r in rows), default=0), True)
    lines = [
        f"XLA temp memory of forward+backward (jax.grad) on {meta.get('device')}: "
        f"{meta.get('dtype')}, B={meta.get('batch')} N={meta.get('heads')} "
        f"H={meta.get('head_dim')}, {'causal' if meta.get('causal') else 'non-causal'}.",
        f"Cells: temp {name}; (no fit) = arguments + outputs + temp exceed the device's "
        + ("memory" if limit is None else f"{limit / 2**30:.4g} GiB")
        + "; n/a = unavailable here.",
    ]
    if limit is None:
        lines.append("The device does not report its memory: nothing is marked as not fitting.")
    index = {(r["seq_q"], r["backend"]): r for r in rows}
    table = []
    for seq in sorted({r["seq_q"] for r in rows}):
        line = [report.seq_label(seq), *(_cell(index.get((seq, b)), unit) for b in names)]
        flash = index.get((seq, "flashjax"))
        line.append(None if flash is None else flash["run_status"])
        table.append(line)
    header = ["seq", *names, "flashjax run"]
    return "\n".join(lines + [""] + report.text_table(header, table))


def plot(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> Path | None:
    """Temp GiB against sequence length, log-log, one line per implementation; programs that would
    not fit the device are marked with a red X, the device's memory is a dashed line."""
    plt = report.pyplot()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.6), layout="constrained")
    unit, name = report.byte_unit(max((r["temp_bytes"] or 0 for r in rows), default=0), True)
    names = list(dict.fromkeys(r["backend"] for r in rows))
    cmap = plt.get_cmap("tab10")
    marked = False
    for i, b in enumerate(names):
        points = sorted(
            (r["seq_q"], r["temp_bytes"] / unit, r["fits"] == "no")
            for r in rows
            if r["backend"] == b and r["status"] == "ok" and r["temp_bytes"]
        )
        if not points:
            continue
        implementation = next(r["implementation"] for r in rows if r["backend"] == b)
        xs, ys, _ = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", ms=4, color=cmap(i), label=f"{b} ({implementation})")
        bad = [(x, y) for x, y, n in points if n]
        if bad:
            ax.scatter(
                *zip(*bad, strict=True),
                marker="X",
                s=90,
                color="red",
                zorder=3,
                label=None if marked else "would not fit",
            )
            marked = True
            first = bad[0]
            ax.annotate(
                f"{b}: out of memory from T={report.seq_label(first[0])}",
                first,
                textcoords="offset points",
                xytext=(-150, 8),
                fontsize=8,
                color="red",
            )
    limit = meta.get("limit_bytes")
    if limit:
        ax.axhline(
            limit / unit,
            color="gray",
            ls="--",
            lw=0.9,
            label=f"device memory ({limit / 2**30:.3g} GiB)",
        )
    seqs = sorted({r["seq_q"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(seqs, [report.seq_label(s) for s in seqs])
    ax.minorticks_off()
    ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(f"XLA temp memory, forward+backward ({name})")
    ax.legend(fontsize=8, loc="upper left")
    title = report.shape_title("Memory", meta)
    ax.set_title(title, fontsize=9)
    return report.save_figure(fig, path)


# `memory.json`, `memory.csv` and (with matplotlib) `memory.png` in `out_dir`.
write = report.rows_writer(STEM, FIELDS, plot)
