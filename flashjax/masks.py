"""The public masking arguments, normalized for the one visibility rule.

The rule itself (element, block and list forms) is `pallas_kernels.visibility`, which the kernels
share without importing flashjax. This module turns two groups of public arguments into its inputs:

- `is_causal` and `local_window_size` become one window `(left, right)`.
- `mask` (bool, True = keep) and `bias` become one float32 additive bias with -inf where the mask
  hides, keeping the broadcast shape (a (1, 1, T, S) mask stays that size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Window = tuple[int | None, int | None]


def window_of(is_causal: bool, local_window_size: int | tuple[int, int] | None) -> Window:
    """`(left, right)` visible offsets (None = unbounded); causal caps `right` at 0."""
    if local_window_size is None:
        left, right = None, None
    elif isinstance(local_window_size, (int, np.integer)):
        left = right = int(local_window_size)
    else:
        left, right = (int(w) for w in local_window_size)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def to_4d(x: jax.Array) -> jax.Array:
    """Left-pad a bias/mask's shape with 1s to rank 4 `(B, N, T, S)`."""
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def combine_bias(bias: jax.Array | None, mask: jax.Array | None) -> jax.Array | None:
    """One float32 (float64 under x64) additive bias, rank 4 in its broadcast shape, with -inf
    where `mask` hides."""
    if bias is not None:
        bias = to_4d(bias).astype(jnp.promote_types(bias.dtype, jnp.float32))
    if mask is None:
        return bias
    base = jnp.zeros((), jnp.float32) if bias is None else bias
    return jnp.where(to_4d(mask), base, -jnp.inf)
