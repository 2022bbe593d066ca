"""`python -m flashjax bench --sparsity` on CPU: the block patterns, the ratio against the bar,
failures as rows, the longest-sequence search, and a tiny run end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from flashjax.bench import cli, sparsity, sparsity_backends, sparsity_report, timing
from flashjax.bench.cases import Case
from flashjax.bench.flops import visible_pairs

FAST = timing.TimingPolicy(reps=1, warmup=0, target_batch_s=0.0)
TINY = sparsity.SparsityConfig(
    seqlens=(64,),
    head_dims=(16,),
    causal=(False,),
    densities=(0.25,),
    block=16,
    modes=("fwd",),
    hidden=32,
    dtype="float32",
    longest_from=None,
)


def test_random_blocks_keep_the_diagonal_and_the_density():
    blocks = sparsity.random_blocks(32, 0.25, seed=3)
    assert blocks.dtype == bool and blocks.shape == (32, 32)
    assert np.diag(blocks).all() and blocks.sum() == round(0.25 * 32 * 32)
    assert (sparsity.random_blocks(32, 0.25, seed=3) == blocks).all()
    assert not (sparsity.random_blocks(32, 0.25, seed=4) == blocks).all()
    # Below the diagonal's own density, the diagonal alone.
    assert (sparsity.random_blocks(8, 0.05, seed=0) == np.eye(8, dtype=bool)).all()


def test_patterns_and_their_pair_counts():
    cfg = TINY
    found = sparsity.patterns(128, cfg)
    assert [p.label for p in found] == ["dense", "butterfly", "random-25%"]
    assert found[0].mask is None and found[0].block_density == 1.0
    for causal in (False, True):
        case = Case(1, 128, 2, 16, causal)
        counts = sparsity.pair_counts(case, found)
        assert counts["dense"] == (128 * 129 // 2 if causal else 128 * 128)
        for p in found[1:]:
            dense = np.repeat(np.repeat(p.blocks, 16, 0), 16, 1)
            want = np.tril(dense).sum() if causal else dense.sum()
            assert counts[p.label] == want == visible_pairs(128, 128, causal, None, p.mask)


def _row(label, pattern, pairs, ms, *, backend="flashjax", mode="fwd", seq=4096, study="grid"):
    case = Case(1, seq, 16, 128, False)
    p = sparsity.Pattern(pattern, 128, target=None if pattern != "random" else 0.1)
    base = sparsity.base_row(case, p, pairs, study) | {"label": label}
    return sparsity.measured(base, backend, mode, "ok", seconds=None if ms is None else ms / 1e3)


def test_ratio_against_the_bar():
    n = 4096 * 4096
    rows = [
        _row("dense", "dense", n, 10.0),
        _row("random-10%", "random", n // 10, 1.3),  # 0.13 <= 1.15 * 0.1 + 0.03 = 0.145
        _row("random-25%", "random", n // 4, 3.5),  # 0.35 > 0.3175
        _row("dense", "dense", n, 20.0, backend="jax_xla"),
        _row("random-10%", "random", n // 10, 19.0, backend="jax_xla"),
        _row("random-10%", "random", n // 10, 2.0, mode="fwd+bwd"),  # no dense row: no ratio
    ]
    final = sparsity.finalize(rows)
    dense, good, bad, xla_dense, xla, orphan = final
    assert dense["verdict"] == "ref" and dense["ratio"] == 1.0 and dense["rel"] == 1.0
    assert good["ratio"] == pytest.approx(0.13) and good["bar"] == pytest.approx(0.145)
    assert good["verdict"] == "pass" and bad["verdict"] == "fail"
    assert xla["ratio"] == pytest.approx(0.95) and xla["verdict"] == "fail"
    assert orphan["ratio"] is None and orphan["verdict"] is None
    # TFLOP/s on visible pairs only: 4 * B * N * pairs * H per forward.
    assert good["tflops"] == pytest.approx(4 * 16 * (n // 10) * 128 / 1.3e-3 / 1e12)
    text = sparsity_report.format_table(final, {"device": "gpu", "block": 128})
    assert "0.13 ok" in text and "0.35 FAIL" in text and "0.95 FAIL" in text


class _Failing(sparsity_backends.SparseRunner):
    """Binds, then raises `error` in whatever runs."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def prepare(self, kind, pattern):
        raise self.error

    def program(self, kind, pattern):
        raise self.error

    def output(self, pattern):
        raise self.error

    def close(self):
        pass


def _failing(name: str, error: Exception, **kw) -> sparsity_backends.SparseBackend:
    return sparsity_backends.SparseBackend(
        name, "fails", lambda case, inputs: _Failing(error), **kw
    )


def test_failures_become_rows():
    chosen = [
        sparsity_backends.all_backends()[1],  # flashjax_chunked: works
        _failing("oom", RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB")),
        _failing("raises", NotImplementedError("no block masks here")),
        _failing("too_big", RuntimeError("never"), limit=lambda case: "needs 1 TiB"),
    ]
    rows = sparsity.finalize(sparsity.run(TINY, chosen, FAST, log=lambda line: None))
    by = {(r["backend"], r["label"]): r for r in rows}
    assert len(rows) == 4 * 3  # backends x patterns (one mode)
    for label in ("dense", "butterfly", "random-25%"):
        assert by["flashjax_chunked", label]["status"] == "ok"
        assert by["flashjax_chunked", label]["rel_err"] < 1e-5
        assert by["oom", label]["status"] == "oom"
        assert by["raises", label]["status"] == "error"
        assert "NotImplementedError" in by["raises", label]["error"]
        assert by["too_big", label]["status"] == "skipped"
        assert by["too_big", label]["error"] == "needs 1 TiB"
        assert by["oom", label]["ms"] is None and by["oom", label]["verdict"] is None
    assert by["flashjax_chunked", "butterfly"]["verdict"] in ("pass", "fail")


def test_programs_compiled_ahead_in_threads():
    """The kernels' dense and masked programs compile side by side; each serves its patterns."""
    flash = sparsity_backends.all_backends()[0]
    assert flash.name == "flashjax" and flash.compile_lane == "parallel"
    rows = sparsity.run(TINY, [flash], FAST, workers=4, log=lambda line: None)
    assert [r["label"] for r in rows] == ["dense", "butterfly", "random-25%"]
    for r in rows:
        assert r["status"] == "ok" and r["rel_err"] < 1e-5, r


def test_flex_limit_and_registry():
    limit = sparsity_backends.flex_limit((128,))
    assert limit(Case(1, 4096, 16, 128, False)) is None
    assert "--flex-head-dims" in limit(Case(1, 4096, 32, 64, False))
    assert sparsity_backends.flex_limit(None)(Case(1, 4096, 32, 64, False)) is None
    names = [b.name for b in sparsity_backends.all_backends()]
    assert names == ["flashjax", "flashjax_chunked", "jax_xla", "torch_flex"]
    assert "needs a GPU" in sparsity_backends.all_backends()[3].unavailable()  # this is a CPU


def test_time_budget_skips_shapes_with_rows():
    cfg = sparsity.SparsityConfig(**{**TINY.__dict__, "seqlens": (32, 64)})
    chosen = [sparsity_backends.all_backends()[1]]
    rows = sparsity.run(cfg, chosen, FAST, deadline=0.0, log=lambda line: None)
    assert {r["status"] for r in rows} == {"skipped"} and {r["seq_q"] for r in rows} == {32, 64}
    assert all("time budget" in r["error"] for r in rows)


def test_longest_doubles_until_out_of_memory(monkeypatch):
    cfg = sparsity.SparsityConfig(**{**TINY.__dict__, "longest_from": 32, "longest_max": 1024})
    good = sparsity_backends.all_backends()[1]

    def bind(case, inputs):
        if case.seq >= 128:
            return _Failing(RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
        return good.bind(case, inputs)

    backend = sparsity_backends.SparseBackend("flashjax", "test", bind)
    lines = []
    rows = sparsity.longest(backend, cfg, FAST, deadline=float("inf"), log=lines.append)
    assert [(r["seq_q"], r["status"]) for r in rows] == [(32, "ok"), (64, "ok"), (128, "oom")]
    assert sparsity.longest_fit(rows) == 64
    assert rows[0]["pattern"] == "butterfly" and rows[0]["mode"] == "fwd+bwd"
    assert rows[1]["pairs"] == visible_pairs(64, 64, block_mask=sparsity.butterfly(64, 16).mask)
    assert "longest that fits: 64" in "\n".join(sparsity_report.longest_lines(rows))
    assert sparsity.longest(backend, cfg, FAST, deadline=0.0, log=lines.append) == []


def test_xla_limit_counts_scores_and_mask():
    case = Case(1, 4096, 16, 128, False)
    need = 16 * 4096 * 4096 * 4 + 4096 * 4096  # float32 scores, then the bool mask
    assert sparsity_backends.xla_limit(need)(case) is None
    assert "GiB" in sparsity_backends.xla_limit(need - 1)(case)


def test_sparsity_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "sparsity"
    argv = ["--sparsity", "--seqlens=64", "--head-dims=16", "--hidden=32", "--mask-block=16"]
    argv += ["--densities=25", "--causal=both", "--reps=1", "--longest-from=32"]
    argv += ["--longest-minutes=0.02", f"--out={out}"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skip tokamax: " in printed and "CPU numbers" in printed
    assert "fwd+bwd  D=16 N=2  causal" in printed and "longest that fits" in printed
    data = json.loads((out / "sparsity.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["mode"] == "sparsity" and meta["backends"] == list(sparsity_backends.CPU_DEFAULT)
    assert "tokamax" in meta["unavailable"] and meta["longest_fit"] is not None
    grid = [r for r in rows if r["study"] == "grid"]
    assert len(grid) == 2 * 3 * 3 * 2  # causal x patterns x backends x modes
    assert {r["status"] for r in grid} == {"ok"}, [r["error"] for r in grid]
    for r in grid:
        assert r["density"] == r["pairs"] / (64 * 64) and r["rel_err"] < 2e-2
        assert r["tflops"] == pytest.approx(r["flops"] / r["ms"] / 1e9)
        if r["pattern"] == "dense":
            assert r["verdict"] == "ref"
        else:
            assert r["ratio"] is not None and r["verdict"] in ("pass", "fail")
            assert r["bar"] == pytest.approx(1.15 * r["rel"] + 0.03)
    with (out / "sparsity.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"density", "ratio", "bar", "verdict"} <= set(table[0])
    pytest.importorskip("matplotlib")
    assert (out / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparsity_rejects_bad_arguments(capsys):
    for argv in (["--sparsity", "--backends=jax_cudnn"], ["--sparsity", "--modes=bwd"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
