"""The decode step's split merge: the merge kernel (`decode.merge_splits`, what
`decode_attention` runs) against XLA's ops (`flashjax.merge_attention_parts` on the split
kernel's partials), on the GPU: time per step of `bench --decode`'s chained steps in interleaved
rounds, and each variant's GPU kernels per step (`profile_decode.profile`) at the first shape.
Usage: python benchmarks/merge_ab.py OUT_JSON [1x8k 1x64k ...]
"""

from __future__ import annotations

import json
import sys

import jax.numpy as jnp
from profile_decode import profile

from flashjax import merge
from flashjax.bench import decode_backends as db
from flashjax.bench.decode import DecodeBench, make_inputs, steps_for
from flashjax.bench.options import parse_shapes
from flashjax.decode import decode_operands
from pallas_kernels.triton import decode_api

ROUNDS = 3


def xla_merge_step(q, x):
    """The split kernel, then XLA's merge (natural-log lse, the splits' axis first)."""
    ops = decode_operands(q, x.k, x.v, x.lengths)
    parts, lse2, p = decode_api.forward_parts(ops)
    out, _ = merge.merge_attention_parts(parts[: p.splits], lse2[: p.splits] * jnp.log(2.0))
    return out.reshape(q.shape).astype(q.dtype)  # the bench's shapes need no padding


VARIANTS = {"kernel": db.flashjax_step, "xla": xla_merge_step}


def main() -> None:
    out_json, shapes = sys.argv[1], sys.argv[2:] or ["1x64k", "1x8k"]
    cfg = DecodeBench()
    result = {}
    for i, shape in enumerate(parse_shapes(",".join(shapes))):
        x = make_inputs(shape, cfg)
        steps = steps_for(cfg, shape, 4400.0)
        runners = {n: db.JaxRunner(step, x) for n, step in VARIANTS.items()}
        outs = {n: r.output() for n, r in runners.items()}
        diff = float(abs(outs["kernel"] - outs["xla"]).max())
        times = {n: [] for n in VARIANTS}
        for _ in range(ROUNDS):
            for n, r in runners.items():
                times[n].append(r.seconds_per_step(steps, cfg.reps, cfg.unroll) * 1e6)
        result[shape.label] = {"us": times, "max_abs_diff": diff}
        print(shape.label, {n: [round(t, 2) for t in ts] for n, ts in times.items()}, diff)
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
