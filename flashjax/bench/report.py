"""Results: rows completed with run metadata and ratios; JSON, CSV, a PNG and a table.

Every row carries the run's device, versions, commit and date; `ratios` maps each other backend
measured at the same shape and mode to this backend's speed over it (> 1: this one is faster).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from flashjax.bench import machine
from flashjax.bench.backends import BACKEND_NAMES
from flashjax.bench.flops import MODES

Row = dict[str, Any]
# `plot(path, rows, meta) -> path`, or None when it drew nothing (no matplotlib, no data).
PlotFn = Callable[[Path, Sequence[Row], dict[str, Any]], Path | None]
META_FIELDS = ("device", "platform", "jax_version", "jaxlib_version", "git_commit", "date")
# A call's shape as the CSVs of --io, --memory and --sparsity give it; the sweep's rows add the
# window (SHAPE_FIELDS).
CALL_FIELDS = ("dtype", "batch", "seq_q", "seq_k", "heads", "head_dim", "causal")
SHAPE_FIELDS = (*CALL_FIELDS, "window")
CSV_FIELDS = (
    *META_FIELDS,
    *SHAPE_FIELDS,
    "backend",
    "mode",
    "ms",
    "tflops",
    "ceiling_tflops",
    "frac_of_ceiling",
    "status",
    "rel_err",
    "temp_bytes",
    "peak_bytes",
    "compile_s",
    "flops",
    "error",
)
# The anchors the table compares its subject with, in order of interest (the first MAX_RATIO_COLUMNS
# present get a column; the JSON and CSV have the ratios to every backend).
ANCHORS = (
    "jax_cudnn",
    "tokamax_mosaic",
    "tokamax_triton",
    "torch_cudnn",
    "torch_flash",
    "jax_xla",
    "flashjax_chunked",
    "flashjax",
)
MAX_RATIO_COLUMNS = 4
CPU_NOTE = "CPU numbers: Pallas kernels interpreted, XLA on the host; they say nothing about GPUs"
FILE_STEM = "bench"


class Writer(Protocol):
    """`write(out_dir, meta, rows, with_plot=...) -> {kind: path}`: a run's result files."""

    def __call__(
        self, out_dir: Path, meta: dict[str, Any], rows: Sequence[Row], *, with_plot: bool
    ) -> dict[str, Path]: ...


def table_subject(platform: str, backends: Sequence[str]) -> str:
    """The backend whose speed the table's ratio columns give: flashjax's kernels on a GPU; on a
    CPU the chunked path (what `implementation=None` runs there) when it ran."""
    if platform != "gpu" and "flashjax_chunked" in backends:
        return "flashjax_chunked"
    return "flashjax"


def _shape_key(row: Row) -> tuple:
    return tuple(str(row[f]) for f in SHAPE_FIELDS) + (row["mode"],)


def backend_order(rows: Sequence[Row]) -> list[str]:
    """Backends present in `rows`, known ones in table order, then any others."""
    seen = list(dict.fromkeys(r["backend"] for r in rows))
    return [b for b in BACKEND_NAMES if b in seen] + [b for b in seen if b not in BACKEND_NAMES]


def shape_title(what: str, meta: dict[str, Any]) -> str:
    """A plot title naming the measurement, device, shape, commit and date (+ the CPU caveat)."""
    causal = "" if "causal" not in meta else (", causal" if meta["causal"] else ", non-causal")
    title = (
        f"{what}: {meta.get('device')}, {meta.get('dtype')}, B={meta.get('batch')} "
        f"N={meta.get('heads')} H={meta.get('head_dim')}{causal} "
        f"({meta.get('git_commit')}, {str(meta.get('date'))[:10]})"
    )
    return title + ("\n" + CPU_NOTE if meta.get("platform") == "cpu" else "")


def with_meta(rows: Sequence[Row], meta: dict[str, Any]) -> list[Row]:
    """New rows that start with the run's `META_FIELDS` (device, versions, commit, date)."""
    return [{f: meta.get(f) for f in META_FIELDS} | dict(r) for r in rows]


def finalize(rows: Sequence[Row], meta: dict[str, Any]) -> list[Row]:
    """New rows with the run's metadata, the ceiling fraction and the ratios to other backends."""
    ceiling = (meta.get("ceiling") or {}).get("tflops")
    speed: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("tflops") and r["status"] in ("ok", "unchecked"):
            speed.setdefault(_shape_key(r), {})[r["backend"]] = r["tflops"]
    out = []
    for row in with_meta(rows, meta):
        tf = row.get("tflops") if row["status"] in ("ok", "unchecked") else None
        row["ceiling_tflops"] = ceiling
        row["frac_of_ceiling"] = tf / ceiling if tf and ceiling else None
        others = speed.get(_shape_key(row), {})
        row["ratios"] = {b: tf / t for b, t in others.items() if b != row["backend"] and tf}
        out.append(row)
    return out


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[Row]) -> Path:
    """`{"meta": ..., "rows": [...]}`."""
    path.write_text(json.dumps(_clean({"meta": meta, "rows": list(rows)}), indent=1) + "\n")
    return path


def _csv_value(x: Any) -> Any:
    """Floats to 6 significant digits (non-finite ones empty); the rest unchanged."""
    if isinstance(x, float):
        return f"{x:.6g}" if math.isfinite(x) else None
    return x


def write_csv(path: Path, rows: Sequence[Row], fields: Sequence[str] | None = None) -> Path:
    """One line per row with the columns `fields`; by default the sweep's: `CSV_FIELDS`, then
    `vs_<backend>` ratio columns. Lists are written joined by ":", dicts are left out."""
    extra = [] if fields is not None else [f"vs_{b}" for b in backend_order(rows)]
    columns = [*(CSV_FIELDS if fields is None else fields), *extra]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            flat = {k: _csv_value(v) for k, v in r.items() if k in columns}
            for k, v in flat.items():
                if isinstance(v, (list, tuple)):
                    flat[k] = ":".join(map(str, v))
            if fields is None:
                for b, ratio in r.get("ratios", {}).items():
                    flat[f"vs_{b}"] = _csv_value(ratio)
            writer.writerow(flat)
    return path


def _panels(rows: Sequence[Row]) -> tuple[list[str], list[tuple[int, bool]]]:
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    cols = sorted({(r["head_dim"], r["causal"]) for r in rows})
    return modes, cols


def seq_label(seq: int) -> str:
    """1024 -> "1k", 1536 -> "1536"."""
    return f"{seq // 1024}k" if seq >= 1024 and seq % 1024 == 0 else str(seq)


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend, or None when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write the figure `fig` to `path` and close it; returns `path`."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> Path | None:
    """TFLOP/s vs sequence length per backend; one panel per mode x (head dim, causal).

    Returns None (and writes nothing) when matplotlib is not importable.
    """
    plt = pyplot()
    if plt is None:
        return None
    modes, cols = _panels(rows)
    if not modes or not cols:
        return None
    backends = backend_order(rows)
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    ceiling = (meta.get("ceiling") or {}).get("tflops")
    fig, axes = plt.subplots(
        len(modes),
        len(cols),
        figsize=(4.2 * len(cols), 3.2 * len(modes) + 0.8),
        squeeze=False,
        layout="constrained",
    )
    seqs = sorted({r["seq_q"] for r in rows})
    for i, mode in enumerate(modes):
        for j, (head_dim, causal) in enumerate(cols):
            ax = axes[i][j]
            for b in backends:
                points = sorted(
                    (r["seq_q"], r["tflops"])
                    for r in rows
                    if r["backend"] == b
                    and r["mode"] == mode
                    and r["head_dim"] == head_dim
                    and r["causal"] == causal
                    and r["status"] in ("ok", "unchecked")
                    and r["tflops"]
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", ms=3, color=colors[b], label=b)
            if ceiling:
                ax.axhline(ceiling, color="gray", ls="--", lw=0.8, label="matmul ceiling")
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqs, [seq_label(s) for s in seqs])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            kind = "causal" if causal else "non-causal"
            ax.set_title(f"{mode}, D={head_dim}, {kind}", fontsize=9)
            if j == 0:
                ax.set_ylabel("TFLOP/s")
            if i == len(modes) - 1:
                ax.set_xlabel("sequence length")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.legend(
        list(handles.values()), list(labels), loc="outside lower center", ncol=min(5, len(labels))
    )
    title = (
        f"{meta.get('device')}, {meta.get('dtype')}, batch*seq={meta.get('batch_tokens')}, "
        f"heads*dim={meta.get('hidden')} ({meta.get('git_commit')}, {str(meta.get('date'))[:10]})"
    )
    if meta.get("platform") == "cpu":
        title += "\n" + CPU_NOTE
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


# Column headers of the table (the JSON and CSV keep the full names).
SHORT_NAMES = {
    "flashjax_chunked": "fj_chunked",
    "tokamax_triton": "tk_triton",
    "tokamax_mosaic": "tk_mosaic",
    "torch_cudnn": "th_cudnn",
    "torch_flash": "th_flash",
}

_STATUS_CELL = {
    "oom": "OOM",
    "error": "err",
    "check_failed": "WRONG",
    "skipped": "-",
}


def _fmt_tflops(tf: float) -> str:
    return f"{tf:.0f}" if tf >= 100 else f"{tf:.3g}"


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    if row["status"] in ("ok", "unchecked") and row["tflops"]:
        return _fmt_tflops(row["tflops"]) + ("?" if row["status"] == "unchecked" else "")
    return _STATUS_CELL.get(row["status"], row["status"])


def format_table(rows: Sequence[Row], meta: dict[str, Any], subject: str = "flashjax") -> str:
    """TFLOP/s per (mode, head dim, causal) block: sequence lengths down, backends across, then
    `subject`'s speed over each anchor present."""
    backends = backend_order(rows)
    anchors = [
        a
        for a in ANCHORS
        if a in backends and a != subject and any(r["backend"] == a and r["tflops"] for r in rows)
    ]
    anchors = anchors[:MAX_RATIO_COLUMNS] if subject in backends else []
    ceiling = meta.get("ceiling")
    ceiling_text = "not measured" if not ceiling else machine.describe_ceiling(ceiling)
    lines = [
        f"TFLOP/s on {meta.get('device')} ({meta.get('dtype')}); ceiling {ceiling_text}.",
        "Cells: TFLOP/s; OOM = out of memory, err = raised, WRONG = failed the reference check, "
        "- = skipped, ? = unchecked.",
        "tk = tokamax, th = torch SDPA, fj = flashjax"
        + (f"; /X = {subject}'s speed over X's." if anchors else "."),
    ]
    if meta.get("platform") == "cpu":
        lines.append(CPU_NOTE + ".")
    index = {(r["backend"], *_shape_key(r)): r for r in rows}
    modes, cols = _panels(rows)
    short = [SHORT_NAMES.get(b, b) for b in (*backends, *anchors)]
    header = ["seq", *short[: len(backends)], *(f"/{a}" for a in short[len(backends) :])]
    widths = [max(6, len(h)) for h in header]
    for mode in modes:
        for head_dim, causal in cols:
            block = [r for r in rows if r["mode"] == mode and r["head_dim"] == head_dim]
            block = [r for r in block if r["causal"] == causal]
            if not block:
                continue
            lines.append("")
            lines.append(f"{mode}  D={head_dim}  {'causal' if causal else 'non-causal'}")
            lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
            for key in sorted({_shape_key(r) for r in block}, key=lambda k: int(k[2])):
                seq = int(key[2])
                cells = [seq_label(seq)]
                cells += [_cell(index.get((b, *key))) for b in backends]
                mine = index.get((subject, *key))
                for a in anchors:
                    ratio = (mine or {}).get("ratios", {}).get(a)
                    cells.append(f"{ratio:.2f}x" if ratio else "")
                lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def byte_unit(largest: float, binary: bool = False) -> tuple[float, str]:
    """`(bytes per unit, name)` of the largest unit that `largest` bytes fill at least once:
    GB/MB/KB (or GiB/MiB/KiB with `binary`), bytes below that."""
    base, names = (
        (1024.0, ("KiB", "MiB", "GiB", "TiB")) if binary else (1e3, ("KB", "MB", "GB", "TB"))
    )
    unit, name = 1.0, "bytes"
    for i, n in enumerate(names, 1):
        if largest >= base**i:
            unit, name = base**i, n
    return unit, name


def text_table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> list[str]:
    """Right-aligned columns, as wide as their widest cell (None prints as "-")."""
    cells = [[str(h) for h in header]]
    cells += [["-" if c is None else str(c) for c in line] for line in lines]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    joined = ("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    return [line.rstrip() for line in joined]


def write_results(
    out_dir: Path,
    stem: str,
    meta: dict[str, Any],
    rows: Sequence[Row],
    fields: Sequence[str] | None = None,
    plot_fn: PlotFn | None = None,
) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.csv` (columns `fields`, see `write_csv`) and, with `plot_fn`,
    `<stem>.png` into `out_dir`; returns the paths written by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(out_dir / f"{stem}.json", meta, rows),
        "csv": write_csv(out_dir / f"{stem}.csv", rows, fields),
    }
    if plot_fn is not None and (png := plot_fn(out_dir / f"{stem}.png", rows, meta)) is not None:
        paths["png"] = png
    return paths


def write_all(
    out_dir: Path, meta: dict[str, Any], rows: Sequence[Row], *, with_plot: bool = True
) -> dict[str, Path]:
    """Write the sweep's `bench.json`, `bench.csv` and (if matplotlib is there) `bench.png`."""
    return write_results(out_dir, FILE_STEM, meta, rows, None, plot if with_plot else None)


def rows_writer(stem: str, fields: Sequence[str], plot_fn: PlotFn) -> Writer:
    """The `write(out_dir, meta, rows, with_plot)` of a measurement other than the sweep:
    `<stem>.json`, `<stem>.csv` (columns `fields`) and, with `with_plot`, `<stem>.png` drawn by
    `plot_fn` (when matplotlib is there); every row starts with the run's metadata."""

    def write(
        out_dir: Path, meta: dict[str, Any], rows: Sequence[Row], *, with_plot: bool
    ) -> dict[str, Path]:
        plotter = plot_fn if with_plot else None
        return write_results(out_dir, stem, meta, with_meta(rows, meta), fields, plotter)

    return write


def finish(
    write: Writer,
    table: Callable[[Sequence[Row], dict[str, Any]], str],
    out_dir: Path,
    meta: dict[str, Any],
    rows: Sequence[Row],
    started: float,
    *,
    with_plot: bool,
) -> int:
    """The end of a run: record its seconds since `started` (`time.perf_counter`) in `meta`,
    write its files, print its table and where the files went; returns the exit code, 0."""
    meta["seconds"] = round(time.perf_counter() - started, 1)
    paths = write(out_dir, meta, rows, with_plot=with_plot)
    print()
    print(table(rows, meta))
    print()
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {meta['seconds']:.0f} s")
    return 0
