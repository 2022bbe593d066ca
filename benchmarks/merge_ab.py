"""The decode step's split merge: the merge kernel (`decode.merge_splits`, what
`decode_attention` runs; with `--sweep` also its warps and columns per program) against XLA's
ops (`flashjax.merge_attention_parts` on the split kernel's partials), on the GPU: time per step
of `bench --decode`'s chained steps in interleaved rounds, and the GPU kernels per step
(`profile_decode.profile`) of the kernel and XLA at the first shape.
Usage: python benchmarks/merge_ab.py OUT_JSON [1x8k 1x64k ...] [--sweep]
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax.numpy as jnp
from profile_decode import profile
from tune_decode import step_of

from flashjax import merge
from flashjax.bench import decode_backends as db
from flashjax.bench.decode import DecodeBench, make_inputs, steps_for
from flashjax.bench.options import parse_shapes
from flashjax.decode import decode_operands
from pallas_kernels import configs
from pallas_kernels.triton import decode_api

ROUNDS = 3


def xla_merge_step(q, x):
    """The split kernel, then XLA's merge (natural-log lse, the splits' axis first)."""
    ops = decode_operands(q, x.k, x.v, x.lengths)
    parts, lse2, p = decode_api.forward_parts(ops)
    out, _ = merge.merge_attention_parts(parts[: p.splits], lse2[: p.splits] * jnp.log(2.0))
    return out.reshape(q.shape).astype(q.dtype)  # the bench's shapes need no padding


VARIANTS = {"kernel": db.flashjax_step, "xla": xla_merge_step}
SWEEP = [(4, None), (1, 32), (1, 8), (2, 16), (2, 8)]  # around configs.py's 1 warp, 16 columns


def merge_variant(warps: int, columns: int | None):
    config = configs.get_decode_config(128, configs.gpu_target())
    return step_of(dataclasses.replace(config, merge_warps=warps, merge_columns=columns), None, 0)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--sweep"]
    out_json, shapes = args[0], args[1:] or ["1x64k", "1x8k"]
    variants = dict(VARIANTS)
    if "--sweep" in sys.argv:
        variants |= {f"w{w}c{c}": merge_variant(w, c) for w, c in SWEEP}
    cfg = DecodeBench()
    result = {}
    for i, shape in enumerate(parse_shapes(",".join(shapes))):
        x = make_inputs(shape, cfg)
        steps = steps_for(cfg, shape, 4400.0)
        runners = {n: db.JaxRunner(step, x) for n, step in variants.items()}
        outs = {n: r.output() for n, r in runners.items()}
        diff = max(float(abs(outs["xla"] - o).max()) for o in outs.values())
        times = {n: [] for n in variants}
        for _ in range(ROUNDS):
            for n, r in runners.items():
                times[n].append(r.seconds_per_step(steps, cfg.reps, cfg.unroll) * 1e6)
        result[shape.label] = {"us": times, "max_abs_diff": diff}
        print(shape.label, "max abs diff to xla", diff)
        for n, ts in sorted(times.items(), key=lambda kv: min(kv[1])):
            print(f"  {n:8s} best {min(ts):7.2f} us  {[round(t, 2) for t in ts]}", flush=True)
        if i == 0:
            for n, step in VARIANTS.items():
                prof = profile(step, x)
                result[shape.label][f"profile_{n}"] = prof
                print(f"  {n}: wall {prof['wall_us']:.2f}, kernels {prof['kernels_us']:.2f}")
                for k in prof["kernels"][:6]:
                    print(f"     {k['us']:7.2f} us x{k['per_step']:.2f} {k['name']}", flush=True)
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
