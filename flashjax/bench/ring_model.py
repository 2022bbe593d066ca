"""A model of ring attention's step time on n devices, from measured per-block compute times and
measured link bandwidth (`python -m flashjax bench --ring` measures both, then evaluates this for
n = 2..64).

The ring (flashjax/ring.py) runs n steps per pass. At step t each device computes one K/V shard's
pairs while the next shard travels one hop (`ppermute`); the two overlap, so a step lasts
`max(compute, transfer)`, except the last one (nothing left to receive):

    forward   = (n - 1) * max(c_f, x_kv) + c_f
    backward  = (n - 1) * max(c_b, x_kv + x_dkv) + c_b + x_kv   (the last dK/dV hop is exposed;
                                                                 it travels in K/V's dtype)
    ideal     = n * c            (perfect scaling: the compute alone)

with, per device holding `s` rows:
  - c_f, c_b: the compute of one step: one `s x s` pair for full attention (contiguous layout);
    for causal attention in the zigzag layout, two `s/2 x s/2` pairs (every step, the diagonal one
    included, costs about that; that is what zigzag balances). Forward and backward times of a
    pair come from measurements at a few sizes (`PairTimes`), interpolated as a power law.
  - x_kv = latency + bytes(K and V shard) / bandwidth; the backward also sends the float32 dK/dV
    buffer over the same link (`x_dkv`).
  - bandwidth: the measured ppermute bandwidth within a node (NVLink) up to `gpus_per_node`
    devices; past that the ring crosses nodes and its slowest hop is the inter-node link
    (`Link`, default 50 GB/s = 400 Gb/s InfiniBand per GPU: an assumption, not a measurement).

Each step's transfer hides behind its compute once c >= x; since c grows as s^2 and x as s, there
is one crossover `s*` per (link, mask, pass): below it the ring is bandwidth-bound. It does not
depend on n (each link carries one shard per step whatever n), but the link does.

The all-gather baseline (K/V gathered, then the kernel on the local queries, nothing overlapped):
    forward  = (n - 1) * x_kv + n * c_f
    backward = n * c_b + (n - 1) * x_dkv      (reduce-scatter of the float32 dK/dV)
Memory per device: the ring holds two K/V shards and two dK/dV buffers; all-gather holds n K/V
shards and their dK/dV.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

Row = dict[str, Any]
MASKS = ("causal", "full")  # causal: zigzag layout; full: contiguous layout
PASSES = ("fwd", "bwd", "fwd+bwd")
DKV_ITEMSIZE = 4  # the backward's travelling dK/dV buffers are float32


@dataclasses.dataclass(frozen=True)
class Shape:
    """One device's shard: `batch` rows of `heads` query heads, `kv_heads` K/V heads of
    `head_dim`, `itemsize` bytes per element (2 for bf16)."""

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int

    def kv_bytes(self, seq: int) -> float:
        """Bytes of one K/V shard of `seq` rows (K and V)."""
        return 2.0 * self.batch * seq * self.kv_heads * self.head_dim * self.itemsize

    def dkv_bytes(self, seq: int) -> float:
        """Bytes of one float32 dK/dV buffer pair."""
        return self.kv_bytes(seq) * DKV_ITEMSIZE / self.itemsize

    def pair_flops(self, seq: int) -> float:
        """Forward FLOPs of one full `seq x seq` pair (4 B N s^2 H)."""
        return 4.0 * self.batch * self.heads * seq * seq * self.head_dim


@dataclasses.dataclass(frozen=True)
class Link:
    """A link of the ring: seconds for `n` bytes = latency + n / bandwidth."""

    bandwidth: float  # bytes / s, one direction
    latency: float = 0.0  # s
    name: str = ""

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


def fit_link(samples: Sequence[tuple[float, float]], name: str = "measured") -> Link:
    """The least-squares `seconds = latency + bytes / bandwidth` through measured `(bytes,
    seconds)` samples (latency clipped at 0; one sample: latency 0)."""
    if not samples:
        raise ValueError("no bandwidth samples")
    if len(samples) == 1:
        nbytes, seconds = samples[0]
        return Link(nbytes / seconds, 0.0, name)
    xs, ys = zip(*samples, strict=True)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope <= 0:  # noise: fall back to the largest transfer's rate
        nbytes, seconds = max(samples)
        return Link(nbytes / seconds, 0.0, name)
    return Link(1.0 / slope, max(0.0, my - slope * mx), name)


@dataclasses.dataclass(frozen=True)
class PairTimes:
    """Measured seconds of one full `s x s` pair (one kernel call, no mask) at a few sizes, forward
    and backward, and the power-law interpolation between them (outside the measured range, the
    nearest measurement's FLOP rate: time grows as s^2)."""

    seqs: tuple[int, ...]
    fwd: tuple[float, ...]
    bwd: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.seqs or not len(self.seqs) == len(self.fwd) == len(self.bwd):
            raise ValueError("PairTimes needs one forward and one backward time per size")
        if list(self.seqs) != sorted(set(self.seqs)):
            raise ValueError("PairTimes sizes must be increasing")

    def seconds(self, seq: float, which: str) -> float:
        """Seconds of a `seq x seq` pair, `which` "fwd" or "bwd"."""
        times = self.fwd if which == "fwd" else self.bwd
        xs = self.seqs
        if seq <= xs[0] or len(xs) == 1:
            i = 0 if seq <= xs[0] else len(xs) - 1
            return times[i] * (seq / xs[i]) ** 2
        if seq >= xs[-1]:
            return times[-1] * (seq / xs[-1]) ** 2
        j = next(i for i in range(1, len(xs)) if xs[i] >= seq)
        lo, hi = xs[j - 1], xs[j]
        power = math.log(times[j] / times[j - 1]) / math.log(hi / lo)
        return times[j - 1] * (seq / lo) ** power


def step_compute(pairs: PairTimes, seq: int, mask: str, which: str) -> float:
    """Seconds of one ring step's kernels on a device holding `seq` rows: one `seq x seq` pair
    (full attention), two `seq/2 x seq/2` pairs (causal, zigzag)."""
    if mask == "full":
        return pairs.seconds(seq, which)
    if mask == "causal":
        return 2.0 * pairs.seconds(seq / 2, which)
    raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")


def link_for(devices: int, intra: Link, inter: Link, gpus_per_node: int) -> Link:
    """The ring's slowest hop: `intra` while the ring fits one node, else the slower of both."""
    if devices <= gpus_per_node:
        return intra
    return inter if inter.bandwidth < intra.bandwidth else intra


def ring_seconds(
    devices: int, seq: int, mask: str, shape: Shape, pairs: PairTimes, link: Link
) -> dict[str, float]:
    """Modeled seconds of one ring pass per device: fwd, bwd, fwd+bwd, their ideal (compute only)
    and the exposed transfer time."""
    n = devices
    c_f, c_b = (step_compute(pairs, seq, mask, w) for w in ("fwd", "bwd"))
    x_kv = link.seconds(shape.kv_bytes(seq)) if n > 1 else 0.0
    x_b = link.seconds(shape.kv_bytes(seq) + shape.dkv_bytes(seq)) if n > 1 else 0.0
    fwd = (n - 1) * max(c_f, x_kv) + c_f
    bwd = (n - 1) * max(c_b, x_b) + c_b + x_kv  # the last dK/dV hop, cast to K/V's dtype
    ideal_f, ideal_b = n * c_f, n * c_b
    return {
        "fwd": fwd,
        "bwd": bwd,
        "fwd+bwd": fwd + bwd,
        "ideal_fwd": ideal_f,
        "ideal_bwd": ideal_b,
        "ideal_fwd+bwd": ideal_f + ideal_b,
        "step_compute_fwd": c_f,
        "step_compute_bwd": c_b,
        "step_transfer_fwd": x_kv,
        "step_transfer_bwd": x_b,
    }


def all_gather_seconds(
    devices: int, seq: int, mask: str, shape: Shape, pairs: PairTimes, link: Link
) -> dict[str, float]:
    """Modeled seconds of the all-gather baseline per device (gather, then compute; nothing
    overlapped)."""
    n = devices
    c_f, c_b = (n * step_compute(pairs, seq, mask, w) for w in ("fwd", "bwd"))
    fwd = (n - 1) * (link.seconds(shape.kv_bytes(seq)) if n > 1 else 0.0) + c_f
    bwd = c_b + (n - 1) * (link.seconds(shape.dkv_bytes(seq)) if n > 1 else 0.0)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def memory_bytes(devices: int, seq: int, shape: Shape, impl: str) -> float:
    """K/V-related bytes per device in the backward: the ring holds its shard, one in flight and
    two float32 dK/dV buffers; all-gather holds all n shards and their gradient."""
    if impl == "ring":
        return 2 * shape.kv_bytes(seq) + 2 * shape.dkv_bytes(seq)
    return devices * (shape.kv_bytes(seq) + shape.dkv_bytes(seq))


def crossover(
    shape: Shape,
    pairs: PairTimes,
    link: Link,
    mask: str,
    which: str,
    seqs: Iterable[int] = tuple(1 << i for i in range(8, 23)),
) -> int | None:
    """The smallest rows per device (of `seqs`) at which a step's compute hides its transfer
    (`which` "fwd": K/V; "bwd": K/V and dK/dV); None if none of `seqs` does."""
    for seq in sorted(seqs):
        c = step_compute(pairs, seq, mask, which)
        nbytes = shape.kv_bytes(seq) + (shape.dkv_bytes(seq) if which == "bwd" else 0.0)
        if c >= link.seconds(nbytes):
            return seq
    return None


def model_rows(
    shape: Shape,
    pairs: PairTimes,
    intra: Link,
    inter: Link,
    *,
    devices: Sequence[int] = (2, 4, 8, 16, 32, 64),
    seqs: Sequence[int] = (4096, 16384, 32768, 131072),
    masks: Sequence[str] = MASKS,
    gpus_per_node: int = 8,
) -> list[Row]:
    """One row per (devices, rows per device, mask): modeled ms per pass for the ring and the
    all-gather baseline, the ring's efficiency (ideal / modeled) and TFLOP/s per device."""
    rows = []
    for mask in masks:
        for seq in seqs:
            for n in devices:
                link = link_for(n, intra, inter, gpus_per_node)
                ring = ring_seconds(n, seq, mask, shape, pairs, link)
                gather = all_gather_seconds(n, seq, mask, shape, pairs, link)
                flops = n * shape.pair_flops(seq) * (0.5 if mask == "causal" else 1.0)
                row: Row = {
                    "kind": "model",
                    "devices": n,
                    "seq_per_device": seq,
                    "total_seq": n * seq,
                    "mask": mask,
                    "link": link.name,
                    "ring_memory_bytes": memory_bytes(n, seq, shape, "ring"),
                    "all_gather_memory_bytes": memory_bytes(n, seq, shape, "all_gather"),
                }
                for p in PASSES:
                    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[p]
                    row[f"ring_ms_{p}"] = 1e3 * ring[p]
                    row[f"all_gather_ms_{p}"] = 1e3 * gather[p]
                    row[f"efficiency_{p}"] = ring[f"ideal_{p}"] / ring[p]
                    row[f"tflops_per_device_{p}"] = factor * flops / ring[p] / 1e12
                for key in ("step_compute_fwd", "step_compute_bwd"):
                    row[key + "_ms"] = 1e3 * ring[key]
                for key in ("step_transfer_fwd", "step_transfer_bwd"):
                    row[key + "_ms"] = 1e3 * ring[key]
                rows.append(row)
    return rows


def crossovers(
    shape: Shape, pairs: PairTimes, links: Sequence[Link], masks: Sequence[str] = MASKS
) -> list[Row]:
    """For each link, mask and pass: the rows per device from which the transfer hides."""
    return [
        {
            "kind": "crossover",
            "link": link.name,
            "bandwidth_gbps": link.bandwidth / 1e9,
            "mask": mask,
            "pass": which,
            "seq_per_device": crossover(shape, pairs, link, mask, which),
        }
        for link in links
        for mask in masks
        for which in ("fwd", "bwd")
    ]
