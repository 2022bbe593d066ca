"""`flashjax.dot_product_attention`: validate and normalize the arguments, pick an implementation.

Validation raises before anything is traced, naming the argument. The arguments then become one
`Operands` record (pallas_kernels/operands.py), which the registry (flashjax/backends) hands to
the first implementation that serves it; every implementation returns `(out, logsumexp)`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from flashjax import backends, masks
from flashjax.block_mask import BlockMask
from pallas_kernels.operands import AttentionStatics, Operands

Implementation = Literal["triton_decode", "triton", "xla_chunked", "xla"]
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------------
# Validation: every check raises before any kernel is traced, naming the argument.
# --------------------------------------------------------------------------------------------------


def _shape_of(name: str, x) -> tuple[int, ...]:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(x.shape)


def _check_qkv(query, key, value) -> None:
    shapes = {n: _shape_of(n, x) for n, x in (("query", query), ("key", key), ("value", value))}
    ranks = {n: len(s) for n, s in shapes.items()}
    if ranks["query"] not in (3, 4):
        raise ValueError(
            f"query must have rank 4 (B, T, N, H) or 3 (T, N, H), got shape {shapes['query']}"
        )
    for name in ("key", "value"):
        if ranks[name] != ranks["query"]:
            raise ValueError(
                f"{name} must have the same rank as query ({ranks['query']}), got shape "
                f"{shapes[name]}"
            )
    q, k, v = (s if len(s) == 4 else (1, *s) for s in shapes.values())
    if k != v:
        raise ValueError(f"key and value must have the same shape, got {k} and {v}")
    if q[0] != k[0]:
        raise ValueError(f"query and key must have the same batch size, got {q[0]} and {k[0]}")
    if q[3] != k[3]:
        raise ValueError(f"query and key must have the same head dim, got {q[3]} and {k[3]}")
    if not 1 <= q[3] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM}, got query shape {q}")
    if q[1] < 1 or k[1] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got query {q} and key {k}")
    if k[2] < 1 or q[2] % k[2]:
        raise ValueError(
            f"query heads ({q[2]}) must be a multiple of key/value heads ({k[2]}) for GQA/MQA"
        )
    dtypes = {n: jnp.dtype(x.dtype) for n, x in (("query", query), ("key", key), ("value", value))}
    for name, dt in dtypes.items():
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {dt}")
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"query, key and value must share one dtype, got {dtypes}")


def _check_window(local_window_size) -> None:
    if local_window_size is None:
        return
    ok = isinstance(local_window_size, (int, np.integer)) and not isinstance(
        local_window_size, bool
    )
    if ok:
        ok = local_window_size >= 0
    elif isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2:
        ok = all(
            isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0
            for w in local_window_size
        )
    if not ok:
        raise ValueError(
            "local_window_size must be a non-negative int or a (left, right) pair of non-negative "
            f"ints, got {local_window_size!r}"
        )


def _check_int_array(name: str, x, shape: tuple[int, ...]) -> None:
    if x is None:
        return
    got = _shape_of(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an int32 array of shape {shape}, got dtype {x.dtype}")
    if got != shape:
        raise ValueError(f"{name} must have shape {shape}, got {got}")


def _check_broadcast(name: str, x, target: tuple[int, ...]) -> None:
    if x is None:
        return
    shape = _shape_of(name, x)
    ok = len(shape) <= 4 and all(d in (1, t) for d, t in zip(shape[::-1], target[::-1]))
    if not ok:
        raise ValueError(f"{name} must be broadcastable to (B, N, T, S) = {target}, got {shape}")


def _check_dropout(dropout_rate, dropout_rng) -> None:
    if not isinstance(dropout_rate, (int, float, np.floating)) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be a float in [0, 1), got {dropout_rate!r}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rng must be a JAX PRNG key when dropout_rate > 0")


def _check_softcap(x) -> None:
    if x is None:
        return
    if not isinstance(x, (int, float, np.floating, np.integer)) or isinstance(x, bool) or x <= 0:
        raise ValueError(f"logits_soft_cap must be a positive float, got {x!r}")


def _static_scale(scale, head_dim: int) -> float | None:
    """The scale as a Python float, or None when it is a traced scalar (then an operand)."""
    if scale is None:
        return float(head_dim**-0.5)
    if isinstance(scale, (int, float, np.floating, np.integer)) and not isinstance(scale, bool):
        value = float(scale)
    elif hasattr(scale, "shape") and hasattr(scale, "dtype") and scale.shape == ():
        if not jnp.issubdtype(scale.dtype, jnp.floating):
            raise TypeError(f"scale must be a float scalar, got dtype {scale.dtype}")
        if isinstance(scale, jax.core.Tracer):
            return None
        value = float(scale)
    else:
        raise ValueError(f"scale must be a finite float or a float scalar array, got {scale!r}")
    if not np.isfinite(value):
        raise ValueError(f"scale must be finite, got {value!r}")
    return value


def _check_deterministic(deterministic) -> None:
    if not isinstance(deterministic, bool):  # a static choice: not an array, not a tracer
        raise TypeError(
            "deterministic must be a Python bool (True or False), got "
            f"{type(deterministic).__name__} {deterministic!r}"
        )


def _check_mask(mask) -> None:
    if mask is not None and jnp.dtype(mask.dtype) != jnp.bool_:
        raise TypeError(
            f"mask must be a bool array (True = attend), got dtype {mask.dtype}; pass an additive "
            "float mask as bias= instead (0 = attend, -inf = hide)"
        )


def _check_block_mask(block_mask, shape: tuple[int, int, int, int]) -> None:
    if block_mask is None:
        return
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a flashjax.BlockMask, got {type(block_mask).__name__}")
    block_mask.check_call(*shape)


# --------------------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------------------


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | jax.Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offsets: jax.Array | int | None = None,
    kv_offsets: jax.Array | int | None = None,
    block_mask: BlockMask | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    dropout_broadcast: bool = False,
    return_residual: bool = False,
    implementation: Implementation | None = None,
    deterministic: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention, exact, in memory linear in the sequence length.

    A drop-in for `jax.nn.dot_product_attention` (same argument names, shapes and meaning where
    they overlap) with the extensions users of FlashAttention expect.

    Args:
      query: `Float[Array, "B T N H"]` (or `"T N H"`).
      key: `Float[Array, "B S K H"]` (or `"S K H"`), N a multiple of K (GQA / MQA; repeated K/V
        are never materialized).
      value: same shape and dtype as key. Dtypes: bfloat16, float16, float32 (float64 on the XLA
        paths, computed in float64). Head dims 1..256, any T, S >= 1, B >= 0.
      bias: float, broadcastable to `(B, N, T, S)`; added to the logits after soft-capping.
        Differentiable. An additive mask (0 / -inf) goes here.
      mask: bool, broadcastable to `(B, N, T, S)`; True = attend.
      scale: multiplier of `q . k`, any finite float; default `H ** -0.5`. A traced scalar (a
        learnable temperature) works on the XLA paths, which return its gradient.
      is_causal: query i sees key j <= i (aligned top-left, as in jax.nn; with offsets, positions
        are compared).
      query_seq_lengths: `Int[Array, "B"]`; queries past the length see nothing and output 0.
      key_value_seq_lengths: `Int[Array, "B"]`; keys past the length are invisible, never read.
      local_window_size: `(left, right)`: query at position p sees keys p - left .. p + right; an
        int w means (w, w). Combined with `is_causal`, right is capped at 0.
      logits_soft_cap: c > 0: logits = c * tanh(scale * q.k / c), before the bias.
      q_segment_ids: `Int[Array, "B T"]`; with kv_segment_ids (`Int[Array, "B S"]`), query and
        key interact only within the same segment (packed documents). Sorted (packed) ids let
        the kernels skip whole tiles.
      q_offsets, kv_offsets: `Int[Array, "B"]` or int: the positions of query row 0 and key 0
        (default 0). Causal and windows compare positions: `q_offsets = S - T` aligns causal
        bottom-right (new tokens at the end of a cache).
      block_mask: a `flashjax.BlockMask` (block-sparse attention): only its non-empty blocks are
        computed, forward and backward.
      dropout_rate: in [0, 1): inverted dropout on the attention weights.
      dropout_rng: a JAX PRNG key (required when dropout_rate > 0). The same key gives the same
        mask; the backward regenerates it from a counter-based hash instead of storing it.
      dropout_broadcast: one dropout mask for all batch elements and heads (Flax's
        `broadcast_dropout`).
      return_residual: also return the logsumexp, natural log, float32, `(B, T, N)`. It is
        differentiable.
      implementation: None picks the first of the registry (`flashjax.backends`) that serves the
        call on this platform: on NVIDIA GPUs "triton_decode" for a decode step (at most 16
        queries and 64 queries x query heads per KV head, no more queries than keys, no bias,
        mask, segment ids, block mask or dropout: e.g. one new token with
        `key_value_seq_lengths`), else "mosaic" on Hopper (sm90) for what it serves, else
        "triton"; "xla_chunked" elsewhere. "triton_decode": the split-KV decode kernel (see
        `flashjax.decode_attention`); "mosaic": the Hopper kernels on Pallas' Mosaic GPU backend
        (bf16/fp16; interpret mode on CPU); "triton": the Pallas kernels on the Triton lowering
        (interpret mode on CPU); "xla_chunked": pure-JAX loops over the visible tiles; "xla": the
        naive reference that builds the full score matrix. A named implementation that cannot
        serve the call raises, naming the feature.
      deterministic: True: gradients bitwise identical run to run (no atomics / no order-dependent
        float32 accumulation). An implementation whose backward cannot promise that declines the
        call (`implementation=None` then picks the next one; a named one raises) or runs a
        deterministic variant. Every default backward is deterministic today (the kernels'
        two-kernel backward: dK/dV over key tiles, dQ over query tiles, no atomics; the XLA
        paths: sequential loops and reductions, no scatter-add); the Mosaic single-kernel
        backward (`BackwardConfig.fused_dq`, dQ by TMA reduce-add; off by default) is not, and
        True turns it off. The forward is deterministic either way.

    Returns:
      `out` with query's shape and dtype, or `(out, logsumexp)` if `return_residual`.

    A query row that sees no key (every key masked, or a query past its sequence length) outputs 0
    and has logsumexp -inf; jax.nn's XLA path instead averages the values of the masked keys there.
    Keys past `key_value_seq_lengths` never reach an output or a gradient (NaN there is harmless).
    A NaN inside the visible range reaches the rows that see it, and may reach other rows of the
    same kernel tile through the tile's matmul (0 * NaN), as in FlashAttention-2 and cuDNN.
    """
    _check_qkv(query, key, value)
    three_d = query.ndim == 3
    if three_d:
        query, key, value = query[None], key[None], value[None]
    if implementation is not None and implementation not in backends.NAMES:
        raise ValueError(
            f"implementation must be one of {backends.NAMES} or None, got {implementation!r}"
        )
    ops = operands(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_offsets=q_offsets,
        kv_offsets=kv_offsets,
        block_mask=block_mask,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        dropout_broadcast=dropout_broadcast,
        deterministic=deterministic,
    )
    if ops.batch == 0:  # nothing to attend: empty results, as jax.nn
        out = jnp.zeros(query.shape, query.dtype)
        lse = jnp.zeros((0, ops.seq_q, ops.num_heads), jnp.float32)
    else:
        out, lse = backends.choose(implementation, ops).run(ops)
    if three_d:
        out, lse = out[0], lse[0]
    return (out, lse.astype(jnp.float32)) if return_residual else out


def operands(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | jax.Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offsets: jax.Array | int | None = None,
    kv_offsets: jax.Array | int | None = None,
    block_mask: BlockMask | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    dropout_broadcast: bool = False,
    deterministic: bool = False,
) -> Operands:
    """Validate `dot_product_attention`'s arguments (rank-4 q, k, v) and build the one operand
    record the implementations take. Raises, naming the argument, before anything is traced."""
    _check_qkv(query, key, value)
    if query.ndim != 4:
        raise ValueError(f"operands takes rank-4 (B, T, N, H) inputs, got {query.shape}")
    batch, seq_q, num_heads, head_dim = query.shape
    seq_k = key.shape[1]
    _check_broadcast("bias", bias, (batch, num_heads, seq_q, seq_k))
    _check_broadcast("mask", mask, (batch, num_heads, seq_q, seq_k))
    if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"bias must have a floating dtype, got {bias.dtype}")
    _check_mask(mask)
    for name, x in (
        ("query_seq_lengths", query_seq_lengths),
        ("key_value_seq_lengths", key_value_seq_lengths),
    ):
        _check_int_array(name, x, (batch,))
    _check_int_array("q_segment_ids", q_segment_ids, (batch, seq_q))
    _check_int_array("kv_segment_ids", kv_segment_ids, (batch, seq_k))
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    q_offsets = _offsets("q_offsets", q_offsets, batch)
    kv_offsets = _offsets("kv_offsets", kv_offsets, batch)
    _check_window(local_window_size)
    _check_softcap(logits_soft_cap)
    static_scale = _static_scale(scale, head_dim)
    _check_dropout(dropout_rate, dropout_rng)
    _check_block_mask(block_mask, (batch, num_heads, seq_q, seq_k))
    _check_deterministic(deterministic)
    statics = AttentionStatics(
        scale=static_scale,
        window=masks.window_of(is_causal, local_window_size),
        softcap=None if logits_soft_cap is None else float(logits_soft_cap),
        dropout_rate=float(dropout_rate),
        dropout_broadcast=bool(dropout_broadcast),
        mask_block=None if block_mask is None else block_mask.block_size,
        mask_fn=None if block_mask is None else block_mask.mask_fn,
        deterministic=bool(deterministic),
    )
    ops = Operands(
        q=query,
        k=key,
        v=value,
        statics=statics,
        bias=masks.combine_bias(bias, mask),
        q_segments=_int32(q_segment_ids),
        kv_segments=_int32(kv_segment_ids),
        q_lengths=_int32(query_seq_lengths),
        kv_lengths=_int32(key_value_seq_lengths),
        q_offsets=q_offsets,
        kv_offsets=kv_offsets,
        block_states=None if block_mask is None else block_mask.states,
        seeds=jax.random.bits(dropout_rng, (2,), jnp.uint32) if dropout_rate > 0.0 else None,
        scale=None if static_scale is not None else jnp.asarray(scale),
    )
    return ops


def _int32(x: jax.Array | None) -> jax.Array | None:
    return None if x is None else jnp.asarray(x).astype(jnp.int32)


def _offsets(name: str, x, batch: int) -> jax.Array | None:
    """An offset argument as `(B,)` int32 (an int is broadcast), or None."""
    if x is None:
        return None
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return jnp.full((batch,), int(x), jnp.int32)
    _check_int_array(name, x, (batch,))
    return x.astype(jnp.int32)
