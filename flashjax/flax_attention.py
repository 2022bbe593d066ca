"""`flax_attention_fn`: flashjax behind Flax's `attention_fn=` calling convention.

`flax.nnx.MultiHeadAttention` and `flax.linen.MultiHeadDotProductAttention` call their
`attention_fn` as

    attention_fn(query, key, value, mask=..., dropout_rng=..., dropout_rate=...,
                 broadcast_dropout=..., deterministic=..., dtype=..., precision=...,
                 module=..., is_causal=...)

(nnx passes `is_causal`; linen keeps only the keywords the function's signature names). This
module maps that convention, and the semantics of Flax's `dot_product_attention` (any number of
leading batch dims, dtype promotion, dropout only when not deterministic), onto
`flashjax.dot_product_attention`. It does not import Flax.

Decode steps: with `decode=True`, Flax's modules write the new token's key and value into their
cache at `cache_index` and call `attention_fn` with the whole cache and the mask
`arange(max_length) <= cache_index` (ANDed with the caller's mask, if any). That mask says no more
than "the cache holds cache_index + 1 keys", which `flashjax.decode_attention` takes as lengths and
never reads past. Flax gives `attention_fn` no lengths, so flashjax's modules (`flashjax.nnx`,
`flashjax.linen`) compute them from their cache index and hand them over with `decode_step`
while the call lasts; `flax_attention_fn` then calls `decode_attention` (the split-KV kernel on a
GPU) instead of attention over a masked cache. They do so only when the caller passed no mask, so
Flax's mask is exactly the lengths.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from flashjax.attention import Implementation, dot_product_attention
from flashjax.block_mask import BlockMask
from flashjax.decode import decode_attention

# The cache lengths of the decode step in progress (see the module docstring), or None.
_CACHE_LENGTHS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "flashjax_cache_lengths", default=None
)


@contextlib.contextmanager
def decode_step(cache_lengths: jax.Array) -> Iterator[None]:
    """While active, `flax_attention_fn` computes a decode step: its query holds the newest
    token(s), its key and value are the whole cache, and the mask it is given is exactly
    `arange(max_length) < cache_lengths` (scalar or per flattened batch row), so it calls
    `flashjax.decode_attention(query, key, value, cache_lengths)` instead."""
    token = _CACHE_LENGTHS.set(cache_lengths)
    try:
        yield
    finally:
        _CACHE_LENGTHS.reset(token)


def _promote(
    query: jax.Array, key: jax.Array, value: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cast q, k, v to one inexact dtype, as Flax's `promote_dtype`: `dtype` if given, else the
    result type of the three (integers promote to at least float32)."""
    if dtype is None:
        dtype = jnp.result_type(query, key, value)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"dtype must be inexact, got {dtype}")
    return tuple(jnp.asarray(x, dtype) for x in (query, key, value))  # type: ignore[return-value]


def _flatten_batch(
    name: str, x: jax.Array | None, batch: tuple[int, ...], rank: int
) -> jax.Array | None:
    """A bias or mask broadcastable to `(*batch, N, T, S)`, as `(B', N', T', S')`.

    `rank` is `len(batch) + 3`. B' is 1 when `x` is broadcast over every batch dim (nothing is
    expanded) and `prod(batch)` otherwise; N', T', S' keep their broadcast sizes. Only a mix of
    broadcast and full batch dims, e.g. `(1, b2, ...)` under batch `(b1, b2)`, is expanded over the
    batch dims, since flattening interleaves them.
    """
    if x is None:
        return None
    if x.ndim > rank:
        raise ValueError(
            f"{name} must be broadcastable to (*batch, N, T, S) of rank {rank}, got shape {x.shape}"
        )
    x = x.reshape((1,) * (rank - x.ndim) + x.shape)
    lead, rest = x.shape[: len(batch)], x.shape[len(batch) :]
    if any(d not in (1, b) for d, b in zip(lead, batch, strict=True)):
        raise ValueError(
            f"{name} batch dims {lead} must be broadcastable to the query's batch dims {batch}"
        )
    if all(d == 1 for d in lead):
        return x.reshape((1, *rest))
    if lead != batch:
        x = jnp.broadcast_to(x, batch + rest)
    return x.reshape((math.prod(batch), *rest))


def _bool_mask(mask: jax.Array | None) -> jax.Array | None:
    """Flax's masks are bool or float 0/1 (`nn.make_causal_mask` returns float32), nonzero =
    attend; the public op takes bool only."""
    return None if mask is None else mask.astype(bool)


def flax_attention_fn(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    is_causal: bool = False,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    block_mask: BlockMask | None = None,
    implementation: Implementation | None = None,
    deterministic_grads: bool = False,
) -> jax.Array:
    """Flax's `dot_product_attention`, computed by `flashjax.dot_product_attention`.

    Pass it as `attention_fn=` to `flax.nnx.MultiHeadAttention` or
    `flax.linen.MultiHeadDotProductAttention`; choose the implementation with
    `functools.partial(flax_attention_fn, implementation="xla_chunked")`.

    Args:
      query: `Float[Array, "*B T N H"]`; any number of leading batch dims, including none.
      key: `Float[Array, "*B S K H"]`, the same batch dims; N a multiple of K (GQA / MQA).
      value: same shape as key (Flax allows another head dim for values; flashjax does not).
      bias: float, broadcastable to `(*B, N, T, S)`; added to the scaled logits. Differentiable.
      mask: bool or float, broadcastable to `(*B, N, T, S)`; nonzero / True = attend (float 0/1
        masks from `nn.make_causal_mask` / `nn.make_attention_mask` work as they are).
      broadcast_dropout: one dropout mask shared by all batch elements and heads.
      dropout_rng: a JAX PRNG key, needed when dropout is applied. flashjax draws its dropout mask
        from its own counter-based hash, so the kept elements differ from Flax's for the same key
        (the same key still gives the same mask).
      dropout_rate: in [0, 1); applied only when `not deterministic and dropout_rate > 0`.
      deterministic: True turns dropout off.
      dtype: the dtype q, k, v are cast to; None promotes them to their common (inexact) dtype,
        as Flax does. The output has this dtype.
      precision: accepted for compatibility and ignored: the kernels fix their own precision
        (float32 accumulation).
      module: accepted and ignored: the attention weights are never materialized, so
        `sow_weights=True` sows nothing.
      is_causal: query i sees key j <= i (top-left aligned), without building a mask.
      q_segment_ids / kv_segment_ids: int32 `(*B, T)` / `(*B, S)`: packed documents, no dense
        mask (Flax's modules do not forward them: bind them with `functools.partial`).
      block_mask: a `flashjax.BlockMask` (block-sparse attention), ANDed with everything else; its
        batch axis (if any) is the flattened batch.
      implementation: as in `flashjax.dot_product_attention`: None (fastest available),
        "triton", "xla_chunked" or "xla".
      deterministic_grads: `flashjax.dot_product_attention`'s `deterministic`: True asks for
        gradients bitwise identical run to run. (Named apart from Flax's `deterministic`, which
        turns dropout off.) A decode step (below) ignores it: its backward is always
        deterministic.

    Returns:
      `Float[Array, "*B T N H"]` in the promoted dtype.

    Inside `decode_step` (flashjax's modules with `decode=True` and no caller mask) the call is a
    decode step: `decode_attention` with the step's cache lengths; `mask` is Flax's cache mask,
    which the lengths already say, and `is_causal` is implied (the new token sees the cache).

    Unlike Flax, a query row that sees no key at all (e.g. a padding query under a padding mask)
    outputs 0 instead of the mean of the values; rows that see at least one key agree.
    Keywords that Flax may pass in future versions, or that other wrappers pass (e.g. nnx's
    `input_positions` for RoPE), raise a TypeError rather than being silently ignored.
    """
    del precision, module  # Documented as ignored.
    if not isinstance(deterministic_grads, bool):
        raise TypeError(
            "deterministic_grads must be a Python bool (True or False), got "
            f"{type(deterministic_grads).__name__} {deterministic_grads!r}"
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    query, key, value = _promote(query, key, value, dtype)
    if not query.ndim == key.ndim == value.ndim >= 3:
        raise ValueError(
            "query, key and value must have the same rank >= 3 ([batch...], length, heads, "
            f"head_dim), got shapes {query.shape}, {key.shape}, {value.shape}"
        )
    batch = query.shape[:-3]
    if key.shape[:-3] != batch or value.shape[:-3] != batch:
        raise ValueError(
            f"query, key and value batch dims must match, got shapes {query.shape}, {key.shape}, "
            f"{value.shape}"
        )
    rank = len(batch) + 3
    flat = math.prod(batch)
    apply_dropout = not deterministic and dropout_rate > 0.0
    lengths = _CACHE_LENGTHS.get()
    plain = bias is None and q_segment_ids is None and block_mask is None and not apply_dropout
    if lengths is not None and plain:
        out = decode_attention(
            query.reshape((flat, *query.shape[-3:])),
            key.reshape((flat, *key.shape[-3:])),
            value.reshape((flat, *value.shape[-3:])),
            jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (flat,)),
            implementation=implementation,
        )
        return out.reshape(query.shape)
    out = dot_product_attention(
        query.reshape((flat, *query.shape[-3:])),
        key.reshape((flat, *key.shape[-3:])),
        value.reshape((flat, *value.shape[-3:])),
        _flatten_batch("bias", bias, batch, rank),
        _bool_mask(_flatten_batch("mask", mask, batch, rank)),
        is_causal=is_causal,
        q_segment_ids=None if q_segment_ids is None else q_segment_ids.reshape(flat, -1),
        kv_segment_ids=None if kv_segment_ids is None else kv_segment_ids.reshape(flat, -1),
        dropout_rate=float(dropout_rate) if apply_dropout else 0.0,
        dropout_rng=dropout_rng if apply_dropout else None,
        dropout_broadcast=bool(broadcast_dropout),
        block_mask=block_mask,
        implementation=implementation,
        deterministic=deterministic_grads,
    )
    return out.reshape(query.shape)
