"""Pure-JAX blockwise attention: the FlashAttention algorithm written with `lax.scan`.

Runs on any backend (the default on CPU and TPU), supports every feature of the op, and never builds
the (T, S) matrix: the forward scans key blocks with the online softmax of `pallas_kernels.common`;
its own `custom_vjp` stores only (out, logsumexp) and the backward scans key blocks again,
recomputing the weights. Peak extra memory is O(B * N * T * block_k).

Internal layout: queries as `(B, T, K, G, H)` (G = N // K query heads per KV head), scores as
`(B, K, G, T, block_k)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import common, configs


def _blocks(x: jax.Array, block: int, axis: int) -> jax.Array:
    """Pad `axis` to a multiple of `block` and move the block index to the front."""
    size = x.shape[axis]
    padded = -(-size // block) * block
    if padded != size:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, padded - size)
        x = jnp.pad(x, widths)
    x = x.reshape(x.shape[:axis] + (padded // block, block) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _varying_like(tree, ref: jax.Array):
    """Mark fresh scan carries as varying over the manual mesh axes `ref` varies over, so the
    scans type-check inside `jax.shard_map` (check_vma=True)."""
    axes = tuple(jax.typeof(ref).manual_axis_type.varying)
    return lax.pcast(tree, axes, to="varying") if axes else tree


class _Blocks:
    """Everything one scan step needs about key block `j`, shared by forward and backward."""

    def __init__(self, q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k):
        self.batch, self.seq_q, self.heads, _ = q.shape
        self.kv_heads = k.shape[2]
        self.group = self.heads // self.kv_heads
        self.statics = statics
        self.block_k = block_k
        self.seeds = seeds
        self.q_segments = q_segments
        self.rows = jnp.arange(self.seq_q, dtype=jnp.int32)
        self.qg = q.reshape(self.batch, self.seq_q, self.kv_heads, self.group, -1)
        self.bias_shape = None if bias is None else bias.shape
        # Per-block inputs for lax.scan.
        self.xs = {"k": _blocks(k, block_k, 1), "v": _blocks(v, block_k, 1)}
        if kv_segments is not None:
            self.xs["kv_segments"] = _blocks(kv_segments, block_k, 1)
        if bias is not None:
            if bias.shape[3] > 1:
                self.xs["bias"] = _blocks(bias, block_k, 3)
            else:
                self.bias_const = bias
        self.n_blocks = self.xs["k"].shape[0]

    def _bias_tile(self, x):
        if self.bias_shape is None:
            return None
        b = x["bias"] if "bias" in x else self.bias_const
        bb, nb = b.shape[:2]
        if nb > 1:
            return b.reshape(bb, self.kv_heads, self.group, *b.shape[2:])
        return b[:, :, None]

    def scores(self, j, x):
        """Base-2 logits `(B, K, G, T, bk)`, soft-cap tanh, and the block's key positions."""
        cols = j * self.block_k + jnp.arange(self.block_k, dtype=jnp.int32)
        qk = jnp.einsum("btkgh,bskh->bkgts", self.qg, x["k"], preferred_element_type=jnp.float32)
        mask = common.element_visible(
            self.rows,
            cols,
            self.statics.window,
            self.statics.kv_len,
            self.q_segments,
            x.get("kv_segments"),
        )
        mask = mask[:, None, None] if mask.ndim == 3 else mask
        s2, tanh = common.scores(qk, self.statics, self._bias_tile(x), mask)
        return s2, tanh, cols

    def dropout(self, cols):
        d = common.dense_dropout_scale(
            self.seeds, self.statics, self.batch, self.heads, self.rows, cols
        )
        return d.reshape(d.shape[0], -1, self.group if d.shape[1] > 1 else 1, *d.shape[2:])

    def sum_to_bias(self, ds):
        """Reduce a `(B, K, G, T, bk)` logits gradient to the bias's broadcast block shape."""
        bb, nb, tb, _ = self.bias_shape
        ds = ds.reshape(self.batch, self.heads, self.seq_q, -1)
        axes = tuple(a for a, n in zip((0, 1, 2), (bb, nb, tb)) if n == 1)
        return jnp.sum(ds, axis=axes, keepdims=True)


def _forward(q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k):
    blk = _Blocks(q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k)
    shape = (blk.batch, blk.kv_heads, blk.group, blk.seq_q)

    def step(carry, jx):
        j, x = jx
        acc, m, l = carry
        s2, _, cols = blk.scores(j, x)
        p, m, l, alpha = common.online_softmax_step(s2, m, l)
        if statics.has_dropout:
            p = p * blk.dropout(cols)
        pv = jnp.einsum(
            "bkgts,bskh->bkgth", p.astype(v.dtype), x["v"], preferred_element_type=jnp.float32
        )
        return (acc * alpha[..., None] + pv, m, l), None

    init = _varying_like(
        (
            jnp.zeros(shape + (q.shape[-1],), jnp.float32),
            jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32),
        ),
        q,
    )
    (acc, m, l), _ = lax.scan(step, init, (jnp.arange(blk.n_blocks), blk.xs))
    out, lse2 = common.finalize(acc, m, l)
    out = jnp.moveaxis(out.reshape(blk.batch, blk.heads, blk.seq_q, -1), 1, 2).astype(q.dtype)
    lse = jnp.moveaxis(lse2.reshape(blk.batch, blk.heads, blk.seq_q), 1, 2) * common.LN2
    return out, lse


def _backward(
    q,
    k,
    v,
    bias,
    q_segments,
    kv_segments,
    seeds,
    statics,
    block_k,
    out,
    lse,
    dout,
    dlse,
    *,
    only_bias: bool = False,
):
    """Gradients `(dq, dk, dv, dbias)`; `only_bias` computes dbias alone (the kernels' helper)."""
    blk = _Blocks(q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k)
    b, t, kh, g = blk.batch, blk.seq_q, blk.kv_heads, blk.group

    def to_bkgt(x):  # (B, T, N) -> (B, K, G, T)
        return jnp.moveaxis(x, 1, 2).reshape(b, kh, g, t)

    lse2 = to_bkgt(lse) * common.LOG2E
    delta = jnp.einsum("btnh,btnh->btn", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse
    delta = to_bkgt(delta)
    dog = dout.reshape(b, t, kh, g, -1).astype(q.dtype)

    def step(dq, jx):
        j, x = jx
        s2, tanh, cols = blk.scores(j, x)
        p = common.probs_from_lse(s2, lse2)
        dp = jnp.einsum("btkgh,bskh->bkgts", dog, x["v"], preferred_element_type=jnp.float32)
        p_dropped = p
        if statics.has_dropout:
            keep = blk.dropout(cols)
            p_dropped, dp = p * keep, dp * keep
        ds_bias, ds = common.logits_grad(p, dp, delta, tanh)
        ys = {}
        if bias is not None:
            ys["dbias"] = blk.sum_to_bias(ds_bias)
        if not only_bias:
            ds = ds.astype(q.dtype)
            dq = dq + jnp.einsum(
                "bkgts,bskh->btkgh", ds, x["k"], preferred_element_type=jnp.float32
            )
            ys["dk"] = jnp.einsum(
                "bkgts,btkgh->bskh", ds, blk.qg, preferred_element_type=jnp.float32
            )
            ys["dv"] = jnp.einsum(
                "bkgts,btkgh->bskh",
                p_dropped.astype(q.dtype),
                dog,
                preferred_element_type=jnp.float32,
            )
        return dq, ys

    dq0 = _varying_like(jnp.zeros(blk.qg.shape, jnp.float32), q)
    dq, ys = lax.scan(step, dq0, (jnp.arange(blk.n_blocks), blk.xs))

    def unblock(y, axis, size):  # (n_blocks, ..., block_k at `axis`, ...) -> (..., size, ...)
        y = jnp.moveaxis(y, 0, axis)
        y = y.reshape(y.shape[:axis] + (-1,) + y.shape[axis + 2 :])
        return lax.slice_in_dim(y, 0, size, axis=axis)

    dbias = None
    if bias is not None:
        dbias = ys["dbias"]
        dbias = unblock(dbias, 3, bias.shape[3]) if "bias" in blk.xs else jnp.sum(dbias, 0)
        dbias = jnp.sum(dbias, axis=3, keepdims=True) if bias.shape[3] == 1 else dbias
        dbias = dbias.astype(bias.dtype)
    if only_bias:
        return dbias
    seq_k = k.shape[1]
    dq = (dq * statics.scale).reshape(q.shape).astype(q.dtype)
    dk = (unblock(ys["dk"], 1, seq_k) * statics.scale).astype(k.dtype)
    dv = unblock(ys["dv"], 1, seq_k).astype(v.dtype)
    return dq, dk, dv, dbias


def _float0(x):
    return None if x is None else np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention(q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k):
    return _forward(q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k)


def _attention_fwd(q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k):
    out, lse = _forward(q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k)
    return (out, lse), (q, k, v, bias, q_segments, kv_segments, seeds, out, lse)


def _attention_bwd(statics, block_k, residuals, cotangents):
    q, k, v, bias, q_segments, kv_segments, seeds, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv, dbias = _backward(
        q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k, out, lse, dout, dlse
    )
    return dq, dk, dv, dbias, _float0(q_segments), _float0(kv_segments), _float0(seeds)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    seeds: jax.Array | None,
    statics: common.AttentionStatics,
    block_k: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Blockwise attention on normalized operands (see `flashjax.attention`).

    Returns `(out (B, T, N, H), logsumexp (B, T, N) natural log, float32)`.
    """
    block_k = block_k or min(configs.CHUNKED_BLOCK_K, k.shape[1])
    return _attention(q, k, v, bias, q_segments, kv_segments, seeds, statics, block_k)


def bias_grad(q, k, v, bias, q_segments, kv_segments, seeds, statics, out, lse, dout, dlse):
    """d bias alone, blockwise in XLA (used by the kernels' backward; lse in natural log)."""
    block_k = min(configs.CHUNKED_BLOCK_K, k.shape[1])
    return _backward(
        q,
        k,
        v,
        bias,
        q_segments,
        kv_segments,
        seeds,
        statics,
        block_k,
        out,
        lse,
        dout,
        dlse,
        only_bias=True,
    )
