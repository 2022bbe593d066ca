"""FlashAttention forward on Pallas' Triton lowering.

Grid: one program per (query block, batch, query head). A program keeps its query tile on chip,
walks the key blocks that `block_range` says it can see (boundary blocks with the element mask,
interior blocks without), and writes its output tile and base-2 logsumexp once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels.configs import KernelConfig
from pallas_kernels.triton import tiles


def _forward_kernel(
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    bias_ref,
    seeds_ref,
    o_ref,
    lse_ref,
    *,
    statics: common.AttentionStatics,
    block_k: int,
    num_heads: int,
):
    block_q, head_dim = q_ref.shape
    seq_k = k_ref.shape[0]
    q0, rows, q_segments = tiles.query_block(block_q, qseg_ref)
    q = q_ref[...]
    stream = tiles.head_stream(statics, seeds_ref, pl.program_id(1), pl.program_id(2), num_heads)

    def body(kb, carry, *, masked: bool):
        acc, m, l = carry
        k0 = kb * block_k
        cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
        k = k_ref[pl.ds(k0, block_k), :]
        v = v_ref[pl.ds(k0, block_k), :]
        bias = None if bias_ref is None else tiles.load_bias(bias_ref, 0, q0, block_q, k0, block_k)
        s2, _ = common.tile_scores(
            tiles.dot(q, k, trans_b=True),
            statics,
            rows,
            cols,
            masked=masked,
            bias=bias,
            row_segments=q_segments,
            col_segments=None if kseg_ref is None else kseg_ref[pl.ds(k0, block_k)],
        )
        p, m, l, alpha = common.online_softmax_step(s2, m, l)
        if stream is not None:
            p = p * common.dropout_scale(statics, stream, rows, cols)
        acc = acc * alpha[:, None] + tiles.dot(p.astype(v.dtype), v)
        return acc, m, l

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    blocks = common.block_range(q0, block_q, block_k, seq_k, statics.kv_len, statics.window)
    carry = tiles.visit_blocks(body, carry, blocks, statics.has_segments)
    out, lse2 = common.finalize(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    bias: jax.Array | None,
    seeds: jax.Array | None,
    *,
    statics: common.AttentionStatics,
    config: KernelConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """Padded operands (see tiles.py) -> (out (B, Tp, N, Hp), lse2 (B, N, Tp) float32)."""
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq, bk = config.block_q, config.block_k
    grid = (seq_q // bq, batch, num_heads)
    kv_spec = pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    in_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        kv_spec,
        kv_spec,
        None if q_segments is None else pl.BlockSpec((None, seq_q), lambda i, b, h: (b, 0)),
        None if kv_segments is None else pl.BlockSpec((None, seq_k), lambda i, b, h: (b, 0)),
        tiles.bias_spec(bias, 1, lambda i, b, h: (b, h)),
        None if seeds is None else pl.BlockSpec((2,), lambda i, b, h: (0,)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
    ]
    out_shape = [
        tiles.out_shape(q, q.shape, q.dtype),
        tiles.out_shape(q, (batch, num_heads, seq_q), jnp.float32),
    ]
    kernel = functools.partial(_forward_kernel, statics=statics, block_k=bk, num_heads=num_heads)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="flashjax_fwd",
    )(q, k, v, q_segments, kv_segments, bias, seeds)
