"""The public op's own behaviour: the registry's choice, the merge, offsets, scale, dropout bits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NAMES, Case, assert_close, make_inputs, run, run_reference64, seed_of, served

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


def test_exp2_on_fma_is_exp2_with_exact_zeros() -> None:
    """`common.exp2_on_fma` (FA4's exp2 on the FMA pipe) against float64 exp2 on fresh inputs
    over the range a softmax weight takes (<= 8 with FA4's lazy rescale): relative error below
    1e-4 (a bfloat16 weight rounds at 4e-3), and exactly 0 at -inf and below -127 (masked keys
    must not reach the output); `exp2_split` takes it on the first columns only."""
    key = jax.random.key(seed_of("exp2_on_fma"))
    x = jax.random.uniform(key, (4096, 16), jnp.float32, -126.0, 8.0)
    got = np.asarray(common.exp2_on_fma(x), np.float64)
    want = np.exp2(np.asarray(x, np.float64))
    assert np.max(np.abs(got - want) / want) < 1e-4
    edges = jnp.array([-jnp.inf, -1e30, -200.0, -127.0], jnp.float32)
    assert np.all(np.asarray(common.exp2_on_fma(edges)) == 0.0)
    split = np.asarray(common.exp2_split(x, 8))
    np.testing.assert_array_equal(split[:, :8], np.asarray(common.exp2_on_fma(x[:, :8])))
    np.testing.assert_array_equal(split[:, 8:], np.asarray(jnp.exp2(x[:, 8:])))
    whole = np.asarray(common.exp2_split(x, x.shape[-1]))  # every column (no empty MUFU part)
    np.testing.assert_array_equal(whole, np.asarray(common.exp2_on_fma(x)))


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

    merged, whole = jax.jit(merged), jax.jit(whole)
    np.testing.assert_allclose(merged(q, k, v), whole(q, k, v), rtol=1e-5, atol=1e-5)
    g_merged = jax.jit(jax.grad(lambda *a: jnp.sum(merged(*a) * dout), argnums=(0, 1, 2)))(q, k, v)
    g_whole = jax.jit(jax.grad(lambda *a: jnp.sum(whole(*a) * dout), argnums=(0, 1, 2)))(q, k, v)
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


def test_deterministic_reaches_the_capability_check(monkeypatch) -> None:
    """`deterministic=True` is carried in the call's statics, where a backend whose backward is
    not bitwise reproducible declines it: a named one then raises, `implementation=None` passes
    over it to the next in the registry's order."""
    case = Case(B=1, T=8, S=8, N=1, K=1, H=16, dtype="float32")
    q, k, v, _, _ = make_inputs(case)
    assert operands(q, k, v, deterministic=True).statics.deterministic is True
    assert operands(q, k, v).statics.deterministic is False
    chunked, xla = backends.REGISTRY["xla_chunked"], backends.REGISTRY["xla"]

    def unsupported(ops):
        return "deterministic=True (an atomic dQ)" if ops.statics.deterministic else None

    monkeypatch.setitem(
        backends.REGISTRY, "xla_chunked", dataclasses.replace(chunked, unsupported=unsupported)
    )
    monkeypatch.setitem(backends.REGISTRY, "xla", dataclasses.replace(xla, platforms=("cpu",)))
    with pytest.raises(ValueError, match="'xla_chunked' cannot serve this call: deterministic"):
        dot_product_attention(q, k, v, implementation="xla_chunked", deterministic=True)
    assert backends.choose(None, operands(q, k, v)).name == "xla_chunked"
    assert backends.choose(None, operands(q, k, v, deterministic=True)).name == "xla"


DETERMINISTIC_CASES = [
    # Every training path: the Mosaic backward kernels run at head dim 128 (configs.py).
    Case(B=1, T=40, S=72, N=4, K=2, H=128, features=("causal", "segments", "dropout")),
    # A decode step (the decode backend serves it; its backward is the Triton kernels').
    Case(B=2, T=2, S=50, N=4, K=1, H=32, features=("offsets", "lengths", "causal")),
]


@pytest.mark.parametrize("impl", [name for name in backends.NAMES if name != "xla"])
@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=lambda c: c.id)
def test_deterministic_grads_are_bitwise_reproducible(case: Case, impl: str) -> None:
    """Under jit with `deterministic=True`, two runs on the same (freshly drawn, then freshly
    copied) inputs give bitwise identical outputs and gradients, within the tolerance rule of the
    float64 reference."""
    q, k, v, dout, kw = make_inputs(case, salt="deterministic")
    kw = kw | dict(deterministic=True)
    if not served(impl, q, k, v, kw):
        return
    first = run(impl, q, k, v, dout, kw)
    again = run(impl, *(jnp.array(x, copy=True) for x in (q, k, v, dout)), kw)
    for name, a, b in zip(NAMES, first, again):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), f"{impl} {name}: not bitwise identical run to run"
    naive = run("xla", q, k, v, dout, kw)
    assert_close(first, naive, run_reference64(q, k, v, dout, kw), label=f"{impl} {case.id}")
