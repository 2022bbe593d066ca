"""Where a decode step's time goes on the GPU: `bench --decode`'s chained steps (one jitted loop)
traced with `jax.profiler` for each shape and step, the GPU kernels summed by name per step,
beside the loop's wall time per step. The gap between the two is what runs between kernels.
Usage on the GPU:
  python benchmarks/profile_decode.py OUT_JSON [1x8k 1x64k ...] [--steps flashjax,jax_cudnn]
(steps: `flashjax`, `paged16`, `paged64`, `jax_cudnn`, `jax_xla`); `--heads 12,12,64` profiles
GPT-2 small's decode step (query heads, KV heads, head dim) instead of 32, 8, 128.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time

import jax
from profile_generate import kernels

from flashjax.bench import decode_backends as db
from flashjax.bench.decode import DecodeBench, make_inputs
from flashjax.bench.options import parse_shapes

STEPS = {
    "flashjax": db.flashjax_step,
    "paged16": db.paged_step(16),
    "paged64": db.paged_step(64),
    "jax_cudnn": db.jax_nn_step("cudnn"),
    "jax_xla": db.jax_nn_step("xla"),
}
LOOP = 200  # steps traced


def profile(step: db.Step, x: db.DecodeInputs) -> dict:
    loop = jax.jit(lambda q, x: db.chained_steps(step, q, x, LOOP, 1))
    compiled = loop.lower(x.q, x).compile()
    jax.block_until_ready(compiled(x.q, x))
    start = time.perf_counter()
    jax.block_until_ready(compiled(x.q, x))
    wall = (time.perf_counter() - start) / LOOP * 1e6
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace):
            jax.block_until_ready(compiled(x.q, x))
        found = kernels(trace)
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for name, us in found:
        per_kernel[name][0] += 1
        per_kernel[name][1] += us
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
    return dict(
        wall_us=wall,
        kernels_us=sum(us for _, us in found) / LOOP,
        kernels=[dict(name=n[:90], per_step=c / LOOP, us=us / LOOP) for n, (c, us) in rows],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("shapes", nargs="*", default=["1x8k", "1x64k"])
    p.add_argument("--steps", default="flashjax,paged16,jax_cudnn")
    p.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    args = p.parse_args()
    heads, kv_heads, head_dim = (int(x) for x in args.heads.split(","))
    bench = DecodeBench(heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_sizes=(16, 64))
    result = {}
    for shape in parse_shapes(",".join(args.shapes)):
        x = make_inputs(shape, bench)
        for name in args.steps.split(","):
            r = profile(STEPS[name], x)
            result[f"{shape.batch}x{shape.seq} {name}"] = r
            print(
                f"{shape.batch}x{shape.seq} {name}: wall {r['wall_us']:.2f} us/step, "
                f"kernels {r['kernels_us']:.2f} us/step",
                flush=True,
            )
            for k in r["kernels"][:6]:
                print(f"   {k['us']:7.2f} us  x{k['per_step']:.2f}  {k['name']}", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
