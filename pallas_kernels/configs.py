"""Block sizes, warps and pipeline stages for the attention kernels, each with its provenance.

One table; kernels never hard-code a tile size. Keys are (target, head_dim bucket) where the bucket
is the padded head dim (a power of two, >= 16). `target` is "sm90" (Hopper), "sm80" (Ampere and
anything else >= sm80) or "interpret" (CPU interpret mode: small tiles so that tests at small shapes
still cross several blocks and exercise the boundary logic).
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of one kernel."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One config per kernel: forward, backward dK/dV (one program per key block), backward dQ."""

    fwd: KernelConfig
    dkdv: KernelConfig
    dq: KernelConfig


K = KernelConfig

# Hopper. Chosen by benchmarks/tune.py on an NVIDIA H200 (jax 0.11.2, CUDA 13, 2026-11-21; every
# kernel timed alone at bf16, B*T = 16k, N*H = 2048, T in {1k, 4k causal, 16k, 16k causal}; the
# sweep is benchmarks/results/2026-11-21-h200-tile-sweep.json). 64x64 tiles with 4 warps won the
# backward everywhere (the FA2 tutorial's 64x128 / 128x64 with 8 warps were 1.2-1.8x slower); the
# forward likes 128x128 with 8 warps at head dim 128 and 64x64 with 4 warps at 64.
# Head dim 256: `python benchmarks/tune.py OUT 256` on the H200 (2026-11-22; T in {4k causal, 16k};
# benchmarks/results/2026-11-22-h200-tile-sweep-d256.json). dK/dV and dQ: the sweep's winners at
# both shapes (1.6x / 2.1x faster than the first fit-only tiles at 16k). Forward: the winner, 128x64
# with 2 stages, would be cut to 1 stage by `stages_that_fit` (its estimate charges max(block_q,
# block_k) per streamed tile), 1.16-1.30x slower than the runner-up 64x32 with 2 stages (1.7x the
# fit-only 64x64), which is the entry.
_TABLE: dict[tuple[str, int], AttentionConfig] = {
    ("sm90", 16): AttentionConfig(K(64, 64, 4, 2), K(64, 64, 4, 2), K(64, 64, 4, 2)),
    ("sm90", 32): AttentionConfig(K(64, 64, 4, 2), K(64, 64, 4, 2), K(64, 64, 4, 2)),
    ("sm90", 64): AttentionConfig(K(64, 64, 4, 2), K(64, 64, 4, 2), K(64, 64, 4, 2)),
    ("sm90", 128): AttentionConfig(K(128, 128, 8, 3), K(64, 64, 4, 2), K(64, 64, 4, 2)),
    ("sm90", 256): AttentionConfig(K(64, 32, 4, 2), K(64, 32, 4, 2), K(128, 32, 8, 1)),
    # Ampere-class (not measured: no such GPU here): 164 KiB of shared memory, so smaller tiles.
    ("sm80", 16): AttentionConfig(K(128, 64, 4, 3), K(64, 64, 4, 2), K(64, 64, 4, 2)),
    ("sm80", 32): AttentionConfig(K(128, 64, 4, 3), K(64, 64, 4, 2), K(64, 64, 4, 2)),
    ("sm80", 64): AttentionConfig(K(128, 64, 4, 3), K(64, 64, 4, 2), K(64, 64, 4, 2)),
    ("sm80", 128): AttentionConfig(K(128, 64, 8, 2), K(64, 64, 8, 2), K(64, 64, 8, 2)),
    ("sm80", 256): AttentionConfig(K(64, 32, 8, 1), K(32, 32, 8, 1), K(32, 32, 8, 1)),
}
# CPU interpret mode: speed is irrelevant, coverage of block boundaries is what matters.
_INTERPRET = AttentionConfig(K(32, 16, 4, 1), K(16, 32, 4, 1), K(32, 16, 4, 1))


@dataclasses.dataclass(frozen=True)
class CallRule:
    """What a MosaicForward or MosaicBackward row changes for the calls this names: causal ones
    (a query tile's work grows with its row: `mosaic.api.is_causal`) or the others, of
    `min_rows`..`max_rows` query rows: on/off options it turns off (`drop`) and on (`options`),
    a number of consumer warpgroups (the forward's only), and setmaxnreg's (consumer, producer)
    registers (None: the kernel's split for its consumers; only with two). `min_group`: only
    calls with at least this many query heads per KV head (GQA rules; `mosaic.api.call_config`
    drops `pack_heads` where the group does not fill a packed tile). A row's rules apply in
    order, each to what the ones before it left."""

    causal: bool
    options: tuple[str, ...] = ()
    min_rows: int = 0
    max_rows: int | None = None
    consumers: int | None = None
    drop: tuple[str, ...] = ()
    registers: tuple[int, int] | None = None
    min_group: int = 1

    def __str__(self) -> str:
        rows = f"{self.min_rows}-{self.max_rows or ''}"
        group = [f"group{self.min_group}+"] if self.min_group > 1 else []
        changes = [*group, *(f"-{o}" for o in self.drop), *self.options]
        changes += [f"consumers{self.consumers}"] if self.consumers else []
        changes += ["registers{}-{}".format(*self.registers)] if self.registers else []
        return "+".join(["causal" if self.causal else "noncausal", rows, *changes])

    def matches(self, rows: int, causal: bool, group: int = 1) -> bool:
        within = self.min_rows <= rows and (self.max_rows is None or rows <= self.max_rows)
        return causal == self.causal and within and group >= self.min_group


@dataclasses.dataclass(frozen=True)
class MosaicForward:
    """One row of MOSAIC_FORWARD: the tiles and flags of mosaic.forward.ForwardConfig, the
    on/off options (mosaic.forward.OPTIONS) that are on, and the rules for calls that differ."""

    block_q: int  # per consumer warpgroup
    block_kv: int
    stages: int  # of the K/V ring
    consumers: int = 2  # consumer warpgroups per CTA
    early_next_k: bool = False
    pinned_order: bool = True
    options: tuple[str, ...] = ()
    rules: tuple[CallRule, ...] = ()


# Hopper kernels on Mosaic GPU (pallas_kernels/mosaic), per head dim bucket.
# Tiles swept on the H200 (benchmarks/tune_mosaic.py, results in
# benchmarks/results/2026-11-30-h200-mosaic/tune_mosaic.json; bf16, B*T = 16k at T = 8k, TFLOP/s
# non-causal / causal of the chosen config vs the first candidate, tokamax's own default
# (64, 128, 2)): head dim 64: 363 / 329 vs 344 / 292 (block_kv 256: 384 / 315); 128: 509 / 416
# vs 501 / 384 (3 stages of 128 keys exceed shared memory; 64-key tiles are 10-15% slower); 256:
# one stage of 128 keys, 593 / 417 vs two of 64 keys 540 / 416. 192 (not swept) follows 256.
# Schedule options swept interleaved on these tiles (benchmarks/results/2026-11-30-h200-s6/tune, ms
# non-causal / causal, grid order -> chosen): 128 longest_first 2.201 / 1.291 -> 2.113 / 1.204
# (named barriers 11% slower, persistent 0-2% faster); 256 longest_first + no_auto_barriers +
# named_barriers 1.931 / 1.333 -> 1.856 / 1.109 (persistent 17-21% slower); 64: every schedule
# option within 1.6% of the grid order (noise), none chosen. (Until session 22 `named_barriers`
# emitted no barrier on the GPU: what these sweeps measured as it, and 256 chose, is no ping-pong at
# all, now `no_pingpong`; FA3's real named ping-pong is yet to be swept.) fold_scale, flipped alone
# from these choices (results/2026-11-30-h200-s6/followup): 64 3.010 / 1.728 -> 2.792 / 1.704 ms,
# 128 2.154 / 1.224 -> 2.146 / 1.220 ms; not measured at 192/256, so off there. At T = 512 (B = 32,
# results/2026-11-30-h200-s7/short; ms non-causal / causal): head dim 64 longest_first 0.425 / 0.370
# -> 0.402 / 0.368 (on: within noise at 8k); 128 persistent 0.323 -> 0.299 non-causal, but with
# longest_first and fold_scale on, the standard bench (s7/final) lost 5-20% at 1k-16k with it, so it
# stays off.
# The rules for causal calls (`api.is_causal`: a causal query tile's work grows with its row).
# Session 10 (results/2026-11-30-h200-s10; FA3's persistent schedule: persistent + async_store +
# prefetch_q), swept interleaved, ms non-causal / causal, these choices -> with it: head dim 64
# at T = 1k 0.540 / 0.420 -> 0.520 / 0.375, at 4k 1.492 / 1.008 -> 1.606 / 0.967; 128 at 2k
# 0.725 / 0.519 -> 0.808 / 0.524 (async_store alone 0.727 / 0.506, within the spread). The
# standard bench with it on for head dim 64 causal (same run as cuDNN, TFLOP/s with it vs the
# session 8 bench without): 1k 306 vs 194, 2k 338 vs 314, 4k 372 vs 368, but 8k 382 vs 408 and
# 16k 408 vs 439. So head dim 64, causal, up to 4k query rows.
# Session 12 (results/2026-12-01-h200-s12/{tune,tier,bench}/tune_*; FA3's intra-warpgroup
# overlap `overlap_qk` and three consumer warpgroups, swept interleaved against the choices
# above, ms): head dim 128 non-causal with overlap_qk at 1k 0.378 (best), 2k 0.704 -> 0.609, 4k
# 1.202 -> 1.130 (with no_auto_barriers 1.114), 16k 3.855 -> 3.491. Head dim 128 causal with
# overlap_qk and no_auto_barriers: 1k 0.345 -> 0.335, 2k 0.457 -> 0.480, 4k 0.852 -> 0.806, 8k
# 1.206 -> 1.127, 16k 1.885 -> 1.899: so from 4k to 8k query rows. Head dim 64 non-causal,
# three consumers (192-row tiles) with overlap_qk and no_auto_barriers: 1k 0.560 -> 0.682 at
# best, 2k 0.940 -> 0.987 at best (slower), 4k 1.601 -> 1.476, 8k 2.917 -> 2.575, 16k 5.216 ->
# 4.380; causal 0.63-0.89x at 1k-4k, 0.96-1.01x at 8k-16k.
# Session 13 (results/2026-12-01-h200-s13/{tune,bench}; the persistent sets at short
# sequences, swept interleaved against the choices above, ms): head dim 64 non-causal at 512
# with FA3's persistent set 0.386 -> 0.354 (standard bench, same run as cuDNN: 288 -> 357
# TFLOP/s, 0.83x -> 1.04x cuDNN). Head dim 128 at 512: non-causal the persistent grid without
# the row's options 0.301 -> 0.276 (bench 441 -> 455 TFLOP/s, 1.03x), causal FA3's persistent
# set 0.338 -> 0.268 (bench 248 -> 277, 1.00x). Swept faster but not taken, as the bench
# disagreed: head dim 64 non-causal at 1k, the persistent grid without the row's options 0.670 ->
# 0.627 (bench 362 -> 360), causal 1k-2k without prefetch_q 0.431 -> 0.408 and 0.614 -> 0.592
# (bench 303 -> 270 and 364 -> 313). At 2k non-causal no candidate beat the row (0.893).
# Session 21 (results/2026-12-03-h200-s21/call1-tune-fwd64, with session 20's sweep timer:
# batches of back-to-back calls as the bench): head dim 64 non-causal, FA3's persistent set
# without the row's longest_first / fold_scale at 1k 0.381 -> 0.365 ms (with them 0.409), at 2k
# 0.681 -> 0.702 and 4k 1.318 -> 1.358 (slower); so up to 1k rows, without the row's options.
# In the bench (s21/call2-tier-bench): 1k 398 TFLOP/s against cuDNN's 396 (s13: 362 / 398).
# Session 22 (results/2026-12-03-h200-s22/call1-pack; GQA packing `pack_heads` by consumer,
# swept with 8 query heads per KV head, B*T = 16k, N*D = 2048; ms): head dim 128 non-causal at
# 256 rows 0.106 -> 0.082 with FA3's persistent set and packing (at 1k 0.251 -> 0.251: no gain),
# causal at 1k 0.187 -> 0.171 with it (without the row's longest_first / fold_scale; at 256 the
# causal rule's persistent set stays: 0.076 against 0.089 packed); head dim 64 causal at 128
# rows 0.088 -> 0.082 packed (non-causal 0.075 -> 0.076: no gain). GQA rules (`min_group`).
# Session 24 (results/2026-12-04-h200-s24/call1-2; FA4's exp2 emulation `exp2_fma`, swept
# interleaved at head dim 64, ms): causal, the grid without -> with it: 2k 0.443 -> 0.427, 4k
# 0.747 -> 0.733, 8k 1.379 -> 1.336, 16k 2.562 -> 2.488; at 4k the grid now beats FA3's
# persistent set (0.765), at 2k and 1k it does not (0.382 / 0.236 against 0.427 / 0.279): so
# the persistent set up to 2k rows, exp2_fma past it. Non-causal it loses with three consumers
# (8k 2.253 -> 2.452, 16k 4.357 -> 4.538) and with the persistent set at 1k (0.349 -> 0.363),
# and ties the grid at 2k (0.676 -> 0.678): off there.
# Session 29 (results/2026-12-05-h100-s29/call3-4, on an H100): head dim 128's causal rule up to
# 512 rows (FA3's persistent set, from session 13's sweep, timed before session 20's batched
# timer) lost in the standard bench (213 TFLOP/s against cuDNN's 263) and in the interleaved
# sweep at 512: 0.167 ms against 0.135 for the row's options alone (persistent with them 0.175,
# without longest_first 0.172): dropped for calls without GQA (call5: the row's options alone
# 0.137 ms at 512, best of 32 within 2%; at 256 0.113 ms, best within 1%). With 8 query heads per
# KV head at 256 rows the persistent set stays (0.075 ms against 0.104 without it): a GQA rule.
# Session 29 (results/2026-12-05-h100-s29/call5, H100): head dim 64 non-causal at 2k, FA3's
# persistent set with `named_free` (K/V slots released on hardware named barriers) 0.667 ms
# against the row's 0.700 (1.051x, best of 32; without named_free the set took 0.726). Session
# 31 (results/2026-12-06-h100-s31/call1-sweeps-bench, H100) with it configured for 1k-4k rows:
# at 2k 0.652 ms, the best of 12 (the row alone 0.672, with exp2_fma 0.707); bench 417 TFLOP/s,
# cuDNN 420 (s29: 404 / 433). At 4k the three consumers' rule stays (named_free on it 1.006x).
# Session 32 (results/2026-12-06-h100-s32/call1, H100): head dim 64 causal at 2k, exp2_fma
# without the persistent set 0.418 ms against configs.py's persistent set 0.431 (1.031x, best
# of the sweep; session 31 had the row alone 1.024x there), at 1k 0.261 against 0.262 (a tie):
# the exp2_fma rule now starts past 1k rows.
# Session 36 (results/2026-12-07-h100-s36/call1, H100, B*T = 16k, swept interleaved, ms):
# FA3's persistent set with `pair_tiles` (each loop step a head's tiles j and T - 1 - j: equal
# causal work per step, a head's steps adjacent so its K/V stays in L2), causal, against
# configs.py's choice: head dim 128 at 512 0.135 -> 0.111 (without the row's options; with them
# 0.112); head dim 64 at 512 0.171 -> 0.143 and 1k 0.264 -> 0.223 (without the row's options;
# with them 0.152 / 0.226), at 2k 0.415 (exp2_fma) -> 0.375 with the row's options (0.402
# without; of the two, fold_scale: pair_tiles sets the loop's order). The GQA rules keep what
# they ran before, except head dim 128's causal one up to 512 rows, which now takes this
# rule's set (the persistent set it had ran with longest_first: heads fastest, session 35's
# L2-hostile order); neither GQA case is timed with pair_tiles yet.
# Session 37 (results/2026-12-07-h100-s37/call1, H100, same sweep): the paired set with the
# row's options (fold_scale; longest_first does nothing with it) against configs.py's choice:
# head dim 128 causal at 1k 0.181 -> 0.168 ms, 2k 0.294 -> 0.275 (1.07x each); head dim 64
# causal at 4k 0.709 (exp2_fma) -> 0.687 (1.03x; with exp2_fma too 0.690). GQA, 8 query heads
# per KV head: head dim 128 causal at 256 rows ties (0.075 -> 0.074 with fold_scale), head dim
# 64 causal at 128 rows pack_heads with pair_tiles ties pack_heads alone (0.075): unchanged.
# Call 3: head dim 128 non-causal at 512, configs.py's persistent grid 0.155 -> 0.145 ms
# (1.071x) with FA3's paired set (pair_tiles here only keeps a head's tiles adjacent), the
# row's fold_scale and exp2_fma (without exp2_fma 0.149, without both 0.150, exp2_fma without
# fold_scale 0.155): taken, one sweep, not yet benched. The GQA rule keeps its set. Not taken:
# head dim 256 causal paired 0.925x / 0.943x the row at 1k / 4k; three consumers paired at head
# dim 64 causal 0.409 / 0.640 against 0.226 / 0.368 ms at 1k / 2k; head dim 64 causal 1k / 2k
# and non-causal 2k / 4k: configs.py's choice within 1.7% of the best.
# Session 39 (results/2026-12-07-h200-s39, H200, after the element rule's extent, 431c178):
# the paired set with the row's fold_scale against the rules without it, causal: head dim 64 at
# 512 0.140 -> 0.139 ms, 1k 0.218 -> 0.215; head dim 128 at 512 0.106 -> 0.104 (1.007-1.026x;
# fold_scale takes 64 FMULs a thread out of each key step, SASS offline): the paired causal rules
# keep it (one rule per head dim). Head dim 64 non-causal at 4k, three consumers: named_free
# 1.278 -> 1.251 ms (1.021x; H100 s31 1.006x): taken for the rule's whole range.
_FA3_PERSISTENT = ("persistent", "async_store", "prefetch_q")
_FA3_PAIRED = (*_FA3_PERSISTENT, "pair_tiles")
_FA3_PACKED = (*_FA3_PERSISTENT, "pack_heads")
MOSAIC_FORWARD: dict[int, MosaicForward] = {
    64: MosaicForward(
        64,
        128,
        2,
        early_next_k=True,
        options=("longest_first", "fold_scale"),
        rules=(
            CallRule(  # (the row's longest_first, timed with it, does nothing with pair_tiles)
                causal=True, max_rows=4096, drop=("longest_first",), options=_FA3_PAIRED
            ),
            CallRule(causal=True, min_rows=4097, options=("exp2_fma",)),
            CallRule(
                causal=True,
                max_rows=128,
                min_group=2,
                # (pair_tiles with pack_heads: bitwise on CPU, compiles for the H200 with no
                # spills, not yet run or timed on a GPU)
                drop=("longest_first", "fold_scale", "pair_tiles"),
                options=("pack_heads",),
            ),
            CallRule(
                causal=False,
                max_rows=1024,
                drop=("longest_first", "fold_scale"),
                options=_FA3_PERSISTENT,
            ),
            CallRule(
                causal=False,
                min_rows=1025,
                max_rows=4095,
                drop=("longest_first", "fold_scale"),
                options=(*_FA3_PERSISTENT, "named_free"),
            ),
            CallRule(
                causal=False,
                min_rows=4096,
                consumers=3,
                options=("overlap_qk", "no_auto_barriers", "named_free"),
            ),
        ),
    ),
    128: MosaicForward(
        64,
        128,
        2,
        options=("longest_first", "fold_scale"),
        rules=(
            CallRule(causal=False, options=("overlap_qk",)),
            CallRule(
                causal=False,
                max_rows=512,
                drop=("longest_first", "overlap_qk"),
                options=(*_FA3_PAIRED, "exp2_fma"),
            ),
            CallRule(
                causal=True,
                min_rows=4096,
                max_rows=8192,
                options=("overlap_qk", "no_auto_barriers"),
            ),
            CallRule(causal=True, max_rows=2048, drop=("longest_first",), options=_FA3_PAIRED),
            CallRule(  # (its GPU-run set: the non-causal <= 512 rule's before session 37, packed)
                causal=False,
                max_rows=512,
                min_group=2,
                drop=("fold_scale", "pair_tiles", "exp2_fma"),
                options=_FA3_PACKED,
            ),
            CallRule(
                causal=True,
                min_rows=1024,
                max_rows=1024,
                min_group=2,
                # (pair_tiles, from the rule above, is not timed with pack_heads at head dim 128)
                drop=("longest_first", "fold_scale", "pair_tiles"),
                options=_FA3_PACKED,
            ),
        ),
    ),
    192: MosaicForward(64, 128, 1, options=("longest_first", "no_auto_barriers", "no_pingpong")),
    256: MosaicForward(64, 128, 1, options=("longest_first", "no_auto_barriers", "no_pingpong")),
}


@dataclasses.dataclass(frozen=True)
class MosaicBackward:
    """One row of MOSAIC_BACKWARD: the tiles of mosaic.backward.BackwardConfig, the on/off
    options (mosaic.backward.OPTIONS) that are on, setmaxnreg's (consumer, producer) registers
    (None: the kernel's default), and the rules for calls that differ (options and registers
    only: the backward's tiles, which a block mask must be made of, are the row's for every
    call)."""

    rows: int  # per consumer warpgroup
    cols: int  # per streamed step
    stages: int
    options: tuple[str, ...] = ()
    registers: tuple[int, int] | None = None
    rules: tuple[CallRule, ...] = ()

    def __post_init__(self):
        if any(rule.consumers for rule in self.rules):
            raise ValueError("MosaicBackward: a rule cannot change the backward's consumers")
        if any(rule.min_group > 1 for rule in self.rules):
            raise ValueError("MosaicBackward: the backward's rules cannot name a GQA group")


# The backward's two kernels: (rows per consumer, columns per step, stages), the same for both
# (dK/dV: rows of keys, columns of queries; dQ: the other way round). Each consumer keeps its own
# rows (K and V, or Q and dO) in shared memory beside the streamed ring: at head dims 192/256 two
# stages would need 256 KiB of the 227, so only one fits (no ping-pong; columns cannot shrink
# below 64, wgmma's contraction dim).
# `options`: the backward's on/off options that are on (mosaic.backward.OPTIONS). Swept
# interleaved on the H200 (benchmarks/results/2026-11-30-h200-s7/bwd, T = 8k, ms non-causal /
# causal, no options -> chosen): head dim 128 6.249 / 3.416 -> 6.020 / 3.388; 64 8.326 / 4.342
# -> 7.785 / 4.241. early_dp and overlap_dv with the ping-pong on were 8-20% slower than none.
# no_auto_barriers on top at 128 (results/2026-11-30-h200-s7/short): 6.181 / 3.331 -> 6.012 /
# 3.304. `registers`: FA3's (240, 24) timed 1.05-1.08x the default (232, 40) at head dim 128,
# T = 4k non-causal, and 1.14x for the 5-GEMM kernel, which spills at both
# (results/2026-12-03-h200-s18/call8-10: sequential runs at one shape). Interleaved
# (results/2026-12-03-h200-s20/call1; correct on the GPU) it was 0.93-0.99x at head dim 128
# (4k, 8k, causal and not) and 0.998-1.015x at 64: not set. (The forward's, per CallRule:
# 0.92-1.07x at 512-16k with no pattern, s20/call2: not set either.)
# `longest_first` (a head's tiles adjacent, reversed: backward.BackwardConfig), swept interleaved
# with session 20's batched timer (results/2026-12-03-h200-s21/call4-tune-bwd and
# call5-tune-bwd-long; ms without -> with): head dim 64 at 2k 2.164 -> 1.803 non-causal, 1.245
# -> 1.108 causal; 8k 7.215 -> 6.436, 3.665 -> 3.515; 16k 13.607 -> 12.617, 6.903 -> 6.634. 128
# at 512 0.550 -> 0.530, 0.445 -> 0.428; 2k 1.749 -> 1.615, 1.006 -> 1.003; 8k 5.740 -> 5.649,
# 3.275 -> 3.117. On at both.
# `late_stats` (the step's logsumexp and delta read where used; session 22, offline fewer
# spills) swept interleaved at head dim 128, 4k (results/2026-12-03-h200-s23/call1; ms without
# -> with): causal 1.651 -> 1.538 (1.07x), non-causal 2.611 -> 2.975 (0.88x); causal at 1k
# 0.595 -> 0.572, 8k 3.050 -> 2.973, 16k 5.825 -> 5.432 (call2). A causal rule. In the same
# sweeps the 5-GEMM kernel with split_dq and late_stats against the two kernels, non-causal: 1k
# 0.88x, 4k 0.89x, 8k 1.00x (5.606 vs 5.599), 16k 1.03x (10.783 vs 11.117): a rule from 16k.
# `dq_first` (the 5-GEMM kernel's dQ part issued before dK), swept interleaved at head dim 64
# (results/2026-12-04-h200-s24/call1-2; ms without -> with): non-causal 1k 1.025 -> 1.022, 4k
# 3.444 -> 3.341, 16k 13.236 -> 13.056; causal 1k 0.715 -> 0.709, 4k 1.925 -> 1.939, 16k 6.785
# -> 6.687: on. At head dim 128 the 5-GEMM kernel with it is 0.945x the two kernels at 4k and
# 0.985x without it at 16k (10.906 -> 11.069): off.
# `double_ds` (two slots for the pooled dS^T and dQ part tiles) on the 16k rule, swept
# interleaved on the H100 at head dim 128, 16k, non-causal (`tune_mosaic.py OUT 128 --only bwd
# --seq 16384 --causal no --with double_ds --registers 240,24`; ms, the rule -> with it):
# results/2026-12-06-h100-s32 (call7) 10.674 -> 10.589 (1.008x); results/2026-12-06-h100-s33 (call2)
# 10.921 -> 10.509 (1.039x; 10.571 at 240/24; without longest_first 11.0). At causal 4k the
# 5-GEMM kernel with it is level with the two kernels or behind (1.681 vs 1.652 ms, call2).
_FIVE_GEMM = ("fused_dq", "pooled_dq", "split_dq")
_OVERLAPPED_BWD = ("early_dp", "overlap_dv", "no_pingpong", "no_auto_barriers")
MOSAIC_BACKWARD: dict[int, MosaicBackward] = {
    64: MosaicBackward(
        64, 64, 3, ("fused_dq", "pooled_dq", "longest_first", "dq_first", *_OVERLAPPED_BWD)
    ),
    128: MosaicBackward(
        64,
        64,
        2,
        ("longest_first", *_OVERLAPPED_BWD),
        rules=(
            CallRule(causal=True, options=("late_stats",)),
            CallRule(
                causal=False, min_rows=16384, options=(*_FIVE_GEMM, "late_stats", "double_ds")
            ),
        ),
    ),
    192: MosaicBackward(64, 64, 1),
    # FA3's head-dim split (`split_head`: the consumers share a CTA's 64 rows, each holding half
    # the head dim of dK/dV or dQ), which makes two stages fit, with FA3's (240, 24) registers.
    # Swept interleaved on the H200 in session 28 (T = 4k, bf16, `device_call_tune.sh`
    # SWEEPS="256:bwd:4096:tiles:split_head" REGISTERS=240,24 at 0119972; its logs were lost
    # with that session, the numbers are from its notes; re-measured in session 29's bench):
    # non-causal 9.918 ms (one stage, no split) -> 4.016 ms (342 TFLOP/s, with early_dp,
    # no_auto_barriers and late_stats on top) / 339 TFLOP/s (these options), causal 5.999 ->
    # 2.258 ms (304 TFLOP/s, these options; the best). The Triton backward reached 195-234.
    256: MosaicBackward(64, 64, 2, ("split_head", "longest_first"), registers=(240, 24)),
}
# Head dims whose backward the "mosaic" backend hands to the Triton kernels (same residuals: out
# and the natural-log lse). Measured on the H200 (benchmarks/results/2026-11-30-h200-mosaic:
# the standard sweep's bwd TFLOP/s, Mosaic vs Triton, at (64, 64, 2) tiles: head dim 128
# 322-406 vs 325-364, Mosaic's; 64: 256-306 vs 283-313; 256, one stage: 125-141 vs 195-234;
# the sweep's best D=64 tiles (64, 64, 3) reach 300 / 291, about Triton's). The single-kernel
# backward (BackwardConfig.fused_dq) measured 0.89-0.92x of the two kernels at head dim 128 and
# 0.97-1.02x at 64, and does not fit shared memory at 256 (benchmarks/results/2026-11-30-h200-s6);
# it stays off. Head dim 64 moved to Mosaic in session 7: with the options above 353 / 324
# TFLOP/s at T = 8k against Triton's 319 / 300 in the standard bench of the same session
# (benchmarks/results/2026-11-30-h200-s7/call1). Session 8 (benchmarks/results/2026-11-30-h200-s8/
# bwd, T = 8k): at head dim 64 the single kernel with pooled dQ parts (fused_dq + pooled_dq +
# no_auto_barriers) ties the two kernels non-causal (7.51 vs 7.51 ms) and wins causal (3.93 vs
# 4.20 ms), so it is head dim 64's default (deterministic=True drops fused_dq: two kernels); at
# head dim 128 it is 1.55x slower and fused_dq alone 1.17x slower, and one_body 1-6% slower.
# Head dim 256 moved to Mosaic in session 28 (split_head, above); 192 cannot split (halves of
# 96 columns are not whole 64-column rows) and stays on Triton.
MOSAIC_BACKWARD_ON_TRITON: frozenset[int] = frozenset({192})
MOSAIC_HEAD_DIM_MULTIPLE = 64  # wgmma tiles the head dim in 64-element (128-byte) swizzled rows

# The pure-XLA chunked path (flashjax/backends/chunked.py): the largest tile, queries and keys, of
# its loops; its per-step scores are (G, 512, 512). 512 amortizes the loop on CPU (not tuned).
CHUNKED_BLOCK = 512

# A full (T, S) bias is read as float32 tiles as large as the score tile: with 3 pipeline stages the
# forward at head dim 64 asked for 241 KiB of shared memory on the H200 (limit 227 KiB). Stages are
# cut until this estimate of the streamed tiles fits.
SHARED_MEMORY_BUDGET = 192 * 1024
# Shared memory a Mosaic GPU kernel's CTA may take on the H100/H200 (Mosaic's max_smem_bytes,
# the devices' opt-in limit, 227 KiB); `mosaic.pipeline.smem_bytes` counts a kernel's scratch as
# Mosaic allocates it.
MOSAIC_SHARED_MEMORY = 227 * 1024


def stages_that_fit(c: KernelConfig, head_dim: int, itemsize: int, full_bias: bool) -> int:
    """Pipeline stages for `c` such that the streamed tiles of one stage (two (block, head_dim)
    operand tiles, plus a float32 bias tile) times the stages fit `SHARED_MEMORY_BUDGET`."""
    per_stage = 2 * max(c.block_q, c.block_k) * head_dim * itemsize
    if full_bias:
        per_stage += c.block_q * c.block_k * 4
    return max(1, min(c.num_stages, SHARED_MEMORY_BUDGET // per_stage))


MIN_BLOCK = 16  # Triton's dot needs every tile dimension >= 16.


def head_dim_bucket(head_dim: int) -> int:
    """The padded head dim the kernels run at: the next power of two, at least 16."""
    return max(MIN_BLOCK, 1 << (head_dim - 1).bit_length())


def gpu_target(device: jax.Device | None = None) -> str:
    """'sm90' on Hopper, 'sm80' on other NVIDIA GPUs, 'interpret' elsewhere."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return "interpret"
    capability = getattr(device, "compute_capability", "8.0")
    return "sm90" if capability.startswith("9") else "sm80"


def get_config(head_dim: int, target: str) -> AttentionConfig:
    """The config for a head dim on a target (see `gpu_target`)."""
    if target == "interpret":
        return _INTERPRET
    return _TABLE[(target, head_dim_bucket(head_dim))]


def fit_block(block: int, length: int) -> int:
    """Shrink a tile to the sequence when the sequence is shorter (keeps powers of two, >= 16)."""
    return max(MIN_BLOCK, min(block, 1 << max(0, (length - 1).bit_length())))


# --------------------------------------------------------------------------------------------------
# Split-KV decoding (pallas_kernels/triton/decode.py)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles and the split rule of the decode kernel.

    Attributes:
      block_k: keys per step of a program's walk (the packed query rows are the other tile side).
      paged_block_k: the same for a paged cache (its blocks are gathered from pages, or sliced
        from one page when pages are as large).
      unsplit_block_k: the same for a contiguous cache when the call runs one split (batch x KV
        heads fill the cores' waves), if it differs (None: block_k).
      num_warps, num_stages: Triton launch parameters.
      waves: `num_splits=None` asks for at most `waves * cores` programs in all (a partial last
        wave would take as long as a full one) ...
      paged_waves: ... `paged_waves * cores` for a paged cache (its gathers wait longer: more
        programs in flight hide it);
      paged_overfull_splits: ... and, for a paged cache whose batch x KV heads alone are more
        than `paged_waves` waves, this many;
      min_blocks: ... and at least this many key blocks of the cache's capacity per split.
      merge_warps, merge_columns: the merge kernel's warps, and head-dim columns per program
        (None: all; fewer: more programs, each loading less). One warp and 16 columns won the
        H200 sweep at head dim 128 (`benchmarks/merge_ab.py --sweep`: 1 x 64k 68.15 us a step,
        1 x 8k 10.75 us, against 68.85 / 11.66 with 4 warps and all 128 columns and 69.46 /
        12.49 with XLA's merge; results/2026-12-02-h200-s17/call4).
    Measured on the H200 (benchmarks/results/2026-11-30-h200-s6/decode_tune: 32 query / 8 KV
    heads, head dim 128, bf16): one wave (16 splits) 18.3 us at 1 x 8k and 76.4 us at 1 x 64k
    against two waves' (33 splits) 24.1 and 86.6 us; paged (16-key pages) 1 x 64k two waves
    87.4 us with 64-key blocks, 97.0 us with 128-key blocks, one wave 93.4 us. Paged caches at
    512 programs in all run slow: 64 x 4k (512 programs a split) takes 320 us in one split and
    282 us in two (16-key pages; 64-key: 315 / 278 us; contiguous 268 us), 32 x 8k (256) 277 us
    in one split, 318 us in two, 279 us in four (results/2026-11-30-h200-s9: s9, call4, decode).
    Paged, three waves (48 splits) against two (33): 1 x 64k 82.9 / 86.2 us (16-key pages), 80.9
    / 85.4 us (64-key); 1 x 8k 20.5 / 21.6 us (16-key), 22.1 / 21.8 us (64-key)
    (results/2026-12-02-h200-s14/tune_decode). Those paged rules made up for page ids read in
    each block's own step; with them read a block ahead (in the walk's loop carry), a paged cache
    at head dim 128 on sm90 runs the contiguous plan (128-key blocks, one wave): 1 x 8k 18.6 us
    against 21.2 with the three-wave rule (contiguous 17.8), 1 x 64k 76.5 against 78.3 (74.3),
    and paged within 1.02-1.07x of contiguous at every bench shape (results/2026-12-02-h200-s16).
    """

    block_k: int
    num_warps: int
    num_stages: int
    paged_block_k: int = 64
    unsplit_block_k: int | None = None
    waves: int = 1
    paged_waves: int = 2
    paged_overfull_splits: int = 2
    min_blocks: int = 2
    merge_warps: int = 1
    merge_columns: int | None = 16


D = DecodeConfig

# One step reads block_k x head_dim of K and of V; 128 x 128 bf16 is 32 KiB each, so 3 stages fit
# Hopper's shared memory at head dim <= 128, 2 at 256 with 64-key blocks. The sm90 head dim 128
# entry won the H200 sweep (benchmarks/tune_decode.py; results/2026-11-30-h200-s6/decode_tune:
# block_k 64/128/256 x (4 warps, 3 stages)/(8, 2), at 1 x 8k and 1 x 64k); the other entries
# follow it by shared memory (not swept), except head dim 64's one-split walk: on GPT-2 small's
# decode step (12 query / 12 KV heads, 2k keys) 64-key blocks won at batch 32 (one split: 59.5 us
# against 68.5 us with 128-key blocks) and lost at batch 1 (8 or 11 splits: 13.7 us against
# 12.2 us; results/2026-11-30-h200-s8/tune_decode_gpt2); sm80 is not measured.
_DECODE_TABLE: dict[tuple[str, int], DecodeConfig] = {
    ("sm90", 16): D(128, 4, 3),
    ("sm90", 32): D(128, 4, 3),
    ("sm90", 64): D(128, 4, 3, unsplit_block_k=64),
    ("sm90", 128): D(128, 4, 3, paged_block_k=128, paged_waves=1, paged_overfull_splits=1),
    ("sm90", 256): D(64, 4, 2),
    ("sm80", 16): D(128, 4, 2),
    ("sm80", 32): D(128, 4, 2),
    ("sm80", 64): D(128, 4, 2),
    ("sm80", 128): D(64, 4, 2),
    ("sm80", 256): D(32, 4, 2),
}
# Interpret mode: small blocks and few "cores", so that tests at small shapes cross several key
# blocks and several splits.
_DECODE_INTERPRET = D(
    16, 4, 1, paged_block_k=16, waves=1, paged_waves=1, paged_overfull_splits=1, min_blocks=1
)
INTERPRET_CORES = 4
# Streaming multiprocessors when the device does not say (an H100 / H200 has 132).
DEFAULT_CORES = 132
# A decode step: at most this many new tokens (speculative decoding drafts a few), and at most
# this many query rows (new tokens x query heads per KV head) for one decode program to pack;
# beyond either, the training kernels serve the call.
DECODE_MAX_QUERIES = 16
DECODE_MAX_ROWS = 64
MAX_SPLITS = 256


def get_decode_config(head_dim: int, target: str) -> DecodeConfig:
    """The decode kernel's config for a head dim on a target (see `gpu_target`)."""
    if target == "interpret":
        return _DECODE_INTERPRET
    return _DECODE_TABLE[(target, head_dim_bucket(head_dim))]


def decode_stages(config: DecodeConfig, block_k: int, head_dim: int, itemsize: int) -> int:
    """Pipeline stages of the decode kernel such that its streamed K and V tiles fit
    `SHARED_MEMORY_BUDGET` (float32 at head dim 256 gets 1)."""
    per_stage = 2 * block_k * head_dim * itemsize
    return max(1, min(config.num_stages, SHARED_MEMORY_BUDGET // per_stage))


def core_count(device: jax.Device | None = None) -> int:
    """Streaming multiprocessors of the device (`INTERPRET_CORES` off-GPU)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return INTERPRET_CORES
    return int(getattr(device, "core_count", 0) or DEFAULT_CORES)


def decode_splits(
    programs: int, key_blocks: int, cores: int, config: DecodeConfig, paged: bool = False
) -> int:
    """How many parts to cut the keys into when the caller does not say (`num_splits=None`).

    `programs` is the number of programs one split launches (batch x KV heads), `key_blocks` the
    cache's capacity in key blocks. Splits are added while the programs fit `config.waves` waves
    of the cores (`paged_waves` for a paged cache, `paged_overfull_splits` past them), as long as
    each split keeps `config.min_blocks` blocks (Flash-Decoding's rule: parallelism over the keys
    only where batch x heads leave cores idle).
    """
    waves = config.paged_waves if paged else config.waves
    wanted = cores * waves // max(1, programs)
    if paged and wanted == 0:
        wanted = config.paged_overfull_splits
    most = max(1, key_blocks // config.min_blocks)
    return max(1, min(wanted, most, MAX_SPLITS))
