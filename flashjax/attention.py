"""`flashjax.dot_product_attention`: validate and normalize the arguments, pick an implementation.

Every implementation consumes the same normalized operands:
  q (B, T, N, H), k / v (B, S, K, H), bias (Bb, Nb, Tb, Sb) float32 with -inf for hidden elements,
  q_segments (B, T) / kv_segments (B, S) int32 (sequence lengths folded in), seeds (2,) uint32,
  and a static `AttentionStatics` (scale, window, soft-cap, dropout).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from flashjax import chunked, masks, reference
from pallas_kernels import common
from pallas_kernels.triton import api as triton_api

Implementation = Literal["triton", "xla_chunked", "xla"]
IMPLEMENTATIONS: tuple[str, ...] = ("triton", "xla_chunked", "xla")
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Operands:
    """The normalized operands of one call (a pytree: arrays are leaves, `statics` is static)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    bias: jax.Array | None
    q_segments: jax.Array | None
    kv_segments: jax.Array | None
    seeds: jax.Array | None
    statics: common.AttentionStatics


jax.tree_util.register_dataclass(
    Operands,
    data_fields=["q", "k", "v", "bias", "q_segments", "kv_segments", "seeds"],
    meta_fields=["statics"],
)


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
    if q[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be at most {MAX_HEAD_DIM}, got query shape {q}")
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


def _check_float(name: str, x) -> None:
    if x is None:
        return
    if not isinstance(x, (int, float, np.floating, np.integer)) or isinstance(x, bool) or x <= 0:
        raise ValueError(f"{name} must be a positive float, got {x!r}")


# --------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------


def _backend() -> str:
    return jax.devices()[0].platform


def _unsupported(impl: str, ops: Operands) -> str | None:
    """Why `impl` cannot serve this call, or None if it can."""
    if impl == "triton":
        if jnp.dtype(ops.q.dtype) not in _KERNEL_DTYPES:
            return f"dtype {ops.q.dtype} (the kernels take bfloat16, float16 and float32)"
        if _backend() not in ("gpu", "cpu"):
            return (
                f"backend {_backend()!r} (Triton kernels need an NVIDIA GPU; CPU interprets them)"
            )
    return None


def _choose(implementation: str | None, ops: Operands) -> str:
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
            )
        why = _unsupported(implementation, ops)
        if why is not None:
            raise ValueError(f"implementation={implementation!r} cannot serve this call: {why}")
        return implementation
    if _backend() == "gpu" and _unsupported("triton", ops) is None:
        return "triton"
    return "xla_chunked"


def _xla(ops: Operands) -> tuple[jax.Array, jax.Array]:
    return reference.attention(
        ops.q, ops.k, ops.v, ops.bias, ops.q_segments, ops.kv_segments, ops.seeds, ops.statics
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _triton(statics: common.AttentionStatics, q, k, v, bias, q_segments, kv_segments, seeds):
    """The kernels as one differentiable function: residuals (out, lse2), recompute backward."""
    return triton_api.forward(q, k, v, q_segments, kv_segments, bias, seeds, statics)


def _triton_fwd(statics, q, k, v, bias, q_segments, kv_segments, seeds):
    out, lse2 = _triton(statics, q, k, v, bias, q_segments, kv_segments, seeds)
    return (out, lse2), (q, k, v, bias, q_segments, kv_segments, seeds, out, lse2)


def _triton_bwd(statics, residuals, cotangents):
    q, k, v, bias, q_segments, kv_segments, seeds, out, lse2 = residuals
    dout, dlse2 = cotangents
    dq, dk, dv = triton_api.backward(
        q, k, v, out, lse2, dout, dlse2, q_segments, kv_segments, bias, seeds, statics
    )
    dbias = None
    if bias is not None:
        # d bias = dS: computed blockwise in XLA, only where a caller differentiates the bias
        # (XLA removes it otherwise).
        lse, dlse = (jnp.transpose(x, (0, 2, 1)) for x in (lse2 * common.LN2, dlse2 * common.LOG2E))
        dbias = chunked.bias_grad(
            q, k, v, bias, q_segments, kv_segments, seeds, statics, out, lse, dout, dlse
        )
    return dq, dk, dv, dbias, _int_zero(q_segments), _int_zero(kv_segments), _int_zero(seeds)


def _int_zero(x):
    return None if x is None else np.zeros(x.shape, jax.dtypes.float0)


_triton.defvjp(_triton_fwd, _triton_bwd)


def _run_triton(ops: Operands) -> tuple[jax.Array, jax.Array]:
    bias = None if ops.bias is None else ops.bias.astype(jnp.float32)
    out, lse2 = _triton(
        ops.statics, ops.q, ops.k, ops.v, bias, ops.q_segments, ops.kv_segments, ops.seeds
    )
    return out, jnp.transpose(lse2, (0, 2, 1)) * common.LN2


def _run_chunked(ops: Operands) -> tuple[jax.Array, jax.Array]:
    return chunked.attention(
        ops.q, ops.k, ops.v, ops.bias, ops.q_segments, ops.kv_segments, ops.seeds, ops.statics
    )


_RUNNERS: dict[str, Callable[[Operands], tuple[jax.Array, jax.Array]]] = {
    "triton": _run_triton,
    "xla_chunked": _run_chunked,
    "xla": _xla,
}


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
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    dropout_broadcast: bool = False,
    return_residual: bool = False,
    implementation: Implementation | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention, exact, in memory linear in the sequence length.

    A drop-in for `jax.nn.dot_product_attention` (same argument names, shapes and meaning where
    they overlap) with the extensions users of FlashAttention expect.

    Args:
      query: `Float[Array, "B T N H"]` (or `"T N H"`).
      key: `Float[Array, "B S K H"]` (or `"S K H"`), N a multiple of K (GQA / MQA; repeated K/V
        are never materialized).
      value: same shape and dtype as key. Dtypes: bfloat16, float16, float32 (float64 on the XLA
        paths). Head dims 1..256, any T, S >= 1.
      bias: float, broadcastable to `(B, N, T, S)`; added to the logits after soft-capping.
        Differentiable.
      mask: bool or float, broadcastable to `(B, N, T, S)`; nonzero / True = attend.
      scale: multiplier of `q . k`; default `H ** -0.5`.
      is_causal: query i sees key j <= i (aligned top-left, as in jax.nn).
      query_seq_lengths: `Int[Array, "B"]`; queries past the length output 0.
      key_value_seq_lengths: `Int[Array, "B"]`; keys past the length are invisible.
      local_window_size: `(left, right)`: query i sees keys i - left .. i + right; an int w means
        (w, w). Combined with `is_causal`, right is capped at 0.
      logits_soft_cap: c > 0: logits = c * tanh(scale * q.k / c), before the bias.
      q_segment_ids: `Int[Array, "B T"]`, ids >= 0; with kv_segment_ids (`Int[Array, "B S"]`),
        query and key interact only within the same segment (packed documents).
      dropout_rate: in [0, 1): inverted dropout on the attention weights.
      dropout_rng: a JAX PRNG key (required when dropout_rate > 0). The same key gives the same
        mask; the backward regenerates it from a counter-based hash instead of storing it.
      dropout_broadcast: one dropout mask for all batch elements and heads (Flax's
        `broadcast_dropout`).
      return_residual: also return the logsumexp, natural log, float32, `(B, T, N)`. It is
        differentiable.
      implementation: None picks the fastest that serves the call on the current backend
        ("triton" on NVIDIA GPUs, "xla_chunked" elsewhere); "triton": the Pallas kernels (in
        interpret mode on CPU); "xla_chunked": pure-JAX blockwise online softmax; "xla": the naive
        reference that builds the full score matrix.

    Returns:
      `out` with query's shape and dtype, or `(out, logsumexp)` if `return_residual`.

    A query row that sees no key (every key masked, or a query past its sequence length) outputs 0
    and has logsumexp -inf; jax.nn's XLA path instead averages the values of the masked keys there.
    NaN inputs propagate to the rows they touch.
    """
    _check_qkv(query, key, value)
    three_d = query.ndim == 3
    if three_d:
        query, key, value = query[None], key[None], value[None]
    batch, seq_q, num_heads, head_dim = query.shape
    seq_k = key.shape[1]
    _check_broadcast("bias", bias, (batch, num_heads, seq_q, seq_k))
    _check_broadcast("mask", mask, (batch, num_heads, seq_q, seq_k))
    if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"bias must have a floating dtype, got {bias.dtype}")
    _check_int_array("query_seq_lengths", query_seq_lengths, (batch,))
    _check_int_array("key_value_seq_lengths", key_value_seq_lengths, (batch,))
    _check_int_array("q_segment_ids", q_segment_ids, (batch, seq_q))
    _check_int_array("kv_segment_ids", kv_segment_ids, (batch, seq_k))
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    _check_window(local_window_size)
    _check_float("logits_soft_cap", logits_soft_cap)
    _check_float("scale", scale)
    _check_dropout(dropout_rate, dropout_rng)

    q_segments, kv_segments = masks.fold_lengths(
        q_segment_ids,
        kv_segment_ids,
        query_seq_lengths,
        key_value_seq_lengths,
        batch,
        seq_q,
        seq_k,
    )
    statics = common.AttentionStatics(
        scale=float(head_dim**-0.5 if scale is None else scale),
        window=masks.window_of(is_causal, local_window_size),
        softcap=None if logits_soft_cap is None else float(logits_soft_cap),
        dropout_rate=float(dropout_rate),
        dropout_broadcast=bool(dropout_broadcast),
        kv_len=seq_k,
        has_segments=q_segments is not None,
    )
    seeds = None
    if dropout_rate > 0.0:
        seeds = jax.random.bits(dropout_rng, (2,), jnp.uint32)
    ops = Operands(
        query,
        key,
        value,
        masks.combine_bias(bias, mask),
        q_segments,
        kv_segments,
        seeds,
        statics,
    )
    out, lse = _RUNNERS[_choose(implementation, ops)](ops)
    if three_d:
        out, lse = out[0], lse[0]
    return (out, lse.astype(jnp.float32)) if return_residual else out
