"""Split-KV decoding (Flash-Decoding) on Pallas' Triton lowering: few queries, a long KV cache.

The training forward runs one program per (query tile, batch row, query head): with one new token
per row it launches B x N programs that each read a whole K/V head (G times over for GQA) and
leaves most of the GPU idle. This kernel instead:

- packs the queries of a KV head (GQA packing): a program takes all T x G query rows of one KV
  head, read in place from the query's `(B, T, K, G, H)` view (row r = t * G + g; T and G
  padded to powers of two only when they are not), so each K/V byte it reads serves every query
  head of the group, once. Fewer than 16 rows (the tile matmul's least) are replicated in the
  kernel and the copies' results, bitwise equal, are folded back: no padding pass over the query
  before the kernel;
- splits the keys: grid (split, batch row, KV head). The key blocks the program's rows see
  (`visibility.block_range`) are cut into `splits` near-equal shares at run time
  (`visibility.share_range`); each program walks its share with the online softmax and writes a
  partial output, normalized over its keys, and its base-2 logsumexp. A second kernel
  (`merge_splits`) folds the splits together, one program per (batch row, KV head) reading all
  of its splits' partials at once (the same merge as flashjax.merge's XLA ops, which took three
  fusions and ~4.5 us a 1 x 64k step on the H200; a first merge kernel walking the splits one
  after the other took 4.9 us, a load latency per split: benchmarks/results/2026-12-02-h200-s16
  and -s17; the merge in the split kernel's last program, found by an atomic arrival count, was
  slower on an H100, 1 x 64k 94.6 against 92.9 us a step, 1 x 8k 12.3 against 11.1: the split
  kernel took 1.9 us longer, and the count's zeroed buffer cost XLA a broadcast kernel and a copy,
  as many launches as the merge kernel: results/2026-12-07-h100-s40/call1). The grid runs a
  power-of-two count of split programs (the merge's block of splits must be one); those past
  `splits` see no key and write 0 and -inf, which merge away exactly;
- reads a paged cache's page ids one key block ahead (they ride in the walk's loop carry), off
  the path of the block's K/V loads: paged caches walk at 1.02-1.07x of contiguous ones.

Refs (`tiles.Refs`, prepared by `decode_api.py`):
  q           (B, Tp, K, Gp, Hp) the query, Tp x Gp rows per KV head
  k, v        (B, Sp, K, Hp)  contiguous cache, Sp a multiple of block_k; or page pools
              flattened to rows (num_pages * page_size, K, Hp) (page p's keys are rows
              p * page_size ...), with
  page_table  (B, Pp) int32   page ids (clipped in the kernel), padded so that every key
                              block's pages exist
  seq         (B, 4) int32 (`Operands.seq_info`), or None: the static (0, 0, T, S)
Outputs: out (Sp, B, Tp, K, Gp, Hp), float32 (the query's dtype when there is one split), and
lse2 (Sp, B, Tp, K, Gp) float32, Sp = `split_programs(splits)`; a split that saw no key has
out 0 and lse2 -inf.

Causality among the new tokens, windows, offsets and lengths are THE visibility rule's: interior
key blocks run without a mask, boundary blocks with `element_visible`'s (and K/V rows past the
length zeroed, so garbage in unused cache slots or pages reaches nothing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common, visibility
from pallas_kernels.configs import MIN_BLOCK as MIN_ROWS
from pallas_kernels.configs import DecodeConfig
from pallas_kernels.operands import AttentionStatics
from pallas_kernels.triton import tiles


def _block_rows(r: tiles.Refs, kb: jax.Array, block_k: int, page_size: int) -> jax.Array:
    """Where key block `kb` of a paged cache lies in the pools flattened to rows (`page_size` keys
    a page): its first row (pages of `block_k` keys or more: the block is a slice of one page), or
    each of its `block_k` rows (smaller pages: the block is gathered from several). Page ids are
    clipped into the pool here, as entries past a row's length may hold anything, and so is the
    table index (`kb` may be one past the last block when the walk reads a block ahead)."""
    last_page = r.k.shape[0] // page_size - 1
    last_entry = r.page_table.shape[0] - 1
    if page_size >= block_k:
        per_page = page_size // block_k
        entry = jnp.minimum(lax.div(kb, per_page), last_entry)
        page = jnp.clip(r.page_table[entry], 0, last_page)
        return page * page_size + lax.rem(kb, per_page) * block_k
    j = jnp.arange(block_k, dtype=jnp.int32)
    entries = jnp.minimum(kb * (block_k // page_size) + j // page_size, last_entry)
    pages = jnp.clip(r.page_table[entries], 0, last_page)
    return pages * page_size + j % page_size


def _key_block(
    r: tiles.Refs, kb: jax.Array, block_k: int, rows: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """The `(block_k, Hp)` K and V tiles of key block `kb`: a slice of the contiguous cache
    (`rows` None), or of the flattened page pools at `_block_rows`'s `rows` (a first row: one
    slice; a row per key: one 2-D gather; a gather of whole pages reshaped to a tile made paged
    caches 1.5-2.2x slower on the H200)."""
    if rows is None:
        keys = pl.ds(kb * block_k, block_k)
    elif rows.ndim == 0:
        keys = pl.ds(pl.multiple_of(rows, block_k), block_k)
    else:
        return r.k[rows, :], r.v[rows, :]
    return r.k[keys, :], r.v[keys, :]


def _decode_kernel(
    r: tiles.Refs,
    o_ref,
    lse_ref,
    *,
    statics: AttentionStatics,
    block_k: int,
    page_size: int | None,
    splits: int,
    static_seq: tuple[int, int, int, int],
):
    tp, gp, head_dim = r.q.shape
    rows = tp * gp
    copies = max(1, MIN_ROWS // rows)
    split, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seq = tiles.seq_of(r, static_seq)
    # the new token of each (replicated) row
    queries = lax.rem(jnp.arange(copies * rows, dtype=jnp.int32), rows) // gp
    q = r.q[...].reshape(rows, head_dim)
    if copies > 1:
        q = jnp.broadcast_to(q[None], (copies, rows, head_dim)).reshape(copies * rows, head_dim)

    def step(kb, kv, acc, m, l, masked: bool):
        """One key block of the online softmax."""
        k, v = kv
        mask = None
        if masked:
            cols = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
            mask = tiles.tile_mask(statics, queries, cols, seq, None, None, b, kh)
            k, v = tiles.zero_past(k, cols, seq[3]), tiles.zero_past(v, cols, seq[3])
        s2, _ = common.scores(tiles.dot(q, k, trans_b=True), statics.scale, statics, None, mask)
        p, m, l, alpha = common.online_softmax_step(s2, m, l)
        return acc * alpha[:, None] + tiles.dot(p.astype(v.dtype), v), m, l

    def body(kb, carry, *, masked: bool):
        acc, m, l, where = carry
        if page_size is None:  # a contiguous cache: `where` is a dummy
            return *step(kb, _key_block(r, kb, block_k, None), acc, m, l, masked), where
        # The next block's page ids, read while this block's K/V stream in. (Read in each
        # block's own step, Triton's pipeline issued the scalar read right before the block's
        # K/V copies and each block waited a memory latency for its ids: paged walks ran 1.2x
        # slower than contiguous at 1 x 8k on the H200, session 16.)
        ahead = _block_rows(r, kb + 1, block_k, page_size)
        return *step(kb, _key_block(r, kb, block_k, where), acc, m, l, masked), ahead

    seen = visibility.block_range(statics, 0, static_seq[2], block_k, seq)
    share = visibility.share_range(seen, split, splits)
    first = jnp.int32(0) if page_size is None else _block_rows(r, share[0], block_k, page_size)
    carry = tiles.walk(
        body, (*common.online_softmax_start(copies * rows, head_dim), first), ranges=share
    )
    out, lse2 = common.finalize(*carry[:3])
    if copies > 1:  # the copies are bitwise equal: any reduction returns them
        out = jnp.max(out.reshape(copies, rows, head_dim), axis=0)
        lse2 = jnp.max(lse2.reshape(copies, rows), axis=0)
    o_ref[...] = out.reshape(tp, gp, head_dim).astype(o_ref.dtype)
    lse_ref[...] = lse2.reshape(tp, gp)


def split_programs(splits: int) -> int:
    """Programs along the keys for `splits` shares: the next power of two (the merge kernel reads
    every split of a row as one block); the ones past `splits` get an empty share."""
    return 1 << max(0, (splits - 1).bit_length())


def decode(
    r: tiles.Refs,
    *,
    statics: AttentionStatics,
    config: DecodeConfig,
    block_k: int,
    page_size: int | None,
    splits: int,
    interpret: bool,
    static_seq: tuple[int, int, int, int],
) -> tuple[jax.Array, jax.Array]:
    """Prepared refs (see the module docstring) -> per-split `(out, lse2)`, `split_programs`
    of them."""
    batch, tp, num_kv_heads, gp, head_dim = r.q.shape
    if r.page_table is None:
        seq_k = r.k.shape[1]
        kv_spec = pl.BlockSpec((None, seq_k, None, head_dim), lambda s, b, h: (b, 0, h, 0))
        table_spec = None
    else:
        pool_rows = r.k.shape[0]
        kv_spec = pl.BlockSpec((pool_rows, None, head_dim), lambda s, b, h: (0, h, 0))
        table_spec = pl.BlockSpec((None, r.page_table.shape[1]), lambda s, b, h: (b, 0))
    specs = r.specs(
        q=pl.BlockSpec((None, tp, None, gp, head_dim), lambda s, b, h: (b, 0, h, 0, 0)),
        k=kv_spec,
        v=kv_spec,
        page_table=table_spec,
        **tiles.row_specs(r, row_of=lambda s, b, h: b),
    )
    out_specs = [
        pl.BlockSpec((None, None, tp, None, gp, head_dim), lambda s, b, h: (s, b, 0, h, 0, 0)),
        pl.BlockSpec((None, None, tp, None, gp), lambda s, b, h: (s, b, 0, h, 0)),
    ]
    # one split's output is the result: written in the query's dtype (no cast after the kernel)
    out_dtype = r.q.dtype if splits == 1 else jnp.float32
    programs = split_programs(splits)
    out_shape = [
        tiles.out_shape(r.q, (programs, batch, tp, num_kv_heads, gp, head_dim), out_dtype),
        tiles.out_shape(r.q, (programs, batch, tp, num_kv_heads, gp), jnp.float32),
    ]
    kernel = functools.partial(
        _decode_kernel,
        statics=statics,
        block_k=block_k,
        page_size=page_size,
        splits=splits,
        static_seq=static_seq,
    )
    return pl.pallas_call(
        kernel,
        grid=(programs, batch, num_kv_heads),
        in_specs=(specs,),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tiles.compiler_params(config),
        interpret=interpret,
        name="flashjax_decode",
    )(r)


def _merge_kernel(parts_ref, lse_ref, o_ref, lse_out_ref):
    """All splits of one (batch row, KV head) at once: `parts (Sp, Tp, Gp, Hp)`, each normalized
    over its keys, weighed by `2**lse2 (Sp, Tp, Gp)` against their max."""
    lse2 = lse_ref[...]
    m = jnp.max(lse2, axis=0)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)  # no split saw a key: weights 0, not NaN
    weights = jnp.exp2(lse2 - m_safe[None])
    total = jnp.sum(weights, axis=0)
    empty = total == 0.0
    norm = jnp.where(empty, 1.0, total)
    out = jnp.sum(weights[..., None] * parts_ref[...], axis=0) / norm[..., None]
    o_ref[...] = out.astype(o_ref.dtype)

    @pl.when(pl.program_id(2) == 0)  # one writer of the row's lse (its column blocks agree)
    def _():
        lse_out_ref[...] = jnp.where(empty, -jnp.inf, m_safe + jnp.log2(norm))


def merge_splits(
    parts: jax.Array, lse2: jax.Array, dtype, *, config: DecodeConfig, interpret: bool
) -> tuple[jax.Array, jax.Array]:
    """`decode`'s per-split `(out, lse2)` -> the attention over all keys: out `(B, Tp, K, Gp, Hp)`
    in `dtype` and base-2 lse2 `(B, Tp, K, Gp)` (-inf where no split saw a key), one program
    per (batch row, KV head, `config.merge_columns` head-dim columns)."""
    programs, batch, tp, num_kv_heads, gp, head_dim = parts.shape
    cols = min(config.merge_columns or head_dim, head_dim)
    return pl.pallas_call(
        _merge_kernel,
        grid=(batch, num_kv_heads, head_dim // cols),
        in_specs=[
            pl.BlockSpec((programs, None, tp, None, gp, cols), lambda b, h, c: (0, b, 0, h, 0, c)),
            pl.BlockSpec((programs, None, tp, None, gp), lambda b, h, c: (0, b, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, tp, None, gp, cols), lambda b, h, c: (b, 0, h, 0, c)),
            pl.BlockSpec((None, tp, None, gp), lambda b, h, c: (b, 0, h, 0)),
        ],
        out_shape=[
            tiles.out_shape(parts, parts.shape[1:], dtype),
            tiles.out_shape(parts, lse2.shape[1:], jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=config.merge_warps, num_stages=1),
        interpret=interpret,
        name="flashjax_decode_merge",
    )(parts, lse2)
