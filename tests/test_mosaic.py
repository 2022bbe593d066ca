"""The Hopper kernels on Mosaic GPU, in Mosaic GPU interpret mode on CPU: no races, and the op
under jit, vmap and grad (the shared suite, tests/test_suite.py, checks the numbers case by
case)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from helpers import Case, make_inputs
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interpreter

from flashjax import dot_product_attention


def test_forward_has_no_races() -> None:
    """The race detector watches every shared-memory access of the producer and the two consumer
    warpgroups (TMA copies, wgmma operands, the output staging) across a causal GQA call."""
    interpreter.reset_gpu_interpret_mode_state()
    case = Case(B=1, T=200, S=300, N=4, K=2, H=64, features=("causal",))
    q, k, v, _, _ = make_inputs(case)
    out = dot_product_attention(q, k, v, is_causal=True, implementation="mosaic")
    out.block_until_ready()
    assert not interpreter.get_races().races_found


def test_jit_vmap_and_grad() -> None:
    case = Case(B=2, T=64, S=128, N=2, K=1, H=64)
    q, k, v, dout, _ = make_inputs(case)

    def loss(q, k, v, impl):
        out = dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    batched = jax.jit(jax.vmap(functools.partial(grad, impl="mosaic")))
    got = batched(q[:, None], k[:, None], v[:, None])
    for b in range(2):
        want = grad(q[b : b + 1], k[b : b + 1], v[b : b + 1], "triton")
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(
                np.asarray(g[b], np.float32), np.asarray(w, np.float32), rtol=2e-2, atol=2e-2
            )
