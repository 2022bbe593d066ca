"""Host-side entry points of the Triton-lowered kernels: fit the tiles, pad, launch, unpad.

Any T, S >= 1 and head dims 1..256 are accepted: sequences are zero-padded to a multiple of the
tiles (padded keys are masked through `AttentionStatics.kv_len`; padded queries are sliced off) and
the head dim to a power of two (zeros change no dot product). Inputs whose shapes already fit are
passed through untouched.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import common, configs
from pallas_kernels.triton import backward as _backward
from pallas_kernels.triton import forward as _forward


@dataclasses.dataclass(frozen=True)
class Plan:
    """Tiles fitted to one call's shapes, and the padded lengths they imply."""

    config: configs.AttentionConfig
    seq_q: int
    seq_k: int
    head_dim: int
    interpret: bool


def plan(
    seq_q: int,
    seq_k: int,
    head_dim: int,
    target: str | None = None,
    *,
    bias_shape: tuple[int, ...] | None = None,
    itemsize: int = 2,
    config: configs.AttentionConfig | None = None,
) -> Plan:
    """Fit the config of `target` (default: the current device; or an explicit `config`) to a
    call's shapes."""
    target = target or configs.gpu_target()
    base = config or configs.get_config(head_dim, target)
    full_bias = bias_shape is not None and bias_shape[2] > 1 and bias_shape[3] > 1

    def fit(c: configs.KernelConfig) -> configs.KernelConfig:
        return dataclasses.replace(
            c,
            block_q=configs.fit_block(c.block_q, seq_q),
            block_k=configs.fit_block(c.block_k, seq_k),
            num_stages=configs.stages_that_fit(
                c, configs.head_dim_bucket(head_dim), itemsize, full_bias
            ),
        )

    config = configs.AttentionConfig(fit(base.fwd), fit(base.dkdv), fit(base.dq))
    kernels = (config.fwd, config.dkdv, config.dq)
    q_mult = max(c.block_q for c in kernels)
    k_mult = max(c.block_k for c in kernels)
    return Plan(
        config=config,
        seq_q=-(-seq_q // q_mult) * q_mult,
        seq_k=-(-seq_k // k_mult) * k_mult,
        head_dim=configs.head_dim_bucket(head_dim),
        interpret=target == "interpret",
    )


def _prepare(q, k, bias, statics, target, config) -> tuple[Plan, common.AttentionStatics]:
    """The plan of one call, and its statics with the real key count filled in."""
    p = plan(
        q.shape[1],
        k.shape[1],
        q.shape[3],
        target,
        bias_shape=None if bias is None else tuple(bias.shape),
        itemsize=q.dtype.itemsize,
        config=config,
    )
    return p, dataclasses.replace(statics, kv_len=k.shape[1])


def _pad_axis(x: jax.Array | None, axis: int, size: int) -> jax.Array | None:
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _pad_operands(p: Plan, q, k, v, q_segments, kv_segments, bias):
    q = _pad_axis(_pad_axis(q, 1, p.seq_q), 3, p.head_dim)
    k = _pad_axis(_pad_axis(k, 1, p.seq_k), 3, p.head_dim)
    v = _pad_axis(_pad_axis(v, 1, p.seq_k), 3, p.head_dim)
    q_segments = _pad_axis(q_segments, 1, p.seq_q)
    kv_segments = _pad_axis(kv_segments, 1, p.seq_k)
    if bias is not None:
        if bias.shape[2] > 1:
            bias = _pad_axis(bias, 2, p.seq_q)
        if bias.shape[3] > 1:
            bias = _pad_axis(bias, 3, p.seq_k)
    return q, k, v, q_segments, kv_segments, bias


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    bias: jax.Array | None,
    seeds: jax.Array | None,
    statics: common.AttentionStatics,
    target: str | None = None,
    config: configs.AttentionConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention forward.

    Args:
      q: `(B, T, N, H)`; k, v: `(B, S, K, H)` with N a multiple of K; one float dtype.
      q_segments / kv_segments: int32 `(B, T)` / `(B, S)`, or None (then `statics.has_segments`
        is False).
      bias: float32 `(Bb, Nb, Tb, Sb)`, each axis 1 or full; -inf hides an element.
      seeds: uint32 `(2,)` when `statics.dropout_rate > 0`, else None.
      statics: the static description of the call; `kv_len` is filled in here.
      target / config: override the device target or the tiles (tuning, tests).
    Returns:
      `out (B, T, N, H)` in q's dtype and base-2 logsumexp `lse2 (B, N, T)` float32.
    """
    seq_q, head_dim = q.shape[1], q.shape[3]
    p, statics = _prepare(q, k, bias, statics, target, config)
    operands = _pad_operands(p, q, k, v, q_segments, kv_segments, bias)
    out, lse2 = _forward.forward(
        *operands, seeds, statics=statics, config=p.config.fwd, interpret=p.interpret
    )
    return out[:, :seq_q, :, :head_dim], lse2[:, :, :seq_q]


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse2: jax.Array,
    dout: jax.Array,
    dlse2: jax.Array | None,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    bias: jax.Array | None,
    seeds: jax.Array | None,
    statics: common.AttentionStatics,
    target: str | None = None,
    config: configs.AttentionConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) of `forward`'s outputs; arguments as there, plus the residuals.

    `dlse2` is the cotangent of the base-2 logsumexp (None if unused): since d lse / d logits = P,
    it enters as `delta -= dlse` (in natural-log units).
    """
    seq_q, head_dim = q.shape[1], q.shape[3]
    p, statics = _prepare(q, k, bias, statics, target, config)
    delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse2 is not None:
        delta = delta - dlse2 * common.LOG2E
    q_, k_, v_, q_segments, kv_segments, bias = _pad_operands(
        p, q, k, v, q_segments, kv_segments, bias
    )
    do_ = _pad_axis(_pad_axis(dout.astype(q.dtype), 1, p.seq_q), 3, p.head_dim)
    lse_ = _pad_axis(lse2, 2, p.seq_q)
    delta = _pad_axis(delta, 2, p.seq_q)
    dq, dk, dv = _backward.backward(
        q_,
        k_,
        v_,
        do_,
        lse_,
        delta,
        q_segments,
        kv_segments,
        bias,
        seeds,
        statics=statics,
        dkdv_config=p.config.dkdv,
        dq_config=p.config.dq,
        interpret=p.interpret,
    )
    seq_k = k.shape[1]
    return dq[:, :seq_q, :, :head_dim], dk[:, :seq_k, :, :head_dim], dv[:, :seq_k, :, :head_dim]
