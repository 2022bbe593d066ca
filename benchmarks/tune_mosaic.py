"""Tile and schedule sweep for the Mosaic GPU kernels (pallas_kernels/mosaic) on the H200: times the
forward (`api.forward`) and the backward (`api.backward`: dK/dV + dQ kernels and their XLA prologue)
for candidate configs at one standard shape per head dim (bf16, B*T = 16k tokens, N*H = 2048),
causal and not, checks each candidate's output against the first's, times the candidates
interleaved over rounds (one block per candidate drifted by up to 12% on the H200), and prints the
fastest.
Usage on the GPU: python benchmarks/tune_mosaic.py OUT_JSON [HEAD_DIM ...] [--tiles] [--toggles]
[--only fwd|bwd] [--seq T] [--causal yes|no] [--retile Q:KV:ST] [--registers C,P] [--group G]
[--fma-columns N,...]
(default head dims 64 128 256; without --tiles only configs.py's tiles with each schedule option;
--retile: every forward candidate also with those tiles, its options kept; --registers: every
candidate of both kernels also with that setmaxnreg split, e.g. FA3's 240,24; --fma-columns:
every forward candidate with exp2_fma also with each of these column counts, e.g. 16,24)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
from tune import interleaved, operands, timeit

from pallas_kernels.mosaic import api
from pallas_kernels.mosaic.backward import OPTIONS as BWD_OPTIONS
from pallas_kernels.mosaic.backward import BackwardConfig
from pallas_kernels.mosaic.backward import with_options as bwd_with_options
from pallas_kernels.mosaic.forward import EXCLUSIVE, OPTIONS, ForwardConfig, with_options
from pallas_kernels.mosaic.pipeline import options_on

SEQ = 8192
# (block_q, block_kv, stages) per head dim; shared memory: Q 2 x block_q x D plus K and V
# stages x block_kv x D, bf16, within 227 KiB.
FWD_TILES = {
    # 64-key tiles (session 9): a causal CTA at 1k walks 4.5 tiles of 128 on average, its
    # diagonal tile half masked; 64-key tiles halve that waste.
    64: [(64, 128, 2), (64, 128, 3), (64, 128, 4), (64, 256, 2), (64, 64, 3), (64, 64, 4)],
    128: [(64, 128, 2), (64, 128, 3), (64, 64, 3), (64, 64, 4)],
    256: [(64, 64, 2), (64, 128, 1)],
}
FLAGS = list(itertools.product((False, True), repeat=2))  # (early_next_k, pinned_order)
# ForwardConfig's schedule options, alone and in the combinations most likely to add up.
SCHEDULES = [
    (),
    ("longest_first",),
    ("no_auto_barriers",),
    ("persistent",),
    # Session 22: `named_barriers` emitted no barrier before (so these ran without a
    # ping-pong, as `no_pingpong` now does); since its fix they run FA3's.
    ("no_pingpong",),
    ("named_barriers",),
    ("no_auto_barriers", "named_barriers"),
    ("no_auto_barriers", "named_barriers", "persistent"),
    ("no_auto_barriers", "named_barriers", "longest_first"),
    # Session 8: the defaults at head dims 64 and 128 with FA4's conditional rescaling (new, not
    # yet run on a GPU) and with the persistent grid (short sequences).
    ("longest_first", "fold_scale", "lazy_rescale"),
    ("longest_first", "fold_scale", "persistent"),
    ("longest_first", "fold_scale", "lazy_rescale", "persistent"),
    # Session 9: the epilogue's stores awaited until read only, and the producer prefetching Q
    # (new, not yet run on a GPU), with the defaults and with the persistent grid (its next
    # tile's Q waits on that store).
    ("longest_first", "fold_scale", "async_store"),
    ("longest_first", "fold_scale", "async_store", "persistent"),
    ("longest_first", "fold_scale", "async_store", "persistent", "prefetch_q"),
    # Session 11: FA3's intra-warpgroup overlap, with the defaults, without automatic barriers,
    # and persistent (head dim 64's causal default, less prefetch_q: forward.EXCLUSIVE).
    ("longest_first", "fold_scale", "overlap_qk"),
    ("longest_first", "fold_scale", "overlap_qk", "no_auto_barriers"),
    ("longest_first", "fold_scale", "overlap_qk", "named_barriers"),  # + FA3's ping-pong
    ("longest_first", "fold_scale", "overlap_qk", "named_barriers", "no_auto_barriers"),
    ("longest_first", "fold_scale", "overlap_qk", "async_store", "persistent"),
    # Session 20: FA3's persistent set without the defaults (ncu at head dim 64, 1k, non-causal:
    # 347.6 us against the configured 377.2; session 13's sweep had the set with the defaults
    # level with the plain grid, and the persistent grid alone 7% faster).
    ("async_store", "persistent", "prefetch_q"),
    # Session 21: GQA packing by consumer (sweep with --group G), with the defaults and with
    # FA3's persistent set (session 22: GQA rules in configs.py).
    ("longest_first", "fold_scale", "pack_heads"),
    ("async_store", "persistent", "prefetch_q", "pack_heads"),
    # Session 21: K/V slots released on hardware named barriers (tokamax's consumed barriers),
    # with the defaults, FA3's persistent set, the overlap and the ping-pong (session 22: its
    # barriers had never been emitted; session 23: runs, not yet timed).
    ("longest_first", "fold_scale", "named_free"),
    ("async_store", "persistent", "prefetch_q", "named_free"),
    ("longest_first", "fold_scale", "overlap_qk", "named_free"),
    ("longest_first", "fold_scale", "overlap_qk", "named_barriers", "named_free"),
    # Session 23: FA4's exp2 emulation for part of each tile (new, not yet timed; for head dim
    # 64, where MUFU binds), with the defaults, FA3's persistent set and the overlap.
    ("longest_first", "fold_scale", "exp2_fma"),
    ("async_store", "persistent", "prefetch_q", "exp2_fma"),
    ("longest_first", "fold_scale", "overlap_qk", "exp2_fma"),
    # Session 31: named_free with FA3's persistent set was the best at head dim 64 non-causal 2k
    # on the H100 (session 29, 1.051x configs.py); with exp2_fma (1.06x on that set there), with
    # the row's options, without prefetch_q, and without automatic barriers.
    ("async_store", "persistent", "prefetch_q", "named_free", "exp2_fma"),
    ("longest_first", "fold_scale", "async_store", "persistent", "prefetch_q", "named_free"),
    ("async_store", "persistent", "named_free"),
    ("async_store", "persistent", "prefetch_q", "named_free", "no_auto_barriers"),
    # Session 35: the persistent loop over pairs of one head's tiles (balanced under a causal
    # mask, a head's K/V shared in L2; new, not yet timed), alone, with FA3's persistent set and
    # with the row's options (longest_first orders the unpaired loop only).
    ("persistent", "pair_tiles"),
    ("async_store", "persistent", "prefetch_q", "pair_tiles"),
    ("longest_first", "fold_scale", "async_store", "persistent", "prefetch_q", "pair_tiles"),
    # Session 36: pair_tiles won at 512-2k causal (1.10-1.22x configs.py, H100); with exp2_fma
    # (head dim 64's causal rule past 1k), both, named_free, and overlap_qk (head dim 128's
    # causal rule at 4k-8k; it excludes prefetch_q), and with GQA packing.
    ("async_store", "persistent", "prefetch_q", "pair_tiles", "exp2_fma"),
    ("fold_scale", "async_store", "persistent", "prefetch_q", "pair_tiles", "exp2_fma"),
    ("async_store", "persistent", "prefetch_q", "pair_tiles", "named_free"),
    ("overlap_qk", "async_store", "persistent", "pair_tiles"),
    ("overlap_qk", "no_auto_barriers", "async_store", "persistent", "pair_tiles"),
    ("async_store", "persistent", "prefetch_q", "pack_heads", "pair_tiles"),  # with --group G
    # Session 37: head dim 256's row (one stage, no ping-pong; prefetch_q excludes no_pingpong)
    # paired, with and without the epilogue's async store (lost: 0.88-0.94x the row, s37 call3).
    ("no_auto_barriers", "no_pingpong", "persistent", "pair_tiles"),
    ("no_auto_barriers", "no_pingpong", "async_store", "persistent", "pair_tiles"),
    # Session 38: head dim 64's non-causal rules (512-4k rows) with fold_scale, which they drop
    # (never timed without the row's longest_first: the persistent loop's heads-fastest order).
    # Offline SASS at 2k: the key loop 500 -> 438 instructions (62 FMULs fewer, a per-logit
    # scale), tokamax's 444; not yet timed (`--with fold_scale+persistent`).
    ("fold_scale", "async_store", "persistent", "prefetch_q"),
    ("fold_scale", "async_store", "persistent", "prefetch_q", "named_free"),
]
assert all(name in OPTIONS for combo in SCHEDULES for name in combo)
# Session 11: three consumer warpgroups at head dim 64 (FA3's 192-row tiles; new, not yet run on
# a GPU), swept when no option or `--with consumers` is named, else those with the option.
THREE_CONSUMERS = [
    ("longest_first", "fold_scale"),
    ("longest_first", "fold_scale", "overlap_qk"),
    ("longest_first", "fold_scale", "overlap_qk", "no_auto_barriers"),
    ("longest_first", "fold_scale", "persistent", "async_store", "prefetch_q"),
    ("longest_first", "fold_scale", "overlap_qk", "no_auto_barriers", "exp2_fma"),  # session 23
    ("longest_first", "fold_scale", "overlap_qk", "no_auto_barriers", "named_free"),  # session 31
    ("async_store", "persistent", "prefetch_q", "named_free"),  # session 31
    # Session 37: FA3's set paired (pair_tiles won the two-consumer causal forward to 4k; no
    # spill at 128 registers offline), with the row's fold_scale (lost: 1.7-1.9x slower at D64
    # causal 1k-2k, s37 call3).
    ("async_store", "persistent", "prefetch_q", "pair_tiles"),
    ("fold_scale", "async_store", "persistent", "prefetch_q", "pair_tiles"),
]
BWD_TILES = {
    64: [(64, 64, 2), (64, 64, 3), (64, 128, 2)],
    # (64, 128, 2): session 29, for split_head (no spill offline; 192 KiB of shared memory)
    128: [(64, 64, 2), (64, 64, 3), (64, 128, 1), (64, 128, 2)],
    # two stages fit in shared memory with split_head only; (64, 128, 1) with it spills 1,060
    # bytes in dK/dV and 248 in dQ offline (session 29): not swept
    256: [(64, 64, 1), (64, 64, 2)],
}


def _having(combos: list[tuple[str, ...]], option: str | None) -> list[tuple[str, ...]]:
    """The option sets that include `option` (`a+b`: each of them; all sets when None)."""
    wanted = set(option.split("+")) if option else set()
    return [c for c in combos if wanted <= set(c)]


def forward_candidates(
    head_dim: int,
    tiles: bool,
    toggles: bool,
    option: str | None = None,
    rows: int | None = None,
    causal: bool = False,
    retile: tuple[int, int, int] | None = None,
    group: int = 1,
) -> list[ForwardConfig]:
    """configs.py's choice for a call of `rows` query rows (first), then the head dim's plain
    row (no rules) alone where that differs, and with the options of SCHEDULES (those with
    `option` only, when given); with `toggles`, instead the choice with each flag of OPTIONS
    flipped, one at a time; with `tiles`, the tile x flag grid too; with `retile` (block_q,
    block_kv, stages), each of those again with these tiles."""
    chosen = api.forward_config(head_dim, rows, causal, group)
    plain = api.forward_config(head_dim)
    if toggles:  # (the pairs of EXCLUSIVE raise: ForwardConfig)
        on = set(options_on(chosen, OPTIONS))
        flips = [on ^ {name} for name in OPTIONS]
        variants = [
            with_options(chosen, f) for f in flips if not any(set(p) <= f for p in EXCLUSIVE)
        ]
    else:
        variants = [with_options(plain, s) for s in _having(SCHEDULES, option)]
    grid = [
        ForwardConfig(block_q=q, block_kv=kv, stages=st, early_next_k=e, pinned_order=p)
        for (q, kv, st), (e, p) in itertools.product(FWD_TILES[head_dim], FLAGS)
    ]
    if head_dim == 64:  # every three-consumer set, or (with another option) those with it
        three = (
            THREE_CONSUMERS if option in (None, "consumers") else _having(THREE_CONSUMERS, option)
        )
        variants += [dataclasses.replace(with_options(plain, s), consumers=3) for s in three]
    if plain != chosen:  # a rule's choice against the row's own
        variants.insert(0, plain)
    candidates = [chosen] + variants
    if retile:
        q, kv, st = retile
        candidates = again(candidates, block_q=q, block_kv=kv, stages=st)
    return candidates + (grid if tiles else [])


def again(candidates: list, **fields) -> list:
    """The candidates, then each once more with `fields` replaced (those it changes)."""
    changed = [dataclasses.replace(c, **fields) for c in candidates]
    return list(dict.fromkeys(candidates + changed))


# The backward's option sets swept (backward.OPTIONS). Session 7 (results/2026-11-30-h200-s7/bwd):
# the overlapped orders are 8-20% slower with the consumers' ping-pong, so they run without it.
# Session 8 (results/2026-11-30-h200-s8/bwd, T = 8k): at head dim 64 the single kernel with
# pooled dQ parts won (now the default there), at 128 it lost by 15-35% and one_body by 1-6%;
# at 16k the causal head dim 128 backward drops (423 TFLOP/s against 479 at 8k), so
# longest_first (the dQ kernel's heaviest query tiles first) is swept with each. split_dq (the
# pooled dQ part's head dim shared by the consumers: a 64 x 64 float32 accumulator each at head
# dim 128, not 64 x 128) is new in session 8, not yet run on a GPU.
_ORDER = ("early_dp", "overlap_dv", "no_pingpong")  # the overlapped orders, no ping-pong
_NAB = (*_ORDER, "no_auto_barriers")
_POOLED = ("fused_dq", "pooled_dq")
BWD_SCHEDULES = [
    _ORDER,
    _NAB,
    (*_NAB, "longest_first"),
    (*_POOLED, *_NAB),
    (*_POOLED, *_NAB, "longest_first"),
    ("fused_dq", *_NAB),
    (*_POOLED, "split_dq", *_ORDER),
    # Session 21: longest_first is on at head dims 64 and 128 (1.02-1.20x, configs.py), so the
    # later variants carry it.
    (*_POOLED, "split_dq", *_NAB, "longest_first"),
    (*_NAB, "async_store", "longest_first"),  # async_store: session 9
    (*_POOLED, *_NAB, "async_store", "longest_first"),
    # Session 22: the step's logsumexp and delta read where used (new, not yet timed; offline
    # the 5-GEMM kernel at head dim 128 spills 20 bytes with it, 64 without).
    (*_NAB, "longest_first", "late_stats"),
    (*_POOLED, "split_dq", *_NAB, "longest_first", "late_stats"),
    # Session 23: the dQ part's matmul issued before dK and read while it runs (new, not yet
    # timed), on the 5-GEMM sets above.
    (*_POOLED, *_NAB, "longest_first", "dq_first"),
    (*_POOLED, "split_dq", *_NAB, "longest_first", "late_stats", "dq_first"),
    # Session 26: FA3's head-dim split of both kernels (new, not yet timed; head dims that are
    # multiples of 128; at 256 two stages fit only with it: BWD_TILES).
    # Session 32: two slots for the pooled dS^T and dQ part tiles (new, not yet timed), on
    # configs.py's 5-GEMM sets (head dim 64; 128's 16k rule).
    (*_POOLED, *_NAB, "longest_first", "dq_first", "double_ds"),
    (*_POOLED, "split_dq", *_NAB, "longest_first", "late_stats", "double_ds"),
    # Session 33: the same without longest_first (the key tiles fastest: the CTAs running at
    # once add their dQ parts into a few heads' rows, which stay in L2; with the heads fastest
    # they cover every head, and ncu had the 5-GEMM kernel at 86% of memory throughput).
    # Measured on the H100: 1.45x slower at D128 causal 4k, 1.05x at non-causal 16k (HOPPER_PLAN
    # 7y): the guess was wrong.
    (*_POOLED, "split_dq", *_NAB, "late_stats", "double_ds"),
    (*_POOLED, *_NAB, "dq_first", "double_ds"),
    ("split_head", "longest_first"),
    ("split_head", "early_dp", "no_auto_barriers", "longest_first"),
    ("split_head", "early_dp", "no_auto_barriers", "longest_first", "late_stats"),
    # Session 42: delta and the kernel logsumexp from the dQ kernel (no XLA pass before the two
    # kernels), where the 5-GEMM kernel pays XLA's delta, dQ memset and convert (head dim 64).
    (*_NAB, "longest_first", "row_stats"),
]
assert all(name in BWD_OPTIONS for combo in BWD_SCHEDULES for name in combo)


def backward_candidates(
    head_dim: int,
    tiles: bool,
    option: str | None = None,
    rows: int | None = None,
    causal: bool = False,
) -> list[BackwardConfig]:
    """configs.py's choice for a call of `rows` query rows (first), then the head dim's plain
    row (no rules) where that differs, then its tiles with each option set of BWD_SCHEDULES
    (those with `option` only, when given); with `tiles`, the tile grid with each option set
    too."""
    chosen = api.backward_config(head_dim, rows, causal)
    shapes = [(chosen.rows, chosen.cols, chosen.stages)]
    if tiles:
        shapes += [t for t in BWD_TILES[head_dim] if t not in shapes]
    sets = _having(BWD_SCHEDULES, option)
    if head_dim % (2 * 64):  # split_head's halves of the head dim: whole 64-column rows
        sets = [combo for combo in sets if "split_head" not in combo]
    candidates = [chosen, api.backward_config(head_dim)] + [
        bwd_with_options(BackwardConfig(rows=r, cols=c, stages=st), combo)
        for (r, c, st), combo in itertools.product(shapes, sets)
    ]
    return list(dict.fromkeys(candidates))  # each once


def label(cfg) -> str:
    """A config as the fields that differ from its class's defaults (on/off flags by name), so
    that a printed line names its options within its first hundred characters."""
    parts = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != f.default:
            parts.append(f.name if value is True else f"{f.name}={value}")
    return " ".join(parts) or "(defaults)"


def rel_err(a, b) -> float:
    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def sweep(
    head_dim: int,
    causal: bool,
    tiles: bool,
    toggles: bool,
    kinds: str,
    seq: int = SEQ,
    option: str | None = None,
    without: str | None = None,
    retile: tuple[int, int, int] | None = None,
    registers: tuple[int, int] | None = None,
    group: int = 1,
    fma_columns: tuple[int, ...] = (),
    also: str | None = None,
) -> list[dict]:
    """Every candidate (but those with the option `without` on, and those packing more query
    heads than the call's `group` allows) compiled and checked against the first of its kind,
    then timed with the candidates interleaved over rounds (benchmarks/tune.py
    `interleaved`)."""
    ops, do = operands(seq, head_dim, causal, group)
    flops = 4 * ops.batch * ops.num_heads * seq * seq * head_dim / (2 if causal else 1)
    rows, first, measures = [], {}, {}

    def prepare(kind, cfg, fn, n_flops):
        row = dict(H=head_dim, T=seq, causal=causal, kernel=kind, cfg=repr(cfg), flops=n_flops)
        row["label"] = label(cfg)
        try:
            result = jax.block_until_ready(fn())
            first.setdefault(kind, result)
            err = max(rel_err(a, b) for a, b in zip(result, first[kind]))
            row["status"] = "ok" if err < 2e-2 else f"WRONG (rel err {err:.2g})"
            measures[(kind, row["cfg"])] = lambda: timeit(fn, reps=5)
        except Exception as e:  # noqa: BLE001
            row["status"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
        print(f"  checked {kind} {row['label']}: {row['status']}", flush=True)  # a hang shows where

    def kept(candidates):
        candidates = again(candidates, registers=registers) if registers else candidates
        if also:  # the kernels whose configs have the option
            named = [c for c in candidates if hasattr(c, also)]
            candidates += [c for c in again(named, **{also: True}) if c not in candidates]
        return [
            cfg
            for cfg in candidates
            if not (without and getattr(cfg, without, False))
            and not (getattr(cfg, "pack_heads", False) and group % cfg.heads_per_tile())
        ]

    fwd = (
        forward_candidates(head_dim, tiles, toggles, option, seq, causal, retile, group)
        if "fwd" in kinds
        else []
    )
    for n in fma_columns:  # exp2_fma's candidates again with n columns
        fwd += [dataclasses.replace(c, fma_columns=n) for c in fwd if c.exp2_fma]
    for cfg in kept(list(dict.fromkeys(fwd))):
        fn = jax.jit(lambda ops, cfg=cfg: api.forward(ops, interpret=False, config=cfg))
        prepare("fwd", cfg, lambda fn=fn: fn(ops), flops)
    out, lse2 = api.forward(ops, interpret=False)
    bwd = backward_candidates(head_dim, tiles, option, seq, causal) if "bwd" in kinds else []
    for cfg in kept(bwd):
        fn = jax.jit(
            lambda ops, out, lse2, do, cfg=cfg: api.backward(
                ops, out, lse2, do, None, interpret=False, config=cfg
            )
        )
        prepare("bwd", cfg, lambda fn=fn: fn(ops, out, lse2, do), 2.5 * flops)
    best = interleaved(measures)
    for row in rows:
        t = best.get((row["kernel"], row["cfg"]), float("nan"))
        row["ms"] = t * 1e3
        row["tflops"] = row.pop("flops") / t / 1e12 if row["status"] == "ok" else None
        print(f"  {row['kernel']} {row['label']}: {row['ms']:.3f} ms {row['status']}", flush=True)
    return rows


def report(rows: list[dict], head_dim: int, causal: bool) -> None:
    """The fastest three of each kernel, as a ratio of configs.py's choice (each kind's first)."""
    for kind in ("fwd", "bwd"):
        mine = [r for r in rows if (r["H"], r["causal"], r["kernel"]) == (head_dim, causal, kind)]
        if not mine:
            continue
        base = mine[0]["ms"]
        ok = sorted((r for r in mine if r["status"] == "ok"), key=lambda r: r["ms"])
        print(f"BEST H={head_dim} causal={causal} {kind} (configs.py {base:.3f} ms):", flush=True)
        for r in ok[:3]:
            print(
                f"    {r['tflops']:.0f} TF/s {r['ms']:.3f} ms {base / r['ms']:.3f}x {r['label']}",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("head_dims", nargs="*", type=int, default=[64, 128, 256])
    p.add_argument("--tiles", action="store_true", help="also sweep the tile grid")
    p.add_argument(
        "--toggles",
        action="store_true",
        help="forward: configs.py's choice with each on/off option flipped (not SCHEDULES)",
    )
    p.add_argument("--only", choices=("fwd", "bwd"), help="one kernel's candidates")
    p.add_argument("--seq", type=int, default=SEQ, help="sequence length (B * T = 16k)")
    p.add_argument(
        "--with",
        dest="option",
        help="only the option sets that include this option (`a+b`: both; `configured`: none "
        "of them, so configs.py's choice alone, with --registers or --retile its copies)",
    )
    p.add_argument("--without", help="leave out every candidate with this option on")
    p.add_argument("--causal", choices=("yes", "no"), help="one of the two (default both)")
    p.add_argument("--retile", help="Q:KV:ST, every forward candidate also with these tiles")
    p.add_argument("--registers", help="C,P: every candidate also with this setmaxnreg split")
    p.add_argument("--group", type=int, default=1, help="query heads per KV head (GQA)")
    p.add_argument("--also", help="an on/off option: every candidate also with it on")
    p.add_argument(
        "--fma-columns", help="N,...: every exp2_fma candidate also with N columns on the FMA pipe"
    )
    args = p.parse_args()
    retile = tuple(int(x) for x in args.retile.split(":")) if args.retile else None
    registers = tuple(int(x) for x in args.registers.split(",")) if args.registers else None
    causals = {"yes": (True,), "no": (False,), None: (False, True)}[args.causal]
    rows = []
    for head_dim in args.head_dims:
        for causal in causals:
            print(f"H={head_dim} T={args.seq} causal={causal}", flush=True)
            kinds = args.only or "fwd,bwd"
            rows += sweep(
                head_dim,
                causal,
                args.tiles,
                args.toggles,
                kinds,
                args.seq,
                args.option,
                args.without,
                retile,
                registers,
                args.group,
                tuple(int(n) for n in args.fma_columns.split(",")) if args.fma_columns else (),
                args.also,
            )
            report(rows, head_dim, causal)
            json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
