"""`"triton_decode"`: the split-KV decoding kernel (pallas_kernels/triton/decode.py) for decode
steps: few queries per KV head against a long KV cache, contiguous or paged.

First in the registry's order: `implementation=None` on a GPU takes it for every call it serves,
and it serves only decode-shaped calls (at most `configs.DECODE_MAX_QUERIES` queries and
`configs.DECODE_MAX_ROWS` query rows per KV head, no more queries than keys) without a bias,
mask, segment ids, block mask or dropout; everything else goes on to the training kernels.
Offsets, lengths, windows, causality and soft-capping are THE visibility rule's, as everywhere.

The forward is the split kernel and, for several splits, its merge kernel; the backward is the
training kernels' (`triton`), which recompute from `(out, logsumexp)`. For a paged cache the
backward runs on the gathered pages and sums the key/value gradients back into them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from flashjax.backends import Backend, triton
from pallas_kernels import common, configs
from pallas_kernels.configs import DecodeConfig
from pallas_kernels.operands import Operands, cotangent, gather_pages, scatter_pages
from pallas_kernels.triton import decode_api


def forward(
    ops: Operands, num_splits: int | None = None, config: DecodeConfig | None = None
) -> tuple[jax.Array, jax.Array]:
    """`(out (B, T, N, H), logsumexp (B, T, N) natural, float32)`; `num_splits` None: the
    kernel's plan chooses; `config`: tiles other than configs.py's (benchmarks/tune_decode.py)."""
    out, lse2 = decode_api.forward(ops, num_splits, config=config)
    lse = lse2 * common.LN2
    b, t = ops.batch, ops.seq_q  # (B, T, K, G, ...) -> (B, T, N, ...)
    return out.reshape(ops.q.shape).astype(ops.q.dtype), lse.reshape(b, t, ops.num_heads)


def _backward(ops: Operands, out, lse, dout, dlse) -> Operands:
    if ops.page_table is None:
        return triton.BACKEND.backward(ops, out, lse, dout, dlse)
    grads = triton.BACKEND.backward(gather_pages(ops), out, lse, dout, dlse)
    return cotangent(ops, q=grads.q, k=scatter_pages(ops, grads.k), v=scatter_pages(ops, grads.v))


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def unsupported(ops: Operands) -> str | None:
    """Why the decode kernel cannot serve `ops` (None: it can)."""
    why = triton.BACKEND.unsupported(ops)  # dtype, traced scale, platform
    if why is not None:
        return why
    features = {
        "a bias or mask": ops.bias is not None,
        "segment ids": ops.has_segments,
        "a block mask": ops.has_block_mask,
        "dropout": ops.statics.has_dropout,
    }
    for name, present in features.items():
        if present:
            return f"{name} (the decode kernel takes lengths, offsets and windows only)"
    if ops.seq_q > configs.DECODE_MAX_QUERIES:
        return (
            f"{ops.seq_q} queries, more than the {configs.DECODE_MAX_QUERIES} new tokens of a "
            "decode step"
        )
    rows = decode_api.padded_rows(ops.seq_q, ops.group)
    if rows > configs.DECODE_MAX_ROWS:
        return (
            f"{ops.seq_q} queries x {ops.group} query heads per KV head = {rows} rows (each "
            f"padded to a power of two), more than the {configs.DECODE_MAX_ROWS} one decode "
            "program packs (not a decode step)"
        )
    if ops.seq_q > ops.seq_k:
        return f"more queries ({ops.seq_q}) than keys ({ops.seq_k}): not a decode step"
    if ops.page_table is not None and not _is_power_of_two(ops.page_size):
        return f"page size {ops.page_size} (the decode kernel takes powers of two)"
    return None


@functools.cache
def backend_with(num_splits: int | None) -> Backend:
    """The backend with the keys cut into `num_splits` parts (None: the plan chooses); one object
    per value, so equal calls trace alike."""
    if num_splits is None:
        return BACKEND
    return dataclasses.replace(BACKEND, forward=functools.partial(forward, num_splits=num_splits))


BACKEND = Backend(
    name="triton_decode",
    forward=forward,
    backward=_backward,
    unsupported=unsupported,
    platforms=("gpu",),
    description="split-KV decoding kernel (Flash-Decoding, GQA-packed, paged caches), Triton",
    kernels=True,
    pages=True,
)
