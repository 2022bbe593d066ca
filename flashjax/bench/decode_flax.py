"""`--decode`'s Flax study: one decode step of `nnx.MultiHeadAttention(decode=True)`, Flax's own
attention (the whole cache, masked) against `flashjax.nnx.MultiHeadAttention` (the decode kernel
over the cache's lengths), projections included.

The module is the decode shape's: `num_heads` N, `num_kv_heads` K, head dim H, features N x H,
bf16 parameters and cache. Its cache index starts `steps` short of the end, so every step attends
over about S keys; `steps` chained steps (the next input depends on the output) run in one jitted
loop, the median of `reps` runs, per step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from flashjax import nnx as flashjax_nnx
from flashjax.bench import sweep
from flashjax.bench.decode import DecodeBench, Shape
from flashjax.bench.decode_backends import median_seconds

# How much a step's output moves the next step's input: small, but a real data dependence (the
# output itself would drift through the random projections step after step).
FEEDBACK = 1e-3

MODULES = {"flax_nnx": nnx.MultiHeadAttention, "flashjax_nnx": flashjax_nnx.MultiHeadAttention}


def _module(cls: type, shape: Shape, cfg: DecodeBench) -> nnx.MultiHeadAttention:
    dtype = jnp.dtype(cfg.dtype)
    module = cls(
        num_heads=cfg.heads,
        num_kv_heads=cfg.kv_heads,
        in_features=cfg.heads * cfg.head_dim,
        decode=True,
        dtype=dtype,
        param_dtype=dtype,
        rngs=nnx.Rngs(cfg.seed),
    )
    module.init_cache((shape.batch, shape.seq, cfg.heads * cfg.head_dim), dtype)
    return module


def step_seconds(cls: type, shape: Shape, cfg: DecodeBench, steps: int) -> float:
    """Seconds per decode step of a `cls` module at `shape` (see the module docstring)."""
    graphdef, state = nnx.split(_module(cls, shape, cfg))
    start = max(0, shape.seq - steps)
    x0 = jax.random.normal(jax.random.key(cfg.seed), (shape.batch, 1, cfg.heads * cfg.head_dim))
    x0 = x0.astype(cfg.dtype)

    def loop(state: nnx.State, x0: jax.Array) -> jax.Array:
        module = nnx.merge(graphdef, state)
        module.cache_index[...] = jnp.int32(start)

        def body(_, carry):
            state, x = carry
            module = nnx.merge(graphdef, state)
            y = module(x)
            return nnx.state(module), x0 + FEEDBACK * y

        return lax.fori_loop(0, steps, body, (nnx.state(module), x0))[1]

    compiled = jax.jit(loop).lower(state, x0).compile()
    return median_seconds(lambda: compiled(state, x0), jax.block_until_ready, cfg.reps) / steps


def rows(cfg: DecodeBench, shapes: tuple[Shape, ...], steps: int) -> list[dict[str, Any]]:
    """One row per (shape, module): `us` per step, and `vs_flax` (time over Flax's)."""
    out = []
    for shape in shapes:
        found = {}
        for name, cls in MODULES.items():
            row = {"shape": shape.label, "module": name, "us": None, "error": ""}
            try:
                row["us"] = step_seconds(cls, shape, cfg, min(steps, shape.seq)) * 1e6
            except Exception as e:  # a failure is a row saying so
                row["error"] = sweep.describe_error(e)[1]
            found[name] = row
        flax_us = found["flax_nnx"]["us"]
        for row in found.values():
            row["vs_flax"] = row["us"] / flax_us if row["us"] and flax_us else None
            out.append(row)
    return out
