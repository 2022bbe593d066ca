"""FLOP counts of attention, the way FlashAttention's papers count them.

Forward: two matmuls of `B * N * T * S * H` multiply-adds each, so `4 * B * N * T * S * H`, scaled
by the fraction of (query, key) pairs that are visible. Backward: 2.5x the forward (five matmuls
against two; the recomputation of the scores is not counted as useful work). Forward+backward:
3.5x the forward.

Causal attention without a window or block mask counts exactly half (the papers' convention, which
ANCHORS.md uses too); a sliding window or a block mask counts its visible pairs exactly.

The visible pairs come from THE visibility rule (`pallas_kernels.visibility`), never from a copy of
it: the count is the rule's `block_states` (tiles wholly visible count `bq * bk` pairs, empty ones
nothing) plus `visibility.visible_pairs` on each partially visible tile. Every partial count stays
below 2**24, where the rule's float32 count is a whole number, so the total is exact at any length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
import numpy as np

from flashjax import masks
from pallas_kernels import visibility
from pallas_kernels.operands import FULL, PARTIAL, AttentionStatics, MaskFn, Operands

if TYPE_CHECKING:
    from flashjax.block_mask import BlockMask

Mode = Literal["fwd", "bwd", "fwd+bwd"]
MODES: tuple[Mode, ...] = ("fwd", "bwd", "fwd+bwd")
MODE_FACTORS: dict[str, float] = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

Window = tuple[int, int]
COUNT_TILE = 128  # the tiles of the count when no block mask sets them
EXACT_COUNT = 1 << 24  # float32 holds every whole number up to here


def normalize_window(window: int | tuple[int, int] | None, causal: bool) -> Window | None:
    """`(left, right)` offsets a query sees, as `flashjax.dot_product_attention` reads them.

    An int w means (w, w); with `causal` the right side is capped at 0. None means no window.
    """
    if window is None:
        return None
    left, right = (window, window) if isinstance(window, int) else window
    if left < 0 or right < 0:
        raise ValueError(f"window sides must be >= 0, got {window!r}")
    return (left, min(right, 0) if causal else right)


# --------------------------------------------------------------------------------------------------
# Visible pairs, from pallas_kernels.visibility
# --------------------------------------------------------------------------------------------------


def _shape(batch: int, seq: int, heads: int) -> jax.ShapeDtypeStruct:
    """A stand-in for q / k / v: the rule reads only their shapes."""
    return jax.ShapeDtypeStruct((batch, seq, heads, 1), jnp.float32)


def _statics(causal: bool, window: Window | None, block_mask: BlockMask | None) -> AttentionStatics:
    return AttentionStatics(
        scale=1.0,
        window=masks.window_of(causal, window),
        mask_block=None if block_mask is None else block_mask.block_size,
        mask_fn=None if block_mask is None else block_mask.mask_fn,
    )


def _shifted(mask_fn: MaskFn, b0: jax.Array, h0: jax.Array, r0: jax.Array, c0: jax.Array) -> MaskFn:
    """`mask_fn` seen from a tile whose first batch, head, row and column are the given ones."""

    def shifted(b: jax.Array, h: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
        return mask_fn(b + b0, h + h0, rows + r0, cols + c0)

    return shifted


@functools.cache
def _tile_counter(statics: AttentionStatics, tile: tuple[int, int], with_mask: bool):
    """A jitted `(b, h, i, j, state, seq_q, seq_k) -> int32 counts` over a group of tiles: the
    visible pairs of tile (i, j) of batch row b and head h, by `visibility.visible_pairs` on an
    `Operands` of one tile, placed by position offsets and lengths."""
    bq, bk = tile

    def one(b, h, i, j, state, seq_q, seq_k):
        r0, c0 = i * bq, j * bk
        tile_statics = statics
        if statics.mask_fn is not None:
            tile_statics = dataclasses.replace(
                statics, mask_fn=_shifted(statics.mask_fn, b, h, r0, c0)
            )
        ops = Operands(
            q=_shape(1, bq, 1),
            k=_shape(1, bk, 1),
            v=_shape(1, bk, 1),
            statics=tile_statics,
            q_offsets=r0[None],
            kv_offsets=c0[None],
            q_lengths=(seq_q - r0)[None],
            kv_lengths=(seq_k - c0)[None],
            block_states=state.reshape(1, 1, 1, 1) if with_mask else None,
        )
        return visibility.visible_pairs(ops, block=bq).astype(jnp.int32)

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, None)))


def _tile_states(
    seq_q: int, seq_k: int, statics: AttentionStatics, block_mask: BlockMask | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """`visibility.block_states` of the whole call at the count's tiles `(Bm, Nm, Tb, Sb)`
    (Bm, Nm: the block mask's own batch and head axes, 1 without one), and the tiles."""
    bm, nm = (1, 1) if block_mask is None else block_mask.states.shape[:2]
    tile = (COUNT_TILE, COUNT_TILE) if block_mask is None else block_mask.block_size
    ops = Operands(
        q=_shape(bm, seq_q, nm),
        k=_shape(bm, seq_k, nm),
        v=_shape(bm, seq_k, nm),
        statics=statics,
        block_states=None if block_mask is None else block_mask.states,
    )
    n_q, n_k = -(-seq_q // tile[0]), -(-seq_k // tile[1])
    states = visibility.block_states(ops, tile[0], tile[1], n_q, n_k)
    return np.broadcast_to(np.asarray(states), (bm, nm, n_q, n_k)), tile


def _partial_pairs(
    seq_q: int,
    seq_k: int,
    statics: AttentionStatics,
    block_mask: BlockMask | None,
    where: np.ndarray,
    tile: tuple[int, int],
) -> int:
    """The visible pairs of the partially visible tiles at `where` (rows `[b, h, i, j]`), counted
    in groups small enough that each group's count is exact."""
    group = max(1, EXACT_COUNT // (tile[0] * tile[1]))
    counter = _tile_counter(statics, tile, block_mask is not None)
    mask_states = None if block_mask is None else np.asarray(block_mask.states)
    total = 0
    for start in range(0, len(where), group):
        chunk = where[start : start + group]
        real = len(chunk)
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], group - real, axis=0)])
        b, h, i, j = (chunk[:, axis].astype(np.int32) for axis in range(4))
        if mask_states is None:
            state = np.zeros(group, np.int8)
        else:
            bm, nm = mask_states.shape[:2]
            state = mask_states[b if bm > 1 else 0, h if nm > 1 else 0, i, j]
        counts = counter(b, h, i, j, state, np.int32(seq_q), np.int32(seq_k))
        total += int(np.asarray(counts)[:real].astype(np.int64).sum())
    return total


def visible_pairs(
    seq_q: int,
    seq_k: int,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    block_mask: BlockMask | None = None,
) -> int:
    """The exact number of (query i, key j) pairs with j visible to i (top-left aligned, as jax.nn).

    Query i sees keys `max(0, i - left) .. min(S - 1, i + right)`; causal means right = 0 and an
    unbounded left; a `flashjax.block_mask.BlockMask` hides its empty blocks (and, built from a
    mask function, what the function hides). With a mask that varies over batch rows or heads,
    the count is summed over the mask's own batch and head axes.
    """
    statics = _statics(causal, normalize_window(window, causal), block_mask)
    states, tile = _tile_states(seq_q, seq_k, statics, block_mask)
    full = int(np.count_nonzero(states == FULL)) * tile[0] * tile[1]
    where = np.argwhere(states == PARTIAL)
    return full + _partial_pairs(seq_q, seq_k, statics, block_mask, where, tile)


def _mask_slices(block_mask: BlockMask | None) -> int:
    """How many (batch, head) slices a count of `visible_pairs` sums over."""
    if block_mask is None:
        return 1
    bm, nm = block_mask.states.shape[:2]
    return bm * nm


def visible_fraction(
    seq_q: int,
    seq_k: int,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    block_mask: BlockMask | None = None,
) -> float:
    """The fraction of the `T x S` score matrix that is computed usefully.

    1 for full attention, exactly 0.5 for causal without a window or block mask (the convention of
    FlashAttention's papers and of ANCHORS.md, so that numbers compare), and the exact count of
    visible pairs divided by `T * S` when a window or a block mask is given.
    """
    if window is None and block_mask is None:
        return 0.5 if causal else 1.0
    pairs = visible_pairs(seq_q, seq_k, causal, window, block_mask)
    return pairs / (_mask_slices(block_mask) * seq_q * seq_k)


def attention_flops(
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    block_mask: BlockMask | None = None,
    mode: str = "fwd",
) -> float:
    """FLOPs of one attention call: `4 * B * N * T * S * H * visible fraction * mode factor`.

    `mode` is "fwd" (x1), "bwd" (x2.5) or "fwd+bwd" (x3.5).
    """
    if mode not in MODE_FACTORS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dense = 4.0 * batch * heads * seq_q * seq_k * head_dim
    fraction = visible_fraction(seq_q, seq_k, causal, window, block_mask)
    return dense * fraction * MODE_FACTORS[mode]
