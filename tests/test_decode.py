"""`flashjax.decode_attention` and the split-KV decode kernel (interpret mode on CPU).

The reference is `dot_product_attention(q, cache, cache, q_offsets=lengths - T,
key_value_seq_lengths=lengths, is_causal=True, implementation="xla")` on the (gathered) cache, in
the same dtype (the naive error) and in float64 (the truth), by the tolerance rule of
tests/helpers.py. Shapes are small: the kernel's interpret-mode tiles (16 keys, 4 "cores") still
cut them into several blocks and several splits.
"""

from __future__ import annotations

import dataclasses

import jax

# Its first import registers a config, which retraces a jit traced before: done here, not mid-test.
import jax.experimental.pallas.fuser  # noqa: F401
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, seed_of

import flashjax
from flashjax import backends, decode_attention, dot_product_attention
from pallas_kernels import configs
from pallas_kernels.triton import decode as decode_kernel
from pallas_kernels.triton import decode_api


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """One decode call. `page` 0: a contiguous cache of `S` keys; else pages of `page` keys, `S`
    a multiple of it. `lengths`: "random" in [T, S], or "full"."""

    B: int = 2
    T: int = 1
    N: int = 4
    K: int = 2
    H: int = 32
    S: int = 96
    dtype: str = "bfloat16"
    page: int = 0
    lengths: str = "random"
    window: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.page and self.S % self.page:
            raise ValueError(f"S={self.S} is not a multiple of page={self.page}")

    @property
    def id(self) -> str:
        extra = [f"page{self.page}" if self.page else "contiguous", self.lengths]
        extra += [f"window{self.window}"] * (self.window is not None)
        extra += ["softcap"] * (self.softcap is not None)
        return f"B{self.B}-T{self.T}-N{self.N}-K{self.K}-H{self.H}-S{self.S}-{self.dtype}-" + (
            "-".join(extra)
        )

    def kwargs(self) -> dict:
        return dict(local_window_size=self.window, logits_soft_cap=self.softcap)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A decode call's arrays: `k`, `v` contiguous `(B, S, K, H)` views of the cache (what the
    reference reads) and `pools`, `table` when paged. Keys past the lengths hold NaN (garbage
    that must reach nothing)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    dout: jax.Array
    pools: tuple[jax.Array, jax.Array] | None = None
    table: jax.Array | None = None

    def cache(self) -> tuple[jax.Array, jax.Array, dict]:
        """The cache as `decode_attention` takes it, and its keywords."""
        if self.pools is None:
            return self.k, self.v, {}
        return *self.pools, {"page_table": self.table}


def make_inputs(case: DecodeCase, salt: str = "") -> Inputs:
    rng = np.random.default_rng(seed_of(case.id + salt))
    dt = jnp.dtype(case.dtype)

    def normal(*shape):
        return rng.standard_normal(shape)

    if case.lengths == "full":
        lengths = np.full(case.B, case.S)
    else:
        lengths = rng.integers(case.T, case.S + 1, case.B)
    q = jnp.asarray(normal(case.B, case.T, case.N, case.H), dt)
    dout = jnp.asarray(normal(case.B, case.T, case.N, case.H), dt)
    past = np.arange(case.S)[None, :, None, None] >= lengths[:, None, None, None]
    k = np.where(past, np.nan, normal(case.B, case.S, case.K, case.H))
    v = np.where(past, np.inf, normal(case.B, case.S, case.K, case.H))
    lengths = jnp.asarray(lengths, jnp.int32)
    if not case.page:
        return Inputs(q, jnp.asarray(k, dt), jnp.asarray(v, dt), lengths, dout)
    # Pages of all rows, shuffled, in a pool with unused pages of garbage.
    per_row = case.S // case.page
    num_pages = case.B * per_row + 3
    table = rng.permutation(num_pages)[: case.B * per_row].reshape(case.B, per_row)
    pools = []
    for x in (k, v):
        pool = np.full((num_pages, case.page, case.K, case.H), np.nan)
        pool[table] = x.reshape(case.B, per_row, case.page, case.K, case.H)
        pools.append(jnp.asarray(pool, dt))
    table = jnp.asarray(table, jnp.int32)
    return Inputs(q, jnp.asarray(k, dt), jnp.asarray(v, dt), lengths, dout, tuple(pools), table)


def _with_grads(fn, x: Inputs, cache=None) -> list[np.ndarray]:
    """`(out, lse, dq, dk, dv)` of `fn(q, k, v) -> (out, lse)`; the loss reads the lse too."""
    k, v = cache if cache is not None else (x.k, x.v)
    (out, lse), vjp = jax.vjp(fn, x.q, k, v)
    dlse = jnp.where(jnp.isfinite(lse), 0.1, 0.0).astype(lse.dtype)
    return [out, lse, *vjp((x.dout.astype(out.dtype), dlse))]


def reference(x: Inputs, kw: dict, grads: bool = False) -> list[np.ndarray]:
    """The naive XLA reference of the decode call, in the inputs' dtype."""
    seq_q = x.q.shape[1]

    def fn(q, k, v):
        return dot_product_attention(
            q,
            k,
            v,
            q_offsets=x.lengths - seq_q,
            key_value_seq_lengths=x.lengths,
            is_causal=True,
            return_residual=True,
            implementation="xla",
            **{n: w for n, w in kw.items() if w is not None},
        )

    return _with_grads(fn, x) if grads else list(fn(x.q, x.k, x.v))


def reference64(x: Inputs, kw: dict, grads: bool = False) -> list[np.ndarray]:
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(a, np.float64)) for a in (x.q, x.k, x.v, x.dout)]
        x64 = dataclasses.replace(x, q=up[0], k=up[1], v=up[2], dout=up[3], pools=None)
        return [np.asarray(a, np.float64) for a in reference(x64, kw, grads)]


def decoded(
    x: Inputs, kw: dict, impl: str | None = "triton_decode", grads: bool = False, **extra
) -> list[np.ndarray]:
    """`decode_attention`'s `(out, lse[, dq, dk, dv])`; with grads, dk and dv are w.r.t. the
    contiguous view (for a paged cache: gathered back from the pools' gradients)."""
    k, v, paging = x.cache()

    def fn(q, k, v):
        return decode_attention(
            q, k, v, x.lengths, return_residual=True, implementation=impl, **paging, **kw, **extra
        )

    if not grads:
        return list(fn(x.q, k, v))
    got = _with_grads(fn, x, (k, v))
    if x.table is not None:  # pool gradients -> the contiguous view's
        got[3:] = [g[x.table].reshape(x.k.shape) for g in got[3:]]
    return got


# --------------------------------------------------------------------------------------------------
# Contiguous caches
# --------------------------------------------------------------------------------------------------

CONTIGUOUS = [
    DecodeCase(),
    DecodeCase(B=3, T=3, N=8, K=2, H=64, S=77, dtype="float16", window=5, softcap=3.0),
    DecodeCase(B=1, T=4, N=4, K=1, H=40, S=64, dtype="float32", lengths="full"),
    DecodeCase(B=2, T=1, N=2, K=2, H=16, S=300, window=40),
    DecodeCase(B=2, T=3, N=6, K=2, H=16, S=90),  # G = 3, T = 3: both padded to 4
]


@pytest.mark.parametrize("case", CONTIGUOUS, ids=lambda c: c.id)
def test_contiguous_matches_reference(case: DecodeCase) -> None:
    x = make_inputs(case)
    got = decoded(x, case.kwargs())
    assert got[0].shape == x.q.shape and got[0].dtype == x.q.dtype
    assert got[1].shape == x.q.shape[:3] and got[1].dtype == jnp.float32
    assert_close(got, reference(x, case.kwargs()), reference64(x, case.kwargs()), label=case.id)


def test_gradients_match_reference() -> None:
    """d query, d key_cache, d value_cache (the training kernels' backward), NaN past the
    lengths reaching nothing."""
    case = DecodeCase(B=2, T=2, N=4, K=2, H=32, S=48, dtype="float32", window=20)
    x = make_inputs(case)
    kw = case.kwargs()
    got = decoded(x, kw, grads=True)
    assert_close(got, reference(x, kw, True), reference64(x, kw, True), label=case.id)


def test_every_split_count_gives_the_same_result() -> None:
    """1 split, a few, and more splits than key blocks (empty splits merge away exactly)."""
    case = DecodeCase(B=2, T=2, N=4, K=2, H=16, S=100, dtype="float32")
    x = make_inputs(case)
    want = reference64(x, {})
    for splits in (1, 3, 16):
        out, lse = decoded(x, {}, num_splits=splits)
        np.testing.assert_allclose(out, want[0], atol=2e-6, err_msg=f"{splits} splits")
        np.testing.assert_allclose(lse, want[1], atol=2e-6, err_msg=f"{splits} splits")


@pytest.mark.parametrize("splits, columns", [(2, None), (5, 8), (16, None)])
def test_merge_kernel_matches_the_merge(splits: int, columns: int | None) -> None:
    """The merge kernel against `flashjax.merge_attention_parts` on random partials: rows
    where some splits, or all, saw no key (0 and -inf), lse far apart; the padded split programs
    (5 -> 8) merge away; the head dim whole or cut over programs (`merge_columns`)."""
    rng = np.random.default_rng(seed_of(f"merge{splits}"))
    programs = decode_kernel.split_programs(splits)
    shape = (programs, 2, 2, 3, 4)  # (Sp, B, Tp, K, Gp)
    lse2 = rng.standard_normal(shape) * 40
    lse2[:, 0, 0, 0] = -np.inf  # no split saw a key
    lse2[rng.random(shape) < 0.3] = -np.inf
    lse2[splits:] = -np.inf
    parts = np.where(np.isinf(lse2)[..., None], 0.0, rng.standard_normal((*shape, 16)))
    got = decode_kernel.merge_splits(
        jnp.asarray(parts, jnp.float32),
        jnp.asarray(lse2, jnp.float32),
        jnp.bfloat16,
        config=dataclasses.replace(
            configs.get_decode_config(16, "interpret"), merge_columns=columns
        ),
        interpret=True,
    )
    with jax.enable_x64(True):
        want = flashjax.merge_attention_parts(jnp.asarray(parts), jnp.asarray(lse2 * np.log(2)))
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[0], np.float32), want[0], atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(got[1]) * np.log(2), want[1], rtol=1e-6)
    assert np.array_equal(np.isneginf(got[1]), np.isneginf(want[1]))


@pytest.mark.parametrize("impl", ["triton_decode", "xla_chunked"])
def test_traced_lengths_under_jit(impl: str) -> None:
    """The lengths are data: one compilation serves every length; a traced length past the
    capacity is the capacity (the kernel reads the lengths alone and clips them itself; the
    other paths take `Operands.seq_info`'s clipped rows), for T = 1 and T = 3."""
    for seq_q in (1, 3):
        case = DecodeCase(B=2, T=seq_q, N=4, K=2, H=16, S=64, dtype="float32", lengths="full")
        x = make_inputs(case)
        step = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, implementation=impl))
        for lengths in ([3, 64], [33, 17], [70, 9], [64, 1000]):
            n = jnp.asarray(lengths, jnp.int32)
            got = step(x.q, x.k, x.v, n)
            want = reference(dataclasses.replace(x, lengths=jnp.minimum(n, case.S)), {})[0]
            np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"T={seq_q} {lengths}")
        assert step._cache_size() == 1


def test_split_rule() -> None:
    """Splits only where batch x KV heads leave cores idle, each split keeping its blocks."""
    config = configs.DecodeConfig(128, 4, 3, waves=1, paged_waves=2, min_blocks=2)
    assert configs.decode_splits(8, 512, 132, config) == 16  # 1 x 64k, 8 KV heads: one wave
    assert configs.decode_splits(8, 512, 132, config, paged=True) == 33  # two waves
    assert configs.decode_splits(24, 512, 132, config) == 5  # no partial wave: 120 programs
    assert configs.decode_splits(512, 32, 132, config) == 1  # 64 x 4k: the batch fills the GPU
    assert configs.decode_splits(512, 32, 132, config, paged=True) == 2  # paged, past 2 waves
    assert configs.decode_splits(256, 64, 132, config, paged=True) == 1  # 32 x 8k: within them
    assert configs.decode_splits(512, 2, 132, config, paged=True) == 1  # ... 2 blocks per split
    assert configs.decode_splits(8, 4, 132, config) == 2  # a short cache: 2 blocks per split
    case = DecodeCase(B=1, T=1, N=4, K=2, H=16, S=160)
    x = make_inputs(case)
    ops = flashjax.decode.decode_operands(x.q, x.k, x.v, x.lengths)
    p = decode_api.plan(ops, target="interpret")
    assert (p.queries, p.group, p.block_k, p.key_blocks, p.splits) == (1, 2, 16, 10, 2)
    assert decode_api.plan(ops, num_splits=5, target="interpret").splits == 5


def test_unsplit_block() -> None:
    """`DecodeConfig.unsplit_block_k` sets the keys per step of a one-split walk only: the
    contiguous cache's, not the paged one's, nor a split walk's."""
    config = configs.DecodeConfig(
        128, 4, 3, unsplit_block_k=64, paged_block_k=32, paged_overfull_splits=1
    )

    def plan(batch: int) -> tuple[int, int, int]:
        x = make_inputs(DecodeCase(B=batch, T=1, N=4, K=2, H=16, S=512))
        ops = flashjax.decode.decode_operands(x.q, x.k, x.v, x.lengths)
        p = decode_api.plan(ops, target="sm90", config=config)  # 4 cores off-GPU
        return p.splits, p.block_k, p.key_blocks

    assert plan(4) == (1, 64, 8)  # 8 programs fill the 4 cores: one split
    assert plan(1) == (2, 128, 4)  # 2 programs: 2 splits
    table = jnp.arange(4 * 8, dtype=jnp.int32).reshape(4, 8)
    x = make_inputs(DecodeCase(B=4, T=1, N=4, K=2, H=16, S=512))
    pool = (y.reshape(32, 64, 2, 16) for y in (x.k, x.v))
    ops = flashjax.decode.decode_operands(x.q, *pool, x.lengths, page_table=table)
    paged = decode_api.plan(ops, target="sm90", config=config)
    assert (paged.splits, paged.block_k) == (1, 32)


@pytest.mark.parametrize("page", [16, 64, 256])
def test_paged_plan_on_hopper(page: int) -> None:
    """On sm90 at head dim 128 a paged cache (its page ids read a block ahead) is planned as a
    contiguous one: 128-key blocks (gathered from several pages or sliced from one), one wave of
    programs (the H200 sweep, results/2026-12-02-h200-s16)."""
    case = DecodeCase(B=1, T=1, N=32, K=8, H=128, S=8192, page=page)
    x = make_inputs(case)
    paged = flashjax.decode.decode_operands(x.q, *x.pools, x.lengths, page_table=x.table)
    contiguous = flashjax.decode.decode_operands(x.q, x.k, x.v, x.lengths)
    plans = [decode_api.plan(ops, target="sm90") for ops in (paged, contiguous)]
    assert [(p.block_k, p.splits) for p in plans] == [(128, plans[1].splits)] * 2
    # ... and on the H200's 132 cores: one wave of programs, 16 splits of 8 KV heads, both ways
    config = configs.get_decode_config(128, "sm90")
    key_blocks = 8192 // 128
    splits = [configs.decode_splits(8, key_blocks, 132, config, paged) for paged in (1, 0)]
    assert splits == [16, 16]


def test_default_implementation_on_cpu_is_the_chunked_path(monkeypatch) -> None:
    """On CPU, `implementation=None` is the chunked XLA path; on a GPU the decode kernel."""
    case = DecodeCase(B=1, T=1, N=4, K=2, H=16, S=32, dtype="float32")
    x = make_inputs(case)
    ops = flashjax.decode.decode_operands(x.q, x.k, x.v, x.lengths)
    assert backends.choose(None, ops).name == "xla_chunked"
    monkeypatch.setattr(backends, "platform", lambda: "gpu")
    assert backends.choose(None, ops).name == "triton_decode"
    np.testing.assert_allclose(decoded(x, {}, impl=None)[0], reference(x, {})[0], atol=2e-6)


def _bad(**changes):
    """Good arguments of `decode_attention`, with `changes`."""
    args = dict(
        query=jnp.zeros((2, 1, 4, 16)),
        key_cache=jnp.zeros((2, 32, 2, 16)),
        value_cache=jnp.zeros((2, 32, 2, 16)),
        cache_lengths=jnp.array([5, 32], jnp.int32),
    )
    return args | changes


BAD = [
    (_bad(query=jnp.zeros((1, 4, 16))), ValueError, "query must have rank 4"),
    (_bad(key_cache=jnp.zeros((2, 32, 2, 8))), ValueError, "key_cache and value_cache"),
    (
        _bad(key_cache=jnp.zeros((2, 32, 2, 8)), value_cache=jnp.zeros((2, 32, 2, 8))),
        ValueError,
        r"key_cache head dim \(8\) must equal the query head dim \(16\)",
    ),
    (
        _bad(key_cache=jnp.zeros((2, 32, 3, 16)), value_cache=jnp.zeros((2, 32, 3, 16))),
        ValueError,
        "multiple of the cache's key/value heads",
    ),
    (_bad(value_cache=jnp.zeros((2, 32, 2, 16), jnp.bfloat16)), TypeError, "share one dtype"),
    (_bad(query=jnp.zeros((2, 40, 4, 16))), ValueError, "T=40 new tokens but the cache holds"),
    (_bad(cache_lengths=jnp.array([5.0, 3.0])), TypeError, "cache_lengths must be an int32"),
    (_bad(cache_lengths=jnp.array([5], jnp.int32)), ValueError, r"cache_lengths must have shape"),
    (_bad(cache_lengths=jnp.array([0, 33], jnp.int32)), ValueError, r"in \[T, capacity\]"),
    (
        _bad(key_cache=jnp.zeros((3, 32, 2, 16)), value_cache=jnp.zeros((3, 32, 2, 16))),
        ValueError,
        "batch size 2",
    ),
    (_bad(local_window_size=-1), ValueError, "local_window_size"),
    (_bad(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
    (_bad(num_splits=0), ValueError, "num_splits"),
    (_bad(implementation="cuda"), ValueError, "implementation must be one of"),
]


@pytest.mark.parametrize("args,error,message", BAD, ids=lambda a: None)
def test_bad_input_raises_naming_the_argument(args: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        decode_attention(**args)


# --------------------------------------------------------------------------------------------------
# Paged caches
# --------------------------------------------------------------------------------------------------

# Interpret-mode key blocks are 16 keys: pages of 4 are gathered 4 to a block, a page of 16 is one
# block, a page of 64 is cut into 4 blocks.
PAGED = [
    DecodeCase(B=3, T=1, N=4, K=2, H=32, S=96, page=4),
    DecodeCase(B=2, T=2, N=8, K=2, H=32, S=96, page=16, dtype="float16", window=30),
    DecodeCase(B=2, T=3, N=4, K=1, H=24, S=128, page=64, dtype="float32", softcap=5.0),
]


def _garbage_past_lengths(x: Inputs, page: int) -> jax.Array:
    """The page table with every entry past a row's length replaced by junk ids (-1, huge): the
    kernel must never read those pages (it clips the ids; nothing past the length is used)."""
    first_key = jnp.arange(x.table.shape[1])[None, :] * page
    junk = jnp.where(jnp.arange(x.table.shape[1]) % 2 == 0, -1, 10**6)[None, :]
    return jnp.where(first_key >= x.lengths[:, None], junk, x.table)


@pytest.mark.parametrize("case", PAGED, ids=lambda c: c.id)
def test_paged_matches_reference(case: DecodeCase) -> None:
    x = make_inputs(case)
    x = dataclasses.replace(x, table=_garbage_past_lengths(x, case.page))
    got = decoded(x, case.kwargs())
    assert_close(got, reference(x, case.kwargs()), reference64(x, case.kwargs()), label=case.id)


def test_paged_gradients_sum_into_shared_pages() -> None:
    """Gradients w.r.t. the page pools: the kernel path's (backward on the gathered pages, summed
    back into them) equal autodiff through the gather, also for a page two rows share (a common
    prompt prefix)."""
    case = DecodeCase(B=2, T=1, N=4, K=2, H=16, S=64, page=16, dtype="float32", lengths="full")
    x = make_inputs(case)
    table = x.table.at[1, 0].set(x.table[0, 0])  # both rows start with the same page
    kp, vp = x.pools

    def loss(q, kp, vp, impl):
        out = decode_attention(q, kp, vp, x.lengths, page_table=table, implementation=impl)
        return jnp.sum(out * x.dout)

    grads = {
        impl: jax.grad(loss, argnums=(0, 1, 2))(x.q, kp, vp, impl)
        for impl in ("triton_decode", "xla")
    }
    for name, got, want in zip(("dq", "dk", "dv"), grads["triton_decode"], grads["xla"]):
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=name)
    unused = np.setdiff1d(np.arange(kp.shape[0]), np.asarray(table))
    assert np.all(np.asarray(grads["triton_decode"][1])[unused] == 0)  # NaN pages: untouched


def test_paged_page_size_not_a_power_of_two_is_gathered() -> None:
    """The kernel says it cannot serve pages of 12 keys; the other backends read the gathered
    copy (junk page ids past the lengths clipped as the kernel clips them), so
    `implementation=None` still answers."""
    case = DecodeCase(B=2, T=1, N=4, K=2, H=16, S=48, page=12, dtype="float32")
    x = make_inputs(case)
    x = dataclasses.replace(x, table=_garbage_past_lengths(x, case.page))  # gathered: clipped
    with pytest.raises(ValueError, match="cannot serve this call: page size 12"):
        decoded(x, {})
    got = decoded(x, {}, impl=None)
    np.testing.assert_allclose(got[0], reference(x, {})[0], atol=2e-6)


PAGED_BAD = [
    (dict(page_table=jnp.zeros((2, 4))), TypeError, "page_table must be an int32 array"),
    (dict(page_table=jnp.zeros((2,), jnp.int32)), ValueError, "page_table must have shape"),
    (
        dict(page_table=jnp.zeros((3, 4), jnp.int32)),
        ValueError,
        r"page_table must have shape \(2, 4\)",
    ),
    (dict(page_table=jnp.zeros((2, 1), jnp.int32)), ValueError, "cache holds at most 8 keys"),
]


@pytest.mark.parametrize("changes,error,message", PAGED_BAD, ids=lambda a: None)
def test_paged_bad_input_raises_naming_the_argument(
    changes: dict, error: type, message: str
) -> None:
    pools = jnp.zeros((10, 8, 2, 16))
    args = _bad(key_cache=pools, value_cache=pools, cache_lengths=jnp.array([5, 8], jnp.int32))
    if "cache holds" in message:
        args["query"] = jnp.zeros((2, 9, 4, 16))
    with pytest.raises(error, match=message):
        decode_attention(**(args | changes))


# --------------------------------------------------------------------------------------------------
# dot_product_attention routes decode steps to the decode kernel
# --------------------------------------------------------------------------------------------------


def test_dot_product_attention_routes_decode_steps(monkeypatch) -> None:
    """On a GPU, `implementation=None` takes the decode kernel for a decode step (jax.nn-style:
    one query, `key_value_seq_lengths`, no causal mask; or new tokens with offsets and causal)
    and the training kernels for anything else. Here the platform is patched to "gpu" and the
    kernels run interpreted."""
    monkeypatch.setattr(backends, "platform", lambda: "gpu")
    rng = np.random.default_rng(3)
    q1, q4, q16, q64 = (
        jnp.asarray(rng.standard_normal((2, t, 8, 32)), jnp.float32) for t in (1, 4, 16, 64)
    )
    k, v = (jnp.asarray(rng.standard_normal((2, 80, 2, 32)), jnp.float32) for _ in range(2))
    lengths = jnp.array([80, 21], jnp.int32)
    calls = {
        "jax.nn-style step": (q1, dict(key_value_seq_lengths=lengths)),
        "speculative step": (
            q4,
            dict(key_value_seq_lengths=lengths, q_offsets=lengths - 4, is_causal=True),
        ),
        "no lengths": (q1, {}),
        "16 tokens x 4 heads per KV head: 64 rows, the most": (q16, dict(is_causal=True)),
        "prefill": (q64, dict(is_causal=True)),
        "bias": (q1, dict(bias=jnp.zeros((1, 1, 1, 80)))),
    }
    want = {"prefill": "triton", "bias": "triton"}
    for name, (q, kw) in calls.items():
        ops = flashjax.attention.operands(q, k, v, **kw)
        assert backends.choose(None, ops).name == want.get(name, "triton_decode"), name
    q, kw = calls["jax.nn-style step"]
    got = dot_product_attention(q, k, v, **kw)
    np.testing.assert_allclose(
        got, dot_product_attention(q, k, v, **kw, implementation="xla"), atol=2e-6
    )


# --------------------------------------------------------------------------------------------------
# GPU tier: the compiled kernel at its real tiles (`pytest -m gpu`)
# --------------------------------------------------------------------------------------------------

GPU_CASES = [
    DecodeCase(B=3, T=1, N=32, K=8, H=128, S=4096),
    DecodeCase(B=2, T=4, N=32, K=8, H=128, S=4096, window=700, softcap=30.0),
    DecodeCase(B=3, T=1, N=32, K=8, H=128, S=4096, page=16),
    DecodeCase(B=3, T=1, N=32, K=8, H=128, S=4096, page=64),
    DecodeCase(B=2, T=2, N=16, K=2, H=64, S=4096, page=256, dtype="float16"),
    DecodeCase(B=2, T=1, N=8, K=1, H=256, S=2048, dtype="float32"),
    DecodeCase(B=2, T=1, N=12, K=12, H=64, S=2048),  # GPT-2's heads: 16 copies of one row
    DecodeCase(B=2, T=3, N=12, K=2, H=64, S=3008, page=16),  # T and G = 6 padded
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_kernel_matches_reference(case: DecodeCase) -> None:
    x = make_inputs(case)
    kw = case.kwargs()
    want, want64 = reference(x, kw), reference64(x, kw)
    for splits in (None, 1, 7):
        got = decoded(x, kw, num_splits=splits)
        assert_close(got, want, want64, label=f"{case.id} splits={splits}")


@pytest.mark.gpu
def test_gpu_default_is_the_decode_kernel() -> None:
    x = make_inputs(DecodeCase(B=1, T=1, N=8, K=2, H=64, S=256))
    ops = flashjax.decode.decode_operands(x.q, x.k, x.v, x.lengths)
    assert backends.choose(None, ops).name == "triton_decode"
