"""Host-side (XLA) preparation the kernel APIs share (pallas_kernels/triton/api.py and
pallas_kernels/mosaic/api.py): zero padding to whole tiles, and the backward's prologue.

Padding is with zeros (zeros change no dot product); padded rows and keys lie past the real
lengths, which the visibility rule hides. The backward prologue is the FlashAttention-2 one:
`delta = rowsum(dO * O) - dlse` in float32, in one fused XLA reduction before the kernels (or,
with the Mosaic backward's `row_stats`, in its dQ kernel).
"""

from __future__ import annotations

from typing import NamedTuple

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


class BackwardRows(NamedTuple):
    """The backward's per-row operands before delta (`backward_rows`)."""

    do: jax.Array  # (B, seq_q, N, head_dim) in q's dtype, 0 past q_lengths
    o: jax.Array  # the forward's output, the same way
    lse2: jax.Array  # (B, N, seq_q) float32, base 2, -inf in padded rows
    shift: jax.Array | None  # (B, N, seq_q) float32: dlse transposed, 0 past q_lengths

    def delta(self) -> jax.Array:
        """`rowsum(dO * O) - shift` `(B, N, seq_q)` float32, in one fused XLA reduction."""
        delta = row_dots(self.do, self.o)
        return delta if self.shift is None else delta - self.shift


def backward_rows(
    ops: Operands,
    out: jax.Array,
    lse2: jax.Array,
    dout: jax.Array,
    dlse: jax.Array | None,
    *,
    seq_q: int,
    head_dim: int,
) -> BackwardRows:
    """dO, O, lse2 and delta's shift padded to `seq_q` query rows and `head_dim`.

    `out`, `dout` are `(B, T, N, H)`; `lse2` the forward's base-2 logsumexp `(B, N, T)`; `dlse` the
    cotangent of the natural-log logsumexp `(B, T, N)` (None if unused): since
    d lse / d logits = P, it enters as `delta = rowsum(dO * O) - shift` (`shift` None without
    it). Rows past `ops.q_lengths` take no cotangent: dO, O and the shift are 0 there (so
    garbage there, e.g. NaN, reaches nothing).
    """
    shift = None
    if dlse is not None:
        shift = zero_rows_past(dlse.astype(jnp.float32), ops.q_lengths)
        shift = pad_axis(jnp.swapaxes(shift, 1, 2), 2, seq_q)
    return BackwardRows(
        do=_padded_rows(dout.astype(ops.q.dtype), ops.q_lengths, seq_q, head_dim),
        o=_padded_rows(out.astype(ops.q.dtype), ops.q_lengths, seq_q, head_dim),
        lse2=jnp.pad(lse2, ((0, 0), (0, 0), (0, seq_q - ops.seq_q)), constant_values=-jnp.inf),
        shift=shift,
    )


def row_dots(do: jax.Array, o: jax.Array) -> jax.Array:
    """`rowsum(dO * O)` in float32: `(B, T, N, D)` twice -> `(B, N, T)` (delta before its
    shift; the Mosaic dQ kernel computes the same for its tile with `row_stats`)."""
    return jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32))


def _padded_rows(x: jax.Array, lengths: jax.Array | None, seq_q: int, head_dim: int):
    """`x (B, T, N, H)` with rows past `lengths` zeroed, padded to `seq_q` rows, `head_dim`."""
    return pad_axis(pad_axis(zero_rows_past(x, lengths), 1, seq_q), 3, head_dim)
