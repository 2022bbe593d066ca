"""THE visibility rule: which (query, key) pairs interact, in every form the code needs.

One rule, from the call's static meaning (`AttentionStatics`: window, block-mask element rule) and
its dynamic operands (position offsets, real lengths, segment ids, block states):

  query row i (of batch b, head h) sees key j iff
      i < q_len[b]  and  j < kv_len[b]
      and  p - left <= k <= p + right        with p = q_offset[b] + i, k = kv_offset[b] + j
      and  q_segments[b, i] == kv_segments[b, j]
      and  the block mask holds at (b, h, i, j).

The forms:
- `element_visible`: the rule on a tile of broadcast indices (the reference, the chunked path and
  the kernels' boundary tiles all call it; nobody re-derives a mask).
- `block_range`: for a block of rows, the blocks of columns `[lo, hi)` it visits and the sub-range
  `[full_lo, full_hi)` where every pair is visible (no element mask needed). It knows the window,
  offsets and lengths, works on traced scalars inside a kernel and on arrays in XLA, and its
  `transposed=True` form answers for a block of keys (dK/dV). `share_range` cuts it into the
  parts of split-KV decoding.
- `block_states`: for every (row tile, column tile) the state EMPTY / PARTIAL / FULL, from
  `block_range`, segment-id ranges and the block mask together; `visit_lists` turns it into, for
  each row tile, the list of FULL column tiles and the list of PARTIAL ones (the kernels walk
  those; transposing the states gives the dK/dV lists).
- `visible_pairs`: the number of visible pairs, for FLOP counts.

Segment ids need not be sorted: a tile pair is skipped when the [min, max] ranges of its ids do
not meet, which is exact for packed (non-decreasing) ids and conservative otherwise.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.operands import EMPTY, FULL, PARTIAL, AttentionStatics, Operands

# (q_offset, kv_offset, q_len, kv_len): scalars inside a kernel, broadcastable arrays in XLA.
Seq = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def seq_row(seq_info: jax.Array) -> Seq:
    """The 4 scalars of one row of `Operands.seq_info()` (or a ref to it)."""
    return seq_info[0], seq_info[1], seq_info[2], seq_info[3]


def seq_columns(seq_info: jax.Array, ndim: int) -> Seq:
    """The 4 columns of `seq_info (B, 4)`, each shaped `(B, 1, ..., 1)` with `ndim` dims."""
    cols = seq_info.reshape((seq_info.shape[0],) + (1,) * (ndim - 1) + (4,))
    return cols[..., 0], cols[..., 1], cols[..., 2], cols[..., 3]


# --------------------------------------------------------------------------------------------------
# Element form
# --------------------------------------------------------------------------------------------------


def element_visible(
    statics: AttentionStatics,
    rows: jax.Array,
    cols: jax.Array,
    seq: Seq,
    *,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
    batch: jax.Array | int = 0,
    head: jax.Array | int = 0,
    block_states: jax.Array | None = None,
    extent: tuple[int, int] | None = None,
) -> jax.Array:
    """Bool mask of the pairs (row, col) that are visible, by broadcasting.

    `rows` are query indices shaped `(..., R, 1)`, `cols` key indices `(..., 1, C)`; the entries
    of `seq` and the segment ids (`(..., R, 1)` / `(..., 1, C)`) broadcast against them, and so do
    `batch` and `head` (passed to the block mask's `mask_fn`). `extent`: what every row and col
    index stays below (a kernel's padded T and S); a static length that reaches it bounds
    nothing, and its compare is left out (at head dim 64 the two length compares were 128 of a
    masked causal step's 733 instructions, offline SASS).

    The block mask: with a `mask_fn` it is evaluated here; without one the mask is the block
    states, gathered from `block_states` `(Bm, Nm, Tm, Sm)` when given. Kernels pass no states:
    their tiles lie inside one mask block, and a tile they visit lies in a non-empty one.
    """
    q_off, kv_off, q_len, kv_len = seq
    row_end, col_end = extent or (None, None)
    terms = []  # ANDed at the end
    if not _reaches(q_len, row_end):
        terms.append(rows < q_len)
    if not _reaches(kv_len, col_end):
        terms.append(cols < kv_len)
    left, right = statics.window
    if left is not None or right is not None:
        q_pos = rows + q_off
        k_pos = cols + kv_off
        if right is not None:
            terms.append(k_pos <= q_pos + right)
        if left is not None:
            terms.append(k_pos >= q_pos - left)
    if q_segments is not None:
        terms.append(q_segments == kv_segments)
    if statics.mask_fn is not None:
        terms.append(statics.mask_fn(batch, head, rows, cols))
    elif block_states is not None:
        bq, bk = statics.mask_block
        bm, nm = block_states.shape[:2]
        b = batch if bm > 1 else 0
        h = head if nm > 1 else 0
        terms.append(block_states[b, h, rows // bq, cols // bk] != EMPTY)
    if not terms:  # every pair visible: the length compares, for an array
        terms = [rows < q_len, cols < kv_len]
    visible = functools.reduce(operator.and_, terms)
    shape = jnp.broadcast_shapes(visible.shape, jnp.shape(rows), jnp.shape(cols))
    return visible if visible.shape == shape else jnp.broadcast_to(visible, shape)


def _reaches(length, end: int | None) -> bool:
    """Whether a static length is at or past `end`, which every index stays below."""
    return end is not None and isinstance(length, int) and length >= end


# --------------------------------------------------------------------------------------------------
# Block form
# --------------------------------------------------------------------------------------------------


def _div(x: jax.Array, d: int) -> jax.Array:
    return lax.div(x, jnp.int32(d))


def _cdiv(x: jax.Array, d: int) -> jax.Array:
    return lax.div(x + jnp.int32(d - 1), jnp.int32(d))


def block_range(
    statics: AttentionStatics,
    row_start: jax.Array | int,
    block_rows: int,
    block_cols: int,
    seq: Seq,
    *,
    transposed: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Which column blocks rows `[row_start, row_start + block_rows)` visit, by window, offsets and
    lengths (segments and the block mask are `block_states`' business).

    Returns int32 `(lo, full_lo, full_hi, hi)`: column blocks `[lo, hi)` hold every visible
    column; in `[full_lo, full_hi)` every (row, col) pair is visible, so no element mask is
    needed; `[lo, full_lo)` and `[full_hi, hi)` are boundary blocks. Rows are queries and columns
    keys; `transposed=True` swaps the roles (rows are keys, for dK/dV). Works on traced scalars
    (inside kernels) and on broadcasting arrays (in XLA) alike.

    A boundary run known to be empty when the kernel is traced comes back as the same object as
    its end (`full_lo is lo`: no window on the left; `full_hi is hi`: none on the right and whole
    static blocks), so a kernel emits no loop for it (`pipeline.range_visits`): a plain
    non-causal call lowers one key loop, not three.
    """
    q_off, kv_off, q_len, kv_len = (jnp.asarray(x, jnp.int32) for x in seq)
    left, right = statics.window
    if transposed:  # key at position k is seen by queries k - right .. k + left
        left, right = right, left
        row_off, col_off, n_rows, n_cols = kv_off, q_off, kv_len, q_len
    else:
        row_off, col_off, n_rows, n_cols = q_off, kv_off, q_len, kv_len
    zero = jnp.int32(0)
    r0 = jnp.asarray(row_start, jnp.int32)
    # A static length that is a multiple of the row block: every row block is whole (no masks
    # for padded rows), and the bounds stay compile-time constants where the window allows.
    whole_rows = isinstance(seq_rows := (seq[3] if transposed else seq[2]), int) and (
        seq_rows % block_rows == 0
    )
    r_end = r0 + block_rows if whole_rows else jnp.minimum(r0 + block_rows, n_rows)
    first = r0 + row_off - col_off  # positions, shifted into column indices
    last = r_end - 1 + row_off - col_off

    # Columns some row sees: [first - left, last + right], within [0, n_cols).
    c_lo = zero if left is None else jnp.maximum(first - left, zero)
    c_hi = n_cols if right is None else jnp.clip(last + right + 1, zero, n_cols)
    lo = _div(c_lo, block_cols)
    hi = jnp.maximum(_cdiv(c_hi, block_cols), lo)
    if not whole_rows:
        hi = jnp.where(r_end > r0, hi, lo)  # rows all past the length: nothing
    # Columns every row sees: [last - left, first + right], within [0, n_cols).
    f_lo = zero if left is None else jnp.maximum(last - left, zero)
    f_hi = n_cols if right is None else jnp.clip(first + right + 1, zero, n_cols)
    # (No left window: f_lo = c_lo = 0, so the clip below is lo. No right window over whole
    # static blocks: f_hi = c_hi and the clip is hi.)
    full_lo = lo if left is None else jnp.clip(_cdiv(f_lo, block_cols), lo, hi)
    whole_cols = isinstance(seq_cols := (seq[2] if transposed else seq[3]), int) and (
        seq_cols % block_cols == 0
    )
    if right is None and whole_cols and whole_rows:
        return lo, full_lo, hi, hi
    full_hi = jnp.clip(_div(f_hi, block_cols), full_lo, hi)
    if not whole_rows:
        full_hi = jnp.where(r0 + block_rows <= n_rows, full_hi, full_lo)  # padded rows: masked
    return lo, full_lo, full_hi, hi


def share_range(
    ranges: tuple[jax.Array, jax.Array, jax.Array, jax.Array], part: jax.Array | int, parts: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Part `part` of `parts` near-equal shares of `block_range`'s visited blocks `[lo, hi)`, in
    the same `(lo, full_lo, full_hi, hi)` form (split-KV decoding). Cut at run time from the
    visible range, so a cache shorter than its capacity still spreads over every part; the later
    parts may be empty."""
    lo, full_lo, full_hi, hi = ranges
    per = _cdiv(hi - lo, parts)
    start = jnp.minimum(lo + jnp.asarray(part, jnp.int32) * per, hi)
    stop = jnp.minimum(start + per, hi)
    s_full_lo = jnp.clip(full_lo, start, stop)
    s_full_hi = jnp.clip(full_hi, s_full_lo, stop)
    return start, s_full_lo, s_full_hi, stop


def _segment_ranges(segments: jax.Array, block: int, n_blocks: int) -> tuple[jax.Array, jax.Array]:
    """Per-block min and max of segment ids `(B, L)` -> `(B, n_blocks)` each; the tail is padded
    with the last id (padding rows are invisible anyway, by length)."""
    length = segments.shape[1]
    pad = n_blocks * block - length
    padded = jnp.pad(segments, ((0, 0), (0, pad)), mode="edge") if pad > 0 else segments
    padded = padded[:, : n_blocks * block].reshape(segments.shape[0], n_blocks, block)
    return padded.min(axis=2), padded.max(axis=2)


def _states_of(visited: jax.Array, full: jax.Array) -> jax.Array:
    return jnp.where(full, FULL, jnp.where(visited, PARTIAL, EMPTY)).astype(jnp.int8)


def tile_divides_mask(statics: AttentionStatics, block_q: int, block_k: int) -> bool:
    """Kernels and the chunked path tile at divisors of the block mask's block size."""
    if statics.mask_block is None:
        return True
    return statics.mask_block[0] % block_q == 0 and statics.mask_block[1] % block_k == 0


def mask_tile(mask_block: tuple[int, int] | None, block: int, axis: int) -> int:
    """The largest power of two <= `block` that divides the block mask's block size on `axis`
    (0 queries, 1 keys): the tile a kernel uses when a block mask is given."""
    if mask_block is None:
        return block
    size = mask_block[axis]
    return min(block, size & -size)  # size & -size: the largest power of two dividing size


def block_states(ops: Operands, block_q: int, block_k: int, n_q: int, n_k: int) -> jax.Array:
    """States `(Bt, Nt, n_q, n_k)` int8 of every (query tile, key tile): EMPTY, PARTIAL or FULL.

    The AND of the three sources, each a state: the window/offset/length range (`block_range`),
    the segment-id ranges, and the block mask re-tiled to these tiles (which must divide its
    block size). Bt is B when anything depends on the batch row, else 1; Nt is N when the block
    mask depends on the head, else 1.
    """
    statics = ops.statics
    seq_info = ops.seq_info() if ops.has_seq_info else ops.seq_info()[:1]
    seq = seq_columns(seq_info, 2)  # (Bs, 1)
    rows = jnp.arange(n_q, dtype=jnp.int32)[None, :] * block_q
    lo, full_lo, full_hi, hi = block_range(statics, rows, block_q, block_k, seq)
    kb = jnp.arange(n_k, dtype=jnp.int32)
    between = lambda a, b: (kb >= a[..., None]) & (kb < b[..., None])  # noqa: E731
    state = _states_of(between(lo, hi), between(full_lo, full_hi))[:, None]  # (Bs, 1, nq, nk)

    if ops.has_segments:
        qmin, qmax = _segment_ranges(ops.q_segments, block_q, n_q)
        kmin, kmax = _segment_ranges(ops.kv_segments, block_k, n_k)
        qmin, qmax = qmin[:, :, None], qmax[:, :, None]
        kmin, kmax = kmin[:, None, :], kmax[:, None, :]
        meet = (qmin <= kmax) & (kmin <= qmax)
        same = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        state = jnp.minimum(state, _states_of(meet, same)[:, None])

    if ops.has_block_mask:
        if not tile_divides_mask(statics, block_q, block_k):
            raise ValueError(
                f"tiles ({block_q}, {block_k}) must divide the block mask's block size "
                f"{statics.mask_block}"
            )
        fq, fk = statics.mask_block[0] // block_q, statics.mask_block[1] // block_k
        tiled = jnp.repeat(jnp.repeat(ops.block_states, fq, axis=2), fk, axis=3)
        tiled = tiled[:, :, :n_q, :n_k]
        pad = ((0, 0), (0, 0), (0, n_q - tiled.shape[2]), (0, n_k - tiled.shape[3]))
        state = jnp.minimum(state, jnp.pad(tiled, pad))  # tiles past the mask are past the length
    return state


def visit_lists(states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(full, partial)` visit lists from states `(..., R, C)`: each `(..., R, 1 + C)` int32,
    entry 0 the count and entries 1.. the column tiles to visit, ascending (then filler)."""
    n = states.shape[-1]
    cols = jnp.arange(n, dtype=jnp.int32)

    def listing(selected: jax.Array) -> jax.Array:
        count = jnp.sum(selected, axis=-1, dtype=jnp.int32)
        order = jnp.argsort(jnp.where(selected, cols, n + cols), axis=-1).astype(jnp.int32)
        return jnp.concatenate([count[..., None], order], axis=-1)

    return listing(states == FULL), listing(states == PARTIAL)


def visible_pairs(ops: Operands, block: int = 512) -> jax.Array:
    """The number of visible (query, key) pairs summed over batch and query heads, as a float32
    scalar (FLOP counts; evaluated `block` query rows at a time)."""
    n_q = -(-ops.seq_q // block)
    cols = jnp.arange(ops.seq_k, dtype=jnp.int32)[None, None, None, :]
    seq = seq_columns(ops.seq_info(), 4)
    heads = jnp.arange(ops.num_heads, dtype=jnp.int32)[None, :, None, None]
    batch = jnp.arange(ops.batch, dtype=jnp.int32)[:, None, None, None]

    def count(qb):
        rows = qb * block + jnp.arange(block, dtype=jnp.int32)[None, None, :, None]
        segs = {}
        if ops.has_segments:
            q_seg = jnp.pad(ops.q_segments, ((0, 0), (0, n_q * block - ops.seq_q)))
            segs = dict(
                q_segments=lax.dynamic_slice_in_dim(q_seg, qb * block, block, 1)[:, None, :, None],
                kv_segments=ops.kv_segments[:, None, None, :],
            )
        vis = element_visible(
            ops.statics,
            rows,
            cols,
            seq,
            batch=batch,
            head=heads,
            block_states=ops.block_states,
            **segs,
        )
        vis = jnp.broadcast_to(vis, (ops.batch, ops.num_heads, block, ops.seq_k))
        return jnp.sum(vis, dtype=jnp.float32)

    return jnp.sum(lax.map(count, jnp.arange(n_q, dtype=jnp.int32)))
