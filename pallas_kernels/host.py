"""Host-side (XLA) preparation the kernel APIs share (pallas_kernels/triton/api.py and
pallas_kernels/mosaic/api.py): zero padding to whole tiles, and the backward's prologue.

Padding is with zeros (zeros change no dot product); padded rows and keys lie past the real
lengths, which the visibility rule hides. The backward prologue is the FlashAttention-2 one:
`delta = rowsum(dO * O) - dlse` in float32, in one fused XLA reduction before the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.operands import Operands


def pad_axis(x: jax.Array | None, axis: int, size: int) -> jax.Array | None:
    """`x` zero-padded at the end of `axis` to `size` (x itself when it fits, None for None)."""
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def padded_qkv(
    ops: Operands, seq_q: int, seq_k: int, head_dim: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v zero-padded to `seq_q` queries, `seq_k` keys and `head_dim`."""
    return (
        pad_axis(pad_axis(ops.q, 1, seq_q), 3, head_dim),
        pad_axis(pad_axis(ops.k, 1, seq_k), 3, head_dim),
        pad_axis(pad_axis(ops.v, 1, seq_k), 3, head_dim),
    )


def zero_rows_past(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Rows of `x (B, L, ...)` at or past `lengths (B,)` set to 0 (x itself without lengths)."""
    if lengths is None:
        return x
    real = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    return jnp.where(jnp.expand_dims(real, tuple(range(2, x.ndim))), x, jnp.zeros_like(x))


def backward_residuals(
    ops: Operands,
    out: jax.Array,
    lse2: jax.Array,
    dout: jax.Array,
    dlse: jax.Array | None,
    *,
    seq_q: int,
    head_dim: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The per-row operands of the two backward kernels, padded to `seq_q` query rows and
    `head_dim`: `(do (B, seq_q, N, head_dim) in q's dtype, lse2 (B, N, seq_q) float32 with -inf
    in padded rows, delta (B, N, seq_q) float32)`.

    `out`, `dout` are `(B, T, N, H)`; `lse2` the forward's base-2 logsumexp `(B, N, T)`; `dlse` the
    cotangent of the natural-log logsumexp `(B, T, N)` (None if unused): since
    d lse / d logits = P, it enters as `delta -= dlse`. Rows past `ops.q_lengths` take no
    cotangent: dO and delta are 0 there (so garbage there, e.g. NaN, reaches nothing).
    """
    t = ops.seq_q
    dout = zero_rows_past(dout, ops.q_lengths)
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - jnp.swapaxes(dlse, 1, 2).astype(jnp.float32)
    if ops.q_lengths is not None:
        real = jnp.arange(t)[None, None, :] < ops.q_lengths[:, None, None]
        delta = jnp.where(real, delta, 0.0)
    do = pad_axis(pad_axis(dout.astype(ops.q.dtype), 1, seq_q), 3, head_dim)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, seq_q - t)), constant_values=-jnp.inf)
    return do, lse2, pad_axis(delta, 2, seq_q)
