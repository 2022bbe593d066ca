"""Files, plots and the table of `python -m flashjax bench --ring` (see flashjax.bench.ring)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flashjax.bench import report

Row = dict[str, Any]
STEM = "ring"
CSV_FIELDS = (
    "impl",
    "mask",
    "layout",
    "seq_per_device",
    "total_seq",
    "devices",
    "mode",
    "ms",
    "tflops_per_device",
    "vs_single",
    "model_ms",
    "rel_err",
    "total_bytes",
    "temp_bytes",
    "compile_s",
    "status",
    "error",
)
IMPL_STYLE = {
    "ring": "C0",
    "all_gather": "C1",
    "single": "C2",
    "ring_kernel": "C3",
    "ring_pair": "C4",
    "ring_in_place": "C5",
}


def _rows(rows: Sequence[Row], kind: str, **where: Any) -> list[Row]:
    return [
        r for r in rows if r.get("kind") == kind and all(r.get(k) == v for k, v in where.items())
    ]


def _ok(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.get("status") == "ok"]


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _log2_axis(ax: Any, values: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(values))
    ax.set_xticks(ticks)
    ax.set_xticklabels([report.seq_label(v) for v in ticks], rotation=45)


def plot_scaling(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> Path | None:
    """TFLOP/s per device against total sequence: one panel per (mode, mask), one line per
    program."""
    plt = report.pyplot()
    found = _ok(_rows(rows, "scaling"))
    if plt is None or not found:
        return None
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in found)]
    masks = [m for m in ("causal", "full") if any(r["mask"] == m for r in found)]
    fig, axes = plt.subplots(
        len(modes), len(masks), figsize=(5.5 * len(masks), 4 * len(modes)), squeeze=False
    )
    for i, mode in enumerate(modes):
        for j, mask in enumerate(masks):
            ax = axes[i][j]
            panel = [r for r in found if r["mode"] == mode and r["mask"] == mask]
            _impl_lines(ax, panel, lambda r: r["tflops_per_device"], meta)
            _log2_axis(ax, [r["total_seq"] for r in found])
            layout = "zigzag" if mask == "causal" else "contiguous"
            ax.set_title(f"{mode}, {mask} ({layout})")
            ax.set_xlabel("total sequence")
            ax.set_ylabel("TFLOP/s per device")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, path, "ring attention, weak scaling", meta)


def _impl_lines(
    ax: Any, rows: Sequence[Row], value: Callable[[Row], float], meta: dict[str, Any]
) -> None:
    """One line per program (ring, all-gather, one device): `value(row)` against total sequence."""
    for impl, color in IMPL_STYLE.items():
        pts = sorted((r["total_seq"], value(r)) for r in rows if r["impl"] == impl)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color=color, label=_label(impl, meta))


def _save(fig: Any, path: Path, what: str, meta: dict[str, Any]) -> Path:
    fig.suptitle(_title(what, meta))
    fig.tight_layout()
    return report.save_figure(fig, path, dpi=120)


def _label(impl: str, meta: dict[str, Any]) -> str:
    n = meta.get("config", {}).get("devices", "n")
    labels = {
        "ring": f"ring ({n} devices)",
        "ring_kernel": f"ring, no conditionals ({n} devices)",
        "ring_pair": f"ring, K and V as two buffers ({n} devices)",
        "ring_in_place": f"ring, key pieces read in place ({n} devices)",
        "all_gather": f"all-gather ({n} devices)",
    }
    return labels.get(impl, "one device, whole sequence")


def _title(what: str, meta: dict[str, Any]) -> str:
    cfg = meta.get("config", {})
    shape = f"B={cfg.get('batch')} N={cfg.get('heads')} H={cfg.get('head_dim')} {cfg.get('dtype')}"
    text = f"{what}: {meta.get('device', '?')}, {shape}"
    return text + ("\n" + report.CPU_NOTE if meta.get("platform") == "cpu" else "")


def plot_memory(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> Path | None:
    """Memory per device (XLA's plan of forward+backward) against total sequence."""
    plt = report.pyplot()
    found = [r for r in _ok(_rows(rows, "scaling", mode="fwd+bwd")) if r.get("total_bytes")]
    if plt is None or not found:
        return None
    masks = [m for m in ("causal", "full") if any(r["mask"] == m for r in found)]
    fig, axes = plt.subplots(1, len(masks), figsize=(5.5 * len(masks), 4), squeeze=False)
    unit, name = report.byte_unit(max(r["total_bytes"] for r in found), binary=True)
    for ax, mask in zip(axes[0], masks, strict=True):
        panel = [r for r in found if r["mask"] == mask]
        _impl_lines(ax, panel, lambda r: r["total_bytes"] / unit, meta)
        _log2_axis(ax, [r["total_seq"] for r in found])
        ax.set_yscale("log")
        ax.set_title(f"forward+backward, {mask}")
        ax.set_xlabel("total sequence")
        ax.set_ylabel(f"memory per device ({name})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, "memory per device (XLA's plan)", meta)


def plot_model(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> Path | None:
    """Left: the ring's modeled fwd+bwd efficiency against devices, per rows per device. Right:
    one step's compute against its transfer, against rows per device (the crossovers)."""
    from flashjax.bench import ring_model

    plt = report.pyplot()
    found = _rows(rows, "model")
    inputs = meta.get("model_inputs", {})
    if plt is None or not found or "pairs" not in inputs:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    seqs = sorted({r["seq_per_device"] for r in found})
    for k, seq in enumerate(seqs):
        for mask, style in (("causal", "-"), ("full", "--")):
            pts = sorted(
                (r["devices"], r["efficiency_fwd+bwd"])
                for r in found
                if r["seq_per_device"] == seq and r["mask"] == mask
            )
            if pts:
                label = f"{report.seq_label(seq)}/dev {mask}"
                left.plot(*zip(*pts, strict=True), style, marker="o", color=f"C{k}", label=label)
    left.set_xscale("log", base=2)
    devices = sorted({r["devices"] for r in found})
    left.set_xticks(devices)
    left.set_xticklabels([str(d) for d in devices])
    left.set_ylim(0, 1.05)
    left.axvline(meta["config"]["gpus_per_node"], color="grey", lw=0.8, ls=":")
    left.set_xlabel("devices in the ring (dotted: one node)")
    left.set_ylabel("modeled efficiency (compute / step time)")
    left.set_title("ring fwd+bwd (solid: causal zigzag, dashed: full)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    _plot_steps(right, inputs, ring_model)
    return _save(fig, path, "ring attention model", meta)


def _plot_steps(ax: Any, inputs: dict[str, Any], ring_model: Any) -> None:
    shape = ring_model.Shape(**inputs["shape"])
    pairs = ring_model.PairTimes(*(tuple(inputs["pairs"][k]) for k in ("seqs", "fwd", "bwd")))
    links = [ring_model.Link(**inputs[k]) for k in ("intra", "inter")]
    lo = max(16, pairs.seqs[0] // 16)
    seqs = [lo << i for i in range(0, 14) if lo << i <= max(pairs.seqs[-1] * 16, 1 << 20)]
    for which, style in (("fwd", "-"), ("bwd", "--")):
        for mask, color in (("causal", "C0"), ("full", "C1")):
            ms = [1e3 * ring_model.step_compute(pairs, s, mask, which) for s in seqs]
            ax.plot(seqs, ms, style, color=color, label=f"compute {which} {mask}")
        for k, link in enumerate(links):
            extra = (lambda s: shape.dkv_bytes(s)) if which == "bwd" else (lambda s: 0.0)
            ms = [1e3 * link.seconds(shape.kv_bytes(s) + extra(s)) for s in seqs]
            ax.plot(seqs, ms, style, color=f"C{3 + k}", label=f"transfer {which} {link.name}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows per device")
    ax.set_ylabel("ms per ring step")
    ax.set_title("a step hides its transfer where compute >= transfer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)


# --------------------------------------------------------------------------------------------------
# Files and the table
# --------------------------------------------------------------------------------------------------


def write(out_dir: Path, meta: dict[str, Any], rows: Sequence[Row], *, with_plot: bool) -> dict:
    """ring.json (everything), ring.csv (scaling rows) and, with `with_plot`, the three plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {
        "json": report.write_json(out_dir / f"{STEM}.json", meta, rows),
        "csv": report.write_csv(out_dir / f"{STEM}.csv", _rows(rows, "scaling"), CSV_FIELDS),
    }
    if with_plot:
        for key, fn, name in (
            ("png", plot_scaling, f"{STEM}.png"),
            ("memory_png", plot_memory, f"{STEM}-memory.png"),
            ("model_png", plot_model, f"{STEM}-model.png"),
        ):
            if (png := fn(out_dir / name, rows, meta)) is not None:
                paths[key] = png
    return paths


def _fmt(x: float | None, spec: str = ".3g") -> str | None:
    return None if x is None else format(x, spec)


def _scaling_lines(rows: Sequence[Row]) -> list[str]:
    found = _rows(rows, "scaling")
    if not found:
        return []
    header = ("seq/dev", "total", "mask", "mode", "program", "ms", "TF/s/dev", "vs 1 dev")
    header += ("model ms", "mem/dev GiB", "err", "status")
    lines = []
    for r in sorted(
        found, key=lambda r: (r["seq_per_device"], r["mask"], r["mode"], r["impl"] != "single")
    ):
        mem = r.get("total_bytes")
        lines.append(
            (
                report.seq_label(r["seq_per_device"]),
                report.seq_label(r["total_seq"]),
                r["mask"],
                r["mode"],
                r["impl"],
                _fmt(r.get("ms"), ".4g"),
                _fmt(r.get("tflops_per_device"), ".4g"),
                _fmt(r.get("vs_single"), ".3f"),
                _fmt(r.get("model_ms"), ".4g"),
                None if mem is None else f"{mem / 2**30:.3g}",
                _fmt(r.get("rel_err"), ".1e"),
                r["status"],
            )
        )
    return ["measured (per device):", *report.text_table(header, lines)]


def _model_lines(rows: Sequence[Row]) -> list[str]:
    found = _rows(rows, "model")
    cross = _rows(rows, "crossover")
    if not found:
        return []
    devices = sorted({r["devices"] for r in found})
    header = ("seq/dev", "mask", *(f"n={n}" for n in devices))
    table = {}
    for r in found:
        table.setdefault((r["seq_per_device"], r["mask"]), {})[r["devices"]] = r
    lines = [
        (report.seq_label(seq), mask, *(_fmt(row[n]["efficiency_fwd+bwd"], ".2f") for n in devices))
        for (seq, mask), row in sorted(table.items())
    ]
    out = ["model: fwd+bwd efficiency of the ring (compute / modeled time):"]
    out += report.text_table(header, lines)
    out.append("transfer hides behind compute from (rows per device):")
    out += report.text_table(
        ("link", "GB/s", "mask", "pass", "from"),
        [
            (
                c["link"],
                f"{c['bandwidth_gbps']:.3g}",
                c["mask"],
                c["pass"],
                None if c["seq_per_device"] is None else report.seq_label(c["seq_per_device"]),
            )
            for c in cross
        ],
    )
    return out


def _bandwidth_lines(rows: Sequence[Row]) -> list[str]:
    found = _ok(_rows(rows, "bandwidth"))
    if not found:
        return []
    lines = [(f"{r['bytes'] / 2**20:.4g}", f"{r['ms']:.4g}", f"{r['gbps']:.4g}") for r in found]
    return ["ppermute around the ring:", *report.text_table(("MiB", "ms", "GB/s"), lines)]


def format_table(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """The run as text: bandwidth, measured scaling, the model."""
    parts = [_title("ring attention", meta)]
    for block in (_bandwidth_lines(rows), _scaling_lines(rows), _model_lines(rows)):
        if block:
            parts.append("\n".join(block))
    return "\n\n".join(parts)
