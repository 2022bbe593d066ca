"""Host side of the Hopper kernels on Mosaic GPU: tiles from configs.py, padding, launch.

Any T, S >= 1 and head dims 1..256: queries are zero-padded to a multiple of the CTA's rows (two
consumer warpgroups of block_q), keys to a multiple of block_kv, the head dim to a multiple of 64
(zeros change no dot product); padded rows and keys lie past the real lengths, which the
visibility rule hides. On CPU the kernels run in Mosaic GPU interpret mode with race detection.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import configs
from pallas_kernels.mosaic import forward as _forward
from pallas_kernels.operands import Operands


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def forward_config(head_dim: int) -> _forward.ForwardConfig:
    padded = _round_up(head_dim, configs.MOSAIC_HEAD_DIM_MULTIPLE)
    block_q, block_kv, stages = configs.MOSAIC_FORWARD[padded]
    return _forward.ForwardConfig(block_q=block_q, block_kv=block_kv, stages=stages)


def interpret_params(interpret: bool | None = None) -> plgpu.InterpretGPUParams | None:
    """Interpret mode (with the race detector) off the GPU, None on the GPU; `interpret` forces
    one or the other (False: lower for the GPU from anywhere, as the lowering tests do)."""
    if interpret is None:
        interpret = configs.gpu_target() == "interpret"
    return plgpu.InterpretGPUParams(detect_races=True) if interpret else None


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jax.numpy.pad(x, widths)


def forward(ops: Operands, interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """`out (B, T, N, H)` in q's dtype and base-2 logsumexp `lse2 (B, N, T)` float32.
    `interpret`: None picks interpret mode off the GPU (see `interpret_params`)."""
    cfg = forward_config(ops.head_dim)
    t = _round_up(ops.seq_q, _forward.CONSUMERS * cfg.block_q)
    s = _round_up(ops.seq_k, cfg.block_kv)
    d = _round_up(ops.head_dim, configs.MOSAIC_HEAD_DIM_MULTIPLE)
    q = _pad(_pad(ops.q, 1, t), 3, d)
    k = _pad(_pad(ops.k, 1, s), 3, d)
    v = _pad(_pad(ops.v, 1, s), 3, d)
    out, lse2 = _forward.forward(
        q,
        k,
        v,
        statics=ops.statics,
        config=cfg,
        seq_lens=(ops.seq_q, ops.seq_k),
        interpret=interpret_params(interpret),
    )
    return out[:, : ops.seq_q, :, : ops.head_dim], lse2[:, :, : ops.seq_q]
