"""Operands of the Triton-lowered kernels: how each array is blocked and how its tiles are loaded.

All three kernels (forward, dK/dV, dQ) see the same padded layout, prepared by `api.py`:
  q, out, dout    (B, Tp, N, Hp)          k, v  (B, Sp, K, Hp)
  lse2, delta     (B, N, Tp) float32       q_segments (B, Tp), kv_segments (B, Sp) int32
  bias            (Bb, Nb, Tb, Sb) float32, Bb in {1, B}, Nb in {1, N}, Tb in {1, Tp}, Sb in {1, Sp}
  seeds           (2,) uint32
Tp, Sp are multiples of the block sizes and Hp is a power of two (zero padding).
A broadcast bias is read with broadcasting: a (1, 1, T, S) bias is never expanded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """A tile matmul with float32 accumulation; float32 operands use full precision (no TF32)."""
    exact = a.dtype == jnp.float32
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=not exact)


def bias_spec(bias: jax.Array | None, heads_per_program: int, head_of) -> pl.BlockSpec | None:
    """BlockSpec of the bias: a program sees its batch/head's whole (Tb, Sb) plane.

    `head_of(*grid_ids) -> (batch, head block)`; `heads_per_program` is the head block size (1, or
    the GQA group in the dK/dV kernel). Broadcast axes always read block 0.
    """
    if bias is None:
        return None
    bb, nb, tb, sb = bias.shape
    hb = heads_per_program if nb > 1 else 1

    def index(*ids):
        b, h = head_of(*ids)
        return (b if bb > 1 else 0, h if nb > 1 else 0, 0, 0)

    return pl.BlockSpec((None, hb, tb, sb), index)


def load_bias(
    bias_ref, head: jax.Array | int, q0: jax.Array, bq: int, k0: jax.Array, bk: int
) -> jax.Array:
    """The (bq or 1, bk or 1) bias tile for rows q0.. and cols k0.. of head `head` in the block."""
    hb, tb, sb = bias_ref.shape
    rows = pl.ds(q0, bq) if tb > 1 else pl.ds(0, 1)
    cols = pl.ds(k0, bk) if sb > 1 else pl.ds(0, 1)
    return bias_ref[head if hb > 1 else 0, rows, cols]


def out_shape(like: jax.Array, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """An output of `shape` that varies over the same manual mesh axes as `like` (so the kernels
    work inside `jax.shard_map` with its default `check_vma=True`)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def head_stream(
    statics: common.AttentionStatics, seeds_ref, batch: jax.Array, head: jax.Array, num_heads: int
) -> jax.Array | None:
    """The dropout stream of one (batch, query head), or None without dropout."""
    if not statics.has_dropout:
        return None
    bh = 0 if statics.dropout_broadcast else batch * num_heads + head
    return common.dropout_stream(seeds_ref[0], seeds_ref[1], bh)


def query_block(block_q: int, qseg_ref) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """For a program whose grid axis 0 is the query block: (first row, row indices, segment ids)."""
    q0 = pl.program_id(0) * block_q
    q_segments = None if qseg_ref is None else qseg_ref[pl.ds(q0, block_q)]
    return q0, q0 + jnp.arange(block_q, dtype=jnp.int32), q_segments


def visit_blocks(body, carry, block_range, has_segments: bool):
    """Run `body(i, carry, masked=...)` over the blocks of `common.block_range`'s
    `(lo, full_lo, full_hi, hi)`: boundary blocks with the element mask, interior ones without.
    With segment ids every block is masked."""
    lo, full_lo, full_hi, hi = block_range
    if has_segments:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)
