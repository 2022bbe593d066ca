"""GPU tier (`pytest -m gpu`), beyond the shared suite's GPU cases (tests/test_suite.py): dropout
statistics, transformations and the default choice on a GPU.

Skipped (and reported as skipped) without an NVIDIA GPU. Run on the H100/H200 by
`pytest -m gpu tests/`; results are recorded under benchmarks/results/.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NAMES, Case, assert_close, make_inputs, run, run_reference64
from jax.sharding import Mesh, PartitionSpec

from flashjax import backends, dot_product_attention
from flashjax.attention import operands
from pallas_kernels import configs
from pallas_kernels.mosaic import api

pytestmark = pytest.mark.gpu


def test_dropout_keeps_one_minus_rate() -> None:
    """Kept fraction of the kernels' dropout within 0.01 of 1 - rate (about 500k draws).

    Uniform attention (q = 0) over one-hot values makes the output the dropout mask itself:
    out[i, j] = keep[i, j] / ((1 - rate) * S).
    """
    T, S, rate = 2048, 256, 0.3
    q = jnp.zeros((1, T, 1, S), jnp.float32)
    k = jnp.asarray(np.random.default_rng(0).standard_normal((1, S, 1, S)), jnp.float32)
    v = jnp.eye(S, dtype=jnp.float32)[None, :, None, :]
    out = dot_product_attention(
        q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(5), implementation="triton"
    )
    scaled = np.asarray(out[0, :, 0, :]) * (1 - rate) * S
    assert np.allclose(scaled[scaled > 0.5], 1.0, atol=1e-4)
    kept = float(np.mean(scaled > 0.5))
    assert abs(kept - (1 - rate)) < 0.01, kept


def test_transformations_on_gpu() -> None:
    """jit + vmap + grad + checkpoint, and shard_map with its default check_vma=True."""
    case = Case(B=2, T=256, S=256, N=4, K=2, H=64, dtype="float32")
    q, k, v, _, _ = make_inputs(case)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v, is_causal=True)))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    want = grad(q, k, v)
    batched = jax.jit(jax.vmap(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2))))
    got = batched(q[None], k[None], v[None])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-5)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    spec = PartitionSpec("data")
    attend = functools.partial(dot_product_attention, is_causal=True)
    sharded = jax.jit(jax.shard_map(attend, mesh=mesh, in_specs=spec, out_specs=spec))
    np.testing.assert_allclose(sharded(q, k, v), attend(q, k, v), rtol=1e-5, atol=1e-6)


def test_default_is_the_kernel_on_gpu() -> None:
    """Mosaic on Hopper (a bias included), Triton on other GPUs and for what Mosaic does not
    serve (float32)."""
    case = Case(B=1, T=64, S=64, N=2, K=2, H=64)
    q, k, v, _, _ = make_inputs(case)
    hopper = configs.gpu_target() == "sm90"
    kernel = "mosaic" if hopper else "triton"
    assert backends.choose(None, operands(q, k, v)).name == kernel
    bias = jnp.zeros((1, 2, 64, 64), jnp.float32)
    assert backends.choose(None, operands(q, k, v, bias)).name == kernel
    as32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert backends.choose(None, operands(*as32)).name == "triton"


@pytest.mark.parametrize("features", [("causal",), ("lengths",)])
def test_deterministic_mosaic_grads_on_gpu(features) -> None:
    """`deterministic=True` on Hopper: where configs.py gives the Mosaic backward the 5-GEMM
    kernel (head dim 64: dQ's parts reduce-added in whatever order the CTAs reach them), the
    gradients are bitwise identical run to run and within the float64 reference's rule."""
    if configs.gpu_target() != "sm90":
        pytest.skip("the Mosaic kernels need sm90")
    case = Case(B=2, T=2048, S=2048, N=4, K=2, H=64, features=features)
    assert api.backward_config(64, case.T, "causal" in features, 2).fused_dq  # else moot
    q, k, v, dout, kw = make_inputs(case, salt="deterministic-gpu")
    kw = kw | dict(deterministic=True)
    first = run("mosaic", q, k, v, dout, kw)
    again = run("mosaic", *(jnp.array(x, copy=True) for x in (q, k, v, dout)), kw)
    for name, a, b in zip(NAMES, first, again):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), f"{name}: not bitwise equal"
    naive = run("xla", q, k, v, dout, kw)
    assert_close(first, naive, run_reference64(q, k, v, dout, kw), label=case.id)


def test_long_segmented_backward_on_gpu() -> None:
    """Head dim 128's 16k-row backward rule (the 5-GEMM kernel with `double_ds`) with segment
    ids, where the second slots do not fit shared memory and the kernel runs without them
    (`backward._fitted`; before session 41 this call failed to lower), within the float64
    reference's rule."""
    if configs.gpu_target() != "sm90":
        pytest.skip("the Mosaic kernels need sm90")
    # the rule keys on the query rows; 2k keys keep the float64 reference within the GPU
    # tier's memory share (16k keys: about 26 GB)
    case = Case(B=1, T=16384, S=2048, N=2, K=1, H=128, features=("segments",))
    assert api.backward_config(128, case.T).double_ds  # else moot
    q, k, v, dout, kw = make_inputs(case, salt="long-segmented-gpu")
    got = run("mosaic", q, k, v, dout, kw)
    assert_close(
        got, run("xla", q, k, v, dout, kw), run_reference64(q, k, v, dout, kw), label=case.id
    )
