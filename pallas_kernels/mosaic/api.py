"""Host side of the Hopper kernels on Mosaic GPU: tiles from configs.py, padding, launch.

Any T, S >= 1 and head dims 1..256: queries are zero-padded to a multiple of the CTA's rows (two
consumer warpgroups of block_q), keys to a multiple of block_kv, the head dim to a multiple of 64
(zeros change no dot product); padded rows and keys lie past the real lengths, which the
visibility rule hides. On CPU the kernels run in Mosaic GPU interpret mode with race detection.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import configs, visibility
from pallas_kernels.host import backward_rows, pad_axis, padded_qkv, zero_rows_past
from pallas_kernels.mosaic import backward as _backward
from pallas_kernels.mosaic import forward as _forward
from pallas_kernels.mosaic.pipeline import CONSUMERS
from pallas_kernels.operands import KvSource, Operands


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _head_dim(head_dim: int) -> int:
    return _round_up(head_dim, configs.MOSAIC_HEAD_DIM_MULTIPLE)


def is_causal(ops: Operands) -> bool:
    """Top-left or, with offsets, bottom-right causal: a query tile's work grows with its row,
    which configs.MOSAIC_FORWARD's causal rules schedule for."""
    return ops.statics.window == (None, 0)


def forward_config(
    head_dim: int, rows: int | None = None, causal: bool = False, group: int = 1
) -> _forward.ForwardConfig:
    """configs.MOSAIC_FORWARD's choice for this head dim; for a call of `rows` query rows, with
    what the row's rules add for it (`causal`: `is_causal`; `group`: query heads per KV head)."""
    row = configs.MOSAIC_FORWARD[_head_dim(head_dim)]
    options, consumers, registers = _ruled(row, row.consumers, None, rows, causal, group)
    tiles = _forward.ForwardConfig(
        block_q=row.block_q,
        block_kv=row.block_kv,
        stages=row.stages,
        consumers=consumers,
        early_next_k=row.early_next_k,
        pinned_order=row.pinned_order,
        registers=registers if consumers == 2 else None,
    )
    return _forward.with_options(tiles, options)


def _ruled(
    row: configs.MosaicForward | configs.MosaicBackward,
    consumers,
    registers,
    rows,
    causal: bool,
    group: int = 1,
):
    """A configs.py row's `(options, consumers, registers)` after its rules that match a call of
    `rows` query rows (none when None) and `group` query heads per KV head, in order."""
    options = row.options
    for rule in row.rules if rows is not None else ():
        if rule.matches(rows, causal, group):
            options = (*(o for o in options if o not in rule.drop), *rule.options)
            consumers = rule.consumers or consumers
            registers = rule.registers or registers
    return options, consumers, registers


def _packable(cfg: _forward.ForwardConfig, ops: Operands) -> _forward.ForwardConfig:
    """`cfg` without `pack_heads` where the call's query heads per KV head are not a multiple of
    the heads a tile would pack."""
    if ops.group % cfg.heads_per_tile():
        return dataclasses.replace(cfg, pack_heads=False)
    return cfg


def call_config(ops: Operands) -> _forward.ForwardConfig:
    """The forward's config for this call: its row's rules applied (packing heads only where
    the call's group allows: `_packable`), unless their CTA tile does not divide the block mask
    (then the row's own, which `cta_tiles` checks)."""
    cfg = _packable(forward_config(ops.head_dim, ops.seq_q, is_causal(ops), ops.group), ops)
    if visibility.tile_divides_mask(ops.statics, cfg.rows, cfg.block_kv):
        return cfg
    return _packable(forward_config(ops.head_dim), ops)


def backward_config(
    head_dim: int, rows: int | None = None, causal: bool = False, group: int = 1
) -> _backward.BackwardConfig:
    """configs.MOSAIC_BACKWARD's choice for this head dim; for a call of `rows` query rows, with
    what the row's rules change for it (`causal`: `is_causal`; `group`: query heads per KV head,
    which no backward rule names today: `configs.MosaicBackward`)."""
    row = configs.MOSAIC_BACKWARD[_head_dim(head_dim)]
    options, _, registers = _ruled(row, None, row.registers, rows, causal, group)
    tiles = _backward.BackwardConfig(rows=row.rows, cols=row.cols, stages=row.stages)
    if registers:
        tiles = dataclasses.replace(tiles, registers=registers)
    return _backward.with_options(tiles, options)


def backward_on_triton(head_dim: int) -> bool:
    """configs.py hands this head dim's backward to the Triton kernels (faster there)."""
    return _head_dim(head_dim) in configs.MOSAIC_BACKWARD_ON_TRITON


def interpret_params(interpret: bool | None = None) -> plgpu.InterpretGPUParams | None:
    """Interpret mode (with the race detector) off the GPU, None on the GPU; `interpret` forces
    one or the other (False: lower for the GPU from anywhere, as the lowering tests do)."""
    if interpret is None:
        interpret = configs.gpu_target() == "interpret"
    return plgpu.InterpretGPUParams(detect_races=True) if interpret else None


def _past_lengths_zeroed(ops: Operands) -> Operands:
    """Rows past `q_lengths` and keys past `kv_lengths` set to 0 (one XLA pass, only when the call
    has lengths): garbage there (NaN in a padded cache) must not reach any output through a
    tile's matmul, and the kernels' TMA tiles cannot skip it."""
    return ops.replace(
        q=zero_rows_past(ops.q, ops.q_lengths),
        k=zero_rows_past(ops.k, ops.kv_lengths),
        v=zero_rows_past(ops.v, ops.kv_lengths),
    )


def _seq_info(ops: Operands) -> jax.Array | None:
    return ops.seq_info() if ops.has_seq_info else None


def uses_lists(ops: Operands) -> bool:
    """Segment ids or a block mask: the kernels walk visit lists instead of ranges."""
    return ops.has_segments or ops.has_block_mask


def cta_tiles(head_dim: int) -> tuple[tuple[int, int], ...]:
    """The (query rows, keys) tiles of the three kernels' CTAs: a block mask must be made of
    whole tiles of each (`visibility.tile_divides_mask`)."""
    fwd, bwd = forward_config(head_dim), backward_config(head_dim)
    fwd = dataclasses.replace(fwd, pack_heads=False)  # a call that cannot pack: the taller tile
    tiles = ((fwd.rows, fwd.block_kv),)
    if not backward_on_triton(head_dim):
        tiles += ((bwd.cols, CONSUMERS * bwd.rows), (CONSUMERS * bwd.rows, bwd.cols))  # dK/dV, dQ
    return tiles


def visit_lists(
    ops: Operands, rows: int, cols: int, n_rows: int, n_cols: int, *, transposed: bool = False
) -> tuple[jax.Array, jax.Array]:
    """`(full, partial)` visit lists `(Bt, 1, n_rows, 1 + n_cols)` of CTA tiles of `rows` query
    rows x `cols` keys (transposed: key-major, for dK/dV). The Mosaic kernels take masks that do
    not depend on the head (`unsupported` in flashjax/backends/mosaic.py)."""
    states = visibility.block_states(ops, rows, cols, n_rows, n_cols)
    if transposed:
        states = jnp.swapaxes(states, -1, -2)
    return visibility.visit_lists(states)


def _extras(ops: Operands, t: int, s: int, lists: tuple | None) -> dict:
    """The optional operands of a launch: sequence info, padded segment ids, dropout seeds,
    visit lists."""
    extras = {"seq": _seq_info(ops), "seeds": ops.seeds if ops.statics.has_dropout else None}
    if ops.has_segments:
        extras |= {
            "q_seg": pad_axis(ops.q_segments, 1, t),
            "kv_seg": pad_axis(ops.kv_segments, 1, s),
        }
    if lists is not None:
        extras |= {"full": lists[0], "partial": lists[1]}
    return extras


def _bias(ops: Operands, t: int, s: int) -> jax.Array | None:
    """The bias as the forward kernel reads it: float32, its query and key axes padded to the
    kernel's (where not broadcast), a scalar-per-head bias widened to a row of keys."""
    if ops.bias is None:
        return None
    bias = ops.bias.astype(jnp.float32)
    if bias.shape[2] == 1 and bias.shape[3] == 1:
        bias = jnp.broadcast_to(bias, (*bias.shape[:3], ops.seq_k))
    if bias.shape[2] > 1:
        bias = pad_axis(bias, 2, t)
    return pad_axis(bias, 3, s) if bias.shape[3] > 1 else bias


def _in_place(ops: Operands, kv: KvSource | None, s: int, d: int) -> bool:
    """Whether the kernel can read `ops`' keys in place from `kv`: no padding of the keys or the
    head dim and no lengths (each would need a copy), and the rows inside the buffer."""
    if kv is None:
        return False
    buffer, row0 = kv
    fits = buffer.shape[0] == 2 and buffer.shape[1] == ops.batch and row0 + s <= buffer.shape[2]
    plain = s == ops.seq_k and d == ops.head_dim and ops.kv_lengths is None
    return fits and plain and buffer.shape[3:] == ops.k.shape[2:] and buffer.dtype == ops.k.dtype


def forward(
    ops: Operands,
    interpret: bool | None = None,
    config: _forward.ForwardConfig | None = None,
    kv_source: KvSource | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`out (B, T, N, H)` in q's dtype and base-2 logsumexp `lse2 (B, N, T)` float32.
    `interpret`: None picks interpret mode off the GPU (see `interpret_params`); `config`: tiles
    other than configs.py's (benchmarks/tune_mosaic.py); `kv_source`: `(buffer, row0)`, the
    stacked `(2, B, S, K, H)` buffer that `ops.k` and `ops.v` are rows row0.. of (a ring's
    travelling K/V), which the kernel then reads in place where it can (`_in_place`), instead
    of the copies."""
    ops = _past_lengths_zeroed(ops)
    cfg = config or call_config(ops)
    t = _round_up(ops.seq_q, cfg.rows)
    s = _round_up(ops.seq_k, cfg.block_kv)
    d = _head_dim(ops.head_dim)
    q, k, v = padded_qkv(ops, t, s, d)
    kv_at = (0, 0, 0)
    if _in_place(ops, kv_source, s, d):
        buffer, row0 = kv_source
        k = v = buffer.reshape(2 * ops.batch, *buffer.shape[2:])  # a bitcast: no copy
        kv_at = (0, ops.batch, row0)
    rows = cfg.rows
    lists = None
    if uses_lists(ops):
        lists = visit_lists(ops, rows, cfg.block_kv, t // rows, s // cfg.block_kv)
    out, lse2 = _forward.forward(
        q,
        k,
        v,
        statics=ops.statics,
        config=cfg,
        seq_lens=(ops.seq_q, ops.seq_k),
        extras=_extras(ops, t, s, lists) | {"bias": _bias(ops, t, s)},
        interpret=interpret_params(interpret),
        kv_at=kv_at,
    )
    return out[:, : ops.seq_q, :, : ops.head_dim], lse2[:, :, : ops.seq_q]


def backward(
    ops: Operands,
    out: jax.Array,
    lse2: jax.Array,
    dout: jax.Array,
    dlse: jax.Array | None,
    interpret: bool | None = None,
    config: _backward.BackwardConfig | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq, dk, dv) from the forward's residuals (out, lse2 `(B, N, T)` base 2).

    `dlse` is the cotangent of the natural-log logsumexp `(B, T, N)` (None if unused); dO, O,
    lse2 and delta's shift reach the kernels through `host.backward_rows`, delta itself from
    XLA (`host.BackwardRows.delta`) or, with `BackwardConfig.row_stats`, from the dQ kernel.
    """
    ops = _past_lengths_zeroed(ops)
    cfg = config or backward_config(ops.head_dim, ops.seq_q, is_causal(ops), ops.group)
    if ops.statics.deterministic:  # dQ's reduce-adds land in a varying order
        cfg = _backward.two_kernels(cfg)
    t = _round_up(ops.seq_q, CONSUMERS * cfg.rows)  # dQ's rows (and a multiple of dK/dV's cols)
    s = _round_up(ops.seq_k, CONSUMERS * cfg.rows)
    d = _head_dim(ops.head_dim)
    res = backward_rows(ops, out, lse2, dout, dlse, seq_q=t, head_dim=d)
    q, k, v = padded_qkv(ops, t, s, d)
    launch = dict(
        statics=ops.statics,
        config=cfg,
        seq_lens=(ops.seq_q, ops.seq_k),
        interpret=interpret_params(interpret),
    )
    rows, cols = cfg.cta_rows, cfg.cols  # a CTA's own keys (dK/dV) or queries (dQ)
    dkdv_lists = dq_lists = None
    if uses_lists(ops):  # key-major tiles for dK/dV, query-major for dQ
        dkdv_lists = visit_lists(ops, cols, rows, t // cols, s // rows, transposed=True)
        dq_lists = visit_lists(ops, rows, cols, t // rows, s // cols)
    extras = _extras(ops, t, s, dkdv_lists)
    dq_extras = _extras(ops, t, s, dq_lists)
    if cfg.stats_in_dq:  # the dQ kernel first: it hands the dK/dV kernel lse2 and delta
        dq_extras |= {"o": res.o, "shift": res.shift}
        dq, lse_k, delta = _backward.dq(q, k, v, res.do, res.lse2, None, extras=dq_extras, **launch)
        dk, dv = _backward.dkdv(q, k, v, res.do, lse_k, delta, extras=extras, **launch)
        return _unpadded(ops, dq, dk, dv)
    args = (q, k, v, res.do, _backward.kernel_lse(res.lse2), res.delta())
    if cfg.fused_dq:  # the dK/dV kernel adds dQ's parts into this (see BackwardConfig)
        parts = () if launch["interpret"] is None else (s // cfg.rows,)
        acc = jax.new_ref(jnp.zeros((*parts, *q.shape), jnp.float32))
        dk, dv = _backward.dkdv(*args, extras=extras | {"dq_acc": acc}, **launch)
        dq = acc[...].sum(axis=0) if parts else acc[...]
        dq = (dq * ops.statics.scale).astype(q.dtype)
    else:
        dk, dv = _backward.dkdv(*args, extras=extras, **launch)
        dq = _backward.dq(*args, extras=dq_extras, **launch)
    return _unpadded(ops, dq, dk, dv)


def _unpadded(ops: Operands, dq, dk, dv) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients without the kernels' padding."""
    tq, sk, h = ops.seq_q, ops.seq_k, ops.head_dim
    return dq[:, :tq, :, :h], dk[:, :sk, :, :h], dv[:, :sk, :, :h]
