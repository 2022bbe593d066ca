"""Tile and split sweep for the decode kernel (pallas_kernels/triton/decode.py) on the GPU: for
each decode shape (one new token, 32 query heads / 8 KV heads, head dim 128, bf16, full caches)
and each candidate (DecodeConfig block_k x num_warps x num_stages, and num_splits around the
plan's choice), times a jitted loop of chained steps (dispatch excluded, as `bench --decode`),
the candidates interleaved over rounds (benchmarks/tune.py `interleaved`); checks each output
against configs.py's choice; prints the fastest with its GB/s, and writes every row as JSON.
Usage on the GPU: python benchmarks/tune_decode.py OUT_JSON [BxS ...] (default 1x8k 1x64k 8x16k
32x8k); `--paged P` times pages of P keys instead of the contiguous cache; `--heads 12,12,64` the
GPT-2 small decode step of examples/gpt2/generate.py; `--tiles 64:4:3,128:4:3` and `--splits
8,16,33` replace the candidate grid.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp
from tune import interleaved

from flashjax.backends import decode as decode_backend
from flashjax.bench.decode import DecodeBench, make_inputs
from flashjax.bench.decode_backends import chained_steps
from flashjax.bench.options import parse_shapes
from flashjax.decode import decode_operands
from pallas_kernels import configs
from pallas_kernels.configs import DecodeConfig
from pallas_kernels.triton import decode_api

# block_k x (warps, stages): 24 candidates a shape with the split factors (a few minutes)
TILES = [(bk, w, st) for bk in (64, 128, 256) for w, st in ((4, 3), (8, 2))]
SPLIT_FACTORS = (0.5, 1, 2, 4)  # times the plan's num_splits
STEPS = 96
# Loop iterations unrolled, as `bench --decode` (DecodeBench.unroll): without it each step also
# paid a loop round trip, about 10 us on the H100, which at GPT-2's 1 x 2k step (6 MB) made the
# candidates' times a 13.7 / 18 us floor in two modes (results/2026-12-06-h100-s32/call3).
UNROLL = 8


def step_of(config: DecodeConfig | None, splits: int | None, page: int):
    def step(q, x):
        k, v, table = (x.k, x.v, None) if page == 0 else x.pools[page]
        ops = decode_operands(q, k, v, x.lengths, page_table=table)
        return decode_backend.forward(ops, splits, config)[0]

    return step


def rel_err(a, b) -> float:
    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def sweep(
    shape,
    page: int,
    heads: tuple[int, int, int],
    tiles=TILES,
    splits_of=lambda planned: [round(planned * f) for f in SPLIT_FACTORS],
) -> list[dict]:
    """Every candidate (`tiles` x the split counts `splits_of(planned)`) at one (B, S) shape;
    `heads`: query heads, KV heads, head dim."""
    n, k, d = heads
    bench = DecodeBench(page_sizes=(page,) if page else (), heads=n, kv_heads=k, head_dim=d)
    x = make_inputs(shape, bench)
    table = None if page == 0 else x.pools[page][2]
    pool = (x.k, x.v) if page == 0 else x.pools[page][:2]
    ops = decode_operands(x.q, *pool, x.lengths, page_table=table)
    planned = decode_api.plan(ops).splits
    want = jax.jit(step_of(None, None, page))(x.q, x)
    candidates = {("configs.py", planned): (None, None)}
    for (block_k, warps, stages), n in itertools.product(tiles, splits_of(planned)):
        splits = max(1, min(configs.MAX_SPLITS, n))
        cfg = DecodeConfig(block_k, warps, stages, paged_block_k=block_k)
        candidates.setdefault((repr(cfg), splits), (cfg, splits))
    rows, measures = [], {}
    for key, (cfg, splits) in candidates.items():
        row = dict(shape=f"{shape.batch}x{shape.seq}", page=page, cfg=key[0], splits=key[1])
        try:
            err = rel_err(jax.jit(step_of(cfg, splits, page))(x.q, x), want)
            loop = jax.jit(
                lambda q, x, cfg=cfg, splits=splits: chained_steps(
                    step_of(cfg, splits, page), q, x, STEPS, UNROLL
                )
            )
            compiled = loop.lower(x.q, x).compile()
            jax.block_until_ready(compiled(x.q, x))

            def measure(compiled=compiled):
                start = time.perf_counter()
                jax.block_until_ready(compiled(x.q, x))
                return (time.perf_counter() - start) / STEPS

            measures[key] = measure
            row["status"] = "ok" if err < 2e-2 else f"WRONG (rel err {err:.2g})"
        except Exception as e:  # noqa: BLE001 - a candidate that fails is a row
            row["status"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
    best = interleaved(measures)
    for row in rows:
        key = (row["cfg"], row["splits"])
        if key in best:
            row["us"] = best[key] * 1e6
            row["gbps"] = x.cache_bytes / best[key] / 1e9
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("shapes", nargs="*", default=["1x8k", "1x64k", "8x16k", "32x8k"])
    p.add_argument("--paged", type=int, default=0)
    p.add_argument(
        "--heads",
        default="32,8,128",
        help="query heads, KV heads, head dim (default 32,8,128; GPT-2 small: 12,12,64)",
    )
    p.add_argument(
        "--tiles",
        help="candidate tiles as block_k:warps:stages,... (default: the 6 of TILES)",
    )
    p.add_argument("--splits", help="split counts to try, e.g. 8,16,33 (default: factors x plan)")
    args = p.parse_args()
    heads = tuple(int(x) for x in args.heads.split(","))
    grid = {}
    if args.tiles:
        grid["tiles"] = [tuple(int(v) for v in t.split(":")) for t in args.tiles.split(",")]
    if args.splits:
        counts = [int(n) for n in args.splits.split(",")]
        grid["splits_of"] = lambda planned: counts
    rows = []
    for shape in parse_shapes(",".join(args.shapes)):
        print(f"{shape.batch}x{shape.seq} page {args.paged} heads {heads}", flush=True)
        found = sweep(shape, args.paged, heads, **grid)
        rows += found
        ok = sorted((r for r in found if r["status"] == "ok"), key=lambda r: r["us"])
        chosen = next(r for r in found if r["cfg"] == "configs.py")
        print(f"  configs.py: {chosen.get('us', float('nan')):.2f} us {chosen['status']}")
        for r in ok[:4]:
            print(f"  {r['us']:.2f} us {r['gbps']:.0f} GB/s splits {r['splits']} {r['cfg']}")
        for r in found:
            if r["status"] != "ok":
                print(f"  {r['cfg']} splits {r['splits']}: {r['status']}")
        json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
