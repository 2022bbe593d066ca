"""The one `(out, lse)` merge: attention over a union of disjoint key sets from its parts.

If `out_i, lse_i` is attention of some queries over key set i (logsumexp in natural log), and the
key sets are disjoint, attention over their union is

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * out_i

Ring attention (two at a time: `merge_attention`) cuts the keys and puts them back together with
it; split-KV decoding does the same merge in a kernel of its own (`decode.merge_splits` in
pallas_kernels/triton: one launch where these XLA ops take three), tested against
`merge_attention_parts` (many parts stacked along an axis). A part that saw no key (lse -inf,
out 0) drops out exactly; if none saw a key, the result is 0 and -inf.
Differentiable (plain autodiff; finite gradients also for empty parts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
