"""FlashAttention forward for Hopper on Pallas' Mosaic GPU backend (the FA3 design).

Grid: one CTA per (query tile of 2 * block_q rows, query head, batch row). A CTA has three
warpgroups: two consumers, each owning block_q query rows, and one producer that streams K and V
tiles into a ring of `stages` shared-memory slots with TMA. Barriers:
  q_loaded[w]          the consumer's Q tile arrived (TMA)
  k_loaded[s], v_loaded[s]      slot s holds the K / V tile of the current step (TMA)
  k_free[s], v_free[s]          both consumers are done with slot s (2 arrivals)
  turn                 the ping-pong schedule: a consumer's softmax overlaps the other's matmuls
Every consumer walks the same key tiles (the CTA's `visibility.block_range` over its 2 * block_q
rows), so the producer loads each tile once; a tile outside the CTA's full range gets the element
mask of `visibility.element_visible` (a consumer whose rows cannot see it just adds nothing).

The consumers keep S, P and the output accumulator in registers (WGMMA layout) and work in base 2
(`common.LOG2E` folded into the scale). QK^T reads Q and K from shared memory; PV reads P from
registers (on the GPU) or, in interpret mode, from a shared-memory staging tile (the CPU
interpreter cannot run a register-operand wgmma). Output and base-2 logsumexp leave through shared
memory with TMA.
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
from pallas_kernels.operands import AttentionStatics

CONSUMERS = 2  # compute warpgroups per CTA
PRODUCER = CONSUMERS  # the warpgroup index of the TMA producer


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Tiles of the Mosaic forward: block_q rows per consumer, block_kv keys per step, and the
    depth of the K/V ring."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    registers: tuple[int, int] = (232, 40)  # consumer, producer (setmaxnreg)


def _smem(shape: tuple[int, ...], dtype, head_dim: int) -> plgpu.SMEM:
    """A swizzled shared-memory tile whose minor dim is the head dim (TMA and wgmma operands)."""
    swizzle = plgpu.find_swizzle(head_dim * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(
        shape,
        dtype,
        transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)),
    )


def _mma_into(acc: jax.Array, a, b, *, in_place: bool) -> jax.Array:
    """`acc + a @ b` with wgmma (b in shared memory, a in registers or shared memory).

    `in_place`: the accumulator enters the wgmma (the GPU path); otherwise the product lands in a
    fresh accumulator and is added (the CPU interpreter runs no `ACC.init` state).
    """
    if in_place:

        def accumulate(acc_ref):
            plgpu.wgmma(acc_ref, a, b)

        return pl.run_state(accumulate)(plgpu.ACC.init(acc))

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return acc + pl.run_scoped(product, plgpu.ACC(acc.shape, jnp.float32))


def _consumer(
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    lse_ref,
    scratch,
    *,
    statics: AttentionStatics,
    config: ForwardConfig,
    steps: tuple,
    seq: visibility.Seq,
    p_via_smem: bool,
):
    q_smem, k_smem, v_smem, p_smem, lse_smem, bars = scratch
    q_loaded, k_loaded, v_loaded, k_free, v_free, turn = bars
    bq, bkv = config.block_q, config.block_kv
    wg = lax.axis_index("wg")
    b, h = lax.axis_index("b"), lax.axis_index("h")
    row0 = lax.axis_index("q") * (CONSUMERS * bq) + wg * bq
    head_dim = q_smem.shape[-1]
    dtype = q_smem.dtype
    lo, full_lo, full_hi, hi = steps

    plgpu.set_max_registers(config.registers[0], action="increase")
    my_q = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], my_q, q_loaded.at[wg])
    plgpu.barrier_wait(q_loaded.at[wg])

    layout = plgpu.Layout.WGMMA
    rows = row0 + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=layout)
    cols0 = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=layout)
    scale2 = statics.scale * common.LOG2E

    def step(kv, carry, *, masked: bool):
        acc, m, l = carry
        slot = lax.rem(kv - lo, config.stages)
        plgpu.barrier_wait(k_loaded.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, my_q, k_smem.at[slot].T)
            sync_turn()  # QK issued: the other consumer may issue its matmul
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        s = s * scale2
        if masked:
            cols = kv * bkv + cols0
            s = jnp.where(visibility.element_visible(statics, rows, cols, seq), s, -jnp.inf)
        p, m, l, alpha = common.online_softmax_step(s, m, l)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(dtype)
        plgpu.barrier_arrive(turn)  # softmax done
        plgpu.barrier_wait(v_loaded.at[slot])
        plgpu.barrier_wait(turn)  # the tensor cores are ours: the other consumer is in softmax
        if p_via_smem:
            p_smem.at[wg][...] = p16
            plgpu.commit_smem()
            a = p_smem.at[wg]
        else:
            a = p16

        acc = _mma_into(acc, a, v_smem.at[slot], in_place=not p_via_smem)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m, l

    def sync_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    # Ping-pong (FA3): the turn barrier completes when both consumers reach it, twice per step
    # (QK issued; softmax done). Consumer 1 starts one phase late, so one consumer's softmax runs
    # while the other's matmuls run; consumer 0 makes up the phase at the end.
    pl.when(wg == 1)(sync_turn)
    carry = (
        plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), layout),
        plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), layout.reduce(1)),
        plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), layout.reduce(1)),
    )
    carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
    pl.when(wg == 0)(sync_turn)
    out, lse2 = common.finalize(*carry)

    my_q[...] = out.astype(dtype)  # Q's tile is free again: stage the output there
    lse_smem.at[wg][...] = lse2
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_q, out_ref.at[b, pl.ds(row0, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
    plgpu.wait_smem_to_gmem(0)


def _producer(k_ref, v_ref, scratch, *, config: ForwardConfig, steps: tuple, group: int):
    _, k_smem, v_smem, _, _, bars = scratch
    _, k_loaded, v_loaded, k_free, v_free, _ = bars
    lo, _, _, hi = steps
    b, kh = lax.axis_index("b"), lax.div(lax.axis_index("h"), group)
    bkv = config.block_kv
    plgpu.set_max_registers(config.registers[1], action="decrease")

    @pl.loop(lo, hi)
    def _(kv):
        i = kv - lo
        slot = lax.rem(i, config.stages)
        tile = (b, pl.ds(kv * bkv, bkv), kh)

        @pl.when(i >= config.stages)
        def _():
            plgpu.barrier_wait(k_free.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[tile], k_smem.at[slot], k_loaded.at[slot])

        @pl.when(i >= config.stages)
        def _():
            plgpu.barrier_wait(v_free.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[tile], v_smem.at[slot], v_loaded.at[slot])

    # Drain: observe the consumers' last releases, so every barrier phase is consumed before
    # the CTA exits (the interpreter checks it; on the GPU it costs the producer a wait).
    @pl.loop(jnp.maximum(hi - config.stages, lo), hi)
    def _(kv):
        slot = lax.rem(kv - lo, config.stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    statics: AttentionStatics,
    config: ForwardConfig,
    seq_lens: tuple[int, int],
    interpret: plgpu.InterpretGPUParams | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Padded q `(B, Tp, N, D)`, k, v `(B, Sp, K, D)` (Tp a multiple of 2 * block_q, Sp of
    block_kv, D a multiple of 64) -> `(out (B, Tp, N, D), lse2 (B, N, Tp) float32)`.

    `seq_lens`: the real (T, S); rows and keys past them are padding the visibility rule hides.
    """
    batch, seq_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    bq, bkv = config.block_q, config.block_kv
    seq = (0, 0, seq_lens[0], seq_lens[1])
    p_via_smem = interpret is not None

    def body(q_ref, k_ref, v_ref, out_ref, lse_ref, *scratch):
        cta_rows = lax.axis_index("q") * (CONSUMERS * bq)
        steps = visibility.block_range(statics, cta_rows, CONSUMERS * bq, bkv, seq)
        wg = lax.axis_index("wg")

        @pl.when(wg < CONSUMERS)
        def _():
            _consumer(
                q_ref,
                k_ref,
                v_ref,
                out_ref,
                lse_ref,
                scratch,
                statics=statics,
                config=config,
                steps=steps,
                seq=seq,
                p_via_smem=p_via_smem,
            )

        @pl.when(wg == PRODUCER)
        def _():
            _producer(
                k_ref,
                v_ref,
                scratch,
                config=config,
                steps=steps,
                group=num_heads // num_kv_heads,
            )

    dtype = q.dtype
    scratch = (
        _smem((CONSUMERS, bq, head_dim), dtype, head_dim),
        _smem((config.stages, bkv, head_dim), dtype, head_dim),
        _smem((config.stages, bkv, head_dim), dtype, head_dim),
        _smem((CONSUMERS, bq, bkv), dtype, bkv) if p_via_smem else None,
        plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        (
            plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.Barrier(num_barriers=config.stages),
            plgpu.Barrier(num_barriers=config.stages),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=config.stages),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=config.stages),
            plgpu.Barrier(num_arrivals=CONSUMERS),
        ),
    )
    out_type = (
        jax.ShapeDtypeStruct(q.shape, dtype),
        jax.ShapeDtypeStruct((batch, num_heads, seq_q), jnp.float32),
    )
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(seq_q // (CONSUMERS * bq), num_heads, batch),
        grid_names=("q", "h", "b"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v)
