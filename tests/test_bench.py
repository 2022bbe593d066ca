"""The benchmark harness (`python -m flashjax bench`) on CPU: FLOP counting, timing, a tiny sweep
end to end, and backends that fail in every way becoming status rows instead of crashes."""

from __future__ import annotations

import argparse
import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax.__main__ import main as flashjax_main
from flashjax.bench import cli, report, sweep, timing
from flashjax.bench.backends import Backend, JaxBackend, Runner, _flashjax
from flashjax.bench.cases import Case, reference_slice, sweep_cases
from flashjax.bench.flops import attention_flops, normalize_window, visible_fraction, visible_pairs

FAST = timing.TimingPolicy(reps=1, warmup=0, target_batch_s=0.0)


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def test_flops_full_causal_and_modes():
    dense = 4 * 2 * 4 * 128 * 96 * 64
    assert attention_flops(2, 4, 128, 96, 64) == dense
    assert attention_flops(2, 4, 128, 96, 64, causal=True) == dense / 2
    assert attention_flops(2, 4, 128, 96, 64, mode="bwd") == 2.5 * dense
    assert attention_flops(2, 4, 128, 96, 64, causal=True, mode="fwd+bwd") == 3.5 * dense / 2
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 8, 8, 8, mode="backward")


def test_visible_pairs_causal_and_window():
    # Causal counts exactly T(T+1)/2 pairs, but the FLOP convention of the papers is 1/2.
    assert visible_pairs(4, 4, causal=True) == 10
    assert visible_fraction(4, 4, causal=True) == 0.5
    # Window (1, 1) on 4x4: rows see 2, 3, 3, 2 keys.
    assert visible_pairs(4, 4, window=1) == 10
    assert visible_fraction(4, 4, window=(1, 1)) == 10 / 16
    # Causal caps the right side at 0: row i sees min(i, 2) + 1 keys.
    assert visible_pairs(8, 8, causal=True, window=2) == 1 + 2 + 3 * 6
    assert visible_pairs(8, 8, causal=True, window=(2, 5)) == 21
    # Left-only window, T != S.
    assert visible_pairs(3, 5, window=(0, 1)) == 2 + 2 + 2
    # A window wider than the sequence is full (or causal) attention, counted exactly.
    assert visible_pairs(16, 16, window=100) == 256
    assert visible_pairs(16, 16, causal=True, window=100) == 136
    flops = attention_flops(1, 2, 8, 8, 16, causal=True, window=2)
    assert flops == 4 * 2 * 21 * 16
    with pytest.raises(ValueError):
        normalize_window((-1, 0), causal=False)


def test_sweep_cases_hold_tokens_and_hidden_fixed():
    cases = sweep_cases(
        (512, 1024, 32768), (64, 128), (False, True), batch_tokens=16384, hidden=2048
    )
    assert len(cases) == 12
    first, last = cases[0], cases[-1]  # longest sequences first
    assert first.batch == 1  # seq > batch_tokens still runs one sequence
    assert first.label == "B1-T32768-N32-H64-full"
    assert (last.batch, last.seq, last.heads, last.head_dim, last.causal) == (
        32,
        512,
        16,
        128,
        True,
    )
    assert reference_slice(Case(1, 16384, 32, 64, False), 2 * 2**30) == (1, 1)
    assert reference_slice(Case(4, 64, 2, 16, False), 2 * 2**30) == (2, 2)
    assert reference_slice(Case(4, 1024, 16, 64, False), 2**30) == (2, 16)
    assert reference_slice(Case(4, 2048, 16, 64, False), 2**30) == (1, 16)


def test_median_time_batches_calls():
    calls = []

    def measure(run, n):
        calls.append(n)
        return 0.001 * n

    t = timing.median_time(lambda: None, measure, timing.TimingPolicy(reps=3, warmup=2))
    assert t.seconds == pytest.approx(0.001)
    assert t.inner == 25  # 25 ms target batch / 1 ms per call
    assert calls == [1, 1, 1, 25, 25, 25]


def test_cli_parsers():
    assert cli.parse_ints("512,1k, 16k") == (512, 1024, 16384)
    assert cli.parse_modes("bwd,fwd") == ("fwd", "bwd")
    assert cli.parse_modes("all") == ("fwd", "bwd", "fwd+bwd")
    assert cli.parse_backends("jax_xla,flashjax") == ("jax_xla", "flashjax")
    assert cli.parse_backends("all") is None
    assert cli.parse_dtype("bf16") == "bfloat16"
    assert cli.parse_window("128") == (128, 128)
    assert cli.parse_window("256,0") == (256, 0)
    for parse, bad in (
        (cli.parse_ints, "12x"),
        (cli.parse_modes, "back"),
        (cli.parse_backends, "nope"),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_module_dispatch(capsys):
    assert flashjax_main([]) == 2
    assert flashjax_main(["frobnicate"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        flashjax_main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--batch-tokens" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_tiny_sweep_writes_json_csv_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out = tmp_path / "bench"
    code = cli.main(
        [
            "--seqlens=32,64",
            "--causal=yes",
            "--head-dims=16",
            "--batch-tokens=64",
            "--hidden=32",
            "--backends=flashjax,jax_xla",
            "--reps=1",
            f"--out={out}",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "CPU numbers" in printed
    assert "fwd+bwd  D=16  causal" in printed
    assert "/jax_xla" in printed

    data = json.loads((out / "bench.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["platform"] == "cpu" and meta["ceiling"]["tflops"] > 0
    assert len(rows) == 2 * 2 * 3  # seqs x backends x modes
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows]
    for r in rows:
        if r["ms"] > 0:  # a bwd (fwd+bwd minus fwd) of a few us can come out <= 0 on a busy CPU
            assert r["tflops"] == pytest.approx(r["flops"] / r["ms"] / 1e9)
        assert r["temp_bytes"] is not None and r["rel_err"] < 2e-2
        assert r["device"] == "cpu" and r["jax_version"] == jax.__version__
        others = {"flashjax", "jax_xla"} - {r["backend"]}
        assert set(r["ratios"]) <= others
        if r["mode"] == "fwd":
            assert set(r["ratios"]) == others
    by_key = {(r["backend"], r["seq_q"], r["causal"], r["mode"]): r for r in rows}
    for (backend, seq, causal, mode), r in by_key.items():
        if mode == "bwd":
            fb, fwd = by_key[backend, seq, causal, "fwd+bwd"], by_key[backend, seq, causal, "fwd"]
            assert r["ms"] == pytest.approx(fb["ms"] - fwd["ms"])
            assert set(r["rel_errs"]) == {"out", "dq", "dk", "dv"}

    with (out / "bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert {"device", "jaxlib_version", "git_commit", "ms", "tflops", "temp_bytes", "error"} <= set(
        table[0]
    )
    assert "vs_jax_xla" in table[0]
    pytest.importorskip("matplotlib")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Failures become rows
# --------------------------------------------------------------------------------------------------


_good = _flashjax("xla_chunked")  # a real backend: flashjax's blockwise XLA path


def _raises(q, k, v, case):
    raise NotImplementedError("this backend cannot do that")


def _oom(q, k, v, case):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 40.00GiB")


def _wrong(q, k, v, case):
    return v  # right shape, wrong values


def _wrong_shape(q, k, v, case):
    return q[:, :, :1]


def _nan(q, k, v, case):
    return _good(q, k, v, case) * jnp.nan


class _BrokenRunner(Runner):
    """Compiles and checks fine, then dies while being timed."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner

    def prepare(self, kind):
        return self.inner.prepare(kind)

    def outputs(self, kind, batch, heads):
        return self.inner.outputs(kind, batch, heads)

    def time(self, kind, policy):
        raise RuntimeError("device lost")

    def close(self):
        self.inner.close()


class _DiesWhileTimed(Backend):
    name = "dies_while_timed"
    description = "raises in time()"

    def runner(self, case, inputs):
        return _BrokenRunner(JaxBackend("inner", _good).runner(case, inputs))


class _CannotBind(Backend):
    name = "cannot_bind"
    description = "raises in runner()"

    def runner(self, case, inputs):
        raise ValueError("no such layout")


@pytest.mark.parametrize("workers", [1, 2], ids=["serial-compile", "threaded-compile"])
def test_failing_backends_become_status_rows(workers):
    case = Case(batch=2, seq=32, heads=2, head_dim=16, causal=True, dtype="float32")
    backends = [
        JaxBackend("good", _good),
        JaxBackend("raises", _raises),
        JaxBackend("oom", _oom),
        JaxBackend("wrong", _wrong),
        JaxBackend("wrong_shape", _wrong_shape),
        JaxBackend("nan", _nan, compile_lane="serial"),
        JaxBackend("too_big", _good, limit=lambda case: "needs 1 TiB"),
        _DiesWhileTimed(),
        _CannotBind(),
    ]
    lines = []
    rows = sweep.run_sweep([case], backends, policy=FAST, compile_workers=workers, log=lines.append)
    assert len(lines) == len(backends) + 1  # one per backend, then the case's time
    assert lines[-1].startswith("[1/1] B2-T32-N2-H16-causal took")
    status = {(r["backend"], r["mode"]): r["status"] for r in rows}
    error = {(r["backend"], r["mode"]): r["error"] for r in rows}
    for mode in ("fwd", "bwd", "fwd+bwd"):
        assert status["good", mode] == "ok"
        assert status["raises", mode] == "error"
        assert "NotImplementedError" in error["raises", mode]
        assert status["oom", mode] == "oom"
        assert status["wrong", mode] == "check_failed"
        assert "rel L2 err" in error["wrong", mode]
        assert "shape" in error["wrong_shape", mode]
        assert status["nan", mode] == "check_failed"
        assert status["too_big", mode] == "skipped"
        assert error["too_big", mode] == "needs 1 TiB"
        assert status["dies_while_timed", mode] == "error"
        assert "device lost" in error["dies_while_timed", mode]
        assert status["cannot_bind", mode] == "error"
    # The forward's output is checked and fails; the vjp already rejects a cotangent of the
    # right shape.
    assert status["wrong_shape", "fwd"] == "check_failed"
    assert status["wrong_shape", "fwd+bwd"] == "error"
    failed = [r for r in rows if r["backend"] != "good"]
    assert all(r["ms"] is None and r["tflops"] is None for r in failed)
    wrong = next(r for r in rows if r["backend"] == "wrong" and r["mode"] == "fwd")
    assert wrong["rel_err"] > 0.1

    meta = {"device": "cpu", "platform": "cpu", "dtype": "float32", "ceiling": {"tflops": 1.0}}
    final = report.finalize(rows, meta)
    good = next(r for r in final if r["backend"] == "good" and r["mode"] == "fwd")
    assert good["ratios"] == {} and good["frac_of_ceiling"] == pytest.approx(good["tflops"])
    text = report.format_table(final, meta, subject="good")
    assert "WRONG" in text and "OOM" in text and "err" in text


def test_ratios_and_table():
    def row(backend, tflops, status="ok"):
        return {
            "dtype": "bfloat16",
            "batch": 1,
            "seq_q": 4096,
            "seq_k": 4096,
            "heads": 16,
            "head_dim": 128,
            "causal": False,
            "window": None,
            "backend": backend,
            "mode": "fwd",
            "ms": 1.0,
            "tflops": tflops,
            "status": status,
            "error": "",
        }

    rows = [row("flashjax", 300.0), row("jax_cudnn", 600.0), row("tokamax_triton", 400.0)]
    rows.append(row("jax_xla", None, "oom"))
    meta = {"device": "gpu", "platform": "gpu", "dtype": "bfloat16", "ceiling": {"tflops": 750.0}}
    final = report.finalize(rows, meta)
    mine = final[0]
    assert mine["ratios"] == {"jax_cudnn": 0.5, "tokamax_triton": 0.75}
    assert mine["frac_of_ceiling"] == pytest.approx(0.4)
    assert final[3]["ratios"] == {} and final[3]["frac_of_ceiling"] is None
    text = report.format_table(final, meta)
    assert "/jax_cudnn" in text and "/tk_triton" in text
    assert "0.50x" in text and "0.75x" in text
    assert "OOM" in text.splitlines()[-1]


def test_rel_l2_and_error_classes():
    a = np.ones((2, 3), np.float32)
    assert sweep.rel_l2(a, a) == 0.0
    assert math.isnan(sweep.rel_l2(a * np.nan, a))
    assert sweep.describe_error(MemoryError("CUDA out of memory."))[0] == "oom"
    assert sweep.describe_error(ValueError("bad\nmore"))[1] == "ValueError: bad"
    assert sweep.kinds_for(["bwd"]) == ("fwd", "fwd_bwd")
    assert sweep.kinds_for(["fwd+bwd"]) == ("fwd_bwd",)


def test_deadline_stops_before_the_next_shape():
    lines = []
    case = Case(batch=1, seq=16, heads=1, head_dim=16, causal=False, dtype="float32")
    rows = sweep.run_sweep(
        [case, case], [JaxBackend("good", _good)], log=lines.append, deadline=0.0
    )
    assert rows == [] and lines == ["time budget spent: 2 of 2 shapes not run"]
