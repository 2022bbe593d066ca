"""The outputs of `--io`: its CSV columns, the table on stdout, the plot, and the files.

This module owns how `--io` results look; the rows come from `hbm` (the runner), their model bytes
from `hbm_model` and their measured bytes from `hbm_profile`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashjax.bench import report

Row = dict[str, Any]
STEM = "io"
FIELDS = (
    *report.META_FIELDS,
    *report.CALL_FIELDS,
    "impl",
    "block",
    "block_q",
    "block_k",
    "num_warps",
    "num_stages",
    "tile_bytes",
    "model_bytes",
    "model_read_bytes",
    "model_write_bytes",
    "ncu_status",
    "ncu_bytes",
    "ncu_read_bytes",
    "ncu_write_bytes",
    "ncu_l2_bytes",
    "ncu_kernels",
    "ms",
    "status",
    "rel_err",
    "temp_bytes",
    "error",
)


def progress(row: Row) -> str:
    """One stdout line per measured call."""
    tiles = "" if row["impl"] == "standard" else f" {row['block_q']}x{row['block_k']}"
    text = f"T={report.seq_label(row['seq_q']):<5} {row['impl']}{tiles:<9} "
    text += f"model {row['model_bytes'] / 1e9:.4g} GB"
    if row["ms"] is not None:
        text += f", {row['ms']:.4g} ms"
    if row["rel_err"] is not None:
        text += f", err {row['rel_err']:.1e}"
    if row["status"] not in ("ok", "unchecked"):
        text += f", {row['status'].upper()} {row['error']}"
    return text


def format_table(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """HBM bytes (model, ncu DRAM, ncu L2) and runtime per sequence length and tile."""
    statuses = sorted({r["ncu_status"] for r in rows})
    unit, name = report.byte_unit(max((r["model_bytes"] for r in rows), default=0))

    def amount(x: float | None) -> str | None:
        return None if x is None else f"{x / unit:.4g}"

    lines = [
        f"HBM traffic of one forward on {meta.get('device')}: {meta.get('dtype')}, "
        f"B={meta.get('batch')} N={meta.get('heads')} H={meta.get('head_dim')}, "
        f"{'causal' if meta.get('causal') else 'non-causal'}; "
        f"1 {name} = 10^{round(math.log10(unit))} bytes.",
        "model: analytic bytes (flashjax/bench/hbm_model.py); dram, L2: Nsight Compute "
        f"(ncu: {', '.join(statuses)}); ms: median forward time.",
    ]
    if meta.get("platform") == "cpu":
        lines.append(report.CPU_NOTE + ".")
    table = []
    for r in rows:
        tiles = "-" if r["impl"] == "standard" else f"{r['block_q']}x{r['block_k']}"
        ms = None if r["ms"] is None else f"{r['ms']:.4g}"
        status = r["status"] if r["status"] not in ("ok", "unchecked") else ""
        table.append(
            [
                report.seq_label(r["seq_q"]),
                r["impl"],
                tiles,
                amount(r["model_bytes"]),
                amount(r["ncu_bytes"]),
                amount(r["ncu_l2_bytes"]),
                ms,
                status.upper(),
            ]
        )
    header = ["seq", "impl", "tile", f"model_{name}", f"dram_{name}", f"L2_{name}", "ms", ""]
    return "\n".join(lines + [""] + report.text_table(header, table))


def plot(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> Path | None:
    """Two panels against the swept block size: HBM traffic (GB, model solid, ncu DRAM dashed,
    ncu L2 dotted) and runtime (ms); one color per sequence length, standard attention as
    horizontal lines (it has no tiles)."""
    plt = report.pyplot()
    if plt is None or not rows:
        return None
    seqs = sorted({r["seq_q"] for r in rows})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(seqs)}
    largest = max((r.get(k) or 0 for r in rows for k in ("model_bytes", "ncu_bytes")), default=0)
    unit, name = report.byte_unit(largest)
    vary = meta.get("vary", "both")
    axis = {"both": "block_q", "q": "block_q", "k": "block_k"}[vary]
    fig, (traffic, runtime) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    xs_all = sorted({r[axis] for r in rows if r["impl"] == "flashjax"})
    for seq in seqs:
        color, label = colors[seq], f"T={report.seq_label(seq)}"
        flash = sorted(
            (r for r in rows if r["seq_q"] == seq and r["impl"] == "flashjax"),
            key=lambda r: r[axis],
        )
        std = next((r for r in rows if r["seq_q"] == seq and r["impl"] == "standard"), None)
        for ax, key, style, marker in (
            (traffic, "model_bytes", "-", "o"),
            (traffic, "ncu_bytes", "--", "x"),
            (traffic, "ncu_l2_bytes", ":", "^"),
            (runtime, "ms", "-", "o"),
        ):
            scale = 1.0 if key == "ms" else 1.0 / unit
            points = [(r[axis], r[key] * scale) for r in flash if r.get(key)]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    ls=style,
                    marker=marker,
                    ms=4,
                    color=color,
                    label=label if (key in ("model_bytes", "ms")) else None,
                )
            if std is not None and std.get(key):
                ax.axhline(std[key] * scale, ls=style, color=color, lw=1.2, alpha=0.7)
    for ax, ylabel in ((traffic, f"HBM traffic ({name})"), (runtime, "forward time (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if xs_all:
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel(
            {"both": "block size (block_q = block_k)", "q": "block_q", "k": "block_k"}[vary]
        )
        ax.set_ylabel(ylabel)
    traffic.set_title(
        "flashjax (lines with markers) vs standard attention (flat lines)", fontsize=9
    )
    runtime.set_title("runtime, median of timed batches", fontsize=9)
    from matplotlib.lines import Line2D

    styles = [
        Line2D([], [], color="gray", ls="-", marker="o", label="model"),
        Line2D([], [], color="gray", ls="--", marker="x", label="ncu DRAM read+write"),
        Line2D([], [], color="gray", ls=":", marker="^", label="ncu L2 (lts__t_bytes)"),
    ]
    first = traffic.legend(handles=styles, loc="lower left", fontsize=8)
    traffic.add_artist(first)
    traffic.legend(loc="upper right", fontsize=8)
    runtime.legend(loc="best", fontsize=8)
    title = report.shape_title("FlashAttention IO (Theorem 2 / Fig. 2)", meta)
    fig.suptitle(title, fontsize=10)
    return report.save_figure(fig, path)


# `io.json`, `io.csv` and (with matplotlib) `io.png` in `out_dir`.
write = report.rows_writer(STEM, FIELDS, plot)
