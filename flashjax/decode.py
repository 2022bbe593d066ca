"""`flashjax.decode_attention`: attention of a few new tokens over a KV cache (a decode step).

The call's meaning is the visibility rule's, with the positions of a cache: batch row b holds
`cache_lengths[b]` keys at positions 0.., the T new tokens are its last T (already written), so

    q_offsets = cache_lengths - T,  key_value_seq_lengths = cache_lengths,  window (left, 0)

(the record says the first with `AttentionStatics.queries_at_end`, the lengths carry both)

which `dot_product_attention(..., q_offsets=..., key_value_seq_lengths=..., is_causal=True)` also
computes (the tests check that). Validation raises before anything is traced, naming the argument;
the operands then go to the registry like `dot_product_attention`'s, where the split-KV decode
kernel ("triton_decode") serves them on a GPU; a backend that cannot read a paged cache gets the
pages gathered into a contiguous copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flashjax import backends, masks
from flashjax.attention import (
    MAX_HEAD_DIM,
    Implementation,
    _check_softcap,
    _check_window,
    _shape_of,
    _static_scale,
)
from flashjax.backends import decode as decode_backend
from pallas_kernels.operands import AttentionStatics, Operands, gather_pages

# --------------------------------------------------------------------------------------------------
# Validation: every check raises before any kernel is traced, naming the argument.
# --------------------------------------------------------------------------------------------------


def _check_arrays(query, key_cache, value_cache) -> None:
    shapes = {
        name: _shape_of(name, x)
        for name, x in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache))
    }
    for name, shape in shapes.items():
        if len(shape) != 4:
            layout = "(B, T, N, H)" if name == "query" else "(B, S, K, H) or (pages, page, K, H)"
            raise ValueError(f"{name} must have rank 4 {layout}, got shape {shape}")
    if shapes["key_cache"] != shapes["value_cache"]:
        raise ValueError(
            f"key_cache and value_cache must have the same shape, got {shapes['key_cache']} and "
            f"{shapes['value_cache']}"
        )
    (_, t, n, h), (_, _, k, hk) = shapes["query"], shapes["key_cache"]
    if hk != h:
        raise ValueError(f"key_cache head dim ({hk}) must equal the query head dim ({h})")
    if not 1 <= h <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM}, got query shape {(t, n, h)}")
    if t < 1:
        raise ValueError(f"query must hold T >= 1 new tokens, got shape {shapes['query']}")
    if k < 1 or n % k:
        raise ValueError(
            f"query heads ({n}) must be a multiple of the cache's key/value heads ({k})"
        )
    for name, x in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if len({jnp.dtype(x.dtype) for x in (query, key_cache, value_cache)}) > 1:
        raise TypeError(
            f"query, key_cache and value_cache must share one dtype, got {query.dtype}, "
            f"{key_cache.dtype} and {value_cache.dtype}"
        )


def _check_integer(name: str, x, shape: tuple[int, ...], meaning: str) -> None:
    got = _shape_of(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an int32 array {meaning}, got dtype {x.dtype}")
    if got != shape:
        raise ValueError(f"{name} must have shape {shape} {meaning}, got {got}")


def _capacity(query, key_cache, page_table) -> int:
    """Checks the cache layout against the query; returns the keys a row can hold."""
    batch, seq_q = query.shape[:2]
    if page_table is None:
        if key_cache.shape[0] != batch:
            raise ValueError(
                f"key_cache must have the query's batch size {batch} (B, S, K, H), got shape "
                f"{key_cache.shape} (pass page_table= for a paged cache)"
            )
        capacity = key_cache.shape[1]
    else:
        pages = _shape_of("page_table", page_table)
        if len(pages) != 2:
            raise ValueError(f"page_table must have shape (B, pages_per_sequence), got {pages}")
        _check_integer("page_table", page_table, (batch, pages[1]), "(B, pages_per_sequence)")
        capacity = pages[1] * key_cache.shape[1]
    if seq_q > capacity:
        raise ValueError(
            f"query holds T={seq_q} new tokens but the cache holds at most {capacity} keys"
        )
    return capacity


def _check_lengths(cache_lengths, batch: int, seq_q: int, capacity: int) -> None:
    _check_integer("cache_lengths", cache_lengths, (batch,), "(B,)")
    if isinstance(cache_lengths, jax.core.Tracer):
        return
    values = np.asarray(cache_lengths)
    if values.size and (values.min() < seq_q or values.max() > capacity):
        raise ValueError(
            f"cache_lengths must be in [T, capacity] = [{seq_q}, {capacity}] (the T new tokens "
            f"are already in the cache), got {values.tolist()}"
        )


def _check_splits(num_splits) -> None:
    ok = num_splits is None or (
        isinstance(num_splits, (int, np.integer))
        and not isinstance(num_splits, bool)
        and num_splits >= 1
    )
    if not ok:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")


# --------------------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------------------


def decode_operands(
    query: jax.Array,
    key_cache: jax.Array,
    value_cache: jax.Array,
    cache_lengths: jax.Array,
    *,
    page_table: jax.Array | None = None,
    scale: float | jax.Array | None = None,
    logits_soft_cap: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> Operands:
    """Validate `decode_attention`'s arguments and build the one operand record (a paged cache
    keeps its pools and `page_table`). Raises, naming the argument, before anything is traced."""
    _check_arrays(query, key_cache, value_cache)
    capacity = _capacity(query, key_cache, page_table)
    batch, seq_q = query.shape[:2]
    _check_lengths(cache_lengths, batch, seq_q, capacity)
    _check_window(local_window_size)
    _check_softcap(logits_soft_cap)
    static_scale = _static_scale(scale, query.shape[3])
    # Keys past the capacity do not exist: the kernels clip lengths to it (checked above when
    # known). The query offsets follow from the lengths (`queries_at_end`): nothing is computed
    # in XLA before the decode kernel, which reads the lengths alone.
    lengths = jnp.asarray(cache_lengths).astype(jnp.int32)
    statics = AttentionStatics(
        scale=static_scale,
        window=masks.window_of(True, local_window_size),
        softcap=None if logits_soft_cap is None else float(logits_soft_cap),
        queries_at_end=True,
    )
    return Operands(
        q=query,
        k=key_cache,
        v=value_cache,
        statics=statics,
        kv_lengths=lengths,
        scale=None if static_scale is not None else jnp.asarray(scale),
        page_table=None if page_table is None else jnp.asarray(page_table).astype(jnp.int32),
    )


def decode_attention(
    query: jax.Array,
    key_cache: jax.Array,
    value_cache: jax.Array,
    cache_lengths: jax.Array,
    *,
    page_table: jax.Array | None = None,
    scale: float | jax.Array | None = None,
    logits_soft_cap: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    num_splits: int | None = None,
    return_residual: bool = False,
    implementation: Implementation | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of T new tokens over a KV cache that already holds them (a decode step).

    Args:
      query: `Float[Array, "B T N H"]`, T >= 1 new tokens; N a multiple of the cache's K.
      key_cache, value_cache: contiguous `Float[Array, "B S K H"]`, or with `page_table` page
        pools `Float[Array, "num_pages page_size K H"]`; query's dtype and head dim.
      cache_lengths: `Int[Array, "B"]`: row b holds keys at positions 0 .. cache_lengths[b] - 1,
        the new tokens at the last T of them (they are already written). Keys at or past the
        length are never read into an output (garbage there is harmless). Checked to lie in
        [T, capacity] when concrete, clipped to the capacity when traced.
      page_table: `Int[Array, "B pages_per_sequence"]`: key j of row b is slot j % page_size of
        page page_table[b, j // page_size] (vLLM / FlashInfer). Entries past a row's length are
        never read and may hold anything (they are clipped to valid ids).
      scale: multiplier of `q . k`, default `H ** -0.5`.
      logits_soft_cap: c > 0: logits = c * tanh(scale * q.k / c).
      local_window_size: left, or `(left, right)` with right capped at 0: the token at position p
        sees keys p - left .. p.
      num_splits: how many parts the decode kernel cuts the keys into, processed in parallel and
        merged (Flash-Decoding); None: chosen from batch, KV heads, cache capacity and the
        device's core count. Ignored by the other implementations.
      return_residual: also return the logsumexp, natural log, float32, `(B, T, N)`.
      implementation: None picks the first backend of the registry that serves the call on this
        platform ("triton_decode" on NVIDIA GPUs, "xla_chunked" elsewhere); or any registered
        name (`flashjax.backends.NAMES`), e.g. "triton_decode" in interpret mode on CPU.

    Returns:
      `out` with query's shape and dtype, or `(out, logsumexp)` if `return_residual`.
      Differentiable with respect to query and both caches (a paged cache's gradient is summed
      into its pages).

    The new tokens are causal among themselves (bottom-right): token t sees keys up to position
    cache_lengths[b] - T + t.
    """
    if implementation is not None and implementation not in backends.NAMES:
        raise ValueError(
            f"implementation must be one of {backends.NAMES} or None, got {implementation!r}"
        )
    _check_splits(num_splits)
    ops = decode_operands(
        query,
        key_cache,
        value_cache,
        cache_lengths,
        page_table=page_table,
        scale=scale,
        logits_soft_cap=logits_soft_cap,
        local_window_size=local_window_size,
    )
    if ops.batch == 0:
        out = jnp.zeros(query.shape, query.dtype)
        lse = jnp.zeros((0, ops.seq_q, ops.num_heads), jnp.float32)
    else:
        backend = backends.choose(implementation, ops)
        if backend.name == decode_backend.BACKEND.name:
            backend = decode_backend.backend_with(None if num_splits is None else int(num_splits))
        if not backend.pages:
            ops = gather_pages(ops)
        out, lse = backend.run(ops)
    return (out, lse.astype(jnp.float32)) if return_residual else out
