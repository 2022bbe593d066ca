"""flashjax: FlashAttention for JAX, as Pallas kernels."""

from flashjax import block_masks
from flashjax.attention import dot_product_attention
from flashjax.block_mask import BlockMask
from flashjax.flax_attention import flax_attention_fn
from flashjax.merge import merge_attention
from flashjax.ring import ring_attention, zigzag_permute, zigzag_unpermute

__all__ = [
    "BlockMask",
    "block_masks",
    "dot_product_attention",
    "flax_attention_fn",
    "merge_attention",
    "ring_attention",
    "zigzag_permute",
    "zigzag_unpermute",
]
