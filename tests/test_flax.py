"""The Flax swap-ins against Flax's own attention: `flax_attention_fn`, `flashjax.nnx`,
`flashjax.linen`.

Flax's modules with their default `attention_fn` are the reference (deterministic case): same
parameter trees, same outputs and gradients (w.r.t. parameters and inputs) within float32
round-off. Dropout cannot match Flax bit for bit (flashjax draws its own mask), so it is checked
for reproducibility, the kept fraction and the inverted-dropout scaling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import flashjax
import flashjax.flax_attention
from flashjax import flax_attention_fn
from flashjax import linen as flinen
from flashjax import nnx as fnnx

IMPL = None  # the default implementation: the adapters are under test, not a backend
RTOL = 1e-5


def _normal(seed: int, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _assert_close(actual: Any, expected: Any, rtol: float = RTOL) -> None:
    """Same tree structure and shapes; per leaf, max |actual - expected| <= rtol * max |expected|,
    plus rtol times the largest value in the whole tree: some leaves are zero in exact arithmetic
    and hold round-off only (the gradient of the key projection's bias: softmax ignores a constant
    added to every logit of a row)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    pairs = [
        (np.asarray(a, np.float64), np.asarray(e, np.float64))
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    ]
    tree_scale = max(np.max(np.abs(e)) for _, e in pairs)
    for a, e in pairs:
        assert a.shape == e.shape
        assert np.all(np.isfinite(a)), "non-finite values"
        err, scale = np.max(np.abs(a - e)), np.max(np.abs(e))
        assert err <= rtol * (scale + tree_scale) + 1e-7, (
            f"max error {err:.3g} vs max |expected| {scale:.3g} (tree: {tree_scale:.3g})"
        )


def _padding_mask(lengths: list[int], seq: int) -> jax.Array:
    """`(B, seq)` float 1/0: 1 inside each sequence's length."""
    return (jnp.arange(seq)[None, :] < jnp.asarray(lengths)[:, None]).astype(jnp.float32)


class _Spy:
    """Records the keyword arguments `flax_attention_fn` hands to `dot_product_attention`."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        bias, mask = args[3], args[4]
        self.calls.append({"bias": bias, "mask": mask, **kwargs})
        return flashjax.dot_product_attention(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    recorder = _Spy()
    monkeypatch.setattr(flashjax.flax_attention, "dot_product_attention", recorder)
    return recorder


# --------------------------------------------------------------------------------------------------
# flax_attention_fn
# --------------------------------------------------------------------------------------------------


FN_CASES = [
    # (batch dims, T, S, N, H, bias shape, mask shape)
    pytest.param((2,), 9, 13, 3, 8, None, None, id="B2-T9-S13-N3-H8"),
    pytest.param((), 11, 11, 2, 8, (2, 11, 11), (1, 11, 11), id="noB-T11-N2-H8-bias-mask"),
    pytest.param((2, 3), 7, 10, 2, 8, None, (2, 3, 2, 7, 10), id="B2x3-T7-S10-mask-full"),
    pytest.param((2, 3), 7, 10, 2, 8, (1, 1, 1, 7, 10), (2, 1, 1, 1, 10), id="B2x3-bias1-mask2x1"),
    pytest.param((2, 3), 7, 7, 2, 8, (3, 2, 1, 7), (1, 1, 7, 7), id="B2x3-bias-rank4-mask-rank4"),
    pytest.param((2, 1, 2), 5, 6, 1, 4, None, (1, 1, 2, 1, 5, 6), id="B2x1x2-T5-S6-N1-H4-mask"),
]


@pytest.mark.parametrize("batch,seq_q,seq_k,heads,head_dim,bias_shape,mask_shape", FN_CASES)
def test_fn_matches_flax_dot_product_attention(
    batch: tuple[int, ...],
    seq_q: int,
    seq_k: int,
    heads: int,
    head_dim: int,
    bias_shape: tuple[int, ...] | None,
    mask_shape: tuple[int, ...] | None,
) -> None:
    """Any leading batch dims (none, one, several), bias/mask in every broadcast form: outputs
    and gradients (q, k, v, bias) equal `flax.linen.dot_product_attention`."""
    q = _normal(0, (*batch, seq_q, heads, head_dim))
    k = _normal(1, (*batch, seq_k, heads, head_dim))
    v = _normal(2, (*batch, seq_k, heads, head_dim))
    ct = _normal(3, q.shape)
    bias = None if bias_shape is None else _normal(4, bias_shape)
    mask = None
    if mask_shape is not None:
        mask = jax.random.bernoulli(jax.random.key(5), 0.7, mask_shape).astype(jnp.float32)
        # Every query row keeps its first key, so no row is fully masked (see the docstring).
        mask = mask.at[..., 0].set(1.0)

    def loss(fn: Callable[..., jax.Array], q, k, v, bias) -> jax.Array:
        return jnp.sum(fn(q, k, v, bias, mask, deterministic=True) * ct)

    ours = functools.partial(flax_attention_fn, implementation=IMPL)
    argnums = (1, 2, 3, 4) if bias is not None else (1, 2, 3)
    out = jax.jit(lambda *a: ours(*a, mask, deterministic=True))(q, k, v, bias)
    ref = nn.dot_product_attention(q, k, v, bias, mask, deterministic=True)
    assert out.shape == q.shape and out.dtype == ref.dtype
    _assert_close(out, ref)
    grad = jax.jit(jax.grad(loss, argnums=argnums), static_argnums=0)
    _assert_close(grad(ours, q, k, v, bias), grad(nn.dot_product_attention, q, k, v, bias))


def test_fn_gqa_and_causal_match_flax_nnx() -> None:
    """GQA (8 query heads over 2 KV heads) with `is_causal`, as `nnx.dot_product_attention`."""
    q, k, v = _normal(0, (2, 12, 8, 8)), _normal(1, (2, 12, 2, 8)), _normal(2, (2, 12, 2, 8))
    ct = _normal(3, q.shape)

    def loss(fn: Callable[..., jax.Array], q, k, v) -> jax.Array:
        return jnp.sum(fn(q, k, v, is_causal=True, deterministic=True) * ct)

    ours = functools.partial(flax_attention_fn, implementation=IMPL)
    _assert_close(ours(q, k, v, is_causal=True), nnx.dot_product_attention(q, k, v, is_causal=True))
    grads = jax.grad(loss, argnums=(1, 2, 3))(ours, q, k, v)
    _assert_close(grads, jax.grad(loss, argnums=(1, 2, 3))(nnx.dot_product_attention, q, k, v))


def test_fn_triton_interpret_matches_flax() -> None:
    """The Pallas kernels (interpret mode on CPU) behind the Flax convention: extra batch dims,
    a float causal mask from `nn.make_causal_mask`, gradients."""
    q, k, v = (_normal(i, (2, 1, 24, 2, 16)) for i in range(3))
    mask = nn.make_causal_mask(jnp.ones((2, 1, 24)))  # (2, 1, 1, 24, 24) float32
    ct = _normal(3, q.shape)

    def loss(fn: Callable[..., jax.Array], q, k, v) -> jax.Array:
        return jnp.sum(fn(q, k, v, mask=mask, deterministic=True) * ct)

    ours = functools.partial(flax_attention_fn, implementation="triton")
    _assert_close(ours(q, k, v, mask=mask), nn.dot_product_attention(q, k, v, mask=mask))
    grads = jax.grad(loss, argnums=(1, 2, 3))(ours, q, k, v)
    _assert_close(grads, jax.grad(loss, argnums=(1, 2, 3))(nn.dot_product_attention, q, k, v))


def test_fn_dtype_promotion_as_flax() -> None:
    """q, k, v are promoted to one dtype (or cast to `dtype`) as Flax's `promote_dtype` does."""
    q = _normal(0, (1, 6, 2, 8))
    k = _normal(1, (1, 6, 2, 8), jnp.bfloat16)
    v = _normal(2, (1, 6, 2, 8), jnp.bfloat16)
    out = flax_attention_fn(q, k, v, implementation=IMPL)
    ref = nn.dot_product_attention(q, k, v)
    assert out.dtype == ref.dtype == jnp.float32
    _assert_close(out, ref)
    out16 = flax_attention_fn(q, k, v, dtype=jnp.bfloat16, implementation=IMPL)
    assert out16.dtype == nn.dot_product_attention(q, k, v, dtype=jnp.bfloat16).dtype
    assert out16.dtype == jnp.bfloat16


def test_fn_rejects_what_it_cannot_honor() -> None:
    """Unknown keywords (e.g. nnx's `input_positions` for RoPE) raise instead of being silently
    dropped; mismatched batch dims and masks that do not broadcast raise ValueError."""
    q = _normal(0, (2, 3, 5, 2, 4))
    with pytest.raises(TypeError):
        flax_attention_fn(q, q, q, input_positions=jnp.arange(5))
    with pytest.raises(ValueError, match="batch dims"):
        flax_attention_fn(q, q[:1], q[:1])
    with pytest.raises(ValueError, match="mask"):
        flax_attention_fn(q, q, q, mask=jnp.ones((3, 3, 1, 5, 5)))
    with pytest.raises(ValueError, match="dropout_rate"):
        flax_attention_fn(q, q, q, dropout_rate=1.0)


def test_deterministic_grads_reaches_flashjax_apart_from_flax_deterministic(spy: _Spy) -> None:
    """`deterministic_grads` (function keyword, nnx argument, linen field) arrives at flashjax as
    `deterministic`; Flax's own `deterministic` (dropout off) does not."""
    q = _normal(0, (2, 6, 2, 8))
    flax_attention_fn(q, q, q, deterministic=True)
    assert spy.calls[-1]["deterministic"] is False
    flax_attention_fn(q, q, q, deterministic_grads=True)
    assert spy.calls[-1]["deterministic"] is True
    with pytest.raises(TypeError, match="deterministic_grads must be a Python bool"):
        flax_attention_fn(q, q, q, deterministic_grads=1)
    x = _normal(1, (2, 6, 16))
    fnnx.MultiHeadAttention(2, 16, decode=False, deterministic_grads=True, rngs=nnx.Rngs(0))(x)
    assert spy.calls[-1]["deterministic"] is True
    with pytest.raises(ValueError, match="not both"):
        fnnx.MultiHeadAttention(
            2, 16, attention_fn=flax_attention_fn, deterministic_grads=True, rngs=nnx.Rngs(0)
        )
    ours = flinen.MultiHeadDotProductAttention(num_heads=2, deterministic_grads=True)
    assert ours.attention_fn.keywords == {"deterministic_grads": True}
    ours.init(jax.random.key(0), x)
    assert spy.calls[-1]["deterministic"] is True


def _one_hot_values(batch: int, seq: int, heads: int) -> jax.Array:
    """`(batch, seq, heads, seq)` values with `v[b, j, n] = e_j`, so that `out[b, i, n, j]` is the
    (dropped-out) attention weight of query i on key j."""
    eye = jnp.eye(seq, dtype=jnp.float32)[None, :, None, :]
    return jnp.broadcast_to(eye, (batch, seq, heads, seq))


@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "per-head"])
def test_fn_dropout(broadcast: bool) -> None:
    """Dropout: off when deterministic; a fixed rng reproduces the output; about `1 - rate` of
    the weights survive, scaled by `1 / (1 - rate)`; `broadcast_dropout` shares one mask over
    batch and heads."""
    batch, seq, heads, rate = 2, 32, 2, 0.3
    # Values are one-hot, so the head dim (shared by q, k, v) is the key count.
    q, k = _normal(0, (batch, seq, heads, seq)), _normal(1, (batch, seq, heads, seq))
    v = _one_hot_values(batch, seq, heads)
    run = functools.partial(
        flax_attention_fn,
        q,
        k,
        v,
        dropout_rate=rate,
        broadcast_dropout=broadcast,
        implementation=IMPL,
    )
    weights = run(deterministic=True, dropout_rng=jax.random.key(7))
    _assert_close(weights, flax_attention_fn(q, k, v, implementation=IMPL))
    _assert_close(weights, nn.dot_product_attention(q, k, v))

    dropped = run(deterministic=False, dropout_rng=jax.random.key(7))
    np.testing.assert_array_equal(dropped, run(deterministic=False, dropout_rng=jax.random.key(7)))
    assert not np.array_equal(dropped, run(deterministic=False, dropout_rng=jax.random.key(8)))

    kept = np.asarray(dropped != 0)
    assert abs(kept.mean() - (1 - rate)) < 0.05, kept.mean()
    np.testing.assert_allclose(
        np.where(kept, dropped, 0.0), np.where(kept, weights / (1 - rate), 0.0), rtol=1e-5
    )
    # kept[b, i, n, j]: the same pattern for every (b, n) iff broadcast.
    same = all(np.array_equal(kept[0, :, 0], kept[b, :, n]) for b in range(2) for n in range(2))
    assert same == broadcast


# --------------------------------------------------------------------------------------------------
# flashjax.nnx.MultiHeadAttention
# --------------------------------------------------------------------------------------------------


def _nnx_pair(**kwargs: Any) -> tuple[nnx.MultiHeadAttention, fnnx.MultiHeadAttention]:
    """Flax's module and ours, built from the same seed (so with the same parameters)."""
    kwargs.setdefault("decode", False)
    flax_mha = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))
    ours = fnnx.MultiHeadAttention(**kwargs, implementation=IMPL, rngs=nnx.Rngs(0))
    return flax_mha, ours


def _shape_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"num_heads": 4, "in_features": 16}, id="N4-F16"),
        pytest.param(
            {"num_heads": 4, "in_features": 12, "qkv_features": 32, "out_features": 8},
            id="N4-F12-QKV32-O8",
        ),
        pytest.param({"num_heads": 4, "in_features": 16, "num_kv_heads": 2}, id="GQA-N4-K2"),
        pytest.param({"num_heads": 2, "in_features": 16, "normalize_qk": True}, id="normalize_qk"),
    ],
)
def test_nnx_same_params_as_flax(kwargs: dict[str, Any]) -> None:
    """The parameter tree (paths, shapes, dtypes and, from one seed, values) is Flax's."""
    flax_mha, ours = _nnx_pair(**kwargs)
    assert isinstance(ours, nnx.MultiHeadAttention)
    flax_params, our_params = nnx.state(flax_mha, nnx.Param), nnx.state(ours, nnx.Param)
    assert _shape_tree(our_params) == _shape_tree(flax_params)
    _assert_close(our_params, flax_params, rtol=0.0)


NNX_CASES = [
    pytest.param({}, {}, id="B2-T10-N4-H4"),
    pytest.param({"num_kv_heads": 2}, {}, id="GQA-N4-K2"),
    pytest.param({}, {"mask": "causal"}, id="causal-float-mask"),
    pytest.param({}, {"mask": "key-padding"}, id="key-padding-mask"),
    pytest.param({}, {"mask": "padding"}, id="padding-mask-valid-rows"),
    pytest.param({"num_kv_heads": 1}, {"inputs_k": True}, id="MQA-cross-T10-S7"),
    pytest.param({}, {"batch": (2, 2)}, id="B2x2-extra-batch-dim"),
]


def _nnx_inputs(
    call: dict[str, Any], in_features: int
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array]:
    """(inputs_q, inputs_k or None, mask or None, per-row loss weights `(*B, T, 1)`)."""
    batch = call.get("batch", (2,))
    seq_q = 10
    x = _normal(10, (*batch, seq_q, in_features))
    y = _normal(11, (*batch, 7, in_features)) if call.get("inputs_k") else None
    rows = jnp.ones((*batch, seq_q, 1))
    kind = call.get("mask")
    mask = None
    if kind == "causal":
        mask = nn.make_causal_mask(x[..., 0])
    elif kind == "key-padding":
        valid = _padding_mask([10, 6], seq_q)
        mask = nn.make_attention_mask(jnp.ones_like(valid), valid)
    elif kind == "padding":
        # Padded query rows see no key: Flax outputs the mean of the values there and flashjax
        # zero, so only valid rows enter the comparison (and the loss).
        valid = _padding_mask([10, 6], seq_q)
        mask = nn.make_attention_mask(valid, valid)
        rows = valid[..., None]
    return x, y, mask, rows


@pytest.mark.parametrize("module_kwargs,call", NNX_CASES)
def test_nnx_matches_flax(module_kwargs: dict[str, Any], call: dict[str, Any]) -> None:
    """Outputs and gradients (parameters and inputs) equal Flax's module with its default
    attention_fn."""
    flax_mha, ours = _nnx_pair(num_heads=4, in_features=16, **module_kwargs)
    x, y, mask, rows = _nnx_inputs(call, 16)
    ct = _normal(12, x.shape) * rows

    def loss(module: nnx.Module, x: jax.Array, y: jax.Array | None) -> jax.Array:
        return jnp.sum(module(x, y, mask=mask) * ct)

    _assert_close(ours(x, y, mask=mask) * rows, flax_mha(x, y, mask=mask) * rows)
    argnums = (0, 1, 2) if y is not None else (0, 1)
    grad = nnx.jit(nnx.grad(loss, argnums=argnums))
    _assert_close(grad(ours, x, y), grad(flax_mha, x, y))


def test_nnx_is_causal_reaches_flashjax_without_mask(spy: _Spy) -> None:
    """`__call__(..., is_causal=True)` arrives at flashjax as `is_causal`, never as a (T, T)
    mask, and equals Flax with `nn.make_causal_mask`; with a padding mask as well, both apply."""
    flax_mha, ours = _nnx_pair(num_heads=4, in_features=16)
    x = _normal(10, (2, 10, 16))
    causal = nn.make_causal_mask(x[..., 0])
    _assert_close(ours(x, is_causal=True), flax_mha(x, mask=causal))
    assert spy.calls[-1]["is_causal"] is True and spy.calls[-1]["mask"] is None
    valid = _padding_mask([10, 6], 10)
    pad = nn.make_attention_mask(jnp.ones_like(valid), valid)
    _assert_close(
        ours(x, mask=pad, is_causal=True), flax_mha(x, mask=nn.combine_masks(pad, causal))
    )
    assert spy.calls[-1]["is_causal"] is True and spy.calls[-1]["mask"].shape == (2, 1, 10, 10)


def test_nnx_triton_interpret_matches_flax() -> None:
    """The Pallas kernels (interpret mode on CPU) behind the nnx module, causal, with grads."""
    flax_mha = nnx.MultiHeadAttention(2, 32, decode=False, rngs=nnx.Rngs(0))
    ours = fnnx.MultiHeadAttention(2, 32, decode=False, implementation="triton", rngs=nnx.Rngs(0))
    x = _normal(10, (1, 24, 32))  # T = S = 24, H = 16
    ct = _normal(12, x.shape)
    causal = nn.make_causal_mask(x[..., 0])

    def loss(module: nnx.Module, x: jax.Array, causal_mask: jax.Array | None) -> jax.Array:
        return jnp.sum(module(x, mask=causal_mask, is_causal=causal_mask is None) * ct)

    _assert_close(ours(x, is_causal=True), flax_mha(x, mask=causal))
    grad = nnx.grad(loss, argnums=(0, 1))
    _assert_close(grad(ours, x, None), grad(flax_mha, x, causal))


def test_nnx_attention_fn_and_jit() -> None:
    """`attention_fn=functools.partial(flax_attention_fn, ...)` works, as does `nnx.jit`; modules
    built with one implementation share one attention_fn object (equal graph definitions)."""
    fn = functools.partial(flax_attention_fn, implementation="xla")
    flax_mha = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
    ours = fnnx.MultiHeadAttention(2, 8, decode=False, attention_fn=fn, rngs=nnx.Rngs(0))
    x = _normal(10, (2, 5, 8))
    _assert_close(nnx.jit(lambda m, x: m(x))(ours, x), flax_mha(x))
    a = fnnx.MultiHeadAttention(2, 8, implementation="xla_chunked", rngs=nnx.Rngs(0))
    b = fnnx.MultiHeadAttention(2, 8, implementation="xla_chunked", rngs=nnx.Rngs(1))
    assert a.attention_fn is b.attention_fn
    assert fnnx.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0)).attention_fn is flax_attention_fn
    with pytest.raises(ValueError, match="either"):
        fnnx.MultiHeadAttention(
            2, 8, attention_fn=fn, implementation="xla_chunked", rngs=nnx.Rngs(0)
        )


def test_nnx_dropout() -> None:
    """With dropout configured: deterministic=True equals Flax (no dropout); a fixed dropout
    stream reproduces the output; deterministic=False changes it."""
    kwargs = {"num_heads": 2, "in_features": 16, "dropout_rate": 0.4}
    flax_mha, ours = _nnx_pair(**kwargs)
    x = _normal(10, (2, 12, 16))
    clean = ours(x, deterministic=True)
    _assert_close(clean, flax_mha(x, deterministic=True))
    first = ours(x, deterministic=False, rngs=nnx.Rngs(dropout=3))
    again = ours(x, deterministic=False, rngs=nnx.Rngs(dropout=3))
    np.testing.assert_array_equal(first, again)
    assert np.max(np.abs(first - clean)) > 1e-3
    # The module's own stream (kept from the constructor's rngs) advances between calls.
    assert not np.array_equal(ours(x, deterministic=False), ours(x, deterministic=False))


def test_nnx_checkpoint_of_flax_loads_unchanged() -> None:
    """A Flax module's state, as a pure dict (what a checkpoint stores), loads into ours, and the
    two then compute the same function; and back."""
    kwargs = {"num_heads": 4, "in_features": 16, "num_kv_heads": 2, "decode": False}
    flax_mha = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(1))
    ours = fnnx.MultiHeadAttention(**kwargs, implementation=IMPL, rngs=nnx.Rngs(2))
    x = _normal(10, (2, 9, 16))
    assert np.max(np.abs(ours(x) - flax_mha(x))) > 1e-3  # different seeds, different params
    checkpoint = nnx.to_pure_dict(nnx.state(flax_mha, nnx.Param))
    state = nnx.state(ours, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpoint)
    nnx.update(ours, state)
    _assert_close(ours(x), flax_mha(x))
    back = nnx.state(flax_mha, nnx.Param)
    nnx.replace_by_pure_dict(back, nnx.to_pure_dict(nnx.state(ours, nnx.Param)))
    nnx.update(flax_mha, back)
    _assert_close(ours(x), flax_mha(x))


# --------------------------------------------------------------------------------------------------
# flashjax.linen.MultiHeadDotProductAttention
# --------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """A parent that names its attention automatically (`MultiHeadDotProductAttention_0`)."""

    cls: type[nn.MultiHeadDotProductAttention]
    options: tuple[tuple[str, Any], ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
        return self.cls(num_heads=4, **dict(self.options))(x, **kwargs)


def _linen_ours(**fields: Any) -> tuple[tuple[str, Any], ...]:
    return (("implementation", IMPL), *fields.items())


def test_linen_same_params_as_flax() -> None:
    """Same parameter tree, auto-generated names and values (from one key) as Flax's class."""
    x = _normal(10, (2, 10, 16))
    for options in [(), (("qkv_features", 32), ("out_features", 8), ("normalize_qk", True))]:
        flax_params = _Block(nn.MultiHeadDotProductAttention, options).init(jax.random.key(0), x)
        our_params = _Block(flinen.MultiHeadDotProductAttention, _linen_ours(**dict(options))).init(
            jax.random.key(0), x
        )
        assert "MultiHeadDotProductAttention_0" in flax_params["params"]
        assert _shape_tree(our_params) == _shape_tree(flax_params)
        _assert_close(our_params, flax_params, rtol=0.0)


LINEN_CASES = [
    pytest.param((2,), None, id="B2-T10"),
    pytest.param((2,), "causal", id="causal-float-mask"),
    pytest.param((2,), "key-padding", id="key-padding-mask"),
    pytest.param((2, 3), "causal", id="B2x3-extra-batch-dim-causal"),
]


@pytest.mark.parametrize("batch,mask_kind", LINEN_CASES)
def test_linen_matches_flax(batch: tuple[int, ...], mask_kind: str | None) -> None:
    """With Flax's parameters (a checkpoint of Flax's class), outputs and gradients (parameters
    and inputs) equal Flax's module with its default attention_fn."""
    x = _normal(10, (*batch, 10, 16))
    mask = None
    if mask_kind == "causal":
        mask = nn.make_causal_mask(x[..., 0])
    elif mask_kind == "key-padding":
        valid = _padding_mask([10, 4], 10)
        mask = nn.make_attention_mask(jnp.ones_like(valid), valid)
    ct = _normal(12, x.shape)
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=4)
    ours = flinen.MultiHeadDotProductAttention(num_heads=4, implementation=IMPL)
    params = flax_mha.init(jax.random.key(0), x)

    def loss(module: nn.Module, params: Any, x: jax.Array) -> jax.Array:
        return jnp.sum(module.apply(params, x, mask=mask) * ct)

    _assert_close(ours.apply(params, x, mask=mask), flax_mha.apply(params, x, mask=mask))
    grads = jax.grad(loss, argnums=(1, 2))(ours, params, x)
    _assert_close(grads, jax.grad(loss, argnums=(1, 2))(flax_mha, params, x))


def test_linen_is_causal_field_without_mask(spy: _Spy) -> None:
    """`is_causal=True` equals Flax with `nn.make_causal_mask`, reaches flashjax as `is_causal`
    (no mask), in cross attention too; gradients agree."""
    x, y = _normal(10, (2, 10, 16)), _normal(11, (2, 13, 16))
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=4)
    ours = flinen.MultiHeadDotProductAttention(num_heads=4, is_causal=True, implementation=IMPL)
    params = flax_mha.init(jax.random.key(0), x)
    causal = nn.make_causal_mask(x[..., 0])
    _assert_close(ours.apply(params, x), flax_mha.apply(params, x, mask=causal))
    assert spy.calls[-1]["is_causal"] is True and spy.calls[-1]["mask"] is None
    cross = nn.make_attention_mask(
        jnp.arange(10) * jnp.ones((2, 1)), jnp.arange(13), jnp.greater_equal
    )
    _assert_close(ours.apply(params, x, y), flax_mha.apply(params, x, y, mask=cross))

    def loss(module: nn.Module, params: Any, mask: jax.Array | None) -> jax.Array:
        return jnp.sum(module.apply(params, x, mask=mask) ** 2)

    _assert_close(
        jax.grad(loss, argnums=1)(ours, params, None),
        jax.grad(loss, argnums=1)(flax_mha, params, causal),
    )


def test_linen_fields_rebind_on_clone() -> None:
    """`clone()` rebinds `is_causal` / `implementation` instead of stacking them; decode mode
    drops `is_causal` (the cache mask already keeps decoding causal); equal modules stay equal;
    a user's `attention_fn` keeps its own keywords."""
    ours = flinen.MultiHeadDotProductAttention(
        num_heads=2, is_causal=True, implementation="xla_chunked"
    )
    assert ours.attention_fn.keywords == {"is_causal": True, "implementation": "xla_chunked"}
    assert ours.clone() == ours and hash(ours.clone()) == hash(ours)
    assert ours.clone(is_causal=False).attention_fn.keywords == {"implementation": "xla_chunked"}
    assert ours.clone(is_causal=False, implementation=None).attention_fn is flax_attention_fn
    assert ours.clone(decode=True).attention_fn.keywords == {"implementation": "xla_chunked"}
    user = functools.partial(flax_attention_fn, implementation="xla")
    custom = flinen.MultiHeadDotProductAttention(num_heads=2, attention_fn=user, is_causal=True)
    assert custom.attention_fn.keywords == {"implementation": "xla", "is_causal": True}
    assert custom.clone(is_causal=False).attention_fn is user


def _decode_linen_like_flax(
    flax_mha: nn.Module, ours: nn.Module, variables: dict, x: jax.Array
) -> None:
    """Decode `x` one token at a time through Flax's module and ours, both from Flax's
    `variables` (parameters and cache), each stepping its own cache: the steps agree."""
    params, flax_cache = variables["params"], variables["cache"]
    our_cache = flax_cache
    for t in range(x.shape[1]):
        step = x[:, t : t + 1]
        want, flax_vars = flax_mha.apply(
            {"params": params, "cache": flax_cache}, step, mutable=["cache"]
        )
        got, our_vars = ours.apply({"params": params, "cache": our_cache}, step, mutable=["cache"])
        flax_cache, our_cache = flax_vars["cache"], our_vars["cache"]
        _assert_close(got, want)


def test_linen_decode_with_is_causal_matches_flax() -> None:
    """Autoregressive decoding with the cache, in a module built with `is_causal=True`, equals
    Flax's decoding step by step."""
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, decode=True)
    ours = flinen.MultiHeadDotProductAttention(
        num_heads=4, decode=True, is_causal=True, implementation=IMPL
    )
    x = _normal(10, (2, 6, 16))
    _decode_linen_like_flax(flax_mha, ours, flax_mha.init(jax.random.key(0), x), x)


def test_linen_dropout() -> None:
    """With dropout configured: deterministic=True equals Flax; a fixed dropout rng reproduces
    the output; another rng changes it."""
    x = _normal(10, (2, 12, 16))
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.4)
    ours = flinen.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.4, implementation=IMPL)
    params = flax_mha.init(jax.random.key(0), x, deterministic=True)
    clean = ours.apply(params, x, deterministic=True)
    _assert_close(clean, flax_mha.apply(params, x, deterministic=True))

    def noisy(seed: int) -> jax.Array:
        return ours.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(noisy(3), noisy(3))
    assert not np.array_equal(noisy(3), noisy(4))
    assert np.max(np.abs(noisy(3) - clean)) > 1e-3


def test_flax_attention_fn_takes_segment_ids_with_extra_batch_dims() -> None:
    """Packed documents through the Flax calling convention equal the dense segment mask."""
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 20, 2, 16)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (2, 3, 20)), axis=-1), jnp.int32)
    got = flax_attention_fn(
        q,
        k,
        v,
        q_segment_ids=seg,
        kv_segment_ids=seg,
        is_causal=True,
        implementation="xla_chunked",
    )
    dense = (seg[..., :, None] == seg[..., None, :])[..., None, :, :]
    want = flax_attention_fn(q, k, v, mask=dense, is_causal=True, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Decoding with the cache: steps go through flashjax.decode_attention
# --------------------------------------------------------------------------------------------------


class _DecodeSpy:
    """Records the cache lengths `flax_attention_fn` hands to `decode_attention` (None under
    jit, where they are traced)."""

    def __init__(self) -> None:
        self.lengths: list[list[int] | None] = []

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        lengths = args[3]
        traced = isinstance(lengths, jax.core.Tracer)
        self.lengths.append(None if traced else np.asarray(lengths).tolist())
        return flashjax.decode_attention(*args, **kwargs)


@pytest.fixture
def decode_spy(monkeypatch: pytest.MonkeyPatch) -> _DecodeSpy:
    recorder = _DecodeSpy()
    monkeypatch.setattr(flashjax.flax_attention, "decode_attention", recorder)
    return recorder


def _nnx_decoders(impl: str | None, cache_shape: tuple[int, ...], **kwargs: Any):
    """Flax's nnx module and ours in decode mode, same parameters, caches of `cache_shape`."""
    kwargs = dict(num_heads=4, in_features=16, decode=True) | kwargs
    flax_mha = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))
    ours = fnnx.MultiHeadAttention(**kwargs, implementation=impl, rngs=nnx.Rngs(0))
    for m in (flax_mha, ours):
        m.init_cache(cache_shape)
    return flax_mha, ours


def test_nnx_decode_steps_run_decode_attention(decode_spy: _DecodeSpy) -> None:
    """Each one-token step is `decode_attention` over the cache with lengths cache_index + 1
    (the kernel, interpreted), and equals Flax's own decoding; GQA cache."""
    flax_mha, ours = _nnx_decoders("triton_decode", (2, 8, 16), num_kv_heads=2)
    x = _normal(20, (2, 4, 16))
    for t in range(x.shape[1]):
        _assert_close(ours(x[:, t : t + 1]), flax_mha(x[:, t : t + 1]))
    assert decode_spy.lengths == [[t + 1, t + 1] for t in range(x.shape[1])]


def test_nnx_decode_under_jit_with_extra_batch_dims(decode_spy: _DecodeSpy) -> None:
    """`nnx.jit` steps (one compilation, traced cache index), batch dims (2, 3), default
    implementation."""
    flax_mha, ours = _nnx_decoders(None, (2, 3, 8, 16))
    x = _normal(21, (2, 3, 5, 16))
    step = nnx.jit(lambda m, x: m(x))
    for t in range(x.shape[2]):
        _assert_close(step(ours, x[:, :, t : t + 1]), step(flax_mha, x[:, :, t : t + 1]))
    assert decode_spy.lengths == [None]  # traced once


def test_nnx_decode_with_a_mask_keeps_the_general_path(decode_spy: _DecodeSpy) -> None:
    """A caller's mask joins Flax's cache mask: no lengths can say that, so the step stays
    attention over the masked cache (and still equals Flax)."""
    flax_mha, ours = _nnx_decoders(None, (2, 8, 16))
    x = _normal(22, (2, 3, 16))
    hide_first = jnp.ones((2, 1, 1, 8), bool).at[:, :, :, 0].set(False)
    for t in range(x.shape[1]):
        got, want = (
            ours(x[:, t : t + 1], mask=hide_first),
            flax_mha(x[:, t : t + 1], mask=hide_first),
        )
        if t > 0:  # at t = 0 the only cached key is hidden: Flax averages, flashjax gives 0
            _assert_close(got, want)
    assert decode_spy.lengths == []


def test_linen_decode_steps_run_decode_attention(decode_spy: _DecodeSpy) -> None:
    """Linen's cache (`init` makes it, `apply(..., mutable=["cache"])` steps it): each step is
    `decode_attention` with lengths cache_index + 1 and equals Flax's decoding."""
    x = _normal(23, (2, 4, 16))
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, decode=True)
    ours = flinen.MultiHeadDotProductAttention(
        num_heads=4, decode=True, implementation="triton_decode"
    )
    variables = flax_mha.init(jax.random.key(0), x)
    assert decode_spy.lengths == []  # the initializing call is not a decode step
    _decode_linen_like_flax(flax_mha, ours, variables, x)
    assert decode_spy.lengths == [[t + 1, t + 1] for t in range(x.shape[1])]
