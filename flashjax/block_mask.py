"""`BlockMask`: block-sparse attention (FlashAttention, section 3.3).

A block mask cuts the (T, S) score matrix into `(bq, bk)` blocks and says which blocks exist.
Attention then computes only the non-empty blocks, in the forward and the backward, so time scales
with the fraction of blocks kept. Two ways to build one:

- `BlockMask.from_blocks(blocks, block_size)`: the paper's block mask. Element (i, j) is visible
  iff `blocks[..., i // bq, j // bk]`.
- `BlockMask.from_mask_fn(mask_fn, q_len, kv_len, block_size=...)`: an element rule
  `mask_fn(b, h, q_idx, kv_idx) -> bool` (PyTorch FlexAttention's `mask_mod`). Blocks are
  classified once into empty / full / partial; partial blocks evaluate `mask_fn` per element inside
  the kernel, so no dense `T x S` mask is ever stored.

The mask is ANDed with every other rule of the call (causal, window, lengths, segments, mask,
bias). Its block size is independent of the kernels' tiles: block sizes are multiples of 16, and
every implementation tiles at a power of two that divides them (a 128-block mask runs the kernels'
own 128 / 64 tiles; a 48-block mask runs 16-wide tiles, correct but slower).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.operands import EMPTY, FULL, PARTIAL, MaskFn

BLOCK_MULTIPLE = 16


def _block_size(block_size) -> tuple[int, int]:
    if isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool):
        block_size = (int(block_size), int(block_size))
    ok = (
        isinstance(block_size, (tuple, list))
        and len(block_size) == 2
        and all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0
            for b in block_size
        )
    )
    if not ok or any(int(b) % BLOCK_MULTIPLE for b in block_size):
        raise ValueError(
            f"block_size must be an int or a (bq, bk) pair of positive multiples of "
            f"{BLOCK_MULTIPLE}, got {block_size!r}"
        )
    return int(block_size[0]), int(block_size[1])


@dataclasses.dataclass(frozen=True, eq=False)  # compared (and hashed) by identity
class BlockMask:
    """Which `(bq, bk)` blocks of the score matrix exist (a pytree; `states` is its leaf).

    Attributes:
      states: `Int8[Array, "Bm Nm Tb Sb"]`, Bm in {1, B}, Nm in {1, N}: 0 empty (skipped), 1
        partial (`mask_fn` decides per element), 2 full.
      block_size: `(bq, bk)`.
      mask_fn: the element rule, or None when the blocks are the mask.
      q_len, kv_len: the lengths `from_mask_fn` classified for (None for `from_blocks`: any T, S
        with the same block counts).
    """

    states: jax.Array
    block_size: tuple[int, int]
    mask_fn: MaskFn | None = None
    q_len: int | None = None
    kv_len: int | None = None

    @classmethod
    def from_blocks(cls, blocks, block_size: int | tuple[int, int]) -> BlockMask:
        """From a bool block array `(Tb, Sb)` or broadcastable `(B, N, Tb, Sb)` (rank 2 to 4)."""
        bq, bk = _block_size(block_size)
        if not hasattr(blocks, "shape") or not hasattr(blocks, "dtype"):
            raise TypeError(f"blocks must be a bool array, got {type(blocks).__name__}")
        if jnp.dtype(blocks.dtype) != jnp.bool_:
            raise TypeError(f"blocks must be a bool array, got dtype {blocks.dtype}")
        if not 2 <= blocks.ndim <= 4:
            raise ValueError(
                f"blocks must have shape (Tb, Sb) .. (B, N, Tb, Sb), got {blocks.shape}"
            )
        blocks = jnp.asarray(blocks).reshape((1,) * (4 - blocks.ndim) + tuple(blocks.shape))
        states = jnp.where(blocks, FULL, EMPTY).astype(jnp.int8)
        return cls(states, (bq, bk))

    @classmethod
    def from_mask_fn(
        cls,
        mask_fn: MaskFn,
        q_len: int,
        kv_len: int,
        *,
        block_size: int | tuple[int, int] = (128, 128),
        batch: int | None = None,
        heads: int | None = None,
    ) -> BlockMask:
        """Classify the blocks of `mask_fn(b, h, q_idx, kv_idx) -> bool` over a `(q_len, kv_len)`
        score matrix, one block row at a time. `mask_fn` gets broadcasting int32 arrays and must
        be traceable jnp on them alone (close over Python numbers, not arrays); pass `batch` /
        `heads` when it depends on `b` / `h` (else it is called with 0 for them)."""
        bq, bk = _block_size(block_size)
        if not callable(mask_fn):
            raise TypeError(f"mask_fn must be callable, got {type(mask_fn).__name__}")
        for name, n in (("q_len", q_len), ("kv_len", kv_len)):
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        for name, n in (("batch", batch), ("heads", heads)):
            if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
                raise ValueError(f"{name} must be a positive int or None, got {n!r}")
        nb, nh = batch or 1, heads or 1
        tb, sb = -(-q_len // bq), -(-kv_len // bk)
        b = jnp.arange(nb, dtype=jnp.int32)[:, None, None, None]
        h = jnp.arange(nh, dtype=jnp.int32)[None, :, None, None]
        cols = jnp.arange(sb * bk, dtype=jnp.int32)[None, None, None, :]

        def block_row(qb):
            rows = qb * bq + jnp.arange(bq, dtype=jnp.int32)[None, None, :, None]
            real = (rows < q_len) & (cols < kv_len)
            m = jnp.broadcast_to(mask_fn(b, h, rows, cols), (nb, nh, bq, sb * bk))
            m = m.reshape(nb, nh, bq, sb, bk)
            real = jnp.broadcast_to(real, (nb, nh, bq, sb * bk)).reshape(m.shape)
            some = jnp.any(m & real, axis=(2, 4))
            every = jnp.all(m | ~real, axis=(2, 4))  # positions past the lengths do not count
            return jnp.where(every, FULL, jnp.where(some, PARTIAL, EMPTY)).astype(jnp.int8)

        states = lax.map(block_row, jnp.arange(tb, dtype=jnp.int32))  # (Tb, nb, nh, Sb)
        return cls(jnp.moveaxis(states, 0, 2), (bq, bk), mask_fn, int(q_len), int(kv_len))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.states.shape)

    @property
    def density(self) -> jax.Array:
        """The fraction of blocks that are not empty."""
        return jnp.mean(self.states != EMPTY)

    def to_dense(self, q_len: int | None = None, kv_len: int | None = None) -> jax.Array:
        """The element mask, bool, `(Bm, Nm, q_len, kv_len)`: broadcastable to `(B, N, T, S)`.

        Lengths default to the ones the mask was built for (`from_blocks`: the blocks' extent).
        """
        bq, bk = self.block_size
        tb, sb = self.states.shape[2:]
        q_len = q_len or self.q_len or tb * bq
        kv_len = kv_len or self.kv_len or sb * bk
        rows = jnp.arange(q_len, dtype=jnp.int32)[:, None]
        cols = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
        if self.mask_fn is None:
            return self.states[:, :, rows // bq, cols // bk] != EMPTY
        nb, nh = self.states.shape[:2]
        b = jnp.arange(nb, dtype=jnp.int32)[:, None, None, None]
        h = jnp.arange(nh, dtype=jnp.int32)[None, :, None, None]
        return jnp.broadcast_to(self.mask_fn(b, h, rows, cols), (nb, nh, q_len, kv_len))

    def check_call(self, batch: int, heads: int, seq_q: int, seq_k: int) -> None:
        """Raise (naming `block_mask`) unless this mask fits a call of these shapes."""
        bq, bk = self.block_size
        bm, nm, tb, sb = self.states.shape
        want = (-(-seq_q // bq), -(-seq_k // bk))
        if (tb, sb) != want:
            raise ValueError(
                f"block_mask has {tb} x {sb} blocks of {bq} x {bk}, but T={seq_q}, S={seq_k} need "
                f"{want[0]} x {want[1]}"
            )
        if self.q_len is not None and (self.q_len, self.kv_len) != (seq_q, seq_k):
            raise ValueError(
                f"block_mask was built for q_len={self.q_len}, kv_len={self.kv_len}; the call has "
                f"T={seq_q}, S={seq_k}"
            )
        if bm not in (1, batch) or nm not in (1, heads):
            raise ValueError(
                f"block_mask states {self.states.shape} must be broadcastable to (B, N, Tb, Sb) = "
                f"({batch}, {heads}, {tb}, {sb})"
            )
        if jnp.dtype(self.states.dtype) != jnp.int8:
            raise TypeError(f"block_mask states must be int8, got {self.states.dtype}")


jax.tree_util.register_dataclass(
    BlockMask, data_fields=["states"], meta_fields=["block_size", "mask_fn", "q_len", "kv_len"]
)
