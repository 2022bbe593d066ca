"""`python -m flashjax bench --decode` on CPU: shapes, step counts, the bars, failures as rows,
the report with every outcome, and a tiny run end to end."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from flashjax.bench import cli, decode, decode_backends, decode_report

TINY = decode.DecodeBench(
    shapes=(decode.Shape(1, 64),),
    heads=2,
    kv_heads=1,
    head_dim=16,
    page_sizes=(16,),
    reps=1,
    steps=2,
    unroll=1,
    bandwidth_bytes=2**20,
    bandwidth_passes=1,
)


def test_shapes_and_their_bytes() -> None:
    assert cli.parse_shapes("1x8k, 64x4k") == (decode.Shape(1, 8192), decode.Shape(64, 4096))
    assert [s.label for s in decode.GPU_SHAPES] == ["1x8k", "1x64k", "8x16k", "32x8k", "64x4k"]
    # The figure: a 1 x 8k cache of 8 KV heads at head dim 128 in bf16 is 33.5 MB.
    assert decode.DecodeBench().cache_bytes(decode.Shape(1, 8192)) == 33_554_432
    with pytest.raises(Exception, match="BxS"):
        cli.parse_shapes("8k")


def test_steps_fill_the_target_time() -> None:
    cfg = decode.DecodeBench(target_s=0.02, unroll=8)
    # 1 x 64k reads 268 MB: about 67 us per step at 4 TB/s, so ~280 steps for 20 ms.
    steps = decode.steps_for(cfg, decode.Shape(1, 65536), 4000.0)
    assert steps % 8 == 0 and 250 <= steps <= 320
    long = decode.DecodeBench(target_s=1.0, unroll=8)
    assert decode.steps_for(long, decode.Shape(1, 16), 4000.0) == 4096  # capped
    assert decode.steps_for(TINY, decode.Shape(1, 64), 1.0) == 2


def test_paged_inputs_hold_the_same_cache() -> None:
    x = decode.make_inputs(decode.Shape(2, 64), TINY)
    k_pool, v_pool, table = x.pools[16]
    assert sorted(np.asarray(table).ravel().tolist()) == list(range(8))
    np.testing.assert_array_equal(k_pool[table].reshape(x.k.shape), x.k)
    np.testing.assert_array_equal(v_pool[table].reshape(x.v.shape), x.v)
    assert x.cache_bytes == TINY.cache_bytes(decode.Shape(2, 64))


def _row(shape, backend, us, *, page=None, status="ok"):
    cfg = decode.DecodeBench()
    row = decode.base_row(decode.Shape(*shape), cfg, backend)
    assert row["page_size"] == page
    seconds = None if us is None else us * 1e-6
    return decode.measured(row, status, "" if us else "boom", seconds=seconds, loop_us=1.0)


def test_bars_on_a_gpu() -> None:
    """>= 90% of the read bandwidth at the large shapes, 1x8k <= 15 us, paged <= 1.1x; anchors
    and CPU runs get no verdict."""
    read = 4000.0  # GB/s; 1 x 64k reads 268 MB: 90% of 4 TB/s is 74.6 us
    rows = [
        _row((1, 65536), "flashjax", 70.0),
        _row((1, 65536), "flashjax_paged16", 80.0, page=16),
        _row((1, 65536), "jax_xla", 100.0),
        _row((8, 16384), "flashjax", 150.0),
        _row((8, 16384), "flashjax_paged64", 160.0, page=64),
        _row((1, 8192), "flashjax", 14.0),
        _row((32, 8192), "flashjax", None, status="error"),
    ]
    final = {(r["shape"], r["backend"]): r for r in decode.finalize(rows, read, on_gpu=True)}
    assert final["1x64k", "flashjax"]["verdict"] == "pass"
    assert final["1x64k", "flashjax"]["frac_read"] == pytest.approx(268.435456 / 70 / 4, 1e-6)
    assert final["1x64k", "flashjax_paged16"]["paged_ratio"] == pytest.approx(80 / 70)
    assert final["1x64k", "flashjax_paged16"]["verdict"] == "fail"
    assert final["1x64k", "jax_xla"]["verdict"] is None
    assert final["1x64k", "jax_xla"]["vs_flashjax"] == pytest.approx(100 / 70)
    assert final["8x16k", "flashjax"]["verdict"] == "fail"  # 537 MB in 150 us: 89%
    assert final["8x16k", "flashjax_paged64"]["verdict"] == "pass"
    assert final["1x8k", "flashjax"]["verdict"] == "pass"
    assert final["32x8k", "flashjax"]["verdict"] is None
    assert all(r["verdict"] is None for r in decode.finalize(rows, read, on_gpu=False))


def test_a_failing_backend_is_a_row() -> None:
    def broken(x):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while trying to allocate")

    backend = decode_backends.DecodeBackend("jax_xla", "broken", broken)
    x = decode.make_inputs(TINY.shapes[0], TINY)
    want = decode_backends.reference_output(x)
    row = decode.measure_backend(backend, TINY.shapes[0], TINY, x, 2, want)
    assert row["status"] == "oom" and row["us"] is None and "RESOURCE_EXHAUSTED" in row["error"]
    wrong = decode_backends.DecodeBackend(
        "jax_xla", "wrong", lambda x: decode_backends.JaxRunner(lambda q, x: q, x)
    )
    row = decode.measure_backend(wrong, TINY.shapes[0], TINY, x, 2, want)
    assert row["status"] == "check_failed" and "rel L2 err" in row["error"]


def test_shapes_past_the_deadline_are_rows_saying_so() -> None:
    backend = decode_backends.DecodeBackend("jax_xla", "unused", lambda x: None)
    rows = decode.run(TINY, [backend], 1.0, deadline=0.0, log=lambda line: None)
    assert [(r["shape"], r["status"]) for r in rows] == [("1x64", "skipped")]
    assert "--max-minutes" in rows[0]["error"]


def test_report_with_every_outcome(tmp_path) -> None:
    rows = [
        _row((1, 65536), "flashjax", 70.0),
        _row((1, 65536), "flashjax_paged16", 74.0, page=16),
        _row((1, 65536), "torch_fa2_kvcache", None, status="error"),
        _row((1, 8192), "jax_cudnn", None, status="skipped"),
    ]
    meta = {"read": {"gbps": 4000.0, "what": "made up"}, "platform": "gpu", "device": "H200"}
    meta |= {"dtype": "bfloat16", "heads": 32, "kv_heads": 8, "head_dim": 128}
    final = decode.finalize(rows, 4000.0, on_gpu=True)
    table = decode_report.format_table(final, meta)
    assert "pass (>= 90% of read)" in table and "pass (<= 1.1x contiguous)" in table
    assert "err" in table and "boom" in table
    paths = decode_report.write(tmp_path, meta, final, with_plot=True)
    assert len(json.loads(paths["json"].read_text())["rows"]) == 4
    with paths["csv"].open() as f:
        assert [r["backend"] for r in csv.DictReader(f)][:2] == ["flashjax", "flashjax_paged16"]


def test_tiny_run_end_to_end(tmp_path, capsys) -> None:
    """The command on CPU: the interpreted kernel (contiguous and paged) and XLA, checked and
    timed; the files and the table."""
    argv = ["--decode", "--shapes", "1x64", "--heads", "2", "--kv-heads", "1"]
    argv += ["--head-dims", "16", "--page-sizes", "16", "--steps", "2", "--reps", "1"]
    argv += ["--backends", "flashjax,flashjax_paged16,jax_xla,jax_cudnn", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "skip jax_cudnn: needs a GPU" in out and "read bandwidth that counts" in out
    assert re.search(r"1x64 +flashjax_nnx +[\d.]+ us/step", out), out  # the Flax study
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert [r["module"] for r in saved["meta"]["flax"]] == ["flax_nnx", "flashjax_nnx"]
    rows = saved["rows"]
    assert [r["backend"] for r in rows] == ["flashjax", "flashjax_paged16", "jax_xla"]
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-2 and r["us"] > 0 for r in rows)
    assert (tmp_path / "decode.csv").exists()
    with pytest.raises(SystemExit):
        cli.main(["--decode", "--heads", "3", "--kv-heads", "2"])
