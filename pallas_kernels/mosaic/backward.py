"""FlashAttention backward for Hopper on Pallas' Mosaic GPU backend: two kernels, deterministic.

`delta = rowsum(dO * O)` and the base-2 logsumexp come from the caller. Both kernels use the
three-warpgroup layout of pipeline.py (two consumers, one TMA producer) and recompute the scores:
- dK/dV: one CTA per (2 * block_kv keys, KV head, batch row); each consumer owns block_kv keys and
  accumulates dK and dV in registers over the query tiles (and the query heads of its GQA group)
  that can see its keys (`visibility.block_range`, transposed). The producer streams Q, dO,
  logsumexp and delta tiles. Transposed tiles: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO,
  dK += dS^T Q.
- dQ: one CTA per (2 * block_q queries, query head, batch row), like the forward: the producer
  streams K and V, each consumer accumulates dQ += dS K for its rows.
Five of the seven matmuls are the FA2 backward's; QK^T and dO V^T are computed in both kernels
(FA3's single kernel with a float32 dQ reduction is the next step: it cannot run in interpret
mode). In interpret mode the register operands of wgmma are staged through shared memory.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common, visibility
from pallas_kernels.mosaic import pipeline as pp
from pallas_kernels.mosaic.pipeline import CONSUMERS, LAYOUT, PRODUCER


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the two backward kernels, the same for both: each consumer owns `rows` of its
    kernel's major operand (keys in dK/dV, queries in dQ) and each step streams `cols` of the
    other (both multiples of 64: wgmma's contraction dim); `stages` slots in the ring.

    A consumer releases a slot only after its last matmul of the step, so with one slot the two
    consumers do not ping-pong (`pingpong`): they would wait on their own release.
    """

    rows: int = 64
    cols: int = 64
    stages: int = 2
    registers: tuple[int, int] = (232, 40)

    @property
    def pingpong(self) -> bool:
        return self.stages >= 2


def _kernel(body, out_type, scratch, grid, interpret):
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=("t", "h", "b"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )


def _inputs(q, k, v, do, lse2, delta, seq_info) -> tuple:
    """Both kernels' operands: the sequence info only when the call has lengths or offsets."""
    base = (q, k, v, do, lse2, delta)
    return base if seq_info is None else (*base, seq_info)


def _rows_of(x, shape: tuple[int, int], dim: int) -> jax.Array:
    """A per-row (dim 0) or per-column (dim 1) vector broadcast to a tile."""
    return lax.broadcast_in_dim(x, shape, [dim])


def _probs(s2: jax.Array, lse2: jax.Array) -> jax.Array:
    """`2**(s2 - lse2)`, with rows that saw nothing (lse2 -inf) giving 0 (as
    `common.probs_from_lse`, with the logsumexp already broadcast to the tile)."""
    return jnp.exp2(s2 - jnp.where(lse2 == -jnp.inf, jnp.inf, lse2))


# --------------------------------------------------------------------------------------------------
# dK / dV
# --------------------------------------------------------------------------------------------------


def _dkdv_consumer(refs, scratch, *, statics, config, steps, n_q, group, seq, interpret):
    k_ref, v_ref, dk_ref, dv_ref = refs
    (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, stage) = scratch[:7]
    kv_loaded = scratch[7]
    q_loaded, do_loaded, lse_loaded, delta_loaded, q_free, do_free, lse_free, delta_free = scratch[
        8:16
    ]
    turn = scratch[16]
    bq, bkv = config.cols, config.rows
    wg = lax.axis_index("wg")
    b, kh = lax.axis_index("b"), lax.axis_index("h")
    col0 = lax.axis_index("t") * (CONSUMERS * bkv) + wg * bkv  # this consumer's first key
    head_dim = k_smem.shape[-1]
    dtype = k_smem.dtype
    lo = steps[0]
    turns = pp.Turn(turn, wg, enabled=config.pingpong)

    plgpu.set_max_registers(config.registers[0], action="increase")
    my_k, my_v = k_smem.at[wg], v_smem.at[wg]
    plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(col0, bkv), kh], my_k, kv_loaded.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(col0, bkv), kh], my_v, kv_loaded.at[wg])
    plgpu.barrier_wait(kv_loaded.at[wg])  # one phase: both copies arrived (2 arrivals)

    keys = col0 + pp.iota((bkv, bq), 0)
    rows0 = pp.iota((bkv, bq), 1)
    my_stage = None if stage is None else stage.at[wg]

    def step(i, carry):
        dk, dv = carry
        qt = lo + lax.rem(i, n_q)  # query tile; the head is kh * group + i // n_q
        slot = lax.rem(i, config.stages)
        plgpu.barrier_wait(q_loaded.at[slot])

        def sT(acc_ref):
            plgpu.wgmma(acc_ref, my_k, q_ring.at[slot].T)
            turns.sync()
            return acc_ref[...]

        # The element rule on every tile: the steps run over (head, query tile) pairs in one
        # loop, so interior tiles are not split off (they are all visible anyway).
        visible = visibility.element_visible(statics, qt * bq + rows0, keys, seq)
        qk = pl.run_scoped(sT, plgpu.ACC((bkv, bq), jnp.float32))
        s2, tanh = common.scores(qk, statics.scale, statics, None, visible)
        plgpu.barrier_wait(lse_loaded.at[slot])
        lse = plgpu.load(lse_ring.at[slot], layout=LAYOUT.reduce(0))
        p = _probs(s2, _rows_of(lse, (bkv, bq), 1))
        plgpu.barrier_arrive(lse_free.at[slot])
        plgpu.barrier_wait(do_loaded.at[slot])
        dp = pp.matmul(my_v, do_ring.at[slot].T, (bkv, bq))
        plgpu.barrier_wait(delta_loaded.at[slot])
        delta = plgpu.load(delta_ring.at[slot], layout=LAYOUT.reduce(0))
        _, ds = common.logits_grad(p, dp, _rows_of(delta, (bkv, bq), 1), tanh)
        plgpu.barrier_arrive(delta_free.at[slot])
        turns.done()
        turns.wait()
        a = pp.operand(p.astype(dtype), my_stage, via_smem=interpret)
        dv = pp.mma_into(dv, a, do_ring.at[slot], in_place=not interpret)
        plgpu.barrier_arrive(do_free.at[slot])
        a = pp.operand(ds.astype(dtype), my_stage, via_smem=interpret)
        dk = pp.mma_into(dk, a, q_ring.at[slot], in_place=not interpret)
        plgpu.barrier_arrive(q_free.at[slot])
        return dk, dv

    zeros = plgpu.layout_cast(jnp.zeros((bkv, head_dim), jnp.float32), LAYOUT)
    turns.start()
    dk, dv = lax.fori_loop(0, group * n_q, step, (zeros, zeros))
    turns.finish()
    my_k[...] = (dk * statics.scale).astype(dtype)  # K and V are free again: stage dK, dV there
    my_v[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_k, dk_ref.at[b, pl.ds(col0, bkv), kh])
    plgpu.copy_smem_to_gmem(my_v, dv_ref.at[b, pl.ds(col0, bkv), kh])
    plgpu.wait_smem_to_gmem(0)


def dkdv(q, k, v, do, lse2, delta, *, statics, config, seq_lens, seq_info=None, interpret=None):
    """Padded q, do `(B, Tp, N, D)`, k, v `(B, Sp, K, D)`, lse2, delta `(B, N, Tp)` float32 ->
    `(dk, dv)` `(B, Sp, K, D)` (Sp a multiple of 2 * rows, Tp of cols)."""
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq, bkv = config.cols, config.rows
    static_seq = (0, 0, seq_lens[0], seq_lens[1])
    via_smem = interpret is not None
    dtype = q.dtype
    inputs = _inputs(q, k, v, do, lse2, delta, seq_info)

    def body(*refs):
        ins, (dk_ref, dv_ref), scratch = pp.split_refs(refs, (len(inputs), 2))
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *seq_ref = ins
        seq = pp.seq_of(seq_ref[0] if seq_ref else None, static_seq, lax.axis_index("b"))
        keys0 = lax.axis_index("t") * (CONSUMERS * bkv)
        steps = visibility.block_range(statics, keys0, CONSUMERS * bkv, bq, seq, transposed=True)
        n_q = steps[3] - steps[0]
        wg = lax.axis_index("wg")

        @pl.when(wg < CONSUMERS)
        def _():
            _dkdv_consumer(
                (k_ref, v_ref, dk_ref, dv_ref),
                scratch,
                statics=statics,
                config=config,
                steps=steps,
                n_q=n_q,
                group=group,
                seq=seq,
                interpret=via_smem,
            )

        @pl.when(wg == PRODUCER)
        def _():
            q_ring, do_ring, lse_ring, delta_ring = scratch[2:6]
            q_loaded, do_loaded, lse_loaded, delta_loaded = scratch[8:12]
            q_free, do_free, lse_free, delta_free = scratch[12:16]
            b, kh = lax.axis_index("b"), lax.axis_index("h")
            lo = steps[0]

            def where(i):
                return kh * group + lax.div(i, n_q), (lo + lax.rem(i, n_q)) * bq

            def rows(ref):
                return lambda i: ref.at[b, pl.ds(where(i)[1], bq), where(i)[0]]

            def stats(ref):
                return lambda i: ref.at[b, where(i)[0], pl.ds(where(i)[1], bq)]

            streams = (
                pp.Stream(rows(q_ref), q_ring, q_loaded, q_free),
                pp.Stream(rows(do_ref), do_ring, do_loaded, do_free),
                pp.Stream(stats(lse_ref), lse_ring, lse_loaded, lse_free),
                pp.Stream(stats(delta_ref), delta_ring, delta_loaded, delta_free),
            )
            pp.produce(streams, 0, group * n_q, config.stages, config.registers[1])

    stages = config.stages
    scratch = (
        pp.smem_tile((CONSUMERS, bkv, head_dim), dtype),
        pp.smem_tile((CONSUMERS, bkv, head_dim), dtype),
        pp.smem_tile((stages, bq, head_dim), dtype),
        pp.smem_tile((stages, bq, head_dim), dtype),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.float32),
        pp.smem_tile((CONSUMERS, bkv, bq), dtype) if via_smem else None,
        plgpu.Barrier(num_arrivals=2, num_barriers=CONSUMERS),  # K and V of each consumer
        *pp.stream_barriers(4, stages),
        plgpu.Barrier(num_arrivals=CONSUMERS),
    )
    out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
    grid = (seq_k // (CONSUMERS * bkv), num_kv_heads, batch)
    return _kernel(body, out_type, scratch, grid, interpret)(*inputs)


# --------------------------------------------------------------------------------------------------
# dQ
# --------------------------------------------------------------------------------------------------


def _dq_consumer(refs, scratch, *, statics, config, steps, seq, interpret):
    q_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    q_smem, do_smem, stats_smem, k_ring, v_ring, stage = scratch[:6]
    own_loaded, k_loaded, v_loaded, k_free, v_free, turn = scratch[6:12]
    bq, bkv = config.rows, config.cols
    wg = lax.axis_index("wg")
    b, h = lax.axis_index("b"), lax.axis_index("h")
    row0 = lax.axis_index("t") * (CONSUMERS * bq) + wg * bq
    head_dim = q_smem.shape[-1]
    dtype = q_smem.dtype
    lo, full_lo, full_hi, hi = steps
    turns = pp.Turn(turn, wg, enabled=config.pingpong)

    plgpu.set_max_registers(config.registers[0], action="increase")
    my_q, my_do, my_stats = q_smem.at[wg], do_smem.at[wg], stats_smem.at[wg]
    loaded = own_loaded.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], my_q, loaded)
    plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(row0, bq), h], my_do, loaded)
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(row0, bq)], my_stats.at[0], loaded)
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(row0, bq)], my_stats.at[1], loaded)
    plgpu.barrier_wait(loaded)  # one phase: all four copies arrived (4 arrivals)
    lse = plgpu.load(my_stats.at[0], layout=LAYOUT.reduce(1))  # vectors: broadcast per step
    delta = plgpu.load(my_stats.at[1], layout=LAYOUT.reduce(1))

    rows = row0 + pp.iota((bq, bkv), 0)
    cols0 = pp.iota((bq, bkv), 1)
    my_stage = None if stage is None else stage.at[wg]

    def step(kv, dq, *, masked: bool):
        slot = lax.rem(kv - lo, config.stages)
        plgpu.barrier_wait(k_loaded.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, my_q, k_ring.at[slot].T)
            turns.sync()
            return acc_ref[...]

        mask = None
        if masked:
            mask = visibility.element_visible(statics, rows, kv * bkv + cols0, seq)
        s2, tanh = common.scores(
            pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32)), statics.scale, statics, None, mask
        )
        p = _probs(s2, _rows_of(lse, (bq, bkv), 0))
        plgpu.barrier_wait(v_loaded.at[slot])
        dp = pp.matmul(my_do, v_ring.at[slot].T, (bq, bkv))
        plgpu.barrier_arrive(v_free.at[slot])
        _, ds = common.logits_grad(p, dp, _rows_of(delta, (bq, bkv), 0), tanh)
        turns.done()
        turns.wait()
        a = pp.operand(ds.astype(dtype), my_stage, via_smem=interpret)
        dq = pp.mma_into(dq, a, k_ring.at[slot], in_place=not interpret)
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

    turns.start()
    dq = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), LAYOUT)
    dq = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), dq)
    dq = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), dq)
    turns.finish()
    my_q[...] = (dq * statics.scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_q, dq_ref.at[b, pl.ds(row0, bq), h])
    plgpu.wait_smem_to_gmem(0)


def dq(q, k, v, do, lse2, delta, *, statics, config, seq_lens, seq_info=None, interpret=None):
    """Operands as `dkdv` (Tp a multiple of 2 * rows, Sp of cols) -> dq `(B, Tp, N, D)`."""
    batch, seq_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    bq, bkv = config.rows, config.cols
    static_seq = (0, 0, seq_lens[0], seq_lens[1])
    via_smem = interpret is not None
    dtype = q.dtype
    inputs = _inputs(q, k, v, do, lse2, delta, seq_info)

    def body(*refs):
        ins, (dq_ref,), scratch = pp.split_refs(refs, (len(inputs), 1))
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *seq_ref = ins
        seq = pp.seq_of(seq_ref[0] if seq_ref else None, static_seq, lax.axis_index("b"))
        rows0 = lax.axis_index("t") * (CONSUMERS * bq)
        steps = visibility.block_range(statics, rows0, CONSUMERS * bq, bkv, seq)
        wg = lax.axis_index("wg")

        @pl.when(wg < CONSUMERS)
        def _():
            _dq_consumer(
                (q_ref, do_ref, lse_ref, delta_ref, dq_ref),
                scratch,
                statics=statics,
                config=config,
                steps=steps,
                seq=seq,
                interpret=via_smem,
            )

        @pl.when(wg == PRODUCER)
        def _():
            k_ring, v_ring = scratch[3:5]
            k_loaded, v_loaded, k_free, v_free = scratch[7:11]
            b, kh = lax.axis_index("b"), lax.div(lax.axis_index("h"), group)

            def tile(ref):
                return lambda kv: ref.at[b, pl.ds(kv * bkv, bkv), kh]

            streams = (
                pp.Stream(tile(k_ref), k_ring, k_loaded, k_free),
                pp.Stream(tile(v_ref), v_ring, v_loaded, v_free),
            )
            pp.produce(streams, steps[0], steps[3], config.stages, config.registers[1])

    stages = config.stages
    scratch = (
        pp.smem_tile((CONSUMERS, bq, head_dim), dtype),
        pp.smem_tile((CONSUMERS, bq, head_dim), dtype),
        plgpu.SMEM((CONSUMERS, 2, bq), jnp.float32),
        pp.smem_tile((stages, bkv, head_dim), dtype),
        pp.smem_tile((stages, bkv, head_dim), dtype),
        pp.smem_tile((CONSUMERS, bq, bkv), dtype) if via_smem else None,
        plgpu.Barrier(num_arrivals=4, num_barriers=CONSUMERS),  # Q, dO, lse, delta
        *pp.stream_barriers(2, stages),
        plgpu.Barrier(num_arrivals=CONSUMERS),
    )
    out_type = jax.ShapeDtypeStruct(q.shape, dtype)
    grid = (seq_q // (CONSUMERS * bq), num_heads, batch)
    return _kernel(body, out_type, scratch, grid, interpret)(*inputs)
