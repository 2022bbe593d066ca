"""THE naive attention: the whole (T, S) score matrix, written for clarity, not speed.

Tests, benchmarks and docs use this one function, and it is the `"xla"` implementation. It
computes in the dtype of its inputs (under `jax.enable_x64(True)` with float64 inputs it is the
float64 ground truth; with bf16 inputs it is the "naive computation in the kernel's dtype" of the
tolerance rule: scores rounded to the input dtype, softmax in float32, weights rounded back). It
takes the operand record every implementation takes, asks the one visibility rule
(`pallas_kernels.visibility.element_visible`) which pairs interact, uses the kernels' dropout
hash, and is differentiable by plain autodiff (the scale too, when it is traced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common, visibility
from pallas_kernels.operands import Operands


def attention(ops: Operands) -> tuple[jax.Array, jax.Array]:
    """Returns `(out (B, T, N, H) in q's dtype, logsumexp (B, T, N) natural log)`."""
    statics = ops.statics
    batch, seq_q, num_heads, _ = ops.q.shape
    seq_k, num_kv_heads, group = ops.seq_k, ops.num_kv_heads, ops.group
    dtype = ops.q.dtype
    acc = common.acc_dtype(dtype)

    rows = jnp.arange(seq_q, dtype=jnp.int32)[:, None]
    cols = jnp.arange(seq_k, dtype=jnp.int32)[None, :]
    seq = visibility.seq_columns(ops.seq_info(), 4)  # each (B, 1, 1, 1)
    segments = {}
    if ops.has_segments:
        segments = dict(
            q_segments=ops.q_segments[:, None, :, None],
            kv_segments=ops.kv_segments[:, None, None, :],
        )
    visible = visibility.element_visible(
        statics,
        rows,
        cols,
        seq,
        batch=jnp.arange(batch, dtype=jnp.int32)[:, None, None, None],
        head=jnp.arange(num_heads, dtype=jnp.int32)[None, :, None, None],
        block_states=ops.block_states,
        **segments,
    )  # (B or 1, N or 1, T, S)

    # Rows and keys past their lengths are invisible to everything: zero them, so garbage there
    # (NaN in a padded cache) reaches no output and no gradient.
    q_len, kv_len = seq[2][:, 0, 0, 0], seq[3][:, 0, 0, 0]
    q_real = (rows[:, 0][None, :] < q_len[:, None])[..., None, None]  # (B, T, 1, 1)
    kv_real = (cols[0][None, :] < kv_len[:, None])[..., None, None]  # (B, S, 1, 1)
    q = jnp.where(q_real, ops.q, 0)
    k = jnp.where(kv_real, ops.k, 0)
    v = jnp.where(kv_real, ops.v, 0)

    # GQA: query head n reads KV head n // group; (B, T, K, G, H) against (B, S, K, H).
    qg = q.reshape(batch, seq_q, num_kv_heads, group, -1)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k).reshape(batch, num_heads, seq_q, seq_k)
    logits = logits.astype(acc)  # rounded to the input dtype first, as a naive kernel would

    s = logits * ops.scale_value()
    if statics.softcap is not None:
        s = statics.softcap * jnp.tanh(s / statics.softcap)
    if ops.bias is not None:
        s = s + ops.bias.astype(acc)
    s = jnp.where(visible, s, -jnp.inf)

    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    empty = total == 0.0
    weights = e / jnp.where(empty, 1.0, total)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, total)))[..., 0]

    if statics.has_dropout:
        cols1 = cols[0]
        weights = weights * common.dense_dropout_scale(
            ops.seeds, statics, batch, num_heads, rows[:, 0], cols1
        )
    weights = weights.astype(dtype).reshape(batch, num_kv_heads, group, seq_q, seq_k)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v).reshape(ops.q.shape).astype(dtype)
    out = jnp.where(q_real, out, 0)  # and no cotangent flows back through those rows
    return out, jnp.transpose(lse, (0, 2, 1)).astype(acc)
