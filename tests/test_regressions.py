"""Bugs found when the library was tried as a new user would; each test failed before its fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from helpers import Case, make_inputs, served

from flashjax import backends, dot_product_attention
from flashjax.attention import operands
from flashjax.backends import chunked

IMPLS = tuple(name for name in backends.NAMES if name != "xla")


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_broadcast_over_queries_gives_finite_dk_dv(impl: str) -> None:
    """A bias broadcast over queries with an entry above ~88.7 and T not a multiple of the dK/dV
    kernel's query tile made dK, dV all NaN (padded query rows had logsumexp 0 and were treated
    as real; exp2 of the bias overflowed). ALiBi built as slope * j hits it."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 17, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 16, 1, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 16, 1, 16)), jnp.float32)
    bias = jnp.full((1, 1, 1, 1), 89.0)
    if not served(impl, q, k, v, dict(bias=bias)):
        return

    def loss(q, k, v, impl):
        return jnp.sum(dot_product_attention(q, k, v, bias=bias, implementation=impl))

    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, impl)
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "xla")
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("impl", backends.NAMES)
def test_garbage_past_the_key_length_reaches_nothing(impl: str) -> None:
    """`key_value_seq_lengths=[2]` with NaN in `value[0, 2:]` (a padded KV cache holding garbage)
    made every output row NaN (0 * NaN in P.V): keys past the length must never be read."""
    case = Case(B=1, T=9, S=40, N=2, K=1, H=16, dtype="float32")
    q, k, v, dout, _ = make_inputs(case)
    bad_k, bad_v = k.at[0, 2:].set(jnp.nan), v.at[0, 2:].set(jnp.nan)
    lengths = jnp.array([2], jnp.int32)
    if not served(impl, q, k, v, dict(key_value_seq_lengths=lengths)):
        return

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=impl)
        return jnp.sum(out * dout), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, bad_k, bad_v)
    want = dot_product_attention(q, k[:, :2], v[:, :2], implementation="xla")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(grads[1][0, 2:] == 0) and np.all(grads[2][0, 2:] == 0)


@pytest.mark.parametrize(
    "mask",
    [jnp.where(jnp.tril(jnp.ones((8, 8), bool)), 0.0, -1e9), jnp.tril(jnp.ones((8, 8), jnp.int32))],
)
def test_non_bool_mask_is_refused(mask) -> None:
    """`mask=jnp.where(tril, 0.0, -1e9)` (an additive mask) was read as "nonzero = attend": row 7
    of a causal case output all zeros. The op takes bool masks only and points to `bias=`."""
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(TypeError, match="mask must be a bool array.*bias="):
        dot_product_attention(q, q, q, mask=mask)


def test_float64_default_path_is_float64_accurate() -> None:
    """float64 inputs on the default CPU path were only float32-accurate (the chunked path
    accumulated in float32: 1.7e-7 against a float64 reference); check_grads failed."""
    with jax.enable_x64(True):
        case = Case(B=1, T=20, S=36, N=2, K=1, H=8, dtype="float64", features=("causal",))
        q, k, v, _, _ = make_inputs(case)
        assert backends.choose(None, operands(q, k, v)).name == "xla_chunked"

        def f(q, k, v):
            return dot_product_attention(q, k, v, is_causal=True, local_window_size=(9, 0))

        want = dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(9, 0), implementation="xla"
        )
        np.testing.assert_allclose(f(q, k, v), want, rtol=1e-13, atol=1e-14)
        jax.test_util.check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_returns_empty(impl: str) -> None:
    """B = 0 raised ZeroDivisionError in the chunked path; jax.nn returns an empty array."""
    q = jnp.ones((0, 5, 2, 16))
    out, lse = dot_product_attention(q, q, q, return_residual=True, implementation=impl)
    assert out.shape == (0, 5, 2, 16) and lse.shape == (0, 5, 2)
    grad = jax.grad(lambda q: dot_product_attention(q, q, q, implementation=impl).sum())(q)
    assert grad.shape == q.shape


def test_head_dim_zero_is_refused() -> None:
    """Head dim 0 crashed with ZeroDivisionError; it now names the head dim."""
    q = jnp.ones((1, 5, 2, 0))
    with pytest.raises(ValueError, match="head dim must be in 1..256"):
        dot_product_attention(q, q, q)


def test_chunked_path_skips_invisible_tiles() -> None:
    """The CPU path computed every tile: causal and a 256-wide window at 32k took as long as full
    attention. Its visit lists now hold only the tiles the visibility rule lets through."""
    q = jnp.empty((1, 4096, 1, 16), jnp.float32)  # only the layout is built, nothing computed

    def visits(**kw) -> int:
        lay = chunked._Layout(operands(q, q, q, **kw))
        return int(np.sum(np.asarray(lay.lists)[..., 0]))

    n = 4096 // 512  # tiles per side
    assert visits() == n * n
    assert visits(is_causal=True) == n * (n + 1) // 2
    assert visits(is_causal=True, local_window_size=(256, 0)) == 2 * n - 1
    lengths = jnp.array([1000], jnp.int32)
    assert visits(key_value_seq_lengths=lengths) == n * 2
