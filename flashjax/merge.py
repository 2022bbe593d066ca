"""The one `(out, lse)` merge: attention over a union of disjoint key sets from its parts.

If `out_i, lse_i` is attention of some queries over key set i (logsumexp in natural log), and the
key sets are disjoint, attention over their union is

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * out_i

Split-KV decoding (many parts stacked along an axis: `merge_attention_parts`) and ring attention
(two at a time: `merge_attention`) cut the keys and put them back together with it. A part that
saw no key (lse -inf, out 0) drops out exactly; if none saw a key, the result is 0 and -inf.
Differentiable (plain autodiff; finite gradients also for empty parts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def merge_attention_parts(
    out: jax.Array, lse: jax.Array, axis: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Merge partial attentions over disjoint key sets, stacked along `axis`.

    Args:
      out: `Float[Array, "... H"]`, the partial outputs (each normalized over its keys), the
        parts along `axis` (an axis of `lse`'s dims; out has one more, trailing).
      lse: `Float[Array, "..."]`, their natural-log logsumexps (-inf: no key seen).
      axis: the parts' axis.

    Returns:
      `(out, lse)` without the parts' axis: out in `out`'s dtype, lse in the lse dtype (float32
      at least).
    """
    axis = axis % lse.ndim
    dtype = jnp.promote_types(lse.dtype, jnp.float32)
    lse = lse.astype(dtype)
    m = jnp.max(lse, axis=axis, keepdims=True)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)  # every part empty: weights 0, not NaN
    weights = jnp.exp(lse - m_safe)
    total = jnp.sum(weights, axis=axis, keepdims=True)
    empty = total == 0.0
    merged_lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(jnp.where(empty, 1.0, total)))
    share = weights / jnp.where(empty, 1.0, total)
    acc = jnp.promote_types(out.dtype, jnp.float32)
    merged = jnp.sum(share[..., None] * out.astype(acc), axis=axis)
    return merged.astype(out.dtype), jnp.squeeze(merged_lse, axis)


def merge_attention(
    out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Merge two partial attentions over disjoint key sets.

    Args:
      out_a, out_b: `Float[Array, "*B T N H"]`, the partial outputs (normalized over their keys).
      lse_a, lse_b: `Float[Array, "*B T N"]`, their natural-log logsumexps (-inf: no key seen).

    Returns:
      `(out, lse)`: out in `out_a`'s dtype, lse in the lse dtype (float32 at least).
    """
    out, lse = merge_attention_parts(jnp.stack([out_a, out_b]), jnp.stack([lse_a, lse_b]))
    return out.astype(out_a.dtype), lse


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def merge_parts_one_pass(
    out: jax.Array, lse: jax.Array, axis: int = 0
) -> tuple[jax.Array, jax.Array]:
    """`merge_attention_parts` as one XLA reduction: the parts are folded pairwise by the merge
    of two (associative), `(lse, out)` carried together, so XLA emits one kernel where the
    closed form takes a max pass and a weighted-sum pass (two kernels, ~2.8 us a decode step on
    the H200). Every part's lse rides beside each of its H output columns (the reduction's
    operands share one shape): meant for many small parts (split-KV decoding), not for large
    ones. Differentiable (the closed form's derivative)."""
    axis = axis % lse.ndim
    dtype = jnp.promote_types(lse.dtype, jnp.float32)
    acc = jnp.promote_types(out.dtype, jnp.float32)

    def pair(a, b):
        (lse_a, out_a), (lse_b, out_b) = a, b
        m = jnp.maximum(lse_a, lse_b)
        m_safe = jnp.where(jnp.isneginf(m), 0.0, m)  # both empty: weights 0, not NaN
        w_a, w_b = jnp.exp(lse_a - m_safe), jnp.exp(lse_b - m_safe)
        total = w_a + w_b
        empty = total == 0.0
        norm = jnp.where(empty, 1.0, total)
        merged_lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(norm))
        return merged_lse.astype(dtype), ((w_a * out_a + w_b * out_b) / norm).astype(acc)

    lse_cols = jnp.broadcast_to(lse.astype(dtype)[..., None], out.shape)
    init = (jnp.array(-jnp.inf, dtype), jnp.array(0, acc))
    merged_lse, merged = lax.reduce((lse_cols, out.astype(acc)), init, pair, (axis,))
    return merged.astype(out.dtype), merged_lse[..., 0]


@merge_parts_one_pass.defjvp
def _merge_parts_one_pass_jvp(axis, primals, tangents):
    return jax.jvp(lambda o, l: merge_attention_parts(o, l, axis), primals, tangents)
