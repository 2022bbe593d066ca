"""FlashAttention forward for Hopper on Pallas' Mosaic GPU backend (the FA3 design).

Grid: one CTA per (query tile of `consumers * block_q` rows, query head, batch row). A CTA has
`consumers` (2, or 3 as FA3 at head dim 64) consumer warpgroups, each owning block_q query rows,
and one producer (pipeline.py) that streams K and V tiles (and the keys' segment ids) into a
ring of `stages` shared-memory slots with TMA. Every warpgroup walks the same key tiles
(`pipeline.Visits`): the CTA's `visibility.block_range` over its rows, or, with segment ids or
a block mask, the CTA's visit lists (full tiles, then partial ones), so each tile is loaded
once; partial tiles get the element mask of `visibility.element_visible` (a consumer whose rows
cannot see a tile adds nothing).

The consumers keep S, P and the output accumulator in registers (WGMMA layout), work in base 2
(`common.scores`) and, two of them, take turns on the tensor cores (`pipeline.Turn`). QK^T
reads Q and K from shared memory; PV reads P from registers (on the GPU) or, in interpret mode,
from a shared-memory staging tile. Output and base-2 logsumexp leave through shared memory
(TMA).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common, configs, visibility
from pallas_kernels.mosaic import pipeline as pp
from pallas_kernels.mosaic.pipeline import LAYOUT
from pallas_kernels.operands import AttentionStatics

# A column tile of the wgmma accumulator layout: `fma_columns` comes in these.
_FMA_COLUMN_TILE = 8


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Tiles of the Mosaic forward: block_q rows per consumer, block_kv keys per step, and the
    depth of the K/V ring."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    # Consumer warpgroups per CTA, each block_q rows: 2 (ping-pong), or 3 (FA3's head dim 64
    # tiles, 192 rows: no ping-pong, each consumer on its own; registers (160, 32) then).
    consumers: int = 2
    registers: tuple[int, int] | None = None  # consumer, producer (setmaxnreg); None: by consumers
    # Wait for the next K tile while this step's PV matmul runs (instead of at the next step's
    # start), and pin the order of the softmax's results before the PV matmul (an optimization
    # barrier); both as tokamax's sm90 kernel does. Off in interpret mode (no in-place PV).
    early_next_k: bool = False
    pinned_order: bool = False
    # Query tiles in reverse order (under a causal mask the last tiles have the most keys, so
    # the CTAs launched first are the longest), each head's tiles launched one after another:
    # the grid is named ("h", "b", "q") and its last axis runs fastest (Pallas Mosaic GPU
    # reverses the grid onto CUDA's x, y, z), tokamax's order. Its CTAs running at once share
    # their heads' K/V in L2: at head dim 128, causal 512 (B 32, N 16) it reads Q, K and V from
    # DRAM once (201 MB, ncu), where the grid ("q", "h", "b") without it, batch rows fastest,
    # reads 402 MB and is 1.28-1.51x slower at 512-2k on the H100 (session 35, HOPPER_PLAN 7za).
    # Sessions before 35 described these two orders the other way round (first axis fastest).
    longest_first: bool = False
    # pipeline.compiler_params: no automatic SMEM barriers.
    no_auto_barriers: bool = False
    # One CTA per SM looping over the tiles (`plgpu.nd_loop`): the K/V ring runs on from one
    # tile into the next, so the producer loads the next tile's keys during this one's epilogue
    # (tokamax's non-causal schedule). CTA i takes tiles i, i + SMs, ... of the order: without
    # longest_first a head's tiles are adjacent; with it the longest tile of every head comes
    # first, heads fastest (balanced under a causal mask, but a head's K/V leaves L2 between
    # its tiles once all heads' K/V outgrow it).
    persistent: bool = False
    # With `persistent`: each loop step takes two query tiles of one head, j and T - 1 - j (the
    # longer first), whose causal work adds up to the same T + 1 key tiles for every j, so
    # the strided split of the steps is balanced; a head's pairs are adjacent, so the CTAs
    # running at once share its K/V in L2 (FA3 gets both from a dynamic scheduler over an
    # L2-sized section of heads). A middle tile (odd T) is a step of its own. It sets the
    # loop's order, so `longest_first` changes nothing with it.
    pair_tiles: bool = False
    # The consumers' ping-pong on hardware named barriers (`pipeline.NamedTurn`) instead of an
    # mbarrier (`pipeline.Turn`); interpret mode emulates them with mbarriers. Until session
    # 22 its barriers never reached the GPU (`pipeline._named_barrier` was not called): every
    # GPU measurement of it before then is of `no_pingpong`.
    named_barriers: bool = False
    # No ping-pong of the two consumers (over `named_barriers` too): what head dims 192 and 256
    # were measured and chosen with (as `named_barriers`, see above).
    no_pingpong: bool = False
    # The scale folded into the softmax's exponent (`common.folded_scale`): the row max of the
    # unscaled scores, then one FMA and an exp2 per element. Only without soft-cap and bias.
    fold_scale: bool = False
    # FA4's conditional rescaling (`common.running_max(lazy=True)`): a step whose rows' maxima
    # all stay within `common.RESCALE_THRESHOLD` of the running max skips rescaling the
    # accumulator (a `lax.cond` on the consumer's tile); its weights are taken against the old
    # max.
    lazy_rescale: bool = False
    # The output's TMA store awaited only until it has read shared memory (`pipeline.wait_stores`).
    async_store: bool = False
    # The producer loads the Q tiles (and query segment ids) into a ring of two slots, which the
    # consumers free after their output's store: a persistent CTA's next Q lands while the
    # current tile runs (FA3's producer loads Q), instead of each consumer loading its own at
    # the tile's start.
    prefetch_q: bool = False
    # FA3's intra-warpgroup overlap (`_walk_overlapped`): each step issues its QK^T,
    # then the previous tile's PV, and runs its softmax while that PV is in flight; with
    # `named_barriers` the consumers take turns issuing (FA3's ping-pong), else no ping-pong.
    # Off in interpret mode (no in-place PV).
    overlap_qk: bool = False
    # GQA packing (FA3's PackGQA, by consumer): the consumers of a CTA take the same block_q
    # query rows of `consumers` query heads that share one KV head, instead of consecutive rows
    # of one head; the K/V tiles each CTA streams then serve that many heads. A call whose
    # query heads per KV head are not a multiple of the consumers cannot pack
    # (`api.call_config` turns it off there; `forward` refuses it).
    pack_heads: bool = False
    # The consumers release K and V slots on hardware named barriers (`pipeline.Releases`:
    # `bar.arrive`, the producer's `bar.sync`) instead of mbarriers, which Pallas has every
    # consumer thread arrive on (FA3's and tokamax's consumed barriers). Off in interpret mode
    # (no inline PTX): the mbarriers stand in. It crashed on the H200 at 512+ rows in session
    # 22, when its barriers were not emitted (the producer never waited); since the fix it runs
    # (session 23: head dim 128, 1k rows, causal and not, as the default forward; HOPPER_PLAN
    # 7q). Not yet timed.
    named_free: bool = False
    # FlashAttention-4's exp2 emulation: the first `fma_columns` columns of each key tile
    # exponentiated on the FMA pipe (`common.exp2_on_fma`: ~10 instructions an element instead
    # of one MUFU op), the rest by MUFU. MUFU runs 16 ops a clock per SM: at head dim 64 its 66
    # ops a warp per step (2 warps a scheduler: 1056 clocks) outlast the step's 435 issue
    # slots (870) and its matmuls (~980 clocks a CTA); 4 of a thread's 64 weights moved to the
    # FMA pipe give ~990 / ~940. Session 24: 1.03-1.04x at head dim 64 causal from 4k rows.
    exp2_fma: bool = False
    # `exp2_fma`'s columns a key tile: a multiple of 8 (one column tile of the wgmma layout, 4
    # weights a thread), at most block_kv. Session 25's SASS page put the head dim 64
    # consumers' largest stall site on MUFU with 8: more is for the sweeps (`tune_mosaic.py
    # --fma-columns`).
    fma_columns: int = 8

    def __post_init__(self):
        if self.consumers not in (2, 3):
            raise ValueError(f"ForwardConfig: consumers must be 2 or 3, got {self.consumers}")
        if self.consumers != 2 and self.named_barriers:
            raise ValueError(
                "ForwardConfig: named_barriers (a two-consumer ping-pong) needs consumers=2"
            )
        if self.named_free and pp.NAMED_FREE + 2 * self.stages > pp.NAMED_BARRIERS:
            raise ValueError(
                f"ForwardConfig: named_free needs {2 * self.stages} hardware barriers from "
                f"{pp.NAMED_FREE}, past the {pp.NAMED_BARRIERS} there are"
            )
        if self.exp2_fma and not (
            0 < self.fma_columns <= self.block_kv and self.fma_columns % _FMA_COLUMN_TILE == 0
        ):
            raise ValueError(
                f"ForwardConfig: fma_columns must be a multiple of {_FMA_COLUMN_TILE} in "
                f"1..block_kv={self.block_kv}, got {self.fma_columns}"
            )
        on = set(pp.options_on(self, OPTIONS))
        for pair in EXCLUSIVE:
            if set(pair) <= on:
                raise ValueError(
                    f"ForwardConfig: {pair[0]} with {pair[1]} is not supported (wrong outputs "
                    "on the H200: see EXCLUSIVE; each alone is correct)"
                )

    @property
    def rows(self) -> int:
        """Query rows per CTA tile (per head: with `pack_heads` each consumer takes them all)."""
        return self.block_q if self.pack_heads else self.consumers * self.block_q

    def heads_per_tile(self) -> int:
        """Query heads a CTA tile covers: `consumers` with `pack_heads`, else one."""
        return self.consumers if self.pack_heads else 1

    def consumer_rows(self, tile, consumer) -> tuple:
        """The first query row and the query head of `consumer`'s block_q rows of CTA tile
        `(qt, h, b)` (h counts tiles of `heads_per_tile` heads): the next rows of the head, or
        with `pack_heads` the same rows of the next head."""
        qt, h, _ = tile
        if self.pack_heads:
            return qt * self.rows, h * self.consumers + consumer
        return qt * self.rows + consumer * self.block_q, h

    @property
    def register_split(self) -> tuple[int, int]:
        """setmaxnreg's (consumer, producer) registers: `registers`, or what fills the 64K
        register file at this many warpgroups."""
        return self.registers or {2: (232, 40), 3: (160, 32)}[self.consumers]

    @property
    def q_slots(self) -> int:
        """The Q ring's slots: two when the producer prefetches, else one."""
        return 2 if self.prefetch_q else 1


# The ForwardConfig flags that change how the work is scheduled, not what is computed (the
# output is bitwise the same: tests/test_mosaic.py), and every on/off flag: those, and
# `fold_scale`, `lazy_rescale` and `exp2_fma`, which round differently (within the reference
# rule).
# configs.py names the ones on per head dim; benchmarks/tune_mosaic.py sweeps them.
SCHEDULE_OPTIONS = (
    "longest_first",
    "no_auto_barriers",
    "persistent",
    "pair_tiles",
    "named_barriers",
    "no_pingpong",
    "async_store",
    "prefetch_q",
    "overlap_qk",
    "pack_heads",
    "named_free",
)
OPTIONS = (*SCHEDULE_OPTIONS, "fold_scale", "lazy_rescale", "exp2_fma")
# Option pairs ForwardConfig refuses: each gave wrong outputs on the H200 together, never alone.
# prefetch_q with named_barriers: errors 0.19-0.43 or hangs in 9 of 15 runs (session 10, D128
# causal segments; not explained). That run had no ping-pong (`named_barriers` emitted no
# barrier then: see above), so the pair refused is prefetch_q with no_pingpong; prefetch_q
# with the real named_barriers stays refused until it is run. Both other prefetch_q failures
# (with overlap_qk, below) were without a ping-pong too; with the mbarrier ping-pong (FA3's
# persistent set in configs.py) it has run right since session 10: a race in the Q ring that
# the ping-pong hides? lazy_rescale with overlap_qk: a misaligned-address fault
# (D64 1k non-causal) and errors up to 0.32 (causal) in 30 runs each, where overlap_qk without
# it matched the default forward bitwise in every run (session 11, benchmarks/repro_overlap.py;
# the conditional rescale of the accumulator while the tile's QK^T is in flight).
# prefetch_q with overlap_qk: refused until run without lazy_rescale (its one failure, error
# 0.43, had lazy_rescale on too).
EXCLUSIVE = (
    ("prefetch_q", "named_barriers"),
    ("prefetch_q", "no_pingpong"),
    ("lazy_rescale", "overlap_qk"),
    ("prefetch_q", "overlap_qk"),
)


def _without_partners(name: str) -> tuple[str, ...]:
    """Every option, less those EXCLUSIVE pairs with `name`."""
    partners = {o for pair in EXCLUSIVE if name in pair for o in pair} - {name}
    return tuple(o for o in OPTIONS if o not in partners)


# The widest option sets ForwardConfig takes (the tests run each): one with overlap_qk, one with
# prefetch_q (each with every option EXCLUSIVE leaves it).
WIDEST = tuple(_without_partners(name) for name in ("overlap_qk", "prefetch_q"))


def with_options(config: ForwardConfig, options) -> ForwardConfig:
    """`config` with exactly the flags of OPTIONS named in `options` on (the rest off)."""
    return pp.with_options(config, options, OPTIONS)


def _load_q(refs: dict, sc: dict, tile, consumer, slot, barrier, config: ForwardConfig) -> None:
    """TMA `consumer`'s rows of query tile `tile = (qt, h, b)` (and their segment ids) into Q
    ring slot `slot`, arriving on `barrier`."""
    row0, h = config.consumer_rows(tile, consumer)
    b = tile[2]
    block_q = config.block_q
    rows = pl.ds(row0, block_q)
    buffer = slot * config.consumers + consumer
    plgpu.copy_gmem_to_smem(refs["q"].at[b, rows, h], sc["q"].at[buffer], barrier)
    if "q_seg" in refs:
        plgpu.copy_gmem_to_smem(refs["q_seg"].at[b, rows], sc["q_seg"].at[buffer], barrier)


def _produce_q(refs: dict, sc: dict, tile, tiles_done, config: ForwardConfig) -> None:
    """`prefetch_q`: the producer's loads of query tile `tile`, the CTA's tile `tiles_done`,
    into its ring slot once the consumers have freed it (from the ring's second lap on)."""
    slot = pp.ring_slot(tiles_done, 2)
    if not isinstance(tiles_done, int):  # static: a one-tile CTA, on the ring's first lap
        pl.when(tiles_done >= 2)(lambda: sc["q_free"].wait(slot))
    for consumer in range(config.consumers):
        _load_q(refs, sc, tile, consumer, slot, sc["q_loaded"].at[slot], config)


def _consumer(
    refs: dict, sc: dict, tile, done, *, statics, config, visits, seq, num_heads, interpret
):
    """One consumer's work on query tile `tile = (qt, h, b)`; `done`: `(visits, tiles)`, the key
    visits and the query tiles of the CTA's earlier tiles (the K/V ring's slots continue from
    there, the Q ring's with `prefetch_q`)."""
    bq, bkv = config.block_q, config.block_kv
    b = tile[2]
    done, tiles_done = done
    wg = lax.axis_index("wg")
    row0, h = config.consumer_rows(tile, wg)
    head_dim = sc["q"].shape[-1]
    dtype = sc["q"].dtype
    overlap = config.overlap_qk and not interpret
    if overlap or config.consumers != 2 or config.no_pingpong:  # (for two consumers)
        turns = pp.Turn(None, wg, enabled=False)
    elif config.named_barriers:
        turns = pp.NamedTurn(wg, emulation=sc["turn"] if interpret else None)
    else:
        turns = pp.Turn(sc["turn"], wg)

    q_slot = pp.ring_slot(tiles_done, config.q_slots)
    my_buffer = q_slot * config.consumers + wg  # of the Q (and query segment id) ring: `_load_q`
    my_q = sc["q"].at[my_buffer]
    if config.prefetch_q:
        loaded = sc["q_loaded"].at[q_slot]
    else:
        loaded = sc["q_loaded"].at[wg]
        _load_q(refs, sc, tile, wg, 0, loaded, config)
    plgpu.barrier_wait(loaded)  # one phase: every copy to it arrived
    q_segments = None
    if "q_seg" in refs:
        q_segments = lax.broadcast_in_dim(
            plgpu.load(sc["q_seg"].at[my_buffer], layout=LAYOUT.reduce(1)), (bq, bkv), [0]
        )

    if statics.has_dropout:
        rows, _ = pp.positions((bq, bkv), (row0, 0))
        row_keys = pp.dropout_rows(statics, refs["seeds"], b, h, num_heads, rows)

    def weights(i, s, m, l, *, masked: bool):
        """Key visit i's scores `s` (QK^T, float32) -> its weights (float32), the running max
        and sum after it, and the accumulator's rescale `(alpha, keep)`."""
        kv = visits.tile(i)
        slot = lax.rem(done + i, config.stages)
        positions = functools.partial(pp.positions, (bq, bkv), (row0, kv * bkv))
        mask = None
        if masked:
            segments = {}
            if q_segments is not None:
                plgpu.barrier_wait(sc["kv_seg_loaded"].at[slot])
                kv_seg = plgpu.load(sc["kv_seg"].at[slot], layout=LAYOUT.reduce(0))
                segments = dict(
                    q_segments=q_segments,
                    kv_segments=lax.broadcast_in_dim(kv_seg, (bq, bkv), [1]),
                )
            mask = visibility.element_visible(
                statics, *positions(), seq, batch=b, head=h, extent=pp.extent(refs), **segments
            )
        if q_segments is not None:
            if not masked:  # a full tile: its segment ids went unread, but the slot must turn
                plgpu.barrier_wait(sc["kv_seg_loaded"].at[slot])
            sc["kv_seg_free"].arrive(slot)
        bias = None
        if "bias" in refs:
            bias = pp.bias_tile(refs["bias"], b, h, row0, bq, kv * bkv, bkv)
        folded = common.folded_scale(statics, bias) if config.fold_scale else None
        if folded is None:
            s2, _ = common.scores(s, statics.scale, statics, bias, mask)
        else:
            s2 = common.hide(s, mask)
        m_new, keep = common.running_max(s2, m, folded, lazy=config.lazy_rescale)
        fma_columns = config.fma_columns if config.exp2_fma else 0
        p, l, alpha = common.softmax_weights(s2, m, m_new, l, folded, fma_columns)
        if statics.has_dropout:  # after the running sum: l normalizes the undropped weights
            p = p * pp.dropout_factor(statics, row_keys, positions()[1])
        return p, m_new, l, (alpha, keep)

    steps = _Steps(sc, config, my_q, done, wg, weights, interpret)
    turns.start()
    carry = (
        plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), LAYOUT),
        plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), LAYOUT.reduce(1)),
        plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), LAYOUT.reduce(1)),
    )
    if overlap:
        issue_turn = pp.IssueTurn(wg) if config.named_barriers and not config.no_pingpong else None
        carry = pl.run_scoped(
            functools.partial(_walk_overlapped, steps, visits, carry, issue_turn),
            plgpu.ACC((bq, head_dim), jnp.float32),
            plgpu.ACC((bq, bkv), jnp.float32),
        )
    else:
        carry = _walk_plain(steps, visits, carry, turns)
    turns.finish()
    out, lse2 = common.finalize(*carry)

    my_q[...] = out.astype(dtype)  # Q's tile is free again: stage the output there
    sc["lse"].at[wg][...] = lse2
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(my_q, refs["out"].at[b, pl.ds(row0, bq), h])
    plgpu.copy_smem_to_gmem(sc["lse"].at[wg], refs["lse"].at[b, h, pl.ds(row0, bq)])
    pp.wait_stores(config.async_store)
    if config.prefetch_q:  # the output has left the slot: the producer may refill it
        sc["q_free"].arrive(q_slot)


@dataclasses.dataclass(frozen=True)
class _Steps:
    """What one consumer's key steps share on a query tile: the scratch, the config, its Q tile,
    the CTA's key visits before this tile (the K/V ring continues from there), its warpgroup,
    its softmax (`_consumer`'s `weights`) and whether it runs in interpret mode."""

    sc: dict
    config: ForwardConfig
    my_q: object
    done: jax.Array | int
    wg: jax.Array
    weights: Callable
    interpret: bool

    def slot(self, i):
        """The K/V ring slot of key visit i."""
        return lax.rem(self.done + i, self.config.stages)

    def wait_k(self, i) -> None:
        plgpu.barrier_wait(self.sc["k_loaded"].at[self.slot(i)])


def _walk_plain(st: _Steps, visits: pp.Visits, carry, turns):
    """The consumer's key steps one after the other: QK^T, softmax, PV, each awaited in its
    step (with `early_next_k`, the next K tile is awaited while the PV runs), the consumers
    taking turns (`turns`)."""
    sc, config = st.sc, st.config
    bq, bkv = config.block_q, config.block_kv
    early = config.early_next_k and not st.interpret
    if early:
        pl.when(visits.count > 0)(lambda: st.wait_k(0))

    def step(i, carry, *, masked: bool):
        acc, m, l = carry
        slot = st.slot(i)
        if not early:
            st.wait_k(i)

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, st.my_q, sc["k"].at[slot].T)
            turns.sync()  # QK issued: the other consumer may issue its matmul
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        sc["k_free"].arrive(slot)
        p, m, l, rescale = st.weights(i, s, m, l, masked=masked)
        p16 = p.astype(st.my_q.dtype)
        acc = _rescaled(acc, *rescale)
        if config.pinned_order:
            acc, p16 = lax.optimization_barrier((acc, p16))
            m, l = lax.optimization_barrier((m, l))
        turns.done()  # softmax done
        plgpu.barrier_wait(sc["v_loaded"].at[slot])
        turns.wait()  # the tensor cores are ours: the other consumer is in its softmax
        staging = sc["p"].at[st.wg] if st.interpret else None
        a = pp.operand(p16, staging, via_smem=st.interpret)
        while_pv = (
            (lambda: pl.when(i + 1 < visits.count)(lambda: st.wait_k(i + 1))) if early else None
        )
        acc = pp.mma_into(acc, a, sc["v"].at[slot], in_place=not st.interpret, meanwhile=while_pv)
        sc["v_free"].arrive(slot)
        return acc, m, l

    return pp.walk(visits, step, carry)


def _walk_overlapped(st: _Steps, visits: pp.Visits, init, issue_turn, o_ref, s_ref):
    """FA3's intra-warpgroup overlap (`overlap_qk`; GPU only), in FA3's order: visit i issues
    its QK^T, then the rescale and PV of visit i - 1 (`o_ref`), awaits the QK^T alone, and runs
    its softmax while that PV is in flight; its weights (float32) pass the PV's wait before they
    become the next PV's operand, so no register an in-flight wgmma reads is written. Visit 0
    (under a cond: a CTA may have none) and the last PV are peeled off the loop, so the loop's
    waits are unconditional (ptxas serializes the wgmmas otherwise). `issue_turn`
    (`pipeline.IssueTurn`, with `named_barriers`): FA3's ping-pong around each step's issues;
    None: each consumer on its own."""
    sc, config = st.sc, st.config
    bq, bkv = config.block_q, config.block_kv
    dtype = st.my_q.dtype
    count = visits.count
    o_ref[...] = init[0]
    s_zeros = plgpu.layout_cast(jnp.zeros((bq, bkv), jnp.float32), LAYOUT)

    def issue_qk(i):
        st.wait_k(i)
        s_ref[...] = s_zeros
        plgpu.wgmma(s_ref, st.my_q, sc["k"].at[st.slot(i)].T)

    def scores(i):
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=None)
        sc["k_free"].arrive(st.slot(i))
        return s

    def issue_pv(j, p16, rescale):
        o_ref[...] = _rescaled(plgpu.wgmma_accumulator_load(o_ref, wait_n=None), *rescale)
        plgpu.barrier_wait(sc["v_loaded"].at[st.slot(j)])
        plgpu.wgmma(o_ref, p16, sc["v"].at[st.slot(j)])

    def first():
        issue_qk(0)
        plgpu.wgmma_wait(0)
        p, m, l, rescale = st.weights(0, scores(0), *init[1:], masked=True)
        return m, l, p.astype(dtype), rescale

    def nothing():
        keep = jnp.bool_(True) if config.lazy_rescale else None
        ones = plgpu.layout_cast(jnp.ones((bq,), jnp.float32), LAYOUT.reduce(1))
        zeros = plgpu.layout_cast(jnp.zeros((bq, bkv), dtype), LAYOUT)
        return *init[1:], zeros, (ones, keep)

    def step(i, carry, *, masked: bool):
        m, l, p_prev, rescale_prev = carry
        if issue_turn is not None:
            issue_turn.acquire()
        issue_qk(i)
        issue_pv(i - 1, p_prev, rescale_prev)
        if issue_turn is not None:
            issue_turn.release()
        plgpu.wgmma_wait(1)  # this visit's QK^T; the PV stays in flight
        p, m, l, rescale = st.weights(i, scores(i), m, l, masked=masked)
        plgpu.wgmma_wait(0)  # the PV of visit i - 1
        sc["v_free"].arrive(st.slot(i - 1))
        p, m, l = lax.optimization_barrier((p, m, l))  # computed past the wait
        return m, l, p.astype(dtype), rescale

    start = lax.cond(count > 0, first, nothing)
    if issue_turn is not None:
        issue_turn.start()
    m, l, p_last, rescale_last = pp.walk(pp.after_first(visits), step, start)
    if issue_turn is not None:
        issue_turn.finish()
    pl.when(count > 0)(lambda: issue_pv(count - 1, p_last, rescale_last))
    acc = o_ref[...]  # waits for the last PV
    pl.when(count > 0)(lambda: sc["v_free"].arrive(st.slot(count - 1)))
    return acc, m, l


def _releases(sc: dict, config: ForwardConfig, interpret: bool) -> dict:
    """The scratch's `*_free` barriers as `pipeline.Releases` (what the consumers call and the
    producer waits on): K's and V's on hardware named barriers with `named_free` (not in
    interpret mode), the rest on their mbarriers."""
    frees = {name: pp.Releases(ref) for name, ref in sc.items() if name.endswith("_free")}
    if config.named_free and not interpret:
        threads = (config.consumers + 1) * 128  # every consumer's and the producer's
        for i, name in enumerate(("k_free", "v_free")):
            first = pp.NAMED_FREE + i * config.stages
            frees[name] = pp.Releases(sc[name], first, threads, config.stages)
    return frees


def _q_barrier(config: ForwardConfig, per_copy: int) -> plgpu.Barrier:
    """The Q tiles' arrival barriers: one per Q ring slot, for both consumers' copies, when the
    producer prefetches; else one per consumer, for its own. `per_copy`: the copies of one
    consumer's rows (Q, and the query segment ids)."""
    if config.prefetch_q:
        return plgpu.Barrier(num_arrivals=config.consumers * per_copy, num_barriers=2)
    return plgpu.Barrier(num_arrivals=per_copy, num_barriers=config.consumers)


def _rescaled(acc: jax.Array, alpha: jax.Array, keep: jax.Array | None) -> jax.Array:
    """The accumulator times `alpha` per row; unchanged where `keep` (`lazy_rescale`: the
    multiply is skipped, not done by ones)."""

    def rescale(acc):
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

    return rescale(acc) if keep is None else lax.cond(keep, lambda a: a, rescale, acc)


# Where the keys lie in the k and v arrays (`forward`'s `kv_at`).
KvAt = tuple[int, int, int]


def _streams(refs: dict, sc: dict, b, kh, bkv: int, kv_at: KvAt) -> list[pp.Stream]:
    """What the producer streams for batch row `b`, KV head `kh`: K and V tiles (and the keys'
    segment ids), at `kv_at` in their arrays."""
    k_batch, v_batch, row0 = kv_at

    def rows_of(ref, batch0):
        return lambda kv: ref.at[b + batch0, pl.ds(row0 + kv * bkv, bkv), kh]

    streams = [
        pp.Stream(rows_of(refs["k"], k_batch), sc["k"], sc["k_loaded"], sc["k_free"]),
        pp.Stream(rows_of(refs["v"], v_batch), sc["v"], sc["v_loaded"], sc["v_free"]),
    ]
    if "kv_seg" in refs:
        kv_seg = refs["kv_seg"]
        streams.append(
            pp.Stream(
                lambda kv: kv_seg.at[b, pl.ds(kv * bkv, bkv)],
                sc["kv_seg"],
                sc["kv_seg_loaded"],
                sc["kv_seg_free"],
            )
        )
    return streams


def _scratch(config: ForwardConfig, head_dim: int, dtype, extras: dict, via_smem: bool) -> dict:
    """The forward's shared memory: the consumers' Q tiles, the K/V ring, the logsumexp rows,
    their barriers (and the segment ids')."""
    bq, bkv, stages, consumers = config.block_q, config.block_kv, config.stages, config.consumers
    k_loaded, v_loaded, k_free, v_free = pp.stream_barriers(2, stages, consumers)
    scratch = dict(
        q=pp.smem_tile((config.q_slots * consumers, bq, head_dim), dtype),
        k=pp.smem_tile((stages, bkv, head_dim), dtype),
        v=pp.smem_tile((stages, bkv, head_dim), dtype),
        lse=plgpu.SMEM((consumers, bq), jnp.float32),
        q_loaded=_q_barrier(config, per_copy=2 if "q_seg" in extras else 1),
        k_loaded=k_loaded,
        v_loaded=v_loaded,
        k_free=k_free,
        v_free=v_free,
    )
    if config.prefetch_q:
        scratch["q_free"] = plgpu.Barrier(num_arrivals=consumers, num_barriers=2)
    if not config.named_barriers:
        scratch["turn"] = plgpu.Barrier(num_arrivals=consumers)
    elif via_smem:  # NamedTurn's emulation: one mbarrier per hardware barrier
        scratch["turn"] = plgpu.Barrier(num_arrivals=consumers, num_barriers=consumers)
    if via_smem:
        scratch["p"] = pp.smem_tile((consumers, bq, bkv), dtype)
    if "q_seg" in extras:
        seg_loaded, seg_free = pp.stream_barriers(1, stages, consumers)
        scratch |= dict(
            q_seg=plgpu.SMEM((config.q_slots * consumers, bq), jnp.int32),
            kv_seg=plgpu.SMEM((stages, bkv), jnp.int32),
            kv_seg_loaded=seg_loaded,
            kv_seg_free=seg_free,
        )
    return scratch


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    statics: AttentionStatics,
    config: ForwardConfig,
    seq_lens: tuple[int, int],
    extras: dict[str, jax.Array] | None = None,
    interpret: plgpu.InterpretGPUParams | None = None,
    kv_at: KvAt = (0, 0, 0),
) -> tuple[jax.Array, jax.Array]:
    """Padded q `(B, Tp, N, D)`, k, v `(B, Sp, K, D)` (Tp a multiple of config.rows, Sp of
    block_kv, D a multiple of 64) -> `(out (B, Tp, N, D), lse2 (B, N, Tp) float32)`.

    `kv_at`: where the keys lie in k and v when those are larger arrays read in place
    (`(k's batch row of batch row 0, v's, the row of key 0)`: one buffer passed as both, its
    first B batch rows K's and the next B V's, as `api.forward` reads a ring's stacked K/V).

    `seq_lens`: the real (T, S); rows and keys past them are padding the visibility rule hides.
    `extras`, each optional: "seq" `(B, 4)` int32 offsets and lengths (`Operands.seq_info`);
    "q_seg" `(B, Tp)`, "kv_seg" `(B, Sp)` int32 segment ids; "bias" `(Bb, Nb, Tb, Sb)` float32,
    each axis 1 or full (padded), not both of the last two 1; "seeds" `(2,)` uint32 dropout
    seeds (with `statics.dropout_rate`); "full", "partial" the visit lists
    `(Bt, 1, Tp / (2 block_q), 1 + Sp / block_kv)` int32 of the CTA tiles (with segment ids or a
    block mask; `visibility.visit_lists`).
    """
    batch, seq_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    if group % config.heads_per_tile():
        raise ValueError(
            f"ForwardConfig.pack_heads: {group} query heads per KV head are not a multiple of "
            f"the {config.consumers} consumers"
        )
    static_seq = (0, 0, seq_lens[0], seq_lens[1])
    via_smem = interpret is not None
    extras = {name: x for name, x in (extras or {}).items() if x is not None}
    names = ("q", "k", "v", *extras)
    config = pp.fit_stages(config, lambda c: _scratch(c, head_dim, q.dtype, extras, False))
    bkv, stages = config.block_kv, config.stages

    q_tiles = seq_q // config.rows
    consumers = config.consumers
    grid = {"q": q_tiles, "h": num_heads // config.heads_per_tile(), "b": batch}
    # Slowest to fastest: the lowering puts the grid's last axis on CUDA's x (see longest_first).
    order = ("h", "b", "q") if config.longest_first else ("q", "h", "b")

    def flashjax_mosaic_forward(*refs):
        ins, outs, (sc,) = pp.split_refs(refs, (len(names), 2))
        refs = dict(zip(names, ins)) | dict(zip(("out", "lse"), outs))
        sc = sc | _releases(sc, config, via_smem)

        def work_of(qt, b) -> tuple[tuple, pp.Visits]:
            """Batch row b's `(q_offset, kv_offset, q_len, kv_len)` and the key tiles that
            query tile qt visits."""
            seq = pp.seq_of(refs.get("seq"), static_seq, b)
            if "full" in refs:
                bt = b if refs["full"].shape[0] > 1 else 0
                return seq, pp.list_visits(
                    lambda j: refs["full"][bt, 0, qt, j], lambda j: refs["partial"][bt, 0, qt, j]
                )
            cta_rows = qt * config.rows
            ranges = visibility.block_range(statics, cta_rows, config.rows, bkv, seq)
            return seq, pp.range_visits(ranges)

        def consume(tile, done):
            visits_done, tiles_done = done
            seq, visits = work_of(tile[0], tile[2])
            _consumer(
                refs,
                sc,
                tile,
                done,
                statics=statics,
                config=config,
                visits=visits,
                seq=seq,
                num_heads=num_heads,
                interpret=via_smem,
            )
            return visits_done + visits.count, tiles_done + 1

        def produce(tile, done):
            visits_done, tiles_done = done
            qt, _, b = tile
            _, visits = work_of(qt, b)
            if config.prefetch_q:
                _produce_q(refs, sc, tile, tiles_done, config)
            head = config.consumer_rows(tile, 0)[1]  # every consumer's head shares its KV head
            streams = _streams(refs, sc, b, lax.div(head, group), bkv, kv_at)
            pp.stream(streams, visits, stages, visits_done)
            return visits_done + visits.count, tiles_done + 1

        frees = [sc[f"{name}_free"] for name in ("k", "v", "kv_seg") if f"{name}_free" in sc]

        def consumer():
            plgpu.set_max_registers(config.register_split[0], action="increase")
            each_tile(consume)

        def producer():
            plgpu.set_max_registers(config.register_split[1], action="decrease")
            visits_done, tiles_done = each_tile(produce)
            pp.drain(frees, visits_done, stages)
            if config.prefetch_q:
                pp.drain([sc["q_free"]], tiles_done, 2)

        pp.warpgroups(consumer, producer, consumers)

    def each_tile(work):
        """`work((qt, h, b), done) -> done` over this CTA's query tiles (one, or with `persistent`
        its share of all, in `order`), `done` the key visits and query tiles so far; returns
        them at the end."""
        start = (0, 0)  # a CTA with one tile: its counts stay static
        if not config.persistent:
            tile = tuple(lax.axis_index(name) for name in ("q", "h", "b"))
            return work(_ordered(tile), start)
        if config.pair_tiles:
            return _paired(work, start)

        # nd_loop's last axis is its fastest: `order` reversed puts its first axis there
        @plgpu.nd_loop(
            tuple(grid[n] for n in reversed(order)), collective_axes="sm", init_carry=start
        )
        def done(info, carry):
            index = dict(zip(reversed(order), info.index))
            return work(_ordered(tuple(index[n] for n in ("q", "h", "b"))), carry)

        return done

    def _paired(work, start):
        """`pair_tiles`: the persistent loop over steps of tiles (T - 1 - j, j) of one head (a
        middle tile alone), a head's steps adjacent; the tile body is emitted once (inlined
        twice, it spilled offline)."""

        @plgpu.nd_loop(
            (grid["b"], grid["h"], (q_tiles + 1) // 2), collective_axes="sm", init_carry=start
        )
        def done(info, carry):
            b, h, j = info.index
            longer = q_tiles - 1 - j

            def one(i, carry):  # the pair's longer tile, then its shorter
                return work((lax.select(i == 0, longer, j), h, b), carry)

            return lax.fori_loop(0, lax.select(longer == j, 1, 2), one, carry)

        return done

    def _ordered(tile):
        qt, h, b = tile
        return (q_tiles - 1 - qt if config.longest_first else qt), h, b

    dtype = q.dtype
    scratch = _scratch(config, head_dim, dtype, extras, via_smem)
    out_type = (
        jax.ShapeDtypeStruct(q.shape, dtype),
        jax.ShapeDtypeStruct((batch, num_heads, seq_q), jnp.float32),
    )
    if config.persistent:
        launch = dict(grid=(configs.core_count(),), grid_names=("sm",))
    else:
        launch = dict(grid=tuple(grid[name] for name in order), grid_names=order)
    return plgpu.kernel(
        flashjax_mosaic_forward,
        out_type=out_type,
        scratch_types=(scratch,),
        **launch,
        num_threads=consumers + 1,
        thread_name="wg",
        compiler_params=pp.compiler_params(config.no_auto_barriers),
        interpret=interpret,
    )(q, k, v, *extras.values())
