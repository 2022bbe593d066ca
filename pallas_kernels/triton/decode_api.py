"""Host side of the decode kernel: plan the tiles and splits, pack the queries, launch.

`forward(ops)` returns the attention in the query's `(B, T, K, G, H)` layout and its base-2
logsumexp: one kernel when the plan runs one split, else the split kernel and the merge kernel
(`decode.merge_splits`; `forward_parts`: the split kernel's partials alone). Nothing here
copies an operand whose shapes already fit: the query is read in place (a `(B, T, K, G, H)`
view) unless T, G or H is not a power of two, a contiguous cache is padded only when its length
is not a multiple of 16, either cache only when its head dim is not a power of two.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import configs
from pallas_kernels.host import pad_axis
from pallas_kernels.operands import Operands
from pallas_kernels.triton import decode as _decode
from pallas_kernels.triton.tiles import Refs


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The launch of one call.

    Attributes:
      config: the config table's entry, its stages cut to fit shared memory.
      queries, group: T and G padded to powers of two (the query tile of a program is
        `queries x group` rows: T x G, padded).
      block_k: keys per step.
      splits: programs per (batch row, KV head) along the keys.
      key_blocks: blocks of `block_k` keys covering the cache's capacity.
      head_dim: the padded head dim.
      interpret: run in interpret mode (CPU).
    """

    config: configs.DecodeConfig
    queries: int
    group: int
    block_k: int
    splits: int
    key_blocks: int
    head_dim: int
    interpret: bool


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dividing_block(block: int, length: int) -> int:
    """The largest power of two <= `block` (and not above the length's) that divides `length`,
    at least `configs.MIN_BLOCK` (the length is padded when even that does not divide it)."""
    b = configs.fit_block(block, length)
    while b > configs.MIN_BLOCK and length % b:
        b //= 2
    return b


def plan(
    ops: Operands,
    num_splits: int | None = None,
    target: str | None = None,
    config: configs.DecodeConfig | None = None,
) -> DecodePlan:
    """Fit the config of `target` (default: the current device; `config`: another, for a tile
    sweep) to a call; `num_splits` None lets `configs.decode_splits` choose from the batch, KV
    heads, capacity and core count."""
    target = target or configs.gpu_target()
    config = config or configs.get_decode_config(ops.head_dim, target)
    paged = ops.page_table is not None
    if paged:  # pages and blocks are powers of two: one divides the other
        block_k = configs.fit_block(config.paged_block_k, ops.seq_k)
    else:
        block_k = _dividing_block(config.block_k, ops.seq_k)
    key_blocks = -(-ops.seq_k // block_k)
    if num_splits is None:
        cores = configs.core_count() if target != "interpret" else configs.INTERPRET_CORES
        programs = ops.batch * ops.num_kv_heads
        num_splits = configs.decode_splits(programs, key_blocks, cores, config, paged)
    if num_splits == 1 and not paged and config.unsplit_block_k:
        block_k = _dividing_block(config.unsplit_block_k, ops.seq_k)
        key_blocks = -(-ops.seq_k // block_k)
    head_dim = configs.head_dim_bucket(ops.head_dim)
    stages = configs.decode_stages(config, block_k, head_dim, ops.q.dtype.itemsize)
    return DecodePlan(
        config=dataclasses.replace(config, num_stages=stages),
        queries=_next_pow2(ops.seq_q),
        group=_next_pow2(ops.group),
        block_k=block_k,
        splits=num_splits,
        key_blocks=key_blocks,
        head_dim=head_dim,
        interpret=target == "interpret",
    )


def padded_rows(seq_q: int, group: int) -> int:
    """Query rows of one decode program: T x G, each padded to a power of two."""
    return _next_pow2(seq_q) * _next_pow2(group)


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------


def _page_table(ops: Operands, p: DecodePlan) -> jax.Array:
    """The page table as int32, padded so that every key block's pages exist (the kernel clips
    the ids: no pass over the table before it)."""
    pages_needed = -(-p.key_blocks * p.block_k // ops.page_size)
    table = ops.page_table.astype(jnp.int32)
    return pad_axis(table, 1, max(pages_needed, table.shape[1]))


def _refs(ops: Operands, p: DecodePlan) -> Refs:
    b, t, _, h = ops.q.shape
    q = pad_axis(ops.q, 1, p.queries).reshape(b, p.queries, ops.num_kv_heads, ops.group, h)
    q = pad_axis(pad_axis(q, 3, p.group), 4, p.head_dim)
    if ops.page_table is None:
        k, v = (
            pad_axis(pad_axis(x, 1, p.key_blocks * p.block_k), 3, p.head_dim)
            for x in (ops.k, ops.v)
        )
        table = None
    else:
        k, v = (pad_axis(x, 3, p.head_dim) for x in (ops.k, ops.v))
        k, v = (x.reshape(-1, *x.shape[2:]) for x in (k, v))  # pools as rows of keys
        table = _page_table(ops, p)
    return Refs(q=q, k=k, v=v, seq=_seq(ops), page_table=table)


def _seq(ops: Operands) -> jax.Array | None:
    """What the kernel reads of the sequence info: the key lengths alone when they carry it all
    (a decode step of `flashjax.decode_attention`: nothing computed in XLA before the kernel),
    else `seq_info`'s rows, or nothing (the static `(0, 0, T, S)`)."""
    lengths = ops.seq_lengths()
    if lengths is not None:
        return lengths
    return ops.seq_info() if ops.has_seq_info else None


def forward_parts(
    ops: Operands,
    num_splits: int | None = None,
    target: str | None = None,
    config: configs.DecodeConfig | None = None,
) -> tuple[jax.Array, jax.Array, DecodePlan]:
    """The split kernel's partial results, padded: `out (Sp, B, Tp, K, Gp, Hp)`, normalized over
    each split's keys (float32; the query's dtype when there is one split), base-2
    `lse2 (Sp, B, Tp, K, Gp)` float32 (-inf where a split saw no key), and the plan."""
    p = plan(ops, num_splits, target, config)
    out, lse2 = _decode.decode(
        _refs(ops, p),
        statics=ops.statics,
        config=p.config,
        block_k=p.block_k,
        page_size=None if ops.page_table is None else ops.page_size,
        splits=p.splits,
        interpret=p.interpret,
        static_seq=(0, 0, ops.seq_q, ops.seq_k),
    )
    return out, lse2, p


def forward(
    ops: Operands,
    num_splits: int | None = None,
    target: str | None = None,
    config: configs.DecodeConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`out (B, T, K, G, H)` in the query's dtype and base-2 `lse2 (B, T, K, G)` float32 (-inf for
    a row that sees no key): the split kernel, and the merge kernel when it ran several splits."""
    out, lse2, p = forward_parts(ops, num_splits, target, config)
    if p.splits == 1:
        out, lse2 = out[0], lse2[0]
    else:
        out, lse2 = _decode.merge_splits(
            out, lse2, ops.q.dtype, config=p.config, interpret=p.interpret
        )
    t, g = ops.seq_q, ops.group
    return out[:, :t, :, :g, : ops.head_dim], lse2[:, :t, :, :g]
