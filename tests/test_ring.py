"""Ring attention (`flashjax.ring_attention`) on 1, 2, 4 and 8 host devices (conftest.py asks XLA
for 8): every layout and feature against `dot_product_attention` on the gathered sequence, forward
and gradients; invisible pairs skipped and zigzag balanced (counted); the transfers independent of
the step they overlap (jaxpr); K and V sent as one collective per hop (StableHLO); memory per
device linear in the shard (compiled); the all-gather baseline; the errors. The GPU tier
(`-m gpu`) runs the compiled kernels on two GPUs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, make_inputs
from jax.extend.core import Literal
from jax.sharding import Mesh, PartitionSpec

import flashjax
from flashjax import backends, ring
from flashjax.ring import all_gather_attention, ring_attention, zigzag_permute, zigzag_unpermute
from pallas_kernels.operands import cotangent

SEQ = "sp"
RING_KEYWORDS = ("is_causal", "local_window_size", "logits_soft_cap")


# --------------------------------------------------------------------------------------------------
# Running a ring on global arrays
# --------------------------------------------------------------------------------------------------


def mesh_of(n: int, data: int = 1) -> Mesh:
    """A (data, sp) mesh of the first data * n devices (tests/conftest.py asks for 8)."""
    assert jax.device_count() >= data * n, f"needs {data * n} devices"
    return Mesh(np.array(jax.devices()[: data * n]).reshape(data, n), ("data", SEQ))


def sharded(attention, mesh: Mesh, layout: str, kw: dict, *, check_vma: bool = True, **extra):
    """`f(q, k, v) -> out` on global arrays: permute into the layout, shard the sequence over
    "sp" (and the batch over "data"), run `attention` per device, gather, unpermute."""
    n = mesh.shape[SEQ]
    batch = "data" if mesh.shape["data"] > 1 else None
    spec = PartitionSpec(batch, SEQ)
    segments = kw.get("q_segment_ids")
    statics = {name: kw[name] for name in RING_KEYWORDS if name in kw} | extra

    def order(x):
        return zigzag_permute(x, n) if layout == "zigzag" else x

    def restore(x):
        return zigzag_unpermute(x, n) if layout == "zigzag" else x

    def per_device(q, k, v, q_seg, kv_seg):
        segs = {} if q_seg is None else dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
        return attention(q, k, v, axis_name=SEQ, layout=layout, **statics, **segs)

    mapped = jax.shard_map(
        per_device, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=check_vma
    )

    def run(q, k, v):
        seg = None if segments is None else order(segments)
        kv_seg = None if segments is None else order(kw["kv_segment_ids"])
        return restore(mapped(order(q), order(k), order(v), seg, kv_seg))

    return run


def whole(kw: dict, impl: str = "xla_chunked", **extra):
    """`f(q, k, v) -> out`: `dot_product_attention` on the whole sequence."""

    def run(q, k, v):
        return flashjax.dot_product_attention(q, k, v, implementation=impl, **kw, **extra)

    return run


def value_and_vjp(f, q, k, v, dout):
    """`(out, dq, dk, dv)` of `f`, forward and backward in one jitted program."""

    def both(q, k, v, dout):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(dout))

    return jax.jit(both)(q, k, v, dout)


def assert_matches(got, want, *, rtol: float, atol: float) -> None:
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol, err_msg=name
        )


# --------------------------------------------------------------------------------------------------
# Zigzag order
# --------------------------------------------------------------------------------------------------


def test_zigzag_order_of_the_issue_and_round_trip() -> None:
    x = np.arange(16)[None, :, None]
    got = zigzag_permute(x, 2)
    want = np.concatenate([np.arange(0, 4), np.arange(12, 16), np.arange(4, 8), np.arange(8, 12)])
    np.testing.assert_array_equal(got[0, :, 0], want)
    assert isinstance(got, np.ndarray)
    y = jnp.asarray(np.random.default_rng(0).standard_normal((24, 3)))
    for n in (1, 3, 6):
        back = zigzag_unpermute(zigzag_permute(y, n, axis=0), n, axis=0)
        np.testing.assert_array_equal(back, y)
    with pytest.raises(ValueError, match="2 \\* num_shards = 6"):
        zigzag_permute(x, 3)


# --------------------------------------------------------------------------------------------------
# Ring against the whole sequence
# --------------------------------------------------------------------------------------------------

# (layout, ring size, data-parallel size, case, extra keywords); float32 throughout.
F32 = functools.partial(Case, S=64, dtype="float32")
RING_CASES = [
    ("contiguous", 1, 1, F32(B=1, T=64, N=2, K=1, H=32, features=("causal",)), {}),
    ("contiguous", 2, 1, F32(B=2, T=64, N=2, K=2, H=32, features=("causal",)), {}),
    ("contiguous", 4, 1, F32(B=2, T=64, N=4, K=2, H=32, features=("softcap",)), {"scale": 0.3}),
    ("contiguous", 4, 2, F32(B=2, T=64, N=4, K=1, H=32, features=("window", "segments")), {}),
    (
        "zigzag",
        8,
        1,
        F32(B=2, T=64, N=2, K=1, H=16, features=("causal", "window", "segments", "softcap")),
        {},
    ),
]


@pytest.mark.parametrize(
    "layout, n, data, case, extra",
    RING_CASES,
    ids=[f"{c[0]}-n{c[1]}x{c[2]}-{c[3].id}" for c in RING_CASES],
)
def test_ring_matches_the_whole_sequence(layout, n, data, case, extra) -> None:
    """Forward and gradients of the ring equal `dot_product_attention` on the gathered sequence
    (float32; the ring sums the same terms in another order)."""
    q, k, v, dout, kw = make_inputs(case, salt=layout)
    mesh = mesh_of(n, data)
    got = value_and_vjp(sharded(ring_attention, mesh, layout, kw, **extra), q, k, v, dout)
    want = value_and_vjp(whole(kw, **extra), q, k, v, dout)
    assert_matches(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "layout, n, features",
    [("zigzag", 4, ("causal", "segments")), ("contiguous", 2, ("window", "softcap"))],
)
def test_ring_without_conditionals(layout, n, features) -> None:
    """`pair_dispatch="kernel"`: every pair runs, with its positions, and no `lax.switch` is
    traced (no conditional anywhere in the program); pairs no query sees add nothing, so the
    forward and gradients still equal the whole sequence's."""
    case = F32(B=2, T=64, N=4, K=2, H=32, features=features)
    q, k, v, dout, kw = make_inputs(case, salt=layout)
    f = sharded(ring_attention, mesh_of(n), layout, kw, pair_dispatch="kernel")
    got = value_and_vjp(f, q, k, v, dout)
    assert_matches(got, value_and_vjp(whole(kw), q, k, v, dout), rtol=1e-5, atol=2e-5)
    program = jax.make_jaxpr(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
    assert "cond[" not in str(program)
    switched = sharded(ring_attention, mesh_of(n), layout, kw)
    assert "cond[" in str(jax.make_jaxpr(switched)(q, k, v))  # what the default traces
    with pytest.raises(ValueError, match="pair_dispatch must be one of"):
        sharded(ring_attention, mesh_of(n), layout, kw, pair_dispatch="host")(q, k, v)


def test_ring_with_the_kernels_interpreted() -> None:
    """The Pallas kernels (interpret mode) as the ring's steps: the diagonal without offsets,
    dense FULL pairs, PARTIAL pairs with offsets (segments)."""
    case = F32(B=1, T=64, N=2, K=1, H=32, features=("causal", "segments"))
    q, k, v, dout, kw = make_inputs(case)
    mesh = mesh_of(2)
    # Pallas' CPU interpreter trips over varying manual axes (see test_transforms.py).
    f = sharded(ring_attention, mesh, "contiguous", kw, check_vma=False, implementation="triton")
    got = value_and_vjp(f, q, k, v, dout)
    want = value_and_vjp(whole(kw, "triton"), q, k, v, dout)
    assert_matches(got, want, rtol=1e-4, atol=1e-4)


def test_in_place_key_pieces_with_the_mosaic_kernels(monkeypatch) -> None:
    """`kv_transfer="in_place"` with the Mosaic kernels (interpret mode): the forward reads every
    key piece as rows of the travelling stacked buffer (no copy), and the output is bitwise the
    stacked ring's, which passes the pieces; the backward (pieces) matches too. One device (the
    zigzag layout's two pieces: rows 0 and 128 of the buffer): the Mosaic GPU interpreter keeps
    one global state and fails when two devices run kernels at once; the 2-GPU tier runs it."""
    from pallas_kernels.mosaic import api

    read_in_place = []
    decide = api._in_place
    monkeypatch.setattr(api, "_in_place", lambda *a: read_in_place.append(decide(*a)) or decide(*a))
    case = Case(B=1, T=256, S=256, N=2, K=1, H=64, features=("causal",))
    q, k, v, dout, kw = make_inputs(case)
    run = functools.partial(sharded, ring_attention, mesh_of(1), "zigzag", kw, check_vma=False)
    in_place = run(implementation="mosaic", kv_transfer="in_place")
    got = value_and_vjp(in_place, q, k, v, dout)
    assert read_in_place and all(read_in_place)
    want = value_and_vjp(run(implementation="mosaic"), q, k, v, dout)
    assert_matches(got, want, rtol=0, atol=0)


def test_all_gather_baseline_matches_the_whole_sequence() -> None:
    case = F32(B=2, T=64, N=2, K=1, H=32, features=("causal", "segments"))
    q, k, v, _, kw = make_inputs(case)
    mesh = mesh_of(4)
    got = jax.jit(sharded(all_gather_attention, mesh, "zigzag", kw, implementation="xla_chunked"))
    np.testing.assert_allclose(got(q, k, v), whole(kw)(q, k, v), rtol=1e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------------
# Skipping and balance: count the pairs each device computes
# --------------------------------------------------------------------------------------------------


def counting_backend(counts: collections.Counter) -> backends.Backend:
    """xla_chunked, counting per device and pass ("fwd", "bwd") the pairs it computes."""
    inner = backends.REGISTRY["xla_chunked"]

    def tick(what: str):
        shard = jax.lax.axis_index(SEQ)
        jax.debug.callback(lambda s: counts.update([(what, int(s))]), shard)

    def forward(ops):
        tick("fwd")
        return inner.forward(ops)

    def backward(ops, out, lse, dout, dlse):
        tick("bwd")
        return inner.backward(ops, out, lse, dout, dlse)

    return dataclasses.replace(inner, name="counting", forward=forward, backward=backward)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_causal_ring_skips_invisible_pairs_balances_and_matches(layout, monkeypatch) -> None:
    """Causal on 4 devices, forward and gradients against the whole sequence, counting the pairs
    each device computes. Contiguous: device r computes the r + 1 shards at or before its own (10
    of 16). Zigzag (2 pieces per shard, 4 pairs per step): the diagonal step computes 3 pairs,
    every other step 2, on every device: 9 each, 36 half-size pairs in all (= 9 full-size)."""
    counts: collections.Counter = collections.Counter()
    monkeypatch.setitem(backends.REGISTRY, "counting", counting_backend(counts))
    case = F32(B=2, T=64, N=4, K=2, H=32, features=("causal",))
    q, k, v, dout, kw = make_inputs(case, salt=layout)
    f = sharded(ring_attention, mesh_of(4), layout, kw, implementation="counting")
    got = value_and_vjp(f, q, k, v, dout)
    assert_matches(got, value_and_vjp(whole(kw), q, k, v, dout), rtol=1e-5, atol=2e-5)
    want = [r + 1 for r in range(4)] if layout == "contiguous" else [9] * 4
    for what in ("fwd", "bwd"):
        assert [counts[(what, r)] for r in range(4)] == want, (what, counts)


@pytest.mark.parametrize(
    "layout, features, conditionals",
    [
        ("contiguous", ("causal",), 2),
        ("zigzag", ("causal",), 4),
        ("zigzag", ("causal", "segments"), 7),
    ],
)
def test_the_layout_decides_pair_states_without_a_conditional(
    layout, features, conditionals
) -> None:
    """Causal on 4 devices: a piece against itself on the first step is known partial and, in
    the zigzag layout, a shard's early queries against any shard's late keys known empty, its
    late queries against early keys known full (unless segment ids may hide some): only the
    other pairs, whose state depends on the device, branch on it (`lax.switch`). The forward
    traces the first step, the scan's body and the last step: contiguous 0 + 1 + 1
    conditionals (of 1 pair a step), zigzag 0 + 2 + 2 (of 4), with segments 1 + 3 + 3."""
    case = F32(B=2, T=64, N=4, K=2, H=32, features=features)
    q, k, v, dout, kw = make_inputs(case, salt=layout)
    f = sharded(ring_attention, mesh_of(4), layout, kw)
    assert str(jax.make_jaxpr(f)(q, k, v)).count("cond[") == conditionals
    got = value_and_vjp(f, q, k, v, dout)
    assert_matches(got, value_and_vjp(whole(kw), q, k, v, dout), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("layout, pieces", [("contiguous", 1), ("zigzag", 2)])
def test_first_pair_of_each_piece_is_taken_without_a_merge(layout, pieces, monkeypatch) -> None:
    """The forward traces each step's pairs three times (the first step, the scan's body, the
    last step); on the first, each query piece's first pair is its running result as it is,
    so `pieces` fewer merges are traced than pairs, and the result is unchanged."""
    merges: list = []
    merge = ring.merge_attention

    def counted(*args):
        merges.append(1)
        return merge(*args)

    monkeypatch.setattr(ring, "merge_attention", counted)
    case = F32(B=1, T=64, N=2, K=1, H=32)
    q, k, v, dout, kw = make_inputs(case, salt=layout)
    f = sharded(ring_attention, mesh_of(4), layout, kw)
    got = jax.jit(f)(q, k, v)
    assert len(merges) == 3 * pieces * pieces - pieces
    np.testing.assert_allclose(got, whole(kw)(q, k, v), rtol=1e-5, atol=2e-5)


def test_kernel_outputs_that_vary_over_no_axis_trace(monkeypatch) -> None:
    """A Pallas kernel's outputs vary over no mesh axis (on the GPU, with check_vma on): the
    first pair taken as the running result must still have the type of the `lax.switch`'s other
    branch, the carry, which varies over the sequence axis (the 2-GPU tier caught this)."""
    inner = backends.REGISTRY["xla_chunked"]

    def unvarying(x):
        return jnp.zeros(x.shape, x.dtype)

    def forward(ops):  # the shapes and dtypes of the kernels' outputs, varying over nothing
        return tuple(map(unvarying, inner.forward(ops)))

    def backward(ops, out, lse, dout, dlse):  # the backward kernels' likewise
        return cotangent(ops, q=unvarying(ops.q), k=unvarying(ops.k), v=unvarying(ops.v))

    backend = dataclasses.replace(inner, name="unvarying", forward=forward, backward=backward)
    monkeypatch.setitem(backends.REGISTRY, "unvarying", backend)
    case = F32(B=1, T=64, N=2, K=1, H=32, features=("causal",))
    q, k, v, _, kw = make_inputs(case)
    for layout, n in (("zigzag", 2), ("zigzag", 4), ("contiguous", 4)):
        f = sharded(ring_attention, mesh_of(n), layout, kw, implementation="unvarying")
        assert "cond[" in str(jax.make_jaxpr(f)(q, k, v))
        # The gradient too: the pairs the layout decides run outside any lax.switch.
        jax.make_jaxpr(jax.grad(lambda *a, f=f: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)


# --------------------------------------------------------------------------------------------------
# Overlap: the transfers do not depend on the step they run beside
# --------------------------------------------------------------------------------------------------


def _as_jaxpr(x):
    """The jaxpr in an equation's parameter (open or closed), or None."""
    if hasattr(x, "eqns"):
        return x
    inner = getattr(x, "jaxpr", None)
    return inner if hasattr(inner, "eqns") else None


def _sub_jaxprs(jaxpr):
    for eqn in jaxpr.eqns:
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if (found := _as_jaxpr(sub)) is not None:
                    yield eqn, found


def _loop_bodies(jaxpr):
    """Every scan body inside `jaxpr`, at any depth."""
    for eqn, sub in _sub_jaxprs(jaxpr):
        if eqn.primitive.name == "scan":
            yield sub
        yield from _loop_bodies(sub)


def _kernels_reading(jaxpr, sources: set) -> list:
    """The `cond`s (the pairs under `lax.switch`) of `jaxpr` that read, directly or through other
    equations, any of the variables `sources`."""
    tainted, found = set(sources), []
    for eqn in jaxpr.eqns:
        if tainted.intersection(x for x in eqn.invars if not isinstance(x, Literal)):
            tainted.update(eqn.outvars)
            if eqn.primitive.name == "cond":
                found.append(eqn)
    return found


def test_transfers_are_loop_carries_that_no_kernel_reads() -> None:
    """In each ring loop body (forward, backward) every ppermute reads the loop carry only, so
    XLA may start it before the step's kernels, and no kernel (the `cond`s of `lax.switch`) reads
    what a ppermute receives, so XLA may finish it after them: the K/V prefetch only becomes the
    next carry, the incoming dK/dV buffer is added after the kernels."""
    case = F32(B=1, T=64, N=2, K=1, H=16, features=("causal",))
    q, k, v, _, kw = make_inputs(case)
    f = sharded(ring_attention, mesh_of(4), "zigzag", kw, implementation="xla_chunked")
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2)))(q, k, v).jaxpr
    bodies = [b for b in _loop_bodies(jaxpr) if any(e.primitive.name == "ppermute" for e in b.eqns)]
    assert len(bodies) == 2, "one ring loop forward, one backward"
    for body in bodies:
        permutes = [e for e in body.eqns if e.primitive.name == "ppermute"]
        received = {x for e in permutes for x in e.outvars}
        assert all(x in set(body.invars) for e in permutes for x in e.invars)
        assert any(e.primitive.name == "cond" for e in body.eqns), "pairs under lax.switch"
        assert not _kernels_reading(body, received)
        read = {x for e in body.eqns for x in e.invars if not isinstance(x, Literal)}
        assert not read.intersection(permutes[0].outvars)  # the K/V prefetch


def _permutes(f, *args) -> collections.Counter:
    """The collective-permutes of `jax.jit(f)` lowered to StableHLO (each loop body once, before
    XLA's passes), counted by operand type, e.g. "2x1x32x1x16xbf16"."""
    text = jax.jit(f).lower(*args).as_text()
    ops = re.findall(r'"stablehlo\.collective_permute"\(.*: \(tensor<([^>]*)>\)', text)
    return collections.Counter(ops)


@pytest.mark.parametrize("n", [2, 4])
def test_a_hop_sends_k_and_v_as_one_collective(n) -> None:
    """K and V travel stacked, one collective-permute per hop (as two, XLA's GPU scheduler
    exposed the first before step 0); the key segment ids as one more; the backward's dK/dV
    buffer in float32, but its last hop, exposed, in K/V's dtype. In the program text a pass
    sends K/V before step 0 and, for n > 2, once in the loop body (n - 2 iterations): n - 1
    hops. The gradient's program holds the forward (custom_vjp), then the backward: K/V as the
    forward, float32 dK/dV in the loop body and before the last step, the last hop in bf16."""
    rows = 64 // n
    kv, dkv, seg = f"2x1x{rows}x1x16xbf16", f"2x1x{rows}x1x16xf32", f"1x{rows}xi32"
    want_fwd = {2: {kv: 1, seg: 1}, 4: {kv: 2, seg: 2}}[n]
    want_grad = {2: {kv: 3, dkv: 1, seg: 2}, 4: {kv: 5, dkv: 2, seg: 4}}[n]
    case = Case(B=1, T=64, S=64, N=2, K=1, H=16, features=("causal", "segments"))
    q, k, v, _, kw = make_inputs(case)
    f = sharded(ring_attention, mesh_of(n), "zigzag", kw, implementation="xla_chunked")
    grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    assert _permutes(f, q, k, v) == want_fwd
    assert _permutes(grad, q, k, v) == want_grad
    # K and V of two dtypes cannot stack: they travel as the pair.
    v32 = v.astype(jnp.float32)
    stacked = ring.Ring(SEQ, n, "zigzag", backends.REGISTRY["xla_chunked"])
    pair = ring._pack_kv(stacked, k, v32)
    assert isinstance(pair, tuple) and all(a is b for a, b in zip(ring._unpack_kv(pair), (k, v32)))


def test_kv_transfer_pair_sends_two_buffers_and_matches() -> None:
    """`kv_transfer="pair"`: K and V travel as they are, two collectives a hop and no stacked
    copy (XLA may combine them); the result and gradients are the stacked ring's."""
    n, rows = 4, 16
    case = Case(B=1, T=64, S=64, N=2, K=1, H=16, features=("causal",))
    q, k, v, dout, kw = make_inputs(case)
    f = sharded(ring_attention, mesh_of(n), "zigzag", kw, kv_transfer="pair")
    assert _permutes(f, q, k, v) == {f"1x{rows}x1x16xbf16": 4}  # K and V, two hops
    got = value_and_vjp(f, q, k, v, dout)
    stacked = sharded(ring_attention, mesh_of(n), "zigzag", kw)
    assert_matches(got, value_and_vjp(stacked, q, k, v, dout), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kv_transfer must be one of"):
        sharded(ring_attention, mesh_of(n), "zigzag", kw, kv_transfer="copy")(q, k, v)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def _temp_bytes(attention, local: int, n: int) -> int:
    """XLA temp bytes per device of forward + backward of `attention` at `local` rows each."""
    mesh = mesh_of(n)
    x = jax.ShapeDtypeStruct((1, local * n, 2, 32), jnp.float32)
    f = sharded(attention, mesh, "contiguous", {"is_causal": True}, implementation="xla_chunked")
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_memory_per_device_is_linear_in_the_shard() -> None:
    """Ring: temp memory per device about doubles with the shard and does not grow with the
    number of devices; the all-gather baseline's grows with it (every device holds the whole K/V
    and its gradient)."""
    ring_small, ring_large = (_temp_bytes(ring_attention, rows, 2) for rows in (512, 1024))
    ring_wide = _temp_bytes(ring_attention, 512, 8)
    gather_wide = _temp_bytes(all_gather_attention, 512, 8)
    assert ring_large / ring_small < 2.5, (ring_small, ring_large)
    assert ring_wide / ring_small < 1.3, (ring_small, ring_wide)
    assert ring_wide < gather_wide / 2, (ring_wide, gather_wide)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_errors_name_the_problem() -> None:
    x = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="inside jax.shard_map"):
        ring_attention(x, x, x, axis_name=SEQ)
    mesh = mesh_of(2)
    spec = PartitionSpec(None, SEQ)

    def call(**kw):
        def f(q):
            return ring_attention(q, q, q, axis_name=SEQ, **kw)

        return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)

    with pytest.raises(ValueError, match="no backward from|cannot serve ring attention"):
        call(implementation="xla")(x)
    with pytest.raises(ValueError, match="layout must be one of"):
        call(layout="striped")(x)
    with pytest.raises(ValueError, match="2 pieces"):
        call(layout="zigzag")(jnp.zeros((1, 6, 2, 16)))
    with pytest.raises(ValueError, match="rank-4"):
        ring_attention(x[0], x[0], x[0], axis_name=SEQ)
    with pytest.raises(ValueError, match="static scale"):
        jax.jit(lambda s: call(scale=s)(x))(jnp.float32(0.5))
    assert ring.pieces_per_shard("zigzag") == 2


# --------------------------------------------------------------------------------------------------
# GPU tier: the compiled kernels on two GPUs
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_on_two_gpus(layout) -> None:
    """bf16, the Triton kernels compiled, 2 GPUs: against the whole sequence on one GPU. The ring
    rounds each pair's output and gradients to bf16 before summing in float32, the whole-sequence
    kernel rounds once: relative L2 errors within bf16 rounding."""
    if jax.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    case = Case(
        B=1, T=4096, S=4096, N=8, K=2, H=128, dtype="bfloat16", features=("causal", "segments")
    )
    q, k, v, dout, kw = make_inputs(case)
    got = value_and_vjp(sharded(ring_attention, mesh_of(2), layout, kw), q, k, v, dout)
    want = value_and_vjp(whole(kw, "triton"), q, k, v, dout)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        g, w = (np.asarray(x, np.float32) for x in (g, w))
        assert np.linalg.norm(g - w) <= 1e-2 * np.linalg.norm(w), name
