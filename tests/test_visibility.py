"""The one visibility rule: its block forms agree with its element form, by brute force.

For random windows, offsets, lengths, segment ids and block masks: every visible pair lies in a
visited tile; a tile marked full (by `block_range` or `block_states`) has every pair visible; a tile
marked empty has none; the transposed range (dK/dV) agrees with the transposed element mask; the
visit lists list exactly the full and partial tiles; `visible_pairs` counts the element mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax import BlockMask
from flashjax.attention import operands
from pallas_kernels import visibility
from pallas_kernels.mosaic import pipeline
from pallas_kernels.operands import EMPTY, FULL, PARTIAL

B, T, S, N, H = 2, 70, 90, 2, 8


def _ops(seed: int):
    rng = np.random.default_rng(seed)
    kw: dict = {}
    if rng.random() < 0.7:
        kw["local_window_size"] = tuple(int(x) for x in rng.integers(0, 30, 2))
    kw["is_causal"] = bool(rng.random() < 0.5)
    if rng.random() < 0.6:
        kw["q_offsets"] = jnp.asarray(rng.integers(0, 30, B), jnp.int32)
        kw["kv_offsets"] = jnp.asarray(rng.integers(0, 30, B), jnp.int32)
    if rng.random() < 0.6:
        kw["query_seq_lengths"] = jnp.asarray(rng.integers(1, T + 1, B), jnp.int32)
        kw["key_value_seq_lengths"] = jnp.asarray(rng.integers(1, S + 1, B), jnp.int32)
    if rng.random() < 0.5:
        sort = np.sort if rng.random() < 0.7 else (lambda x, axis: x)  # packed, or not sorted
        kw["q_segment_ids"] = jnp.asarray(sort(rng.integers(0, 4, (B, T)), axis=1), jnp.int32)
        kw["kv_segment_ids"] = jnp.asarray(sort(rng.integers(0, 4, (B, S)), axis=1), jnp.int32)
    if rng.random() < 0.5:
        blocks = rng.random((1, N, -(-T // 16), -(-S // 32))) < 0.6
        kw["block_mask"] = BlockMask.from_blocks(jnp.asarray(blocks), (16, 32))
    q = jnp.zeros((B, T, N, H))
    k = jnp.zeros((B, S, 1, H))
    return operands(q, k, k, **kw)


def _dense(ops) -> np.ndarray:
    """The element form on the whole (B, N, T, S) matrix."""
    segs = {}
    if ops.has_segments:
        segs = dict(
            q_segments=ops.q_segments[:, None, :, None],
            kv_segments=ops.kv_segments[:, None, None, :],
        )
    vis = visibility.element_visible(
        ops.statics,
        jnp.arange(T)[:, None],
        jnp.arange(S)[None, :],
        visibility.seq_columns(ops.seq_info(), 4),
        batch=jnp.arange(B)[:, None, None, None],
        head=jnp.arange(N)[None, :, None, None],
        block_states=ops.block_states,
        **segs,
    )
    return np.asarray(jnp.broadcast_to(vis, (B, N, T, S)))


def _tiles(dense: np.ndarray, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """(any, all) visible per tile, padding counted as invisible for `any`, ignored for `all`."""
    nq, nk = -(-T // bq), -(-S // bk)
    pad = np.zeros(dense.shape[:2] + (nq * bq, nk * bk), bool)
    pad[..., :T, :S] = dense
    real = np.zeros_like(pad)
    real[..., :T, :S] = True
    tiles = pad.reshape(*pad.shape[:2], nq, bq, nk, bk)
    real = real.reshape(tiles.shape)
    return tiles.any(axis=(3, 5)), (tiles | ~real).all(axis=(3, 5)) & real.all(axis=(3, 5))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("tile", [(16, 16), (16, 32), (32, 16)])
def test_block_forms_agree_with_the_element_form(seed: int, tile: tuple[int, int]) -> None:
    ops = _ops(seed)
    bq, bk = (visibility.mask_tile(ops.statics.mask_block, t, axis) for axis, t in enumerate(tile))
    dense = _dense(ops)
    some, every = _tiles(dense, bq, bk)
    nq, nk = some.shape[2:]

    # States: empty tiles see nothing, full tiles see everything (and are real, unpadded).
    states = np.asarray(visibility.block_states(ops, bq, bk, nq, nk))
    states = np.broadcast_to(states, (B, N, nq, nk))
    assert not np.any(some & (states == EMPTY)), "a visible pair in an empty tile"
    assert np.all(every[states == FULL]), "an invisible pair in a full tile"

    # Lists: exactly the full and the partial tiles, ascending.
    full, partial = (np.asarray(x) for x in visibility.visit_lists(jnp.asarray(states)))
    for lists, state in ((full, FULL), (partial, PARTIAL)):
        for idx in np.ndindex(*lists.shape[:-1]):
            row = lists[idx]
            assert list(row[1 : 1 + row[0]]) == list(np.flatnonzero(states[idx] == state))

    # Ranges (window, offsets, lengths only) and their transposed form.
    seq_info = np.asarray(ops.seq_info())
    statics = ops.statics.__class__(scale=1.0, window=ops.statics.window)
    ranged = _tiles(
        _dense(ops.replace(q_segments=None, kv_segments=None, block_states=None)), bq, bk
    )
    for b in range(B):
        seq = tuple(jnp.int32(x) for x in seq_info[b])
        some_r, every_r = (x[b, 0] for x in ranged)
        for qb in range(nq):
            lo, flo, fhi, hi = (
                int(x) for x in visibility.block_range(statics, qb * bq, bq, bk, seq)
            )
            visited = np.zeros(nk, bool)
            visited[lo:hi] = True
            assert not np.any(some_r[qb] & ~visited), (b, qb)
            assert np.all(every_r[qb, flo:fhi]), (b, qb)
        for kb in range(nk):
            lo, flo, fhi, hi = (
                int(x)
                for x in visibility.block_range(statics, kb * bk, bk, bq, seq, transposed=True)
            )
            visited = np.zeros(nq, bool)
            visited[lo:hi] = True
            assert not np.any(some_r[:, kb] & ~visited), (b, kb)
            assert np.all(every_r[flo:fhi, kb]), (b, kb)


@pytest.mark.parametrize("seed", range(4))
def test_visible_pairs_counts_the_element_form(seed: int) -> None:
    ops = _ops(seed)
    assert int(visibility.visible_pairs(ops, block=32)) == int(_dense(ops).sum())


def test_a_tight_range_for_causal_with_offsets() -> None:
    """Causal, queries at positions 100.., keys at 0..: a query tile sees key tiles up to its
    last position and is full below its first."""
    ops = operands(
        jnp.zeros((1, 32, 1, 8)),
        jnp.zeros((1, 200, 1, 8)),
        jnp.zeros((1, 200, 1, 8)),
        is_causal=True,
        q_offsets=100,
    )
    seq = tuple(jnp.int32(x) for x in np.asarray(ops.seq_info())[0])
    lo, flo, fhi, hi = (int(x) for x in visibility.block_range(ops.statics, 16, 16, 16, seq))
    # rows 16..31 sit at positions 116..131: keys 0..131 visible to some, 0..116 to all.
    assert (lo, flo, fhi, hi) == (0, 0, 7, 9)


@pytest.mark.parametrize(
    "window, seq_k, transposed, loops",
    [
        ((None, None), 256, False, 1),  # plain: the full tiles only
        ((None, None), 200, False, 2),  # a ragged last key tile
        ((None, 0), 256, False, 2),  # causal: the diagonal after the full tiles
        ((None, 0), 256, True, 2),  # causal dK/dV: the diagonal before them
        ((40, 0), 256, False, 3),  # a window on both sides
    ],
)
def test_statically_empty_runs(window, seq_k, transposed, loops):
    """A boundary run that cannot hold a tile comes back from `block_range` as its end's own
    object, so the Mosaic kernels lower no loop for it (`pipeline.live_runs`, `walk`: the masked
    copies of the key loop were a third of the lowering time); the ranges are the general
    formula's (traced sequence lengths), for every row tile."""
    statics = visibility.AttentionStatics(scale=1.0, window=window)
    rows, cols, seq_q = 64, 32, 256
    static_seq = (0, 0, seq_q, seq_k)
    traced_seq = tuple(jnp.int32(x) for x in static_seq)
    block_rows, block_cols = (cols, rows) if transposed else (rows, cols)
    found = []

    def trace(row_start):
        ranges = visibility.block_range(
            statics, row_start, block_rows, block_cols, static_seq, transposed=transposed
        )
        found.append(len(pipeline.live_runs(pipeline.range_visits(ranges))))
        return ranges

    jax.make_jaxpr(trace)(jnp.int32(0))
    assert found == [loops]
    n_rows = seq_k if transposed else seq_q
    for start in range(0, n_rows, block_rows):
        static, general = (
            [
                int(x)
                for x in visibility.block_range(
                    statics, start, block_rows, block_cols, s, transposed=transposed
                )
            ]
            for s in (static_seq, traced_seq)
        )
        assert static == general, start


@pytest.mark.parametrize("window", [(None, None), (None, 0), (20, 3)])
@pytest.mark.parametrize("lengths", [(64, 96), (50, 96), (64, 70)])
def test_extent_drops_only_compares_that_hold(window, lengths):
    """`element_visible(..., extent=(T, S))` (a kernel's padded sizes): a static length that
    fills its extent emits no compare, and the mask is the one without `extent`."""
    statics = visibility.AttentionStatics(scale=1.0, window=window)
    extent = (64, 96)
    rows = jnp.arange(extent[0], dtype=jnp.int32)[:, None]
    cols = jnp.arange(extent[1], dtype=jnp.int32)[None, :]
    seq = (0, 0, *lengths)

    def mask(extent):
        return visibility.element_visible(statics, rows, cols, seq, extent=extent)

    np.testing.assert_array_equal(mask(extent), mask(None))
    compares = lambda e: sum(  # noqa: E731
        eq.primitive.name in ("lt", "le", "ge") for eq in jax.make_jaxpr(lambda: mask(e))().eqns
    )
    filled = sum(n == e for n, e in zip(lengths, extent))
    assert compares(extent) == compares(None) - filled or compares(None) == filled == 2
