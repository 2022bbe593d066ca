"""Ring attention: exact attention over a sequence sharded on a mesh axis, inside `jax.shard_map`.

Every device holds one shard of the queries and one of the keys and values (and of the segment
ids). The K/V shards travel around the ring with `lax.ppermute`: at step t device r holds the
K/V shard of device r - t, attends its queries to it with a flashjax kernel, and merges the
partial result into its running `(out, lse)` with `flashjax.merge_attention`. After n steps each
query has seen every key once; the result is `dot_product_attention` on the whole sequence,
sharded the same way.

Positions. A shard is made of pieces, each a contiguous run of global positions: one piece per
shard in the `"contiguous"` layout (device r holds rows r*L .. (r+1)*L - 1), two in the
`"zigzag"` layout (the sequence cut into 2n chunks, device r holds chunks r and 2n-1-r, so that
causal work is the same on every device; `zigzag_permute` puts a global array in that order). A
(query piece, key piece) pair is one kernel call with `q_offsets` / `kv_offsets` = the pieces'
global start positions, so causal, windows and segments are exact (the visibility rule compares
positions). The same rule (`visibility.block_states` with the whole pair as one tile) classifies
each pair at run time: EMPTY pairs are not computed (`lax.switch`), FULL pairs run without window,
offsets or segments (compile-time loop bounds in the kernels), PARTIAL pairs run with the
offsets. A pair on the diagonal of step 0 (a piece against itself) needs no offsets at all.

Backward (`jax.custom_vjp`): the residuals are the shards, the merged `out` and `lse`. The
backward walks the ring again, recomputing every pair from the GLOBAL `(out, lse)`
(`Backend.grads`: FlashAttention-2's backward is exact per key block given the global
residuals); dQ accumulates in place, dK/dV accumulate in a float32 buffer that travels with its
K/V shard and is handed home after the last step. Memory per device: its shards, a second K/V
shard in flight, `out`, `lse` and float32 dQ, dK, dV buffers: linear in the shard.

Overlap of the transfer with the compute. Step t+1's K/V shard is sent with `lax.ppermute` at
the top of step t, before step t's kernels, and nothing in step t reads it: the collective's
operand is the loop carry and its result is only the next carry. In the backward, the dK/dV
buffer arrives one step behind its K/V shard (`dkv_in = ring.shift(dkv)` at the top of the step,
read only by the adds after the step's kernels), so that transfer too is independent of the
step's compute. XLA's GPU backend lowers each `ppermute` to an asynchronous
`collective-permute-start` / `collective-permute-done` pair and its latency-hiding scheduler puts
the start before the independent kernels and the done after them, so NCCL's send/receive runs
on its own stream while the attention kernels run. What travels per hop is one buffer: K and V
stacked as one `(2, B, S, K, H)` array (`_pack_kv`; dK/dV likewise), because `ppermute` sends
one collective per array and, given K and V as two, XLA's scheduler ran the first before step
0's kernels (exposed; seen in a profile on two H200s) and overlapped only the second. The key
segment ids, small int32, travel as a second collective. Only the last dK/dV hand-off (after the
last step) is exposed; it is cast to K/V's dtype before it, so in bf16 it carries half the
bytes of the float32 buffer. To check it on a GPU:
  - the schedule: `jax.jit(f).lower(*args).compile().as_text()`: between each
    `collective-permute-start` and its `collective-permute-done` lie the step's kernels (Triton
    custom-calls inside the `conditional`s of `lax.switch`), in the while loop's body for the
    middle steps and in the entry computation for steps 0 and n - 1 (all of them when n = 2).
    `python -m flashjax bench --ring` counts this per program (`flashjax.bench.ring.overlap`).
    If nothing lies between them, the latency-hiding scheduler is off:
    `XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true`.
  - the timeline: `jax.profiler.trace(dir)` around a few calls (or `nsys profile`), then in
    Perfetto / Nsight Systems the NCCL `SendRecv` kernel of step t+1's shard runs on its own
    stream during step t's attention kernels instead of between them.

Steps are one `lax.scan` (the loop body is compiled once, whatever n); step 0 (no transfer to
wait for, the diagonal pairs) and the last step (nothing left to prefetch) are peeled off.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flashjax import backends
from flashjax.attention import Implementation, dot_product_attention, operands
from flashjax.merge import merge_attention
from pallas_kernels import common, visibility
from pallas_kernels.operands import EMPTY, FULL, PARTIAL, KvSource, Operands, cotangent

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")
# How a step skips a wholly invisible pair: "switch" classifies every pair at run time and
# branches (`lax.switch`; on a GPU each conditional reads its branch index on the host), "kernel"
# runs every pair with its positions and lets the kernel skip the tiles no row sees (no
# conditional; an empty pair costs a launch and a merge).
PairDispatch = Literal["switch", "kernel"]
PAIR_DISPATCHES: tuple[str, ...] = ("switch", "kernel")
# What a hop sends: "stacked", K and V copied into one buffer (one collective; see Overlap in
# the module docstring), or "pair", the two arrays as they are (two collectives, no copy; XLA's
# GPU flag --xla_gpu_collective_permute_combine_threshold_bytes may combine them into one);
# "in_place": stacked, and the forward's kernels read each key piece in place from the buffer
# where the backend can (`Backend.forward_in_place`: mosaic) instead of a copy of it.
KvTransfer = Literal["stacked", "pair", "in_place"]
KV_TRANSFERS: tuple[str, ...] = ("stacked", "pair", "in_place")


# --------------------------------------------------------------------------------------------------
# Layouts: which global positions a shard holds
# --------------------------------------------------------------------------------------------------


def pieces_per_shard(layout: str) -> int:
    """Contiguous runs of positions per shard: 1 (contiguous) or 2 (zigzag)."""
    _check_layout(layout)
    return 1 if layout == "contiguous" else 2


def zigzag_chunk(shard, piece, num_shards: int):
    """The global chunk (of 2n) that piece 0 or 1 of `shard` holds in the zigzag layout: chunk r
    and chunk 2n-1-r. Python ints or traced int32 alike."""
    return shard + piece * (2 * num_shards - 1 - 2 * shard)


def piece_start(layout: str, shard, piece: int, piece_len: int, num_shards: int):
    """Global position of row 0 of `piece` of `shard` (pieces of `piece_len` rows)."""
    if layout == "contiguous":
        return shard * piece_len
    return zigzag_chunk(shard, piece, num_shards) * piece_len


def zigzag_order(length: int, num_shards: int) -> np.ndarray:
    """`(length,)` int: the global row at each row of the zigzag order (shard 0's rows first)."""
    chunks = 2 * num_shards
    if num_shards < 1 or length % chunks:
        raise ValueError(
            f"the zigzag layout cuts the sequence into 2 * num_shards = {chunks} equal chunks; "
            f"got length {length}"
        )
    size = length // chunks
    order = [zigzag_chunk(r, p, num_shards) for r in range(num_shards) for p in (0, 1)]
    return (np.asarray(order)[:, None] * size + np.arange(size)[None, :]).reshape(-1)


def _take(x, rows: np.ndarray, axis: int):
    if isinstance(x, np.ndarray):
        return np.take(x, rows, axis=axis)
    return jnp.take(x, jnp.asarray(rows), axis=axis)


def zigzag_permute(x, num_shards: int, axis: int = 1):
    """A global array (numpy or JAX) in zigzag order along `axis`, ready to be sharded over
    `num_shards` devices: shard r then holds chunks r and 2n-1-r of the 2n equal chunks. For n = 2
    and 16 rows the order is 0-3, 12-15, 4-7, 8-11."""
    return _take(x, zigzag_order(x.shape[axis], num_shards), axis)


def zigzag_unpermute(x, num_shards: int, axis: int = 1):
    """The inverse of `zigzag_permute`: zigzag order back to global order along `axis`."""
    return _take(x, np.argsort(zigzag_order(x.shape[axis], num_shards)), axis)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


# --------------------------------------------------------------------------------------------------
# The ring: static context, pieces, pairs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ring:
    """The static side of one call: the mesh axis, its size, the layout and the backend."""

    axis_name: Hashable
    size: int
    layout: str
    backend: backends.Backend
    pair_dispatch: str = "switch"
    kv_transfer: str = "stacked"

    @property
    def pieces(self) -> int:
        return pieces_per_shard(self.layout)

    def shift(self, tree):
        """Send `tree` to the next device of the ring (device r receives from r - 1): one
        collective-permute per leaf."""
        perm = [(i, (i + 1) % self.size) for i in range(self.size)]
        return lax.ppermute(tree, self.axis_name, perm)

    def source(self, step) -> jax.Array:
        """The device whose K/V shard this device holds at `step`."""
        return (lax.axis_index(self.axis_name) - step) % self.size


@dataclasses.dataclass(frozen=True)
class _Queries:
    """One query piece of this device: q `(B, C, N, H)`, segment ids `(B, C)` or None, the global
    position of its row 0 (int32 scalar) and which piece of the shard it is."""

    q: jax.Array
    segments: jax.Array | None
    start: jax.Array
    index: int


@dataclasses.dataclass(frozen=True)
class _Keys:
    """One key piece of the K/V shard held at some step: k, v `(B, C, K, H)`, segment ids
    `(B, C)` or None, the global position of its key 0, its index in the shard, and (with
    `kv_transfer="in_place"`) the stacked buffer it is rows of, for the forward to read in
    place."""

    k: jax.Array
    v: jax.Array
    segments: jax.Array | None
    start: jax.Array
    index: int
    source: KvSource | None = None


def _split(x: jax.Array | None, count: int) -> list[jax.Array | None]:
    """`count` equal pieces of `x` along axis 1 (None stays None)."""
    if x is None:
        return [None] * count
    size = x.shape[1] // count
    return [x[:, i * size : (i + 1) * size] for i in range(count)]


def _queries(ring: Ring, ops: Operands) -> list[_Queries]:
    """This device's query pieces, at their global positions."""
    shard = lax.axis_index(ring.axis_name)
    size = ops.seq_q // ring.pieces
    return [
        _Queries(q, seg, piece_start(ring.layout, shard, i, size, ring.size), i)
        for i, (q, seg) in enumerate(
            zip(_split(ops.q, ring.pieces), _split(ops.q_segments, ring.pieces))
        )
    ]


# K and V (or dK and dV) as the one buffer that travels: `_pack_kv`.
PackedKV = jax.Array | tuple[jax.Array, jax.Array]


def _pack_kv(ring: Ring, k: jax.Array, v: jax.Array) -> PackedKV:
    """K and V stacked on a new leading axis, `(2, B, S, K, H)`, so that a hop sends them as one
    collective (see Overlap in the module docstring); the pair as it is if their shapes or dtypes
    differ (then two collectives) or the ring sends pairs (`kv_transfer="pair"`). `operands`
    gives K and V one shape, dtypes may differ."""
    if ring.kv_transfer != "pair" and k.shape == v.shape and k.dtype == v.dtype:
        return jnp.stack([k, v])
    return k, v


def _unpack_kv(kv: PackedKV) -> tuple[jax.Array, jax.Array]:
    """`(k, v)` of a `_pack_kv` buffer: index 0 and 1 of the stack or of the pair."""
    return kv[0], kv[1]


# The K/V shard that travels: (_pack_kv(ring, k, v), kv_segments).
KV = tuple[PackedKV, jax.Array | None]


def _kv_shard(ring: Ring, ops: Operands) -> KV:
    """This device's K/V shard, packed to travel."""
    return _pack_kv(ring, ops.k, ops.v), ops.kv_segments


def _keys(ring: Ring, kv: KV, step) -> list[_Keys]:
    """The key pieces of the K/V shard held at `step` (device r - step's), at their positions."""
    shard = ring.source(step)
    packed, segments = kv
    k, v, seg = (_split(x, ring.pieces) for x in (*_unpack_kv(packed), segments))
    size = k[0].shape[1]
    in_place = ring.kv_transfer == "in_place" and not isinstance(packed, tuple)
    return [
        _Keys(
            k[i],
            v[i],
            seg[i],
            piece_start(ring.layout, shard, i, size, ring.size),
            i,
            (packed, i * size) if in_place else None,
        )
        for i in range(ring.pieces)
    ]


def _pair(ops: Operands, q: _Queries, kv: _Keys, positional: bool) -> Operands:
    """The operands of one (query piece, key piece) pair, with its positions as offsets when
    `positional` (else the kernels' bounds stay compile-time constants)."""
    offsets = {}
    if positional:
        batch = ops.batch
        offsets = dict(
            q_offsets=jnp.full((batch,), q.start, jnp.int32),
            kv_offsets=jnp.full((batch,), kv.start, jnp.int32),
        )
    return ops.replace(
        q=q.q, k=kv.k, v=kv.v, q_segments=q.segments, kv_segments=kv.segments, **offsets
    )


def _dense(ops: Operands) -> Operands:
    """The same call where every pair is known to be visible: no window, offsets or segments
    (the kernels' loop bounds are then compile-time constants)."""
    statics = dataclasses.replace(ops.statics, window=(None, None))
    return ops.replace(
        statics=statics, q_offsets=None, kv_offsets=None, q_segments=None, kv_segments=None
    )


def _always_full(ops: Operands) -> bool:
    """Whether every (query, key) pair is visible whatever the positions (no window, no
    segments)."""
    return ops.statics.window == (None, None) and not ops.has_segments


def pair_state(ops: Operands) -> jax.Array:
    """EMPTY, PARTIAL or FULL for a whole pair of pieces (every batch row), by the visibility
    rule with the pair as one tile."""
    states = visibility.block_states(ops, ops.seq_q, ops.seq_k, 1, 1)
    return jnp.where(
        jnp.max(states) == EMPTY, EMPTY, jnp.where(jnp.min(states) == FULL, FULL, PARTIAL)
    ).astype(jnp.int32)


def _known_state(ring: Ring, ops: Operands, q: _Queries, key: _Keys, first: bool) -> int | None:
    """A pair's state where the layout alone decides it, else None (known at run time only).
    With a causal-type window (right bound 0) and pieces of one length: a piece against itself
    on the first step is the diagonal (PARTIAL); in the zigzag layout a shard's early piece
    (chunk r < n) comes before every late piece (chunk 2n-1-s >= n) of any shard, so the early
    queries see no late key (EMPTY) and the late queries see every early key (FULL, when no
    left bound or segment ids hide any)."""
    if ops.statics.window[1] != 0 or ops.seq_q != ops.seq_k:
        return None
    if first and q.index == key.index:
        return PARTIAL
    if ring.layout != "zigzag" or q.index == key.index:
        return None
    if q.index < key.index:
        return EMPTY
    full = ops.statics.window[0] is None and not ops.has_segments
    return FULL if full else None


def _visit(
    ring: Ring,
    ops: Operands,
    carry,
    update: Callable[[Operands, object], object],
    known: int | None = None,
):
    """`update(pair, carry)` unless the pair is wholly invisible (then `carry` as it is); a
    FULL pair runs as `_dense(pair)`. The state is `known` (`_known_state`) or known at run time
    only: `lax.switch`; with `ring.pair_dispatch == "kernel"` every such pair runs as it is (the
    kernel skips what no row sees)."""
    if _always_full(ops) or known == FULL:
        return update(_dense(ops), carry)
    if known == EMPTY:
        return carry
    if known == PARTIAL or ring.pair_dispatch == "kernel":
        return update(ops, carry)
    branches = {
        EMPTY: lambda c: c,
        PARTIAL: lambda c: update(ops, c),
        FULL: lambda c: update(_dense(ops), c),
    }
    return lax.switch(pair_state(ops), [branches[s] for s in sorted(branches)], carry)


def _pairs(
    ring: Ring, ops: Operands, queries: Sequence[_Queries], keys: Sequence[_Keys], first: bool
):
    """Every (query piece, key piece) of a step with its operands and its state where the
    layout decides it (`_known_state`). Positions matter only through a window (causal
    included); on the first step a piece meets itself (same shard, same index) and, when
    queries and keys have one length, both start at one position: no offsets needed."""
    windowed = ops.statics.window != (None, None)
    for q in queries:
        for key in keys:
            aligned = first and q.index == key.index and ops.seq_q == ops.seq_k
            pair = _pair(ops, q, key, positional=windowed and not aligned)
            yield q, key, pair, _known_state(ring, ops, q, key, first)


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------

Acc = tuple[jax.Array, jax.Array]  # running (out (B, C, N, H), lse (B, C, N)), float32


def _merge_pair(backend: backends.Backend, key: _Keys, pair: Operands, acc: Acc) -> Acc:
    out, lse = backend.forward_from(pair, key.source)
    return merge_attention(acc[0], acc[1], out, lse)


def _take_pair(backend: backends.Backend, key: _Keys, pair: Operands, acc: Acc) -> Acc:
    """A query piece's first pair: its result is the running one (merged into the empty start,
    out 0 and lse -inf, it would come out the same, bit for bit), with no merge pass."""
    out, lse = backend.forward_from(pair, key.source)
    # A Pallas kernel's outputs vary over no mesh axis; the running result does (lax.switch
    # needs one type from every branch).
    return backends.varying_like((out.astype(acc[0].dtype), lse.astype(acc[1].dtype)), acc[0])


def _forward_step(
    ring: Ring, ops: Operands, queries: Sequence[_Queries], accs, kv: KV, step, first=False
) -> list[Acc]:
    """Merge the attention of every query piece over the K/V shard held at `step` (on the
    `first` step, a piece's first pair is taken as it is)."""
    accs = list(accs)
    fresh = {q.index for q in queries} if first else set()
    for q, key, pair, known in _pairs(ring, ops, queries, _keys(ring, kv, step), first):
        update = _take_pair if q.index in fresh else _merge_pair
        fresh.discard(q.index)
        update = functools.partial(update, ring.backend, key)
        accs[q.index] = _visit(ring, pair, accs[q.index], update, known)
    return accs


def ring_forward(ring: Ring, ops: Operands) -> tuple[jax.Array, jax.Array]:
    """`(out (B, T, N, H) in q's dtype, lse (B, T, N))` of this device's queries over the whole
    sequence; `ops` holds this device's shards."""
    queries = _queries(ring, ops)
    acc = common.acc_dtype(ops.q.dtype)
    accs = [(jnp.zeros_like(q.q, acc), jnp.full_like(q.q[..., 0], -jnp.inf, acc)) for q in queries]
    kv = _kv_shard(ring, ops)
    step = functools.partial(_forward_step, ring, ops, queries)
    if ring.size > 1:
        nxt = ring.shift(kv)  # arrives during step 0
    accs = step(accs, kv, 0, first=True)
    if ring.size > 2:

        def body(carry, t):
            accs, kv = carry
            nxt = ring.shift(kv)  # independent of this step's kernels: overlaps them
            return (step(accs, kv, t), nxt), None

        (accs, nxt), _ = lax.scan(body, (accs, nxt), jnp.arange(1, ring.size - 1))
    if ring.size > 1:
        accs = step(accs, nxt, ring.size - 1)
    out = jnp.concatenate([a[0] for a in accs], axis=1).astype(ops.q.dtype)
    return out, jnp.concatenate([a[1] for a in accs], axis=1)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Residuals:
    """A query piece's rows of the GLOBAL out and lse, and of the cotangent of out."""

    out: jax.Array
    lse: jax.Array
    dout: jax.Array


def _add_grads(backend: backends.Backend, res: _Residuals, pair: Operands, carry):
    """Add a pair's (dQ, dK, dV), recomputed from the global residuals, to `carry`."""
    g = backend.grads(pair, res.out, res.lse, res.dout, None)
    dq, dk, dv = carry
    return dq + g.q, dk + g.k, dv + g.v


def _backward_step(
    ring: Ring,
    ops: Operands,
    queries: Sequence[_Queries],
    res: Sequence[_Residuals],
    dq,
    kv: KV,
    dkv_in: PackedKV | None,
    step,
    first=False,
):
    """Add every pair's gradients of `step`: dQ into `dq` (per query piece); dK/dV of the K/V
    shard held at `step` into fresh buffers, and those into `dkv_in` (the shard's buffer so far,
    None on step 0) only after every kernel of the step, so that its transfer overlaps them."""
    dq = list(dq)
    acc = common.acc_dtype(ops.q.dtype)
    keys = _keys(ring, kv, step)
    dk = [jnp.zeros_like(key.k, acc) for key in keys]
    dv = [jnp.zeros_like(key.v, acc) for key in keys]
    for q, key, pair, known in _pairs(ring, ops, queries, keys, first):
        i, j = q.index, key.index
        update = functools.partial(_add_grads, ring.backend, res[i])
        dq[i], dk[j], dv[j] = _visit(ring, pair, (dq[i], dk[j], dv[j]), update, known)
    dkv = _pack_kv(ring, jnp.concatenate(dk, axis=1), jnp.concatenate(dv, axis=1))
    if dkv_in is not None:
        dkv = jax.tree.map(jnp.add, dkv_in, dkv)
    return dq, dkv


def ring_backward(
    ring: Ring, ops: Operands, out: jax.Array, lse: jax.Array, dout: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(dq, dk, dv)` of this device's shards from the global residuals `out`, `lse` (this
    device's rows) and the cotangent `dout`."""
    queries = _queries(ring, ops)
    res = [_Residuals(*r) for r in zip(*(_split(x, ring.pieces) for x in (out, lse, dout)))]
    acc = common.acc_dtype(ops.q.dtype)
    dq = [jnp.zeros_like(q.q, acc) for q in queries]
    kv = _kv_shard(ring, ops)
    step = functools.partial(_backward_step, ring, ops, queries, res)
    if ring.size > 1:
        nxt = ring.shift(kv)
    dq, dkv = step(dq, kv, None, 0, first=True)
    if ring.size > 2:

        def body(carry, t):
            dq, kv, dkv = carry
            nxt = ring.shift(kv)
            # The buffer of the shard held now, one hop behind it: added after the kernels.
            dkv_in = ring.shift(dkv)
            dq, dkv = step(dq, kv, dkv_in, t)
            return (dq, nxt, dkv), None

        (dq, nxt, dkv), _ = lax.scan(body, (dq, nxt, dkv), jnp.arange(1, ring.size - 1))
    if ring.size > 1:
        dq, dkv = step(dq, nxt, ring.shift(dkv), ring.size - 1)
    # The last hop has no step left to overlap: it carries K/V's dtype (half float32's bytes in
    # bf16), cast before it; the cast commutes with the transfer (the same bits arrive).
    dk, dv = _unpack_kv(dkv)
    dkv = _pack_kv(ring, dk.astype(ops.k.dtype), dv.astype(ops.v.dtype))
    if ring.size > 1:
        dkv = ring.shift(dkv)  # the last hop: each buffer back to its shard's device
    dq = jnp.concatenate(dq, axis=1).astype(ops.q.dtype)
    return dq, *_unpack_kv(dkv)


# --------------------------------------------------------------------------------------------------
# The differentiable op
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: Ring, ops: Operands) -> jax.Array:
    return ring_forward(ring, ops)[0]


def _ring_attention_fwd(ring: Ring, ops: Operands):
    out, lse = ring_forward(ring, ops)
    return out, (ops, out, lse)


def _ring_attention_bwd(ring: Ring, residuals, dout: jax.Array):
    ops, out, lse = residuals
    dq, dk, dv = ring_backward(ring, ops, out, lse, dout)
    return (cotangent(ops, q=dq, k=dk, v=dv),)


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _axis_size(axis_name: Hashable) -> int:
    try:
        return int(lax.axis_size(axis_name))
    except NameError:
        raise ValueError(
            f"axis_name {axis_name!r} is not a mesh axis here: call ring_attention inside "
            "jax.shard_map over a mesh with that axis"
        ) from None


def _ring_backend(implementation: str | None, ops: Operands) -> backends.Backend:
    """The backend of every pair; it must have a backward from given residuals."""
    backend = backends.choose(implementation, ops)
    if backend.backward is None:
        raise ValueError(
            f"implementation={backend.name!r} cannot serve ring attention: its gradient is "
            "autodiff of one call, while ring attention recomputes every part from the merged "
            "out and logsumexp; use 'xla_chunked' or 'triton'"
        )
    return backend


def _check_call(query, layout: str) -> None:
    """Before the operands are built: the layout and the rank (the sequence is axis 1)."""
    _check_layout(layout)
    if getattr(query, "ndim", None) != 4:
        raise ValueError(
            "ring attention takes rank-4 (B, T, N, H) shards, the sequence on axis 1; got query "
            f"shape {getattr(query, 'shape', None)}"
        )


def _check_ops(ops: Operands, layout: str) -> None:
    """After: a static scale, and shards that split into the layout's pieces."""
    if ops.scale is not None:
        raise ValueError("ring attention takes a static scale (a Python float or None)")
    pieces = pieces_per_shard(layout)
    if ops.seq_q % pieces or ops.seq_k % pieces:
        raise ValueError(
            f"the {layout} layout splits each shard into {pieces} pieces; got query shard length "
            f"{ops.seq_q} and key shard length {ops.seq_k}"
        )


def ring_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    axis_name: Hashable,
    is_causal: bool = False,
    layout: Layout = "contiguous",
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    implementation: Implementation | None = None,
    pair_dispatch: PairDispatch = "switch",
    kv_transfer: KvTransfer = "stacked",
) -> jax.Array:
    """Exact attention over a sequence sharded on mesh axis `axis_name`; call inside
    `jax.shard_map`.

    Every argument is this device's shard: the sequence (axis 1) of query, key, value and the
    segment ids is split over `axis_name` (n devices); other axes (batch, heads) may be sharded
    over other mesh axes, which pass through untouched. The result is this device's shard of
    `dot_product_attention` on the whole sequence with the same arguments.

    Args:
      query: `Float[Array, "B T N H"]`, T = the query sequence / n.
      key: `Float[Array, "B S K H"]`, S = the key sequence / n, N a multiple of K (GQA / MQA).
      value: same shape and dtype as key.
      axis_name: the mesh axis that shards the sequence.
      is_causal: query at global position p sees keys at positions <= p.
      layout: `"contiguous"`: device r holds rows r*T .. (r+1)*T - 1. `"zigzag"`: the sequence is
        cut into 2n chunks and device r holds chunks r and 2n-1-r (`zigzag_permute` before
        sharding, `zigzag_unpermute` after gathering), which balances causal work; T and S even.
      scale, local_window_size, logits_soft_cap: as `dot_product_attention` (global positions).
      q_segment_ids: `Int[Array, "B T"]`, kv_segment_ids: `Int[Array, "B S"]`: shards of the
        segment ids (packed documents), in the same layout.
      implementation: the kernel of every step, as `dot_product_attention`'s (None: its choice,
        "mosaic" on Hopper for what it serves, else "triton" on NVIDIA GPUs, "xla_chunked"
        elsewhere). "xla" cannot serve: it has no backward from given residuals.
      pair_dispatch: how a step skips a (query piece, key piece) pair no query sees:
        "switch" (a `lax.switch` on the pair's state, read on the host on a GPU) or "kernel"
        (no conditional: the pair runs and its kernel skips every tile).
      kv_transfer: what a hop sends: "stacked" (K and V copied into one buffer: one collective)
        or "pair" (the two arrays: two collectives, no copy); "in_place": stacked, and the
        forward's kernels read each key piece in place from the buffer where the backend can
        ("mosaic"), instead of a copy of the piece.

    Returns:
      `Float[Array, "B T N H"]` in query's dtype: this device's rows of the attention output.
      Differentiable (`jax.custom_vjp`; see the module docstring for the backward).
    """
    _check_call(query, layout)
    if pair_dispatch not in PAIR_DISPATCHES:
        raise ValueError(f"pair_dispatch must be one of {PAIR_DISPATCHES}; got {pair_dispatch!r}")
    if kv_transfer not in KV_TRANSFERS:
        raise ValueError(f"kv_transfer must be one of {KV_TRANSFERS}; got {kv_transfer!r}")
    ops = operands(
        query,
        key,
        value,
        scale=scale,
        is_causal=is_causal,
        local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    _check_ops(ops, layout)
    backend = _ring_backend(implementation, ops)
    ring = Ring(axis_name, _axis_size(axis_name), layout, backend, pair_dispatch, kv_transfer)
    return _ring_attention(ring, ops)


# --------------------------------------------------------------------------------------------------
# The all-gather baseline
# --------------------------------------------------------------------------------------------------


def all_gather_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    axis_name: Hashable,
    is_causal: bool = False,
    layout: Layout = "contiguous",
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    implementation: Implementation | None = None,
) -> jax.Array:
    """What ring attention is measured against (MaxText's default context parallelism): the same
    call and result as `ring_attention`, by all-gathering K/V (and key segment ids) inside
    `shard_map`, restoring global order (zigzag), then one `dot_product_attention` per query
    piece at its global position. Every device holds the whole K/V: memory O(S), not O(S / n).
    Differentiable by autodiff (the gather's transpose reduce-scatters dK/dV)."""
    _check_call(query, layout)
    n = _axis_size(axis_name)

    def gather(x: jax.Array | None) -> jax.Array | None:
        if x is None:
            return None
        x = lax.all_gather(x, axis_name, axis=1, tiled=True)
        return zigzag_unpermute(x, n) if layout == "zigzag" else x

    k, v, kv_seg = gather(key), gather(value), gather(kv_segment_ids)
    shard = lax.axis_index(axis_name)
    positional = is_causal or local_window_size is not None
    pieces = pieces_per_shard(layout)
    outs = []
    for i, (q, seg) in enumerate(zip(_split(query, pieces), _split(q_segment_ids, pieces))):
        start = piece_start(layout, shard, i, q.shape[1], n)
        offsets = jnp.full((q.shape[0],), start, jnp.int32) if positional else None
        outs.append(
            dot_product_attention(
                q,
                k,
                v,
                scale=scale,
                is_causal=is_causal,
                local_window_size=local_window_size,
                logits_soft_cap=logits_soft_cap,
                q_segment_ids=seg,
                kv_segment_ids=kv_seg,
                q_offsets=offsets,
                implementation=implementation,
            )
        )
    return jnp.concatenate(outs, axis=1)
