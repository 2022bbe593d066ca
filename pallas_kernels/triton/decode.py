"""Split-KV decoding (Flash-Decoding) on Pallas' Triton lowering: few queries, a long KV cache.

The training forward runs one program per (query tile, batch row, query head): with one new token
per row it launches B x N programs that each read a whole K/V head (G times over for GQA) and
leaves most of the GPU idle. This kernel instead:

- packs the queries of a KV head (GQA packing): a program takes all T x G query rows of one KV
  head (row r = t * G + g, padded to a power of two >= 16 for the tile matmul), so each K/V byte
  it reads serves every query head of the group, once;
- splits the keys: grid (split, batch row, KV head). The key blocks the program's rows see
  (`visibility.block_range`) are cut into `splits` near-equal shares at run time
  (`visibility.share_range`); each program walks its share with the online softmax and writes a
  partial output, normalized over its keys, and its base-2 logsumexp. The host merges the splits
  with the one `(out, lse)` merge (flashjax.merge).

Refs (`tiles.Refs`, prepared by `decode_api.py`):
  q           (B, K, R, Hp)   packed query rows
  k, v        (B, Sp, K, Hp)  contiguous cache, Sp a multiple of block_k; or page pools
              flattened to rows (num_pages * page_size, K, Hp) (page p's keys are rows
              p * page_size ...), with
  page_table  (B, Pp) int32   page ids (clipped in the kernel), padded so that every key
                              block's pages exist
  seq         (B, 4) int32 (`Operands.seq_info`), or None: the static (0, 0, T, S)
Outputs: out (splits, B, K, R, Hp) float32 and lse2 (splits, B, K, R) float32; a split that saw
no key has out 0 and lse2 -inf.

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

from pallas_kernels import common, visibility
from pallas_kernels.configs import DecodeConfig
from pallas_kernels.operands import AttentionStatics
from pallas_kernels.triton import tiles


def _key_block(
    r: tiles.Refs, kb: jax.Array, block_k: int, page_size: int | None
) -> tuple[jax.Array, jax.Array]:
    """The `(block_k, Hp)` K and V tiles of key block `kb`: a slice of the contiguous cache; with
    pages (the pools flattened to rows, `page_size` keys a page; page ids are clipped into the
    pool here, as entries past a row's length may hold anything) a slice of one page (pages of
    `block_k` keys or more), or the block's rows gathered from several pages (one 2-D gather; a
    gather of whole pages reshaped to a tile made paged caches 1.5-2.2x slower on the H200)."""
    if page_size is None:
        keys = pl.ds(kb * block_k, block_k)
        return r.k[keys, :], r.v[keys, :]
    last_page = r.k.shape[0] // page_size - 1
    if page_size >= block_k:
        per_page = page_size // block_k
        page = jnp.clip(r.page_table[lax.div(kb, per_page)], 0, last_page)
        start = page * page_size + lax.rem(kb, per_page) * block_k
        keys = pl.ds(pl.multiple_of(start, block_k), block_k)
        return r.k[keys, :], r.v[keys, :]
    j = jnp.arange(block_k, dtype=jnp.int32)
    pages = jnp.clip(r.page_table[kb * (block_k // page_size) + j // page_size], 0, last_page)
    rows = pages * page_size + j % page_size
    return r.k[rows, :], r.v[rows, :]


def _decode_kernel(
    r: tiles.Refs,
    o_ref,
    lse_ref,
    *,
    statics: AttentionStatics,
    group: int,
    block_k: int,
    page_size: int | None,
    splits: int,
    static_seq: tuple[int, int, int, int],
):
    rows, head_dim = r.q.shape
    split, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seq = tiles.seq_of(r, static_seq)
    queries = jnp.arange(rows, dtype=jnp.int32) // group  # the new token of each packed row
    q = r.q[...]

    def body(kb, carry, *, masked: bool):
        acc, m, l = carry
        cols = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
        k, v = _key_block(r, kb, block_k, page_size)
        mask = None
        if masked:
            mask = tiles.tile_mask(statics, queries, cols, seq, None, None, b, kh)
            k, v = tiles.zero_past(k, cols, seq[3]), tiles.zero_past(v, cols, seq[3])
        s2, _ = common.scores(tiles.dot(q, k, trans_b=True), statics.scale, statics, None, mask)
        p, m, l, alpha = common.online_softmax_step(s2, m, l)
        acc = acc * alpha[:, None] + tiles.dot(p.astype(v.dtype), v)
        return acc, m, l

    seen = visibility.block_range(statics, 0, static_seq[2], block_k, seq)
    carry = tiles.walk(
        body,
        common.online_softmax_start(rows, head_dim),
        ranges=visibility.share_range(seen, split, splits),
    )
    out, lse2 = common.finalize(*carry)
    o_ref[...] = out
    lse_ref[...] = lse2


def decode(
    r: tiles.Refs,
    *,
    statics: AttentionStatics,
    config: DecodeConfig,
    block_k: int,
    page_size: int | None,
    splits: int,
    group: int,
    interpret: bool,
    static_seq: tuple[int, int, int, int],
) -> tuple[jax.Array, jax.Array]:
    """Prepared refs (see the module docstring) -> per-split `(out, lse2)`."""
    batch, num_kv_heads, rows, head_dim = r.q.shape
    if r.page_table is None:
        seq_k = r.k.shape[1]
        kv_spec = pl.BlockSpec((None, seq_k, None, head_dim), lambda s, b, h: (b, 0, h, 0))
        table_spec = None
    else:
        pool_rows = r.k.shape[0]
        kv_spec = pl.BlockSpec((pool_rows, None, head_dim), lambda s, b, h: (0, h, 0))
        table_spec = pl.BlockSpec((None, r.page_table.shape[1]), lambda s, b, h: (b, 0))
    specs = r.specs(
        q=pl.BlockSpec((None, None, rows, head_dim), lambda s, b, h: (b, h, 0, 0)),
        k=kv_spec,
        v=kv_spec,
        page_table=table_spec,
        **tiles.row_specs(r, row_of=lambda s, b, h: b),
    )
    out_specs = [
        pl.BlockSpec((None, None, None, rows, head_dim), lambda s, b, h: (s, b, h, 0, 0)),
        pl.BlockSpec((None, None, None, rows), lambda s, b, h: (s, b, h, 0)),
    ]
    out_shape = [
        tiles.out_shape(r.q, (splits, batch, num_kv_heads, rows, head_dim), jnp.float32),
        tiles.out_shape(r.q, (splits, batch, num_kv_heads, rows), jnp.float32),
    ]
    kernel = functools.partial(
        _decode_kernel,
        statics=statics,
        group=group,
        block_k=block_k,
        page_size=page_size,
        splits=splits,
        static_seq=static_seq,
    )
    return pl.pallas_call(
        kernel,
        grid=(splits, batch, num_kv_heads),
        in_specs=(specs,),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tiles.compiler_params(config),
        interpret=interpret,
        name="flashjax_decode",
    )(r)
