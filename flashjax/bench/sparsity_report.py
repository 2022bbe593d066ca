"""The outputs of `--sparsity`: its CSV columns, the table on stdout, the plot, and the files.

This module owns how `--sparsity` results look; the rows (and what their fields mean) come from
`sparsity`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashjax.bench import report, sparsity
from flashjax.bench.sparsity_backends import NAMES

Row = dict[str, Any]
STEM = "sparsity"
FIELDS = (
    *report.META_FIELDS,
    "study",
    *report.CALL_FIELDS,
    "pattern",
    "target_density",
    "block",
    "block_density",
    "pairs",
    "density",
    "rel",
    "backend",
    "mode",
    "ms",
    "tflops",
    "flops",
    "ratio",
    "bar",
    "verdict",
    "status",
    "rel_err",
    "error",
)
SHORT = {"flashjax": "fj", "flashjax_chunked": "fj_chunked", "jax_xla": "xla", "torch_flex": "flex"}
_STATUS = {"oom": "OOM", "error": "err", "check_failed": "WRONG", "skipped": "-"}


def _backends(rows: Sequence[Row]) -> list[str]:
    present = {r["backend"] for r in rows}
    return [b for b in NAMES if b in present] + sorted(present - set(NAMES))


def _pattern_order(row: Row) -> tuple:
    rank = {"dense": 0, "butterfly": 1}.get(row["pattern"], 2)
    return (row["seq_q"], rank, row["target_density"] or 0.0)


def _percent(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.3g}%"


def _time_cell(row: Row | None) -> str | None:
    if row is None:
        return None
    if row["ms"] is None:
        return _STATUS.get(row["status"], row["status"])
    return f"{row['ms']:.4g}" + ("?" if row["status"] == "unchecked" else "")


def _ratio_cell(row: Row | None) -> str | None:
    if row is None or row.get("ratio") is None or row["pattern"] == "dense":
        return None
    return f"{row['ratio']:.2f} {'ok' if row['verdict'] == 'pass' else 'FAIL'}"


def _block_lines(rows: Sequence[Row], backends: Sequence[str]) -> list[str]:
    """The table of one (mode, head dim, causal): a line per (seq, pattern)."""
    index = {(r["backend"], r["seq_q"], r["label"]): r for r in rows}
    header = ["seq", "pattern", "density", "rel", "bar"]
    for b in backends:
        name = SHORT.get(b, b)
        header += [f"{name}_ms", f"{name}_x"] + (["fj_TF/s"] if b == "flashjax" else [])
    lines = []
    for key in {(r["seq_q"], r["label"]) for r in rows}:
        first = next(r for r in rows if (r["seq_q"], r["label"]) == key)
        mine = [index.get((b, *key)) for b in backends]
        rel = next((r["rel"] for r in mine if r is not None and r.get("rel") is not None), None)
        bar = None if rel is None else f"{sparsity.BAR_SLOPE * rel + sparsity.BAR_OFFSET:.3f}"
        cells = [report.seq_label(key[0]), key[1], _percent(first["density"]), _percent(rel), bar]
        for b, r in zip(backends, mine, strict=True):
            cells += [_time_cell(r), _ratio_cell(r)]
            if b == "flashjax":
                tf = None if r is None or r["tflops"] is None else f"{r['tflops']:.3g}"
                cells.append(tf)
        lines.append((first, cells))
    lines.sort(key=lambda pair: _pattern_order(pair[0]))
    return report.text_table(header, [cells for _, cells in lines])


def longest_lines(rows: Sequence[Row]) -> list[str]:
    """The longest-sequence search, one line per length, and its answer."""
    steps = [r for r in rows if r["study"] == "longest"]
    if not steps:
        return []
    first = steps[0]
    lines = [
        f"longest: butterfly fwd+bwd, flashjax, D={first['head_dim']} N={first['heads']}, "
        "non-causal, doubling until a call fails or the budget is spent"
    ]
    for r in steps:
        ms = "" if r["ms"] is None else f" {r['ms']:.4g} ms"
        tf = "" if r["tflops"] is None else f", {r['tflops']:.3g} TFLOP/s"
        error = f" {r['error']}" if r["error"] else ""
        lines.append(f"  T={report.seq_label(r['seq_q'])}: {r['status'].upper()}{ms}{tf}{error}")
    fit = sparsity.longest_fit(rows)
    if fit is None:
        lines.append("  longest that fits: none")
    elif steps[-1]["status"] == "ok":  # stopped by the time budget or the length cap
        lines.append(f"  longest that fits: at least {report.seq_label(fit)} (no call failed)")
    else:
        lines.append(f"  longest that fits: {report.seq_label(fit)}")
    return lines


def format_table(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """Per (mode, head dim, causal): ms per backend, each pattern's time over the backend's dense
    time against the bar; then the longest-sequence search."""
    grid = [r for r in rows if r["study"] == "grid"]
    backends = _backends(grid)
    lines = [
        f"Block-sparse attention on {meta.get('device')} ({meta.get('dtype')}, "
        f"B={meta.get('batch')}, heads*head_dim={meta.get('hidden')}, "
        f"mask block {meta.get('block')}).",
        "density = visible pairs / (T*S); rel = visible pairs / the dense call's; x = time / the "
        f"same backend's dense time, ok when <= bar = {sparsity.BAR_SLOPE}*rel + "
        f"{sparsity.BAR_OFFSET}.",
        "ms cells: OOM = out of memory, err = raised, WRONG = failed the check, - = skipped, "
        "? = unchecked; " + ", ".join(f"{SHORT.get(b, b)} = {b}" for b in backends) + ".",
    ]
    if meta.get("unavailable"):
        lines.append("not run: " + "; ".join(f"{k}: {v}" for k, v in meta["unavailable"].items()))
    if meta.get("platform") == "cpu":
        lines.append(report.CPU_NOTE + ".")
    for mode in sparsity.MODES:
        for head_dim, causal in sorted({(r["head_dim"], r["causal"]) for r in grid}):
            block = [
                r
                for r in grid
                if (r["mode"], r["head_dim"], r["causal"]) == (mode, head_dim, causal)
            ]
            if not block:
                continue
            kind = "causal" if causal else "non-causal"
            heads = block[0]["heads"]
            lines += ["", f"{mode}  D={head_dim} N={heads}  {kind}", *_block_lines(block, backends)]
    extra = longest_lines(rows)
    return "\n".join(lines + ([""] + extra if extra else []))


def _draw_panel(ax: Any, rows: Sequence[Row], colors: dict, styles: dict) -> None:
    """One (mode, seq) panel: per backend and (head dim, causal), the random patterns as a line
    and butterfly as a star; the bar and the ideal."""
    for b, color in colors.items():
        for shape, (style, marker) in styles.items():
            mine = [r for r in rows if r["backend"] == b and (r["head_dim"], r["causal"]) == shape]
            line = sorted((r["rel"], r["ratio"]) for r in mine if r["pattern"] == "random")
            stars = [(r["rel"], r["ratio"]) for r in mine if r["pattern"] == "butterfly"]
            if line:
                ax.plot(*zip(*line, strict=True), ls=style, marker=marker, ms=3, color=color)
            if stars:
                ax.scatter(*zip(*stars, strict=True), marker="*", s=70, color=color, zorder=3)
    xs = [0.0, 1.0]
    bar = [sparsity.BAR_OFFSET + sparsity.BAR_SLOPE * x for x in xs]
    ax.plot(xs, bar, color="black", lw=1.2)
    ax.plot(xs, xs, color="gray", ls=":", lw=1)
    top = max((r["rel"] for r in rows if r["pattern"] != "dense"), default=0.5)
    ax.set_xlim(0, min(1.02, 1.1 * max(top, 0.5)))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _legend(fig: Any, colors: dict, styles: dict) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=b) for b, c in colors.items()]
    handles += [
        Line2D(
            [],
            [],
            color="gray",
            ls=style,
            marker=marker,
            label=f"D={h} " + ("causal" if c else "non-causal"),
        )
        for (h, c), (style, marker) in styles.items()
    ]
    handles += [
        Line2D([], [], color="gray", ls="", marker="*", ms=9, label="butterfly"),
        Line2D(
            [],
            [],
            color="black",
            lw=1.2,
            label=f"bar {sparsity.BAR_SLOPE}*rel+{sparsity.BAR_OFFSET}",
        ),
        Line2D([], [], color="gray", ls=":", label="ideal: time ~ rel"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)


def plot(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> Path | None:
    """Time over dense time against density (rel), one panel per (mode, seq), one color per
    backend, one line style per (head dim, causal) through the random patterns, butterfly as a
    star; the bar and the ideal (time proportional to rel) drawn."""
    plt = report.pyplot()
    grid = [r for r in rows if r["study"] == "grid" and r.get("ratio") is not None]
    grid = [r for r in grid if r.get("rel") is not None]
    if plt is None or not grid:
        return None
    modes = [m for m in sparsity.MODES if any(r["mode"] == m for r in grid)]
    seqs = sorted({r["seq_q"] for r in grid})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(_backends(grid))}
    shapes = sorted({(r["head_dim"], r["causal"]) for r in grid})
    styles = {s: ("--" if s[1] else "-", "os^vD"[i % 5]) for i, s in enumerate(shapes)}
    fig, axes = plt.subplots(
        len(modes),
        len(seqs),
        figsize=(max(9.0, 4.0 * len(seqs)), 3.4 * len(modes) + 1.4),
        squeeze=False,
        layout="constrained",
    )
    for i, mode in enumerate(modes):
        for j, seq in enumerate(seqs):
            ax = axes[i][j]
            _draw_panel(
                ax, [r for r in grid if (r["mode"], r["seq_q"]) == (mode, seq)], colors, styles
            )
            ax.set_title(f"{mode}, T={report.seq_label(seq)}", fontsize=9)
            if j == 0:
                ax.set_ylabel("time / dense time")
            if i == len(modes) - 1:
                ax.set_xlabel("rel = visible pairs / dense pairs")
    _legend(fig, colors, styles)
    title = (
        f"Block-sparse attention time vs density: {meta.get('device')}, {meta.get('dtype')}, "
        f"B={meta.get('batch')}, heads*dim={meta.get('hidden')}, block {meta.get('block')} "
        f"({meta.get('git_commit')}, {str(meta.get('date'))[:10]})"
    )
    if meta.get("platform") == "cpu":
        title += "\n" + report.CPU_NOTE
    fig.suptitle(title, fontsize=10)
    return report.save_figure(fig, path)


# `sparsity.json`, `sparsity.csv` and (with matplotlib) `sparsity.png` in `out_dir`.
write = report.rows_writer(STEM, FIELDS, plot)
