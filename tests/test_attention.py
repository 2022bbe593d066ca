"""The public op's own behaviour: the registry's choice, the merge, offsets, scale, dropout bits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, make_inputs, served

import flashjax
from flashjax import backends, dot_product_attention, merge_attention
from flashjax.attention import operands
from pallas_kernels import common


def test_dropout_keeps_the_right_fraction() -> None:
    statics = common.AttentionStatics(scale=1.0, dropout_rate=0.25)
    rows = jnp.arange(512, dtype=jnp.int32)
    keep = common.dense_dropout_scale(jnp.array([7, 9], jnp.uint32), statics, 2, 4, rows, rows)
    kept = float(np.mean(np.asarray(keep) > 0))
    assert abs(kept - 0.75) < 0.01
    assert np.allclose(np.asarray(keep)[np.asarray(keep) > 0], 1 / 0.75)


def test_default_implementation_on_cpu_is_chunked(monkeypatch) -> None:
    case = Case(B=1, T=8, S=8, N=1, K=1, H=16, dtype="float32")
    q, k, v, _, _ = make_inputs(case)
    assert backends.choose(None, operands(q, k, v)).name == "xla_chunked"
    seen = []
    chunked = backends.REGISTRY["xla_chunked"]
    spy = dataclasses.replace(chunked, forward=lambda ops: seen.append(1) or chunked.forward(ops))
    monkeypatch.setitem(backends.REGISTRY, "xla_chunked", spy)
    dot_product_attention(q, k, v)
    assert seen == [1]


def test_named_implementation_that_cannot_serve_names_the_feature() -> None:
    case = Case(B=1, T=8, S=8, N=1, K=1, H=16, dtype="float32")
    q, k, v, _, _ = make_inputs(case)
    with pytest.raises(ValueError, match="'triton' cannot serve this call: a traced scale"):
        jax.grad(lambda s: dot_product_attention(q, k, v, scale=s, implementation="triton").sum())(
            0.5
        )


@pytest.mark.parametrize("impl", backends.NAMES)
def test_grads_alone_equal_the_vjp(impl: str) -> None:
    """`Backend.grads` (the backward from given residuals, for split-KV and ring attention) gives
    what jax.vjp of `Backend.run` gives."""
    case = Case(B=1, T=24, S=40, N=2, K=1, H=16, dtype="float32")
    q, k, v, dout, _ = make_inputs(case)
    ops = operands(q, k, v, is_causal=True, bias=jnp.ones((24, 40)))
    backend = backends.REGISTRY[impl]
    if not served(impl, q, k, v, dict(is_causal=True, bias=jnp.ones((24, 40)))):
        return
    (out, lse), vjp = jax.vjp(backend.run, ops)
    dlse = jnp.full(lse.shape, 0.1, lse.dtype)
    (want,) = vjp((dout, dlse))
    got = backend.grads(ops, out, lse, dout, dlse)
    for name in ("q", "k", "v", "bias"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)


def test_public_names() -> None:
    for name in ("dot_product_attention", "BlockMask", "block_masks", "merge_attention"):
        assert name in flashjax.__all__


@pytest.mark.parametrize("split", [0, 13, 40, 64])
def test_merge_equals_attention_over_the_union(split: int) -> None:
    """Attention over keys [0, split) merged with keys [split, S) is attention over all keys, and
    so are its gradients (an empty part drops out exactly)."""
    case = Case(B=2, T=24, S=64, N=4, K=2, H=32, dtype="float32")
    q, k, v, dout, _ = make_inputs(case)

    def part(q, k, v, lo, hi):
        lengths = jnp.full((case.B,), hi - lo, jnp.int32)
        ks = jnp.roll(k, -lo, axis=1)
        vs = jnp.roll(v, -lo, axis=1)
        return dot_product_attention(q, ks, vs, key_value_seq_lengths=lengths, return_residual=True)

    def merged(q, k, v):
        return merge_attention(*part(q, k, v, 0, split), *part(q, k, v, split, case.S))[0]

    def whole(q, k, v):
        return dot_product_attention(q, k, v)

    np.testing.assert_allclose(merged(q, k, v), whole(q, k, v), rtol=1e-5, atol=1e-5)
    g_merged = jax.grad(lambda *a: jnp.sum(merged(*a) * dout), argnums=(0, 1, 2))(q, k, v)
    g_whole = jax.grad(lambda *a: jnp.sum(whole(*a) * dout), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_merged, g_whole):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_merge_of_two_empty_parts_is_empty() -> None:
    out = jnp.zeros((1, 3, 2, 4))
    lse = jnp.full((1, 3, 2), -jnp.inf)
    o, l = merge_attention(out, lse, out, lse)
    assert np.all(o == 0) and np.all(np.isneginf(l))


def test_offsets_align_causal_bottom_right() -> None:
    """q_offsets = S - T puts the T queries at the end of the keys (new tokens of a cache): the
    same as the last T rows of full causal attention."""
    case = Case(B=2, T=5, S=40, N=4, K=2, H=32, dtype="float32")
    q, k, v, _, _ = make_inputs(case)
    qfull = jnp.concatenate([jnp.ones((2, 35, 4, 32)), q], axis=1)
    want = dot_product_attention(qfull, k, v, is_causal=True, implementation="xla")[:, 35:]
    for impl in backends.NAMES:
        if not served(impl, q, k, v, dict(is_causal=True, q_offsets=35)):
            continue
        got = dot_product_attention(q, k, v, is_causal=True, q_offsets=35, implementation=impl)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("impl", backends.NAMES)
def test_traced_scale_is_differentiable(impl: str) -> None:
    """A learnable temperature: d loss / d scale matches the reference's autodiff (or the backend
    says it cannot serve a traced scale)."""
    case = Case(B=1, T=20, S=30, N=2, K=1, H=16, dtype="float32")
    q, k, v, dout, _ = make_inputs(case)

    def loss(scale, impl):
        return jnp.sum(dot_product_attention(q, k, v, scale=scale, implementation=impl) * dout)

    if backends.REGISTRY[impl].kernels:  # the kernels take a static scale only
        with pytest.raises(ValueError, match="cannot serve this call: .*"):
            jax.grad(loss)(0.37, impl)
        return
    got = jax.grad(loss)(0.37, impl)
    want = jax.grad(loss)(0.37, "xla")
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(
        jax.jit(loss, static_argnums=1)(0.37, impl), loss(0.37, "xla"), rtol=1e-5
    )
