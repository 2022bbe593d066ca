"""`flashjax.nnx.MultiHeadAttention`: `flax.nnx.MultiHeadAttention` with flashjax attention.

    from flashjax import nnx as fnnx
    layer = fnnx.MultiHeadAttention(num_heads=8, in_features=512, rngs=nnx.Rngs(0))
    y = layer(x, is_causal=True)  # causal without a (T, T) mask

Same constructor, same `__call__`, same parameter tree as Flax's class: a checkpoint of one loads
into the other unchanged. With `decode=True` (after `init_cache`), each one-token step runs
`flashjax.decode_attention` over the cache (see `flashjax.flax_attention`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from flashjax.attention import Implementation
from flashjax.block_mask import BlockMask
from flashjax.flax_attention import decode_step, flax_attention_fn


@functools.cache
def attention_fn_for(
    implementation: Implementation | None,
    block_mask: BlockMask | None = None,
    deterministic_grads: bool = False,
) -> Callable[..., jax.Array]:
    """`flax_attention_fn` with `implementation` (and `block_mask`, `deterministic_grads`) bound;
    one object per value, so modules built with the same arguments have equal graph definitions
    (no retracing under `nnx.jit`; a BlockMask counts as the same value only when it is the same
    object)."""
    bound = {
        "implementation": implementation,
        "block_mask": block_mask,
        "deterministic_grads": None if deterministic_grads is False else deterministic_grads,
    }
    bound = {name: value for name, value in bound.items() if value is not None}
    return functools.partial(flax_attention_fn, **bound) if bound else flax_attention_fn


class MultiHeadAttention(nnx.MultiHeadAttention):
    """`flax.nnx.MultiHeadAttention` whose default `attention_fn` is `flashjax.flax_attention_fn`.

    Takes exactly the arguments of `flax.nnx.MultiHeadAttention` (`num_heads`, `in_features`,
    `qkv_features`, `num_kv_heads` for GQA, `dropout_rate`, `rngs`, ...), plus:

    Args:
      implementation: which flashjax implementation computes attention (None: the fastest
        available; "triton", "xla_chunked", "xla"). Used only when `attention_fn` is not given.
      block_mask: a `flashjax.BlockMask`: block-sparse attention, ANDed with the call's mask and
        causality. Used only when `attention_fn` is not given.
      deterministic_grads: True: gradients bitwise identical run to run
        (`flashjax.dot_product_attention`'s `deterministic`; Flax's `deterministic` still means
        "no dropout"). Used only when `attention_fn` is not given.

    Inputs are `[batch..., length, features]`; `__call__(..., is_causal=True)` reaches flashjax as
    `is_causal` (no mask is built), `mask=` is `[batch..., num_heads | 1, T, S]` as in Flax.
    `sow_weights=True` sows nothing (flashjax never materializes the weights).

    Decoding (`decode=True`, `init_cache` first, one token per call, Flax's cache): without a
    `mask=`, the step is `flashjax.decode_attention` over the cache with lengths
    `cache_index + 1` (the split-KV kernel on a GPU), not attention over the whole masked cache;
    `is_causal` is implied (Flax's own `is_causal=True` would let the token see key 0 only).
    """

    def __init__(
        self,
        *args: Any,
        attention_fn: Callable[..., jax.Array] | None = None,
        implementation: Implementation | None = None,
        block_mask: BlockMask | None = None,
        deterministic_grads: bool = False,
        **kwargs: Any,
    ) -> None:
        if attention_fn is None:
            attention_fn = attention_fn_for(implementation, block_mask, deterministic_grads)
        elif (
            implementation is not None or block_mask is not None or deterministic_grads is not False
        ):
            raise ValueError(
                "pass either attention_fn or implementation / block_mask / deterministic_grads, "
                "not both"
            )
        super().__init__(*args, attention_fn=attention_fn, **kwargs)

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        decode: bool | None = None,
        **kwargs: Any,
    ) -> jax.Array:
        """Flax's `__call__`; a decode step without a mask goes through `decode_step`."""
        call = functools.partial(
            super().__call__, inputs_q, inputs_k, inputs_v, mask=mask, decode=decode, **kwargs
        )
        lengths = self.cache_lengths(mask, decode)
        if lengths is None:
            return call()
        with decode_step(lengths):
            return call()

    def cache_lengths(self, mask: jax.Array | None, decode: bool | None) -> jax.Array | None:
        """The keys the cache holds once this call has written its token: Flax writes it at
        `cache_index` and lets it see keys 0 .. cache_index, so `cache_index + 1`. None when the
        call is not a decode step, or a caller's mask joins Flax's cache mask."""
        decode = self.decode if decode is None else decode
        if not decode or mask is not None or self.cache_index is None:
            return None
        return self.cache_index[...] + 1
