"""`python -m flashjax bench --ring` on CPU host devices: the model, the bandwidth fit, the
schedule check of the overlap, and a tiny run end to end."""

from __future__ import annotations

import json

import pytest

from flashjax.bench import cli, ring, ring_model

SHAPE = ring_model.Shape(batch=1, heads=16, kv_heads=16, head_dim=128, itemsize=2)
# A pair of s rows takes 1 ns * s^2 forward and twice that backward.
PAIRS = ring_model.PairTimes(
    (1024, 4096), (1e-9 * 1024**2, 1e-9 * 4096**2), (2e-9 * 1024**2, 2e-9 * 4096**2)
)
LINK = ring_model.Link(bandwidth=1e9, latency=0.0, name="test")


def test_pair_times_follow_the_measured_power_law() -> None:
    assert PAIRS.seconds(2048, "fwd") == pytest.approx(1e-9 * 2048**2)
    assert PAIRS.seconds(65536, "bwd") == pytest.approx(2e-9 * 65536**2)  # extrapolated as s^2
    assert PAIRS.seconds(256, "fwd") == pytest.approx(1e-9 * 256**2)


def test_transfer_hides_from_the_crossover_on() -> None:
    """Full attention: a step computes 1e-9 s^2 seconds and sends 2 * s * 16 * 128 * 2 bytes at
    1 GB/s (8.192e-6 s per row): it hides from s = 8192 rows on."""
    assert ring_model.crossover(SHAPE, PAIRS, LINK, "full", "fwd") == 8192
    # Causal zigzag computes half as much per step: the crossover doubles.
    assert ring_model.crossover(SHAPE, PAIRS, LINK, "causal", "fwd") == 16384
    # The backward sends the float32 dK/dV too (3x the bytes) and computes 2x: 1.5x the rows.
    assert ring_model.crossover(SHAPE, PAIRS, LINK, "full", "bwd") == 16384
    hidden = ring_model.ring_seconds(8, 16384, "full", SHAPE, PAIRS, LINK)
    assert hidden["fwd"] == pytest.approx(hidden["ideal_fwd"])
    exposed = ring_model.ring_seconds(8, 256, "full", SHAPE, PAIRS, LINK)
    assert exposed["fwd"] > 2 * exposed["ideal_fwd"]
    single = ring_model.ring_seconds(1, 4096, "full", SHAPE, PAIRS, LINK)
    assert single["fwd+bwd"] == pytest.approx(single["ideal_fwd+bwd"])


def test_model_rows_cross_nodes_and_memory() -> None:
    slow = ring_model.Link(bandwidth=0.1e9, latency=1e-5, name="ib")
    rows = ring_model.model_rows(SHAPE, PAIRS, LINK, slow, devices=(2, 8, 16), seqs=(2048,))
    by = {(r["devices"], r["mask"]): r for r in rows}
    assert by[(8, "full")]["link"] == "test" and by[(16, "full")]["link"] == "ib"
    assert by[(16, "full")]["efficiency_fwd+bwd"] < by[(8, "full")]["efficiency_fwd+bwd"] <= 1
    assert by[(16, "full")]["ring_memory_bytes"] == by[(2, "full")]["ring_memory_bytes"]
    assert (
        by[(16, "full")]["all_gather_memory_bytes"]
        == 8 * by[(2, "full")]["all_gather_memory_bytes"]
    )


def test_fit_link_recovers_latency_and_bandwidth() -> None:
    samples = [(b, 2e-5 + b / 300e9) for b in (1 << 20, 1 << 24, 1 << 28)]
    link = ring_model.fit_link(samples)
    assert link.bandwidth == pytest.approx(300e9) and link.latency == pytest.approx(2e-5)


def test_overlap_reads_the_compiled_schedule() -> None:
    hlo = "\n".join(
        [
            "%body (p: (f32[8])) -> (f32[8]) {",
            "  %cp-start.1 = (f32[8], f32[8]) collective-permute-start(f32[8] %a), pairs={{0,1}}",
            '  %kernel.2 = f32[8] custom-call(f32[8] %b), custom_call_target="triton"',
            "  %cp-done.1 = f32[8] collective-permute-done((f32[8], f32[8]) %cp-start.1)",
            "  %cp-start.2 = (f32[8], f32[8]) collective-permute-start(f32[8] %c), pairs={{0,1}}",
            "  %cp-done.2 = f32[8] collective-permute-done((f32[8], f32[8]) %cp-start.2)",
            "}",
        ]
    )
    assert ring.overlap(hlo) == {
        "async_permutes": 2,
        "overlapping_kernels": 1,
        "kernels_between": 1,
    }


def test_trace_overlap_measures_nccl_time_under_kernels() -> None:
    """Device 1: NCCL 0-10 us, kernels 2-4 and 3-8 us (union 2-8): 6 of 10 us overlapped.
    Device 2: NCCL alone. Host events and other names are ignored."""
    events = [
        {"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 10, "name": "ncclDevKernel_SendRecv"},
        {"ph": "X", "pid": 1, "tid": 8, "ts": 2, "dur": 2, "name": "flashjax_fwd"},
        {"ph": "X", "pid": 1, "tid": 8, "ts": 3, "dur": 5, "name": "flashjax_bwd_dq"},
        {"ph": "X", "pid": 1, "tid": 8, "ts": 0, "dur": 10, "name": "fusion.3"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": 4, "name": "ncclKernel_SendRecv"},
        {"ph": "M", "pid": 1, "name": "process_name"},
    ]
    got = ring.trace_overlap(events)
    assert got["nccl_ms"] == pytest.approx(0.014) and got["overlapped_ms"] == pytest.approx(0.006)
    assert got["overlapped_fraction"] == pytest.approx(6 / 14)
    assert ring.trace_overlap([])["overlapped_fraction"] is None


def test_trace_breakdown_splits_each_gpu_time() -> None:
    """GPU 1's stream: flashjax 0-10 us, a fusion 8-12 (2 us alone), idle 12-15, NCCL 15-20:
    span 20, flashjax 10, nccl 5, other alone 2, idle 3. GPU 2: one flashjax kernel, 0-4. The
    averages over both; the "XLA Ops" line and the host are left out."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:1"}},
        {"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 5, "name": "thread_name", "args": {"name": "Stream #14"}},
        {"ph": "M", "pid": 1, "tid": 6, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "tid": 5, "name": "thread_name", "args": {"name": "Stream #14"}},
        {"ph": "M", "pid": 3, "tid": 5, "name": "thread_name", "args": {"name": "Stream #1"}},
    ]
    events = meta + [
        {"ph": "X", "pid": 1, "tid": 5, "ts": 0, "dur": 10, "name": "flashjax_mosaic_fwd"},
        {"ph": "X", "pid": 1, "tid": 5, "ts": 8, "dur": 4, "name": "loop_fusion"},
        {"ph": "X", "pid": 1, "tid": 5, "ts": 15, "dur": 5, "name": "ncclDevKernel_SendRecv"},
        {"ph": "X", "pid": 1, "tid": 6, "ts": 0, "dur": 40, "name": "custom-call.1"},
        {"ph": "X", "pid": 2, "tid": 5, "ts": 0, "dur": 4, "name": "flashjax_mosaic_fwd"},
        {"ph": "X", "pid": 3, "tid": 5, "ts": 0, "dur": 99, "name": "host"},
    ]
    got = ring.trace_breakdown(events)
    want = {"span": 12, "flashjax": 7, "nccl": 2.5, "other_alone": 1, "idle": 1.5}
    assert got == pytest.approx({f"{k}_ms": v / 1e3 for k, v in want.items()})
    assert ring.trace_breakdown(events[len(meta) :]) == {}  # no GPU named


def test_ring_bench_runs_end_to_end_on_cpu(tmp_path) -> None:
    """A tiny run on 2 host devices: every kind of row, errors near float32 rounding, a model
    prediction beside each measured ring row, the files and plots."""
    argv = ["--ring", "--devices", "2", "--seqs-per-device", "32", "--masks", "causal"]
    argv += ["--bandwidth-mib", "0.0625,0.25", "--model-seqs", "32,256", "--model-devices", "2,16"]
    impls = ring.DEFAULT_IMPLS  # the ring variants' numbers: tests/test_ring.py
    argv += ["--impls", ",".join(impls), "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "ring.json").read_text())
    kinds = {r["kind"] for r in data["rows"]}
    assert kinds == {"bandwidth", "pair", "scaling", "model", "crossover"}
    scaling = [r for r in data["rows"] if r["kind"] == "scaling"]
    assert {(r["impl"], r["mode"]) for r in scaling} == {(i, m) for i in impls for m in ring.MODES}
    assert all(r["status"] == "ok" for r in scaling)
    for r in scaling:
        if r["impl"] != "single":
            assert r["model_ms"] > 0 and r["vs_single"] > 0 and r["total_bytes"] > 0
            if r["mode"] == "fwd":
                assert r["rel_err"] < 1e-5
    assert data["meta"]["config"]["devices"] == 2 and data["meta"]["model_inputs"]["pairs"]
    for name in ("ring.csv", "ring.png", "ring-memory.png", "ring-model.png"):
        assert (tmp_path / name).exists(), name
