"""The `attention_fn` of the GPT-2's `flax.nnx.MultiHeadAttention`, one per backend.

    attn = nnx.MultiHeadAttention(..., attention_fn=AttentionFn("flashjax"))
    y = attn(x, mask=SegmentMask(segment_ids, segment_ids), is_causal=True)

Backends:
  - "flashjax": `flashjax.flax_attention_fn`, the library's Flax swap-in (Pallas Triton kernels on
    a GPU, the chunked XLA path elsewhere), with `q_segment_ids` / `kv_segment_ids`: nothing of
    size T x S is built.
  - "xla": `jax.nn.dot_product_attention(implementation="xla")`, the standard attention that Flax's
    own `dot_product_attention` calls.
  - "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused attention.

Context parallelism (`ContextParallel`): with `AttentionFn("flashjax", context=...)` the sequence
axis of the activations is sharded over a mesh axis and attention is `flashjax.ring_attention`
inside `jax.shard_map` (the rest of the model is per-token, so GSPMD keeps it sharded the same
way). In the zigzag layout the trainer hands the model every row already in zigzag order, with
the matching positions (`ContextParallel.order`).

Packed documents reach the attention function through the module's ordinary `mask=` argument as a
`SegmentMask` (Flax's MultiHeadAttention hands `mask` to `attention_fn` unchanged; its only other
call-time extra is `input_positions`). `attention_arguments` is the one place that turns segment
ids into each backend's arguments: segment ids for flashjax; for jax.nn, whose public op takes no
segment ids in JAX 0.11 (cuDNN's packed layout is reachable only through a private module), the
equivalent dense `(B, 1, T, S)` boolean mask `segment_q == segment_kv`. Causality is never put in
a mask: every backend gets `is_causal=True`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flashjax

Backend = Literal["flashjax", "xla", "cudnn"]
BACKENDS: tuple[str, ...] = ("flashjax", "xla", "cudnn")
# A timing floor, not an attention: each position's output is its own value (training, prefill)
# or query (a decode step), so a run with it takes the time of everything but attention, and its
# speed over another backend's is the most any attention could gain there.
NO_ATTENTION = "none"
TIMED_BACKENDS: tuple[str, ...] = (*BACKENDS, NO_ATTENTION)


def parse_backends(text: str) -> tuple[str, ...]:
    """A command line's comma list of `TIMED_BACKENDS` (an argparse `type`: a bad list is
    refused with the names it takes)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or any(n not in TIMED_BACKENDS for n in names):
        raise argparse.ArgumentTypeError(f"a comma list of {', '.join(TIMED_BACKENDS)}: {text!r}")
    return names


@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """Which query and key positions may interact: those with equal segment ids.

    Attributes:
      q_segment_ids: `Int[Array, "B T"]`.
      kv_segment_ids: `Int[Array, "B S"]`.
    """

    q_segment_ids: jax.Array
    kv_segment_ids: jax.Array

    def dense(self) -> jax.Array:
        """`Bool[Array, "B 1 T S"]`: True where the query and key share a segment."""
        return (
            self.q_segment_ids[:, None, :, None] == self.kv_segment_ids[:, None, None, :]
        ).astype(jnp.bool_)


jax.tree_util.register_dataclass(
    SegmentMask, data_fields=["q_segment_ids", "kv_segment_ids"], meta_fields=[]
)


def attention_arguments(backend: str, segments: SegmentMask | None) -> dict[str, jax.Array]:
    """The keyword arguments that express `segments` to `backend`'s attention op.

    flashjax takes `q_segment_ids` / `kv_segment_ids`; jax.nn ("xla", "cudnn") a boolean `mask`
    (`(B, 1, T, S)`, broadcast over heads). No segments: no arguments.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if segments is None:
        return {}
    if backend == "flashjax":
        return {
            "q_segment_ids": segments.q_segment_ids.astype(jnp.int32),
            "kv_segment_ids": segments.kv_segment_ids.astype(jnp.int32),
        }
    return {"mask": segments.dense()}


def _and_masks(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    if a is None or b is None:
        return b if a is None else a
    return jnp.logical_and(a.astype(jnp.bool_), b.astype(jnp.bool_))


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """The sequence axis sharded over `axis` of `mesh` (ring attention), in `layout`.

    Attributes:
      mesh: the device mesh; `axis` is the one that shards the sequence.
      axis: the mesh axis name.
      layout: "zigzag" (balanced causal work: rows are reordered, `order`) or "contiguous".
    """

    mesh: Mesh
    axis: str = "context"
    layout: str = "zigzag"

    @property
    def size(self) -> int:
        """Devices the sequence is sharded over."""
        return self.mesh.shape[self.axis]

    def order(self, x: np.ndarray) -> np.ndarray:
        """A global `(..., T)` host array in the layout's row order (along the last axis)."""
        if self.layout == "zigzag":
            return flashjax.zigzag_permute(x, self.size, axis=-1)
        return x

    def sharding(self, ndim: int) -> NamedSharding:
        """Token arrays `(..., T)` of rank `ndim`: sharded on the sequence (last) axis."""
        return NamedSharding(self.mesh, PartitionSpec(*([None] * (ndim - 1)), self.axis))

    def replicated(self) -> NamedSharding:
        """Parameters and optimizer state: a full copy on every device of the mesh."""
        return NamedSharding(self.mesh, PartitionSpec())


def _ring_attention(
    context: ContextParallel,
    implementation: str | None,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    segments: dict[str, jax.Array],
    is_causal: bool,
) -> jax.Array:
    """`flashjax.ring_attention` over `(B, T, N, H)` activations whose T is sharded on the
    context axis (segment ids `(B, T)` likewise)."""
    spec = PartitionSpec(None, context.axis)
    names = tuple(segments)

    def per_device(q, k, v, *segs):
        return flashjax.ring_attention(
            q,
            k,
            v,
            axis_name=context.axis,
            is_causal=is_causal,
            layout=context.layout,
            implementation=implementation,
            **dict(zip(names, segs, strict=True)),
        )

    mapped = jax.shard_map(
        per_device, mesh=context.mesh, in_specs=(spec,) * (3 + len(names)), out_specs=spec
    )
    return mapped(query, key, value, *segments.values())


@dataclasses.dataclass(frozen=True)
class AttentionFn:
    """A Flax `attention_fn` (the calling convention of `flax.nnx.dot_product_attention`) that
    computes attention with `backend`. Frozen and hashable: modules built with equal AttentionFns
    have equal graph definitions.

    Attributes:
      backend: "flashjax", "xla" or "cudnn"; or `NO_ATTENTION` ("none"), the timing floor (the
        output is the value: the model then trains without attention).
      implementation: for "flashjax" only, `flashjax.dot_product_attention`'s `implementation`
        (None: the fastest available: "mosaic" on Hopper, "triton" on other NVIDIA GPUs;
        "xla_chunked" on CPU; or any name of `flashjax.backends.NAMES`).
      context: for "flashjax" only: the sequence sharded over a mesh axis, attention by
        `flashjax.ring_attention` (None: one device's attention).
    """

    backend: Backend = "flashjax"
    implementation: str | None = None
    context: ContextParallel | None = None

    def __post_init__(self) -> None:
        if self.backend not in TIMED_BACKENDS:
            raise ValueError(f"backend must be one of {TIMED_BACKENDS}, got {self.backend!r}")
        if self.implementation is not None and self.backend != "flashjax":
            raise ValueError("implementation applies to the flashjax backend only")
        if self.context is not None and self.backend != "flashjax":
            raise ValueError("context parallelism (ring attention) needs the flashjax backend")

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | SegmentMask | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        is_causal: bool = False,
    ) -> jax.Array:
        """Attention of `Float[Array, "B T N H"]` queries over `Float[Array, "B S K H"]` keys and
        values; returns `Float[Array, "B T N H"]`.

        `mask` is a boolean `(B | 1, N | 1, T, S)` array or a `SegmentMask`. flashjax goes through
        the library's own Flax swap-in, `flashjax.flax_attention_fn`; for jax.nn, attention
        dropout and `sow_weights` are not supported (the GPT-2 here uses neither).
        """
        if self.backend == NO_ATTENTION:
            return value if dtype is None else value.astype(dtype)
        segments = mask if isinstance(mask, SegmentMask) else None
        dense = None if segments is not None else mask
        args = attention_arguments(self.backend, segments)
        if self.context is not None:
            if bias is not None or dense is not None:
                raise NotImplementedError("context parallelism takes segment ids, not masks")
            if dropout_rate > 0.0 and not deterministic:
                raise NotImplementedError("attention dropout is not supported with ring attention")
            if dtype is not None:
                query, key, value = (x.astype(dtype) for x in (query, key, value))
            return _ring_attention(
                self.context, self.implementation, query, key, value, args, is_causal
            )
        if self.backend == "flashjax":
            return flashjax.flax_attention_fn(
                query,
                key,
                value,
                bias,
                dense,
                broadcast_dropout,
                dropout_rng,
                dropout_rate,
                deterministic,
                dtype,
                precision,
                module,
                is_causal,
                implementation=self.implementation,  # type: ignore[arg-type]
                **args,
            )
        del broadcast_dropout, dropout_rng, precision
        if dropout_rate > 0.0 and not deterministic:
            raise NotImplementedError("attention dropout is not supported with jax.nn here")
        if module is not None:
            raise NotImplementedError("sow_weights=True: the attention weights are not formed")
        if query.ndim != 4:
            raise ValueError(f"query must be (B, T, N, H), got shape {query.shape}")
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias,
            _and_masks(dense, args.get("mask")),
            is_causal=is_causal,
            implementation=self.backend,  # type: ignore[arg-type]
        )


@dataclasses.dataclass(frozen=True)
class CacheAttention:
    """The two attentions of generation with a KV cache, per backend: the prompt's causal
    attention (prefill) and the new token's attention over the cache (a decode step).

    Attributes:
      backend: "flashjax", "xla" or "cudnn"; or `NO_ATTENTION` ("none"), the timing floor (its
        text is noise).
      implementation: for "flashjax" only, `flashjax.decode_attention`'s `implementation` for
        the decode steps (None: the fastest available, "triton_decode" on NVIDIA GPUs); the
        prefill takes `dot_product_attention`'s default.
    """

    backend: str = "flashjax"
    implementation: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in TIMED_BACKENDS:
            raise ValueError(f"backend must be one of {TIMED_BACKENDS}, got {self.backend!r}")
        if self.implementation is not None and self.backend != "flashjax":
            raise ValueError("implementation applies to the flashjax backend only")

    def prefill(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Causal attention of the prompt: `Float[Array, "B T N H"]` q, k, v -> out."""
        if self.backend == NO_ATTENTION:
            return v
        if self.backend == "flashjax":
            return flashjax.dot_product_attention(q, k, v, is_causal=True)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.backend)

    def step(
        self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array
    ) -> jax.Array:
        """One new token per row, `Float[Array, "B 1 N H"]`, over caches `Float[Array, "B S N H"]`
        holding `Int[Array, "B"]` keys (the token's own included)."""
        if self.backend == NO_ATTENTION:
            return q
        if self.backend == "flashjax":
            return flashjax.decode_attention(
                q, k_cache, v_cache, lengths, implementation=self.implementation
            )
        return jax.nn.dot_product_attention(
            q, k_cache, v_cache, key_value_seq_lengths=lengths, implementation=self.backend
        )
