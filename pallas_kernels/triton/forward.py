"""FlashAttention forward on Pallas' Triton lowering.

Grid: one program per (query tile, batch, query head). A program keeps its query tile on chip,
walks the key tiles the visibility rule lets it see (interior tiles without the element mask,
boundary and partial tiles with it; `tiles.walk`), and writes its output tile and base-2 logsumexp
once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.configs import KernelConfig
from pallas_kernels.operands import AttentionStatics
from pallas_kernels.triton import tiles


def _forward_kernel(
    r: tiles.Refs,
    o_ref,
    lse_ref,
    *,
    statics: AttentionStatics,
    block_k: int,
    num_heads: int,
    static_seq: tuple[int, int, int, int],
):
    block_q, head_dim = r.q.shape
    t = tiles.query_tile(r, statics, block_q, num_heads, static_seq)
    q = r.q[...]

    def body(kb, carry, *, masked: bool):
        acc, m, l = carry
        kt = tiles.key_tile(r, t, statics, kb, block_q, block_k, masked=masked)
        qk = tiles.dot(q, kt.k, trans_b=True)
        s2, _ = common.scores(qk, statics.scale, statics, kt.bias, kt.mask)
        p, m, l, alpha = common.online_softmax_step(s2, m, l)
        if t.stream is not None:
            p = p * common.dropout_scale(statics, t.stream, t.rows, kt.cols)
        acc = acc * alpha[:, None] + tiles.dot(p.astype(kt.v.dtype), kt.v)
        return acc, m, l

    carry = tiles.walk(
        body,
        common.online_softmax_start(block_q, head_dim),
        **tiles.visits(r, statics, t.q0, block_q, block_k, t.seq),
    )
    out, lse2 = common.finalize(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def forward(
    r: tiles.Refs,
    *,
    statics: AttentionStatics,
    config: KernelConfig,
    interpret: bool,
    static_seq: tuple[int, int, int, int],
) -> tuple[jax.Array, jax.Array]:
    """Padded operands (see tiles.py) -> (out (B, Tp, N, Hp), lse2 (B, N, Tp) float32)."""
    batch, seq_q, num_heads, head_dim = r.q.shape
    seq_k, num_kv_heads = r.k.shape[1], r.k.shape[2]
    group = num_heads // num_kv_heads
    bq, bk = config.block_q, config.block_k
    grid = (seq_q // bq, batch, num_heads)
    q_tile = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    specs = r.specs(
        q=q_tile,
        k=kv_full,
        v=kv_full,
        bias=tiles.bias_spec(r.bias, 1, lambda i, b, h: (b, h)),
        full=tiles.lists_spec(r.full, 1, lambda i, b, h: (i, b, h)),
        partial=tiles.lists_spec(r.partial, 1, lambda i, b, h: (i, b, h)),
        **tiles.row_specs(r, row_of=lambda i, b, h: b),
    )
    out_specs = [q_tile, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
    out_shape = [
        tiles.out_shape(r.q, r.q.shape, r.q.dtype),
        tiles.out_shape(r.q, (batch, num_heads, seq_q), jnp.float32),
    ]
    kernel = functools.partial(
        _forward_kernel,
        statics=statics,
        block_k=bk,
        num_heads=num_heads,
        static_seq=static_seq,
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=(specs,),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tiles.compiler_params(config),
        interpret=interpret,
        name="flashjax_fwd",
    )(r)
