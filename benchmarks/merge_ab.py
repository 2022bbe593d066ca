"""The decode step's split merge, closed form (`merge_attention_parts`: a max pass and a
weighted-sum pass) against one reduction (`merge_parts_one_pass`), on the GPU: time per step
of `bench --decode`'s chained steps, interleaved rounds, and each variant's GPU kernels per step
(`profile_decode.profile`) and optimized HLO at the first shape.
Usage: python benchmarks/merge_ab.py OUT_DIR [1x8k 1x64k ...]
"""

from __future__ import annotations

import json
import sys

import jax
from profile_decode import profile

from flashjax import merge
from flashjax.backends import decode as decode_backend
from flashjax.bench import decode_backends as db
from flashjax.bench.decode import DecodeBench, make_inputs, steps_for
from flashjax.bench.options import parse_shapes

VARIANTS = {
    "closed": lambda o, l, axis: merge.merge_attention_parts(o, l, axis=axis),
    "one_pass": merge.merge_parts_one_pass,
}
ROUNDS = 3


def with_merge(name: str):
    def step(q, x):
        decode_backend.merge.merge_parts_one_pass = VARIANTS[name]
        try:
            return db.flashjax_step(q, x)
        finally:
            decode_backend.merge.merge_parts_one_pass = VARIANTS["one_pass"]

    return step


def main() -> None:
    out_dir, shapes = sys.argv[1], parse_shapes(",".join(sys.argv[2:] or ["1x8k", "1x64k"]))
    cfg = DecodeBench()
    result = {}
    for i, shape in enumerate(shapes):
        x = make_inputs(shape, cfg)
        steps = steps_for(cfg, shape, 4300.0)
        runners = {n: db.JaxRunner(with_merge(n), x) for n in VARIANTS}
        times = {n: [] for n in VARIANTS}
        for _ in range(ROUNDS):
            for n, r in runners.items():
                times[n].append(r.seconds_per_step(steps, cfg.reps, cfg.unroll) * 1e6)
        result[shape.label] = {"us": times}
        print(shape.label, {n: [round(t, 2) for t in ts] for n, ts in times.items()}, flush=True)
        if i == 0:
            for n in VARIANTS:
                step = with_merge(n)
                loop = jax.jit(lambda q, x, step=step: db.chained_steps(step, q, x, 8, 1))
                with open(f"{out_dir}/hlo_{n}_{shape.label}.txt", "w") as f:
                    f.write(loop.lower(x.q, x).compile().as_text())
                prof = profile(step, x)
                result[shape.label][f"profile_{n}"] = prof
                print(f"  {n}: wall {prof['wall_us']:.2f}, kernels {prof['kernels_us']:.2f}")
                for k in prof["kernels"][:6]:
                    print(f"     {k['us']:7.2f} us x{k['per_step']:.2f} {k['name']}", flush=True)
    with open(f"{out_dir}/merge_ab.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
