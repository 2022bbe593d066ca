"""Where a GPT-2 generation step's time goes on the GPU: one generation per attention backend
traced with `jax.profiler`, its GPU kernels summed by name (kernels and microseconds per decode
step), beside the step's wall time. A step whose kernels add up to much less than its wall time
is bound by launches, not by the work. XLA flags (command buffers, say) come from XLA_FLAGS.
Usage on the GPU:
  python benchmarks/profile_generate.py OUT_JSON [--attention flashjax,xla,cudnn,none]
      [--config small] [--batch 1] [--prompt-len 1024] [--new-tokens 256] [--top 12] [--hlo DIR]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

from examples.gpt2.attention import CacheAttention
from examples.gpt2.generate import Generator, KVCache, Sampling, random_params
from examples.gpt2.model import get_config


def kernels(trace_dir: str) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel the trace's GPU streams ran."""
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    found = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                found += [(e.name, e.duration_ns / 1e3) for e in line.events]
    return found


def profile(backend: str, args: argparse.Namespace) -> dict:
    config = get_config(args.config, max_seq_len=args.prompt_len + args.new_tokens)
    gen = Generator(config, CacheAttention(backend), Sampling())
    params = random_params(config, 0)
    prompt = jnp.ones((args.batch, args.prompt_len), jnp.int32)
    cache = KVCache.zeros(config, args.batch, args.prompt_len + args.new_tokens)
    key = jax.random.key(0)
    for _ in range(2):  # compile, then a warm run
        tokens, cache = gen.generate(params, cache, prompt, key, args.new_tokens)
        tokens.block_until_ready()
    start = time.perf_counter()
    tokens, cache = gen.generate(params, cache, prompt, key, args.new_tokens)
    tokens.block_until_ready()
    wall = time.perf_counter() - start
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        tokens, cache = gen.generate(params, cache, prompt, key, args.new_tokens)
        tokens.block_until_ready()
    found = kernels(trace_dir)
    if args.hlo:  # the optimized HLO, to look the kernels' names up in
        lowered = gen.compiled.lower(params, cache, prompt, key, args.new_tokens)
        with open(f"{args.hlo}/{backend}.hlo.txt", "w") as f:
            f.write(lowered.compile().as_text())
    steps = args.new_tokens - 1
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, us in found:
        by_name[name][0] += 1
        by_name[name][1] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]
    record = {
        "attention": backend,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "wall_us_per_step": wall / steps * 1e6,
        "kernels_per_step": len(found) / steps,
        "kernel_us_per_step": sum(us for _, us in found) / steps,
        "top": [
            {"name": n[:90], "per_step": c / steps, "us_per_step": t / steps} for n, (c, t) in top
        ],
    }
    print(
        f"{backend}: wall {record['wall_us_per_step']:.1f} us/step, "
        f"{record['kernels_per_step']:.1f} kernels/step, "
        f"{record['kernel_us_per_step']:.1f} us/step in kernels",
        flush=True,
    )
    for row in record["top"]:
        print(f"   {row['us_per_step']:8.2f} us {row['per_step']:6.2f}x  {row['name']}")
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--attention", default="flashjax,xla,cudnn,none")
    p.add_argument("--config", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--hlo", help="write each backend's optimized HLO into this folder")
    args = p.parse_args()
    records = [profile(b, args) for b in args.attention.split(",")]
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
