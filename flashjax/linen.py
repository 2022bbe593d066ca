"""`flashjax.linen.MultiHeadDotProductAttention`: Flax linen's class with flashjax attention.

    from flashjax import linen as flinen
    layer = flinen.MultiHeadDotProductAttention(num_heads=8, is_causal=True)

Same fields (plus `is_causal`, `implementation`, `block_mask` and `deterministic_grads`), same
`__call__`, same parameter tree and the same auto-generated name as
`flax.linen.MultiHeadDotProductAttention`, so checkpoints load unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import linen as nn

from flashjax.attention import Implementation
from flashjax.block_mask import BlockMask
from flashjax.flax_attention import decode_step, flax_attention_fn


class _Configured(functools.partial):
    """The user's `attention_fn` (kept as `.original`) with this module's `is_causal` /
    `implementation` bound.

    A distinct type so that `clone()`, which passes the field back in, rebinds the original
    instead of stacking bindings; compared by value so that equal modules stay equal."""

    original: Callable[..., jax.Array]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Configured)
            and self.original == other.original
            and self.keywords == other.keywords
        )

    def __hash__(self) -> int:
        return hash((self.original, tuple(sorted(self.keywords))))


class MultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
    """`flax.linen.MultiHeadDotProductAttention` whose default `attention_fn` is
    `flashjax.flax_attention_fn`.

    Inputs are `[batch..., length, features]`, `mask` `[batch..., num_heads | 1, T, S]`, as in
    Flax. Every Flax field keeps its meaning; two are added:

    Attributes:
      is_causal: query i attends to keys j <= i, computed by flashjax without building a mask.
        Ignored when `decode=True`, where the cache mask already keeps attention causal (and the
        single query sits at the cache index, not at position 0).
      implementation: which flashjax implementation computes attention (None: the fastest
        available; "triton", "xla_chunked", "xla").
      block_mask: a `flashjax.BlockMask`: block-sparse attention, ANDed with everything else.
      deterministic_grads: True: gradients bitwise identical run to run
        (`flashjax.dot_product_attention`'s `deterministic`; Flax's `deterministic` field still
        means "no dropout").

    They are bound into `attention_fn` (as keywords, so a custom `attention_fn` must accept
    them when they are set). `sow_weights=True` sows nothing: the weights are never materialized.

    Decoding (`decode=True`, one token per call after the cache exists): without a `mask=`, the
    step is `flashjax.decode_attention` over the cache with lengths `cache_index + 1` (the
    split-KV kernel on a GPU), not attention over the whole masked cache.
    """

    attention_fn: Callable[..., jax.Array] = flax_attention_fn
    is_causal: bool = False
    implementation: Implementation | None = None
    block_mask: BlockMask | None = None
    deterministic_grads: bool = False

    def __post_init__(self) -> None:
        fn: Any = self.attention_fn
        if isinstance(fn, _Configured):
            fn = fn.original
        bound: dict[str, Any] = {}
        if self.is_causal and not self.decode:
            bound["is_causal"] = True
        if self.implementation is not None:
            bound["implementation"] = self.implementation
        if self.block_mask is not None:
            bound["block_mask"] = self.block_mask
        if self.deterministic_grads is not False:
            bound["deterministic_grads"] = self.deterministic_grads
        if bound:
            configured = _Configured(fn, **bound)
            configured.original = fn
            fn = configured
        # Fields may still be set here: Module.__post_init__ has not run yet.
        object.__setattr__(self, "attention_fn", fn)
        super().__post_init__()

    def __call__(self, inputs_q: jax.Array, *args: Any, mask: jax.Array | None = None, **kwargs):
        """Flax's `__call__`; a decode step without a mask goes through `decode_step`."""
        lengths = self.cache_lengths(mask)
        if lengths is None:
            return super().__call__(inputs_q, *args, mask=mask, **kwargs)
        with decode_step(lengths):
            return super().__call__(inputs_q, *args, mask=mask, **kwargs)

    def cache_lengths(self, mask: jax.Array | None) -> jax.Array | None:
        """The keys the cache holds once this call has written its token (`cache_index + 1`, as
        in Flax's mask `arange(max_length) <= cache_index`); None when the call is not a decode
        step (no cache yet: the initializing call) or a caller's mask joins Flax's."""
        if not self.decode or mask is not None or not self.has_variable("cache", "cached_key"):
            return None
        return self.get_variable("cache", "cache_index") + 1
