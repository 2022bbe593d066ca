"""The visibility rule, from the API's arguments to what every implementation consumes.

The rule itself (element and block form) lives in `pallas_kernels.common` so that the kernels,
which are importable without flashjax, share it; this module turns the public arguments into its
inputs, once, for every implementation:

- `is_causal` and `local_window_size` become one window `(left, right)`.
- `query_seq_lengths` / `key_value_seq_lengths` are folded into segment ids: a key past its length
  gets an id that matches no query, a query past its length an id that matches no key (so its row
  sees nothing and outputs 0).
- `mask` (bool, or float with nonzero = keep) and `bias` become one float32 additive bias with -inf
  where the mask hides, keeping the broadcast shape (a (1, 1, T, S) mask stays that size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import block_range, element_visible  # noqa: F401  (the rule itself)

Window = tuple[int | None, int | None]

# Sentinel segment ids for padding (from sequence lengths). They never equal each other, and user
# segment ids are expected to be >= 0 (documented on the op).
_PAD_QUERY = np.iinfo(np.int32).min
_PAD_KEY = np.iinfo(np.int32).min + 1


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


def fold_lengths(
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    q_lengths: jax.Array | None,
    kv_lengths: jax.Array | None,
    batch: int,
    seq_q: int,
    seq_k: int,
) -> tuple[jax.Array | None, jax.Array | None]:
    """Segment ids `(B, T)`, `(B, S)` int32 that also encode the lengths, or (None, None)."""
    if q_segments is None and kv_segments is None and q_lengths is None and kv_lengths is None:
        return None, None
    qs = jnp.zeros((batch, seq_q), jnp.int32) if q_segments is None else q_segments
    ks = jnp.zeros((batch, seq_k), jnp.int32) if kv_segments is None else kv_segments
    if q_lengths is not None:
        inside = jnp.arange(seq_q)[None, :] < q_lengths[:, None]
        qs = jnp.where(inside, qs, _PAD_QUERY)
    if kv_lengths is not None:
        inside = jnp.arange(seq_k)[None, :] < kv_lengths[:, None]
        ks = jnp.where(inside, ks, _PAD_KEY)
    return qs.astype(jnp.int32), ks.astype(jnp.int32)


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
    return jnp.where(to_4d(mask) != 0, base, -jnp.inf)
