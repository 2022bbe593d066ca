"""The op under jit, vmap (extra leading axes), grad, pmap, shard_map and jax.checkpoint."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, cannot_serve, make_inputs, served
from jax.sharding import Mesh, PartitionSpec

from flashjax import backends, dot_product_attention

CASE = Case(B=2, T=24, S=40, N=2, K=1, H=32, dtype="float32")
DECODE_CASE = Case(B=2, T=3, S=40, N=4, K=1, H=32, dtype="float32")  # few new tokens


def _serves(impl: str, case: Case) -> bool:
    q, k, v, _, _ = make_inputs(case)
    return cannot_serve(impl, q, k, v, dict(is_causal=True)) is None


def case_for(impl: str) -> Case:
    """CASE, or a decode step for a backend that serves only those (the decode kernel)."""
    return CASE if _serves(impl, CASE) else DECODE_CASE


# The implementations that serve one of the float32 cases (the Mosaic kernels take bf16 and fp16
# only: tests/test_mosaic.py puts them under the same transformations).
IMPLS = tuple(
    name
    for name in backends.NAMES
    if name != "xla" and (_serves(name, CASE) or _serves(name, DECODE_CASE))
)


def loss(q, k, v, impl, **kw):
    out = dot_product_attention(q, k, v, is_causal=True, implementation=impl, **kw)
    return jnp.sum(jnp.sin(out))


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_two_extra_axes_forward_and_backward(impl: str) -> None:
    case = case_for(impl)
    stack = [make_inputs(case, salt=str(i))[:3] for i in range(6)]
    qs, ks, vs = (
        jnp.stack([s[j] for s in stack]).reshape(3, 2, *stack[0][j].shape) for j in range(3)
    )
    f = functools.partial(loss, impl=impl)
    one = jax.value_and_grad(f, argnums=(0, 1, 2))
    got = jax.jit(jax.vmap(jax.vmap(one)))(qs, ks, vs)
    one = jax.jit(one)
    for i in range(3):
        for j in range(2):
            val, grads = one(qs[i, j], ks[i, j], vs[i, j])
            np.testing.assert_allclose(got[0][i, j], val, rtol=1e-5)
            for g, w in zip(got[1], grads):
                np.testing.assert_allclose(g[i, j], w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_pmap_matches_single_device(impl: str) -> None:
    assert jax.device_count() >= 2, "conftest.py asks XLA for 8 host devices"
    q, k, v, _, _ = make_inputs(case_for(impl))
    split = [x.reshape(2, 1, *x.shape[1:]) for x in (q, k, v)]
    grad = jax.grad(functools.partial(loss, impl=impl), argnums=(0, 1, 2))
    got = jax.pmap(grad)(*split)
    want = jax.jit(grad)(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.reshape(w.shape), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_shard_map_over_batch(impl: str) -> None:
    q, k, v, _, _ = make_inputs(case_for(impl))
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    spec = PartitionSpec("data")

    def per_shard(q, k, v):
        return dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    # Pallas' CPU interpreter trips over varying manual axes in its own loop (jax 0.11.2), so the
    # interpreted kernels run with check_vma=False here; the GPU tier runs them with the default.
    check_vma = not backends.REGISTRY[impl].kernels or jax.devices()[0].platform == "gpu"
    sharded = jax.jit(
        jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=check_vma)
    )
    np.testing.assert_allclose(sharded(q, k, v), jax.jit(per_shard)(q, k, v), rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(sharded(*a))), argnums=(0, 1, 2)))(q, k, v)
    w = jax.jit(jax.grad(functools.partial(loss, impl=impl), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_checkpoint_gives_the_same_gradients(impl: str) -> None:
    q, k, v, _, _ = make_inputs(case_for(impl))
    f = functools.partial(loss, impl=impl)
    plain = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    remat = jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(remat, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_path_memory_is_linear_in_seq_len() -> None:
    """Compiled temp memory of forward + backward: doubling T about doubles it (never 4x), and it
    stays far below one (B, N, T, S) float32 score matrix."""

    def temp_bytes(seq: int) -> int:
        x = jax.ShapeDtypeStruct((1, seq, 2, 32), jnp.float32)

        def f(q, k, v):
            return jnp.sum(dot_product_attention(q, k, v, implementation="xla_chunked"))

        grad = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
        return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(8192), temp_bytes(16384)
    assert large / small < 2.5, (small, large)
    assert large < (2 * 16384 * 16384 * 4) / 4, large


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_with_a_dropout_key_per_slice(impl: str) -> None:
    """Each vmapped slice draws its own dropout mask from its own key, forward and backward."""
    q = make_inputs(CASE)[0]
    qs = jnp.stack([q, q * 0.5, q + 1.0])
    keys = jax.random.split(jax.random.key(1), 3)
    if not served(impl, q, q, q, dict(dropout_rate=0.3, dropout_rng=keys[0])):
        return

    def loss(q, key):
        out = dot_product_attention(q, q, q, dropout_rate=0.3, dropout_rng=key, implementation=impl)
        return jnp.sum(out**2)

    vals, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(qs, keys)
    one = jax.jit(jax.value_and_grad(loss))
    for i in range(3):
        val, grad = one(qs[i], keys[i])
        np.testing.assert_allclose(vals[i], val, rtol=1e-5)
        np.testing.assert_allclose(grads[i], grad, rtol=1e-4, atol=1e-4)


def test_layers_of_one_shape_share_one_lowered_kernel() -> None:
    """Calls of one shape and statics (a model's layers) lower the backend's forward and backward
    once per program (`backends._forward_once` / `_backward_once`, each a jitted function called
    from every layer), not once per call site: GPT-2's 12 layers lowered their Mosaic kernels 12
    times, ~1.4 s of lowering a layer (session 31)."""
    import collections
    import re

    q, k, v, _, _ = make_inputs(CASE)

    def layers(q, k, v):
        x = q
        for _ in range(3):
            x = dot_product_attention(x, k, v, is_causal=True, implementation="xla_chunked")
        return jnp.sum(x)

    text = jax.jit(jax.grad(layers, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    defined = collections.Counter(re.findall(r"func\.func private @(_\w+_once\w*)", text))
    called = collections.Counter(re.findall(r"call @(_\w+_once\w*)", text))
    for program in ("_forward_once", "_backward_once"):
        names = [name for name in defined if name.startswith(program)]
        assert names, (program, defined)
        # at most one variant besides the shared one (the first layer reads the jit's argument)
        assert len(names) <= 2 and max(called[n] for n in names) >= 2, (defined, called)
