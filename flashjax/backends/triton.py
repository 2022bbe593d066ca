"""`"triton"`: the Pallas kernels on the Triton lowering (pallas_kernels/triton), FA2 forward and
backward; any NVIDIA GPU >= sm80, and in interpret mode on CPU (tests).

The custom_vjp keeps `(out, lse2)` and the backward recomputes the scores in the kernels. A bias
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


def _lse(lse2: jax.Array) -> jax.Array:
    """Base-2 `(B, N, T)` -> natural-log `(B, T, N)`."""
    return jnp.swapaxes(lse2, 1, 2) * common.LN2


@jax.custom_vjp
def _attention(ops: Operands) -> tuple[jax.Array, jax.Array]:
    out, lse2 = api.forward(ops)
    return out, _lse(lse2)


def _attention_fwd(ops):
    out, lse2 = api.forward(ops)
    return (out, _lse(lse2)), (ops, out, lse2)


def _attention_bwd(residuals, cotangents):
    ops, out, lse2 = residuals
    dout, dlse = cotangents
    dq, dk, dv = api.backward(ops, out, lse2, dout, dlse)
    dbias = None
    if ops.bias is not None:
        dbias = chunked.bias_grad(ops, out, _lse(lse2), dout, dlse)
    return (cotangent(ops, q=dq, k=dk, v=dv, bias=dbias),)


_attention.defvjp(_attention_fwd, _attention_bwd)


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
    run=_attention,
    unsupported=_unsupported,
    platforms=("gpu",),
    description="Pallas kernels on the Triton lowering (FA2), interpret mode on CPU",
    kernels=True,
)
