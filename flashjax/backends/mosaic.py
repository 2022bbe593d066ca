"""`"mosaic"`: Hopper kernels on Pallas' Mosaic GPU backend (pallas_kernels/mosaic), the FA3
design: TMA producer warpgroup, two consumer warpgroups in ping-pong, wgmma from shared memory and
registers. The default (`implementation=None`) on sm90 for every call it serves; the rest
(head-dependent or finely blocked block masks, a traced scale) goes to "triton". The backward runs
the Mosaic dK/dV and dQ kernels (or at head dim 64 one kernel) without a bias, and hands a bias
call and head dim 192 to the Triton kernels (configs.MOSAIC_BACKWARD_ON_TRITON).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flashjax.backends import Backend, triton
from pallas_kernels import common, configs, visibility
from pallas_kernels.mosaic import api
from pallas_kernels.operands import KvSource, Operands, cotangent

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _forward(ops: Operands, kv_source: KvSource | None = None) -> tuple[jax.Array, jax.Array]:
    out, lse2 = api.forward(ops, kv_source=kv_source)
    return out, jnp.swapaxes(lse2, 1, 2) * common.LN2


def _backward(ops: Operands, out, lse, dout, dlse) -> Operands:
    # Triton's backward kernels: faster at some head dims (configs.py), and they (with the
    # chunked path's d bias) serve a bias, which the Mosaic forward reads but its backward not.
    if api.backward_on_triton(ops.head_dim) or ops.bias is not None:
        return triton.BACKEND.backward(ops, out, lse, dout, dlse)
    lse2 = jnp.swapaxes(lse, 1, 2).astype(jnp.float32) * common.LOG2E
    dq, dk, dv = api.backward(ops, out, lse2, dout, dlse)
    return cotangent(ops, q=dq, k=dk, v=dv)


def _block_mask_fits(ops: Operands) -> bool:
    """The kernels walk one visit list per (batch row, CTA tile): the mask must not depend on the
    head, and its blocks must be made of whole CTA tiles of each kernel."""
    tiles = api.cta_tiles(ops.head_dim)
    return ops.block_states.shape[1] == 1 and all(
        visibility.tile_divides_mask(ops.statics, *tile) for tile in tiles
    )


def _unsupported(ops: Operands) -> str | None:
    if jnp.dtype(ops.q.dtype) not in _DTYPES:
        return f"dtype {ops.q.dtype} (the Mosaic kernels take bfloat16 and float16)"
    if configs.gpu_target() not in ("sm90", "interpret"):
        return "a GPU other than Hopper (sm90)"
    # `ops.statics.deterministic` is served: the two-kernel backward has no atomics, and
    # api.backward turns BackwardConfig.fused_dq (dQ by TMA reduce-add) off for it.
    features = {
        "a traced scale": ops.scale is not None,
        f"a block mask that depends on the head or whose blocks are not whole CTA tiles "
        f"{api.cta_tiles(ops.head_dim)}": ops.has_block_mask and not _block_mask_fits(ops),
    }
    missing = [name for name, present in features.items() if present]
    if missing:
        return ", ".join(missing) + " (not in the Mosaic kernels yet)"
    return None


BACKEND = Backend(
    name="mosaic",
    forward=_forward,
    backward=_backward,
    unsupported=_unsupported,
    platforms=("gpu",),  # sm90 only: `_unsupported` declines other GPUs
    description="Hopper kernels on Mosaic GPU (FA3 forward; two-kernel backward)",
    kernels=True,
    forward_in_place=_forward,
)
