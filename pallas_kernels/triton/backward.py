"""FlashAttention backward on Pallas' Triton lowering (the FA2 scheme, deterministic).

`delta = rowsum(dO * O)` comes from the caller (one fused XLA reduction). Two kernels then recompute
the scores tile by tile from (q, k, lse2), never storing the (T, S) matrices:
- dK/dV: one program per (key tile, batch, KV head). It loops over the query heads of its GQA group
  and over the query tiles that can see its keys (the visibility rule's transposed form),
  accumulating dK and dV on chip, so repeated K/V are never materialized and the group sum costs
  nothing.
- dQ: one program per (query tile, batch, query head), walking the visible key tiles.
The caller (api.py) passes one record of the two kernels' operands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.configs import KernelConfig
from pallas_kernels.operands import AttentionStatics
from pallas_kernels.triton import tiles


def _tile_grads(
    q,
    k,
    v,
    do,
    lse2,
    delta,
    rows,
    cols,
    *,
    statics: AttentionStatics,
    mask,
    bias,
    stream,
):
    """Recompute one (query tile x key tile): returns (p_dropped, ds_qk) in float32.

    `p_dropped` multiplies dO into dV; `ds_qk * scale` multiplies K into dQ and Q into dK.
    """
    s2, tanh = common.scores(tiles.dot(q, k, trans_b=True), statics.scale, statics, bias, mask)
    p = common.probs_from_lse(s2, lse2)
    dp = tiles.dot(do, v, trans_b=True)
    if stream is not None:
        keep = common.dropout_scale(statics, stream, rows, cols)
        p_dropped, dp = p * keep, dp * keep
    else:
        p_dropped = p
    _, ds = common.logits_grad(p, dp, delta, tanh)
    return p_dropped, ds


def _dkdv_kernel(
    r: tiles.Refs,
    dk_ref,
    dv_ref,
    *,
    statics: AttentionStatics,
    block_q: int,
    num_heads: int,
    static_seq: tuple[int, int, int, int],
):
    block_k, head_dim = r.k.shape
    group = r.q.shape[1]
    kb, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k0 = kb * block_k
    cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
    seq = tiles.seq_of(r, static_seq)
    k = tiles.zero_past(r.k[...], cols, seq[3])
    v = tiles.zero_past(r.v[...], cols, seq[3])
    kv_segments = None if r.kv_segments is None else r.kv_segments[pl.ds(k0, block_k)]

    def head_body(g, carry):
        head = kh * group + g
        stream = None
        if statics.has_dropout:
            stream = common.head_stream(statics, r.seeds, b, head, num_heads)

        def body(qb, carry, *, masked: bool):
            dk, dv = carry
            q0 = qb * block_q
            rows = q0 + jnp.arange(block_q, dtype=jnp.int32)
            q = r.q[pl.ds(q0, block_q), g, :]
            do = r.do[pl.ds(q0, block_q), g, :]
            mask = None
            if masked:
                q_segments = None if r.q_segments is None else r.q_segments[pl.ds(q0, block_q)]
                mask = tiles.tile_mask(statics, rows, cols, seq, q_segments, kv_segments, b, head)
                q, do = tiles.zero_past(q, rows, seq[2]), tiles.zero_past(do, rows, seq[2])
            bias = None if r.bias is None else tiles.load_bias(r.bias, g, q0, block_q, k0, block_k)
            p_dropped, ds = _tile_grads(
                q,
                k,
                v,
                do,
                r.lse2[g, pl.ds(q0, block_q)],
                r.delta[g, pl.ds(q0, block_q)],
                rows,
                cols,
                statics=statics,
                mask=mask,
                bias=bias,
                stream=stream,
            )
            dv = dv + tiles.dot(p_dropped.astype(do.dtype), do, trans_a=True)
            dk = dk + tiles.dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        lists_head = g if r.full is not None and r.full.shape[0] > 1 else 0
        where = tiles.visits(
            r, statics, k0, block_k, block_q, seq, transposed=True, head=lists_head
        )
        return tiles.walk(body, carry, **where)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
    dk_ref[...] = (dk * statics.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    r: tiles.Refs,
    dq_ref,
    *,
    statics: AttentionStatics,
    block_k: int,
    num_heads: int,
    static_seq: tuple[int, int, int, int],
):
    block_q, head_dim = r.q.shape
    t = tiles.query_tile(r, statics, block_q, num_heads, static_seq)
    q = tiles.zero_past(r.q[...], t.rows, t.seq[2])
    do = tiles.zero_past(r.do[...], t.rows, t.seq[2])
    lse2 = r.lse2[...]
    delta = r.delta[...]

    def body(kb, dq, *, masked: bool):
        kt = tiles.key_tile(r, t, statics, kb, block_q, block_k, masked=masked)
        _, ds = _tile_grads(
            q,
            kt.k,
            kt.v,
            do,
            lse2,
            delta,
            t.rows,
            kt.cols,
            statics=statics,
            mask=kt.mask,
            bias=kt.bias,
            stream=t.stream,
        )
        return dq + tiles.dot(ds.astype(kt.k.dtype), kt.k)

    dq = jnp.zeros((block_q, head_dim), jnp.float32)
    dq = tiles.walk(body, dq, **tiles.visits(r, statics, t.q0, block_q, block_k, t.seq))
    dq_ref[...] = (dq * statics.scale).astype(dq_ref.dtype)


def dkdv(
    r: tiles.Refs,
    *,
    statics: AttentionStatics,
    config: KernelConfig,
    interpret: bool,
    static_seq: tuple[int, int, int, int],
) -> tuple[jax.Array, jax.Array]:
    """dK, dV: grid (key tile, batch, KV head); a program reads its whole GQA group of queries."""
    batch, seq_q, num_heads, head_dim = r.q.shape
    seq_k, num_kv_heads = r.k.shape[1], r.k.shape[2]
    group = num_heads // num_kv_heads
    bq, bk = config.block_q, config.block_k
    q_group = pl.BlockSpec((None, seq_q, group, head_dim), lambda i, b, g: (b, 0, g, 0))
    kv_tile = pl.BlockSpec((None, bk, None, head_dim), lambda i, b, g: (b, i, g, 0))
    row_stats = pl.BlockSpec((None, group, seq_q), lambda i, b, g: (b, g, 0))
    specs = r.specs(
        q=q_group,
        k=kv_tile,
        v=kv_tile,
        do=q_group,
        lse2=row_stats,
        delta=row_stats,
        bias=tiles.bias_spec(r.bias, group, lambda i, b, g: (b, g)),
        full=tiles.lists_spec(r.full, group, lambda i, b, g: (i, b, g)),
        partial=tiles.lists_spec(r.partial, group, lambda i, b, g: (i, b, g)),
        **tiles.row_specs(r, row_of=lambda i, b, g: b),
    )
    return pl.pallas_call(
        functools.partial(
            _dkdv_kernel,
            statics=statics,
            block_q=bq,
            num_heads=num_heads,
            static_seq=static_seq,
        ),
        grid=(seq_k // bk, batch, num_kv_heads),
        in_specs=(specs,),
        out_specs=[kv_tile, kv_tile],
        out_shape=[
            tiles.out_shape(r.q, r.k.shape, r.k.dtype),
            tiles.out_shape(r.q, r.v.shape, r.v.dtype),
        ],
        compiler_params=tiles.compiler_params(config),
        interpret=interpret,
        name="flashjax_bwd_dkdv",
    )(r)


def dq(
    r: tiles.Refs,
    *,
    statics: AttentionStatics,
    config: KernelConfig,
    interpret: bool,
    static_seq: tuple[int, int, int, int],
) -> jax.Array:
    """dQ: grid (query tile, batch, query head), like the forward."""
    batch, seq_q, num_heads, head_dim = r.q.shape
    seq_k, num_kv_heads = r.k.shape[1], r.k.shape[2]
    group = num_heads // num_kv_heads
    bq, bk = config.block_q, config.block_k
    q_tile = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    specs = r.specs(
        q=q_tile,
        k=kv_full,
        v=kv_full,
        do=q_tile,
        lse2=row_tile,
        delta=row_tile,
        bias=tiles.bias_spec(r.bias, 1, lambda i, b, h: (b, h)),
        full=tiles.lists_spec(r.full, 1, lambda i, b, h: (i, b, h)),
        partial=tiles.lists_spec(r.partial, 1, lambda i, b, h: (i, b, h)),
        **tiles.row_specs(r, row_of=lambda i, b, h: b),
    )
    return pl.pallas_call(
        functools.partial(
            _dq_kernel,
            statics=statics,
            block_k=bk,
            num_heads=num_heads,
            static_seq=static_seq,
        ),
        grid=(seq_q // bq, batch, num_heads),
        in_specs=(specs,),
        out_specs=q_tile,
        out_shape=tiles.out_shape(r.q, r.q.shape, r.q.dtype),
        compiler_params=tiles.compiler_params(config),
        interpret=interpret,
        name="flashjax_bwd_dq",
    )(r)
