"""What the Triton-lowered kernels share: their operand record, how its tiles are loaded, masked
and walked.

All three kernels (forward, dK/dV, dQ) take one `Refs` record, prepared by `api.py` (padded):
  q, do           (B, Tp, N, Hp)           k, v  (B, Sp, K, Hp)
  seq             (B, 4) int32: q_offset, kv_offset, q_len, kv_len (`Operands.seq_info`), only
                  when the call has lengths or offsets; else the kernels take the static
                  (0, 0, T, S) (`seq_of`), which keeps their loop bounds compile-time constants;
                  or (B, 1) int32, the key lengths alone (`Operands.seq_lengths`, the decode
                  kernel's: the queries are the last T positions of the keys)
  bias            (Bb, Nb, Tb, Sb) float32, Bb in {1, B}, Nb in {1, N}, Tb in {1, Tp}, Sb in {1, Sp}
  q_segments      (B, Tp), kv_segments (B, Sp) int32
  full, partial   visit lists (Bt, Nt, rows tiles, 1 + column tiles) int32, when the call has
                  segments or a block mask (`visibility.visit_lists`); else the kernels compute
                  their ranges from `seq` (`visibility.block_range`)
  seeds           (2,) uint32
  lse2, delta     (B, N, Tp) float32 (backward)
  page_table      (B, Pp) int32: the decode kernel's paged cache (k, v are then page pools)
Tp, Sp are multiples of the tiles and Hp a power of two (zero padding; padded rows and keys lie past
the lengths, so the visibility rule hides them). A broadcast bias is read with broadcasting.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common, visibility
from pallas_kernels.operands import AttentionStatics


@dataclasses.dataclass(frozen=True)
class Refs:
    """The operands of one kernel launch: arrays outside the kernel, refs inside, BlockSpecs for
    `pallas_call` (one record, so a new operand is one field)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    seq: jax.Array | None = None
    bias: jax.Array | None = None
    q_segments: jax.Array | None = None
    kv_segments: jax.Array | None = None
    full: jax.Array | None = None
    partial: jax.Array | None = None
    seeds: jax.Array | None = None
    do: jax.Array | None = None
    lse2: jax.Array | None = None
    delta: jax.Array | None = None
    page_table: jax.Array | None = None

    def replace(self, **changes) -> Refs:
        return dataclasses.replace(self, **changes)

    def specs(self, **spec_of) -> Refs:
        """A record of BlockSpecs: `spec_of[name]` for each field that is present."""
        fields = {}
        for f in dataclasses.fields(self):
            x = getattr(self, f.name)
            fields[f.name] = None if x is None else spec_of[f.name]
        return Refs(**fields)


jax.tree_util.register_dataclass(
    Refs, data_fields=[f.name for f in dataclasses.fields(Refs)], meta_fields=[]
)


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """A tile matmul with float32 accumulation; float32 operands use full precision (no TF32)."""
    exact = a.dtype == jnp.float32
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=not exact)


def bias_spec(bias: jax.Array | None, heads_per_program: int, head_of) -> pl.BlockSpec | None:
    """BlockSpec of the bias: a program sees its batch/head's whole (Tb, Sb) plane.

    `head_of(*grid_ids) -> (batch, head block)`; `heads_per_program` is the head block size (1, or
    the GQA group in the dK/dV kernel). Broadcast axes always read block 0.
    """
    if bias is None:
        return None
    bb, nb, tb, sb = bias.shape
    hb = heads_per_program if nb > 1 else 1

    def index(*ids):
        b, h = head_of(*ids)
        return (b if bb > 1 else 0, h if nb > 1 else 0, 0, 0)

    return pl.BlockSpec((None, hb, tb, sb), index)


def lists_spec(lists: jax.Array | None, heads_per_program: int, head_of) -> pl.BlockSpec | None:
    """BlockSpec of visit lists `(Bt, Nt, R, 1 + C)`: a program sees its row tile's lists for its
    batch row and its head(s). `head_of(*grid_ids) -> (row tile, batch, head block)`."""
    if lists is None:
        return None
    bt, nt, _, width = lists.shape
    hb = heads_per_program if nt > 1 else 1

    def index(*ids):
        r, b, h = head_of(*ids)
        return (b if bt > 1 else 0, h if nt > 1 else 0, r, 0)

    return pl.BlockSpec((None, hb, None, width), index)


def load_bias(
    bias_ref, head: jax.Array | int, q0: jax.Array, bq: int, k0: jax.Array, bk: int
) -> jax.Array:
    """The (bq or 1, bk or 1) bias tile for rows q0.. and cols k0.. of head `head` in the block."""
    hb, tb, sb = bias_ref.shape
    rows = pl.ds(q0, bq) if tb > 1 else pl.ds(0, 1)
    cols = pl.ds(k0, bk) if sb > 1 else pl.ds(0, 1)
    return bias_ref[head if hb > 1 else 0, rows, cols]


def out_shape(like: jax.Array, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """An output of `shape` that varies over the same manual mesh axes as `like` (so the kernels
    work inside `jax.shard_map` with its default `check_vma=True`)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def tile_mask(
    statics: AttentionStatics,
    rows: jax.Array,
    cols: jax.Array,
    seq: visibility.Seq,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    batch: jax.Array,
    head: jax.Array,
) -> jax.Array:
    """The element mask `(bq, bk)` of a boundary tile: query rows x key cols."""
    segments = {}
    if q_segments is not None:
        segments = dict(q_segments=q_segments[:, None], kv_segments=kv_segments[None, :])
    return visibility.element_visible(
        statics, rows[:, None], cols[None, :], seq, batch=batch, head=head, **segments
    )


def seq_of(r: Refs, static: tuple[int, int, int, int]) -> visibility.Seq:
    """The (q_offset, kv_offset, q_len, kv_len) of the program's batch row: loaded from `r.seq`
    (`Operands.seq_info`'s row; or one column, `Operands.seq_lengths`: the key length, the
    queries at its end), or the static `(0, 0, T, S)` when the call has no lengths or offsets."""
    if r.seq is None:
        return static
    if r.seq.shape[-1] == 1:
        _, _, t, s = static
        kv_len = jnp.clip(r.seq[0], 0, s)
        return kv_len - t, 0, t, kv_len
    return visibility.seq_row(r.seq)


@dataclasses.dataclass(frozen=True)
class QueryTile:
    """What a program of a query-major kernel (forward, dQ; grid (query tile, batch, head)) knows
    about its tile: batch row, head, first row, row indices, sequence info, segment ids, dropout
    stream."""

    b: jax.Array
    h: jax.Array
    q0: jax.Array
    rows: jax.Array
    seq: visibility.Seq
    q_segments: jax.Array | None
    stream: jax.Array | None


def query_tile(
    r: Refs,
    statics: AttentionStatics,
    block_q: int,
    num_heads: int,
    static_seq: tuple[int, int, int, int],
) -> QueryTile:
    qb, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q0 = qb * block_q
    stream = None
    if statics.has_dropout:
        stream = common.head_stream(statics, r.seeds, b, h, num_heads)
    return QueryTile(
        b=b,
        h=h,
        q0=q0,
        rows=q0 + jnp.arange(block_q, dtype=jnp.int32),
        seq=seq_of(r, static_seq),
        q_segments=None if r.q_segments is None else r.q_segments[pl.ds(q0, block_q)],
        stream=stream,
    )


@dataclasses.dataclass(frozen=True)
class KeyTile:
    """Key tile `kb` as a query-major program sees it: key indices, K and V (rows past the key
    length zeroed on boundary tiles), the element mask (None on interior tiles) and the bias."""

    cols: jax.Array
    k: jax.Array
    v: jax.Array
    mask: jax.Array | None
    bias: jax.Array | None


def key_tile(
    r: Refs,
    t: QueryTile,
    statics: AttentionStatics,
    kb: jax.Array,
    block_q: int,
    block_k: int,
    *,
    masked: bool,
) -> KeyTile:
    k0 = kb * block_k
    cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
    k = r.k[pl.ds(k0, block_k), :]
    v = r.v[pl.ds(k0, block_k), :]
    mask = None
    if masked:
        kv_segments = None if r.kv_segments is None else r.kv_segments[pl.ds(k0, block_k)]
        mask = tile_mask(statics, t.rows, cols, t.seq, t.q_segments, kv_segments, t.b, t.h)
        k, v = zero_past(k, cols, t.seq[3]), zero_past(v, cols, t.seq[3])
    bias = None if r.bias is None else load_bias(r.bias, 0, t.q0, block_q, k0, block_k)
    return KeyTile(cols=cols, k=k, v=v, mask=mask, bias=bias)


def zero_past(x: jax.Array, index: jax.Array, length: jax.Array) -> jax.Array:
    """Rows of a loaded tile at or past `length` set to 0, so garbage there (NaN in a padded cache)
    never reaches an output through the tile's matmul. A static length means the call has no
    lengths: past it is only the wrapper's zero padding, and nothing needs to be done."""
    if isinstance(length, int):
        return x
    return jnp.where((index < length)[:, None], x, jnp.zeros_like(x))


def walk(
    body: Callable,
    carry,
    *,
    ranges: tuple[jax.Array, ...] | None = None,
    lists: tuple[Callable, Callable] | None = None,
):
    """Run `body(block, carry, masked=...)` over the column blocks a row tile visits.

    `ranges`: `visibility.block_range`'s `(lo, full_lo, full_hi, hi)`: boundary blocks with the
    element mask, interior ones without. `lists`: `(full, partial)` readers of the visit lists,
    `reader(j)` giving entry j (entry 0 the count): full tiles unmasked, then partial ones masked.
    """
    if lists is not None:
        full, partial = lists
        carry = lax.fori_loop(0, full(0), lambda i, c: body(full(1 + i), c, masked=False), carry)
        return lax.fori_loop(
            0, partial(0), lambda i, c: body(partial(1 + i), c, masked=True), carry
        )
    lo, full_lo, full_hi, hi = ranges
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def visits(
    r: Refs,
    statics: AttentionStatics,
    row0,
    block_rows: int,
    block_cols: int,
    seq,
    *,
    transposed: bool = False,
    head=0,
) -> dict:
    """The `walk` keyword of a row tile: its visit lists (`head`: which of the program's heads)
    when the launch has them, else the ranges of `visibility.block_range`."""
    if r.full is not None:
        return dict(lists=(lambda j: r.full[head, j], lambda j: r.partial[head, j]))
    return dict(
        ranges=visibility.block_range(
            statics, row0, block_rows, block_cols, seq, transposed=transposed
        )
    )


def compiler_params(config) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def row_specs(r: Refs, *, row_of: Callable) -> dict:
    """BlockSpecs (for `Refs.specs`) of the operands a program reads whole for its batch row
    `row_of(*grid_ids)`: the sequence info and segment ids; and the dropout seeds, read by all."""

    def per_row(x: jax.Array | None) -> pl.BlockSpec | None:
        if x is None:
            return None
        return pl.BlockSpec((None, x.shape[1]), lambda *ids: (row_of(*ids), 0))

    return dict(
        seq=per_row(r.seq),
        q_segments=per_row(r.q_segments),
        kv_segments=per_row(r.kv_segments),
        seeds=pl.BlockSpec((2,), lambda *ids: (0,)),
    )
