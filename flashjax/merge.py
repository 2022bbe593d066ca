"""The one `(out, lse)` merge: attention over a union of disjoint key sets from its parts.

If `out_a, lse_a` is attention of some queries over key set A and `out_b, lse_b` over a disjoint
key set B (logsumexp in natural log), attention over A and B together is

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

Split-KV decoding and ring attention cut the keys and put them back together with it. A part
that saw no key (lse -inf, out 0) drops out exactly; if neither saw a key, the result is 0 and
-inf. Differentiable (plain autodiff; finite gradients also for empty parts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    dtype = jnp.promote_types(lse_a.dtype, jnp.float32)
    lse_a, lse_b = lse_a.astype(dtype), lse_b.astype(dtype)
    m = jnp.maximum(lse_a, lse_b)
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)  # both empty: weights 0, not NaN
    wa, wb = jnp.exp(lse_a - m_safe), jnp.exp(lse_b - m_safe)
    total = wa + wb
    empty = total == 0.0
    lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(jnp.where(empty, 1.0, total)))
    denom = jnp.where(empty, 1.0, total)
    acc = jnp.promote_types(out_a.dtype, jnp.float32)
    out = (wa / denom)[..., None] * out_a.astype(acc) + (wb / denom)[..., None] * out_b.astype(acc)
    return out.astype(out_a.dtype), lse
