"""flashjax: FlashAttention for JAX, as Pallas kernels."""

from flashjax import block_masks
from flashjax.attention import dot_product_attention
from flashjax.block_mask import BlockMask
from flashjax.decode import decode_attention
from flashjax.flax_attention import flax_attention_fn
from flashjax.merge import merge_attention, merge_attention_parts
from flashjax.ring import ring_attention, zigzag_permute, zigzag_unpermute

__all__ = [
    "BlockMask",
    "block_masks",
    "decode_attention",
    "dot_product_attention",
    "flax_attention_fn",
    "merge_attention",
    "merge_attention_parts",
    "ring_attention",
    "zigzag_permute",
    "zigzag_unpermute",
]
