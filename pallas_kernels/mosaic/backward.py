"""FlashAttention backward for Hopper on Pallas' Mosaic GPU backend: two kernels, or one.

`delta = rowsum(dO * O)` and the base-2 logsumexp come from the caller, or with
`BackwardConfig.row_stats` from the dQ kernel, which then runs first. Both kernels use the
three-warpgroup layout of pipeline.py (two consumers, one TMA producer) and recompute the scores:
- dK/dV: one CTA per (2 * rows keys, KV head, batch row); each consumer owns `rows` keys and
  accumulates dK and dV in registers over the query tiles the CTA visits (`pipeline.Visits`, the
  visibility rule's transposed form) for every query head of its GQA group. The producer streams
  Q, dO, logsumexp and delta tiles (and the queries' segment ids). Transposed tiles:
  S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
- dQ: one CTA per (2 * rows queries, query head, batch row), like the forward: the producer
  streams K and V (and segment ids), each consumer accumulates dQ += dS K for its rows.
Five of the seven matmuls are the FA2 backward's; QK^T and dO V^T are computed in both kernels.
The two kernels are deterministic. With `BackwardConfig.fused_dq` the dK/dV kernel also adds
each step's dQ part (dS K, float32) to dQ in GMEM by TMA reduce-add, and the dQ kernel does not
run: five matmuls, FA3's single kernel, whose adds land in a varying order (`pooled_dq`,
`split_dq`: how the consumers share the part). In interpret mode the register operands of wgmma
are staged through shared memory, and the dQ parts (no TMA reduction there) go to slices that
the host sums. With `BackwardConfig.split_head` (head dim 256) both consumers of a kernel share
its CTA's rows and split the head dim of the accumulators instead (FA3's layout there).
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
from pallas_kernels.mosaic.pipeline import CONSUMERS, LAYOUT


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the two backward kernels, the same for both: each consumer owns `rows` of its
    kernel's major operand (keys in dK/dV, queries in dQ) and each step streams `cols` of the
    other (both multiples of 64: wgmma's contraction dim); `stages` slots in the ring.

    A consumer releases a slot only after its last matmul of the step, so with one slot the two
    consumers do not ping-pong (`turns`): they would wait on their own release.
    """

    rows: int = 64
    cols: int = 64
    stages: int = 2
    registers: tuple[int, int] = (232, 40)
    no_auto_barriers: bool = False  # pipeline.compiler_params
    # One kernel (5 GEMMs): the dK/dV kernel also computes each step's dQ part (dS K, with dS^T
    # staged in SMEM and read transposed) and adds it to a float32 dQ in GMEM by TMA
    # reduce-add; the dQ kernel does not run. The order of the adds varies run to run (not
    # deterministic). Interpret mode (no TMA reduction there) writes each part to its own
    # slice of a buffer that XLA sums.
    fused_dq: bool = False
    # With `fused_dq`: one dQ part per CTA step, not one per consumer. Both consumers stage
    # their dS^T in SMEM and the consumers take turns (visit i: consumer i mod 2) computing
    # dS K over both key tiles and adding it, which halves the float32 reduce-add traffic to
    # GMEM (at seq 16k, head dim 128, one part per consumer step adds 34 GB). No ping-pong then
    # (`turns`).
    pooled_dq: bool = False
    # With `pooled_dq`: every step both consumers compute the pooled part, each for its share of
    # the head dim (D / 2 columns, over both key tiles), instead of one consumer the whole part
    # on alternate steps: the float32 accumulator a consumer holds beside dK and dV is halved
    # (64 x 64 at head dim 128, as FA3's backward splits dQ). Head dims below 128 (shares
    # narrower than wgmma's 64-column swizzle) keep the alternating consumers.
    split_dq: bool = False
    # The dK/dV kernel issues dP^T = V dO^T and dV += P^T dO back to back and computes dS while
    # the dV matmul still runs (`wgmma_accumulator_load(wait_n=1)`), then issues dK += dS^T Q:
    # tokamax's order. Without it, dP is awaited before dV is issued. GPU only (interpret mode
    # runs the plain order: no in-place accumulators there). With `fused_dq` the step's dQ part
    # is computed while the dK matmul runs.
    overlap_dv: bool = False
    # Both kernels issue their two products of the streamed tile (S and dP: QK^T and dO V^T, or
    # K Q^T and V dO^T) back to back and compute P while the dP matmul runs
    # (`wgmma_accumulator_load(wait_n=1)`); without it, dP is issued after P is computed.
    early_dp: bool = False
    # No FA3 ping-pong of the two consumers (`pipeline.Turn`), as tokamax's sm90 backward runs
    # them. With one stage there is none anyway (see the class docstring).
    no_pingpong: bool = False
    # Each head's tiles launched one after another (the grid ("h", "b", "t"), its last axis
    # fastest: the forward's `longest_first` says why), and the dQ kernel's query tiles in
    # reverse order: under a causal mask a head's CTAs launched first are its longest (the dK/dV
    # kernel's first key tiles see the most queries, the dQ kernel's last query tiles the most
    # keys). Without it, batch rows run fastest: 1.45x slower for the 5-GEMM kernel at D128
    # causal 4k (session 33). Sessions before 35 described the two orders the other way round.
    longest_first: bool = False
    # Each kernel's loop as one body, the element rule under a `lax.cond` on the tile's kind
    # (tokamax's way), instead of the walk's runs of masked and unmasked tiles, each its own copy
    # of the loop body: less code to lower and compile (head dim 128, causal, a jitted forward +
    # backward lowered for the H200 on CPU: 1.13 MB of module text in 0.81 s with the runs,
    # 0.83 MB in 0.57 s with one body; 0.95 MB in 0.65 s at d0f89a3, before the runs).
    one_body: bool = False
    # Each kernel's output stores awaited only until they have read shared memory
    # (`pipeline.wait_stores`).
    async_store: bool = False
    # The dK/dV kernel reads each step's logsumexp and delta (per query: columns of its
    # transposed tile, 16 registers each) from shared memory where they are used, not at the
    # step's start. Offline (benchmarks/offline, session 22) the 5-GEMM kernel at head dim 128
    # (setmaxnreg 240/24, split_dq) spills 20 bytes with it instead of 64; the two kernels
    # spill none either way. Not yet timed on the GPU.
    late_stats: bool = False
    # With `fused_dq` and `overlap_dv`: each step's dQ part is issued before dK (not after) and
    # read while the dK matmul runs (wgmma groups complete in order: read after dK, the part
    # waited for dK too, and the part's store and reduce-add ran with the tensor cores idle;
    # offline SASS, session 22). GPU only, as overlap_dv. Not yet timed.
    dq_first: bool = False
    # FA3's head-dim split of both kernels (for head dim 256, where one consumer cannot hold
    # dK and dV, 64 x 256 float32 each, 256 registers a thread, and dQ spilled 484 bytes): a
    # CTA owns `rows` keys (dK/dV) or queries (dQ) shared by both consumers; consumer c
    # computes S and dP for its half of each step's streamed columns, stores its bf16 P / dS
    # half into shared tiles, and adds the whole tiles' products to its half of the head dim
    # of dK and dV, or dQ (`_dkdv_split_consumer`, `_dq_split_consumer`). Two kernels only
    # (not with fused_dq, overlap_dv), no ping-pong; the own tiles take half the shared memory,
    # so two stages fit at 256. Its 5-GEMM form, each consumer adding its half of the head dim
    # of the dQ part by atomic adds from registers (two stages fit; TMA reduce-add's float32
    # staging leaves one), ran 2.1-2.5x slower than the two kernels on the H200 (session 41,
    # HOPPER_PLAN 7zg) and was dropped.
    split_head: bool = False
    # With `pooled_dq`: two slots (by visit parity) for the staged dS^T tiles and for each
    # consumer's float32 dQ part, so that staging visit i + 1's dS^T waits only for the parts
    # of visit i - 1 (not i) to have read their slot, and a part is written while the previous
    # one's reduce-add may still read the other slot. Offline SASS (session 32) has the 5-GEMM
    # key step at head dim 128 with fewer instructions (502) than the two kernels' steps
    # together (337 + 259) but 3 named-barrier syncs coupling the consumers; 16 KiB (head dim
    # 64) to 24 KiB (128) more shared memory. On the H100 (results/2026-12-06-h100-s32/
    # call5-7-double-ds): the 5-GEMM kernel at head dim 128 causal 4k 1.02-1.05x faster with
    # it, level with the two kernels; 1.008x at 16k non-causal; 0.99x at 64. Session 33
    # (results/2026-12-06-h100-s33/call2): 1.039x at 16k non-causal, where configs.py's rule
    # now takes it.
    double_ds: bool = False
    # The dQ kernel, run first, computes its rows' delta (rowsum(dO * O) in float32, less
    # `host.BackwardRows.shift`) from the forward's output read straight into registers, and
    # the logsumexp as the kernels read it (`kernel_lse`), and writes both for the dK/dV kernel:
    # the backward is its two kernels, without XLA's reduction over O and dO before them (35 us
    # of the 2.8 ms D128 non-causal 4k backward under ncu on the H200, session 10) and the
    # logsumexp's select. Where the dQ kernel does not run (`fused_dq`) XLA computes them.
    row_stats: bool = False

    def __post_init__(self):
        if self.split_head and (self.fused_dq or self.overlap_dv):
            raise ValueError("BackwardConfig: split_head runs without fused_dq and overlap_dv")
        if self.double_ds and not (self.fused_dq and self.pooled_dq):
            raise ValueError("BackwardConfig: double_ds needs fused_dq and pooled_dq")
        if self.split_head and self.cols % (CONSUMERS * 32):  # halves of whole 64-byte rows
            raise ValueError(
                f"BackwardConfig: split_head needs cols a multiple of {CONSUMERS * 32}, "
                f"got {self.cols}"
            )

    @property
    def turns(self) -> bool:
        """The consumers ping-pong: not with one stage, nor with `pooled_dq` (each step's part
        needs both consumers' dS^T of that step, where the ping-pong keeps them half a step
        apart: they would wait on each other), nor with `split_head` (each step needs both
        consumers' halves)."""
        pooled = self.fused_dq and self.pooled_dq
        return not self.no_pingpong and self.stages >= 2 and not pooled and not self.split_head

    @property
    def ds_slots(self) -> int:
        """Slots of the pooled dS^T and dQ part tiles (`double_ds`)."""
        return 2 if self.double_ds else 1

    @property
    def cta_rows(self) -> int:
        """A CTA's own rows (the dK/dV kernel's keys, the dQ kernel's queries): each
        consumer's `rows`, or with `split_head` the `rows` both share."""
        return self.rows if self.split_head else CONSUMERS * self.rows

    @property
    def stats_in_dq(self) -> bool:
        """`row_stats` applies: the dQ kernel runs (not `fused_dq`)."""
        return self.row_stats and not self.fused_dq


# The BackwardConfig on/off flags: configs.py names the ones on per head dim;
# benchmarks/tune_mosaic.py sweeps them.
OPTIONS = (
    "no_auto_barriers",
    "fused_dq",
    "pooled_dq",
    "split_dq",
    "overlap_dv",
    "early_dp",
    "no_pingpong",
    "longest_first",
    "one_body",
    "async_store",
    "late_stats",
    "dq_first",
    "split_head",
    "double_ds",
    "row_stats",
)


def two_kernels(config: BackwardConfig) -> BackwardConfig:
    """`config` with the dQ kernel in place of the 5-GEMM kernel's reduce-adds (whose order
    varies run to run: `deterministic=True`): `fused_dq` off, and `double_ds`, which needs it."""
    return dataclasses.replace(config, fused_dq=False, double_ds=False)


def with_options(config: BackwardConfig, options) -> BackwardConfig:
    """`config` with exactly the flags of OPTIONS named in `options` on (the rest off)."""
    return pp.with_options(config, options, OPTIONS)


def _kernel(body, out_type, scratch, grid, config, interpret):
    """`grid`: (tiles, heads, batch rows), launched in `config`'s order (`longest_first`)."""
    names = ("h", "b", "t") if config.longest_first else ("t", "h", "b")  # last: fastest
    by_name = dict(zip(("t", "h", "b"), grid))
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=(scratch,),
        grid=tuple(by_name[n] for n in names),
        grid_names=names,
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=pp.compiler_params(config.no_auto_barriers),
        interpret=interpret,
    )


def kernel_lse(lse2: jax.Array) -> jax.Array:
    """The forward's base-2 logsumexp as both kernels read it: +inf, not -inf, for rows that saw
    no key, so that `_probs` gives 0 there without a compare and select per element (16 of
    each per step and thread in the dK/dV kernel, where a step's rows are its tile's columns;
    offline SASS, session 22). Done by XLA before the kernels, or by the dQ kernel for its rows
    (`row_stats`)."""
    return jnp.where(lse2 == -jnp.inf, jnp.inf, lse2)


def _probs(s2: jax.Array, lse2: jax.Array) -> jax.Array:
    """`2**(s2 - lse2)` (as `common.probs_from_lse`, with the logsumexp already broadcast to the
    tile and rows that saw nothing at +inf: `kernel_lse`)."""
    return jnp.exp2(s2 - lse2)


def _vector(ref, shape: tuple[int, int], dim: int) -> jax.Array:
    """A per-row (`dim` 0) or per-column (`dim` 1) vector in shared memory, broadcast to a tile."""
    layout = LAYOUT.reduce(1 - dim)
    return lax.broadcast_in_dim(plgpu.load(ref, layout=layout), shape, [dim])


def _stats(ref, shape: tuple[int, int], *, late: bool):
    """A step's per-query vector (`_vector` along dim 1) as a thunk: read from shared memory
    where the thunk is called with `late` (`BackwardConfig.late_stats`), else here."""
    if late:
        return lambda: _vector(ref, shape, 1)
    value = _vector(ref, shape, 1)
    return lambda: value


def _launch_refs(refs, names, out_names):
    """The kernel's refs by name: inputs, outputs, and the scratch dict."""
    ins, outs, (sc,) = pp.split_refs(refs, (len(names), len(out_names)))
    return dict(zip(names, ins)) | dict(zip(out_names, outs)), sc


def _visits(refs: dict, statics, seq, t, rows, cols, *, transposed: bool) -> pp.Visits:
    """The CTA's column tiles (it is row tile `t`, of `rows` rows): its row of the visit lists,
    or the visibility rule's ranges."""
    if "full" in refs:
        b = lax.axis_index("b")
        bt = b if refs["full"].shape[0] > 1 else 0
        return pp.list_visits(
            lambda j: refs["full"][bt, 0, t, j], lambda j: refs["partial"][bt, 0, t, j]
        )
    return pp.range_visits(
        visibility.block_range(statics, t * rows, rows, cols, seq, transposed=transposed)
    )


def _ring(scratch: dict, name: str, shape, dtype, stages: int, swizzled: bool = True) -> None:
    """Add a streamed ring `name` (stages x shape) and its loaded/free barriers to `scratch`."""
    smem = (
        pp.smem_tile((stages, *shape), dtype) if swizzled else plgpu.SMEM((stages, *shape), dtype)
    )
    loaded, free = pp.stream_barriers(1, stages)
    scratch |= {name: smem, f"{name}_loaded": loaded, f"{name}_free": free}


def _stream(sc: dict, name: str, source) -> pp.Stream:
    return pp.Stream(source, sc[name], sc[f"{name}_loaded"], pp.Releases(sc[f"{name}_free"]))


def _tile_rule(sc: dict, stream: str, own_segments, slot, rule, transposed: bool, cols=None):
    """One step's element rule as a thunk: `rule(**segment ids)` (`visibility.element_visible`
    with the tile's rows and columns bound). With segment ids (`own_segments`: the consumer's,
    along dim 0), the step's streamed ids (ring `stream`, along dim 1; `cols`: a `pl.ds` of
    them) are awaited, read and released here. `transposed`: the dK/dV kernel's tile (keys
    along dim 0)."""
    segments = {}
    if own_segments is not None:
        plgpu.barrier_wait(sc[f"{stream}_loaded"].at[slot])
        ids = sc[stream].at[slot] if cols is None else sc[stream].at[slot, cols]
        streamed = _vector(ids, own_segments.shape, 1)
        plgpu.barrier_arrive(sc[f"{stream}_free"].at[slot])
        q, kv = (streamed, own_segments) if transposed else (own_segments, streamed)
        segments = dict(q_segments=q, kv_segments=kv)
    return lambda: rule(**segments)


def _element_rule(refs, statics, positions, seq, batch, head):
    """A step's element rule, `rule(**segment ids)` (`visibility.element_visible`), its tile's
    positions made when it is called (`positions()`: `pipeline.positions`)."""
    return lambda **segments: visibility.element_visible(
        statics, *positions(), seq, batch=batch, head=head, extent=pp.extent(refs), **segments
    )


def _step_probs(statics, masked, visible, lse):
    """A step's `probs(S) -> (P, tanh)`: the scores (scale, softcap, and the element rule's mask
    where the tile needs it: `_under_rule`) against `lse()`, the logsumexp as a tile."""

    def probs(qk):
        def of(mask):
            s2, tanh = common.scores(qk, statics.scale, statics, None, mask)
            return _probs(s2, lse()), tanh

        return _under_rule(masked, visible, of)

    return probs


def _under_rule(masked, visible, compute):
    """`compute(mask)` with the element rule's mask (`visible()`) where the tile needs it, else
    `compute(None)`. `masked`: static (the walk's runs: each kind of tile in its own copy of the
    loop body) or traced (`BackwardConfig.one_body`: both in one body, chosen by `lax.cond`)."""
    if isinstance(masked, bool):
        return compute(visible() if masked else None)
    return lax.cond(masked, lambda: compute(visible()), lambda: compute(None))


def _scores_and_dp(shape, s_operands, dp_operands, turns, probs, dp_loaded, *, early: bool):
    """One step's S = a @ b (`s_operands`) turned into `probs(S) -> (P, tanh)`; with `early`
    (`BackwardConfig.early_dp`) dP (`dp_operands`) is issued right after S, once `dp_loaded`
    (its streamed operand's barrier) is awaited, and P is computed while it runs. Returns (P,
    tanh, dP or None: `_late_dp`); the consumers' turn is synced after the issue."""
    if early:
        plgpu.barrier_wait(dp_loaded)

    def products(s_ref, dp_ref=None):
        plgpu.wgmma(s_ref, *s_operands)
        if dp_ref is not None:
            plgpu.wgmma(dp_ref, *dp_operands)
        turns.sync()
        if dp_ref is None:
            return s_ref[...]
        p, tanh = probs(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))  # dP in flight
        return p, tanh, dp_ref[...]

    acc = plgpu.ACC(shape, jnp.float32)
    if early:
        return pl.run_scoped(products, acc, acc)
    return (*probs(pl.run_scoped(products, acc)), None)


def _late_dp(dp, dp_operands, dp_loaded, shape):
    """dP as `_scores_and_dp` returned it, or (without `early_dp`) issued now, once its
    streamed operand is loaded (`dp_loaded`)."""
    if dp is not None:
        return dp
    plgpu.barrier_wait(dp_loaded)
    return pp.matmul(*dp_operands, shape)


# --------------------------------------------------------------------------------------------------
# dK / dV
# --------------------------------------------------------------------------------------------------


def _dkdv_consumer(refs, sc, *, statics, config, visits, group, seq, interpret):
    num_heads = group * refs["k"].shape[2]
    bq, bkv = config.cols, config.rows
    wg = lax.axis_index("wg")
    b, kh = lax.axis_index("b"), lax.axis_index("h")
    col0 = lax.axis_index("t") * (CONSUMERS * bkv) + wg * bkv  # this consumer's first key
    head_dim = sc["k"].shape[-1]
    dtype = sc["k"].dtype
    turns = pp.Turn(sc["turn"], wg, enabled=config.turns)
    n = visits.count  # query tiles per query head
    overlap = config.overlap_dv and not interpret
    split = _splits_dq(config, head_dim)

    plgpu.set_max_registers(config.registers[0], action="increase")
    my_k, my_v = sc["k"].at[wg], sc["v"].at[wg]
    own = sc["own_loaded"].at[wg]
    plgpu.copy_gmem_to_smem(refs["k"].at[b, pl.ds(col0, bkv), kh], my_k, own)
    plgpu.copy_gmem_to_smem(refs["v"].at[b, pl.ds(col0, bkv), kh], my_v, own)
    if "kv_seg" in refs:
        plgpu.copy_gmem_to_smem(refs["kv_seg"].at[b, pl.ds(col0, bkv)], sc["kv_seg"].at[wg], own)
    plgpu.barrier_wait(own)  # one phase: every copy to it arrived
    kv_segments = None
    if "kv_seg" in refs:
        kv_segments = _vector(sc["kv_seg"].at[wg], (bkv, bq), 0)

    staging = sc["stage"].at[wg] if interpret else None

    def step(g, j, carry, *, masked: bool):
        """Visit `j` (query tile `visits.tile(j)`) of query head `kh * group + g`."""
        dk, dv = carry
        head, qt = kh * group + g, visits.tile(j)
        slot = lax.rem(g * n + j, config.stages)  # the ring's visit g * n + j
        q_tile, do_tile = sc["q"].at[slot], sc["do"].at[slot]
        dq_part = None  # `fused_dq`: adds this step's dQ part, given dS^T
        if config.fused_dq:
            at = (b, head, qt * bq, 0)  # the part's first row and column
            if config.pooled_dq:
                dq_part = functools.partial(
                    _add_pooled_dq_part,
                    refs,
                    sc,
                    visit=g * n + j,
                    at=at,
                    split=split,
                    slots=config.ds_slots,
                    interpret=interpret,
                )
            else:
                dq_part = functools.partial(
                    _add_dq_part, refs, sc, my_k=my_k, at=at, interpret=interpret
                )
        plgpu.barrier_wait(sc["q_loaded"].at[slot])
        positions = functools.partial(pp.positions, (bkv, bq), (qt * bq, col0), queries=1)

        rule = _element_rule(refs, statics, positions, seq, b, head)
        visible = _tile_rule(sc, "q_seg", kv_segments, slot, rule, transposed=True)
        plgpu.barrier_wait(sc["lse_loaded"].at[slot])
        lse = _stats(sc["lse"].at[slot], (bkv, bq), late=config.late_stats)

        probs = _step_probs(statics, masked, visible, lse)

        dp_operands, dp_loaded = (my_v, do_tile.T), sc["do_loaded"].at[slot]
        p, tanh, dp = _scores_and_dp(
            (bkv, bq), (my_k, q_tile.T), dp_operands, turns, probs, dp_loaded, early=config.early_dp
        )
        plgpu.barrier_arrive(sc["lse_free"].at[slot])
        factor = None
        if statics.has_dropout:  # transposed tile: queries along dim 1, keys along dim 0
            rows, keys = positions()
            rows = pp.dropout_rows(statics, refs["seeds"], b, head, num_heads, rows)
            factor = pp.dropout_factor(statics, rows, keys)
        if overlap:
            turns.done()
            turns.wait()
            return _dkdv_overlapped(sc, slot, my_v, p, tanh, factor, (dk, dv), config, dp, dq_part)
        dp = _late_dp(dp, dp_operands, dp_loaded, p.shape)
        p_dropped = p
        if factor is not None:
            p_dropped, dp = p * factor, dp * factor
        plgpu.barrier_wait(sc["delta_loaded"].at[slot])
        _, ds = common.logits_grad(p, dp, _vector(sc["delta"].at[slot], (bkv, bq), 1), tanh)
        plgpu.barrier_arrive(sc["delta_free"].at[slot])
        turns.done()
        turns.wait()
        a = pp.operand(p_dropped.astype(dtype), staging, via_smem=interpret)
        dv = pp.mma_into(dv, a, do_tile, in_place=not interpret)
        plgpu.barrier_arrive(sc["do_free"].at[slot])
        ds16 = ds.astype(dtype)
        a = pp.operand(ds16, staging, via_smem=interpret)
        dk = pp.mma_into(dk, a, q_tile, in_place=not interpret)
        plgpu.barrier_arrive(sc["q_free"].at[slot])
        if dq_part is not None:
            dq_part(ds16)
        return dk, dv

    def head_steps(g, carry):
        """Every visit of query head `kh * group + g`: its tiles split by `visits.runs` into
        masked and unmasked runs, so interior tiles skip the element rule."""

        return pp.walk(visits, functools.partial(step, g), carry, one_body=config.one_body)

    zeros = plgpu.layout_cast(jnp.zeros((bkv, head_dim), jnp.float32), LAYOUT)
    turns.start()
    dk, dv = lax.fori_loop(0, group, head_steps, (zeros, zeros))
    turns.finish()
    if config.fused_dq and config.pooled_dq:  # the last parts have read both K tiles
        _await_last_parts(sc, group * n, config.ds_slots)
    my_k[...] = (dk * statics.scale).astype(dtype)  # K and V are free again: stage dK, dV there
    my_v[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_k, refs["dk"].at[b, pl.ds(col0, bkv), kh])
    plgpu.copy_smem_to_gmem(my_v, refs["dv"].at[b, pl.ds(col0, bkv), kh])
    pp.wait_stores(config.async_store)


def _exchange_halves(sc, halves: dict, mine, not_first, interpret: bool):
    """`split_head`: this consumer's halves (`halves`: shared tile name -> its columns `mine`,
    bf16) stored, once both consumers are done with the previous step's tiles (`not_first`:
    traced, the step has one), and both consumers' halves awaited. Returns `whole(name)`: the
    whole tile as a wgmma A operand, read into registers on the GPU (an SMEM A operand must
    share B's 128-byte swizzle, and the 32-column halves are whole rows only of a 64-byte
    one), in SMEM for the interpreter (which runs no register A operand). The step releases
    the tiles with `barrier_arrive(sc["halves_free"])` after its last matmul."""
    pl.when(not_first)(lambda: plgpu.barrier_wait(sc["halves_free"]))
    for name, value in halves.items():
        sc[name].at[:, mine][...] = value
    plgpu.commit_smem()
    plgpu.barrier_arrive(sc["halves_ready"])
    plgpu.barrier_wait(sc["halves_ready"])
    return lambda name: sc[name] if interpret else plgpu.load(sc[name], layout=LAYOUT)


def _dkdv_split_consumer(refs, sc, *, statics, config, visits, group, seq, interpret):
    """`BackwardConfig.split_head`: the CTA's `rows` keys shared by both consumers; consumer
    `wg` computes S^T and dP^T for query columns `wg * half ..` of each step (`half` = cols /
    2), stores P^T and dS^T (bf16) into those columns of the shared `p_t` / `ds_t` tiles, and
    once both halves are there adds the whole tiles' products to dK and dV for head-dim
    columns `wg * width ..` (`width` = D / 2). Barriers: `halves_ready` (both halves stored,
    each step; once more before the epilogue's copies) and `halves_free` (both consumers done
    with the step's tiles, awaited before the next step's stores)."""
    num_heads = group * refs["k"].shape[2]
    bq, bkv = config.cols, config.rows
    half = bq // CONSUMERS
    wg = lax.axis_index("wg")
    b, kh = lax.axis_index("b"), lax.axis_index("h")
    col0 = lax.axis_index("t") * bkv  # the CTA's first key
    head_dim = sc["k"].shape[-1]
    width = head_dim // CONSUMERS
    dtype = sc["k"].dtype
    n = visits.count  # query tiles per query head
    mine = pl.ds(pl.multiple_of(wg * half, half), half)  # this consumer's query columns
    share = pl.ds(pl.multiple_of(wg * width, width), width)  # its head-dim columns

    no_turns = pp.Turn(sc["turn"], wg, enabled=False)  # each step needs both halves
    plgpu.set_max_registers(config.registers[0], action="increase")
    keys, values, own = sc["k"].at[0], sc["v"].at[0], sc["own_loaded"].at[0]

    @pl.when(wg == 0)
    def _load_keys():
        plgpu.copy_gmem_to_smem(refs["k"].at[b, pl.ds(col0, bkv), kh], keys, own)
        plgpu.copy_gmem_to_smem(refs["v"].at[b, pl.ds(col0, bkv), kh], values, own)
        if "kv_seg" in refs:
            plgpu.copy_gmem_to_smem(refs["kv_seg"].at[b, pl.ds(col0, bkv)], sc["kv_seg"], own)

    plgpu.barrier_wait(own)  # one phase: every copy to it arrived
    kv_segments = None
    if "kv_seg" in refs:
        kv_segments = _vector(sc["kv_seg"], (bkv, half), 0)

    def step(g, j, carry, *, masked: bool):
        """Visit `j` (query tile `visits.tile(j)`) of query head `kh * group + g`."""
        dk, dv = carry
        head, qt = kh * group + g, visits.tile(j)
        visit = g * n + j
        slot = lax.rem(visit, config.stages)
        q_tile, do_tile = sc["q"].at[slot], sc["do"].at[slot]
        plgpu.barrier_wait(sc["q_loaded"].at[slot])
        positions = functools.partial(
            pp.positions, (bkv, half), (qt * bq + wg * half, col0), queries=1
        )

        rule = _element_rule(refs, statics, positions, seq, b, head)
        visible = _tile_rule(sc, "q_seg", kv_segments, slot, rule, transposed=True, cols=mine)
        plgpu.barrier_wait(sc["lse_loaded"].at[slot])
        lse = _stats(sc["lse"].at[slot, mine], (bkv, half), late=config.late_stats)

        probs = _step_probs(statics, masked, visible, lse)

        dp_operands, dp_loaded = (values, do_tile.at[mine].T), sc["do_loaded"].at[slot]
        p, tanh, dp = _scores_and_dp(
            (bkv, half),
            (keys, q_tile.at[mine].T),
            dp_operands,
            no_turns,
            probs,
            dp_loaded,
            early=config.early_dp,
        )
        plgpu.barrier_arrive(sc["lse_free"].at[slot])
        dp = _late_dp(dp, dp_operands, dp_loaded, p.shape)
        if statics.has_dropout:  # transposed tile: queries along dim 1, keys along dim 0
            rows, cols = positions()
            rows = pp.dropout_rows(statics, refs["seeds"], b, head, num_heads, rows)
            factor = pp.dropout_factor(statics, rows, cols)
            p_dropped, dp = p * factor, dp * factor
        else:
            p_dropped = p
        plgpu.barrier_wait(sc["delta_loaded"].at[slot])
        delta = _vector(sc["delta"].at[slot, mine], (bkv, half), 1)
        _, ds = common.logits_grad(p, dp, delta, tanh)
        plgpu.barrier_arrive(sc["delta_free"].at[slot])
        halves = {"p_t": p_dropped.astype(dtype), "ds_t": ds.astype(dtype)}
        whole = _exchange_halves(sc, halves, mine, visit > 0, interpret)
        dv = pp.mma_into(dv, whole("p_t"), do_tile.at[:, share], in_place=not interpret)
        plgpu.barrier_arrive(sc["do_free"].at[slot])
        dk = pp.mma_into(dk, whole("ds_t"), q_tile.at[:, share], in_place=not interpret)
        plgpu.barrier_arrive(sc["q_free"].at[slot])
        plgpu.barrier_arrive(sc["halves_free"])
        return dk, dv

    def head_steps(g, carry):
        return pp.walk(visits, functools.partial(step, g), carry, one_body=config.one_body)

    zeros = plgpu.layout_cast(jnp.zeros((bkv, width), jnp.float32), LAYOUT)
    dk, dv = lax.fori_loop(0, group, head_steps, (zeros, zeros))
    # Both consumers are past their last step (and its reads of K and V) before either stages
    # its share of dK and dV there.
    pl.when(group * n > 0)(lambda: plgpu.barrier_wait(sc["halves_free"]))
    keys.at[:, share][...] = (dk * statics.scale).astype(dtype)
    values.at[:, share][...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.barrier_arrive(sc["halves_ready"])  # both shares staged: one TMA copies each tile
    plgpu.barrier_wait(sc["halves_ready"])

    @pl.when(wg == 0)
    def _store():
        rows = pl.ds(col0, bkv)
        plgpu.copy_smem_to_gmem(keys, refs["dk"].at[b, rows, kh])
        plgpu.copy_smem_to_gmem(values, refs["dv"].at[b, rows, kh])
        pp.wait_stores(config.async_store)


def _dkdv_overlapped(sc, slot, my_v, p, tanh, factor, dkdv, config, dp=None, dq_part=None):
    """`BackwardConfig.overlap_dv`: one step's dV and dK matmuls with dS computed while the dV
    matmul runs, and before them the dP matmul (issued with dV, read with `wait_n=1`), unless
    `dp` is given (`early_dp`: issued with S). `factor`: the dropout factor (None without
    dropout). `dq_part(dS^T)` (`fused_dq`: `_add_dq_part` or `_add_pooled_dq_part`) runs once
    dK is issued, or with `config.dq_first` issues dK itself after its own matmul. Returns
    (dK, dV)."""
    do, q = sc["do"].at[slot], sc["q"].at[slot]
    dtype = do.dtype
    p_dropped = p if factor is None else p * factor
    if dp is None:
        plgpu.barrier_wait(sc["do_loaded"].at[slot])
    plgpu.barrier_wait(sc["delta_loaded"].at[slot])
    delta = _stats(sc["delta"].at[slot], p.shape, late=config.late_stats)

    def accumulate(refs):
        dk_ref, dv_ref = refs

        def dk_after(dp):
            if factor is not None:
                dp = dp * factor
            _, ds = common.logits_grad(p, dp, delta(), tanh)
            ds16 = ds.astype(dtype)

            def issue_dk():
                plgpu.wgmma(dk_ref, ds16, q)

            if dq_part is None:
                issue_dk()
            elif config.dq_first:  # the part's matmul first, read while dK runs
                dq_part(ds16, then=issue_dk)
            else:  # while dK runs
                issue_dk()
                dq_part(ds16)

        def with_dp(dp_ref):
            plgpu.wgmma(dp_ref, my_v, do.T)
            plgpu.wgmma(dv_ref, p_dropped.astype(dtype), do)
            dk_after(plgpu.wgmma_accumulator_load(dp_ref, wait_n=1))  # dP done, dV in flight

        if dp is None:
            pl.run_scoped(with_dp, plgpu.ACC(p.shape, jnp.float32))
        else:
            plgpu.wgmma(dv_ref, p_dropped.astype(dtype), do)
            dk_after(dp)  # while dV runs

    dk, dv = pl.run_state(accumulate)((plgpu.ACC.init(dkdv[0]), plgpu.ACC.init(dkdv[1])))
    for name in ("delta", "do", "q"):
        plgpu.barrier_arrive(sc[f"{name}_free"].at[slot])
    return dk, dv


def _add_dq_part(refs, sc, ds, *, my_k, at, interpret: bool, then=None) -> None:
    """`fused_dq`: this consumer's dQ part of the step, `dS K` (bq query rows x D, float32),
    added to dQ (`_send_dq_part`). `ds` is dS^T (keys x queries, the dK/dV kernel's transposed
    tile); staged in SMEM it is read transposed as the wgmma's A operand (in interpret mode the
    dK matmul already staged it). `then` (`dq_first`): issues the dK matmul once the part's is
    issued (`pipeline.matmul_sum`)."""
    wg = lax.axis_index("wg")
    staged = sc["stage"].at[wg] if interpret else sc["ds"].at[0, wg]
    if not interpret:
        staged[...] = ds
        plgpu.commit_smem()
    part = pp.matmul(staged.T, my_k, (staged.shape[1], my_k.shape[-1]), then=then)
    _send_dq_part(refs, sc, part, at, interpret)


def _splits_dq(config: BackwardConfig, head_dim: int) -> bool:
    """`split_dq` applies: the pooled part's columns shared by the consumers, each share a
    multiple of 64 (a 128-byte swizzle row of bf16)."""
    return config.fused_dq and config.pooled_dq and config.split_dq and head_dim % 128 == 0


def _add_pooled_dq_part(
    refs, sc, ds, *, visit, at, split: bool, slots: int, interpret: bool, then=None
) -> None:
    """`pooled_dq`: both consumers stage dS^T (`ds`), then the CTA's dQ part over both key tiles
    is computed and added (`_send_dq_part`): by consumer `visit mod CONSUMERS`, or with `split`
    (`split_dq`) by every consumer for its share of the head dim. Barriers: `ds_ready[c]`
    (every consumer's dS^T staged, awaited by the consumers that compute with it: consumer c;
    with `split` one barrier, every consumer) and `ds_free` (every computing consumer has read
    the staged dS^T and the K tiles; every consumer awaits it before staging the next, and
    before its epilogue overwrites its K tile: `_await_last_parts`). With `slots` = 2
    (`double_ds`) the staged tiles and `ds_free` alternate by visit, and each consumer's parts
    by its own part count. `then` (`dq_first`): issues the dK matmul, once the part's are
    issued by a consumer that computes one, else at once."""
    wg = lax.axis_index("wg")
    turn = lax.rem(visit, CONSUMERS)
    ready = sc["ds_ready"].at[0 if split else turn]
    slot = lax.rem(visit, slots)
    free = sc["ds_free"].at[slot]
    pl.when(visit >= slots)(lambda: plgpu.barrier_wait(free))
    staged = sc["ds"].at[slot]
    staged.at[wg][...] = ds
    plgpu.commit_smem()
    plgpu.barrier_arrive(ready)
    # the consumer's own parts so far: one a visit with `split`, else one every CONSUMERS
    part_slot = lax.rem(visit if split else lax.div(visit, CONSUMERS), slots)

    def compute(col0, width: int):
        plgpu.barrier_wait(ready)
        pairs = []
        for c in range(CONSUMERS):
            k = sc["k"].at[c]
            if width < k.shape[-1]:
                k = k.at[:, pl.ds(col0, width)]
            pairs.append((staged.at[c].T, k))
        part = pp.matmul_sum(pairs, (staged.shape[-1], width), then=then)
        plgpu.barrier_arrive(free)
        _send_dq_part(refs, sc, part, (*at[:3], col0), interpret, part_slot, slots)

    head_dim = sc["k"].shape[-1]
    if split:  # consumer c: columns c * D / CONSUMERS ..., one code path for both (a traced
        # offset of whole 128-byte swizzle atoms: offline, spills 120 -> 20 bytes at head dim 128
        # against a static copy per consumer, whose K descriptors were all hoisted; session 22)
        width = head_dim // CONSUMERS
        compute(pl.multiple_of(wg * width, width), width)
    else:
        if then is not None:  # the consumer that computes no part this step
            pl.when(wg != turn)(then)
        pl.when(wg == turn)(functools.partial(compute, 0, head_dim))


def _await_last_parts(sc, visits, slots: int) -> None:
    """`pooled_dq`, after a consumer's last visit (of `visits`): the last parts (one a slot)
    have read the staged dS^T and both K tiles."""
    for back in range(slots):
        last = visits - 1 - back
        pl.when(last >= 0)(
            lambda last=last: plgpu.barrier_wait(sc["ds_free"].at[lax.rem(last, slots)])
        )


def _send_dq_part(refs, sc, part, at, interpret: bool, slot=0, slots: int = 1) -> None:
    """A dQ part (query rows x columns, float32) added to dQ through this consumer's float32
    SMEM tile `slot` (of `slots`), once the copy of the part before last in it has read it
    (`slots` - 1 copies may still be reading): on the GPU by TMA reduce-add into
    `dq_acc` (B, Tp, N, D); in interpret mode (no TMA reduction there) into this consumer's own
    slice of `dq_acc` (parts, B, Tp, N, D), summed by the host. `at`: (batch row, head, first
    row, first column)."""
    wg = lax.axis_index("wg")
    b, head, row0, col0 = at
    out = sc["dq_part"].at[slot, wg]
    plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
    out[...] = part
    plgpu.commit_smem()
    rows, cols = pl.ds(row0, part.shape[0]), pl.ds(col0, part.shape[1])
    if interpret:
        slot = lax.axis_index("t") * CONSUMERS + wg
        plgpu.copy_smem_to_gmem(out, refs["dq_acc"].at[slot, b, rows, head, cols])
    else:
        target = refs["dq_acc"].at[b, rows, head, cols]
        plgpu.copy_smem_to_gmem(out, target, reduction_op="add")


def _dkdv_producer(refs, sc, *, config, visits, group):
    bq = config.cols
    b, kh = lax.axis_index("b"), lax.axis_index("h")
    n = visits.count
    # The producer walks (head, query tile) pairs: visit i is tile (i mod n) of head i // n.
    pairs = pp.Visits(
        count=group * n,
        runs=((0, group * n, True),),
        tile=lambda i: (kh * group + lax.div(i, n), visits.tile(lax.rem(i, n))),
    )

    def rows_of(ref):
        return lambda hq: ref.at[b, pl.ds(hq[1] * bq, bq), hq[0]]

    def stats_of(ref):
        return lambda hq: ref.at[b, hq[0], pl.ds(hq[1] * bq, bq)]

    streams = [
        _stream(sc, "q", rows_of(refs["q"])),
        _stream(sc, "do", rows_of(refs["do"])),
        _stream(sc, "lse", stats_of(refs["lse"])),
        _stream(sc, "delta", stats_of(refs["delta"])),
    ]
    if "q_seg" in refs:
        q_seg = refs["q_seg"]
        streams.append(_stream(sc, "q_seg", lambda hq: q_seg.at[b, pl.ds(hq[1] * bq, bq)]))
    pp.produce(streams, pairs, config.stages, config.registers[1])


def _fitted(config: BackwardConfig, scratch_of) -> BackwardConfig:
    """`config` as its kernel's shared memory (`scratch_of(config)` on the GPU) holds it:
    without `double_ds`'s second dS^T / dQ part slots where they do not fit (they gained up to
    4%, sessions 32-33; the head dim 128 rule from 16k rows misses by 1.2 KB with segment ids),
    then with as many stages as fit (`pipeline.fit_stages`)."""
    if config.double_ds and not pp.fits(scratch_of(config)):
        config = dataclasses.replace(config, double_ds=False)
    return pp.fit_stages(config, scratch_of)


def _dkdv_scratch(config: BackwardConfig, head_dim: int, dtype, extras: dict, via_smem: bool):
    """The dK/dV kernel's shared memory: the own K and V tiles, the streamed rings, the shared
    tiles of `split_head` and of the dQ parts (`fused_dq`)."""
    bq, bkv, stages = config.cols, config.rows, config.stages
    own_copies = 3 if "kv_seg" in extras else 2
    owners = 1 if config.split_head else CONSUMERS  # the K/V tiles, each consumer's or shared
    scratch = dict(
        k=pp.smem_tile((owners, bkv, head_dim), dtype),
        v=pp.smem_tile((owners, bkv, head_dim), dtype),
        own_loaded=plgpu.Barrier(num_arrivals=own_copies, num_barriers=owners),
        turn=plgpu.Barrier(num_arrivals=CONSUMERS),
    )
    if config.split_head:  # see _dkdv_split_consumer
        # (keys, queries), each consumer's half of the queries whole 64-byte swizzle rows
        scratch["p_t"] = pp.smem_tile((bkv, bq), dtype, swizzle=64)
        scratch["ds_t"] = pp.smem_tile((bkv, bq), dtype, swizzle=64)
        scratch["halves_ready"] = plgpu.Barrier(num_arrivals=CONSUMERS)
        scratch["halves_free"] = plgpu.Barrier(num_arrivals=CONSUMERS)
    _ring(scratch, "q", (bq, head_dim), dtype, stages)
    _ring(scratch, "do", (bq, head_dim), dtype, stages)
    _ring(scratch, "lse", (bq,), jnp.float32, stages, swizzled=False)
    _ring(scratch, "delta", (bq,), jnp.float32, stages, swizzled=False)
    if "kv_seg" in extras:
        shape = (bkv,) if config.split_head else (CONSUMERS, bkv)
        scratch["kv_seg"] = plgpu.SMEM(shape, jnp.int32)
        _ring(scratch, "q_seg", (bq,), jnp.int32, stages, swizzled=False)
    if via_smem:
        scratch["stage"] = pp.smem_tile((CONSUMERS, bkv, bq), dtype)
    if config.fused_dq:
        split = _splits_dq(config, head_dim)
        width = head_dim // CONSUMERS if split else head_dim
        # 32-byte swizzle: the accumulator's float32 pairs go to shared memory without the 64
        # selects a part the 128-byte swizzle took (offline SASS, session 22: the 5-GEMM key
        # step 455 -> 420 instructions at head dim 64, 671 -> 600 at 128); still one TMA
        # reduce-add a part. Not yet timed.
        slots = config.ds_slots
        scratch["dq_part"] = pp.smem_tile((slots, CONSUMERS, bq, width), jnp.float32, swizzle=32)
        if not via_smem or config.pooled_dq:
            scratch["ds"] = pp.smem_tile((slots, CONSUMERS, bkv, bq), dtype)
        if config.pooled_dq:  # see _add_pooled_dq_part
            ready = 1 if split else CONSUMERS
            scratch["ds_ready"] = plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=ready)
            scratch["ds_free"] = plgpu.Barrier(
                num_arrivals=CONSUMERS if split else 1, num_barriers=slots
            )
    return scratch


def dkdv(q, k, v, do, lse2, delta, *, statics, config, seq_lens, extras=None, interpret=None):
    """Padded q, do `(B, Tp, N, D)`, k, v `(B, Sp, K, D)`, lse2, delta `(B, N, Tp)` float32 ->
    `(dk, dv)` `(B, Sp, K, D)` (Sp a multiple of 2 * rows, Tp of cols). `extras` as the
    forward's, with the visit lists key-major (`transposed`)."""
    batch, seq_q, num_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    bq = config.cols
    static_seq = (0, 0, seq_lens[0], seq_lens[1])
    via_smem = interpret is not None
    dtype = q.dtype
    extras = {name: x for name, x in (extras or {}).items() if x is not None}
    names = ("q", "k", "v", "do", "lse", "delta", *extras)

    _check_split(config, head_dim)
    config = _fitted(config, lambda c: _dkdv_scratch(c, head_dim, dtype, extras, False))
    consumer = _dkdv_split_consumer if config.split_head else _dkdv_consumer
    cta_rows = config.cta_rows

    def flashjax_mosaic_dkdv(*all_refs):
        refs, sc = _launch_refs(all_refs, names, ("dk", "dv"))
        seq = pp.seq_of(refs.get("seq"), static_seq, lax.axis_index("b"))
        t = lax.axis_index("t")
        visits = _visits(refs, statics, seq, t, cta_rows, bq, transposed=True)
        pp.warpgroups(
            functools.partial(
                consumer,
                refs,
                sc,
                statics=statics,
                config=config,
                visits=visits,
                group=group,
                seq=seq,
                interpret=via_smem,
            ),
            functools.partial(_dkdv_producer, refs, sc, config=config, visits=visits, group=group),
        )

    scratch = _dkdv_scratch(config, head_dim, dtype, extras, via_smem)
    out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
    grid = (seq_k // cta_rows, num_kv_heads, batch)
    args = (q, k, v, do, lse2, delta, *extras.values())
    return _kernel(flashjax_mosaic_dkdv, out_type, scratch, grid, config, interpret)(*args)


# --------------------------------------------------------------------------------------------------
# dQ
# --------------------------------------------------------------------------------------------------


def _dq_consumer(refs, sc, *, tile, statics, config, visits, seq, interpret):
    num_heads = refs["q"].shape[2]
    bq, bkv = config.rows, config.cols
    wg = lax.axis_index("wg")
    b, h = lax.axis_index("b"), lax.axis_index("h")
    row0 = tile * (CONSUMERS * bq) + wg * bq
    head_dim = sc["q"].shape[-1]
    dtype = sc["q"].dtype
    turns = pp.Turn(sc["turn"], wg, enabled=config.turns)

    plgpu.set_max_registers(config.registers[0], action="increase")
    my_q, my_do, my_stats = sc["q"].at[wg], sc["do"].at[wg], sc["stats"].at[wg]
    own = sc["own_loaded"].at[wg]
    plgpu.copy_gmem_to_smem(refs["q"].at[b, pl.ds(row0, bq), h], my_q, own)
    plgpu.copy_gmem_to_smem(refs["do"].at[b, pl.ds(row0, bq), h], my_do, own)
    _load_row_stats(refs, my_stats, (b, h, pl.ds(row0, bq)), own)
    if "q_seg" in refs:
        plgpu.copy_gmem_to_smem(refs["q_seg"].at[b, pl.ds(row0, bq)], sc["q_seg"].at[wg], own)
    plgpu.barrier_wait(own)  # one phase: every copy to it arrived
    # vectors: broadcast per step
    lse, delta = _row_stats(refs, sc, my_stats, my_do, (b, h, pl.ds(row0, bq)), writer=wg)
    q_segments = None
    if "q_seg" in refs:
        q_segments = _vector(sc["q_seg"].at[wg], (bq, bkv), 0)

    staging = sc["stage"].at[wg] if interpret else None
    if statics.has_dropout:
        rows, _ = pp.positions((bq, bkv), (row0, 0))
        row_keys = pp.dropout_rows(statics, refs["seeds"], b, h, num_heads, rows)

    def step(i, dq, *, masked: bool):
        kv = visits.tile(i)
        slot = lax.rem(i, config.stages)
        k_tile, v_tile = sc["k"].at[slot], sc["v"].at[slot]
        plgpu.barrier_wait(sc["k_loaded"].at[slot])
        positions = functools.partial(pp.positions, (bq, bkv), (row0, kv * bkv))

        rule = _element_rule(refs, statics, positions, seq, b, h)
        visible = _tile_rule(sc, "kv_seg", q_segments, slot, rule, transposed=False)

        probs = _step_probs(
            statics, masked, visible, lambda: lax.broadcast_in_dim(lse, (bq, bkv), [0])
        )

        dp_operands, dp_loaded = (my_do, v_tile.T), sc["v_loaded"].at[slot]
        p, tanh, dp = _scores_and_dp(
            (bq, bkv), (my_q, k_tile.T), dp_operands, turns, probs, dp_loaded, early=config.early_dp
        )
        dp = _late_dp(dp, dp_operands, dp_loaded, p.shape)
        plgpu.barrier_arrive(sc["v_free"].at[slot])
        if statics.has_dropout:
            dp = dp * pp.dropout_factor(statics, row_keys, positions()[1])
        _, ds = common.logits_grad(p, dp, delta, tanh)
        turns.done()
        turns.wait()
        a = pp.operand(ds.astype(dtype), staging, via_smem=interpret)
        dq = pp.mma_into(dq, a, k_tile, in_place=not interpret)
        plgpu.barrier_arrive(sc["k_free"].at[slot])
        return dq

    turns.start()
    dq = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), LAYOUT)
    dq = pp.walk(visits, step, dq, one_body=config.one_body)
    turns.finish()
    my_q[...] = (dq * statics.scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_q, refs["dq"].at[b, pl.ds(row0, bq), h])
    pp.wait_stores(config.async_store)


def _dq_split_consumer(refs, sc, *, tile, statics, config, visits, seq, interpret):
    """`BackwardConfig.split_head` in the dQ kernel: the CTA's `rows` queries shared by both
    consumers; consumer `wg` computes S and dP for key columns `wg * half ..` of each step,
    stores dS (bf16) into those columns of the shared `ds_t` tile, and once both halves are
    there adds the whole tile's product to dQ for head-dim columns `wg * width ..`. Barriers
    as `_dkdv_split_consumer`'s."""
    num_heads = refs["q"].shape[2]
    bq, bkv = config.rows, config.cols
    half = bkv // CONSUMERS
    wg = lax.axis_index("wg")
    b, h = lax.axis_index("b"), lax.axis_index("h")
    row0 = tile * bq  # the CTA's first query
    head_dim = sc["q"].shape[-1]
    width = head_dim // CONSUMERS
    dtype = sc["q"].dtype
    mine = pl.ds(pl.multiple_of(wg * half, half), half)  # this consumer's key columns
    share = pl.ds(pl.multiple_of(wg * width, width), width)  # its head-dim columns

    no_turns = pp.Turn(sc["turn"], wg, enabled=False)  # each step needs both halves
    plgpu.set_max_registers(config.registers[0], action="increase")
    queries, grads, stats, own = (
        sc["q"].at[0],
        sc["do"].at[0],
        sc["stats"].at[0],
        sc["own_loaded"].at[0],
    )

    @pl.when(wg == 0)
    def _load_queries():
        plgpu.copy_gmem_to_smem(refs["q"].at[b, pl.ds(row0, bq), h], queries, own)
        plgpu.copy_gmem_to_smem(refs["do"].at[b, pl.ds(row0, bq), h], grads, own)
        _load_row_stats(refs, stats, (b, h, pl.ds(row0, bq)), own)
        if "q_seg" in refs:
            plgpu.copy_gmem_to_smem(refs["q_seg"].at[b, pl.ds(row0, bq)], sc["q_seg"].at[0], own)

    plgpu.barrier_wait(own)  # one phase: every copy to it arrived
    # both consumers compute the rows' statistics (`row_stats`), the first writes them
    lse, delta = _row_stats(refs, sc, stats, grads, (b, h, pl.ds(row0, bq)), writer=0)
    lse, delta = (lax.broadcast_in_dim(x, (bq, half), [0]) for x in (lse, delta))
    q_segments = None
    if "q_seg" in refs:
        q_segments = _vector(sc["q_seg"].at[0], (bq, half), 0)
    if statics.has_dropout:
        rows, _ = pp.positions((bq, half), (row0, 0))
        row_keys = pp.dropout_rows(statics, refs["seeds"], b, h, num_heads, rows)

    def step(i, dq, *, masked: bool):
        kv = visits.tile(i)
        slot = lax.rem(i, config.stages)
        k_tile, v_tile = sc["k"].at[slot], sc["v"].at[slot]
        plgpu.barrier_wait(sc["k_loaded"].at[slot])
        positions = functools.partial(pp.positions, (bq, half), (row0, kv * bkv + wg * half))

        rule = _element_rule(refs, statics, positions, seq, b, h)
        visible = _tile_rule(sc, "kv_seg", q_segments, slot, rule, transposed=False, cols=mine)

        probs = _step_probs(statics, masked, visible, lambda: lse)

        dp_operands, dp_loaded = (grads, v_tile.at[mine].T), sc["v_loaded"].at[slot]
        p, tanh, dp = _scores_and_dp(
            (bq, half),
            (queries, k_tile.at[mine].T),
            dp_operands,
            no_turns,
            probs,
            dp_loaded,
            early=config.early_dp,
        )
        dp = _late_dp(dp, dp_operands, dp_loaded, p.shape)
        plgpu.barrier_arrive(sc["v_free"].at[slot])
        if statics.has_dropout:
            dp = dp * pp.dropout_factor(statics, row_keys, positions()[1])
        _, ds = common.logits_grad(p, dp, delta, tanh)
        whole = _exchange_halves(sc, {"ds_t": ds.astype(dtype)}, mine, i > 0, interpret)
        dq = pp.mma_into(dq, whole("ds_t"), k_tile.at[:, share], in_place=not interpret)
        plgpu.barrier_arrive(sc["k_free"].at[slot])
        plgpu.barrier_arrive(sc["halves_free"])
        return dq

    dq = plgpu.layout_cast(jnp.zeros((bq, width), jnp.float32), LAYOUT)
    dq = pp.walk(visits, step, dq, one_body=config.one_body)
    # Both consumers are past their last step (and its reads of Q) before either stages its
    # share of dQ there.
    pl.when(visits.count > 0)(lambda: plgpu.barrier_wait(sc["halves_free"]))
    queries.at[:, share][...] = (dq * statics.scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.barrier_arrive(sc["halves_ready"])  # both shares staged: one TMA copies the tile
    plgpu.barrier_wait(sc["halves_ready"])

    @pl.when(wg == 0)
    def _store():
        plgpu.copy_smem_to_gmem(queries, refs["dq"].at[b, pl.ds(row0, bq), h])
        pp.wait_stores(config.async_store)


def _load_row_stats(refs, stats, at, own) -> None:
    """Copies a dQ tile's row statistics into `stats` (2, rows) on barrier `own`: the
    logsumexp, then delta, or with `row_stats` delta's shift if the call has one
    (`_row_copies` counts them). `at`: (batch row, head, rows)."""
    plgpu.copy_gmem_to_smem(refs["lse"].at[at], stats.at[0], own)
    for name in ("delta", "shift"):
        if name in refs:
            plgpu.copy_gmem_to_smem(refs[name].at[at], stats.at[1], own)


def _row_copies(extras) -> int:
    """The copies `_load_row_stats` makes for a dQ kernel with these operands (by name)."""
    return 1 + sum(name in extras for name in ("delta", "shift"))


def _row_stats(refs, sc, stats, grads, at, *, writer):
    """A dQ tile's (logsumexp, delta) as row vectors (WGMMA layout, reduced along dim 1): as
    loaded into `stats`, or with `row_stats` ("o" among the operands) computed here: the
    logsumexp through `kernel_lse`, delta = rowsum(dO * O) in float32 (dO from `grads` in
    SMEM, O read straight from GMEM into registers, 64 columns at a time) less the shift;
    consumer `writer` then copies both to the dK/dV kernel's operands (`lse_out`,
    `delta_out`) through its `row_out` slot."""
    lse = plgpu.load(stats.at[0], layout=LAYOUT.reduce(1))
    if "o" not in refs:
        return lse, plgpu.load(stats.at[1], layout=LAYOUT.reduce(1))
    lse = kernel_lse(lse)
    b, h, rows = at
    delta = None
    for col0 in range(0, grads.shape[-1], 64):
        cols = pl.ds(col0, 64)
        # (Mosaic's "optimized" transfers serve shared memory only)
        o = plgpu.load(refs["o"].at[b, rows, h, cols], layout=LAYOUT, optimized=False)
        do = plgpu.load(grads.at[:, cols], layout=LAYOUT)
        part = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=1)
        delta = part if delta is None else delta + part
    if "shift" in refs:
        delta = delta - plgpu.load(stats.at[1], layout=LAYOUT.reduce(1))

    @pl.when(lax.axis_index("wg") == writer)
    def _write():
        out = sc["row_out"].at[writer]
        out.at[0][...] = lse
        out.at[1][...] = delta
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out.at[0], refs["lse_out"].at[at])
        plgpu.copy_smem_to_gmem(out.at[1], refs["delta_out"].at[at])

    return lse, delta


def _dq_producer(refs, sc, *, config, visits, group):
    bkv = config.cols
    b, kh = lax.axis_index("b"), lax.div(lax.axis_index("h"), group)

    def rows_of(ref):
        return lambda kv: ref.at[b, pl.ds(kv * bkv, bkv), kh]

    streams = [
        _stream(sc, "k", rows_of(refs["k"])),
        _stream(sc, "v", rows_of(refs["v"])),
    ]
    if "kv_seg" in refs:
        kv_seg = refs["kv_seg"]
        streams.append(_stream(sc, "kv_seg", lambda kv: kv_seg.at[b, pl.ds(kv * bkv, bkv)]))
    pp.produce(streams, visits, config.stages, config.registers[1])


def _check_split(config: BackwardConfig, head_dim: int) -> None:
    """`split_head`'s halves of the head dim must be whole 64-column (128-byte) rows."""
    if config.split_head and head_dim % (CONSUMERS * 64):
        raise ValueError(
            f"BackwardConfig.split_head needs a head dim that is a multiple of {CONSUMERS * 64}, "
            f"got {head_dim}"
        )


def _dq_scratch(config: BackwardConfig, head_dim: int, dtype, extras: dict, via_smem: bool):
    """The dQ kernel's shared memory: the own Q and dO tiles and statistics, the streamed K/V
    rings, `split_head`'s shared dS^T tile, `row_stats`' outgoing statistics. `extras`: the
    kernel's operands past the logsumexp (by name)."""
    bq, bkv, stages = config.rows, config.cols, config.stages
    # Q, dO, the statistics (and segment ids)
    own_copies = 2 + _row_copies(extras) + ("q_seg" in extras)
    owners = 1 if config.split_head else CONSUMERS  # the Q/dO tiles, each consumer's or shared
    scratch = dict(
        q=pp.smem_tile((owners, bq, head_dim), dtype),
        do=pp.smem_tile((owners, bq, head_dim), dtype),
        stats=plgpu.SMEM((owners, 2, bq), jnp.float32),
        own_loaded=plgpu.Barrier(num_arrivals=own_copies, num_barriers=owners),
        turn=plgpu.Barrier(num_arrivals=CONSUMERS),
    )
    if config.stats_in_dq:
        scratch["row_out"] = plgpu.SMEM((owners, 2, bq), jnp.float32)
    if config.split_head:  # see _dq_split_consumer
        scratch["ds_t"] = pp.smem_tile((bq, bkv), dtype, swizzle=64)
        scratch["halves_ready"] = plgpu.Barrier(num_arrivals=CONSUMERS)
        scratch["halves_free"] = plgpu.Barrier(num_arrivals=CONSUMERS)
    _ring(scratch, "k", (bkv, head_dim), dtype, stages)
    _ring(scratch, "v", (bkv, head_dim), dtype, stages)
    if "q_seg" in extras:
        scratch["q_seg"] = plgpu.SMEM((owners, bq), jnp.int32)
        _ring(scratch, "kv_seg", (bkv,), jnp.int32, stages, swizzled=False)
    if via_smem:
        scratch["stage"] = pp.smem_tile((CONSUMERS, bq, bkv), dtype)
    return scratch


def dq(q, k, v, do, lse2, delta, *, statics, config, seq_lens, extras=None, interpret=None):
    """Operands as `dkdv` (Tp a multiple of 2 * rows, Sp of cols) -> dq `(B, Tp, N, D)`; the
    visit lists query-major. With `config.stats_in_dq` (`row_stats`): `delta` is None, `lse2`
    the forward's own (-inf where a row saw nothing), `extras` carry the forward's output "o"
    (padded as do) and delta's "shift" (`host.BackwardRows`, None without one), and the result
    is `(dq, lse2, delta)`, the last two the dK/dV kernel's operands."""
    batch, seq_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    _check_split(config, head_dim)
    static_seq = (0, 0, seq_lens[0], seq_lens[1])
    via_smem = interpret is not None
    dtype = q.dtype
    extras = {name: x for name, x in (extras or {}).items() if x is not None}
    if delta is not None:
        extras = {"delta": delta} | extras
    names = ("q", "k", "v", "do", "lse", *extras)
    out_names = ("dq", "lse_out", "delta_out") if config.stats_in_dq else ("dq",)
    config = _fitted(config, lambda c: _dq_scratch(c, head_dim, dtype, extras, False))

    def flashjax_mosaic_dq(*all_refs):
        refs, sc = _launch_refs(all_refs, names, out_names)
        seq = pp.seq_of(refs.get("seq"), static_seq, lax.axis_index("b"))
        t = lax.axis_index("t")
        if config.longest_first:  # the last query tiles see the most keys under a causal mask
            t = seq_q // config.cta_rows - 1 - t
        visits = _visits(refs, statics, seq, t, config.cta_rows, config.cols, transposed=False)
        pp.warpgroups(
            functools.partial(
                _dq_split_consumer if config.split_head else _dq_consumer,
                refs,
                sc,
                tile=t,
                statics=statics,
                config=config,
                visits=visits,
                seq=seq,
                interpret=via_smem,
            ),
            functools.partial(_dq_producer, refs, sc, config=config, visits=visits, group=group),
        )

    scratch = _dq_scratch(config, head_dim, dtype, extras, via_smem)
    stats = jax.ShapeDtypeStruct(lse2.shape, jnp.float32)
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), *[stats] * (len(out_names) - 1))
    args = (q, k, v, do, lse2, *extras.values())
    grid = (seq_q // config.cta_rows, num_heads, batch)
    outs = _kernel(flashjax_mosaic_dq, out_type, scratch, grid, config, interpret)(*args)
    return outs if config.stats_in_dq else outs[0]
