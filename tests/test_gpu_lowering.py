"""Every kernel lowers for the GPU, checked here on the CPU.

`jax.jit(...).lower(lowering_platforms=("cuda",))` under an abstract NVIDIA H200 runs the Pallas
lowering of each kernel (Pallas -> Triton IR; Pallas -> Mosaic GPU) exactly as a GPU run would, so
a kernel change that does not lower (shapes, layouts, unsupported ops, ref indexing) fails in CI
rather than in the next session's device call. What only the GPU checks: the Triton / ptxas
compilation of that IR and the numbers (the GPU tier, `pytest -m gpu`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import pytest
from jax._src.mesh import AbstractDevice
from jax.sharding import AbstractMesh

from flashjax import BlockMask
from flashjax.attention import operands
from flashjax.decode import decode_operands
from pallas_kernels.mosaic import api as mosaic_api
from pallas_kernels.mosaic.forward import WIDEST, with_options
from pallas_kernels.triton import api as triton_api
from pallas_kernels.triton import decode_api

H200 = AbstractMesh(
    (1,), ("x",), abstract_device=AbstractDevice("NVIDIA H200", num_cores=132, platform="gpu")
)


def lowered_for_h200(f, *args) -> str:
    """The StableHLO text of `f(*args)` lowered for CUDA on an (abstract) H200."""
    with jax.sharding.use_abstract_mesh(H200):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


B, T, S, N, K = 2, 1000, 1100, 8, 2
FEATURES = {
    "plain": {},
    "causal-window": dict(is_causal=True, local_window_size=(300, 0)),
    "lengths-offsets": dict(
        is_causal=True,
        key_value_seq_lengths=jnp.array([900, 1100]),
        query_seq_lengths=jnp.array([1000, 700]),
        q_offsets=jnp.array([100, 0]),
    ),
    "segments": dict(
        q_segment_ids=jnp.zeros((B, T), jnp.int32), kv_segment_ids=jnp.zeros((B, S), jnp.int32)
    ),
    "block-mask": dict(block_mask=BlockMask.from_blocks(jnp.ones((8, 9), bool), 128)),
    "softcap": dict(is_causal=True, logits_soft_cap=30.0),
    "dropout": dict(is_causal=True, dropout_rate=0.1, dropout_rng=jax.random.key(0)),
    "bias-dropout-softcap": dict(
        bias=jnp.ones((1, N, T, S)),
        dropout_rate=0.1,
        dropout_rng=jax.random.key(0),
        logits_soft_cap=5.0,
    ),
}


def _each_with_a_head_dim(features: list[str]) -> list[tuple[str, int]]:
    """Each feature once, the head dims 64, 128, 256 taken in turn: every feature and every
    head dim lowers, at a third of the full grid's time (the CPU tier's budget)."""
    return [(f, (64, 128, 256)[i % 3]) for i, f in enumerate(features)]


@pytest.mark.parametrize("feature, head_dim", _each_with_a_head_dim(list(FEATURES)))
def test_triton_kernels_lower(feature: str, head_dim: int) -> None:
    q = jnp.zeros((B, T, N, head_dim), jnp.bfloat16)
    kv = jnp.zeros((B, S, K, head_dim), jnp.bfloat16)
    ops = operands(q, kv, kv, **FEATURES[feature])

    def forward_and_backward(ops):
        out, lse2 = triton_api.forward(ops, target="sm90")
        return triton_api.backward(ops, out, lse2, out, None, target="sm90")

    text = lowered_for_h200(forward_and_backward, ops)
    assert text.count("xla.gpu.triton") == 3  # forward, dK/dV, dQ


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("page", [0, 16, 256])  # 0: contiguous; pages below / above block_k
def test_decode_kernel_lowers(head_dim: int, page: int) -> None:
    q = jnp.zeros((4, 1, 32, head_dim), jnp.bfloat16)
    lengths = jnp.array([100, 4000, 4096, 1], jnp.int32)
    if page:
        per_row = 4096 // page
        cache = jnp.zeros((4 * per_row, page, 8, head_dim), jnp.bfloat16)
        table = jnp.arange(4 * per_row, dtype=jnp.int32).reshape(4, per_row)
    else:
        cache = jnp.zeros((4, 4096, 8, head_dim), jnp.bfloat16)
        table = None
    ops = decode_operands(q, cache, cache, lengths, page_table=table)
    text = lowered_for_h200(lambda ops: decode_api.forward(ops, target="sm90"), ops)
    assert "xla.gpu.triton" in text


@pytest.mark.parametrize(
    "feature, head_dim",
    # head dim 64 (its single-kernel backward) with the visit lists: segments, a block mask
    _each_with_a_head_dim(
        [
            "segments",
            "lengths-offsets",
            "causal-window",
            "block-mask",
            "softcap",
            "plain",
            "dropout",
        ]
    ),
)
def test_mosaic_kernels_lower(feature: str, head_dim: int) -> None:
    q = jnp.zeros((B, T, N, head_dim), jnp.bfloat16)
    kv = jnp.zeros((B, S, K, head_dim), jnp.bfloat16)
    ops = operands(q, kv, kv, **FEATURES[feature])

    def forward_and_backward(ops):
        out, lse2 = mosaic_api.forward(ops, interpret=False)
        return mosaic_api.backward(ops, out, lse2, out, None, interpret=False)

    text = lowered_for_h200(forward_and_backward, ops)
    assert text.count("mosaic_gpu") >= 3  # forward, dK/dV, dQ


def test_mosaic_schedule_options_lower() -> None:
    """The sweep's forward options (benchmarks/tune_mosaic.py) lower for the H200: the folded
    scale, the longest-first grid order, the persistent grid, the ping-pong on named barriers
    (inline PTX, which interpret mode cannot run), kernels without Pallas' automatic SMEM
    barriers, and the backward with dQ fused into the dK/dV kernel (its TMA reduce-add, which
    interpret mode cannot run either)."""
    from pallas_kernels.mosaic.backward import BackwardConfig

    q = jnp.zeros((2, 512, 4, 128), jnp.bfloat16)
    kv = jnp.zeros((2, 512, 2, 128), jnp.bfloat16)
    ops = operands(q, kv, kv, is_causal=True)
    # Every option on but one of the two that do not go together (ForwardConfig); the persistent
    # loop also without its pairs of tiles.
    unpaired = tuple(o for o in WIDEST[1] if o != "pair_tiles")
    for widest in (*WIDEST, unpaired):
        fwd = with_options(mosaic_api.forward_config(128), widest)
        bwd = BackwardConfig(no_auto_barriers=True, fused_dq=True)

        def forward_and_backward(ops, fwd=fwd, bwd=bwd):
            out, lse = mosaic_api.forward(ops, interpret=False, config=fwd)
            return mosaic_api.backward(ops, out, lse, out, None, interpret=False, config=bwd)

        text = lowered_for_h200(forward_and_backward, ops)
        assert text.count("mosaic_gpu") >= 2  # forward, dK/dV with dQ fused (no dQ kernel)


def test_exp2_fma_columns_lower() -> None:
    """`exp2_fma` with more columns than its 8 (`ForwardConfig.fma_columns`, swept by
    tune_mosaic.py --fma-columns) lowers for the H200, up to the whole key tile."""
    q = jnp.zeros((2, 512, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((2, 512, 4, 64), jnp.bfloat16)
    ops = operands(q, kv, kv, is_causal=True)
    base = with_options(mosaic_api.forward_config(64), ("exp2_fma", "fold_scale"))
    for columns in (24, base.block_kv):
        fwd = dataclasses.replace(base, fma_columns=columns)
        text = lowered_for_h200(lambda ops, fwd=fwd: mosaic_api.forward(ops, False, fwd), ops)
        assert text.count("mosaic_gpu") >= 1, columns


def test_named_barriers_reach_the_kernel(monkeypatch) -> None:
    """The hardware named barriers are emitted into the kernel: FA3's ping-pong
    (`named_barriers`: `bar.arrive` on the other consumer's barrier, `bar.sync` on its own, 256
    threads) and `named_free`'s slot releases (the consumers' `bar.arrive`, the producer's
    `bar.sync`, 384 threads). Until session 22 the inline PTX was built but never called, so
    no named barrier reached the GPU and every lowering test passed all the same."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    emitted = []
    inline_ptx = mgpu_utils.inline_ptx

    def recording(asm, *args, **kwargs):
        emitted.append(asm)
        return inline_ptx(asm, *args, **kwargs)

    monkeypatch.setattr(mgpu_utils, "inline_ptx", recording)
    q = jnp.zeros((2, 1024, 4, 128), jnp.bfloat16)
    kv = jnp.zeros((2, 1024, 2, 128), jnp.bfloat16)
    ops = operands(q, kv, kv, is_causal=True)
    base = with_options(mosaic_api.forward_config(128), ("named_barriers",))
    for fwd in (base, dataclasses.replace(base, named_barriers=False, named_free=True)):

        def forward(ops, fwd=fwd):
            return mosaic_api.forward(ops, interpret=False, config=fwd)

        emitted.clear()
        lowered_for_h200(forward, ops)
        if fwd.named_barriers:
            expected = {f"bar.{op} {4 + c}, 256;" for op in ("arrive", "sync") for c in (0, 1)}
        else:
            expected = {f"bar.{op} {6 + i}, 384;" for op in ("arrive", "sync") for i in range(4)}
        assert expected <= set(emitted), (expected - set(emitted), emitted[:8])


@pytest.mark.parametrize("feature", ["plain", "segments"])
def test_mosaic_three_consumer_forward_lowers(feature: str) -> None:
    """The head dim 64 forward with three consumer warpgroups (FA3's 192-row tiles), plain and
    with FA3's intra-warpgroup overlap, lowers for the H200."""
    q = jnp.zeros((B, T, N, 64), jnp.bfloat16)
    kv = jnp.zeros((B, S, K, 64), jnp.bfloat16)
    ops = operands(q, kv, kv, **FEATURES[feature])
    for options in (("fold_scale",), ("fold_scale", "overlap_qk", "persistent")):
        base = with_options(mosaic_api.forward_config(64), options)
        fwd = dataclasses.replace(base, consumers=3)

        def forward(ops, fwd=fwd):
            return mosaic_api.forward(ops, interpret=False, config=fwd)

        assert lowered_for_h200(forward, ops).count("mosaic_gpu") >= 1


@pytest.mark.parametrize("feature", ["plain", "segments", "block-mask", "bias-dropout-softcap"])
def test_mosaic_overlapped_forward_lowers(feature: str) -> None:
    """The forward with FA3's intra-warpgroup overlap (`overlap_qk`: each step's softmax runs
    while the previous tile's PV is in flight; GPU only, as interpret mode runs no in-place PV)
    lowers for the H200 at head dims 64 and 128 with every masking path: the element masks of
    partial tiles, the keys' segment-id stream, bias, dropout, soft-cap; without automatic
    barriers (the candidate default at head dim 128), there with FA3's ping-pong on named
    barriers (`pipeline.IssueTurn`)."""
    for head_dim in (64, 128):
        q = jnp.zeros((B, T, N, head_dim), jnp.bfloat16)
        kv = jnp.zeros((B, S, K, head_dim), jnp.bfloat16)
        ops = operands(q, kv, kv, **FEATURES[feature])
        options = ["overlap_qk", "no_auto_barriers"]
        options += ["named_barriers"] if head_dim == 128 else []
        fwd = with_options(mosaic_api.forward_config(head_dim), options)
        assert fwd.overlap_qk

        def forward(ops, fwd=fwd):
            return mosaic_api.forward(ops, interpret=False, config=fwd)

        assert lowered_for_h200(forward, ops).count("mosaic_gpu") >= 1


_BACKWARD_VARIANTS = [
    dict(overlap_dv=True),
    dict(overlap_dv=True, early_dp=True),
    dict(early_dp=True, no_pingpong=True, longest_first=True, async_store=True),
    dict(fused_dq=True, early_dp=True, overlap_dv=True, no_pingpong=True),
    dict(fused_dq=True, pooled_dq=True, early_dp=True, overlap_dv=True),
    dict(fused_dq=True, pooled_dq=True, split_dq=True, early_dp=True, overlap_dv=True),
    dict(fused_dq=True, pooled_dq=True, split_dq=True, overlap_dv=True, late_stats=True),
    dict(one_body=True, early_dp=True, overlap_dv=True, no_pingpong=True),
    dict(fused_dq=True, early_dp=True, overlap_dv=True, dq_first=True),
    dict(fused_dq=True, pooled_dq=True, early_dp=True, overlap_dv=True, dq_first=True),
    dict(fused_dq=True, pooled_dq=True, split_dq=True, overlap_dv=True, dq_first=True),
    # (split_dq, which head dim 64 does not take: at 128 the unsplit pooled part's two slots
    # ask for 297 KB of shared memory)
    dict(
        fused_dq=True, pooled_dq=True, split_dq=True, early_dp=True, overlap_dv=True, double_ds=True
    ),
    dict(fused_dq=True, pooled_dq=True, split_dq=True, overlap_dv=True, double_ds=True),
]


@pytest.mark.parametrize(
    "index", range(len(_BACKWARD_VARIANTS)), ids=lambda i: "+".join(_BACKWARD_VARIANTS[i])
)
def test_mosaic_overlapped_dkdv_lowers(index: int) -> None:
    """The backward's overlapped orders lower for the H200 at head dims 64 and 128, one of them
    with dropout (the variants take turns: every variant lowers with and without dropout, and
    each head dim with and without it): `BackwardConfig.overlap_dv` (dS computed while the dV
    matmul runs, the wait by `wgmma_accumulator_load(wait_n=1)`; GPU only, so interpret mode
    never runs it), with `early_dp` (dP issued with S) and the other schedule variants."""
    from pallas_kernels.mosaic.backward import BackwardConfig

    variant = _BACKWARD_VARIANTS[index]
    bwd = BackwardConfig(**variant)

    def backward(ops):
        out, lse = mosaic_api.forward(ops, interpret=False)
        return mosaic_api.backward(ops, out, lse, out, None, interpret=False, config=bwd)

    for head_dim, dropout in ((64, 0.0), (128, 0.1)) if index % 2 else ((64, 0.1), (128, 0.0)):
        q = jnp.zeros((2, 512, 4, head_dim), jnp.bfloat16)
        kv = jnp.zeros((2, 512, 2, head_dim), jnp.bfloat16)
        seeds = dict(dropout_rate=dropout, dropout_rng=jax.random.key(0)) if dropout else {}
        ops = operands(q, kv, kv, is_causal=True, **seeds)
        text = lowered_for_h200(backward, ops)
        kernels = 2 if variant.get("fused_dq") else 3  # forward, dK/dV (with dQ fused), dQ
        assert text.count("mosaic_gpu") >= kernels


def test_mosaic_kernels_trace_inside_shard_map() -> None:
    """Inside `jax.shard_map` (check_vma on, as ring attention and users call it), every operand
    varies over the mesh axis, so values a kernel reads from GMEM (visit-list counts, sequence
    info) do too; loops bounded by them must still type-check (a loop index started at such a
    value did not: the 2-GPU ring test failed so at 14e6015). The Triton kernels under shard_map
    run in the GPU tier (tests/test_gpu.py)."""
    mesh = jax.sharding.Mesh(jax.devices()[:2], ("sp",))
    spec = jax.sharding.PartitionSpec(None, "sp")

    def per_device(q, k, v, seg):
        offsets = jnp.full((q.shape[0],), jax.lax.axis_index("sp") * q.shape[1], jnp.int32)
        ops = operands(
            q, k, v, is_causal=True, q_offsets=offsets, q_segment_ids=seg, kv_segment_ids=seg
        )
        out, lse = mosaic_api.forward(ops, interpret=False)
        return out + sum(mosaic_api.backward(ops, out, lse, out, None, interpret=False))

    f = jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    x = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    text = jax.jit(f).trace(x, x, x, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3  # forward, dK/dV, dQ
    # Named so that a profile shows them as ours (`bench --ring --profile` looks for "flashjax").
    for kernel in ("forward", "dkdv", "dq"):
        assert f"flashjax_mosaic_{kernel}" in text


def test_gradients_through_the_kernels_type_check_inside_shard_map(monkeypatch):
    """The all-gather baseline differentiates `dot_product_attention` inside `jax.shard_map`: the
    custom_vjp's cotangents must vary over the mesh axis as its primals do, though a kernel's
    outputs vary over none (the bench's all-gather fwd+bwd failed so on 2 H200s at eabeedc; the
    interpret-mode kernels keep the axes, so the check needs the GPU path, lowered here; the Triton
    lowering needs an abstract device, which a concrete mesh excludes)."""
    from flashjax.ring import all_gather_attention
    from pallas_kernels import configs

    monkeypatch.setattr(configs, "gpu_target", lambda device=None: "sm90")
    mesh = jax.sharding.Mesh(jax.devices()[:2], ("sp",))
    spec = jax.sharding.PartitionSpec(None, "sp")

    def per_device(q, k, v):
        return all_gather_attention(
            q, k, v, axis_name="sp", is_causal=True, layout="zigzag", implementation="mosaic"
        )

    f = jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

    def loss(q, k, v):
        return f(q, k, v).astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x)
    text = grads.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3  # forward, dK/dV, dQ


@pytest.mark.parametrize("shape", [(1, N, T, S), (B, 1, 1, S), (1, N, T, 1), (1, N, 1, 1)])
def test_mosaic_forward_with_a_bias_lowers(shape) -> None:
    """The Mosaic forward reads a bias tile, a row or a column straight from GMEM into the WGMMA
    layout (the backward of a bias call is the Triton kernels')."""
    q = jnp.zeros((B, T, N, 128), jnp.bfloat16)
    kv = jnp.zeros((B, S, K, 128), jnp.bfloat16)
    ops = operands(q, kv, kv, jnp.ones(shape, jnp.float32), is_causal=True)
    text = lowered_for_h200(lambda ops: mosaic_api.forward(ops, interpret=False), ops)
    assert text.count("mosaic_gpu") >= 1


def test_mosaic_forward_reading_keys_in_place_lowers() -> None:
    """The forward reading a ring's key piece in place (`kv_source`: rows 256.. of a stacked
    `(2, B, S, K, H)` K/V buffer, passed as both K and V) lowers for the H200, and without a copy
    of the piece: no slice of the buffer is left in the program."""
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    buffer = jnp.zeros((2, 1, 512, 2, 128), jnp.bfloat16)

    def forward(q, buffer):
        piece = buffer[:, :, 256:]
        ops = operands(q, piece[0], piece[1], is_causal=True)
        return mosaic_api.forward(ops, interpret=False, kv_source=(buffer, 256))

    text = lowered_for_h200(forward, q, buffer)
    assert text.count("mosaic_gpu") >= 1 and "stablehlo.slice" not in text


@pytest.mark.parametrize("feature", ["segments", "dropout", "block-mask", "lengths-offsets"])
def test_mosaic_split_head_backward_lowers(feature: str) -> None:
    """`BackwardConfig.split_head` (FA3's head-dim split of both backward kernels: S and dP of
    half the streamed columns a consumer, N = 32; the halves stored into one 64-byte-swizzled
    tile, read into registers as the A operand; dK, dV, dQ stored by column halves) lowers for
    the H200 at head dims 256 (two stages) and 128, with the features that touch its step."""
    from pallas_kernels.mosaic.backward import BackwardConfig

    for head_dim in (256, 128):
        bwd = BackwardConfig(split_head=True, stages=2, early_dp=True, longest_first=True)

        def backward(ops, bwd=bwd):
            out, lse = mosaic_api.forward(ops, interpret=False)
            return mosaic_api.backward(ops, out, lse, out, None, interpret=False, config=bwd)

        q = jnp.zeros((B, T, N, head_dim), jnp.bfloat16)
        kv = jnp.zeros((B, S, K, head_dim), jnp.bfloat16)
        text = lowered_for_h200(backward, operands(q, kv, kv, **FEATURES[feature]))
        assert text.count("mosaic_gpu") >= 3, head_dim  # forward, dK/dV, dQ


@pytest.mark.parametrize("feature", ["plain", "segments"])
@pytest.mark.parametrize(
    "head_dim, options",
    [(256, ("split_head",)), (256, ()), (128, ()), (64, ("fused_dq",))],
)
def test_shared_memory_count_is_mosaics(feature: str, head_dim: int, options, monkeypatch):
    """`pipeline.smem_bytes` counts the backward kernels' shared memory as Mosaic's lowering
    does (the size it checks against the device's 227 KiB), so `backward._fitted` keeps what
    fits: at head dim 256 two stages with `split_head`, one without (both kernels)."""
    import jax.experimental.mosaic.gpu.core as mosaic_core

    from pallas_kernels.mosaic import backward as bw
    from pallas_kernels.mosaic import pipeline as pp

    counted = []
    count = mosaic_core._smem_tree_size
    monkeypatch.setattr(
        mosaic_core, "_smem_tree_size", lambda tree: counted.append(count(tree)) or counted[-1]
    )
    config = bw.with_options(bw.BackwardConfig(stages=2), (*options, "longest_first"))

    def backward(ops):
        out, lse = mosaic_api.forward(ops, interpret=False)
        return mosaic_api.backward(ops, out, lse, out, None, interpret=False, config=config)

    q = jnp.zeros((B, T, N, head_dim), jnp.bfloat16)
    kv = jnp.zeros((B, S, K, head_dim), jnp.bfloat16)
    lowered_for_h200(backward, operands(q, kv, kv, **FEATURES[feature]))
    extras = {"q_seg": 1, "kv_seg": 1} if feature == "segments" else {}
    scratches = [bw._dkdv_scratch] + ([] if config.fused_dq else [bw._dq_scratch])
    expected = []
    for scratch in scratches:
        of = functools.partial(scratch, head_dim=head_dim, dtype=q.dtype, extras=extras)
        fitted = bw._fitted(config, lambda c, of=of: of(c, via_smem=False))
        expected.append(pp.smem_bytes(of(fitted, via_smem=False)))
    assert counted[1:] == expected  # after the forward's
    assert max(expected) <= 227 * 1024


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_configured_choice_lowers(head_dim: int) -> None:
    """The forward and backward of every distinct configs.py choice (the rules at seq 512-16k,
    causal or not, 1 or 8 query heads per KV head) lower for the H200 with each feature that
    adds operands or shared memory: what the T = 1000 cases above leave to the rules (head dim
    128's 16k rule with segment ids did not lower until session 41)."""
    features = {
        "plain": lambda t: {},
        "segments": lambda t: dict(
            q_segment_ids=jnp.zeros((1, t), jnp.int32), kv_segment_ids=jnp.zeros((1, t), jnp.int32)
        ),
        "lengths": lambda t: dict(
            query_seq_lengths=jnp.array([t - 3]), key_value_seq_lengths=jnp.array([t - 5])
        ),
        "dropout": lambda t: dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)),
        "block-mask": lambda t: dict(
            block_mask=BlockMask.from_blocks(jnp.ones((t // 128, t // 128), bool), 128)
        ),
    }

    def backward(ops):
        out, lse = mosaic_api.forward(ops, interpret=False)
        return mosaic_api.backward(ops, out, lse, out, None, interpret=False)

    seen = set()
    for t, causal, group, feature in itertools.product(
        (512, 1024, 2048, 4096, 16384), (False, True), (1, 8), features
    ):
        call = (head_dim, t, causal, group)
        chosen = (mosaic_api.forward_config(*call), mosaic_api.backward_config(*call))
        if (chosen, causal, group, feature) in seen:
            continue
        seen.add((chosen, causal, group, feature))
        q = jnp.zeros((1, t, 2 * group, head_dim), jnp.bfloat16)
        kv = jnp.zeros((1, t, 2, head_dim), jnp.bfloat16)
        ops = operands(q, kv, kv, is_causal=causal, **features[feature](t))
        text = lowered_for_h200(backward, ops)
        assert "flashjax_mosaic_dkdv" in text, (call, feature)
