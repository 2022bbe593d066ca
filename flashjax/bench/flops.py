"""FLOP counts of attention, the way FlashAttention's papers count them.

Forward: two matmuls of `B * N * T * S * H` multiply-adds each, so `4 * B * N * T * S * H`, scaled
by the fraction of (query, key) pairs that are visible. Backward: 2.5x the forward (five matmuls
against two; the recomputation of the scores is not counted as useful work). Forward+backward:
3.5x the forward.

Causal attention counts exactly half (the papers' convention, which ANCHORS.md uses too); a
sliding window counts its visible pairs exactly.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Mode = Literal["fwd", "bwd", "fwd+bwd"]
MODES: tuple[Mode, ...] = ("fwd", "bwd", "fwd+bwd")
MODE_FACTORS: dict[str, float] = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

Window = tuple[int, int]


def normalize_window(window: int | tuple[int, int] | None, causal: bool) -> Window | None:
    """`(left, right)` offsets a query sees, as `flashjax.dot_product_attention` reads them.

    An int w means (w, w); with `causal` the right side is capped at 0. None means no window.
    """
    if window is None:
        return None
    left, right = (window, window) if isinstance(window, int) else window
    if left < 0 or right < 0:
        raise ValueError(f"window sides must be >= 0, got {window!r}")
    return (left, min(right, 0) if causal else right)


def visible_pairs(
    seq_q: int, seq_k: int, causal: bool = False, window: int | tuple[int, int] | None = None
) -> int:
    """The exact number of (query i, key j) pairs with j visible to i (top-left aligned, as jax.nn).

    Query i sees keys `max(0, i - left) .. min(S - 1, i + right)`; causal means right = 0 and an
    unbounded left.
    """
    w = normalize_window(window, causal)
    if w is None:
        if not causal:
            return seq_q * seq_k
        w = (seq_k, 0)
    left, right = w
    i = np.arange(seq_q, dtype=np.int64)
    lo = np.maximum(0, i - left)
    hi = np.minimum(seq_k - 1, i + right)
    return int(np.clip(hi - lo + 1, 0, None).sum())


def visible_fraction(
    seq_q: int, seq_k: int, causal: bool = False, window: int | tuple[int, int] | None = None
) -> float:
    """The fraction of the `T x S` score matrix that is computed usefully.

    1 for full attention, exactly 0.5 for causal without a window (the convention of
    FlashAttention's papers and of ANCHORS.md, so that numbers compare), and the exact count of
    visible pairs divided by `T * S` when a window is given.
    """
    if window is None:
        return 0.5 if causal else 1.0
    return visible_pairs(seq_q, seq_k, causal, window) / (seq_q * seq_k)


def attention_flops(
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    *,
    causal: bool = False,
    window: int | tuple[int, int] | None = None,
    mode: str = "fwd",
) -> float:
    """FLOPs of one attention call: `4 * B * N * T * S * H * visible fraction * mode factor`.

    `mode` is "fwd" (x1), "bwd" (x2.5) or "fwd+bwd" (x3.5).
    """
    if mode not in MODE_FACTORS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dense = 4.0 * batch * heads * seq_q * seq_k * head_dim
    return dense * visible_fraction(seq_q, seq_k, causal, window) * MODE_FACTORS[mode]
