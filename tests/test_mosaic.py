"""The Hopper kernels on Mosaic GPU, in Mosaic GPU interpret mode on CPU: no races, and the op
under jit, vmap and grad (the shared suite, tests/test_suite.py, checks the numbers case by
case)."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Case, assert_close, make_inputs, run, run_reference64, served
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as interpreter
from test_suite import check_case

from flashjax import dot_product_attention
from flashjax.attention import operands
from pallas_kernels import common, configs
from pallas_kernels.mosaic import api, backward, forward, pipeline
from pallas_kernels.operands import AttentionStatics


def test_forward_has_no_races() -> None:
    """The race detector watches every shared-memory access of the producer and the two consumer
    warpgroups (TMA copies, wgmma operands, the output staging) across a causal GQA call."""
    interpreter.reset_gpu_interpret_mode_state()
    case = Case(B=1, T=200, S=300, N=4, K=2, H=64, features=("causal",))
    q, k, v, _, _ = make_inputs(case)
    out = dot_product_attention(q, k, v, is_causal=True, implementation="mosaic")
    out.block_until_ready()
    assert not interpreter.get_races().races_found


def test_jit_vmap_and_grad() -> None:
    case = Case(B=2, T=64, S=128, N=2, K=1, H=64)
    q, k, v, dout, _ = make_inputs(case)

    def loss(q, k, v, impl):
        out = dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    batched = jax.jit(jax.vmap(functools.partial(grad, impl="mosaic")))
    got = batched(q[:, None], k[:, None], v[:, None])
    for b in range(2):
        want = grad(q[b : b + 1], k[b : b + 1], v[b : b + 1], "triton")
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(
                np.asarray(g[b], np.float32), np.asarray(w, np.float32), rtol=2e-2, atol=2e-2
            )


@pytest.mark.parametrize(
    "head_dim, window, seq",
    [
        (64, (None, None), (256, 384)),
        (128, (None, 0), (200, 300)),
        (192, (None, None), (300, 250)),
        (256, (64, 0), (129, 200)),
    ],
)
def test_forward_lowers_for_the_gpu(head_dim: int, window, seq) -> None:
    """The compiled path (P from registers, accumulator in place, no interpreter) lowers to a
    Mosaic GPU module for CUDA here on the CPU (`jax.export` with platforms=["cuda"]): layout
    inference, wgmma shapes, TMA and barrier types are checked without a GPU. (ptxas and the run
    itself need the GPU tier.)"""
    t, s = seq
    cfg = api.forward_config(head_dim)
    rows = cfg.rows
    tp, sp = -(-t // rows) * rows, -(-s // cfg.block_kv) * cfg.block_kv
    q = jax.ShapeDtypeStruct((2, tp, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, sp, 2, head_dim), jnp.bfloat16)
    statics = AttentionStatics(scale=head_dim**-0.5, window=window)

    def f(q, k, v):
        return forward.forward(q, k, v, statics=statics, config=cfg, seq_lens=seq, interpret=None)

    exported = jax.export.export(jax.jit(f), platforms=["cuda"])(q, kv, kv)
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize(
    "case",
    [
        Case(B=1, T=113, S=150, N=4, K=1, H=64, features=("causal", "segments", "dropout")),
        Case(B=1, T=64, S=80, N=2, K=2, H=192, features=("window",)),
    ],
    ids=lambda c: c.id,
)
def test_backward_kernel_where_triton_serves(case: Case, monkeypatch) -> None:
    """configs.MOSAIC_BACKWARD_ON_TRITON hands head dim 192 to the Triton backward; the Mosaic
    backward kernel still runs it correctly (the suite covers it at head dims 64, 128, 256)."""
    monkeypatch.setattr(configs, "MOSAIC_BACKWARD_ON_TRITON", frozenset())
    assert not api.backward_on_triton(case.H)
    check_case(case, "mosaic")


@pytest.mark.parametrize(
    "case",
    [
        Case(B=1, T=130, S=200, N=4, K=2, H=128, features=("causal", "segments")),
        Case(B=1, T=113, S=150, N=4, K=1, H=64, features=("softcap", "dropout", "lengths")),
    ],
    ids=lambda c: c.id,
)
def test_fused_dq_backward(case: Case, monkeypatch) -> None:
    """`BackwardConfig.fused_dq` (one kernel: dQ's parts added from the dK/dV kernel; here each
    part into its own slice, summed by the host, as the interpreter runs no TMA reduce-add)
    against the float64 reference, with no race; `deterministic=True` turns it off, and with it
    `double_ds`, which needs it (configs.py's head dim 128 16k rule has both)."""
    fused = dataclasses.replace(api.backward_config(case.H), fused_dq=True)
    monkeypatch.setattr(configs, "MOSAIC_BACKWARD_ON_TRITON", frozenset())
    monkeypatch.setattr(api, "backward_config", lambda head_dim, *call: fused)
    interpreter.reset_gpu_interpret_mode_state()
    check_case(case, "mosaic")
    assert not interpreter.get_races().races_found

    calls = []
    real = backward.dkdv
    monkeypatch.setattr(
        backward, "dkdv", lambda *a, **kw: calls.append(kw["config"]) or real(*a, **kw)
    )
    five = dataclasses.replace(fused, pooled_dq=True, double_ds=True)
    monkeypatch.setattr(api, "backward_config", lambda head_dim, *call: five)
    q, k, v, dout, kw = make_inputs(case)
    ops = operands(q, k, v, deterministic=True, **kw)
    out, lse = api.forward(ops)
    api.backward(ops, out, lse, dout, None)
    assert calls and not calls[-1].fused_dq and not calls[-1].double_ds


@pytest.mark.parametrize(
    "case",
    [
        Case(B=1, T=200, S=260, N=4, K=2, H=128, features=("causal", "segments")),
        Case(B=2, T=150, S=150, N=2, K=1, H=64, features=("lengths", "window")),
        Case(B=1, T=113, S=150, N=4, K=1, H=64, features=("softcap",)),  # not folded
    ],
    ids=lambda c: c.id,
)
def test_fold_scale_forward(case: Case, monkeypatch) -> None:
    """`ForwardConfig.fold_scale` (row max of the unscaled scores, the scale folded into the
    exponent) against the float64 reference, with no race; with a soft-cap it falls back."""
    folded = forward.with_options(api.forward_config(case.H), ("fold_scale",))
    monkeypatch.setattr(api, "call_config", lambda ops: folded)
    interpreter.reset_gpu_interpret_mode_state()
    check_case(case, "mosaic")
    assert not interpreter.get_races().races_found


@pytest.mark.parametrize(
    "options, columns, case",
    [
        (
            ("exp2_fma",),
            8,
            Case(B=1, T=200, S=260, N=4, K=2, H=64, features=("causal", "segments")),
        ),
        (
            ("exp2_fma", "fold_scale"),
            8,
            Case(B=2, T=150, S=300, N=2, K=1, H=128, features=("lengths", "window")),
        ),
        (
            ("exp2_fma",),
            24,
            Case(B=1, T=113, S=150, N=4, K=1, H=64, features=("softcap", "dropout")),
        ),
        (  # head dim 128's non-causal rule up to 512 rows (session 37)
            ("persistent", "async_store", "prefetch_q", "pair_tiles", "fold_scale", "exp2_fma"),
            8,
            Case(B=2, T=300, S=400, N=2, K=1, H=128, features=("lengths", "window", "dropout")),
        ),
    ],
    ids=lambda x: "+".join(x) if isinstance(x, tuple) else getattr(x, "id", f"columns{x}"),
)
def test_exp2_fma_forward(options, columns: int, case: Case, monkeypatch) -> None:
    """`ForwardConfig.exp2_fma` (the first `fma_columns` columns of each tile's exp2 on the FMA
    pipe) against the float64 reference, forward and gradients, with no race: masked keys in
    its columns (causal, segments, window, lengths) get weight 0."""
    config = forward.with_options(api.forward_config(case.H), options)
    config = dataclasses.replace(config, fma_columns=columns)
    monkeypatch.setattr(api, "call_config", lambda ops: config)
    interpreter.reset_gpu_interpret_mode_state()
    check_case(case, "mosaic")
    assert not interpreter.get_races().races_found


@pytest.mark.parametrize(
    "options, case",
    [
        (
            ("lazy_rescale",),
            Case(B=1, T=200, S=260, N=4, K=2, H=128, features=("causal", "segments")),
        ),
        (
            ("lazy_rescale",),
            Case(B=2, T=150, S=150, N=2, K=1, H=64, features=("lengths", "dropout")),
        ),
        (
            ("lazy_rescale", "fold_scale"),
            Case(B=1, T=113, S=400, N=2, K=1, H=64, features=("window",)),
        ),
    ],
    ids=lambda x: "+".join(x) if isinstance(x, tuple) else x.id,
)
def test_lazy_rescale_forward(options, case: Case, monkeypatch) -> None:
    """`ForwardConfig.lazy_rescale` (FA4's conditional rescaling) against the float64
    reference, forward and gradients (which recompute from its logsumexp), with no race."""
    config = forward.with_options(api.forward_config(case.H), options)
    monkeypatch.setattr(api, "call_config", lambda ops: config)
    interpreter.reset_gpu_interpret_mode_state()
    check_case(case, "mosaic")
    assert not interpreter.get_races().races_found


@pytest.mark.parametrize(
    "case",
    [
        Case(B=1, T=200, S=260, N=4, K=2, H=64, features=("causal", "segments")),
        Case(B=2, T=150, S=300, N=2, K=1, H=64, features=("lengths", "softcap")),
        Case(B=1, T=150, S=200, N=6, K=2, H=64, features=("causal", "dropout")),
    ],
    ids=lambda c: c.id,
)
def test_three_consumers_forward(case: Case, monkeypatch) -> None:
    """`ForwardConfig.consumers=3` (FA3's 192-row tiles at head dim 64: three consumer
    warpgroups, no ping-pong) against the float64 reference, with no race; the persistent grid
    on the causal cases; with three query heads per KV head, packed (`pack_heads`: the three
    consumers take the same 64 rows of the three heads)."""
    options = ("fold_scale", "persistent") if "causal" in case.features else ("fold_scale",)
    packed = case.N // case.K == 3
    options += ("pack_heads",) if packed else ()
    config = dataclasses.replace(
        forward.with_options(api.forward_config(case.H), options), consumers=3
    )
    assert config.rows == (64 if packed else 192) and config.register_split == (160, 32)
    monkeypatch.setattr(api, "call_config", lambda ops: config)
    interpreter.reset_gpu_interpret_mode_state()
    check_case(case, "mosaic")
    assert not interpreter.get_races().races_found
    with pytest.raises(ValueError, match="consumers"):
        dataclasses.replace(config, consumers=3, named_barriers=True)


def _lazy_steps(s2: np.ndarray, rows: int, cols: int) -> tuple[int, int]:
    """(kept, rescaled) steps after the first of `common.running_max(lazy=True)`'s rule on
    base-2 logits `s2 (T, S)`, for each tile of `rows` query rows walking `cols`-key tiles."""
    kept = rescaled = 0
    for r in range(0, s2.shape[0], rows):
        m = np.full(min(rows, s2.shape[0] - r), -np.inf)
        for c in range(0, s2.shape[1], cols):
            new = np.maximum(m, s2[r : r + rows, c : c + cols].max(axis=1))
            if np.isfinite(m).all() and (new - m).max() <= common.RESCALE_THRESHOLD:
                kept += 1
            else:
                rescaled += c > 0
                m = new
    return kept, rescaled


def test_lazy_rescale_with_a_growing_max(monkeypatch) -> None:
    """Keys whose norm grows along the sequence: the running max stays put for some steps and
    moves past the threshold on others (checked on the inputs, by the rule), and the output
    still meets the float64 reference."""
    case = Case(B=1, T=128, S=1024, N=2, K=1, H=64)
    q, k, v, dout, _ = make_inputs(case)
    ramp = jnp.linspace(1.0, 6.0, case.S, dtype=jnp.float32)[None, :, None, None]
    k = (k.astype(jnp.float32) * ramp).astype(k.dtype)
    config = forward.with_options(api.forward_config(case.H), ("lazy_rescale",))
    monkeypatch.setattr(api, "call_config", lambda ops: config)
    scale = case.H**-0.5 * np.log2(np.e)
    for h in range(case.N):
        s2 = np.einsum("td,sd->ts", np.float64(q[0, :, h]), np.float64(k[0, :, 0])) * scale
        kept, rescaled = _lazy_steps(s2, config.block_q, config.block_kv)
        assert kept > 0 and rescaled > 0, (kept, rescaled)
    got = run("mosaic", q, k, v, dout, {})
    want = run_reference64(q, k, v, dout, {})
    naive = run("xla", q, k, v, dout, {})
    assert_close(got, naive, want, label="lazy_rescale growing max")


@pytest.mark.parametrize(
    "schedule, features, seq",
    [
        (schedule, features, 300)
        for schedule, features in [
            (dict(longest_first=True), ("causal", "segments")),
            (dict(persistent=True), ("causal",)),
            (dict(persistent=True), ("lengths",)),
            (dict(persistent=True, longest_first=True), ("causal", "segments")),
            (dict(named_barriers=True), ("causal",)),
            (dict(named_barriers=True, persistent=True), ("causal", "segments")),
            (dict(async_store=True, persistent=True), ("causal", "segments")),
            (dict(prefetch_q=True), ("lengths",)),
            (dict(prefetch_q=True, persistent=True, async_store=True), ("causal", "segments")),
            (dict(pack_heads=True), ("causal", "segments")),
            (dict(pack_heads=True), ("lengths", "window", "dropout")),
            (
                dict(pack_heads=True, prefetch_q=True, persistent=True, async_store=True),
                ("causal",),
            ),
            (dict(persistent=True, pair_tiles=True), ("causal", "segments")),
            (  # with GQA packing (the --group sweeps; configs.py leaves it off until run on a GPU)
                dict(
                    pack_heads=True,
                    prefetch_q=True,
                    persistent=True,
                    async_store=True,
                    pair_tiles=True,
                ),
                ("causal",),
            ),
        ]
    ]
    + [
        (
            dict(persistent=True, pair_tiles=True, prefetch_q=True, async_store=True),
            ("causal",),
            512,
        )
    ],
    ids=lambda x: "+".join(x) if isinstance(x, (dict, tuple)) else f"T{x}",
)
def test_schedules_compute_the_same(schedule, features, seq) -> None:
    """The forward's schedules only change which CTA takes which query tile and in what order
    (`longest_first`: the tiles reversed, each head's adjacent; `persistent`: one CTA per "core"
    (4 in interpret mode) looping over the 12 tiles (16 at T = 512), its K/V ring running on
    across tiles; `pair_tiles`: its steps two tiles of a head, j and T - 1 - j, or an odd T's
    middle tile alone, as at T = 300: 3 tiles a head), or how the consumers take turns
    (`named_barriers`, emulated by mbarriers here: a protocol that left a wait unmet would hang
    or leave a phase unconsumed), or
    how long the epilogue waits for its stores (`async_store`: until read; persistent, the next
    tile's Q lands in the buffer the output left from), or who loads Q (`prefetch_q`: the
    producer, into a ring of two slots that the consumers free after their output's store), or
    which rows the consumers take (`pack_heads`: the same rows of the two query heads of the
    one KV head): the output and logsumexp are bitwise those of the grid order, and the race
    detector finds nothing."""
    grid_order = forward.with_options(api.forward_config(64), ())
    _assert_same_forward(seq, features, grid_order, forward.with_options(grid_order, schedule))


def _assert_same_forward(seq: int, features, want_config, got_config) -> None:
    """The forward with `got_config` gives bitwise `want_config`'s output and logsumexp on fresh
    inputs (B 2, T = S = seq, 2 query heads on one KV head, head dim 64), and the race detector
    finds nothing in its run."""
    case = Case(B=2, T=seq, S=seq, N=2, K=1, H=64, features=features)
    q, k, v, _, kw = make_inputs(case)
    ops = operands(q, k, v, **kw)
    want = api.forward(ops, config=want_config)
    interpreter.reset_gpu_interpret_mode_state()
    got = jax.block_until_ready(api.forward(ops, config=got_config))
    assert not interpreter.get_races().races_found
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize(
    "options, consumers",
    [
        (("async_store", "persistent", "prefetch_q", "exp2_fma"), 2),
        (("async_store", "persistent", "prefetch_q", "named_free"), 2),
        (("overlap_qk", "no_auto_barriers", "async_store", "persistent"), 2),
        (("no_auto_barriers", "no_pingpong", "async_store", "persistent"), 2),  # D256's row
        (("async_store", "persistent", "prefetch_q"), 3),  # 192-row tiles: T 300 is ragged
    ],
    ids=lambda x: "+".join(x) if isinstance(x, tuple) else f"consumers{x}",
)
def test_pair_tiles_only_orders_the_loop(options, consumers) -> None:
    """With the options the sweeps pair it with (benchmarks/tune_mosaic.py SCHEDULES and
    THREE_CONSUMERS), some of which round differently from the grid order, `pair_tiles` still
    changes only which steps take which tiles: bitwise the same options unpaired, no race (T
    300: a middle tile)."""
    unpaired = forward.with_options(api.forward_config(64), options)
    unpaired = dataclasses.replace(unpaired, consumers=consumers)
    paired = dataclasses.replace(unpaired, pair_tiles=True)
    _assert_same_forward(300, ("causal",), unpaired, paired)


@pytest.mark.parametrize(
    "variant, case",
    [
        (
            dict(early_dp=True),
            Case(B=1, T=200, S=260, N=4, K=2, H=128, features=("causal", "segments")),
        ),
        (
            dict(early_dp=True),
            Case(B=1, T=113, S=150, N=4, K=1, H=64, features=("softcap", "dropout", "lengths")),
        ),
        (
            dict(no_pingpong=True, longest_first=True),
            Case(B=2, T=150, S=150, N=2, K=1, H=64, features=("lengths", "window")),
        ),
        (
            dict(fused_dq=True, early_dp=True, no_pingpong=True),
            Case(B=1, T=200, S=260, N=4, K=2, H=128, features=("causal", "dropout")),
        ),
        (
            dict(fused_dq=True, pooled_dq=True, early_dp=True, no_pingpong=True),
            Case(B=1, T=200, S=260, N=4, K=2, H=128, features=("causal", "segments", "dropout")),
        ),
        (
            dict(fused_dq=True, pooled_dq=True, split_dq=True, early_dp=True, no_pingpong=True),
            Case(B=1, T=200, S=260, N=4, K=2, H=128, features=("causal", "segments", "dropout")),
        ),
        (
            # (head dim 256's row splits the head dim with two stages; the single kernel fits
            # one stage there and does not split)
            dict(
                fused_dq=True,
                pooled_dq=True,
                split_dq=True,
                no_pingpong=True,
                split_head=False,
                stages=1,
            ),
            Case(B=2, T=150, S=190, N=2, K=1, H=256, features=("lengths", "window")),
        ),
        (
            dict(
                fused_dq=True,
                pooled_dq=True,
                no_pingpong=True,
                longest_first=True,
                async_store=True,
            ),
            Case(B=2, T=256, S=384, N=2, K=1, H=64, features=("causal", "blocks128")),
        ),
        (
            dict(fused_dq=True, pooled_dq=True, no_pingpong=False),
            Case(B=2, T=150, S=190, N=2, K=1, H=64, features=("lengths", "window")),
        ),
        (
            dict(fused_dq=True, pooled_dq=True, double_ds=True, early_dp=True, no_pingpong=True),
            Case(B=1, T=200, S=260, N=4, K=2, H=64, features=("causal", "segments", "dropout")),
        ),
        (
            dict(fused_dq=True, pooled_dq=True, split_dq=True, double_ds=True, late_stats=True),
            Case(B=2, T=150, S=190, N=2, K=1, H=128, features=("lengths", "window", "softcap")),
        ),
        (
            dict(one_body=True),
            Case(B=1, T=200, S=260, N=4, K=2, H=128, features=("causal", "segments")),
        ),
        (
            dict(one_body=True, early_dp=True),
            Case(B=2, T=150, S=190, N=2, K=1, H=64, features=("lengths", "window", "dropout")),
        ),
        (
            dict(one_body=True, longest_first=True),
            Case(B=1, T=256, S=384, N=2, K=1, H=128, features=("blocks128",)),
        ),
        (
            dict(longest_first=True, early_dp=True),
            Case(B=1, T=256, S=384, N=2, K=1, H=128, features=("blocks128",)),
        ),
        (
            dict(late_stats=True, fused_dq=True, pooled_dq=True, split_dq=True, early_dp=True),
            Case(B=1, T=200, S=260, N=4, K=2, H=128, features=("causal", "softcap", "lengths")),
        ),
        (
            dict(split_head=True, stages=2),
            Case(B=1, T=200, S=260, N=4, K=2, H=256, features=("causal", "segments", "dropout")),
        ),
        (
            dict(split_head=True, early_dp=True, late_stats=True, longest_first=True),
            Case(B=2, T=150, S=190, N=2, K=1, H=256, features=("lengths", "window", "softcap")),
        ),
        (
            dict(split_head=True),
            Case(B=1, T=256, S=384, N=2, K=1, H=256, features=("blocks128",)),
        ),
        (
            dict(row_stats=True),
            Case(B=1, T=200, S=260, N=4, K=2, H=128, features=("causal", "segments", "dropout")),
        ),
        (
            dict(row_stats=True, longest_first=True),
            Case(B=2, T=150, S=190, N=2, K=1, H=96, features=("lengths", "window", "softcap")),
        ),
        (
            dict(row_stats=True, split_head=True, stages=2),
            Case(B=2, T=150, S=190, N=2, K=1, H=256, features=("lengths", "window", "dropout")),
        ),
        (  # row_stats does nothing where the dQ kernel does not run
            dict(row_stats=True, fused_dq=True, pooled_dq=True),
            Case(B=1, T=200, S=260, N=4, K=2, H=64, features=("causal", "lengths")),
        ),
    ],
    ids=lambda x: "+".join(x) if isinstance(x, dict) else x.id,
)
def test_backward_variants(variant, case: Case, monkeypatch) -> None:
    """The backward's schedule variants (BackwardConfig: `early_dp`, S and dP issued back to
    back, P computed while dP runs; `no_pingpong`; `longest_first`, heads fastest and dQ's
    query tiles reversed, with visit lists too; `one_body`, the element rule under a `lax.cond`;
    the single kernel, `fused_dq`, `pooled_dq`, `split_dq` and `double_ds`; `async_store`;
    `late_stats`;
    `split_head`, FA3's head-dim split of both kernels at head dim 256; `row_stats`, delta and
    the logsumexp from the dQ kernel) against the float64 reference, with no race."""
    config = dataclasses.replace(api.backward_config(case.H), **variant)
    monkeypatch.setattr(configs, "MOSAIC_BACKWARD_ON_TRITON", frozenset())
    monkeypatch.setattr(api, "backward_config", lambda head_dim, *call: config)
    interpreter.reset_gpu_interpret_mode_state()
    check_case(case, "mosaic")
    assert not interpreter.get_races().races_found


# Each kernel's table of configs.py rows and the api function that applies a row's rules.
RULE_TABLES = {
    "forward": (configs.MOSAIC_FORWARD, api.forward_config),
    "backward": (configs.MOSAIC_BACKWARD, api.backward_config),
}


def _rule_cases() -> list[tuple[str, int, configs.CallRule]]:
    """(kernel, head dim, rule) of every rule of configs.py's two tables."""
    return [
        (kernel, h, rule)
        for kernel, (table, _) in RULE_TABLES.items()
        for h, row in table.items()
        for rule in row.rules
    ]


def _rows_named_by(rule: configs.CallRule) -> int:
    """Query rows of a call the rule names (about 1000 where its range allows)."""
    return max(rule.min_rows, min(1000, rule.max_rows or 1000))


class _Handed(Exception):
    """What `_capture_configs`' stand-in kernel raises once it has recorded its config."""


def _capture_configs(monkeypatch, module, name: str) -> list:
    """`module.name` (a kernel's launch) replaced by one that records the `config` it is handed
    and raises `_Handed`, so that a test checks configs without running a kernel; the list of
    configs handed."""
    seen = []

    def capture(*args, config, **kwargs):
        seen.append(config)
        raise _Handed

    monkeypatch.setattr(module, name, capture)
    return seen


def test_calls_take_their_rules(monkeypatch) -> None:
    """A call runs what its configs.MOSAIC_FORWARD row's rules change for it (causal or not,
    by query rows; in order, a later rule turning off what an earlier one turned on), any other
    call the head dim's plain choice; a rule whose CTA tile does not divide the call's block
    mask gives way to the plain choice (which `cta_tiles` checked). The kernel is not run: the
    config it is handed is what is checked."""
    seen = _capture_configs(monkeypatch, forward, "forward")
    rules = (
        configs.CallRule(causal=True, max_rows=200, options=("persistent", "async_store")),
        configs.CallRule(causal=False, min_rows=200, consumers=3, options=("overlap_qk",)),
        configs.CallRule(causal=True, min_rows=150, max_rows=200, drop=("async_store",)),
    )
    row = dataclasses.replace(configs.MOSAIC_FORWARD[64], rules=rules)
    monkeypatch.setitem(configs.MOSAIC_FORWARD, 64, row)
    calls = [
        (130, ("causal",)),
        (160, ("causal",)),
        (130, ("lengths",)),
        (130, ("window",)),
        (260, ("causal",)),
        (260, ("lengths",)),
        (260, ("blocks128",)),
    ]
    for t, features in calls:
        q, k, v, _, kw = make_inputs(Case(B=1, T=t, S=t, N=2, K=1, H=64, features=features))
        with pytest.raises(_Handed):
            api.forward(operands(q, k, v, **kw))
    causal, plain = api.forward_config(64, 130, causal=True), api.forward_config(64)
    long = api.forward_config(64, 260)
    dropped = api.forward_config(64, 160, causal=True)
    assert causal.persistent and causal.async_store and not plain.persistent
    assert dropped == dataclasses.replace(causal, async_store=False)
    assert long.consumers == 3 and long.overlap_qk and plain.consumers == 2
    assert api.forward_config(64, 201, causal=True) == plain == api.forward_config(64, 199)
    assert seen == [causal, dropped, plain, plain, plain, long, plain]


@pytest.mark.parametrize("kernel, head_dim, rule", _rule_cases(), ids=str)
def test_every_rule_makes_a_config(kernel: str, head_dim: int, rule: configs.CallRule) -> None:
    """Each rule of the tables, with whatever other rules also match its calls, gives a config
    (no pair of forward.EXCLUSIVE) that differs from the row's own."""
    config_of = RULE_TABLES[kernel][1]
    ruled = config_of(head_dim, _rows_named_by(rule), rule.causal, rule.min_group)
    assert ruled != config_of(head_dim)


def test_backward_calls_take_their_rules(monkeypatch) -> None:
    """A call's backward runs what its configs.MOSAIC_BACKWARD row's rules change for it
    (options in order, registers), its tiles the row's for every call; a rule cannot change the
    backward's consumers."""
    seen = _capture_configs(monkeypatch, backward, "dkdv")
    rules = (
        configs.CallRule(causal=True, max_rows=200, options=("async_store",), drop=("early_dp",)),
        configs.CallRule(causal=False, min_rows=200, registers=(240, 24)),
    )
    row = dataclasses.replace(configs.MOSAIC_BACKWARD[128], rules=rules)
    monkeypatch.setitem(configs.MOSAIC_BACKWARD, 128, row)
    plain, short = api.backward_config(128), api.backward_config(128, 130, causal=True)
    long = api.backward_config(128, 260)
    assert short == dataclasses.replace(plain, async_store=True, early_dp=False)
    assert long == dataclasses.replace(plain, registers=(240, 24))
    assert api.backward_config(128, 260, causal=True) == plain == api.backward_config(128, 130)
    for t, features in [(130, ("causal",)), (260, ("lengths",)), (130, ("lengths",))]:
        q, k, v, do, kw = make_inputs(Case(B=1, T=t, S=t, N=2, K=1, H=128, features=features))
        ops = operands(q, k, v, **kw)
        lse2 = jnp.zeros((1, 2, t), jnp.float32)  # (the kernel is not run: any residuals do)
        with pytest.raises(_Handed):
            api.backward(ops, q, lse2, do, None)
    assert seen == [short, long, plain]
    with pytest.raises(ValueError, match="consumers"):
        configs.MosaicBackward(64, 64, 2, rules=(configs.CallRule(causal=False, consumers=3),))


def test_backward_rows_make_their_configs(monkeypatch) -> None:
    """configs.MOSAIC_BACKWARD's record is the backward's one source: its tiles, exactly its
    options, and its setmaxnreg split when it names one (the kernel's default when not)."""
    default = backward.BackwardConfig(rows=1, cols=1, stages=1).registers
    for head_dim, row in configs.MOSAIC_BACKWARD.items():
        cfg = api.backward_config(head_dim)
        assert (cfg.rows, cfg.cols, cfg.stages) == (row.rows, row.cols, row.stages)
        assert set(pipeline.options_on(cfg, backward.OPTIONS)) == set(row.options)
        assert cfg.registers == (row.registers or default)
    split = configs.MosaicBackward(64, 64, 2, ("fused_dq",), registers=(240, 24))
    monkeypatch.setitem(configs.MOSAIC_BACKWARD, 128, split)
    cfg = api.backward_config(128)
    assert cfg.registers == (240, 24) and cfg.fused_dq and not cfg.early_dp


def test_rule_registers_reach_two_consumer_calls(monkeypatch) -> None:
    """A rule's setmaxnreg split reaches the two-consumer configs of the calls it names, and
    stays for later rules that set none; a call made three-consumer keeps the kernel's split;
    calls no such rule names keep the default."""
    rules = (
        configs.CallRule(causal=False, registers=(240, 24)),
        configs.CallRule(causal=False, max_rows=300, options=("persistent",)),
        configs.CallRule(causal=False, min_rows=4096, consumers=3),
    )
    row = dataclasses.replace(configs.MOSAIC_FORWARD[64], rules=rules)
    monkeypatch.setitem(configs.MOSAIC_FORWARD, 64, row)
    default = api.forward_config(64).register_split
    short, mid = api.forward_config(64, 256), api.forward_config(64, 1024)
    assert short.persistent and short.register_split == mid.register_split == (240, 24)
    assert api.forward_config(64, 8192).register_split == (160, 32)
    assert api.forward_config(64, 1024, causal=True).register_split == default == (232, 40)


# Calls a rule names, on the GPU: with the scale folded (no soft-cap) and without.
RULE_FEATURES = {
    True: [("causal", "segments"), ("causal", "lengths", "dropout")],
    False: [("lengths", "softcap"), ("lengths", "window", "dropout")],
}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_dim, rule, features",
    [(h, r, f) for _, h, r in _rule_cases() for f in RULE_FEATURES[r.causal]],
    ids=lambda x: "+".join(x) if isinstance(x, tuple) else str(x),
)
def test_every_rule_on_gpu(head_dim: int, rule: configs.CallRule, features) -> None:
    """Each rule of configs.py's two tables, compiled on the H200, on calls it names
    (RULE_FEATURES), against the float64 reference (both kernels take their calls' configs).
    Past 4k rows the call has one group of heads: the reference's float64 scores take 2.2 GB a
    head at 16k rows and the tier's workers a fifth of the GPU each (session 24's tier failed
    the 16k rule's four-head call, which passes alone: benchmarks/results/2026-12-04-h200-s25)."""
    if configs.gpu_target() != "sm90":
        pytest.skip("the Mosaic kernels run on Hopper (sm90) only")
    rows = _rows_named_by(rule)
    seq_k = rows if rule.causal else rows + 100
    heads = 4 if rows <= 4096 else rule.min_group
    kv_heads = heads // rule.min_group  # a GQA rule's group; the others' calls are MHA
    case = Case(B=1, T=rows, S=seq_k, N=heads, K=kv_heads, H=head_dim, features=features)
    q, k, v, _, kw = make_inputs(case)
    assert served("mosaic", q, k, v, kw)  # else check_case would pass without running it
    assert api.call_config(operands(q, k, v, **kw)) == api.forward_config(
        head_dim, rows, rule.causal, rule.min_group
    )
    check_case(case, "mosaic")


def test_pack_heads_only_where_the_group_divides(monkeypatch) -> None:
    """`pack_heads` needs the query heads of one KV head to be a multiple of the consumers: a
    call whose group is not keeps the rows of one head per CTA (`api.call_config`), and the
    kernel handed the option anyway refuses it by name before tracing."""
    row = dataclasses.replace(configs.MOSAIC_FORWARD[64], options=("pack_heads",), rules=())
    monkeypatch.setitem(configs.MOSAIC_FORWARD, 64, row)
    for n, k, packs in [(4, 1, True), (4, 2, True), (2, 2, False), (6, 2, False)]:
        q, kk, v, _, kw = make_inputs(Case(B=1, T=100, S=100, N=n, K=k, H=64, features=()))
        ops = operands(q, kk, v, **kw)
        cfg = api.call_config(ops)
        assert cfg.pack_heads == packs and cfg.rows == (64 if packs else 128), (n, k)
    packed = api.forward_config(64)
    with pytest.raises(ValueError, match="pack_heads: 3 query heads per KV head"):
        api.forward(ops, config=packed)


def test_gqa_rules_take_only_grouped_calls() -> None:
    """A rule with `min_group` changes the config of calls with that many query heads per KV
    head or more, not of MHA calls; the backward's rows refuse one (it packs no heads)."""
    rule = configs.CallRule(causal=False, max_rows=512, min_group=4, options=("pack_heads",))
    assert rule.matches(256, False, 4) and rule.matches(256, False, 8)
    assert not rule.matches(256, False, 2) and not rule.matches(256, False)
    assert "group4+" in str(rule)
    grouped, mha = api.forward_config(128, 256, False, 8), api.forward_config(128, 256, False)
    assert grouped.pack_heads and grouped.persistent and not mha.pack_heads
    with pytest.raises(ValueError, match="cannot name a GQA group"):
        dataclasses.replace(configs.MOSAIC_BACKWARD[128], rules=(rule,))


def test_fma_columns_come_in_column_tiles() -> None:
    """`ForwardConfig.fma_columns` (exp2_fma's columns a key tile) must be a multiple of 8 in
    1..block_kv, else the config raises naming it; without exp2_fma it is not read."""
    plain = api.forward_config(64)
    for bad in (0, 12, plain.block_kv + 8):
        with pytest.raises(ValueError, match=f"fma_columns must be .* got {bad}"):
            dataclasses.replace(plain, exp2_fma=True, fma_columns=bad)
    assert dataclasses.replace(plain, exp2_fma=True, fma_columns=plain.block_kv).exp2_fma
    assert not dataclasses.replace(plain, fma_columns=12).exp2_fma


def test_split_head_refuses_what_it_cannot_run() -> None:
    """`BackwardConfig.split_head` names the field it cannot run with, and a head dim whose
    halves are not whole 64-column swizzle rows, before any kernel is traced."""
    with pytest.raises(ValueError, match="split_head runs without fused_dq"):
        backward.BackwardConfig(split_head=True, fused_dq=True)
    with pytest.raises(ValueError, match="split_head runs without fused_dq and overlap_dv"):
        backward.BackwardConfig(split_head=True, overlap_dv=True)
    with pytest.raises(ValueError, match="cols a multiple of 64, got 96"):
        backward.BackwardConfig(split_head=True, cols=96)
    config = backward.BackwardConfig(split_head=True)
    assert config.cta_rows == config.rows and not config.turns
    q = jnp.zeros((1, 64, 2, 192), jnp.bfloat16)
    k = jnp.zeros((1, 128, 1, 192), jnp.bfloat16)
    stats = jnp.zeros((1, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="head dim that is a multiple of 128, got 192"):
        backward.dkdv(q, k, k, q, stats, stats, statics=None, config=config, seq_lens=(64, 128))


def test_exclusive_forward_options_raise() -> None:
    """The pairs of forward options that gave wrong outputs on the H200 together are refused by
    name; the widest sets the tests run are taken."""
    for first, second in forward.EXCLUSIVE:
        with pytest.raises(ValueError, match=f"{first} with {second}"):
            forward.with_options(api.forward_config(64), (first, second, "fold_scale"))
    for widest in forward.WIDEST:
        assert forward.with_options(api.forward_config(64), widest).persistent
    assert "prefetch_q" in forward.WIDEST[1] and "overlap_qk" in forward.WIDEST[0]


@pytest.mark.parametrize("head_dim", sorted(configs.MOSAIC_FORWARD))
def test_every_configured_kernel_fits_shared_memory(head_dim: int) -> None:
    """configs.py's choice for every call the rules tell apart (seq 256-32k, causal or not, 1
    or 8 query heads per KV head), with and without segment ids, fits the device's shared
    memory (counted as Mosaic does, `pipeline.smem_bytes`: test_gpu_lowering checks the count)
    at its own stages: the forward as configured, the backward kernels as configured or, where
    segment ids leave no room for them, without `double_ds`'s second slots (head dim 128's
    rule from 16k rows)."""
    dtype = jnp.bfloat16
    dropped = set()
    for rows, causal, group, segments in itertools.product(
        [256 << i for i in range(8)], (False, True), (1, 8), (False, True)
    ):
        extras = {"q_seg": 1, "kv_seg": 1} if segments else {}
        call = (head_dim, rows, causal, group)
        cfg = api.forward_config(*call)
        assert pipeline.fits(forward._scratch(cfg, head_dim, dtype, extras, False)), call
        if api.backward_on_triton(head_dim):
            continue
        configured = api.backward_config(*call)
        for scratch in (backward._dkdv_scratch, backward._dq_scratch):
            of = functools.partial(scratch, head_dim=head_dim, dtype=dtype, extras=extras)
            run = backward._fitted(configured, lambda c, of=of: of(c, via_smem=False))
            assert pipeline.fits(of(run, via_smem=False)) and run.stages == configured.stages
            if run != configured:
                assert run == dataclasses.replace(configured, double_ds=False), call
                dropped.add((rows, causal, segments))
    expected = {(r, False, True) for r in (16384, 32768)} if head_dim == 128 else set()
    assert dropped == expected
