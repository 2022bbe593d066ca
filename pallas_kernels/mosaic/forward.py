"""FlashAttention forward for Hopper on Pallas' Mosaic GPU backend (the FA3 design).

Grid: one CTA per (query tile of 2 * block_q rows, query head, batch row). A CTA has three
warpgroups (pipeline.py): two consumers, each owning block_q query rows, and one producer that
streams K and V tiles into a ring of `stages` shared-memory slots with TMA. Every consumer walks the
same key tiles (the CTA's `visibility.block_range` over its 2 * block_q rows), so each tile is
loaded once; a tile outside the CTA's full range gets the element mask of
`visibility.element_visible` (a consumer whose rows cannot see it adds nothing).

The consumers keep S, P and the output accumulator in registers (WGMMA layout), work in base 2
(`common.LOG2E` folded into the scale) and take turns on the tensor cores (`pipeline.Turn`). QK^T
reads Q and K from shared memory; PV reads P from registers (on the GPU) or, in interpret mode,
from a shared-memory staging tile. Output and base-2 logsumexp leave through shared memory (TMA).
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
from pallas_kernels.operands import AttentionStatics


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Tiles of the Mosaic forward: block_q rows per consumer, block_kv keys per step, and the
    depth of the K/V ring."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    registers: tuple[int, int] = (232, 40)  # consumer, producer (setmaxnreg)


def _consumer(
    q_ref,
    out_ref,
    lse_ref,
    scratch,
    *,
    statics: AttentionStatics,
    config: ForwardConfig,
    steps: tuple,
    seq: visibility.Seq,
    interpret: bool,
):
    q_smem, k_ring, v_ring, p_smem, lse_smem, q_loaded, k_loaded, v_loaded, k_free, v_free, turn = (
        scratch
    )
    bq, bkv = config.block_q, config.block_kv
    wg = lax.axis_index("wg")
    b, h = lax.axis_index("b"), lax.axis_index("h")
    row0 = lax.axis_index("q") * (CONSUMERS * bq) + wg * bq
    head_dim = q_smem.shape[-1]
    dtype = q_smem.dtype
    lo, full_lo, full_hi, hi = steps
    turns = pp.Turn(turn, wg)

    plgpu.set_max_registers(config.registers[0], action="increase")
    my_q = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], my_q, q_loaded.at[wg])
    plgpu.barrier_wait(q_loaded.at[wg])

    rows = row0 + pp.iota((bq, bkv), 0)
    cols0 = pp.iota((bq, bkv), 1)

    def step(kv, carry, *, masked: bool):
        acc, m, l = carry
        slot = lax.rem(kv - lo, config.stages)
        plgpu.barrier_wait(k_loaded.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, my_q, k_ring.at[slot].T)
            turns.sync()  # QK issued: the other consumer may issue its matmul
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        mask = None
        if masked:
            mask = visibility.element_visible(statics, rows, kv * bkv + cols0, seq)
        s2, _ = common.scores(s, statics.scale, statics, None, mask)
        p, m, l, alpha = common.online_softmax_step(s2, m, l)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(dtype)
        turns.done()  # softmax done
        plgpu.barrier_wait(v_loaded.at[slot])
        turns.wait()  # the tensor cores are ours: the other consumer is in its softmax
        a = pp.operand(p16, None if p_smem is None else p_smem.at[wg], via_smem=interpret)
        acc = pp.mma_into(acc, a, v_ring.at[slot], in_place=not interpret)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m, l

    turns.start()
    carry = (
        plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), LAYOUT),
        plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), LAYOUT.reduce(1)),
        plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), LAYOUT.reduce(1)),
    )
    carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
    turns.finish()
    out, lse2 = common.finalize(*carry)

    my_q[...] = out.astype(dtype)  # Q's tile is free again: stage the output there
    lse_smem.at[wg][...] = lse2
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_q, out_ref.at[b, pl.ds(row0, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
    plgpu.wait_smem_to_gmem(0)


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    statics: AttentionStatics,
    config: ForwardConfig,
    seq_lens: tuple[int, int],
    seq_info: jax.Array | None = None,
    interpret: plgpu.InterpretGPUParams | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Padded q `(B, Tp, N, D)`, k, v `(B, Sp, K, D)` (Tp a multiple of 2 * block_q, Sp of
    block_kv, D a multiple of 64) -> `(out (B, Tp, N, D), lse2 (B, N, Tp) float32)`.

    `seq_lens`: the real (T, S); rows and keys past them are padding the visibility rule hides.
    `seq_info`: `(B, 4)` int32 offsets and lengths per batch row (`Operands.seq_info`), or None.
    """
    batch, seq_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    bq, bkv = config.block_q, config.block_kv
    static_seq = (0, 0, seq_lens[0], seq_lens[1])
    via_smem = interpret is not None
    inputs = (q, k, v) if seq_info is None else (q, k, v, seq_info)

    def body(*refs):
        (q_ref, k_ref, v_ref, *seq_ref), (out_ref, lse_ref), scratch = pp.split_refs(
            refs, (len(inputs), 2)
        )
        seq = pp.seq_of(seq_ref[0] if seq_ref else None, static_seq, lax.axis_index("b"))
        cta_rows = lax.axis_index("q") * (CONSUMERS * bq)
        steps = visibility.block_range(statics, cta_rows, CONSUMERS * bq, bkv, seq)
        wg = lax.axis_index("wg")

        @pl.when(wg < CONSUMERS)
        def _():
            _consumer(
                q_ref,
                out_ref,
                lse_ref,
                scratch,
                statics=statics,
                config=config,
                steps=steps,
                seq=seq,
                interpret=via_smem,
            )

        @pl.when(wg == PRODUCER)
        def _():
            _, k_ring, v_ring, _, _, _, k_loaded, v_loaded, k_free, v_free, _ = scratch
            b, kh = lax.axis_index("b"), lax.div(lax.axis_index("h"), group)

            def tile(ref):
                return lambda kv: ref.at[b, pl.ds(kv * bkv, bkv), kh]

            streams = (
                pp.Stream(tile(k_ref), k_ring, k_loaded, k_free),
                pp.Stream(tile(v_ref), v_ring, v_loaded, v_free),
            )
            pp.produce(streams, steps[0], steps[3], config.stages, config.registers[1])

    dtype = q.dtype
    k_loaded, v_loaded, k_free, v_free = pp.stream_barriers(2, config.stages)
    scratch = (
        pp.smem_tile((CONSUMERS, bq, head_dim), dtype),
        pp.smem_tile((config.stages, bkv, head_dim), dtype),
        pp.smem_tile((config.stages, bkv, head_dim), dtype),
        pp.smem_tile((CONSUMERS, bq, bkv), dtype) if via_smem else None,
        plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        plgpu.Barrier(num_barriers=CONSUMERS),
        k_loaded,
        v_loaded,
        k_free,
        v_free,
        plgpu.Barrier(num_arrivals=CONSUMERS),
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
    )(*inputs)
