"""Host side of the Triton-lowered kernels: fit the tiles, pad, build each launch's `Refs`, unpad.

Any T, S >= 1 and head dims 1..256 are accepted: sequences are zero-padded to a multiple of the
tiles (padded rows and keys lie past the real lengths, which the visibility rule hides) and the
head dim to a power of two (zeros change no dot product). Inputs whose shapes already fit are
passed through untouched. With segment ids or a block mask, each kernel gets visit lists at its
own tiles (`visibility.block_states` -> `visit_lists`; transposed for dK/dV); otherwise the kernels
compute their ranges in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import configs, visibility
from pallas_kernels.host import backward_rows, pad_axis, padded_qkv
from pallas_kernels.operands import Operands
from pallas_kernels.triton import backward as _backward
from pallas_kernels.triton import forward as _forward
from pallas_kernels.triton.tiles import Refs


@dataclasses.dataclass(frozen=True)
class Plan:
    """Tiles fitted to one call's shapes, and the padded lengths they imply (kernel state)."""

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
    mask_block: tuple[int, int] | None = None,
) -> Plan:
    """Fit the config of `target` (default: the current device; or an explicit `config`) to a
    call's shapes, and to the block mask's block size (tiles divide it)."""
    target = target or configs.gpu_target()
    base = config or configs.get_config(head_dim, target)
    full_bias = bias_shape is not None and bias_shape[2] > 1 and bias_shape[3] > 1

    def fit(c: configs.KernelConfig) -> configs.KernelConfig:
        return dataclasses.replace(
            c,
            block_q=visibility.mask_tile(mask_block, configs.fit_block(c.block_q, seq_q), 0),
            block_k=visibility.mask_tile(mask_block, configs.fit_block(c.block_k, seq_k), 1),
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


def plan_of(ops: Operands, target: str | None = None, config=None) -> Plan:
    return plan(
        ops.seq_q,
        ops.seq_k,
        ops.head_dim,
        target,
        bias_shape=None if ops.bias is None else tuple(ops.bias.shape),
        itemsize=ops.q.dtype.itemsize,
        config=config,
        mask_block=ops.statics.mask_block,
    )


def _refs(p: Plan, ops: Operands) -> Refs:
    """The padded operands every kernel of the call reads (no visit lists yet)."""
    bias = ops.bias
    if bias is not None:
        bias = bias.astype(jnp.float32)
        if bias.shape[2] > 1:
            bias = pad_axis(bias, 2, p.seq_q)
        if bias.shape[3] > 1:
            bias = pad_axis(bias, 3, p.seq_k)
    q, k, v = padded_qkv(ops, p.seq_q, p.seq_k, p.head_dim)
    return Refs(
        q=q,
        k=k,
        v=v,
        seq=ops.seq_info() if ops.has_seq_info else None,
        bias=bias,
        q_segments=pad_axis(ops.q_segments, 1, p.seq_q),
        kv_segments=pad_axis(ops.kv_segments, 1, p.seq_k),
        seeds=ops.seeds,
    )


def _launch(ops: Operands, p: Plan) -> dict:
    """The keywords every kernel launch of the call shares."""
    return dict(statics=ops.statics, interpret=p.interpret, static_seq=(0, 0, ops.seq_q, ops.seq_k))


def _with_lists(
    r: Refs, p: Plan, ops: Operands, c: configs.KernelConfig, *, transposed: bool = False
) -> Refs:
    """`r` with the visit lists of a kernel with tiles `c` (key-major for dK/dV), when the call
    needs lists (segments or a block mask)."""
    if not (ops.has_segments or ops.has_block_mask):
        return r
    states = visibility.block_states(
        ops, c.block_q, c.block_k, p.seq_q // c.block_q, p.seq_k // c.block_k
    )
    if transposed:
        states = jnp.swapaxes(states, -1, -2)
    full, partial = visibility.visit_lists(states)
    return r.replace(full=full, partial=partial)


def forward(
    ops: Operands, target: str | None = None, config: configs.AttentionConfig | None = None
) -> tuple[jax.Array, jax.Array]:
    """Attention forward: `out (B, T, N, H)` in q's dtype and base-2 logsumexp `lse2 (B, N, T)`
    float32. `target` / `config` override the device target or the tiles (tuning, tests)."""
    p = plan_of(ops, target, config)
    r = _with_lists(_refs(p, ops), p, ops, p.config.fwd)
    out, lse2 = _forward.forward(r, config=p.config.fwd, **_launch(ops, p))
    return out[:, : ops.seq_q, :, : ops.head_dim], lse2[:, :, : ops.seq_q]


def backward(
    ops: Operands,
    out: jax.Array,
    lse2: jax.Array,
    dout: jax.Array,
    dlse: jax.Array | None,
    target: str | None = None,
    config: configs.AttentionConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) of `forward`'s outputs, from its residuals (out, lse2).

    `dlse` is the cotangent of the natural-log logsumexp `(B, T, N)` (None if unused); dO, lse2
    and delta reach the kernels through `host.backward_rows`.
    """
    p = plan_of(ops, target, config)
    res = backward_rows(ops, out, lse2, dout, dlse, seq_q=p.seq_q, head_dim=p.head_dim)
    r = _refs(p, ops).replace(do=res.do, lse2=res.lse2, delta=res.delta())
    dk, dv = _backward.dkdv(
        _with_lists(r, p, ops, p.config.dkdv, transposed=True),
        config=p.config.dkdv,
        **_launch(ops, p),
    )
    dq = _backward.dq(_with_lists(r, p, ops, p.config.dq), config=p.config.dq, **_launch(ops, p))
    t, s, h = ops.seq_q, ops.seq_k, ops.head_dim
    return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :h]
