"""THE naive attention: the whole (T, S) score matrix, written for clarity, not speed.

Tests, benchmarks and docs use this one function. It computes in the dtype of its inputs (under
`jax.enable_x64(True)` with float64 inputs it is the float64 ground truth; with bf16 inputs it is
the "naive computation in the kernel's dtype" of the tolerance rule: scores rounded to the input
dtype, softmax in float32, weights rounded back). It takes the normalized operands every
implementation takes (see `flashjax.attention`), uses the same element rule and dropout hash as the
kernels, and is differentiable by plain autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    seeds: jax.Array | None,
    statics: common.AttentionStatics,
) -> tuple[jax.Array, jax.Array]:
    """Returns `(out (B, T, N, H) in q's dtype, logsumexp (B, T, N) natural log)`.

    Shapes as `pallas_kernels.triton.api.forward`; bias is `(Bb, Nb, Tb, Sb)` broadcastable.
    """
    batch, seq_q, num_heads, _ = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    dtype = q.dtype
    acc_dtype = jnp.promote_types(dtype, jnp.float32)
    # GQA: query head n reads KV head n // group; (B, T, K, G, H) against (B, S, K, H).
    qg = q.reshape(batch, seq_q, num_kv_heads, group, -1)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k).reshape(batch, num_heads, seq_q, seq_k)
    logits = logits.astype(acc_dtype)  # rounded to the input dtype first, as a naive kernel would

    rows = jnp.arange(seq_q, dtype=jnp.int32)
    cols = jnp.arange(seq_k, dtype=jnp.int32)
    mask = common.element_visible(rows, cols, statics.window, seq_k, q_segments, kv_segments)
    if mask.ndim == 3:  # (B, T, S) with segments
        mask = mask[:, None]
    s = logits * statics.scale
    if statics.softcap is not None:
        s = statics.softcap * jnp.tanh(s / statics.softcap)
    if bias is not None:
        s = s + bias.astype(acc_dtype)
    s = jnp.where(mask, s, -jnp.inf)

    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    empty = total == 0.0
    weights = e / jnp.where(empty, 1.0, total)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, total)))[..., 0]

    if statics.has_dropout:
        weights = weights * common.dense_dropout_scale(seeds, statics, batch, num_heads, rows, cols)
    weights = weights.astype(dtype).reshape(batch, num_kv_heads, group, seq_q, seq_k)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v).reshape(q.shape).astype(dtype)
    return out, jnp.transpose(lse, (0, 2, 1)).astype(acc_dtype)
