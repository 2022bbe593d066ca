"""Block-sparsity patterns: each `f(seq_len, block_size=(bq, bk), ...) -> BlockMask`.

Blocks are indexed `i` (query block) and `j` (key block), `n = ceil(seq_len / bq)` query blocks
and `m = ceil(seq_len / bk)` key blocks; every pattern keeps the blocks the diagonal crosses
(`i == j` when bq == bk), so no query is left with nothing to see. Built on the host with numpy:
the patterns are static.
"""

from __future__ import annotations

import numpy as np

from flashjax.block_mask import BlockMask, _block_size


def _grid(seq_len: int, block_size) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    bq, bk = _block_size(block_size)
    n, m = -(-seq_len // bq), -(-seq_len // bk)
    return np.arange(n)[:, None], np.arange(m)[None, :], (bq, bk)


def _mask(blocks: np.ndarray, i: np.ndarray, j: np.ndarray, size: tuple[int, int]) -> BlockMask:
    bq, bk = size
    diagonal = (j * bk < (i + 1) * bq) & ((j + 1) * bk > i * bq)  # blocks the diagonal crosses
    return BlockMask.from_blocks(np.asarray(blocks | diagonal, bool), size)


def local(seq_len: int, block_size=(128, 128), window: int = 1) -> BlockMask:
    """Banded: block (i, j) is kept iff `|i - j| <= window`."""
    i, j, size = _grid(seq_len, block_size)
    return _mask(np.abs(i - j) <= window, i, j, size)


def strided(seq_len: int, block_size=(128, 128), stride: int = 4) -> BlockMask:
    """Sparse Transformer's strided pattern: kept iff `(i - j) % stride == 0` (every stride-th
    block diagonal), plus the diagonal."""
    i, j, size = _grid(seq_len, block_size)
    return _mask((i - j) % stride == 0, i, j, size)


def fixed(seq_len: int, block_size=(128, 128), stride: int = 4, summary: int = 1) -> BlockMask:
    """Sparse Transformer's fixed pattern: kept iff `i // stride == j // stride` (same chunk of
    `stride` blocks) or `j % stride >= stride - summary` (the chunk's last `summary` blocks, which
    every query reads)."""
    i, j, size = _grid(seq_len, block_size)
    return _mask((i // stride == j // stride) | (j % stride >= stride - summary), i, j, size)


def butterfly(seq_len: int, block_size=(128, 128)) -> BlockMask:
    """The flat butterfly (Pixelated Butterfly; the FlashAttention paper's block-sparse pattern):
    kept iff `i == j` or `i XOR j` is a power of two, the union of the butterfly factors' supports.
    About `(log2 n + 1) / n` of the blocks."""
    i, j, size = _grid(seq_len, block_size)
    x = np.bitwise_xor(i, j)
    return _mask((x > 0) & (x & (x - 1) == 0), i, j, size)


def global_tokens(seq_len: int, block_size=(128, 128), num_global: int = 1) -> BlockMask:
    """Longformer-style global blocks: kept iff `i < num_global` or `j < num_global` (the first
    blocks attend to everything and are attended to by everything), plus the diagonal."""
    i, j, size = _grid(seq_len, block_size)
    return _mask((i < num_global) | (j < num_global), i, j, size)


def bigbird(
    seq_len: int,
    block_size=(128, 128),
    window: int = 1,
    num_global: int = 1,
    num_random: int = 2,
    seed: int = 0,
) -> BlockMask:
    """BigBird: `|i - j| <= window`, or a global block (`i < num_global` or `j < num_global`), or
    one of `num_random` key blocks drawn per query block (numpy, `seed`)."""
    i, j, size = _grid(seq_len, block_size)
    n, m = i.shape[0], j.shape[1]
    rng = np.random.default_rng(seed)
    rand = np.zeros((n, m), bool)
    for row in range(n):
        rand[row, rng.choice(m, size=min(num_random, m), replace=False)] = True
    keep = (np.abs(i - j) <= window) | (i < num_global) | (j < num_global) | rand
    return _mask(keep, i, j, size)


__all__ = ["local", "strided", "fixed", "butterfly", "global_tokens", "bigbird"]
