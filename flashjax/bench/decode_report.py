"""The outputs of `--decode`: its CSV columns, the table on stdout, the plot, and the files.

The rows (and what their fields mean) come from `flashjax.bench.decode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashjax.bench import report

Row = dict[str, Any]
STEM = "decode"
FIELDS = (
    *report.META_FIELDS,
    "shape",
    "batch",
    "seq",
    "heads",
    "kv_heads",
    "head_dim",
    "dtype",
    "backend",
    "page_size",
    "cache_bytes",
    "steps",
    "us",
    "gbps",
    "frac_read",
    "vs_flashjax",
    "paged_ratio",
    "loop_us",
    "bar",
    "verdict",
    "status",
    "rel_err",
    "error",
)
_STATUS = {"oom": "OOM", "error": "err", "check_failed": "WRONG", "skipped": "-"}


def _percent(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.0f}%"


def _gbps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _cells(r: Row) -> list[Any]:
    if r["us"] is None:
        status = _STATUS.get(r["status"], r["status"])
        return [r["shape"], r["backend"], status, None, None, None, None, r["error"][:60]]
    verdict = None if r["verdict"] is None else f"{r['verdict']} ({r['bar']})"
    vs = None if r["vs_flashjax"] is None else f"{r['vs_flashjax']:.2f}x"
    return [
        r["shape"],
        r["backend"],
        f"{r['us']:.2f}",
        _gbps(r["gbps"]),
        _percent(r["frac_read"]),
        vs,
        verdict,
        None,
    ]


def format_table(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """One line per (shape, backend): time per step, GB/s, share of the read bandwidth, time
    over flashjax's, and the bar where one applies."""
    head = (
        f"Decode step, {meta.get('dtype')}, {meta.get('heads')} query heads / "
        f"{meta.get('kv_heads')} KV heads, head dim {meta.get('head_dim')}, one new token per "
        f"row, full caches, on {meta.get('device')}; read bandwidth "
        f"{_gbps(meta['read']['gbps'])} GB/s ({meta['read']['what']})"
    )
    lines = [head]
    if meta.get("platform") != "gpu":
        lines.append("NOTE: " + report.CPU_NOTE)
    header = ["shape", "backend", "us/step", "GB/s", "of read", "time/flashjax", "bar", "error"]
    lines += report.text_table(header, [_cells(r) for r in rows])
    loop = {r["shape"]: r.get("loop_us") for r in rows}
    lines.append(
        "loop cost per step (in every time above): "
        + ", ".join(f"{s} {us:.2f} us" for s, us in loop.items() if us is not None)
    )
    return "\n".join(lines + flax_lines(meta.get("flax", [])))


def flax_lines(found: Sequence[Row]) -> list[str]:
    """The Flax study's lines (`decode_flax.rows`), none without it."""
    if not found:
        return []
    lines = ["Flax decode step (nnx.MultiHeadAttention(decode=True), projections included):"]
    for r in found:
        if r["us"] is None:
            lines.append(f"  {r['shape']:<8} {r['module']:<13} {r['error'][:100]}")
            continue
        vs = "" if r["vs_flax"] is None else f"  ({r['vs_flax']:.2f}x Flax's time)"
        lines.append(f"  {r['shape']:<8} {r['module']:<13} {r['us']:9.2f} us/step{vs}")
    return lines


def plot(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> Path | None:
    """GB/s against cache length (per row), one marker per backend and shape (two shapes may
    share a length: no lines), flashjax's points labeled B x S; the read bandwidth and 90% of
    it drawn."""
    plt = report.pyplot()
    done = [r for r in rows if r["gbps"] is not None]
    if plt is None or not done:
        return None
    fig, ax = plt.subplots(figsize=(9.0, 5.5), layout="constrained")
    backends = list(dict.fromkeys(r["backend"] for r in done))
    for i, backend in enumerate(backends):
        mine = sorted((r for r in done if r["backend"] == backend), key=lambda r: r["seq"])
        ax.plot(
            [r["seq"] for r in mine],
            [r["gbps"] for r in mine],
            linestyle="none",
            marker="os^vD<>ph*"[i % 10],
            alpha=0.8,
            color=plt.get_cmap("tab10")(i % 10),
            label=backend,
        )
    for r in done:
        if r["backend"] == "flashjax":
            ax.annotate(
                r["shape"],
                (r["seq"], r["gbps"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    read = meta["read"]["gbps"]
    ax.axhline(read, color="black", lw=1, label=f"read bandwidth {read:.0f} GB/s")
    ax.axhline(0.9 * read, color="gray", lw=1, ls=":", label="90% of it")
    ax.set_xscale("log", base=2)
    seqs = sorted({r["seq"] for r in done})
    ax.set_xticks(seqs, [report.seq_label(x) for x in seqs])
    ax.minorticks_off()
    ax.set_xlabel("cache length S per row (tokens); points B x S")
    ax.set_ylabel("GB/s (cache bytes read / time per step)")
    ax.legend(fontsize=8, loc="best")
    title = (
        f"Decode attention: {meta.get('device')}, {meta.get('dtype')}, N={meta.get('heads')}, "
        f"K={meta.get('kv_heads')}, H={meta.get('head_dim')} ({meta.get('git_commit')}, "
        f"{str(meta.get('date'))[:10]})"
    )
    if meta.get("platform") != "gpu":
        title += "\n" + report.CPU_NOTE
    ax.set_title(title, fontsize=9)
    return report.save_figure(fig, path)


# `decode.json`, `decode.csv` and (with matplotlib) `decode.png` in `out_dir`.
write = report.rows_writer(STEM, FIELDS, plot)
