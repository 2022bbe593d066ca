"""`python -m flashjax bench --ring`: ring attention across devices (`flashjax.ring_attention`).

Measures, on the devices of this host (n = `--devices`, default all; on a CPU, 4 host devices):

  scaling    weak scaling at fixed rows per device (`--seqs-per-device`; total = n x that), for
             causal attention in the zigzag layout and full attention in the contiguous layout,
             forward and forward+backward, of three programs:
               ring        flashjax.ring_attention inside shard_map
               all_gather  the baseline: K/V all-gathered inside shard_map, then the same kernel
                           on the local queries (flashjax.ring.all_gather_attention)
               single      one device, the whole sequence, the same kernel ("one GPU")
             Per row: ms (median of timed batches), TFLOP/s per device (FLOPs of the whole
             sequence / n; causal counts half), its ratio to `single` at the same total sequence,
             XLA's memory plan per device (arguments + outputs + temporaries), compile seconds,
             the forward's relative L2 error against `single`, and whether the ppermutes overlap
             kernels in the compiled schedule (`overlap`).
  bandwidth  one ppermute around the ring (every device sends and receives) of a few sizes;
             the fitted latency and bandwidth feed the model.
  pair       one device, one dense `s x s` kernel call (s = rows per device and half of it),
             forward and forward+backward: the per-step compute of the ring, for the model.
  model      `flashjax.bench.ring_model` for n = 2..64 from the measured pairs and bandwidth
             (past `--gpus-per-node` devices, an assumed inter-node link, `--inter-gbps`), the
             crossover rows per device where a step's transfer starts to hide behind its compute,
             and the model's prediction beside each measured ring row (`model_ms`).

  profile    (`--profile`) a jax.profiler trace of two ring calls (the first of --impls and of
             --modes), how much of the NCCL kernels' time some flashjax kernel ran beside
             (`trace_overlap`), and where each GPU's time went (`trace_breakdown`).

Outputs in --out (default: a folder under the system's temporary directory): ring.json (meta +
every row), ring.csv (scaling rows), ring.png (TFLOP/s per device against total sequence),
ring-memory.png (memory per device against total sequence), ring-model.png (modeled efficiency
against n; step compute against transfer against rows per device), and a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Log = Callable[[str], None]
AXIS = "sp"
# The ring's implementations and their `ring_attention` keywords: "ring_kernel" runs every pair
# without a conditional (an A/B of the default's `lax.switch`), "ring_pair" sends K and V as two
# buffers instead of one stacked copy (an A/B of the stack, with XLA flags that combine them),
# "ring_in_place" lets the forward's kernels read the key pieces in place from the stack.
RING_VARIANTS: dict[str, dict[str, str]] = {
    "ring": {},
    "ring_kernel": {"pair_dispatch": "kernel"},
    "ring_pair": {"kv_transfer": "pair"},
    "ring_in_place": {"kv_transfer": "in_place"},
}
IMPLS = ("single", *RING_VARIANTS, "all_gather")  # the order they run in
DEFAULT_IMPLS = ("ring", "all_gather", "single")
STUDIES = ("bandwidth", "pair", "scaling")
MASKS = ("causal", "full")
MODES = ("fwd", "fwd+bwd")
LAYOUT_OF_MASK = {"causal": "zigzag", "full": "contiguous"}
CPU_HOST_DEVICES = 4
MiB = 1 << 20

# The bar's shapes (32k and 128k rows per GPU) first, so a run cut by --max-minutes keeps them.
GPU_DEFAULTS: dict[str, Any] = {
    "seqs_per_device": (32768, 131072, 8192, 16384, 65536),
    "heads": 16,
    "head_dim": 128,
    "dtype": "bfloat16",
    "implementation": None,
    "bandwidth_mib": (16, 64, 256, 1024),
    "single_max_seq": 1 << 19,
    "once_from": 1 << 20,
    "max_minutes": 7.0,
    "model_seqs": (2048, 4096, 8192, 16384, 32768, 131072),
}
CPU_DEFAULTS: dict[str, Any] = {
    "seqs_per_device": (64, 128),
    "heads": 2,
    "head_dim": 32,
    "dtype": "float32",
    "implementation": "xla_chunked",
    "bandwidth_mib": (0.25, 1, 4),
    "single_max_seq": 1 << 30,
    "once_from": 1 << 30,
    "max_minutes": None,
    "model_seqs": (64, 128, 256, 1024, 4096),
}


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """One `--ring` run."""

    devices: int
    seqs_per_device: tuple[int, ...]
    batch: int = 1
    heads: int = 16
    kv_heads: int | None = None  # None: heads (MHA)
    head_dim: int = 128
    dtype: str = "bfloat16"
    implementation: str | None = None  # the kernel of every step (None: the platform's default)
    masks: tuple[str, ...] = MASKS
    modes: tuple[str, ...] = MODES
    impls: tuple[str, ...] = DEFAULT_IMPLS
    studies: tuple[str, ...] = STUDIES
    bandwidth_mib: tuple[float, ...] = (16, 64, 256, 1024)
    single_max_seq: int = 1 << 19  # no single-device reference above this total sequence
    once_from: int = 1 << 20  # total sequences from here are timed once (no warm-up)
    model_devices: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    model_seqs: tuple[int, ...] = (4096, 16384, 32768, 131072)
    gpus_per_node: int = 8
    inter_gbps: float = 50.0
    inter_latency_us: float = 10.0
    seed: int = 0

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    def shape(self):
        """The model's per-device `Shape`."""
        import jax.numpy as jnp

        from flashjax.bench.ring_model import Shape

        size = jnp.dtype(self.dtype).itemsize
        return Shape(self.batch, self.heads, self.num_kv_heads, self.head_dim, size)


# --------------------------------------------------------------------------------------------------
# Programs
# --------------------------------------------------------------------------------------------------


def mesh_of(devices: int):
    import jax
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()[:devices]), (AXIS,))


def inputs(cfg: RingConfig, total: int, sharding) -> tuple:
    """Random q, k, v `(B, total, N|K, H)` created on the devices of `sharding` (never on the
    host: at 2M tokens each is gigabytes)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(cfg.seed), 3)
    heads = (cfg.heads, cfg.num_kv_heads, cfg.num_kv_heads)

    def make(key, n):
        return jax.random.normal(key, (cfg.batch, total, n, cfg.head_dim), jnp.float32).astype(
            cfg.dtype
        )

    return tuple(
        jax.jit(make, static_argnums=1, out_shardings=sharding)(k, n)
        for k, n in zip(keys, heads, strict=True)
    )


def _differentiated(f: Callable, mode: str) -> Callable:
    """`f` itself ("fwd") or the gradient of the sum of its output ("fwd+bwd")."""
    import jax
    import jax.numpy as jnp

    if mode == "fwd":
        return f
    return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))


def distributed(cfg: RingConfig, mesh, impl: str, mask: str, mode: str) -> Callable:
    """The jitted ring or all-gather program on global arrays sharded over the sequence."""
    import jax
    from jax.sharding import PartitionSpec

    from flashjax.ring import all_gather_attention, ring_attention

    attention = all_gather_attention
    if impl in RING_VARIANTS:
        attention = functools.partial(ring_attention, **RING_VARIANTS[impl])
    spec = PartitionSpec(None, AXIS)

    def per_device(q, k, v):
        return attention(
            q,
            k,
            v,
            axis_name=AXIS,
            is_causal=mask == "causal",
            layout=LAYOUT_OF_MASK[mask],
            implementation=cfg.implementation,
        )

    f = jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    return jax.jit(_differentiated(f, mode))


def one_device(cfg: RingConfig, mask: str, mode: str) -> Callable:
    """The jitted single-device program (`dot_product_attention` on the whole sequence)."""
    import jax

    from flashjax import dot_product_attention

    def f(q, k, v):
        return dot_product_attention(
            q, k, v, is_causal=mask == "causal", implementation=cfg.implementation
        )

    return jax.jit(_differentiated(f, mode))


# --------------------------------------------------------------------------------------------------
# Compiled-schedule check of the overlap
# --------------------------------------------------------------------------------------------------

_KERNEL_OPS = ("custom-call(", " conditional(", " while(")


def overlap(hlo_text: str) -> dict[str, int]:
    """In a compiled (scheduled) HLO module: the asynchronous collective-permutes, and how many of
    them have a kernel (custom-call, conditional or while) scheduled between their start and done,
    i.e. run beside compute. CPU programs have no asynchronous collectives (all zero)."""
    pairs = with_kernel = kernels = 0
    for block in hlo_text.split("\n\n"):
        lines = block.splitlines()
        starts = {
            line.split("=", 1)[0].strip(): i
            for i, line in enumerate(lines)
            if " collective-permute-start(" in line
        }
        for i, line in enumerate(lines):
            if " collective-permute-done(" not in line:
                continue
            operands = re.findall(r"%[\w.\-]+", line.split("collective-permute-done(", 1)[1])
            name = next((x for x in operands if x in starts), None)
            if name is None:
                continue
            between = lines[starts[name] + 1 : i]
            found = sum(any(op in x for op in _KERNEL_OPS) for x in between)
            pairs += 1
            with_kernel += found > 0
            kernels += found
    return {"async_permutes": pairs, "overlapping_kernels": with_kernel, "kernels_between": kernels}


# --------------------------------------------------------------------------------------------------
# Measuring one program
# --------------------------------------------------------------------------------------------------


def measure(fn: Callable, args: tuple, policy, once: bool = False) -> Row:
    """Compile `fn` on `args` (seconds, memory plan per device, overlap), run it once, then time
    it (`once`: the first run is the time, for calls of a minute)."""
    import jax

    from flashjax.bench import memory, timing

    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    row: Row = {"compile_s": time.perf_counter() - start}
    row |= memory.breakdown(compiled) or {}
    row["overlap"] = overlap(compiled.as_text())
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - start
    if once:
        seconds, samples = first, (first,)
    else:
        t = timing.median_time(lambda: compiled(*args), timing.measure_jax, policy)
        seconds, samples = t.seconds, t.samples
    row["ms"] = 1e3 * seconds
    row["samples_ms"] = [1e3 * x for x in samples]
    row["timed_once"] = once
    return row | {"_out": out}


def _failed(base: Row, err: BaseException) -> Row:
    text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    status = "oom" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else "error"
    return base | {"status": status, "error": text}


def _rel_err(got, want) -> float:
    """Relative L2 error of `got` (any sharding) against `want`, on `want`'s device."""
    import jax
    import jax.numpy as jnp

    got = jax.device_put(got, want.sharding).astype(jnp.float32)
    want = want.astype(jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


# --------------------------------------------------------------------------------------------------
# The three studies
# --------------------------------------------------------------------------------------------------


def bandwidth_rows(cfg: RingConfig, mesh, policy, log: Log) -> list[Row]:
    """One ppermute around the ring per size: seconds and bytes per second per device."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import NamedSharding, PartitionSpec

    n = cfg.devices
    perm = [(i, (i + 1) % n) for i in range(n)]
    spec = PartitionSpec(AXIS)
    shift = jax.jit(
        jax.shard_map(
            lambda x: lax.ppermute(x, AXIS, perm), mesh=mesh, in_specs=spec, out_specs=spec
        )
    )
    rows = []
    for mib in cfg.bandwidth_mib:
        nbytes = int(mib * MiB) // 4 * 4
        x = jax.device_put(
            jnp.zeros((n, nbytes // 4), jnp.float32), NamedSharding(mesh, PartitionSpec(AXIS))
        )
        base = {"kind": "bandwidth", "devices": n, "bytes": nbytes}
        try:
            m = measure(shift, (x,), policy)
        except Exception as err:  # noqa: BLE001 - a failed size is a row
            rows.append(_failed(base, err))
            continue
        m.pop("_out")
        row = base | m | {"status": "ok", "gbps": nbytes / (m["ms"] / 1e3) / 1e9}
        log(f"bandwidth {nbytes / MiB:g} MiB: {row['ms']:.3g} ms, {row['gbps']:.3g} GB/s")
        rows.append(row)
    return rows


def pair_rows(cfg: RingConfig, policy, log: Log) -> list[Row]:
    """One device, one dense `s x s` call at s = rows per device and half of it."""
    import jax
    from jax.sharding import SingleDeviceSharding

    sizes = sorted({s for seq in cfg.seqs_per_device for s in (seq, seq // 2)})
    here = SingleDeviceSharding(jax.devices()[0])
    rows = []
    for seq in sizes:
        args = inputs(cfg, seq, here)
        for mode in MODES:
            base = {"kind": "pair", "seq": seq, "mode": mode}
            try:
                m = measure(one_device(cfg, "full", mode), args, policy)
            except Exception as err:  # noqa: BLE001
                rows.append(_failed(base, err))
                continue
            m.pop("_out")
            rows.append(base | m | {"status": "ok"})
            log(f"pair {seq} {mode}: {m['ms']:.4g} ms")
        del args
    return rows


def _flops(cfg: RingConfig, total: int, mask: str, mode: str) -> float:
    from flashjax.bench import flops

    return flops.attention_flops(
        cfg.batch, cfg.heads, total, total, cfg.head_dim, causal=mask == "causal", mode=mode
    )


def _scaling_base(cfg: RingConfig, seq: int, mask: str, impl: str, mode: str) -> Row:
    devices = 1 if impl == "single" else cfg.devices
    return {
        "kind": "scaling",
        "impl": impl,
        "mask": mask,
        "layout": LAYOUT_OF_MASK[mask] if impl != "single" else None,
        "seq_per_device": seq,
        "total_seq": seq * cfg.devices,
        "devices": devices,
        "mode": mode,
        "batch": cfg.batch,
        "heads": cfg.heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "dtype": cfg.dtype,
    }


def _scaling_one(cfg, mesh, seq, mask, impl, mode, args, policy, reference) -> Row:
    """One scaling row: measure, FLOP rate per device, error of the forward against `single`."""
    base = _scaling_base(cfg, seq, mask, impl, mode)
    total = base["total_seq"]
    fn = (
        one_device(cfg, mask, mode)
        if impl == "single"
        else distributed(cfg, mesh, impl, mask, mode)
    )
    try:
        m = measure(fn, args, policy, once=total >= cfg.once_from)
    except Exception as err:  # noqa: BLE001 - failures are rows
        return _failed(base, err)
    out = m.pop("_out")
    row = base | m | {"status": "ok"}
    row["tflops_per_device"] = (
        _flops(cfg, total, mask, mode) / (m["ms"] / 1e3) / 1e12 / row["devices"]
    )
    if mode == "fwd" and impl == "single":
        row["_out"] = out
    elif mode == "fwd" and reference is not None:
        row["rel_err"] = _rel_err(_global_order(out, cfg.devices, mask), reference)
    return row


def _global_order(x, devices: int, mask: str):
    from flashjax.ring import zigzag_unpermute

    return zigzag_unpermute(x, devices) if LAYOUT_OF_MASK[mask] == "zigzag" else x


def scaling_rows(
    cfg: RingConfig,
    mesh,
    policy,
    *,
    deadline: float | None,
    log: Log,
    on_progress: Callable[[list[Row]], None],
) -> list[Row]:
    """Every (rows per device, mask, program, mode), in the config's order; shapes not started
    before `deadline` (perf_counter seconds) become rows saying so."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    rows: list[Row] = []
    sharded = NamedSharding(mesh, PartitionSpec(None, AXIS))
    for seq in cfg.seqs_per_device:
        total = seq * cfg.devices
        for mask in cfg.masks:
            if deadline is not None and time.perf_counter() > deadline:
                rows += [
                    _scaling_base(cfg, seq, mask, i, m) | {"status": "skipped (time budget)"}
                    for i in cfg.impls
                    for m in cfg.modes
                ]
                continue
            args = inputs(cfg, total, sharded)
            reference = None
            for impl in _impls_in_order(cfg, total):
                run_args = args
                if impl == "single":
                    here = SingleDeviceSharding(jax.devices()[0])
                    run_args = tuple(
                        jax.device_put(_global_order(x, cfg.devices, mask), here) for x in args
                    )
                for mode in cfg.modes:
                    row = _scaling_one(
                        cfg, mesh, seq, mask, impl, mode, run_args, policy, reference
                    )
                    if "_out" in row:
                        reference = row.pop("_out")
                    rows.append(row)
                    log(progress(row))
                    on_progress(rows)
                del run_args
            del args, reference
    return rows


def _impls_in_order(cfg: RingConfig, total: int) -> list[str]:
    """`single` first (the others' reference), and only up to `single_max_seq`."""
    order = [i for i in IMPLS if i in cfg.impls]
    return [i for i in order if i != "single" or total <= cfg.single_max_seq]


def progress(row: Row) -> str:
    """One log line for a scaling row."""
    head = (
        f"{row['impl']:<10} {row['mask']:<6} {row['seq_per_device']:>8}/dev "
        f"total {row['total_seq']:>8} {row['mode']:<7}"
    )
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('error', '')}"
    err = f" err {row['rel_err']:.2e}" if "rel_err" in row else ""
    return f"{head} {row['ms']:10.4g} ms {row['tflops_per_device']:8.4g} TFLOP/s/dev{err}"


# --------------------------------------------------------------------------------------------------
# Ratios and the model
# --------------------------------------------------------------------------------------------------


def with_ratios(rows: Sequence[Row]) -> list[Row]:
    """Each ok scaling row's TFLOP/s per device over `single`'s at the same total sequence, mask
    and mode; and the bwd rows (fwd+bwd - fwd)."""
    rows = [dict(r) for r in rows]
    key = lambda r: (r["total_seq"], r["mask"], r["mode"])  # noqa: E731
    single = {
        key(r): r["tflops_per_device"]
        for r in rows
        if r.get("kind") == "scaling" and r["impl"] == "single" and r["status"] == "ok"
    }
    for r in rows:
        if r.get("kind") == "scaling" and r["status"] == "ok" and key(r) in single:
            r["vs_single"] = r["tflops_per_device"] / single[key(r)]
    return rows


def pair_times(rows: Sequence[Row]):
    """The model's `PairTimes` from the ok pair rows (sizes with both modes), or None."""
    from flashjax.bench.ring_model import PairTimes

    ms = {
        (r["seq"], r["mode"]): r["ms"] for r in rows if r["kind"] == "pair" and r["status"] == "ok"
    }
    seqs = sorted(s for s, m in ms if m == "fwd" and (s, "fwd+bwd") in ms)
    if not seqs:
        return None
    fwd = tuple(ms[(s, "fwd")] / 1e3 for s in seqs)
    bwd = tuple(max(ms[(s, "fwd+bwd")] - ms[(s, "fwd")], 1e-9) / 1e3 for s in seqs)
    return PairTimes(tuple(seqs), fwd, bwd)


def measured_link(rows: Sequence[Row], name: str):
    from flashjax.bench.ring_model import fit_link

    samples = [
        (r["bytes"], r["ms"] / 1e3)
        for r in rows
        if r["kind"] == "bandwidth" and r["status"] == "ok"
    ]
    return fit_link(samples, name) if samples else None


def model(cfg: RingConfig, rows: Sequence[Row], platform: str) -> tuple[list[Row], dict[str, Any]]:
    """The model rows (n = 2..64), crossovers, and the model's inputs, from the measured rows;
    `model_ms` is added to the measured ring and all-gather rows."""
    from flashjax.bench import ring_model

    pairs = pair_times(rows)
    intra = measured_link(rows, "NVLink (measured)" if platform == "gpu" else "host (measured)")
    if pairs is None or intra is None:
        return [], {"skipped": "no pair or bandwidth measurement"}
    inter = ring_model.Link(
        cfg.inter_gbps * 1e9, cfg.inter_latency_us * 1e-6, "inter-node (assumed)"
    )
    shape = cfg.shape()
    out = ring_model.model_rows(
        shape,
        pairs,
        intra,
        inter,
        devices=cfg.model_devices,
        seqs=cfg.model_seqs,
        gpus_per_node=cfg.gpus_per_node,
    )
    out += ring_model.crossovers(shape, pairs, (intra, inter))
    inputs_ = {
        "shape": dataclasses.asdict(shape),
        "pairs": dataclasses.asdict(pairs),
        "intra": dataclasses.asdict(intra),
        "inter": dataclasses.asdict(inter),
        "gpus_per_node": cfg.gpus_per_node,
    }
    return out, inputs_ | {"_pairs": pairs, "_intra": intra}


def add_predictions(rows: list[Row], pairs, link, shape) -> None:
    """`model_ms` on the measured ring / all-gather rows (n = this host's devices)."""
    from flashjax.bench import ring_model

    for r in rows:
        if r.get("kind") != "scaling" or r["impl"] == "single" or r["status"] != "ok":
            continue
        ring = r["impl"] in RING_VARIANTS
        f = ring_model.ring_seconds if ring else ring_model.all_gather_seconds
        r["model_ms"] = (
            1e3 * f(r["devices"], r["seq_per_device"], r["mask"], shape, pairs, link)[r["mode"]]
        )


def finalize(cfg: RingConfig, rows: Sequence[Row], platform: str) -> tuple[list[Row], dict]:
    """Ratios, predictions and the model rows; the model's inputs for the metadata."""
    rows = with_ratios(rows)
    extra, inputs_ = model(cfg, rows, platform)
    if "_pairs" in inputs_:
        add_predictions(rows, inputs_.pop("_pairs"), inputs_.pop("_intra"), cfg.shape())
    return rows + extra, inputs_


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def trace_overlap(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """From a Chrome-format trace's events (`jax.profiler`'s trace.json): per device (`pid`), the
    time NCCL kernels ran ("nccl" in the name) and how much of it some flashjax kernel
    ("flashjax" in the name: the Triton kernels' names, the Mosaic kernels' function names) was
    running too, on any stream."""
    by_pid: dict[Any, dict[str, list]] = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = str(e.get("name", "")).lower()
        kind = "nccl" if "nccl" in name else "kernel" if "flashjax" in name else None
        if kind:
            span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
            by_pid.setdefault(e.get("pid"), {"nccl": [], "kernel": []})[kind].append(span)
    nccl = covered = 0.0
    for spans in by_pid.values():
        kernels = _union(spans["kernel"])
        for a, b in _union(spans["nccl"]):
            nccl += b - a
            covered += sum(max(0.0, min(b, d) - max(a, c)) for c, d in kernels)
    return {
        "nccl_ms": nccl / 1e3,
        "overlapped_ms": covered / 1e3,
        "overlapped_fraction": covered / nccl if nccl else None,
    }


def _stream_events(events: Sequence[dict[str, Any]]) -> dict[Any, list[tuple[str, float, float]]]:
    """Per GPU (a `pid` whose process_name names a GPU), the (name, start, end) in us of the
    events on its streams (threads named "Stream ..."; not the "XLA Ops" / "XLA Modules" lines,
    which repeat them per HLO op)."""
    meta = [e for e in events if e.get("ph") == "M"]
    gpus = {
        e.get("pid")
        for e in meta
        if e.get("name") == "process_name"
        and "gpu" in str(e.get("args", {}).get("name", "")).lower()
    }
    streams = {
        (e.get("pid"), e.get("tid"))
        for e in meta
        if e.get("name") == "thread_name"
        and "stream" in str(e.get("args", {}).get("name", "")).lower()
    }
    found: dict[Any, list[tuple[str, float, float]]] = {pid: [] for pid in gpus}
    for e in events:
        if e.get("ph") == "X" and "dur" in e and (e.get("pid"), e.get("tid")) in streams:
            if e.get("pid") in found:
                start = float(e["ts"])
                found[e.get("pid")].append((str(e.get("name", "")), start, start + float(e["dur"])))
    return found


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _union(intervals))


def trace_breakdown(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where each GPU's time went in a trace (`_stream_events`), in ms, averaged over the GPUs:
    `span` (first kernel start to last kernel end), `flashjax` (some flashjax kernel running),
    `nccl` (some NCCL kernel running), `other_alone` (another kernel, e.g. the `(out, lse)`
    merge's fusions, running while no flashjax kernel is), `idle` (no kernel at all). Empty if
    the trace names no GPU stream."""
    per_gpu = [spans for spans in _stream_events(events).values() if spans]
    if not per_gpu:
        return {}
    totals = dict.fromkeys(("span", "flashjax", "nccl", "other_alone", "idle"), 0.0)
    for spans in per_gpu:
        every = [(a, b) for _, a, b in spans]
        kinds = {"flashjax": [], "nccl": [], "other": []}
        for name, a, b in spans:
            low = name.lower()
            kinds["nccl" if "nccl" in low else "flashjax" if "flashjax" in low else "other"].append(
                (a, b)
            )
        span = max(b for _, b in every) - min(a for a, _ in every)
        flash = _length(kinds["flashjax"])
        totals["span"] += span
        totals["flashjax"] += flash
        totals["nccl"] += _length(kinds["nccl"])
        totals["other_alone"] += _length(kinds["flashjax"] + kinds["other"]) - flash
        totals["idle"] += span - _length(every)
    return {f"{k}_ms": v / len(per_gpu) / 1e3 for k, v in totals.items()}


def profile(cfg: RingConfig, out_dir: Path, log: Log, calls: int = 2) -> dict[str, Any]:
    """A `jax.profiler` trace of `calls` calls of the first ring program in `--impls` (one of
    RING_VARIANTS) in the first mode of `--modes`, at the first rows per device and mask (after
    one untimed call), in `out_dir`/profile, with `trace_overlap` and `trace_breakdown` of it.
    To look at it: the trace.json.gz in Perfetto (ui.perfetto.dev) or the folder in TensorBoard's
    profiler; the NCCL SendRecv kernels run on their own stream beside the flashjax kernels."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = mesh_of(cfg.devices)
    seq, mask, mode = cfg.seqs_per_device[0], cfg.masks[0], cfg.modes[0]
    impl = next((i for i in cfg.impls if i in RING_VARIANTS), "ring")
    args = inputs(cfg, seq * cfg.devices, NamedSharding(mesh, PartitionSpec(None, AXIS)))
    fn = distributed(cfg, mesh, impl, mask, mode)
    jax.block_until_ready(fn(*args))
    where = out_dir / "profile"
    with jax.profiler.trace(str(where)):
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
    found = sorted(where.glob("plugins/profile/*/*.trace.json.gz"))
    summary: dict[str, Any] = {
        "dir": str(where),
        "seq_per_device": seq,
        "mask": mask,
        "mode": mode,
        "impl": impl,
        "calls": calls,
    }
    if found:
        with gzip.open(found[-1], "rt") as f:
            events = json.load(f).get("traceEvents", [])
        summary |= trace_overlap(events) | trace_breakdown(events)
    log(f"profile of {calls} {impl} {mode} calls ({seq}/device, {mask}) in {where}: {summary}")
    return summary


def run(cfg: RingConfig, policy, *, deadline=None, log: Log = print, on_progress=None) -> list[Row]:
    """Every measurement of a `--ring` run (not finalized)."""
    mesh = mesh_of(cfg.devices)
    rows: list[Row] = []
    if "bandwidth" in cfg.studies:
        rows += bandwidth_rows(cfg, mesh, policy, log)
    if "pair" in cfg.studies:
        rows += pair_rows(cfg, policy, log)
    if "scaling" not in cfg.studies:
        return rows
    done = list(rows)
    rows += scaling_rows(
        cfg,
        mesh,
        policy,
        deadline=deadline,
        log=log,
        on_progress=lambda part: on_progress(done + part) if on_progress else None,
    )
    return rows


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _choices(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        got = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        if not got or any(x not in allowed for x in got):
            raise argparse.ArgumentTypeError(f"a comma list of {', '.join(allowed)}; got {text!r}")
        return got

    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma list of numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"positive numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from flashjax.bench.options import parse_dtype, parse_ints

    p = argparse.ArgumentParser(
        prog="python -m flashjax bench --ring",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--devices", type=int, help="ring size (default: every device; CPU: 4)")
    p.add_argument(
        "--seqs-per-device",
        type=parse_ints,
        metavar="LIST",
        help="rows per device, e.g. 32k,128k (GPU default 32k,128k,8k,16k,64k; CPU 64,128)",
    )
    p.add_argument("--masks", type=_choices(MASKS), default=MASKS, help="causal,full")
    p.add_argument("--modes", type=_choices(MODES), default=MODES, help="fwd,fwd+bwd")
    p.add_argument(
        "--impls",
        type=_choices(IMPLS),
        default=DEFAULT_IMPLS,
        help="ring,all_gather,single (default); ring_kernel: the ring without conditionals; "
        "ring_pair: the ring sending K and V as two buffers; ring_in_place: its kernels reading "
        "the key pieces in place",
    )
    p.add_argument(
        "--studies",
        type=_choices(STUDIES),
        default=STUDIES,
        help="bandwidth,pair,scaling (default all; the model needs bandwidth and pair)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, help="query heads (GPU default 16; CPU 2)")
    p.add_argument("--kv-heads", type=int, help="K/V heads (default: --heads)")
    p.add_argument("--head-dim", type=int, help="GPU default 128; CPU 32")
    p.add_argument("--dtype", type=parse_dtype, help="GPU default bfloat16; CPU float32")
    p.add_argument(
        "--implementation",
        choices=("mosaic", "triton", "xla_chunked"),
        help="the kernel of every step (default: mosaic on Hopper; xla_chunked on a CPU)",
    )
    p.add_argument("--reps", type=int, help="timed batches (default 3; 1 on a CPU)")
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed calls after the first one (which gives the error check; default 1; 0 on "
        "a CPU)",
    )
    p.add_argument(
        "--once-from",
        type=parse_ints,
        metavar="SEQ",
        help="total sequences from SEQ are timed once, without warm-up (GPU default 1024k)",
    )
    p.add_argument(
        "--single-max-seq",
        type=parse_ints,
        metavar="SEQ",
        help="no single-device reference past this total sequence (GPU default 512k)",
    )
    p.add_argument(
        "--bandwidth-mib",
        type=_floats,
        metavar="LIST",
        help="ppermute sizes in MiB (GPU default 16,64,256,1024)",
    )
    p.add_argument(
        "--model-devices",
        type=parse_ints,
        default=(2, 4, 8, 16, 32, 64),
        metavar="LIST",
        help="ring sizes of the model (default 2..64)",
    )
    p.add_argument(
        "--model-seqs", type=parse_ints, metavar="LIST", help="rows per device of the model"
    )
    p.add_argument("--gpus-per-node", type=int, default=8, help="past this, the inter-node link")
    p.add_argument(
        "--inter-gbps",
        type=float,
        default=50.0,
        help="inter-node link GB/s per GPU, assumed (default 50 = 400 Gb/s InfiniBand)",
    )
    p.add_argument("--inter-latency-us", type=float, default=10.0, help="its latency, assumed")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="start no shape after this many minutes (GPU default 7; CPU none)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also write a jax.profiler trace of two ring calls (first shape, first of --impls "
        "and --modes) to OUT/profile, with each GPU's time split by kernel kind",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results folder (default: under the temp dir)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--commit", help="the git commit to record (default: this checkout's)")
    return p


def ensure_host_devices(count: int = CPU_HOST_DEVICES) -> None:
    """Ask XLA for `count` CPU host devices unless XLA_FLAGS already says how many (before JAX
    starts its backends; harmless on a GPU host, where it only shapes the CPU platform)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def config_from(args: argparse.Namespace, on_gpu: bool, available: int) -> RingConfig:
    d = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS

    def pick(name: str):
        value = getattr(args, name, None)
        return d[name] if value is None else value

    devices = args.devices or (available if on_gpu else min(available, CPU_HOST_DEVICES))
    if not 1 < devices <= available:
        raise SystemExit(f"--devices must be in 2..{available} (the devices here)")
    return RingConfig(
        devices=devices,
        seqs_per_device=pick("seqs_per_device"),
        batch=args.batch,
        heads=args.heads or d["heads"],
        kv_heads=args.kv_heads,
        head_dim=args.head_dim or d["head_dim"],
        dtype=args.dtype or d["dtype"],
        implementation=args.implementation or d["implementation"],
        masks=args.masks,
        modes=args.modes,
        impls=args.impls,
        studies=args.studies,
        bandwidth_mib=pick("bandwidth_mib"),
        single_max_seq=(args.single_max_seq or (d["single_max_seq"],))[0],
        once_from=(args.once_from or (d["once_from"],))[0],
        model_devices=args.model_devices,
        model_seqs=pick("model_seqs"),
        gpus_per_node=args.gpus_per_node,
        inter_gbps=args.inter_gbps,
        inter_latency_us=args.inter_latency_us,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run `--ring` (see the module docstring); returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    ensure_host_devices()
    import jax

    from flashjax.bench import machine, options, report, ring_report, timing

    started = time.perf_counter()
    on_gpu = jax.devices()[0].platform == "gpu"
    cfg = config_from(args, on_gpu, jax.device_count())
    policy = timing.TimingPolicy(
        reps=args.reps or (3 if on_gpu else 1),
        warmup=args.warmup if args.warmup is not None else (1 if on_gpu else 0),
        target_batch_s=0.025 if on_gpu else 0.0,
    )
    meta = machine.describe(args.commit) | {
        "mode": "ring",
        "config": dataclasses.asdict(cfg),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "timing": "median of timed batches after warm-up; totals from --once-from timed once",
        "flops": "4*B*N*S*S*H over the whole sequence (causal: half), x3.5 for fwd+bwd; per device "
        "= / devices",
        "memory": "XLA's memory plan of the compiled program, per device: arguments + outputs + "
        "temporaries - aliased",
        "argv": list(sys.argv[1:] if argv is None else argv),
    }
    options.header(meta, "--ring")
    max_minutes = args.max_minutes or (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS)["max_minutes"]
    out_dir = args.out or options.default_out_dir(meta, "-ring")
    print(f"{cfg.devices} devices; results in {out_dir}", flush=True)
    rows = run(
        cfg,
        policy,
        deadline=None if max_minutes is None else started + 60 * max_minutes,
        log=lambda line: print(line, flush=True),
        on_progress=lambda part: ring_report.write(out_dir, meta, part, with_plot=False),
    )
    if args.profile:
        meta["profile"] = profile(cfg, out_dir, lambda line: print(line, flush=True))
    final, meta["model_inputs"] = finalize(cfg, rows, meta["platform"])
    return report.finish(
        ring_report.write,
        ring_report.format_table,
        out_dir,
        meta,
        final,
        started,
        with_plot=not args.no_plot,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
