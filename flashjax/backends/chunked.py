"""`"xla_chunked"`: FlashAttention written in pure JAX loops. The default off-GPU.

Serves every feature on any platform, never builds the (T, S) matrix, and visits only the tiles
the visibility rule lists (`visibility.block_states` / `visit_lists`), so causal, windows, padding,
packed documents and block masks cost only what they let through. Its backward recomputes the
weights tile by tile from `(out, logsumexp)`. Accumulates in float32
(float64 for float64 inputs), and the scale may be traced (its gradient is returned).

Loops: one (batch row, KV head) at a time (`lax.map` / `lax.scan`), its query tiles, and the key
tiles each query tile visits (`fori_loop` over the visit list); the G query heads of a KV head go
together, so K and V are never repeated. Every visited tile gets the element mask. Peak extra
memory: a few `(G, bq, bk)` tiles, plus dK/dV `(S, H)` of one KV head in the backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flashjax.backends import Backend, varying_like
from pallas_kernels import common, configs, visibility
from pallas_kernels.operands import EMPTY, PARTIAL, Operands, cotangent


def _tile(ops: Operands, length: int, axis: int) -> int:
    """A power of two: a quarter of the padded length, within [16, CHUNKED_BLOCK], dividing the
    block mask's block size (small inputs still cross several tiles)."""
    pow2 = 1 << max(0, (length - 1).bit_length())
    return visibility.mask_tile(
        ops.statics.mask_block, min(configs.CHUNKED_BLOCK, max(16, pow2 // 4)), axis
    )


def _pad(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


class _Layout:
    """The padded operands, tiles and visit lists of one call, and the per-tile math."""

    def __init__(self, ops: Operands):
        self.ops = ops
        self.statics = ops.statics
        self.bq, self.bk = _tile(ops, ops.seq_q, 0), _tile(ops, ops.seq_k, 1)
        self.n_q, self.n_k = -(-ops.seq_q // self.bq), -(-ops.seq_k // self.bk)
        tp, sp = self.n_q * self.bq, self.n_k * self.bk
        self.tp, self.sp = tp, sp
        b, kh, g = ops.batch, ops.num_kv_heads, ops.group
        self.acc = common.acc_dtype(ops.q.dtype)
        self.seq_info = ops.seq_info()
        self.q = _pad(ops.q, 1, tp).reshape(b, tp, kh, g, ops.head_dim)
        self.k, self.v = (_pad(x, 1, sp) for x in (ops.k, ops.v))
        self.q_segments = None if ops.q_segments is None else _pad(ops.q_segments, 1, tp)
        self.kv_segments = None if ops.kv_segments is None else _pad(ops.kv_segments, 1, sp)
        self.bias = ops.bias
        if ops.bias is not None:
            self.bias = ops.bias.astype(self.acc)
            for axis, size in ((2, tp), (3, sp)):
                if self.bias.shape[axis] > 1:
                    self.bias = _pad(self.bias, axis, size)
        # One visit list per (batch row, KV head): the union over its query heads.
        states = visibility.block_states(ops, self.bq, self.bk, self.n_q, self.n_k)
        if states.shape[1] > 1:
            states = states.reshape(states.shape[0], kh, g, self.n_q, self.n_k).max(axis=2)
        _, self.lists = visibility.visit_lists(jnp.where(states != EMPTY, PARTIAL, EMPTY))

    def fresh(self, tree):
        return varying_like(tree, self.ops.q)

    def unit(self, i: jax.Array) -> dict:
        """Everything of (batch row b, KV head kh) = divmod(i, K), sliced once."""
        ops = self.ops
        b, kh = jnp.divmod(i, ops.num_kv_heads)
        seq = visibility.seq_row(self.seq_info[b])
        rows_real = jnp.arange(self.tp) < seq[2]
        cols_real = jnp.arange(self.sp) < seq[3]
        u = dict(b=b, kh=kh, seq=seq)
        # Rows and keys past their lengths are invisible: zeroed, so garbage there reaches nothing.
        u["q"] = jnp.where(rows_real[:, None, None], self.q[b, :, kh], 0)
        u["k"] = jnp.where(cols_real[:, None], self.k[b, :, kh], 0)
        u["v"] = jnp.where(cols_real[:, None], self.v[b, :, kh], 0)
        u["q_segments"] = None if self.q_segments is None else self.q_segments[b]
        u["kv_segments"] = None if self.kv_segments is None else self.kv_segments[b]
        u["lists"] = self.lists[
            b if self.lists.shape[0] > 1 else 0, kh if self.lists.shape[1] > 1 else 0
        ]
        if self.bias is not None:
            bb, nb = self.bias.shape[:2]
            plane = self.bias[b if bb > 1 else 0]
            u["bias"] = (
                lax.dynamic_slice_in_dim(plane, kh * ops.group, ops.group, 0) if nb > 1 else plane
            )
        return u

    def scores(self, u: dict, qb, kb, q_tile):
        """Base-2 logits `(G, bq, bk)` of query tile qb against key tile kb, soft-cap tanh, and
        the tile's rows, columns, V (and K)."""
        ops, bq, bk = self.ops, self.bq, self.bk
        q0, k0 = qb * bq, kb * bk
        rows = q0 + jnp.arange(bq, dtype=jnp.int32)
        cols = k0 + jnp.arange(bk, dtype=jnp.int32)
        k = lax.dynamic_slice_in_dim(u["k"], k0, bk, 0)
        v = lax.dynamic_slice_in_dim(u["v"], k0, bk, 0)
        qk = jnp.einsum("gqh,kh->gqk", q_tile, k, preferred_element_type=self.acc)
        segments = {}
        if u["q_segments"] is not None:
            segments = dict(
                q_segments=lax.dynamic_slice_in_dim(u["q_segments"], q0, bq)[:, None],
                kv_segments=lax.dynamic_slice_in_dim(u["kv_segments"], k0, bk)[None, :],
            )
        heads = u["kh"] * ops.group + jnp.arange(ops.group, dtype=jnp.int32)
        mask = visibility.element_visible(
            self.statics,
            rows[:, None],
            cols[None, :],
            u["seq"],
            batch=u["b"],
            head=heads[:, None, None],
            block_states=ops.block_states,
            **segments,
        )
        bias = None
        if "bias" in u:
            bias = u["bias"]
            if bias.shape[1] > 1:
                bias = lax.dynamic_slice_in_dim(bias, q0, bq, 1)
            if bias.shape[2] > 1:
                bias = lax.dynamic_slice_in_dim(bias, k0, bk, 2)
        s2, tanh = common.scores(qk, ops.scale_value(), self.statics, bias, mask)
        return s2, tanh, rows, cols, k, v

    def dropout(self, u: dict, rows, cols) -> jax.Array:
        """`(G, bq, bk)` inverted-dropout factors of the tile (the kernels' hash)."""
        ops = self.ops

        def one(g):
            stream = common.head_stream(
                self.statics, ops.seeds, u["b"], u["kh"] * ops.group + g, ops.num_heads
            )
            return common.dropout_scale(self.statics, stream, rows, cols)

        return jax.vmap(one)(jnp.arange(ops.group, dtype=jnp.int32))

    def q_tile(self, x: jax.Array, qb) -> jax.Array:
        """`(G, bq, ...)` slice of a per-unit `(Tp, G, ...)` array."""
        return jnp.moveaxis(lax.dynamic_slice_in_dim(x, qb * self.bq, self.bq, 0), 0, 1)

    def visits(self, u: dict, qb, body, carry):
        """Run `body(kb, carry)` over the key tiles query tile qb visits."""
        row = u["lists"][qb]
        return lax.fori_loop(0, row[0], lambda i, c: body(row[1 + i], c), carry)

    def to_heads(self, x: jax.Array, length: int) -> jax.Array:
        """Per-unit `(B*K, n_q, G, bq, ...)` -> `(B, T, N, ...)`."""
        ops = self.ops
        b, kh, g = ops.batch, ops.num_kv_heads, ops.group
        x = x.reshape(b, kh, self.n_q, g, self.bq, *x.shape[4:])
        x = jnp.moveaxis(x, (2, 4), (1, 2))  # (B, n_q, bq, K, G, ...)
        x = x.reshape(b, self.tp, kh * g, *x.shape[5:])
        return x[:, :length]


def _forward(ops: Operands) -> tuple[jax.Array, jax.Array]:
    lay = _Layout(ops)
    g, bq, h = ops.group, lay.bq, ops.head_dim

    def unit(i):
        u = lay.unit(i)

        def q_tile(qb):
            q = lay.q_tile(u["q"], qb)

            def body(kb, carry):
                acc, m, l = carry
                s2, _, rows, cols, _, v = lay.scores(u, qb, kb, q)
                p, m, l, alpha = common.online_softmax_step(s2, m, l)
                if ops.statics.has_dropout:
                    p = p * lay.dropout(u, rows, cols)
                pv = jnp.einsum("gqk,kh->gqh", p.astype(v.dtype), v, preferred_element_type=lay.acc)
                return acc * alpha[..., None] + pv, m, l

            init = lay.fresh(
                (
                    jnp.zeros((g, bq, h), lay.acc),
                    jnp.full((g, bq), -jnp.inf, lay.acc),
                    jnp.zeros((g, bq), lay.acc),
                )
            )
            return common.finalize(*lay.visits(u, qb, body, init))

        return lax.map(q_tile, jnp.arange(lay.n_q))

    out, lse2 = lax.map(unit, jnp.arange(ops.batch * ops.num_kv_heads))
    out = lay.to_heads(out, ops.seq_q).astype(ops.q.dtype)
    return out, lay.to_heads(lse2, ops.seq_q) * common.LN2


def _backward(ops: Operands, out, lse, dout, dlse, *, only_bias: bool = False):
    """Gradients `(dq, dk, dv, dbias, dscale)` (None where not asked for); `only_bias` computes
    dbias alone (the kernel backends' bias gradient)."""
    lay = _Layout(ops)
    b_, t, kh, g, h = ops.batch, ops.seq_q, ops.num_kv_heads, ops.group, ops.head_dim
    bq, bk = lay.bq, lay.bk
    dtype, acc = ops.q.dtype, lay.acc
    rows_real = jnp.arange(t)[None, :] < lay.seq_info[:, 2:3]  # (B, T)
    delta = jnp.einsum("btnh,btnh->btn", dout.astype(acc), out.astype(acc))
    if dlse is not None:
        delta = delta - dlse
    delta = jnp.where(rows_real[..., None], delta, 0)
    dout = jnp.where(rows_real[..., None, None], dout, 0)  # cotangents of invisible rows: nothing

    def per_unit(x, fill):  # (B, T, N, ...) -> (B, Tp, K, G, ...)
        x = _pad(x, 1, lay.tp, fill)
        return x.reshape(b_, lay.tp, kh, g, *x.shape[3:])

    lse2 = per_unit(lse.astype(acc) * common.LOG2E, -jnp.inf)
    delta = per_unit(delta, 0)
    dout = per_unit(dout.astype(dtype), 0)
    bias = lay.bias

    def unit(dbias_total, i):
        u = lay.unit(i)
        b, k_head = u["b"], u["kh"]
        do_u, lse_u, delta_u = dout[b, :, k_head], lse2[b, :, k_head], delta[b, :, k_head]

        def q_tile(carry, qb):
            q = lay.q_tile(u["q"], qb)
            do = lay.q_tile(do_u, qb)
            lse_t, delta_t = lay.q_tile(lse_u, qb), lay.q_tile(delta_u, qb)

            def body(kb, c):
                dq, dk, dv, dbias = c
                s2, tanh, rows, cols, k, v = lay.scores(u, qb, kb, q)
                p = common.probs_from_lse(s2, lse_t)
                dp = jnp.einsum("gqh,kh->gqk", do, v, preferred_element_type=acc)
                p_dropped = p
                if ops.statics.has_dropout:
                    keep = lay.dropout(u, rows, cols)
                    p_dropped, dp = p * keep, dp * keep
                ds_bias, ds = common.logits_grad(p, dp, delta_t, tanh)
                if dbias is not None:
                    dbias = _add_bias_tile(dbias, ds_bias, qb * bq, kb * bk)
                if not only_bias:
                    ds = ds.astype(dtype)
                    dq = dq + jnp.einsum("gqk,kh->gqh", ds, k, preferred_element_type=acc)
                    dk_t = jnp.einsum("gqk,gqh->kh", ds, q, preferred_element_type=acc)
                    dv_t = jnp.einsum(
                        "gqk,gqh->kh", p_dropped.astype(dtype), do, preferred_element_type=acc
                    )
                    dk = _add_rows(dk, dk_t, kb * bk)
                    dv = _add_rows(dv, dv_t, kb * bk)
                return dq, dk, dv, dbias

            dk, dv, dbias = carry
            dq0 = lay.fresh(jnp.zeros((g, bq, h), acc))
            dq, dk, dv, dbias = lay.visits(u, qb, body, (dq0, dk, dv, dbias))
            return (dk, dv, dbias), dq

        zeros_kv = None if only_bias else jnp.zeros((lay.sp, h), acc)
        dbias0 = None
        if bias is not None:
            dbias0 = jnp.zeros((u["bias"].shape[0], *bias.shape[2:]), acc)
        init = lay.fresh((zeros_kv, zeros_kv, dbias0))
        (dk, dv, dbias), dq = lax.scan(q_tile, init, jnp.arange(lay.n_q))
        if dbias is not None:
            dbias_total = _add_bias_plane(dbias_total, dbias, b, k_head * g)
        return dbias_total, (dq, dk, dv)

    dbias0 = None if bias is None else lay.fresh(jnp.zeros(bias.shape, acc))
    dbias, (dq, dk, dv) = lax.scan(unit, dbias0, jnp.arange(b_ * kh))
    if dbias is not None:
        dbias = dbias[:, :, : ops.bias.shape[2], : ops.bias.shape[3]].astype(ops.bias.dtype)
    if only_bias:
        return None, None, None, dbias, None
    scale = ops.scale_value()
    dq_raw = lay.to_heads(dq, t)
    dscale = None
    if ops.scale is not None:  # d loss / d scale = sum over pairs of ds * q.k = sum(q * dq_raw)
        dscale = jnp.sum(ops.q.astype(acc) * dq_raw).astype(ops.scale.dtype)

    def to_kv(x):  # (B*K, Sp, H) -> (B, S, K, H)
        return jnp.moveaxis(x.reshape(b_, kh, lay.sp, h), 1, 2)[:, : ops.seq_k]

    dq = (dq_raw * scale).astype(dtype)
    dk = (to_kv(dk) * scale).astype(ops.k.dtype)
    dv = to_kv(dv).astype(ops.v.dtype)
    return dq, dk, dv, dbias, dscale


def _add_rows(x: jax.Array, tile: jax.Array, start) -> jax.Array:
    return lax.dynamic_update_slice_in_dim(
        x, lax.dynamic_slice_in_dim(x, start, tile.shape[0], 0) + tile, start, 0
    )


def _add_bias_tile(dbias: jax.Array, ds: jax.Array, q0, k0) -> jax.Array:
    """Add a `(G, bq, bk)` logits gradient into a unit's bias gradient `(Gb, Tb, Sb)`, summed
    over the axes the bias broadcasts."""
    gb, tb, sb = dbias.shape
    ds = jnp.sum(ds, axis=tuple(a for a, n in enumerate((gb, tb, sb)) if n == 1), keepdims=True)
    start = (0, q0 if tb > 1 else 0, k0 if sb > 1 else 0)
    return lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, start, ds.shape) + ds, start)


def _add_bias_plane(total: jax.Array, plane: jax.Array, b, head0) -> jax.Array:
    """Add a unit's `(Gb, Tb, Sb)` bias gradient into the whole `(Bb, Nb, Tb, Sb)` one."""
    bb, nb = total.shape[:2]
    start = (b if bb > 1 else 0, head0 if nb > 1 else 0, 0, 0)
    return lax.dynamic_update_slice(
        total, lax.dynamic_slice(total, start, (1, *plane.shape)) + plane[None], start
    )


def _grads(ops: Operands, out, lse, dout, dlse) -> Operands:
    dq, dk, dv, dbias, dscale = _backward(ops, out, lse, dout, dlse)
    return cotangent(ops, q=dq, k=dk, v=dv, bias=dbias, scale=dscale)


def bias_grad(ops: Operands, out, lse, dout, dlse) -> jax.Array:
    """d bias alone, blockwise in XLA: the kernel backends use it for a bias that needs a gradient
    (XLA removes it when nobody asks). `lse` natural log, `(B, T, N)`."""
    return _backward(ops, out, lse, dout, dlse, only_bias=True)[3]


def _unsupported(ops: Operands) -> str | None:
    return None  # every feature, every dtype, every platform


BACKEND = Backend(
    name="xla_chunked",
    forward=_forward,
    backward=_grads,
    unsupported=_unsupported,
    platforms=("cpu", "tpu", "gpu"),
    description="pure JAX: loops over the visible tiles with the online softmax; any platform",
)
