"""flashjax: FlashAttention for JAX, as Pallas kernels."""

from flashjax.attention import dot_product_attention

__all__ = ["dot_product_attention"]
