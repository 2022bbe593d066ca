"""The one operand record every implementation takes, and the static meaning of a call.

`flashjax.dot_product_attention` validates the user's arguments and builds one `Operands`; the
registry hands it whole to a backend, which hands it whole to its kernels. A new operand is one
new field here (and its use where it matters), never a new positional argument in twenty
signatures.

Shapes (B batch, T queries, S keys, N query heads, K key/value heads, H head dim):
  q (B, T, N, H); k, v (B, S, K, H), N a multiple of K; one float dtype.
  bias (Bb, Nb, Tb, Sb) float32 (float64 with float64 inputs), each axis 1 or full; -inf hides.
  q_segments (B, T), kv_segments (B, S) int32: query i and key j interact iff their ids are equal.
  q_lengths, kv_lengths (B,) int32: rows / keys at or past the length are invisible (a length
    past the sequence is the sequence's).
  q_offsets, kv_offsets (B,) int32: the position of row 0 / key 0 (query row i sits at position
    q_offsets[b] + i); causal and window compare positions, so a shard of a longer sequence or the
    tail of a KV cache is exact.
  block_states (Bm, Nm, Tm, Sm) int8, the block mask summarized per mask block (0 empty, 1 partial,
    2 full), Bm in {1, B}, Nm in {1, N}; its block size and element rule are static.
  seeds (2,) uint32, when dropout is on.
  scale () float, only when the scale is traced (a learnable temperature); else static.
  page_table (B, P) int32, a paged KV cache (vLLM / FlashInfer layout): k, v are then page pools
    (num_pages, page_size, K, H), and key j of batch row b is slot j % page_size of page
    page_table[b, j // page_size] (S = P * page_size). Only `flashjax.decode_attention` builds
    it; a backend without `Backend.pages` gets `gather_pages(ops)`, the contiguous copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# A block mask's element rule: mask_fn(batch, head, q_index, kv_index) -> bool, on broadcast int32
# arrays (PyTorch FlexAttention's mask_mod). None: the block states themselves are the mask.
MaskFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

EMPTY, PARTIAL, FULL = 0, 1, 2  # block states, ordered: the state of an AND is the minimum


@dataclasses.dataclass(frozen=True)
class AttentionStatics:
    """What the user asked for that is static (traced away at compile time).

    Attributes:
      scale: multiplier of `q . k`, or None when the scale is a traced operand (`Operands.scale`).
      window: `(left, right)`, each an int >= 0 or None (unbounded): query at position p sees keys
        at positions p - left .. p + right. Causal is right = 0.
      softcap: `c` in `c * tanh(logits / c)`, or None.
      dropout_rate: probability of dropping an attention weight, in [0, 1).
      dropout_broadcast: same dropout mask for every batch element and head (Flax's default).
      mask_block: `(bq, bk)` of the block mask, or None without one.
      mask_fn: the block mask's element rule (see `MaskFn`), or None.
      queries_at_end: the queries are the last T positions of each row's keys (a decode step's
        new tokens): query row i sits at position `kv_lengths[b] - T + i`, so `Operands.q_offsets`
        is None and `kv_lengths` (its only sequence info) carries both. A kernel can then read
        the lengths alone, with nothing computed from them in XLA first (`Operands.seq_lengths`).
      deterministic: the user asked for gradients bitwise identical run to run: a backend whose
        backward accumulates in an order that varies between runs (atomic adds, a GPU
        scatter-add) must decline the call in its `unsupported` check. Every backward today is
        deterministic (the two-kernel backward: dK/dV over key tiles, dQ over query tiles, no
        atomics), so none declines; the kernels never read it.
    """

    scale: float | None
    window: tuple[int | None, int | None] = (None, None)
    softcap: float | None = None
    dropout_rate: float = 0.0
    dropout_broadcast: bool = False
    mask_block: tuple[int, int] | None = None
    mask_fn: MaskFn | None = None
    queries_at_end: bool = False
    deterministic: bool = False

    @property
    def has_dropout(self) -> bool:
        return self.dropout_rate > 0.0


@dataclasses.dataclass(frozen=True)
class Operands:
    """The normalized operands of one call (a pytree: arrays are leaves, `statics` is static)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    statics: AttentionStatics
    bias: jax.Array | None = None
    q_segments: jax.Array | None = None
    kv_segments: jax.Array | None = None
    q_lengths: jax.Array | None = None
    kv_lengths: jax.Array | None = None
    q_offsets: jax.Array | None = None
    kv_offsets: jax.Array | None = None
    block_states: jax.Array | None = None
    seeds: jax.Array | None = None
    scale: jax.Array | None = None
    page_table: jax.Array | None = None

    # Shapes, read off the arrays.
    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def seq_q(self) -> int:
        return self.q.shape[1]

    @property
    def seq_k(self) -> int:
        if self.page_table is not None:
            return self.page_table.shape[1] * self.page_size
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        """Keys per page of a paged cache (the pools' axis 1)."""
        if self.page_table is None:
            raise ValueError("a contiguous cache has no pages")
        return self.k.shape[1]

    @property
    def num_heads(self) -> int:
        return self.q.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def has_segments(self) -> bool:
        return self.q_segments is not None

    @property
    def has_block_mask(self) -> bool:
        return self.block_states is not None

    @property
    def has_seq_info(self) -> bool:
        """Whether the call has lengths or offsets (else every kernel may take the static
        `(0, 0, T, S)` and keep compile-time loop bounds)."""
        fields = (self.q_offsets, self.kv_offsets, self.q_lengths, self.kv_lengths)
        return self.statics.queries_at_end or any(x is not None for x in fields)

    def replace(self, **changes) -> Operands:
        return dataclasses.replace(self, **changes)

    def scale_value(self) -> float | jax.Array:
        """The scale: the static float, or the traced operand."""
        return self.statics.scale if self.scale is None else self.scale

    def seq_info(self) -> jax.Array:
        """`(B, 4)` int32 rows `[q_offset, kv_offset, q_length, kv_length]`, defaults filled in
        (offsets 0, lengths T and S; with `statics.queries_at_end` the query offset is the key
        length minus T): what a kernel reads per batch row."""
        b = self.batch

        def col(x, default):
            return jnp.full((b,), default, jnp.int32) if x is None else x.astype(jnp.int32)

        kv_len = jnp.clip(col(self.kv_lengths, self.seq_k), 0, self.seq_k)
        q_off = kv_len - self.seq_q if self.statics.queries_at_end else col(self.q_offsets, 0)
        return jnp.stack(
            [q_off, col(self.kv_offsets, 0), col(self.q_lengths, self.seq_q), kv_len], axis=1
        )

    def seq_lengths(self) -> jax.Array | None:
        """The key lengths `(B, 1)` int32 alone, when they are the call's whole sequence info
        (`statics.queries_at_end` and nothing else): a kernel derives the rest of `seq_info`'s
        row from them (`tiles.seq_of`), and no XLA op runs before it. None otherwise."""
        others = (self.q_offsets, self.kv_offsets, self.q_lengths)
        if not self.statics.queries_at_end or self.kv_lengths is None:
            return None
        if any(x is not None for x in others):
            return None
        return self.kv_lengths.astype(jnp.int32).reshape(self.batch, 1)


def valid_pages(ops: Operands) -> jax.Array:
    """The page table `(B, P)` int32 with every entry clipped to a valid page id: entries past a
    row's length may hold anything (-1, stale ids); the keys they give are never visible."""
    return jnp.clip(ops.page_table.astype(jnp.int32), 0, ops.k.shape[0] - 1)


def gather_pages(ops: Operands) -> Operands:
    """`ops` with a paged cache copied into contiguous k, v `(B, P * page_size, K, H)` (what the
    backends without a paged kernel read); `ops` itself when its cache is contiguous."""
    if ops.page_table is None:
        return ops
    table = valid_pages(ops)

    def gather(pool: jax.Array) -> jax.Array:
        pages = pool[table]  # (B, P, page_size, K, H)
        return pages.reshape(table.shape[0], -1, *pool.shape[2:])

    return ops.replace(k=gather(ops.k), v=gather(ops.v), page_table=None)


def scatter_pages(ops: Operands, grad: jax.Array) -> jax.Array:
    """The gradient of a page pool from the gradient `(B, S, K, H)` of `gather_pages`' copy:
    summed into each page (a page shared by two rows gets both contributions)."""
    table = valid_pages(ops)
    per_page = grad.reshape(*table.shape, ops.page_size, *grad.shape[2:])
    return jnp.zeros_like(ops.k, grad.dtype).at[table].add(per_page)


_DATA_FIELDS = [f.name for f in dataclasses.fields(Operands) if f.name != "statics"]
jax.tree_util.register_dataclass(Operands, data_fields=_DATA_FIELDS, meta_fields=["statics"])


# Where a call's K and V may be read in place (a ring's travelling K/V): a stacked
# `(2, B, S, K, H)` buffer and the row of the call's key 0 in it; `ops.k` and `ops.v` are
# buffer[0] and buffer[1] from that row on (`Backend.forward_in_place`).
KvSource = tuple[jax.Array, int]


def cotangent(ops: Operands, **grads: jax.Array | None) -> Operands:
    """The cotangent of `ops` for a custom_vjp backward: `grads` for the float operands named
    (q, k, v, bias, scale), float0 zeros for the integer ones, None where `ops` has None."""

    def zero(x):
        if x is None:
            return None
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros(x.shape, x.dtype)
        return np.zeros(x.shape, jax.dtypes.float0)

    fields = {name: zero(getattr(ops, name)) for name in _DATA_FIELDS}
    for name, g in grads.items():
        if getattr(ops, name) is not None:
            fields[name] = g
    return Operands(statics=ops.statics, **fields)
