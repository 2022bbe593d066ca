"""The block patterns of `--sparsity` (see flashjax.bench.sparsity): `Pattern`, one pattern at one
sequence length, and the butterfly and random ones; shared by the runner (`sparsity`) and the
backends (`sparsity_backends`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from flashjax import block_masks
from flashjax.block_mask import BlockMask


@dataclasses.dataclass(frozen=True)
class Pattern:
    """One block pattern at one sequence length (`mask` None: dense attention)."""

    name: str  # "dense", "butterfly", "random"
    block: int
    mask: BlockMask | None = None
    blocks: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    target: float | None = None  # the requested block density (random patterns)

    @property
    def label(self) -> str:
        return self.name if self.target is None else f"{self.name}-{self.target:.0%}"

    @property
    def block_density(self) -> float:
        """The fraction of blocks kept (1 for dense)."""
        return 1.0 if self.blocks is None else float(self.blocks.mean())


def random_blocks(n: int, density: float, seed: int) -> np.ndarray:
    """`(n, n)` bool: the diagonal, then off-diagonal blocks drawn uniformly without replacement
    (numpy, `seed`) until `round(density * n * n)` blocks are kept (at least the diagonal)."""
    keep = np.eye(n, dtype=bool)
    extra = max(0, round(density * n * n) - n)
    off = np.flatnonzero(~keep)
    chosen = np.random.default_rng(seed).choice(off, size=min(extra, off.size), replace=False)
    keep.flat[chosen] = True
    return keep


def from_blocks(name: str, blocks: np.ndarray, block: int, target: float | None) -> Pattern:
    """A pattern that keeps the `(n, n)` bool `blocks` of `block` x `block` tiles."""
    return Pattern(name, block, BlockMask.from_blocks(blocks, block), blocks, target)


def butterfly(seq: int, block: int) -> Pattern:
    """The flat butterfly pattern (`flashjax.block_masks.butterfly`)."""
    mask = block_masks.butterfly(seq, block_size=block)
    return Pattern("butterfly", block, mask, np.asarray(mask.states[0, 0]) != 0)
