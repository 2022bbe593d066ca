"""What the Mosaic GPU kernels share: shared-memory tiles, wgmma helpers, the TMA producer that
streams tiles through a ring of slots, and the ping-pong schedule of two consumer warpgroups.

Conventions: a CTA has `CONSUMERS` compute warpgroups and one producer warpgroup (the last). The
producer streams, for each step of a range, a tuple of tiles into slot `step % stages` of their
shared-memory rings; tile t of slot s arrives on `loaded[t][s]` (TMA completion) and is released by
both consumers on `free[t][s]` (one arrival each).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common, configs

CONSUMERS = 2  # compute warpgroups per CTA (the forward's ForwardConfig.consumers may say 3)
PRODUCER = CONSUMERS  # the warpgroup index of the TMA producer
LAYOUT = plgpu.Layout.WGMMA


def smem_tile(
    shape: tuple[int, ...], dtype, minor: int | None = None, swizzle: int | None = None
) -> plgpu.SMEM:
    """A swizzled shared-memory buffer (a TMA destination and wgmma operand); `minor` is the
    element count of its minor dim (default: the last dim of `shape`); `swizzle` in bytes
    (default: the widest the minor dim takes)."""
    minor = shape[-1] if minor is None else minor
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = swizzle or plgpu.find_swizzle(minor * itemsize * 8)
    tiling = plgpu.TilingTransform((8, swizzle // itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


# Pallas' Mosaic GPU lowering (jax 0.11.2) places each scratch buffer at a multiple of this many
# bytes, then Mosaic adds 8 bytes an mbarrier.
SMEM_ALIGNMENT = 1024
MBARRIER_BYTES = 8


def smem_bytes(scratch: dict) -> int:
    """The shared memory a kernel with this scratch (buffers and barriers) asks for on the GPU
    (in jax 0.11.2, exactly: offline compiles' resource reports, tests/test_gpu_lowering.py)."""
    total = 0
    for leaf in jax.tree.leaves(scratch, is_leaf=lambda x: isinstance(x, plgpu.Barrier)):
        if isinstance(leaf, plgpu.Barrier):
            total += MBARRIER_BYTES * math.prod(leaf.num_barriers)
        else:
            size = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
            total += -(-size // SMEM_ALIGNMENT) * SMEM_ALIGNMENT
    return total


def fits(scratch: dict) -> bool:
    """This scratch fits the device's shared memory (`configs.MOSAIC_SHARED_MEMORY`)."""
    return smem_bytes(scratch) <= configs.MOSAIC_SHARED_MEMORY


def fit_stages(config, scratch_of: Callable):
    """`config` (a kernel's frozen dataclass with `stages`) with the most ring stages, up to its
    own, whose scratch (`scratch_of(config)`) fits; 1 if none does (Mosaic then says by how
    much)."""
    stages = range(config.stages, 0, -1)
    fitting = (n for n in stages if fits(scratch_of(dataclasses.replace(config, stages=n))))
    return dataclasses.replace(config, stages=next(fitting, 1))


def matmul(a, b, shape: tuple[int, int], *, then=None) -> jax.Array:
    """`a @ b` into a fresh float32 accumulator (a, b in shared memory; b may be a `.T` view)."""
    return matmul_sum(((a, b),), shape, then=then)


def matmul_sum(pairs, shape: tuple[int, int], *, then=None) -> jax.Array:
    """The sum of `a @ b` over `pairs` into a fresh float32 accumulator. `then`: called once
    they are issued, to issue one more wgmma group, which stays in flight while the sum is
    read (`wait_n=1`; wgmma groups complete in order)."""

    def product(acc_ref):
        for a, b in pairs:
            plgpu.wgmma(acc_ref, a, b)
        if then is None:
            return acc_ref[...]
        then()
        return plgpu.wgmma_accumulator_load(acc_ref, wait_n=1)

    return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))


def mma_into(acc: jax.Array, a, b, *, in_place: bool, meanwhile=None) -> jax.Array:
    """`acc + a @ b` with wgmma (b in shared memory, a in registers or shared memory).

    `in_place`: the accumulator enters the wgmma (the GPU path); otherwise the product lands in a
    fresh accumulator and is added (the CPU interpreter runs no `ACC.init` state). `meanwhile`:
    called after the wgmma is issued, before it is awaited (in place only).
    """
    if in_place:

        def accumulate(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            if meanwhile is not None:
                meanwhile()

        return pl.run_state(accumulate)(plgpu.ACC.init(acc))
    return acc + matmul(a, b, acc.shape)


def operand(x: jax.Array, staging, *, via_smem: bool):
    """A register tile as a wgmma A operand: itself on the GPU; in interpret mode (which runs no
    register-operand wgmma) stored to `staging` shared memory first."""
    if not via_smem:
        return x
    staging[...] = x
    plgpu.commit_smem()
    return staging


@dataclasses.dataclass(frozen=True)
class Releases:
    """How the consumers hand a ring's slots back to its producer: each consumer `arrive(slot)`s
    once it is done reading the slot, the producer `wait(slot)`s for all of them before filling
    it again. On `barrier`, an mbarrier per slot (Pallas counts every consumer thread's arrival:
    128 shared-memory arrives per warpgroup), or with `first_id` on hardware named barriers
    `first_id + slot` (`bar.arrive` by the consumers' threads, `bar.sync` by the producer's,
    `threads` of them in all: FA3's and tokamax's "consumed" barriers). A consumer's next
    arrive on a slot needs the producer's refill of it, so it never meets an arrive it would
    add to. The interpreter runs no inline PTX: there the mbarriers stand in."""

    barrier: object
    first_id: int | None = None
    threads: int = 0
    slots: int = 1

    def _named(self, op: str, slot) -> None:
        if isinstance(slot, int):
            _named_barrier(op, self.first_id + slot, self.threads)
            return
        for s in range(self.slots):  # a barrier id is an immediate: one branch per slot
            signal = functools.partial(_named_barrier, op, self.first_id + s, self.threads)
            pl.when(slot == s)(signal)

    def arrive(self, slot=0) -> None:
        if self.first_id is None:
            plgpu.barrier_arrive(self.barrier.at[slot])
        else:
            self._named("arrive", slot)

    def wait(self, slot=0) -> None:
        if self.first_id is None:
            plgpu.barrier_wait(self.barrier.at[slot])
        else:
            self._named("sync", slot)


@dataclasses.dataclass(frozen=True)
class Stream:
    """One tile a producer streams per visit: `source(tile)` is the GMEM view of column tile
    `tile` to copy, `ring` the `(stages, ...)` SMEM buffer, `loaded` its barriers (one per
    slot) and `free` its slots' `Releases`."""

    source: Callable[[jax.Array], object]
    ring: object
    loaded: object
    free: Releases


@dataclasses.dataclass(frozen=True)
class Visits:
    """The column tiles a CTA visits, in order: visit i (0 <= i < count) is tile `tile(i)`; `runs`
    are `(start, stop, masked)` spans of visit indices, `masked` (static) saying whether their
    tiles need the element mask. The producer and both consumers walk the same visits."""

    count: jax.Array
    runs: tuple[tuple[jax.Array, jax.Array, bool], ...]
    tile: Callable[[jax.Array], jax.Array]


def range_visits(ranges: tuple) -> Visits:
    """Visits of `visibility.block_range`'s `(lo, full_lo, full_hi, hi)`: boundary tiles masked,
    interior ones not."""
    lo, full_lo, full_hi, hi = ranges
    n = hi - lo
    a = 0 if full_lo is lo else full_lo - lo  # (statically empty runs: block_range)
    b = n if full_hi is hi else full_hi - lo
    return Visits(count=n, runs=((0, a, True), (a, b, False), (b, n, True)), tile=lambda i: lo + i)


def list_visits(full, partial) -> Visits:
    """Visits of the visit lists (`visibility.visit_lists`; `full(j)` / `partial(j)` read entry j
    of this CTA's row, entry 0 the count): the full tiles unmasked, then the partial ones."""
    n_full, n_partial = full(0), partial(0)
    count = n_full + n_partial

    def tile(i):
        return jnp.where(i < n_full, full(1 + i), partial(1 + jnp.maximum(i - n_full, 0)))

    return Visits(count=count, runs=((0, n_full, False), (n_full, count, True)), tile=tile)


def after_first(visits: Visits) -> Visits:
    """`visits` without visit 0 (each run clipped to start at 1), for a walk whose first visit
    is peeled off; the indices stay those of `visits`."""

    def clip(start, stop):
        if isinstance(start, int) and isinstance(stop, int):
            start = max(start, 1)
            return start, max(stop, start)
        first = jnp.maximum(start, 1)
        return first, first if stop is start else jnp.maximum(stop, first)  # (empty stays so)

    runs = tuple((*clip(start, stop), masked) for start, stop, masked in visits.runs)
    return dataclasses.replace(visits, runs=runs)


def live_runs(visits: Visits) -> list:
    """`visits.runs` less those known to be empty when traced (ends that are one object, from
    `range_visits`, or ints in order): the runs a walk emits a loop for."""

    def empty(start, stop) -> bool:
        return stop is start or (isinstance(start, int) and isinstance(stop, int) and stop <= start)

    return [run for run in visits.runs if not empty(*run[:2])]


def walk(visits: Visits, step: Callable, carry, *, one_body: bool = False):
    """Run `step(i, carry, masked=...)` over every visit, run by run (`masked` static: each run
    its own loop). Each loop counts from 0 and offsets the index: a run's start read from GMEM
    (visit lists, sequence info) is a value that varies over a `shard_map` axis, and a loop index
    starting there would not match its own increment's type under `check_vma`. `one_body`: one
    loop over every visit, `masked` then a traced bool (whether visit i lies in a masked run)."""
    runs = live_runs(visits)
    if one_body:

        def visit(i, c):
            masked = False
            for start, stop, run_masked in runs:
                if run_masked:
                    masked = masked | ((i >= start) & (i < stop))
            return step(i, c, masked=masked)

        return lax.fori_loop(0, visits.count, visit, carry)
    for start, stop, masked in runs:
        carry = lax.fori_loop(
            0,
            stop - start,
            lambda j, c, start=start, masked=masked: step(start + j, c, masked=masked),
            carry,
        )
    return carry


def warpgroups(
    consumer: Callable[[], None], producer: Callable[[], None], consumers: int = CONSUMERS
) -> None:
    """Run `consumer` on the `consumers` consumer warpgroups and `producer` on the producer's
    (the last)."""
    wg = lax.axis_index("wg")
    pl.when(wg < consumers)(consumer)
    pl.when(wg == consumers)(producer)


def produce(streams: Sequence[Stream], visits: Visits, stages: int, registers: int) -> None:
    """The producer warpgroup of a CTA with one tile: its registers given up, its visits
    streamed (`stream`), then the drain (`drain`)."""
    plgpu.set_max_registers(registers, action="decrease")
    stream(streams, visits, stages)
    drain([s.free for s in streams], visits.count, stages)


def stream(streams: Sequence[Stream], visits: Visits, stages: int, done=0) -> None:
    """For each visit, wait until its slot is free (from the ring's second lap on), then TMA
    every stream's tile (`source(tile)`) into it. `done`: visits streamed before these (by a
    persistent CTA's earlier tiles), so the ring's slots and laps continue across tiles."""

    @pl.loop(0, visits.count)
    def _(i):
        n = done + i
        slot = lax.rem(n, stages)
        tile = visits.tile(i)
        for s in streams:
            pl.when(n >= stages)(functools.partial(s.free.wait, slot))
            plgpu.copy_gmem_to_smem(s.source(tile), s.ring.at[slot], s.loaded.at[slot])


def ring_slot(count, slots: int):
    """The slot of a ring of `slots` that use number `count` takes (`count` static where it is:
    Mosaic GPU lowers no arithmetic on constants alone)."""
    if slots == 1:
        return 0
    return count % slots if isinstance(count, int) else lax.rem(count, slots)


def drain(frees: Sequence[Releases], total, stages: int) -> None:
    """Observe the consumers' releases (`frees`: the streams' `Releases`) of the last `stages`
    of `total` visits, so every barrier phase is consumed before the CTA exits (the interpreter
    checks it; on the GPU it costs the producer a wait). `total` may be static."""
    if isinstance(total, int):
        for j in range(max(total - stages, 0), total):
            for free in frees:
                free.wait(j % stages)
        return
    first = jnp.maximum(total - stages, 0)  # counted from 0: see `walk`

    @pl.loop(0, total - first)
    def _(j):
        slot = lax.rem(first + j, stages)
        for free in frees:
            free.wait(slot)


def stream_barriers(count: int, stages: int, consumers: int = CONSUMERS) -> tuple:
    """`loaded` and `free` barrier arrays for `count` streams: `(loaded..., free...)`; a slot is
    free once each of the `consumers` has released it."""
    loaded = tuple(plgpu.Barrier(num_barriers=stages) for _ in range(count))
    free = tuple(plgpu.Barrier(num_arrivals=consumers, num_barriers=stages) for _ in range(count))
    return loaded + free


def with_options(config, options, known: tuple[str, ...]):
    """`config` (a kernel's frozen dataclass) with exactly its on/off flags `known` that are
    named in `options` on (the rest off)."""
    unknown = set(options) - set(known)
    if unknown:
        name = type(config).__name__
        raise ValueError(f"unknown {name} options {sorted(unknown)}; known: {known}")
    return dataclasses.replace(config, **{flag: flag in options for flag in known})


def options_on(config, known: tuple[str, ...]) -> tuple[str, ...]:
    """The on/off flags of `config` among `known` that are on (`with_options`' inverse)."""
    return tuple(flag for flag in known if getattr(config, flag))


def wait_stores(async_store: bool) -> None:
    """Await this thread's SMEM -> GMEM copies (the epilogue's last step): until they have read
    shared memory (`async_store`, FA3's epilogue: enough to reuse the buffers or to exit, the
    writes landing while the CTA ends or, persistent, loads its next tile) or until they landed."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=async_store)


def compiler_params(no_auto_barriers: bool) -> plgpu.CompilerParams:
    """The kernels' compiler parameters. `no_auto_barriers`: Pallas inserts no barrier around
    SMEM loads and stores (`unsafe_no_auto_barriers`, as tokamax's sm90 kernels run; its
    docstring says the insertion is conservative and may cost speed). Safe here: no thread
    reads back SMEM it wrote (the epilogues write the output tile, then only the TMA reads it),
    and nothing overwrites committed SMEM before its copy is awaited."""
    return plgpu.CompilerParams(
        approx_math=True, unsafe_no_auto_barriers=no_auto_barriers, reduction_scratch_bytes=0
    )


class Turn:
    """The FA3 ping-pong of the two consumers on one barrier (two arrivals per phase): a consumer
    calls `sync` after issuing its first matmul of a step, `done` after its softmax and `wait`
    before its second matmul; consumer 1 starts a phase late (`start`), consumer 0 makes it up at
    the end (`finish`), so one consumer's softmax overlaps the other's matmuls.

    With `enabled=False` every call is a no-op (the consumers then synchronize only through the
    ring's barriers): a kernel whose consumers release a slot after their last matmul of a step
    must not ping-pong on a one-slot ring, or a consumer would wait on its own release.
    """

    def __init__(self, barrier, wg: jax.Array, *, enabled: bool = True):
        self.barrier, self.wg, self.enabled = barrier, wg, enabled

    def sync(self) -> None:
        if self.enabled:
            plgpu.barrier_arrive(self.barrier)
            plgpu.barrier_wait(self.barrier)

    def done(self) -> None:
        if self.enabled:
            plgpu.barrier_arrive(self.barrier)

    def wait(self) -> None:
        if self.enabled:
            plgpu.barrier_wait(self.barrier)

    def start(self) -> None:
        pl.when(self.wg == 1)(self.sync)

    def finish(self) -> None:
        pl.when(self.wg == 0)(self.sync)


# Hardware barrier ids: 0 is the CTA's, 1..4 Mosaic GPU's warpgroup barriers (warpgroup index
# + 1); the ping-pong with named barriers: consumer c waits on NAMED_TURN + c; the forward's
# `named_free` releases: NAMED_FREE + slot for K, then V's; 16 in all.
NAMED_TURN = 4
NAMED_FREE = NAMED_TURN + CONSUMERS
NAMED_BARRIERS = 16


def _named_barrier(op: str, barrier_id: int, count: int = CONSUMERS * 128) -> None:
    """`bar.sync` / `bar.arrive` on hardware barrier `barrier_id` for `count` threads (by
    default both consumers' 256; one call per warpgroup: its 128 threads)."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu()
    def barrier(_ctx):
        mgpu_utils.inline_ptx(f"bar.{op} {barrier_id}, {count};", has_side_effects=True)

    # Called: until session 22 this function was only defined, so no named barrier reached the
    # GPU (`named_barriers` ran without a ping-pong, `named_free`'s producer without waits).
    barrier()


class NamedTurn:
    """The ping-pong of `Turn` (same calls, same order of tensor-core work) on two hardware
    named barriers, as FA3 and tokamax's sm90 kernel schedule it: consumer c waits (`bar.sync`)
    on barrier NAMED_TURN + c, which the other consumer signals (`bar.arrive`) after issuing its
    QK^T. The interpreter runs no inline PTX: with `emulation` (two mbarriers of two arrivals)
    each named barrier is an mbarrier (`bar.arrive`: arrive; `bar.sync`: arrive and wait), so
    interpret mode checks the protocol (every wait met, every phase consumed, no race)."""

    def __init__(self, wg: jax.Array, emulation=None):
        self.wg, self.emulation = wg, emulation

    def _barrier(self, op: str, consumer: int) -> None:
        if self.emulation is None:
            _named_barrier(op, NAMED_TURN + consumer)
            return
        barrier = self.emulation.at[consumer]
        plgpu.barrier_arrive(barrier)
        if op == "sync":
            plgpu.barrier_wait(barrier)

    def _mine(self, op: str, other: bool) -> None:
        for c in range(CONSUMERS):
            target = CONSUMERS - 1 - c if other else c
            pl.when(self.wg == c)(functools.partial(self._barrier, op, target))

    def sync(self) -> None:  # after issuing QK^T: the other consumer may issue its matmuls
        self._mine("arrive", other=True)

    def done(self) -> None:  # the arrive above already says it
        pass

    def wait(self) -> None:  # before PV: until the other consumer has issued its QK^T
        self._mine("sync", other=False)

    def start(self) -> None:  # consumer 1 waits for consumer 0's first QK^T
        pl.when(self.wg == 1)(functools.partial(self._barrier, "sync", 1))

    def finish(self) -> None:  # consumer 0's last signal balances consumer 1's first wait
        pl.when(self.wg == 0)(functools.partial(self._barrier, "arrive", 1))


class IssueTurn(NamedTurn):
    """FA3's ping-pong for consumers that issue all of a step's matmuls at once (the forward's
    `overlap_qk`), on NamedTurn's two barriers: consumer c waits on barrier NAMED_TURN + c
    before issuing (`acquire`) and signals the other's after (`release`), so the two
    consumers' issues alternate and each one's softmax runs while the other's matmuls do.
    Consumer 1 pre-signals consumer 0's barrier (`start`), consumer 0 takes the last signal
    (`finish`)."""

    def acquire(self) -> None:  # before issuing: until the other consumer has issued
        self.wait()

    def release(self) -> None:  # after issuing: the other consumer may issue
        self.sync()

    def start(self) -> None:
        pl.when(self.wg == 1)(functools.partial(self._barrier, "arrive", 0))

    def finish(self) -> None:
        pl.when(self.wg == 0)(functools.partial(self._barrier, "sync", 0))


def extent(refs: dict) -> tuple[int, int]:
    """The padded (T, S) that a kernel's query and key indices stay below: `element_visible`'s
    `extent` (a static length that fills it needs no compare)."""
    return refs["q"].shape[1], refs["k"].shape[1]


def seq_of(seq_ref, static: tuple[int, int, int, int], batch: jax.Array) -> tuple:
    """`(q_offset, kv_offset, q_len, kv_len)` of a batch row: scalars read from the `(B, 4)`
    int32 GMEM operand (`Operands.seq_info`), or the static `(0, 0, T, S)` when the call has no
    lengths or offsets (`seq_ref` None: the loop bounds stay compile-time constants)."""
    if seq_ref is None:
        return static
    return tuple(seq_ref[batch, i] for i in range(4))


def split_refs(refs: Sequence, counts: Sequence[int]) -> list:
    """Cut a kernel's flat ref list into consecutive groups of `counts` (the rest last)."""
    groups, start = [], 0
    for n in counts:
        groups.append(refs[start : start + n])
        start += n
    return [*groups, refs[start:]]


def bias_tile(ref, batch, head, row0, rows: int, col0, cols: int) -> jax.Array:
    """The `(rows, cols)` float32 tile at (row0, col0) of a bias `(Bb, Nb, Tb, Sb)` in GMEM whose
    axes are 1 (broadcast) or full, loaded straight into registers (WGMMA layout); a bias
    broadcast along queries or keys is read as one vector. (Tb = Sb = 1 is not taken: the host
    widens it to a row of keys.)"""
    nb, nh, nt, ns = ref.shape
    at = (batch if nb > 1 else 0, head if nh > 1 else 0)
    if nt > 1 and ns > 1:
        tile = plgpu.load(
            ref.at[(*at, pl.ds(row0, rows), pl.ds(col0, cols))], layout=LAYOUT, optimized=False
        )
    elif nt > 1:  # one value per query row
        column = plgpu.load(
            ref.at[(*at, pl.ds(row0, rows), 0)], layout=LAYOUT.reduce(1), optimized=False
        )
        tile = lax.broadcast_in_dim(column, (rows, cols), [0])
    else:  # one value per key
        row = plgpu.load(
            ref.at[(*at, 0, pl.ds(col0, cols))], layout=LAYOUT.reduce(0), optimized=False
        )
        tile = lax.broadcast_in_dim(row, (rows, cols), [1])
    return tile.astype(jnp.float32)


def dropout_rows(statics, seeds_ref, batch, head, num_heads: int, rows: jax.Array) -> jax.Array:
    """The dropout hash's row keys of a tile whose query indices are `rows` (2-D), for one
    (batch row, query head); `seeds_ref` the `(2,)` uint32 GMEM operand. With
    `common.dropout_keep_of(keys, cols, rate)` the kernels draw Triton's and XLA's bits."""
    seeds = (seeds_ref[0], seeds_ref[1])
    stream = common.head_stream(statics, seeds, batch, head, num_heads)
    return common.dropout_row_keys(stream, rows)


def dropout_factor(statics, row_keys: jax.Array, cols: jax.Array) -> jax.Array:
    """Inverted dropout's per-element factor of a tile (`keep / (1 - rate)`)."""
    keep = common.dropout_keep_of(row_keys, cols, statics.dropout_rate)
    return common.dropout_factor(statics, keep)


def iota(shape: tuple[int, int], dim: int) -> jax.Array:
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=LAYOUT)


def positions(shape: tuple[int, int], first, *, queries: int = 0) -> tuple[jax.Array, jax.Array]:
    """A tile's query and key positions, (queries, keys), each of `shape`; `first`: the tile's
    first (query, key); `queries`: the dim they run along (1 in the backward's dK/dV tile).
    Call it in the step that uses them: made once before the loop (as the kernels did until
    session 26), the two int32 tiles stayed live through every step and spilled (offline,
    head dim 128 causal 4k: the forward with overlap_qk 180 -> 0 bytes, the two-kernel dK/dV
    152 -> 92, the 5-GEMM one at 240/24 336 -> 200)."""
    return first[0] + iota(shape, queries), first[1] + iota(shape, 1 - queries)
