"""The math every attention kernel shares, written once.

Everything here is plain `jax.numpy` on tiles, so the same functions run inside the Pallas kernels
(Triton lowering or interpret mode), in the pure-JAX chunked path and in the reference. That is how
the project keeps ONE dropout hash and ONE online-softmax update (the ONE visibility rule is
`pallas_kernels.visibility`).

Conventions:
- Kernels work in base 2: logits are multiplied by `LOG2E` once and exponentiated with `exp2`; the
  logsumexp they store is base 2 (`lse2`); `flashjax` converts it to natural log at the API
  boundary.
- Float32 accumulation (float64 with float64 inputs): `acc_dtype`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.operands import AttentionStatics

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def acc_dtype(dtype) -> jnp.dtype:
    """The accumulation dtype for `dtype` inputs: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


# --------------------------------------------------------------------------------------------------
# Dropout: a counter-based hash, so the backward regenerates the mask without storing it
# --------------------------------------------------------------------------------------------------

_GOLDEN = 0x9E3779B9


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finalizer (Wellons' lowbias32): each output bit depends on every input."""
    x = x ^ lax.shift_right_logical(x, jnp.uint32(16))
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ lax.shift_right_logical(x, jnp.uint32(15))
    x = x * jnp.uint32(0x846CA68B)
    return x ^ lax.shift_right_logical(x, jnp.uint32(16))


def dropout_stream(seed0: jax.Array, seed1: jax.Array, batch_head: jax.Array) -> jax.Array:
    """A uint32 scalar key for one (batch, head), from the two seed words."""
    bh = jnp.asarray(batch_head).astype(jnp.uint32)
    return _mix32(
        seed0.astype(jnp.uint32) ^ _mix32(seed1.astype(jnp.uint32) + bh * jnp.uint32(_GOLDEN))
    )


def dropout_row_keys(stream: jax.Array, rows: jax.Array) -> jax.Array:
    """The first half of the hash: a uint32 key per query row (any shape)."""
    return _mix32(stream ^ (rows.astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)))


def dropout_keep_of(row_keys: jax.Array, cols: jax.Array, rate: float) -> jax.Array:
    """Bool, True where the weight at (row, col) is kept: `row_keys` and key indices `cols`
    broadcast against each other (a tile of both, or a column and a row of the tile).

    A weight is dropped iff the top 24 bits of hash(stream, row, col) fall under `rate * 2**24`.
    """
    bits = _mix32(row_keys ^ (cols.astype(jnp.uint32) * jnp.uint32(_GOLDEN)))
    threshold = jnp.int32(round(rate * (1 << 24)))
    return lax.shift_right_logical(bits, jnp.uint32(8)).astype(jnp.int32) >= threshold


def dropout_keep(stream: jax.Array, rows: jax.Array, cols: jax.Array, rate: float) -> jax.Array:
    """Bool `(len(rows), len(cols))`: True where the attention weight is kept."""
    return dropout_keep_of(dropout_row_keys(stream, rows)[:, None], cols[None, :], rate)


# --------------------------------------------------------------------------------------------------
# Scores and the online softmax
# --------------------------------------------------------------------------------------------------


def scores(
    qk: jax.Array,
    scale: float | jax.Array,
    statics: AttentionStatics,
    bias: jax.Array | None,
    mask: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None]:
    """Base-2 logits of a tile from `qk = q @ k.T` (float32, or float64).

    Order (as the API documents): scale, soft-cap, add bias, mask. Returns `(s2, tanh)` where `tanh`
    is the soft-cap's `tanh(logits / c)` the backward needs (None without soft-cap). Invisible
    elements are -inf (never a finite stand-in, so a row with no visible key is detectable).
    """
    tanh = None
    if statics.softcap is None and bias is None:
        s = qk * (scale * LOG2E)
    else:
        s = qk * scale
        if statics.softcap is not None:
            tanh = jnp.tanh(s * (1.0 / statics.softcap))
            s = tanh * statics.softcap
        if bias is not None:
            s = s + bias
        s = s * LOG2E
    return hide(s, mask), tanh


def hide(s: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Logits with the invisible elements (mask False) set to -inf."""
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def folded_scale(statics: AttentionStatics, bias) -> float | None:
    """The factor c with base-2 logits = c * qk when nothing else enters them (no soft-cap, no
    bias, a static positive scale), for `online_softmax_step(..., scale=c)`; else None."""
    scale = statics.scale
    plain = statics.softcap is None and bias is None
    if plain and isinstance(scale, (int, float)) and scale > 0:
        return float(scale) * LOG2E
    return None


def safe_max(m: jax.Array) -> jax.Array:
    """The running max to subtract: -inf (nothing visible yet) becomes 0, so exp2(-inf - 0) = 0,
    not NaN."""
    return jnp.where(m == -jnp.inf, 0.0, m)


def online_softmax_start(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The online softmax's `(acc, m, l)` before any key tile: float32 zeros `(rows, head_dim)`,
    running max -inf and running sum 0 `(rows,)`."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


# FlashAttention-4's conditional rescaling: the running max a tile's weights are taken against
# stays put while no row's max grows past it by more than this (base 2), so the weights stay
# <= 2**8 (exact in float32 and bfloat16 alike: only the exponent grows) and what was
# accumulated needs no rescaling.
RESCALE_THRESHOLD = 8.0


def running_max(
    s2: jax.Array, m_prev: jax.Array, scale: float | None = None, lazy: bool = False
) -> tuple[jax.Array, jax.Array | None]:
    """The running max after a key tile, and (with `lazy`, FA4's conditional rescaling) whether
    it was kept: a scalar bool, True when no row's max grew past `m_prev` by more than
    `RESCALE_THRESHOLD`, and then the max is `m_prev` (None without `lazy`). `scale`: as in
    `online_softmax_step`."""
    row_max = jnp.max(s2, axis=-1)
    m_new = jnp.maximum(m_prev, row_max if scale is None else row_max * scale)
    if not lazy:
        return m_new, None
    # A row with nothing visible yet and still nothing grows by 0; one seeing its first key, by
    # inf (m_prev = -inf): the first visible tile always sets the max.
    grow = jnp.where(m_new == -jnp.inf, 0.0, m_new - m_prev)
    keep = jnp.max(grow) <= RESCALE_THRESHOLD
    keep_rows = jnp.broadcast_to(keep, m_prev.shape)  # (Mosaic GPU selects without broadcasting)
    return jnp.where(keep_rows, m_prev, m_new), keep


# `exp2_on_fma`: 2**f on [-1/2, 1/2] as c0 + c1 f + c2 f^2 + c3 f^3, fitted here (weighted least
# squares on Chebyshev nodes, iterated towards equal ripple): relative error <= 7.5e-5, 50 times
# below a bfloat16 weight's rounding.
_EXP2_POLY = (0.9999280571937561, 0.6932609677314758, 0.2426111400127411, 0.0551716573536396)
_ROUNDER = 12582912.0  # 1.5 * 2**23: x + this rounds x to an integer held in the low mantissa bits


def exp2_on_fma(x: jax.Array) -> jax.Array:
    """2**x for x <= 2**21 with float32 adds and fused multiply-adds and three integer ops, no
    MUFU (FlashAttention-4's exp2 emulation, which relieves the special-function unit where it
    binds the softmax): x = j + f with j the nearest integer, 2**f by `_EXP2_POLY`, j added to
    its exponent bits. -inf (and anything below -127) gives 0 exactly."""
    x = jnp.maximum(x, -127.0)
    # float32 rounding to nearest: j sits in the low mantissa bits. (The barrier keeps XLA's
    # simplifier, in interpret mode, from folding (x + c) - c to x.)
    rounded = lax.optimization_barrier(x + _ROUNDER)
    f = x - (rounded - _ROUNDER)  # in [-1/2, 1/2]
    c0, c1, c2, c3 = _EXP2_POLY
    p = ((c3 * f + c2) * f + c1) * f + c0
    as_int = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.int32)
    bits = as_int(p) + lax.shift_left(as_int(rounded), 23)  # j << 23: the high bits fall off
    # At x = -127 (j = -127, p ~ 1) the exponent wraps negative: the max gives +0.
    return lax.bitcast_convert_type(jnp.maximum(bits, 0), jnp.float32)


def exp2_split(x: jax.Array, fma_columns: int = 0) -> jax.Array:
    """2**x, the first `fma_columns` columns (last axis) by `exp2_on_fma`, the rest by exp2."""
    if not fma_columns:
        return jnp.exp2(x)
    if fma_columns >= x.shape[-1]:  # all of them (an empty slice does not lower)
        return exp2_on_fma(x)
    emulated = exp2_on_fma(x[..., :fma_columns])
    return jnp.concatenate([emulated, jnp.exp2(x[..., fma_columns:])], axis=-1)


def softmax_weights(
    s2: jax.Array,
    m_prev: jax.Array,
    m_new: jax.Array,
    l_prev: jax.Array,
    scale: float | None = None,
    fma_columns: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(p, l_new, alpha)` of a key tile against the running max `m_new` (`running_max`):
    weights `p = 2**(s2 - m_new)`, the new running sum, and `alpha` that rescales what was
    accumulated before the tile (1 where the max was kept, 0 for a row still empty).
    `fma_columns`: that many of the tile's first columns exponentiated by `exp2_on_fma`."""
    m_use = safe_max(m_new)
    # m_use is finite, so a row with nothing visible before this tile (m_prev = -inf) gets
    # alpha = 0 exactly. (Subtracting a stand-in for m_prev instead overflows to inf once the
    # row's logits are below -128 in base 2, and inf * 0 is NaN.)
    alpha = jnp.exp2(m_prev - m_use)
    logits = s2 if scale is None else s2 * scale
    p = exp2_split(logits - m_use[..., None], fma_columns)
    l_new = alpha * l_prev + jnp.sum(p, axis=-1)
    return p, l_new, alpha


def online_softmax_step(
    s2: jax.Array, m_prev: jax.Array, l_prev: jax.Array, scale: float | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One key tile of the online softmax (FlashAttention-2, base 2).

    Returns `(p, m_new, l_new, alpha)`: unnormalized weights `p = 2**(s2 - m_new)`, the new running
    max and sum, and `alpha` that rescales what was accumulated before this tile.
    With `scale` (`folded_scale`, > 0), `s2` is the unscaled `qk` (invisible elements -inf) and
    the logits `scale * qk` are never formed: the row max is taken of `qk` and scaled (max
    commutes with a positive factor, also after rounding), and each weight is one fused
    multiply-add and an exp2 (FA3's folding of the scale into the exponent): one multiply per
    element fewer.
    """
    m_new, _ = running_max(s2, m_prev, scale)
    p, l_new, alpha = softmax_weights(s2, m_prev, m_new, l_prev, scale)
    return p, m_new, l_new, alpha


def finalize(acc: jax.Array, m: jax.Array, l: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Normalized output and base-2 logsumexp; a row with no visible key gives 0 and -inf."""
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse2 = jnp.where(empty, -jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))
    return out, lse2


def probs_from_lse(s2: jax.Array, lse2: jax.Array) -> jax.Array:
    """Recompute normalized weights from base-2 logits and a base-2 logsumexp.

    `lse2` for an empty row is -inf; such a row has only -inf logits, and its weights must be 0.
    """
    lse_use = jnp.where(lse2 == -jnp.inf, jnp.inf, lse2)
    return jnp.exp2(s2 - lse_use[..., None])


def logits_grad(
    p: jax.Array,
    dp: jax.Array,
    delta: jax.Array,
    tanh: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Gradients of a tile w.r.t. the logits: `(ds_bias, ds_qk)`.

    `ds_bias = p * (dp - delta)` is the gradient w.r.t. the logits after soft-cap (the bias's);
    `ds_qk` is w.r.t. the scaled `q . k` (through the soft-cap's `1 - tanh**2`). Multiply `ds_qk` by
    `scale` for dq / dk. `delta` is per row (`p`'s shape without the last axis), or already
    broadcast to the tile (transposed tiles: a row vector).
    """
    ds = p * (dp - (delta if delta.ndim == p.ndim else delta[..., None]))
    if tanh is None:
        return ds, ds
    return ds, ds * (1.0 - tanh * tanh)


def dropout_scale(
    statics: AttentionStatics, stream: jax.Array, rows: jax.Array, cols: jax.Array
) -> jax.Array:
    """Per-element factor of inverted dropout: `keep / (1 - rate)` as float32, for 1-D query
    indices `rows` and key indices `cols`."""
    return dropout_factor(statics, dropout_keep(stream, rows, cols, statics.dropout_rate))


def dropout_factor(statics: AttentionStatics, keep: jax.Array) -> jax.Array:
    """Inverted dropout's factor from the keep mask: `1 / (1 - rate)` where kept, else 0."""
    return jnp.where(keep, 1.0 / (1.0 - statics.dropout_rate), 0.0).astype(jnp.float32)


def head_stream(
    statics: AttentionStatics,
    seeds: jax.Array,
    batch: jax.Array | int,
    head: jax.Array | int,
    num_heads: int,
) -> jax.Array:
    """The dropout stream of one (batch row, query head); one stream for all of them with
    `dropout_broadcast`. `seeds` is the `(2,)` uint32 operand (or a ref to it)."""
    bh = 0 if statics.dropout_broadcast else batch * num_heads + head
    return dropout_stream(seeds[0], seeds[1], bh)


def dense_dropout_scale(
    seeds: jax.Array,
    statics: AttentionStatics,
    batch: int,
    heads: int,
    rows: jax.Array,
    cols: jax.Array,
) -> jax.Array:
    """`dropout_scale` for every (batch, head) at once: `(B, N, rows, cols)`. The XLA paths use
    it; the kernels make the same bits per tile."""

    def plane(b, h):
        return dropout_scale(statics, head_stream(statics, seeds, b, h, heads), rows, cols)

    b = jnp.arange(batch, dtype=jnp.int32)
    h = jnp.arange(heads, dtype=jnp.int32)
    return jax.vmap(lambda bi: jax.vmap(lambda hi: plane(bi, hi))(h))(b)
