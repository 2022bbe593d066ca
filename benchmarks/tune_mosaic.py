"""Tile and schedule sweep for the Mosaic GPU kernels (pallas_kernels/mosaic) on the H200: times the
forward (`api.forward`) and the backward (`api.backward`: dK/dV + dQ kernels and their XLA prologue)
for candidate configs at one standard shape per head dim (bf16, B*T = 16k tokens, N*H = 2048),
causal and not, checks each candidate's output against the first's, times the candidates
interleaved over rounds (one block per candidate drifted by up to 12% on the H200), and prints the
fastest.
Usage on the GPU: python benchmarks/tune_mosaic.py OUT_JSON [HEAD_DIM ...]  (default 64 128 256)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys

import jax
import jax.numpy as jnp
from tune import interleaved, operands, timeit

from pallas_kernels.mosaic import api
from pallas_kernels.mosaic.backward import BackwardConfig
from pallas_kernels.mosaic.forward import ForwardConfig

SEQ = 8192
# (block_q, block_kv, stages) per head dim; shared memory: Q 2 x block_q x D plus K and V
# stages x block_kv x D, bf16, within 227 KiB.
FWD_TILES = {
    64: [(64, 128, 2), (64, 128, 3), (64, 128, 4), (64, 256, 2)],
    128: [(64, 128, 2), (64, 128, 3), (64, 64, 3), (64, 64, 4)],
    256: [(64, 64, 2), (64, 128, 1)],
}
FLAGS = list(itertools.product((False, True), repeat=2))  # (early_next_k, pinned_order)
BWD_TILES = {
    64: [(64, 64, 2), (64, 64, 3), (64, 128, 2)],
    128: [(64, 64, 2), (64, 64, 3), (64, 128, 1)],
    256: [(64, 64, 1)],
}


def forward_candidates(head_dim: int) -> list[ForwardConfig]:
    """The tile x flag grid, then configs.py's choice with each combination of `longest_first`
    and `no_auto_barriers`."""
    chosen = api.forward_config(head_dim)
    return [
        ForwardConfig(block_q=q, block_kv=kv, stages=st, early_next_k=e, pinned_order=p)
        for (q, kv, st), (e, p) in itertools.product(FWD_TILES[head_dim], FLAGS)
    ] + [
        dataclasses.replace(chosen, longest_first=lf, no_auto_barriers=nb)
        for lf, nb in itertools.product((False, True), repeat=2)
    ]


def backward_candidates(head_dim: int) -> list[BackwardConfig]:
    return [
        BackwardConfig(rows=r, cols=c, stages=s, no_auto_barriers=nb)
        for (r, c, s), nb in itertools.product(BWD_TILES[head_dim], (False, True))
    ]


def rel_err(a, b) -> float:
    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def sweep(head_dim: int, causal: bool) -> list[dict]:
    """Every candidate compiled and checked against the first of its kind, then timed with the
    candidates interleaved over rounds (benchmarks/tune.py `interleaved`)."""
    ops, do = operands(SEQ, head_dim, causal)
    flops = 4 * ops.batch * ops.num_heads * SEQ * SEQ * head_dim / (2 if causal else 1)
    rows, first, measures = [], {}, {}

    def prepare(kind, cfg, fn, n_flops):
        row = dict(H=head_dim, T=SEQ, causal=causal, kernel=kind, cfg=repr(cfg), flops=n_flops)
        try:
            result = jax.block_until_ready(fn())
            first.setdefault(kind, result)
            err = max(rel_err(a, b) for a, b in zip(result, first[kind]))
            row["status"] = "ok" if err < 2e-2 else f"WRONG (rel err {err:.2g})"
            measures[(kind, row["cfg"])] = lambda: timeit(fn, reps=10)
        except Exception as e:  # noqa: BLE001
            row["status"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)

    for cfg in forward_candidates(head_dim):
        fn = jax.jit(lambda ops, cfg=cfg: api.forward(ops, interpret=False, config=cfg))
        prepare("fwd", cfg, lambda fn=fn: fn(ops), flops)
    out, lse2 = api.forward(ops, interpret=False)
    for cfg in backward_candidates(head_dim):
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
        print(f"  {row['kernel']} {row['cfg']}: {row['ms']:.3f} ms {row['status']}", flush=True)
    return rows


def main(out_path: str, head_dims: tuple[int, ...]) -> None:
    rows = []
    for head_dim in head_dims:
        for causal in (False, True):
            print(f"H={head_dim} T={SEQ} causal={causal}", flush=True)
            rows += sweep(head_dim, causal)
            for kind in ("fwd", "bwd"):
                ok = [
                    r
                    for r in rows
                    if (r["H"], r["causal"], r["kernel"]) == (head_dim, causal, kind)
                    and r["status"] == "ok"
                ]
                ok.sort(key=lambda r: r["ms"])
                print(f"BEST H={head_dim} causal={causal} {kind}: ", flush=True)
                for r in ok[:3]:
                    print(f"    {r['tflops']:.0f} TF/s {r['ms']:.3f} ms {r['cfg']}", flush=True)
            json.dump(rows, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], tuple(int(h) for h in sys.argv[2:]) or (64, 128, 256))
