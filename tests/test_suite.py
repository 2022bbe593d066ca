"""The shared suite: every case through every registered implementation that says it serves it.

A case is written once; each backend of `flashjax.backends.REGISTRY` (but the reference "xla",
which the cases are checked against) runs it against the float64 reference by DESIGN.md's rule, or,
where it declares it cannot serve the case, must raise the "cannot serve" error naming the feature.
A new backend inherits the whole suite by registering. On CPU the kernels run in interpret mode
with small tiles (configs.py), so these shapes cross several tiles; the GPU tier (`-m gpu`) is the
same cases at larger shapes, compiled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, assert_close, cannot_serve, make_inputs, run, run_reference64, served

from flashjax import backends, dot_product_attention

IMPLS = tuple(name for name in backends.NAMES if name != "xla")
KERNEL_IMPLS = tuple(name for name, b in backends.REGISTRY.items() if b.kernels)

CASES = [
    Case(),
    Case(B=1, T=1, S=17, N=2, K=2, H=64),
    Case(B=1, T=1, S=1, N=3, K=1, H=8),
    Case(B=1, T=17, S=1, N=2, K=1, H=64, features=("causal",)),
    Case(B=1, T=113, S=113, N=4, K=1, H=72, features=("causal",)),
    Case(B=2, T=203, S=113, N=4, K=4, H=64, features=("causal",)),
    Case(B=1, T=96, S=128, N=2, K=2, H=128, features=("window",)),
    Case(B=1, T=113, S=113, N=8, K=2, H=40, features=("causal", "window")),
    Case(B=1, T=64, S=80, N=2, K=2, H=256),
    Case(B=2, T=50, S=77, N=4, K=2, H=64, features=("softcap", "bias")),
    Case(B=2, T=50, S=77, N=4, K=4, H=64, features=("rowbias",)),
    Case(B=1, T=70, S=90, N=4, K=2, H=128, features=("colbias", "causal")),
    Case(B=2, T=40, S=70, N=2, K=1, H=64, features=("headbias", "softcap")),
    Case(B=2, T=70, S=70, N=4, K=2, H=64, features=("segments", "causal")),
    Case(B=2, T=70, S=70, N=4, K=2, H=64, features=("large", "segments", "causal")),
    Case(B=2, T=60, S=90, N=2, K=1, H=64, features=("lengths", "mask")),
    Case(B=2, T=60, S=90, N=4, K=2, H=64, features=("lengths", "garbage", "causal")),
    Case(B=2, T=70, S=90, N=4, K=2, H=32, features=("offsets", "causal")),
    Case(B=2, T=48, S=100, N=2, K=1, H=32, features=("offsets", "window", "lengths")),
    # A decode step: few new tokens, GQA, a cache with lengths and NaN past them.
    Case(B=3, T=2, S=150, N=4, K=1, H=32, features=("offsets", "lengths", "garbage", "causal")),
    Case(B=2, T=77, S=150, N=4, K=2, H=32, features=("blocks",)),
    Case(B=1, T=90, S=100, N=4, K=4, H=32, features=("blocks", "causal", "segments", "dropout")),
    Case(B=1, T=100, S=90, N=4, K=2, H=32, features=("maskfn", "softcap", "lengths")),
    Case(B=2, T=256, S=300, N=4, K=2, H=64, features=("blocks128", "segments", "causal")),
    Case(B=1, T=64, S=64, N=2, K=2, H=64, features=("dropout",)),
    Case(B=1, T=100, S=130, N=4, K=2, H=128, features=("dropout", "causal")),
    Case(B=1, T=64, S=96, N=4, K=1, H=64, features=("dropout", "causal", "bias")),
    Case(B=1, T=45, S=45, N=2, K=2, H=64, dtype="float16", features=("causal",)),
    Case(B=1, T=45, S=61, N=2, K=1, H=96, dtype="float32", features=("window", "softcap")),
]

# The GPU tier: the same features at larger shapes (the real configs' tiles, several of them),
# combined into few cases so that the tier fits one device call (each case compiles three kernels
# per backend and two references). float32 (slow to compile, 54 s a case) and T > S run on CPU
# only (both are shape and dtype logic the interpreted kernels share with the compiled ones).
GPU_CASES = [
    Case(B=2, T=1024, S=1024, N=8, K=8, H=64),
    Case(B=1, T=777, S=1903, N=8, K=2, H=72, features=("causal", "offsets")),
    Case(B=1, T=2048, S=2048, N=8, K=1, H=128, dtype="float16", features=("causal", "window")),
    Case(B=1, T=1000, S=1100, N=4, K=2, H=256, features=("bias", "softcap", "dropout")),
    Case(B=2, T=1024, S=1024, N=4, K=1, H=256, features=("large", "segments", "causal", "window")),
    Case(B=2, T=1024, S=1024, N=4, K=2, H=128, features=("rowbias", "causal", "blocks")),
    Case(B=2, T=1000, S=1300, N=4, K=2, H=128, features=("lengths", "garbage", "mask")),
    Case(B=1, T=1000, S=1100, N=4, K=2, H=64, features=("maskfn", "segments", "dropout")),
    Case(
        B=2,
        T=1024,
        S=1100,
        N=4,
        K=2,
        H=128,
        features=("blocks128", "segments", "causal", "dropout"),
    ),
    # Decode steps (the decode kernel serves these; the training kernels too).
    Case(B=3, T=1, S=9000, N=32, K=8, H=128, features=("lengths", "garbage")),
    Case(B=2, T=4, S=3000, N=16, K=4, H=64, features=("offsets", "lengths", "causal", "window")),
]


_REFERENCES: dict[str, tuple] = {}


def _references(case: Case, q, k, v, dout, kw) -> tuple:
    """(naive, float64) results of a case, computed once for all the backends that run it (the
    inputs depend on the case alone); the GPU tier's time is mostly these."""
    if case.id not in _REFERENCES:
        naive = run("xla", q, k, v, dout, kw)
        _REFERENCES[case.id] = (naive, run_reference64(q, k, v, dout, kw))
    return _REFERENCES[case.id]


def check_case(case: Case, impl: str) -> None:
    q, k, v, dout, kw = make_inputs(case)
    if not served(impl, q, k, v, kw):
        return
    got = run(impl, q, k, v, dout, kw)
    naive, ref64 = _references(case, q, k, v, dout, kw)
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    assert got[1].dtype == jnp.float32 and got[1].shape == (case.B, case.T, case.N)
    assert_close(got, naive, ref64, label=f"{impl} {case.id}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_float64_reference(case: Case, impl: str) -> None:
    check_case(case, impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_matches_float64_reference(case: Case, impl: str) -> None:
    check_case(case, impl)


def test_float64_cannot_be_served_by_the_kernels() -> None:
    """Every backend either computes float64 exactly or says it cannot serve it."""
    with jax.enable_x64(True):
        case = Case(B=1, T=40, S=50, N=2, K=1, H=32, dtype="float64", features=("causal",))
        q, k, v, dout, kw = make_inputs(case)
        for impl in IMPLS:
            if cannot_serve(impl, q, k, v, kw) is not None:
                with pytest.raises(ValueError, match="cannot serve this call: dtype"):
                    run(impl, q, k, v, dout, kw)
                continue
            got = run(impl, q, k, v, dout, kw)
            want = run("xla", q, k, v, dout, kw)
            for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
                assert g.dtype == jnp.float64 or name == "lse", (impl, name, g.dtype)
                np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12, err_msg=f"{impl} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_gradient_matches_reference(impl: str) -> None:
    """d bias for a full and a broadcast bias, against the reference's autodiff."""
    case = Case(B=2, T=40, S=56, N=4, K=2, H=64, dtype="float32")
    q, k, v, dout, _ = make_inputs(case)
    rng = np.random.default_rng(1)
    for shape in ((1, 4, 40, 56), (2, 1, 1, 56), (1, 4, 40, 1)):
        bias = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        if not served(impl, q, k, v, dict(bias=bias, logits_soft_cap=4.0)):
            continue

        def loss(bias, impl):
            out = dot_product_attention(q, k, v, bias, implementation=impl, logits_soft_cap=4.0)
            return jnp.sum(out * dout)

        grad = jax.jit(jax.grad(loss), static_argnums=1)
        want, got = grad(bias, "xla"), grad(bias, impl)
        assert got.shape == shape
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=f"{impl} {shape}")


@pytest.mark.parametrize("impl", IMPLS)
def test_row_without_visible_key_outputs_zero(impl: str) -> None:
    """A query with no visible key outputs 0 and logsumexp -inf, with finite, zero gradients."""
    case = Case(B=1, T=20, S=30, N=2, K=2, H=64, dtype="float32")
    q, k, v, dout, _ = make_inputs(case)
    mask = jnp.ones((20, 30), bool).at[3].set(False)
    kw = dict(mask=mask, key_value_seq_lengths=jnp.array([30]), query_seq_lengths=jnp.array([15]))
    if not served(impl, q, k, v, kw):
        return
    out, lse, dq, dk, dv = run(impl, q, k, v, dout, kw)
    assert np.all(out[0, 3] == 0) and np.all(out[0, 15:] == 0)
    assert np.all(np.isneginf(lse[0, 3])) and np.all(np.isneginf(lse[0, 15:]))
    assert np.all(np.isfinite(dq)) and np.all(dq[0, 3] == 0) and np.all(dq[0, 15:] == 0)
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))


@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_is_shift_invariant(impl: str) -> None:
    """A constant bias of -1000 (every logit far below exp's underflow) changes nothing."""
    case = Case(B=1, T=40, S=40, N=2, K=2, H=64, dtype="float32")
    q, k, v, dout, _ = make_inputs(case)
    shift = dict(is_causal=True, bias=jnp.full((40, 40), -1000.0))
    if not served(impl, q, k, v, shift):
        return
    plain = run(impl, q, k, v, dout, dict(is_causal=True))
    shifted = run(impl, q, k, v, dout, shift)
    for name, a, b in zip(
        ("out", "dq", "dk", "dv"), plain[:1] + plain[2:], shifted[:1] + shifted[2:]
    ):
        # float32 logits near -1000 carry ~1e-4 absolute rounding; the old overflow gave NaN.
        np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max(), err_msg=f"{impl} {name}")
    np.testing.assert_allclose(shifted[1], plain[1] - 1000.0, rtol=1e-6, err_msg=f"{impl} lse")


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates_to_its_row_only(impl: str) -> None:
    case = Case(B=1, T=40, S=40, N=2, K=2, H=64, dtype="float32")
    q, k, v, _, _ = make_inputs(case)
    q = q.at[0, 7, 1, 5].set(jnp.nan)
    if not served(impl, q, k, v, dict(is_causal=True)):
        return
    out = dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    assert np.all(np.isnan(out[0, 7, 1]))
    bad = np.isnan(np.asarray(out))
    bad[0, 7, 1] = False
    assert not bad.any()


@pytest.mark.parametrize("impl", backends.NAMES)
def test_agrees_with_jax_nn(impl: str) -> None:
    """Independent check of the API semantics: jax.nn's own XLA attention on shared features."""
    case = Case(B=2, T=48, S=48, N=4, K=2, H=32, dtype="float32")
    q, k, v, _, _ = make_inputs(case)
    rng = np.random.default_rng(0)
    bias = jnp.asarray(rng.standard_normal((1, 4, 48, 48)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 1, 48, 48)) > 0.2)
    lengths = jnp.array([48, 31], jnp.int32)
    for kw in (
        dict(is_causal=True),
        dict(local_window_size=(5, 2)),
        dict(local_window_size=3, is_causal=True),
        dict(bias=bias, mask=mask),
        dict(key_value_seq_lengths=lengths),
        dict(scale=0.3, is_causal=True),
        dict(scale=-0.7),
        dict(scale=0.0, is_causal=True),
    ):
        if not served(impl, q, k, v, kw):
            continue
        want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)
        got = jax.jit(functools.partial(dot_product_attention, implementation=impl, **kw))(q, k, v)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_three_d_inputs(impl: str) -> None:
    """`(T, N, H)` inputs like jax.nn."""
    case = Case(B=1, T=33, S=33, N=2, K=2, H=64, dtype="float32")
    q, k, v, _, _ = make_inputs(case)
    if not served(impl, q, k, v, dict(is_causal=True)):
        return
    got = dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation=impl)
    want = dot_product_attention(q, k, v, is_causal=True, implementation="xla")[0]
    assert got.shape == q[0].shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_is_reproducible_and_regenerated(impl: str) -> None:
    """Same key: same output; another key: another mask; the kernels' bits equal the reference's."""
    case = Case(B=1, T=64, S=64, N=2, K=2, H=64, dtype="float32")
    q, k, v, _, _ = make_inputs(case)
    dropout = dict(dropout_rate=0.3, dropout_rng=jax.random.PRNGKey(1))
    if not served(impl, q, k, v, dropout):
        return

    def f(key, impl=impl, **kw):
        return dot_product_attention(
            q, k, v, dropout_rate=0.3, dropout_rng=key, implementation=impl, **kw
        )

    a, b = f(jax.random.PRNGKey(1)), f(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, f(jax.random.PRNGKey(2)))
    np.testing.assert_allclose(a, f(jax.random.PRNGKey(1), impl="xla"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        f(jax.random.key(3), dropout_broadcast=True),
        f(jax.random.key(3), impl="xla", dropout_broadcast=True),
        rtol=1e-5,
        atol=1e-5,
    )
