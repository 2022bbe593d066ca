"""Tile sweep for the Triton-lowered kernels: times each kernel alone (forward, dK/dV, dQ) for
candidate configs at the standard shapes (bf16, B*T = 16k tokens, N*H = 2048) and prints the best.
Usage on the GPU: python benchmarks/tune.py OUT_JSON [HEAD_DIM ...]   (default head dims 64 128)

Each kernel gets the one operand record the kernels share (`pallas_kernels.triton.tiles.Refs`),
built from an `Operands` record; the shapes are multiples of every tile, so nothing is padded."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from flashjax.bench import timing
from pallas_kernels.configs import KernelConfig as K
from pallas_kernels.operands import AttentionStatics, Operands
from pallas_kernels.triton import backward, forward
from pallas_kernels.triton.tiles import Refs

FWD = [
    K(128, 64, 4, 3),
    K(128, 64, 8, 3),
    K(128, 128, 8, 3),
    K(128, 128, 4, 3),
    K(64, 64, 4, 2),
    K(128, 32, 4, 3),
    K(64, 128, 4, 3),
    K(128, 64, 4, 4),
]
DKDV = [
    K(32, 64, 4, 2),
    K(64, 64, 4, 2),
    K(64, 128, 8, 2),
    K(32, 128, 4, 2),
    K(64, 128, 4, 2),
    K(32, 64, 4, 3),
    K(64, 64, 4, 3),
    K(32, 128, 8, 2),
]
# Head dim 256: a (64, 256) bf16 tile is 32 KiB, so fewer stages / smaller key tiles; the dK/dV
# program's two float32 (block_k, 256) accumulators live in registers, so block_k <= 64.
FWD_256 = [
    K(64, 64, 8, 2),
    K(64, 64, 4, 2),
    K(64, 32, 4, 2),
    K(64, 32, 4, 3),
    K(128, 64, 8, 2),
    K(128, 32, 8, 2),
    K(128, 64, 8, 1),
    K(64, 128, 8, 1),
]
DKDV_256 = [
    K(32, 64, 8, 1),
    K(32, 64, 4, 1),
    K(32, 64, 4, 2),
    K(32, 32, 4, 2),
    K(16, 64, 4, 2),
    K(64, 32, 8, 1),
    K(64, 64, 8, 1),
    K(64, 32, 4, 2),
]
DQ_256 = [
    K(64, 32, 8, 1),
    K(64, 32, 4, 2),
    K(32, 64, 4, 2),
    K(64, 64, 8, 1),
    K(32, 32, 4, 2),
    K(128, 32, 8, 1),
    K(64, 64, 4, 1),
    K(32, 64, 8, 1),
]
DQ = [
    K(64, 32, 4, 2),
    K(64, 64, 4, 2),
    K(128, 64, 8, 2),
    K(128, 32, 4, 2),
    K(128, 64, 4, 2),
    K(64, 32, 4, 3),
    K(64, 64, 4, 3),
    K(128, 32, 8, 2),
]


def timeit(f, *args, reps=8):
    """Median seconds per call of `f(*args)`, timed as the bench times (flashjax.bench.timing):
    batches of back-to-back calls, one sync a batch. A sync after every call (this function's
    way until session 20) added the host's round trip to each: on the H200 a head dim 64, 1k
    forward read 0.670 ms in tune_mosaic's sweep against 0.385 ms in the bench and 0.377 ms
    under ncu (results/2026-12-03-h200-s20/call3), which drowned short calls' differences."""
    return timing.median_time(lambda: f(*args), policy=timing.TimingPolicy(reps=reps)).seconds


def interleaved(measures: dict, rounds: int = 3) -> dict:
    """Each value of `measures` (a callable returning one time in seconds) run once per round,
    the candidates in a rotated order each round; returns the best time of each key. A sweep
    that times each candidate in one block sees the clocks drift between blocks (up to 12%
    between two timings of one config in one run on the H200); interleaving spreads the drift
    over every candidate."""
    keys = list(measures)
    times: dict = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[k].append(measures[k]())
    return {k: min(ts) for k, ts in times.items()}


def candidates(head_dim: int) -> tuple[tuple[str, list[K]], ...]:
    if head_dim >= 256:
        return (("fwd", FWD_256), ("dkdv", DKDV_256), ("dq", DQ_256))
    return (("fwd", FWD), ("dkdv", DKDV), ("dq", DQ))


def shapes(head_dim: int) -> tuple[tuple[int, bool], ...]:
    if head_dim >= 256:  # Fewer shapes: each candidate compiles slower.
        return ((4096, True), (16384, False))
    return ((1024, False), (4096, True), (16384, False), (16384, True))


def operands(T: int, H: int, causal: bool, group: int = 1) -> tuple[Operands, jax.Array]:
    """The standard shape's operands (B*T = 16k, N*H = 2048; `group` query heads per KV head)
    and a random output cotangent."""
    B, N = 16384 // T, 2048 // H
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    shapes = ((B, T, N, H), (B, T, N // group, H), (B, T, N // group, H), (B, T, N, H))
    q, k, v, do = (jax.random.normal(x, shape, jnp.bfloat16) for x, shape in zip(ks, shapes))
    statics = AttentionStatics(scale=H**-0.5, window=(None, 0 if causal else None))
    return Operands(q=q, k=k, v=v, statics=statics), do


def kernel_call(kind: str, c: K, statics: AttentionStatics):
    """One kernel with config `c` as a jitted function of its `Refs` (no lengths or offsets: the
    static sequence info of the padded-free standard shape)."""
    if kind == "fwd":
        fn = forward.forward
    else:
        fn = backward.dkdv if kind == "dkdv" else backward.dq

    def call(r: Refs):
        seq = (0, 0, r.q.shape[1], r.k.shape[1])
        return fn(r, statics=statics, config=c, interpret=False, static_seq=seq)

    return jax.jit(call)


def kernel_refs(ops: Operands, do: jax.Array, H: int) -> tuple[Refs, Refs]:
    """The forward's `Refs`, and the backward's (with dO, the forward's lse2 and a delta)."""
    r = Refs(q=ops.q, k=ops.k, v=ops.v)
    _, lse2 = kernel_call("fwd", candidates(H)[0][1][0], ops.statics)(r)
    return r, r.replace(do=do, lse2=lse2, delta=jnp.zeros_like(lse2) + 0.1)


def best_lines(rows: list[dict], H: int, T: int, causal: bool) -> list[str]:
    """The four fastest configs of each kernel at one shape."""
    lines = []
    for kind in ("fwd", "dkdv", "dq"):
        rs = [
            r
            for r in rows
            if (r["H"], r["T"], r["causal"], r["kernel"]) == (H, T, causal, kind)
            and r["status"] == "ok"
        ]
        rs.sort(key=lambda r: r["ms"])
        lines.append(
            f"H={H} T={T} causal={causal} {kind}: "
            + "  ".join(f"{r['cfg']} {r['ms']:.3f}ms" for r in rs[:4])
        )
    return lines


def main(out_path: str, head_dims: tuple[int, ...]) -> None:
    rows = []
    for H in head_dims:
        for T, causal in shapes(H):
            ops, do = operands(T, H, causal)
            B, N = ops.batch, ops.num_heads
            flops = 4 * B * N * T * T * H / (2 if causal else 1)
            fwd_refs, bwd_refs = kernel_refs(ops, do, H)
            for kind, cands in candidates(H):
                refs = fwd_refs if kind == "fwd" else bwd_refs
                for c in cands:
                    try:
                        t = timeit(kernel_call(kind, c, ops.statics), refs)
                        status = "ok"
                    except Exception as e:  # noqa: BLE001
                        t, status = float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
                    row = dict(
                        H=H,
                        T=T,
                        causal=causal,
                        kernel=kind,
                        cfg=list(c.__dict__.values()),
                        ms=t * 1e3,
                        status=status,
                        tflops=flops / t / 1e12 if status == "ok" else None,
                    )
                    rows.append(row)
            for line in best_lines(rows, H, T, causal):
                print(line, flush=True)
    json.dump(rows, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], tuple(int(h) for h in sys.argv[2:]) or (64, 128))
