"""GPT-2 in Flax NNX: pre-LN blocks, learned positions, tied input / output embeddings.

Attention is Flax's own `nnx.MultiHeadAttention`, its `attention_fn` chosen by backend
(`attention.AttentionFn`): the parameter tree is the same for every backend, so one checkpoint or
one initialization serves all of them.

Mixed precision: parameters are float32 (the optimizer's master weights); matmuls, attention and
the MLP run in `config.dtype` (bfloat16 by default); the residual stream, layer-norm statistics
and the logits / loss are float32 (what PyTorch's autocast does for GPT-2).

The blocks are stacked (one parameter array per kind, leading axis = layer) and applied with
`nnx.scan`, so a 12- or 24-layer model compiles as fast as one block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from examples.gpt2.attention import AttentionFn, SegmentMask


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model shape and numerics.

    Attributes:
      name: "tiny", "small" (GPT-2 124M), "medium" (GPT-2 350M), or anything.
      vocab_size: rows of the (tied) token embedding. small / medium keep GPT-2's 50304 (50257
        padded to a multiple of 64) so that their size and cost are GPT-2's; the byte tokenizer
        uses ids 0..256 of them.
      max_seq_len: rows of the learned position embedding.
      num_layers, num_heads, d_model: GPT-2's n_layer, n_head, n_embd (head dim d_model/num_heads).
      dtype: compute dtype ("bfloat16" or "float32"); parameters are always float32.
      remat: recompute each block's activations in the backward pass (less memory, ~30% more
        compute).
    """

    name: str = "tiny"
    vocab_size: int = 320
    max_seq_len: int = 256
    num_layers: int = 2
    num_heads: int = 4
    d_model: int = 128
    dtype: str = "bfloat16"
    remat: bool = False

    @property
    def head_dim(self) -> int:
        """d_model // num_heads."""
        return self.d_model // self.num_heads

    def num_params(self) -> int:
        """Parameter count (tied embedding counted once)."""
        d, layers = self.d_model, self.num_layers
        block = 4 * d * d + 4 * d + 8 * d * d + 5 * d + 4 * d
        return self.vocab_size * d + self.max_seq_len * d + layers * block + 2 * d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), dense matmuls plus causal
        attention (half the T x T scores): 6 N + 6 L T d (PaLM's appendix B with the causal
        halving)."""
        dense = self.num_params() - self.max_seq_len * self.d_model
        return 6.0 * dense + 6.0 * self.num_layers * seq_len * self.d_model


CONFIGS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(),
    "small": GPTConfig("small", 50304, 1024, 12, 12, 768),
    "medium": GPTConfig("medium", 50304, 1024, 24, 16, 1024),
}


def get_config(name: str, **overrides: Any) -> GPTConfig:
    """The named config with fields replaced by `overrides` (None values are ignored)."""
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {name!r}")
    return dataclasses.replace(
        CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None}
    )


def _normal(stddev: float) -> nnx.Initializer:
    return nnx.initializers.normal(stddev)


class Block(nnx.Module):
    """Pre-LN transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

    def __init__(self, config: GPTConfig, attention_fn: AttentionFn, *, rngs: nnx.Rngs) -> None:
        dtype = jnp.dtype(config.dtype)
        d = config.d_model
        residual_init = _normal(0.02 / math.sqrt(2 * config.num_layers))
        self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=config.num_heads,
            in_features=d,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=_normal(0.02),
            out_kernel_init=residual_init,
            attention_fn=attention_fn,
            decode=False,
            deterministic=True,
            keep_rngs=False,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(d, 4 * d, dtype=dtype, kernel_init=_normal(0.02), rngs=rngs)
        self.proj = nnx.Linear(4 * d, d, dtype=dtype, kernel_init=residual_init, rngs=rngs)

    def __call__(self, x: jax.Array, segments: SegmentMask | None) -> jax.Array:
        """`Float[Array, "B T D"]` float32 residual stream in and out."""
        h = self.attn(self.ln1(x), mask=segments, is_causal=True)
        return self.mlp(x + h.astype(jnp.float32))

    def mlp(self, x: jax.Array) -> jax.Array:
        """The block's second half, `x + mlp(ln2(x))`, on the float32 residual stream."""
        h = self.proj(jax.nn.gelu(self.fc(self.ln2(x)), approximate=True))
        return x + h.astype(jnp.float32)


class GPT(nnx.Module):
    """GPT-2: token + position embeddings, `num_layers` blocks, final LayerNorm, tied LM head."""

    def __init__(
        self,
        config: GPTConfig,
        attention_fn: AttentionFn | None = None,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.config = config
        attention_fn = attention_fn if attention_fn is not None else AttentionFn("flashjax")
        dtype = jnp.dtype(config.dtype)
        self.wte = nnx.Embed(
            config.vocab_size, config.d_model, dtype=dtype, embedding_init=_normal(0.02), rngs=rngs
        )
        self.wpe = nnx.Embed(
            config.max_seq_len, config.d_model, dtype=dtype, embedding_init=_normal(0.02), rngs=rngs
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, attention_fn, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.ln_f = nnx.LayerNorm(config.d_model, epsilon=1e-5, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states (before the LM head).

        Args:
          tokens: `Int[Array, "B T"]`.
          segment_ids: `Int[Array, "B T"]` or None (one document per row).
          positions: `Int[Array, "B T"]` indices into the position embedding (default 0..T-1).

        Returns:
          `Float[Array, "B T D"]` in the compute dtype.
        """
        seq_len = tokens.shape[-1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len {self.config.max_seq_len}"
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq_len), tokens.shape)
        x = self.embed(tokens, positions)
        segments = None if segment_ids is None else SegmentMask(segment_ids, segment_ids)

        def body(x: jax.Array, block: Block) -> jax.Array:
            return block(x, segments)

        if self.config.remat:
            body = nnx.remat(body)
        x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
        return self.ln_f(x)

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """The float32 residual stream `Float[Array, "B T D"]` of `Int[Array, "B T"]` tokens at
        `Int[Array, "B T"]` positions: token plus position embedding."""
        return (self.wte(tokens) + self.wpe(positions)).astype(jnp.float32)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`Float[Array, "... V"]` float32 logits of `Float[Array, "... D"]` hidden states (tied
        embedding; compute dtype inputs, float32 accumulation and output)."""
        return tied_logits(hidden, self.wte.embedding[...], self.config.dtype)


def tied_logits(hidden: jax.Array, embedding: jax.Array, dtype: Any) -> jax.Array:
    """`hidden @ embedding.T` in `dtype` with float32 accumulation and output.

    Args:
      hidden: `Float[Array, "... D"]`.
      embedding: `Float[Array, "V D"]`.
      dtype: the compute dtype of the matmul's inputs.
    """
    dtype = jnp.dtype(dtype)
    return jnp.einsum(
        "...d,vd->...v",
        hidden.astype(dtype),
        embedding.astype(dtype),
        preferred_element_type=jnp.float32,
    )
