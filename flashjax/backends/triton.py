"""`"triton"`: the Pallas kernels on the Triton lowering (pallas_kernels/triton), FA2 forward and
backward; any NVIDIA GPU >= sm80, and in interpret mode on CPU (tests).

The backward recomputes the scores in the kernels from `(out, logsumexp)`. A bias
that needs a gradient gets it blockwise in XLA (`chunked.bias_grad`; removed by XLA when unused).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flashjax.backends import Backend, chunked
from pallas_kernels import common
from pallas_kernels.operands import Operands, cotangent
from pallas_kernels.triton import api

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _forward(ops: Operands) -> tuple[jax.Array, jax.Array]:
    out, lse2 = api.forward(ops)
    return out, jnp.swapaxes(lse2, 1, 2) * common.LN2  # base-2 (B, N, T) -> natural (B, T, N)


def _backward(ops: Operands, out, lse, dout, dlse) -> Operands:
    lse2 = jnp.swapaxes(lse, 1, 2).astype(jnp.float32) * common.LOG2E
    dq, dk, dv = api.backward(ops, out, lse2, dout, dlse)
    dbias = None
    if ops.bias is not None:
        dbias = chunked.bias_grad(ops, out, lse, dout, dlse)
    return cotangent(ops, q=dq, k=dk, v=dv, bias=dbias)


def _unsupported(ops: Operands) -> str | None:
    if jnp.dtype(ops.q.dtype) not in _DTYPES:
        return f"dtype {ops.q.dtype} (the kernels take bfloat16, float16 and float32)"
    if ops.scale is not None:
        return "a traced scale (the kernels need a static float; use xla_chunked or xla)"
    platform = jax.devices()[0].platform
    if platform not in ("gpu", "cpu"):
        return f"platform {platform!r} (Triton kernels need an NVIDIA GPU; CPU interprets them)"
    return None


BACKEND = Backend(
    name="triton",
    forward=_forward,
    backward=_backward,
    unsupported=_unsupported,
    platforms=("gpu",),
    description="Pallas kernels on the Triton lowering (FA2), interpret mode on CPU",
    kernels=True,
)
