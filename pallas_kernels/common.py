"""The math every attention kernel shares, written once.

Everything here is plain `jax.numpy` on tiles, so the same functions run inside the Pallas kernels
(Triton lowering or interpret mode), in the pure-JAX chunked path and in the reference. That is how
the project keeps ONE visibility rule, ONE dropout hash and ONE online-softmax update.

Conventions:
- Kernels work in base 2: logits are multiplied by `LOG2E` once and exponentiated with `exp2`; the
  logsumexp they store is base 2 (`lse2`); `flashjax` converts it to natural log at the API
  boundary.
- A window is `(left, right)` with `None` meaning unbounded: query i sees key j iff
  `i - left <= j <= i + right`. Causal is `right = 0` (top-left aligned, like `jax.nn`).
- Segment ids: query i and key j interact only if their ids are equal. Sequence lengths are folded
  into segment ids by `flashjax.masks` (padding gets sentinel ids that match nothing).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class AttentionStatics:
    """Everything about a call that is static (traced away at compile time).

    Attributes:
      scale: multiplier of `q . k` (default `head_dim ** -0.5`, set by flashjax).
      window: `(left, right)`, each an int >= 0 or None (unbounded). Causal sets right to 0.
      softcap: `c` in `c * tanh(logits / c)`, or None.
      dropout_rate: probability of dropping an attention weight, in [0, 1).
      dropout_broadcast: same dropout mask for every batch element and head (Flax's default).
      kv_len: number of real keys; keys at or past it are padding the wrapper added.
      has_segments: element masks from segment ids are needed on every block.
    """

    scale: float
    window: tuple[int | None, int | None] = (None, None)
    softcap: float | None = None
    dropout_rate: float = 0.0
    dropout_broadcast: bool = False
    kv_len: int | None = None
    has_segments: bool = False

    @property
    def has_dropout(self) -> bool:
        return self.dropout_rate > 0.0

    def transposed(self) -> tuple[int | None, int | None]:
        """The window seen from a key: key j is visible to queries j - right .. j + left."""
        left, right = self.window
        return right, left


# --------------------------------------------------------------------------------------------------
# The visibility rule
# --------------------------------------------------------------------------------------------------


def element_visible(
    rows: jax.Array,
    cols: jax.Array,
    window: tuple[int | None, int | None],
    n_cols: int | None = None,
    row_segments: jax.Array | None = None,
    col_segments: jax.Array | None = None,
) -> jax.Array | None:
    """Which (row, col) pairs of a tile are visible: bool `(rows, cols)`, or None if all are.

    Rows are query positions and cols key positions. `n_cols` is the number of real columns
    (columns at or past it are padding). Segment ids may carry leading batch axes
    (`(..., rows)`, `(..., cols)`); the mask then has them too.
    """
    left, right = window
    mask = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if right is not None:
        mask = both(mask, cols[None, :] <= rows[:, None] + right)
    if left is not None:
        mask = both(mask, cols[None, :] >= rows[:, None] - left)
    if n_cols is not None:
        mask = both(mask, jnp.broadcast_to(cols[None, :] < n_cols, (rows.shape[0], cols.shape[0])))
    if row_segments is not None:
        mask = both(mask, row_segments[..., :, None] == col_segments[..., None, :])
    return mask


def block_range(
    row_start: jax.Array | int,
    row_block: int,
    col_block: int,
    n_cols_padded: int,
    n_cols: int,
    window: tuple[int | None, int | None],
    n_rows: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Which column blocks rows `[row_start, row_start + row_block)` visit, and which need a mask.

    Returns block indices `(lo, full_lo, full_hi, hi)`: blocks `[lo, hi)` hold every visible column;
    blocks `[full_lo, full_hi)` are visible for every (row, col) pair, so they need no element mask;
    `[lo, full_lo)` and `[full_hi, hi)` are boundary blocks. `n_cols` real columns lie in
    `n_cols_padded` (a multiple of `col_block`); a block touching padding is a boundary block, and
    when the rows themselves reach past `n_rows` real rows, every block is a boundary block.
    Works on traced scalars (inside kernels) and Python ints alike. Segment ids are not considered:
    with segments every block needs a mask.
    """
    left, right = window
    row_start = jnp.asarray(row_start, jnp.int32)
    n_blocks = n_cols_padded // col_block
    zero = jnp.int32(0)
    last_row = row_start + (row_block - 1)

    lo = zero if left is None else lax.div(jnp.maximum(row_start - left, zero), col_block)
    if right is None:
        hi = jnp.int32(n_blocks)
    else:
        hi_col = jnp.minimum(last_row + right + 1, n_cols)
        hi = lax.div(jnp.maximum(hi_col, zero) + (col_block - 1), col_block)
    hi = jnp.maximum(hi, lo)

    # Full blocks: entirely within [last_row - left, row_start + right] and before the padding.
    full_hi = jnp.int32(n_cols // col_block)
    if right is not None:
        full_hi = jnp.minimum(full_hi, lax.div(jnp.maximum(row_start + right + 1, zero), col_block))
    full_lo = lo
    if left is not None:
        first_full_col = jnp.maximum(last_row - left, zero)
        full_lo = jnp.maximum(lo, lax.div(first_full_col + (col_block - 1), col_block))
    full_lo = jnp.minimum(full_lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    if n_rows is not None:
        full_hi = jnp.where(last_row >= n_rows, full_lo, full_hi)
    return lo, full_lo, full_hi, hi


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


def dropout_keep(stream: jax.Array, rows: jax.Array, cols: jax.Array, rate: float) -> jax.Array:
    """Bool `(len(rows), len(cols))`: True where the attention weight is kept.

    A weight is dropped iff the top 24 bits of hash(stream, row, col) fall under `rate * 2**24`.
    """
    row_keys = _mix32(stream ^ (rows.astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)))
    bits = _mix32(row_keys[:, None] ^ (cols.astype(jnp.uint32) * jnp.uint32(_GOLDEN))[None, :])
    threshold = jnp.int32(round(rate * (1 << 24)))
    return lax.shift_right_logical(bits, jnp.uint32(8)).astype(jnp.int32) >= threshold


# --------------------------------------------------------------------------------------------------
# Scores and the online softmax
# --------------------------------------------------------------------------------------------------


def scores(
    qk: jax.Array, statics: AttentionStatics, bias: jax.Array | None, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
    """Base-2 logits of a tile from `qk = q @ k.T` (float32).

    Order (as the API documents): scale, soft-cap, add bias, mask. Returns `(s2, tanh)` where `tanh`
    is the soft-cap's `tanh(logits / c)` the backward needs (None without soft-cap). Invisible
    elements are -inf (never a finite stand-in, so a row with no visible key is detectable).
    """
    tanh = None
    if statics.softcap is None and bias is None:
        s = qk * (statics.scale * LOG2E)
    else:
        s = qk * statics.scale
        if statics.softcap is not None:
            tanh = jnp.tanh(s * (1.0 / statics.softcap))
            s = tanh * statics.softcap
        if bias is not None:
            s = s + bias
        s = s * LOG2E
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return s, tanh


def safe_max(m: jax.Array) -> jax.Array:
    """The running max to subtract: -inf (nothing visible yet) becomes 0, so exp2(-inf - 0) = 0,
    not NaN."""
    return jnp.where(m == -jnp.inf, 0.0, m)


def online_softmax_step(
    s2: jax.Array, m_prev: jax.Array, l_prev: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One key tile of the online softmax (FlashAttention-2, base 2).

    Returns `(p, m_new, l_new, alpha)`: unnormalized weights `p = 2**(s2 - m_new)`, the new running
    max and sum, and `alpha` that rescales what was accumulated before this tile.
    """
    m_new = jnp.maximum(m_prev, jnp.max(s2, axis=-1))
    m_use = safe_max(m_new)
    # m_use is finite, so a row with nothing visible before this tile (m_prev = -inf) gets
    # alpha = 0 exactly. (Subtracting a stand-in for m_prev instead overflows to inf once the
    # row's logits are below -128 in base 2, and inf * 0 is NaN.)
    alpha = jnp.exp2(m_prev - m_use)
    p = jnp.exp2(s2 - m_use[..., None])
    l_new = alpha * l_prev + jnp.sum(p, axis=-1)
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
    `scale` for dq / dk.
    """
    ds = p * (dp - delta[..., None])
    if tanh is None:
        return ds, ds
    return ds, ds * (1.0 - tanh * tanh)


def tile_scores(
    qk: jax.Array,
    statics: AttentionStatics,
    rows: jax.Array,
    cols: jax.Array,
    *,
    masked: bool,
    bias: jax.Array | None = None,
    row_segments: jax.Array | None = None,
    col_segments: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Base-2 logits of a (query rows x key cols) tile, with the element mask on boundary tiles.

    `masked=False` is the fast path for tiles that `block_range` proved fully visible.
    """
    mask = None
    if masked:
        mask = element_visible(
            rows, cols, statics.window, statics.kv_len, row_segments, col_segments
        )
    return scores(qk, statics, bias, mask)


def dropout_scale(
    statics: AttentionStatics, stream: jax.Array, rows: jax.Array, cols: jax.Array
) -> jax.Array:
    """Per-element factor of inverted dropout: `keep / (1 - rate)` as float32."""
    keep = dropout_keep(stream, rows, cols, statics.dropout_rate)
    return jnp.where(keep, 1.0 / (1.0 - statics.dropout_rate), 0.0).astype(jnp.float32)


def dense_dropout_scale(
    seeds: jax.Array,
    statics: AttentionStatics,
    batch: int,
    heads: int,
    rows: jax.Array,
    cols: jax.Array,
) -> jax.Array:
    """`dropout_scale` for every (batch, head) at once: `(B, N, rows, cols)`, or
    `(1, 1, rows, cols)`
    with `dropout_broadcast`. The XLA paths use it; the kernels make the same bits per tile."""

    def plane(bh):
        return dropout_scale(statics, dropout_stream(seeds[0], seeds[1], bh), rows, cols)

    if statics.dropout_broadcast:
        return plane(0)[None, None]
    bh = jnp.arange(batch * heads, dtype=jnp.int32)
    return jax.vmap(plane)(bh).reshape(batch, heads, rows.shape[0], cols.shape[0])
