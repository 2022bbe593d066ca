"""BlockMask and the patterns: construction, classification, errors, and use in the op."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, make_inputs, served

from flashjax import BlockMask, backends, block_masks, dot_product_attention, flax_attention_fn
from pallas_kernels.operands import EMPTY, FULL, PARTIAL

IMPLS = tuple(name for name in backends.NAMES if name != "xla")


def test_from_blocks_to_dense() -> None:
    blocks = jnp.array([[True, False, True], [False, True, False]])
    bm = BlockMask.from_blocks(blocks, (16, 32))
    dense = np.asarray(bm.to_dense())
    assert dense.shape == (1, 1, 32, 96)
    want = np.repeat(np.repeat(np.asarray(blocks), 16, 0), 32, 1)
    np.testing.assert_array_equal(dense[0, 0], want)
    assert float(bm.density) == pytest.approx(0.5)


def test_from_mask_fn_classifies_blocks_by_brute_force() -> None:
    def fn(b, h, i, j):
        return (j <= i) & ((j // 7) != (h + 1))

    bm = BlockMask.from_mask_fn(fn, 100, 90, block_size=(32, 16), heads=3)
    assert bm.states.shape == (1, 3, 4, 6)
    dense = np.asarray(bm.to_dense())
    for h in range(3):
        for qb in range(4):
            for kb in range(6):
                tile = dense[0, h, qb * 32 : (qb + 1) * 32, kb * 16 : (kb + 1) * 16]
                want = FULL if tile.all() else PARTIAL if tile.any() else EMPTY
                assert int(bm.states[0, h, qb, kb]) == want, (h, qb, kb)


@pytest.mark.parametrize(
    "make",
    [
        functools.partial(block_masks.local, window=2),
        functools.partial(block_masks.strided, stride=3),
        functools.partial(block_masks.fixed, stride=4, summary=1),
        block_masks.butterfly,
        functools.partial(block_masks.global_tokens, num_global=2),
        functools.partial(block_masks.bigbird, window=1, num_global=1, num_random=2),
    ],
    ids=["local", "strided", "fixed", "butterfly", "global_tokens", "bigbird"],
)
def test_patterns_keep_the_diagonal(make) -> None:
    bm = make(1000, block_size=(64, 64))
    blocks = np.asarray(bm.states[0, 0]) != EMPTY
    assert blocks.shape == (16, 16)
    assert np.all(np.diag(blocks))
    assert 0 < blocks.mean() < 1


def test_butterfly_formula() -> None:
    """Kept iff i == j or i XOR j is a power of two: log2(n) + 1 blocks per row at n = 2^k."""
    bm = block_masks.butterfly(64 * 32, block_size=64)
    blocks = np.asarray(bm.states[0, 0]) != EMPTY
    assert np.all(blocks.sum(axis=1) == 6)
    assert blocks[5, 5 ^ 8] and not blocks[5, 5 ^ 3]


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (lambda: BlockMask.from_blocks(jnp.ones((2, 2), jnp.int32), 16), TypeError, "bool"),
        (lambda: BlockMask.from_blocks(jnp.ones((2,), bool), 16), ValueError, "shape"),
        (lambda: BlockMask.from_blocks(jnp.ones((2, 2), bool), 24), ValueError, "multiples of 16"),
        (lambda: BlockMask.from_blocks(jnp.ones((2, 2), bool), (16, 0)), ValueError, "block_size"),
        (lambda: BlockMask.from_mask_fn("no", 10, 10), TypeError, "callable"),
        (lambda: BlockMask.from_mask_fn(lambda b, h, i, j: i >= j, 0, 10), ValueError, "q_len"),
    ],
)
def test_bad_masks_raise(bad, error, message) -> None:
    with pytest.raises(error, match=message):
        bad()


def test_a_mask_that_does_not_fit_the_call_names_block_mask() -> None:
    q = jnp.ones((2, 64, 4, 16))
    with pytest.raises(ValueError, match="block_mask has 3 x 4 blocks"):
        dot_product_attention(q, q, q, block_mask=BlockMask.from_blocks(jnp.ones((3, 4), bool), 16))
    fn_mask = BlockMask.from_mask_fn(lambda b, h, i, j: i >= j, 60, 64, block_size=16)
    with pytest.raises(ValueError, match="block_mask was built for q_len=60"):
        dot_product_attention(q, q, q, block_mask=fn_mask)
    with pytest.raises(ValueError, match="block_mask states"):
        dot_product_attention(
            q, q, q, block_mask=BlockMask.from_blocks(jnp.ones((3, 4, 4), bool), 16)
        )
    with pytest.raises(TypeError, match="block_mask must be a flashjax.BlockMask"):
        dot_product_attention(q, q, q, block_mask=jnp.ones((4, 4), bool))


@pytest.mark.parametrize("impl", IMPLS)
def test_block_mask_equals_its_dense_mask(impl: str) -> None:
    """The op with a block mask computes what the reference computes with the mask made dense,
    forward and backward, under jit, with causal and GQA."""
    case = Case(B=2, T=100, S=100, N=4, K=2, H=32, dtype="float32")
    q, k, v, dout, _ = make_inputs(case)
    bm = block_masks.bigbird(100, block_size=32, num_random=1, seed=3)
    if not served(impl, q, k, v, dict(block_mask=bm, is_causal=True)):
        return

    def loss(q, k, v, impl, **kw):
        return jnp.sum(
            dot_product_attention(q, k, v, is_causal=True, implementation=impl, **kw) * dout
        )

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    got = jax.jit(grad, static_argnums=3)(q, k, v, impl, block_mask=bm)
    want = grad(q, k, v, "xla", mask=bm.to_dense(100, 100))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_row_that_sees_nothing_gives_zero_and_finite_gradients(impl: str) -> None:
    blocks = jnp.ones((4, 4), bool).at[1].set(False)  # query block 1 sees nothing
    bm = BlockMask.from_blocks(blocks, 16)
    case = Case(B=1, T=64, S=64, N=2, K=2, H=16, dtype="float32")
    q, k, v, dout, _ = make_inputs(case)
    if not served(impl, q, k, v, dict(block_mask=bm)):
        return

    def f(q, k, v):
        return dot_product_attention(q, k, v, block_mask=bm, implementation=impl)

    out = f(q, k, v)
    assert np.all(out[0, 16:32] == 0)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * dout), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(grads[0][0, 16:32] == 0)


def test_flax_attention_fn_takes_a_block_mask() -> None:
    case = Case(B=2, T=48, S=48, N=2, K=2, H=16, dtype="float32")
    q, k, v, _, _ = make_inputs(case)
    bm = block_masks.local(48, block_size=16, window=1)
    got = flax_attention_fn(q, k, v, block_mask=bm)
    want = dot_product_attention(q, k, v, mask=bm.to_dense(), implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flax_modules_take_a_block_mask() -> None:
    from flax import linen as nn
    from flax import nnx

    from flashjax import linen as flinen
    from flashjax import nnx as fnnx

    bm = block_masks.local(32, block_size=16, window=0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 16)), jnp.float32)
    ours = fnnx.MultiHeadAttention(2, 16, decode=False, block_mask=bm, rngs=nnx.Rngs(0))
    flax = nnx.MultiHeadAttention(2, 16, decode=False, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ours(x), flax(x, mask=bm.to_dense()), rtol=1e-5, atol=1e-5)

    module = flinen.MultiHeadDotProductAttention(num_heads=2, block_mask=bm)
    params = module.init(jax.random.key(0), x)
    plain = nn.MultiHeadDotProductAttention(num_heads=2)
    np.testing.assert_allclose(
        module.apply(params, x),
        plain.apply(params, x, mask=bm.to_dense()),
        rtol=1e-5,
        atol=1e-5,
    )
