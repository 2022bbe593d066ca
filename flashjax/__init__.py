"""flashjax: FlashAttention for JAX, as Pallas kernels."""

from flashjax.attention import dot_product_attention
from flashjax.flax_attention import flax_attention_fn

__all__ = ["dot_product_attention", "flax_attention_fn"]
