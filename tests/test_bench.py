"""The benchmark harness (`python -m flashjax bench`) on CPU: FLOP counting, timing, a tiny sweep
end to end, backends that fail in every way becoming status rows instead of crashes, and the
`--io` (analytic IO model, Nsight Compute CSV) and `--memory` modes."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax.__main__ import main as flashjax_main
from flashjax.bench import cli, hbm, hbm_model, hbm_profile, ncu, report, sweep, timing
from flashjax.bench.backends import Backend, JaxBackend, Runner, dpa_call
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


def test_visible_pairs_are_exact_past_float32():
    # The rule's own count is float32; the bench's stays exact where float32 stops counting.
    n = 65536
    assert visible_pairs(n, n, causal=True) == n * (n + 1) // 2
    assert n * (n + 1) // 2 > 2**24 and visible_pairs(n + 1, n + 1, causal=True) % 2 == 1


def test_visible_pairs_of_block_masks_match_the_dense_mask():
    from flashjax import block_masks
    from flashjax.block_mask import BlockMask

    bm = block_masks.butterfly(1000, block_size=128)
    dense = np.asarray(bm.to_dense(1000, 1000))[0, 0]
    assert visible_pairs(1000, 1000, block_mask=bm) == dense.sum()
    assert visible_pairs(1000, 1000, causal=True, block_mask=bm) == np.tril(dense).sum()
    i, j = np.arange(1000)[:, None], np.arange(1000)[None, :]
    in_window = (j >= i - 200) & (j <= i + 50)
    assert visible_pairs(1000, 1000, window=(200, 50), block_mask=bm) == (dense & in_window).sum()

    # A mask function that depends on the head: counted over the mask's heads.
    def fn(b, h, q, k):
        return ((q + k) % 3 == 0) | (h == 1)

    by_fn = BlockMask.from_mask_fn(fn, 200, 300, block_size=(32, 48), heads=2)
    elements = np.asarray(by_fn.to_dense())
    assert visible_pairs(200, 300, block_mask=by_fn) == elements.sum()
    assert visible_pairs(200, 300, causal=True, block_mask=by_fn) == np.tril(elements).sum()
    assert visible_fraction(200, 300, block_mask=by_fn) == elements.sum() / (2 * 200 * 300)
    flops = attention_flops(1, 2, 1000, 1000, 64, block_mask=bm, mode="fwd+bwd")
    assert flops == pytest.approx(4 * 2 * dense.sum() * 64 * 3.5)


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
    printed = capsys.readouterr().out
    assert "--batch-tokens" in printed
    assert "--io" in printed and "--memory" in printed and "Theorem 2" in printed


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
    # The start's ceiling is announced as provisional; the summary names the one that counts.
    ceiling = meta["ceiling"]
    start_line = next(line for line in printed.splitlines() if line.startswith("ceiling: "))
    assert "provisional" in start_line
    assert f"{ceiling['start_tflops']:.4g} TFLOP/s" in start_line
    assert ceiling["tflops"] == max(ceiling["start_tflops"], ceiling["end_tflops"])
    assert not ceiling["provisional"]
    said = f"{ceiling['tflops']:.4g} TFLOP/s"
    summary = f"measured at the {ceiling['measured']} of the run"
    assert f"ceiling that counts: {said}" in printed
    table_head = next(line for line in printed.splitlines() if line.startswith("TFLOP/s on"))
    assert said in table_head and summary in table_head and "higher" in table_head
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


def test_ceiling_that_counts_is_the_higher_and_says_so():
    from flashjax.bench import machine

    start = {"tflops": 400.0, "ms": 2.0, "what": "bf16 8192x8192x8192 jnp.dot, best timed batch"}
    end = dict(start, tflops=700.0)
    early = machine.provisional_ceiling(start)
    assert "provisional" in machine.describe_ceiling(early)
    for first, last, measured in (
        (early, end, "end"),
        (machine.provisional_ceiling(end), start, "start"),
    ):
        final = machine.final_ceiling(first, last)
        assert final["tflops"] == 700.0 and final["measured"] == measured
        text = machine.describe_ceiling(final)
        assert text.startswith("700 TFLOP/s") and f"measured at the {measured}" in text
        assert "start 400" in text or "start 700" in text
        assert "provisional" not in text


def test_cpu_default_includes_the_chunked_path(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--seqlens=32", "--causal=no", "--head-dims=16", "--batch-tokens=32", "--hidden=16"]
    argv += ["--modes=fwd", "--reps=1", "--no-plot", f"--out={out}"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"flashjax", "flashjax_chunked", "jax_xla"}
    assert set(cli.CPU_BACKENDS) == {"flashjax", "flashjax_chunked", "jax_xla"}
    # On a CPU the table's ratios are those of the path CPU users get.
    assert "flashjax_chunked's speed over X's" in printed
    assert "/jax_xla" in printed and "/flashjax" in printed


def test_default_out_dir_is_outside_the_repository():
    import tempfile

    from flashjax.bench import machine

    meta = {"device": "NVIDIA H200"}
    folder = cli.default_out_dir(meta, "-sparsity")
    assert folder.is_relative_to(tempfile.gettempdir())
    assert not folder.resolve().is_relative_to(machine.REPO_ROOT)
    assert folder.name.endswith("-nvidia-h200-sparsity") and folder.parent.name == "flashjax-bench"
    args = cli.build_parser().parse_args([])
    assert cli._out_dir(args, meta) == cli.default_out_dir(meta)


# --------------------------------------------------------------------------------------------------
# Failures become rows
# --------------------------------------------------------------------------------------------------


_good = dpa_call("flashjax", "xla_chunked")  # a real backend: flashjax's blockwise XLA path


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

    def run(self, kind):
        return self.inner.run(kind)

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


@pytest.mark.parametrize(
    ("workers", "rounds"), [(1, 1), (2, 2)], ids=["serial-compile", "threaded-compile-2-rounds"]
)
def test_failing_backends_become_status_rows(workers, rounds):
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
    policy = dataclasses.replace(FAST, rounds=rounds)
    rows = sweep.run_sweep(
        [case], backends, policy=policy, compile_workers=workers, log=lines.append
    )
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


# --------------------------------------------------------------------------------------------------
# --io: the analytic IO model, ncu's CSV, the run end to end
# --------------------------------------------------------------------------------------------------


def test_standard_attention_bytes_by_hand():
    # T = S = 4, H = 2, bf16 (2 bytes): reads Q, K, V 16 bytes each, float32 scores 64,
    # bf16 probabilities 32; writes scores 64, probabilities 32, output 16.
    t = hbm_model.standard_forward_bytes(1, 1, 4, 4, 2, 2)
    assert (t.read, t.write, t.total) == (16 + 16 + 64 + 32 + 16, 64 + 32 + 16, 256)
    # The closed form of the docstring: 2e(T + S)H + (8 + 2e)TS per (batch, head).
    assert hbm_model.standard_forward_bytes(2, 3, 64, 96, 32, 2).total == 6 * (
        2 * 2 * (64 + 96) * 32 + 12 * 64 * 96
    )
    # Quadratic in the sequence length once N >> d.
    small, large = (
        hbm_model.standard_forward_bytes(1, 16, n, n, 64, 2).total for n in (8192, 16384)
    )
    assert 3.9 < large / small <= 4.0


def test_flash_forward_bytes_by_hand():
    # T = S = 64, H = 16, bf16, 32x16 tiles: 2 query blocks, each visits all 4 key blocks.
    # Q 64*16*2 = 2048, K and V 8 visits * 16*16*2 = 4096 each, O 2048, logsumexp 64*4 = 256.
    t = hbm_model.flash_forward_bytes(1, 1, 64, 64, 16, 2, 32, 16)
    assert t.reads == {"q": 2048, "k": 4096, "v": 4096}
    assert t.writes == {"out": 2048, "lse": 256}
    assert t.total == 12544
    # Causal: the first query block sees key blocks 0-1, the second 0-3: 6 visits.
    assert list(hbm_model.visited_key_blocks(64, 64, 32, 16, causal=True)) == [2, 4]
    assert hbm_model.flash_forward_bytes(1, 1, 64, 64, 16, 2, 32, 16, causal=True).total == 10496
    # Padding as the kernel pads: T = 50 -> 64 rows, H = 24 -> 32 columns.
    padded = hbm_model.flash_forward_bytes(1, 1, 50, 50, 24, 2, 32, 16)
    assert padded.reads["q"] == 64 * 32 * 2 and padded.writes["lse"] == 64 * 4
    assert hbm_model.tile_bytes(32, 16, 24, 2) == (32 + 2 * 16) * 32 * 2


def test_flash_bytes_fall_as_block_q_grows():
    def kv(block_q, block_k=64, seq=4096):
        t = hbm_model.flash_forward_bytes(1, 16, seq, seq, 64, 2, block_q, block_k)
        return t.reads["k"] + t.reads["v"]

    blocks = (16, 32, 64, 128, 256)
    totals = [hbm_model.flash_forward_bytes(1, 16, 4096, 4096, 64, 2, b, 64).total for b in blocks]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    # Theorem 2: K, V traffic * block_q is constant (Theta(N^2 d^2 / M) with block_q ~ M / d) ...
    assert len({kv(b) * b for b in blocks}) == 1
    # ... and block_k only changes how finely K, V are streamed, not how often.
    assert kv(64, 16) == kv(64, 128)
    # Far below standard attention's bytes at long sequences.
    standard = hbm_model.standard_forward_bytes(1, 16, 4096, 4096, 64, 2).total
    assert totals[blocks.index(128)] < standard / 5


def test_io_tiles_and_entries():
    config = hbm.kernel_config(128, "both", 64, target="sm90")
    assert (config.block_q, config.block_k, config.num_warps) == (128, 128, 8)
    config = hbm.kernel_config(32, "q", 64, target="sm90")
    assert (config.block_q, config.block_k, config.num_warps) == (32, 64, 4)
    config = hbm.kernel_config(256, "k", 128, target="sm90")
    assert (config.block_q, config.block_k) == (128, 256)
    with pytest.raises(ValueError, match="vary"):
        hbm.kernel_config(64, "diagonal", 64)
    # Tiles larger than the sequence shrink to it (api.plan); duplicates are measured once.
    cfg = hbm.IOConfig(seqlens=(32, 64), blocks=(16, 32, 64), heads=1, head_dim=16)
    entries = hbm.plan_entries(cfg)
    assert [(e.impl, e.seq, e.block_q) for e in entries] == [
        ("standard", 32, None),
        ("flashjax", 32, 16),
        ("flashjax", 32, 32),
        ("standard", 64, None),
        ("flashjax", 64, 16),
        ("flashjax", 64, 32),
        ("flashjax", 64, 64),
    ]
    assert [e.id for e in entries] == list(range(len(entries)))


# Nsight Compute's CSV ("details" page), in the layout `ncu --csv --print-units base` prints: its
# own ==PROF== lines and the profiled program's output come first, values may carry thousands
# separators. Two bracketed calls: one flashjax kernel, then an XLA program of two kernels.
NCU_COLUMNS = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
    '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
)


def _ncu_line(kid, kernel, metric, value, unit="byte"):
    return (
        f'"{kid}","4242","python3.12","127.0.0.1","{kernel}","1","13","(128, 1, 1)",'
        f'"(16, 1, 16)","0","9.0","Command line profiler metrics","{metric}","{unit}","{value}"'
    )


def _ncu_sample(kernels):
    lines = ["==PROF== Connected to process 4242 (/usr/bin/python3.12)", "some program output"]
    lines.append(NCU_COLUMNS)
    for kid, (kernel, read, write, l2) in enumerate(kernels):
        lines.append(_ncu_line(kid, kernel, ncu.DRAM_READ, read))
        lines.append(_ncu_line(kid, kernel, ncu.DRAM_WRITE, write))
        if l2 is not None:
            lines.append(_ncu_line(kid, kernel, ncu.L2_BYTES, l2))
    lines.append("==PROF== Disconnected from process 4242")
    return "\n".join(lines) + "\n"


NCU_SAMPLE = _ncu_sample(
    [
        ("fjio_begin", "512", "64", "1,024"),
        ("flashjax_fwd", "12,582,912", "4,194,304", "50,331,648"),
        ("fjio_end", "512", "64", "1,024"),
        ("fjio_begin", "512", "64", "1,024"),
        ("sm90_xmma_gemm_bf16f32_bf16f32_f32_tn_n", "8,388,608", "67,108,864", None),
        ("loop_convert_fusion", "67,108,864", "33,554,432", None),
        ("fjio_end", "512", "64", "1,024"),
    ]
)


def test_parse_ncu_csv_long_format():
    kernels = ncu.parse_csv(NCU_SAMPLE)
    assert [k.id for k in kernels] == list(range(7))
    assert kernels[1].name == "flashjax_fwd"
    assert kernels[1].metrics == {
        ncu.DRAM_READ: 12582912.0,
        ncu.DRAM_WRITE: 4194304.0,
        ncu.L2_BYTES: 50331648.0,
    }
    assert kernels[1].dram_bytes == 16777216.0
    calls = ncu.split_calls(kernels)
    assert [[k.name for k in c] for c in calls] == [
        ["flashjax_fwd"],
        ["sm90_xmma_gemm_bf16f32_bf16f32_f32_tn_n", "loop_convert_fusion"],
    ]
    assert ncu.total(calls[1], ncu.DRAM_READ) == 8388608 + 67108864
    assert ncu.total(calls[1], ncu.L2_BYTES) is None  # not measured for every kernel
    assert ncu.parse_csv("==PROF== nothing profiled\n") == []


def test_parse_ncu_csv_units_and_raw_page():
    scaled = NCU_COLUMNS + "\n" + _ncu_line(0, "k", ncu.DRAM_READ, "1.5", "Mbyte")
    assert ncu.parse_csv(scaled)[0].metrics == {ncu.DRAM_READ: 1.5e6}
    raw = "\n".join(
        [
            '"ID","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum"',
            '"","","Kbyte","byte"',
            '"0","flashjax_fwd","2","1,000"',
        ]
    )
    (kernel,) = ncu.parse_csv(raw)
    assert kernel.metrics == {ncu.DRAM_READ: 2000.0, ncu.DRAM_WRITE: 1000.0}


def test_ncu_command_and_failures():
    cmd = ncu.command("/opt/ncu", ["python", "-m", "x"], kernel_regex="flashjax_fwd|fjio_")
    text = " ".join(cmd)
    assert cmd[0] == "/opt/ncu" and cmd[-3:] == ["python", "-m", "x"]
    assert "--metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum" in text
    assert "--clock-control none" in text and "--csv" in text
    assert "--profile-from-start off" in text
    assert "--kernel-name regex:flashjax_fwd|fjio_" in text
    assert ncu.find_ncu("/nonexistent/ncu") is None
    assert ncu.unknown_metric("==ERROR== Failed to find metric lts__t_bytes.sum")
    reason = ncu.failure_reason(
        "==PROF== Connected\n==ERROR== ERR_NVGPUCTRPERM - no permission\nmore\n", 1
    )
    assert reason == "ncu exited 1: ==ERROR== ERR_NVGPUCTRPERM - no permission"
    app_failed = (  # the profiled program's own error follows ncu's line
        "==PROF== Connected\nTraceback (most recent call last):\n  File x\n"
        "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory\n"
        "==ERROR== The application returned an error code (1).\n"
    )
    assert ncu.failure_reason(app_failed, 1) == (
        "ncu exited 1: ==ERROR== The application returned an error code (1). | "
        "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory"
    )


def test_io_profile_attributes_ncu_bytes(tmp_path, monkeypatch):
    """`profile` with ncu replaced by a stand-in that replays a captured-format CSV: the bytes
    land on the right rows, and an unknown L2 metric makes it retry with DRAM metrics only."""
    cfg = hbm.IOConfig(
        seqlens=(32,), blocks=(32,), heads=1, head_dim=16, ncu="ncu", ncu_status="not profiled"
    )
    calls = []

    def fake_run(cmd, timeout_s, env=None):
        calls.append(cmd)
        metrics = cmd[cmd.index("--metrics") + 1]
        if ncu.L2_BYTES in metrics:
            return 1, "", "==ERROR== Failed to find metric lts__t_bytes.sum\n"
        spec = json.loads(open(cmd[-2]).read())
        ids = [e["id"] for e in spec["entries"]]
        with open(cmd[-1], "w") as f:
            json.dump({"profiled": ids, "errors": {}}, f)
        if "--kernel-name" in cmd:
            kernels = [("fjio_begin", 1, 1, None), ("flashjax_fwd", 3000, 1000, None)]
        else:
            kernels = [
                ("fjio_begin", 1, 1, None),
                ("gemm", 100, 200, None),
                ("fusion", 30, 40, None),
            ]
        return 0, _ncu_sample(kernels + [("fjio_end", 1, 1, None)]), ""

    monkeypatch.setattr(ncu, "run", fake_run)
    rows = hbm.run(cfg, FAST, tmp_path, log=lambda line: None, measure=False)
    standard, flash = rows
    assert (standard["ncu_status"], standard["ncu_bytes"], standard["ncu_kernels"]) == (
        "ok",
        370,
        2,
    )
    assert (flash["ncu_status"], flash["ncu_read_bytes"], flash["ncu_write_bytes"]) == (
        "ok",
        3000,
        1000,
    )
    assert flash["ncu_l2_bytes"] is None
    assert len(calls) == 4  # per implementation: with the L2 metric, then without
    assert (tmp_path / "io-ncu-flashjax.csv").read_text().count("flashjax_fwd") == 2

    # A worker that profiled nothing, and a count of bracketed calls that does not match.
    rows = [hbm.model_row(cfg, e) for e in hbm.plan_entries(cfg)]
    entries = hbm.plan_entries(cfg)
    status = hbm_profile.attribute(entries[:1], rows, NCU_SAMPLE, {"profiled": []}, False)
    assert status == "no call profiled"
    status = hbm_profile.attribute(entries[:1], rows, NCU_SAMPLE, {"profiled": [0]}, False)
    assert status == "2 bracketed calls in ncu's output for 1 profiled"


def test_io_worker_runs_each_call_between_markers(tmp_path, monkeypatch):
    """The process ncu profiles: each entry runs once inside a profiler range, bracketed by the
    markers; a failing entry is recorded and the others go on. (No CUDA driver here: the range
    is a stand-in that records what ran inside it.)"""
    import contextlib

    ranges = []

    @contextlib.contextmanager
    def fake_range():
        ranges.append("start")
        yield
        ranges.append("stop")

    monkeypatch.setattr(ncu, "profiler_range", fake_range)
    cfg = hbm.IOConfig(seqlens=(32,), blocks=(16,), heads=1, head_dim=16)
    entries = hbm.plan_entries(cfg)
    broken = dataclasses.replace(entries[1], id=2, seq=-1)  # no such shape: raises
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(hbm_profile.worker_spec(cfg, [*entries, broken]))
    assert hbm_profile.main([str(spec), str(result)]) == 0
    done = json.loads(result.read_text())
    assert done["profiled"] == [0, 1] and list(done["errors"]) == ["2"]
    assert ranges == ["start", "stop"] * 2


def test_io_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "io"
    code = cli.main(
        ["--io", "--seqlens=32", "--blocks=16,32", "--heads=1", "--head-dims=16", "--reps=1"]
        + [f"--out={out}"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "model_KB" in printed and "16x16" in printed and "CPU numbers" in printed
    data = json.loads((out / "io.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["mode"] == "io" and meta["heads"] == 1 and meta["platform"] == "cpu"
    assert [(r["impl"], r["block_q"], r["block_k"]) for r in rows] == [
        ("standard", None, None),
        ("flashjax", 16, 16),
        ("flashjax", 32, 32),
    ]
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["ncu_status"] == "cpu"
        assert r["ncu_bytes"] is None and r["device"] == "cpu"
    assert rows[0]["model_bytes"] == hbm_model.standard_forward_bytes(1, 1, 32, 32, 16, 2).total
    assert rows[1]["model_bytes"] > rows[2]["model_bytes"]
    assert all(r["rel_err"] < 2e-2 for r in rows[1:])
    with (out / "io.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {"model_bytes", "ncu_status", "ms", "git_commit"} <= set(table[0])
    pytest.importorskip("matplotlib")
    assert (out / "io.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# --memory
# --------------------------------------------------------------------------------------------------


def test_memory_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "memory"
    # A 10 MiB "device": at T=1k standard attention (scores, probabilities and their gradients,
    # about 16 MiB) does not fit; flashjax's chunked path (512 keys a step on CPU) does.
    argv = ["--memory", "--seqlens=32,1k", "--heads=1", "--head-dims=16"]
    code = cli.main(argv + ["--memory-limit-gib=0.01", f"--out={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "(no fit)" in printed and "flashjax run" in printed
    data = json.loads((out / "memory.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["mode"] == "memory" and meta["limit_bytes"] == int(0.01 * 2**30)
    by = {(r["backend"], r["seq_q"]): r for r in rows}
    assert set(by) == {(b, s) for b in ("flashjax", "jax_xla", "jax_cudnn") for s in (32, 1024)}
    assert by["jax_cudnn", 32]["status"] == "unavailable"
    flash, xla = by["flashjax", 32], by["jax_xla", 32]
    assert flash["implementation"] == "xla_chunked" and flash["mode"] == "fwd+bwd"
    assert flash["run_status"] == "ok" and flash["run_ms"] > 0 and flash["fits"] == "yes"
    assert xla["run_status"] == "not run" and xla["temp_bytes"] > 0
    assert xla["total_bytes"] == (
        xla["argument_bytes"] + xla["output_bytes"] + xla["temp_bytes"] - xla["alias_bytes"]
    )
    assert by["jax_xla", 1024]["fits"] == "no" and by["flashjax", 1024]["fits"] == "yes"
    assert by["jax_xla", 1024]["temp_bytes"] >= 1024 * 1024 * 4  # the float32 scores
    assert by["flashjax", 1024]["run_status"] == "ok"
    with (out / "memory.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and {"temp_bytes", "fits", "run_status", "device"} <= set(table[0])
    pytest.importorskip("matplotlib")
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_compile_only(tmp_path):
    out = tmp_path / "memory"
    argv = ["--memory", "--seqlens=64", "--heads=1", "--head-dims=16", "--no-run", "--no-plot"]
    assert cli.main(argv + ["--backends=flashjax", f"--out={out}"]) == 0
    (row,) = json.loads((out / "memory.json").read_text())["rows"]
    assert row["backend"] == "flashjax" and row["run_status"] == "not run"
    assert row["temp_bytes"] > 0 and not (out / "memory.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--io", "--head-dims=32,64"],
        ["--io", "--causal=both"],
        ["--memory", "--backends=torch_flash"],
        ["--io", "--memory"],
    ],
    ids=["two-head-dims", "causal-both", "memory-backend", "both-modes"],
)
def test_io_and_memory_reject_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2


def test_interleaved_rotates_and_keeps_the_fastest_round():
    """Each program timed once per round, the order rotated each round; the fastest round's
    Timing kept with every round's median as samples; a program that raises runs no more."""
    order = []
    seconds = {"a": [3.0, 1.0, 2.0], "b": [1.5, 2.5, 0.5]}

    def job(name):
        def run():
            order.append(name)
            if name == "bad":
                raise RuntimeError("boom")
            return timing.Timing(seconds[name][sum(o == name for o in order) - 1], (), 1)

        return run

    got = timing.interleaved({k: job(k) for k in ("a", "b", "bad")}, rounds=3)
    assert order == ["a", "b", "bad", "b", "a", "a", "b"]
    assert got["a"].seconds == 1.0 and got["a"].samples == (3.0, 1.0, 2.0)
    assert got["b"].seconds == 0.5 and got["b"].samples == (1.5, 2.5, 0.5)
    assert isinstance(got["bad"], RuntimeError)
