"""FlashAttention backward on Pallas' Triton lowering (the FA2 scheme, deterministic).

`delta = rowsum(dO * O)` comes from the caller (one fused XLA reduction). Two kernels then recompute
the scores tile by tile from (q, k, lse2), never storing the (T, S) matrices:
- dK/dV: one program per (key block, batch, KV head). It loops over the query heads of its GQA group
  and over the query blocks that can see its keys, accumulating dK and dV on chip, so repeated K/V
  are never materialized and the group sum costs nothing.
- dQ: one program per (query block, batch, query head), looping over visible key blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels.configs import KernelConfig
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
    statics: common.AttentionStatics,
    masked: bool,
    bias,
    q_segments,
    kv_segments,
    stream,
):
    """Recompute one (query block x key block) tile: returns (p_dropped, ds_qk) in float32.

    `p_dropped` multiplies dO into dV; `ds_qk * scale` multiplies K into dQ and Q into dK.
    """
    s2, tanh = common.tile_scores(
        tiles.dot(q, k, trans_b=True),
        statics,
        rows,
        cols,
        masked=masked,
        bias=bias,
        row_segments=q_segments,
        col_segments=kv_segments,
    )
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
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    kseg_ref,
    bias_ref,
    seeds_ref,
    dk_ref,
    dv_ref,
    *,
    statics: common.AttentionStatics,
    block_q: int,
    num_heads: int,
):
    block_k, head_dim = k_ref.shape
    seq_q, group = q_ref.shape[0], q_ref.shape[1]
    kb, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k0 = kb * block_k
    cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
    k = k_ref[...]
    v = v_ref[...]
    kv_segments = None if kseg_ref is None else kseg_ref[pl.ds(k0, block_k)]
    blocks = common.block_range(
        k0, block_k, block_q, seq_q, seq_q, statics.transposed(), n_rows=statics.kv_len
    )

    def head_body(g, carry):
        stream = tiles.head_stream(statics, seeds_ref, b, kh * group + g, num_heads)

        def body(qb, carry, *, masked: bool):
            dk, dv = carry
            q0 = qb * block_q
            rows = q0 + jnp.arange(block_q, dtype=jnp.int32)
            q = q_ref[pl.ds(q0, block_q), g, :]
            do = do_ref[pl.ds(q0, block_q), g, :]
            p_dropped, ds = _tile_grads(
                q,
                k,
                v,
                do,
                lse_ref[g, pl.ds(q0, block_q)],
                delta_ref[g, pl.ds(q0, block_q)],
                rows,
                cols,
                statics=statics,
                masked=masked,
                bias=None
                if bias_ref is None
                else tiles.load_bias(bias_ref, g, q0, block_q, k0, block_k),
                q_segments=None if qseg_ref is None else qseg_ref[pl.ds(q0, block_q)],
                kv_segments=kv_segments,
                stream=stream,
            )
            dv = dv + tiles.dot(p_dropped.astype(do.dtype), do, trans_a=True)
            dk = dk + tiles.dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        return tiles.visit_blocks(body, carry, blocks, statics.has_segments)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
    dk_ref[...] = (dk * statics.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    kseg_ref,
    bias_ref,
    seeds_ref,
    dq_ref,
    *,
    statics: common.AttentionStatics,
    block_k: int,
    num_heads: int,
):
    block_q, head_dim = q_ref.shape
    seq_k = k_ref.shape[0]
    q0, rows, q_segments = tiles.query_block(block_q, qseg_ref)
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...]
    delta = delta_ref[...]
    stream = tiles.head_stream(statics, seeds_ref, pl.program_id(1), pl.program_id(2), num_heads)

    def body(kb, dq, *, masked: bool):
        k0 = kb * block_k
        cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
        k = k_ref[pl.ds(k0, block_k), :]
        _, ds = _tile_grads(
            q,
            k,
            v_ref[pl.ds(k0, block_k), :],
            do,
            lse2,
            delta,
            rows,
            cols,
            statics=statics,
            masked=masked,
            bias=None
            if bias_ref is None
            else tiles.load_bias(bias_ref, 0, q0, block_q, k0, block_k),
            q_segments=q_segments,
            kv_segments=None if kseg_ref is None else kseg_ref[pl.ds(k0, block_k)],
            stream=stream,
        )
        return dq + tiles.dot(ds.astype(k.dtype), k)

    blocks = common.block_range(q0, block_q, block_k, seq_k, statics.kv_len, statics.window)
    dq = tiles.visit_blocks(
        body, jnp.zeros((block_q, head_dim), jnp.float32), blocks, statics.has_segments
    )
    dq_ref[...] = (dq * statics.scale).astype(dq_ref.dtype)


def _operand_specs(q, k, q_segments, kv_segments, bias, seeds, *, grid_head_of, heads_per_program):
    """Specs of the trailing operands (segments, bias, seeds) common to both backward kernels."""
    seq_q, seq_k = q.shape[1], k.shape[1]

    def seg_spec(x, length):
        return None if x is None else pl.BlockSpec((None, length), lambda i, b, h: (b, 0))

    return [
        seg_spec(q_segments, seq_q),
        seg_spec(kv_segments, seq_k),
        tiles.bias_spec(bias, heads_per_program, grid_head_of),
        None if seeds is None else pl.BlockSpec((2,), lambda i, b, h: (0,)),
    ]


def dkdv(
    q,
    k,
    v,
    do,
    lse2,
    delta,
    q_segments,
    kv_segments,
    bias,
    seeds,
    *,
    statics: common.AttentionStatics,
    config: KernelConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """dK, dV: grid (key block, batch, KV head); a program reads its whole GQA group of queries."""
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq, bk = config.block_q, config.block_k
    q_group = pl.BlockSpec((None, seq_q, group, head_dim), lambda i, b, g: (b, 0, g, 0))
    kv_tile = pl.BlockSpec((None, bk, None, head_dim), lambda i, b, g: (b, i, g, 0))
    row_stats = pl.BlockSpec((None, group, seq_q), lambda i, b, g: (b, g, 0))
    specs = _operand_specs(
        q,
        k,
        q_segments,
        kv_segments,
        bias,
        seeds,
        grid_head_of=lambda i, b, g: (b, g),
        heads_per_program=group,
    )
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, statics=statics, block_q=bq, num_heads=num_heads),
        grid=(seq_k // bk, batch, num_kv_heads),
        in_specs=[q_group, kv_tile, kv_tile, q_group, row_stats, row_stats, *specs],
        out_specs=[kv_tile, kv_tile],
        out_shape=[tiles.out_shape(q, k.shape, k.dtype), tiles.out_shape(q, v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="flashjax_bwd_dkdv",
    )(q, k, v, do, lse2, delta, q_segments, kv_segments, bias, seeds)


def dq(
    q,
    k,
    v,
    do,
    lse2,
    delta,
    q_segments,
    kv_segments,
    bias,
    seeds,
    *,
    statics: common.AttentionStatics,
    config: KernelConfig,
    interpret: bool,
) -> jax.Array:
    """dQ: grid (query block, batch, query head), like the forward."""
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq, bk = config.block_q, config.block_k
    q_tile = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    specs = _operand_specs(
        q,
        k,
        q_segments,
        kv_segments,
        bias,
        seeds,
        grid_head_of=lambda i, b, h: (b, h),
        heads_per_program=1,
    )
    return pl.pallas_call(
        functools.partial(_dq_kernel, statics=statics, block_k=bk, num_heads=num_heads),
        grid=(seq_q // bq, batch, num_heads),
        in_specs=[q_tile, kv_full, kv_full, q_tile, row_tile, row_tile, *specs],
        out_specs=q_tile,
        out_shape=tiles.out_shape(q, q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="flashjax_bwd_dq",
    )(q, k, v, do, lse2, delta, q_segments, kv_segments, bias, seeds)


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    lse2: jax.Array,
    delta: jax.Array,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    bias: jax.Array | None,
    seeds: jax.Array | None,
    *,
    statics: common.AttentionStatics,
    dkdv_config: KernelConfig,
    dq_config: KernelConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Padded operands (see tiles.py) -> (dq, dk, dv) in the operands' padded shapes and dtypes."""
    operands = (q, k, v, do, lse2, delta, q_segments, kv_segments, bias, seeds)
    dk_, dv_ = dkdv(*operands, statics=statics, config=dkdv_config, interpret=interpret)
    dq_ = dq(*operands, statics=statics, config=dq_config, interpret=interpret)
    return dq_, dk_, dv_
