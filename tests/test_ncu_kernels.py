"""benchmarks/ncu_kernels.py on CPU: the ncu command it builds, what it reads from ncu's CSV (the
"details" page: section metrics under their display names, command-line metrics under theirs)
and its argument errors. The profile itself needs a GPU with ncu (device_call_ncu.sh)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from test_bench import NCU_COLUMNS

from flashjax.bench import ncu

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ncu_kernels.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("benchmarks_ncu_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _line(kid: int, kernel: str, section: str, metric: str, unit: str, value: str) -> str:
    return (
        f'"{kid}","7","python3","host","{kernel}","1","7","(384, 1, 1)","(132, 1, 1)","0",'
        f'"9.0","{section}","{metric}","{unit}","{value}"'
    )


def test_summary_reads_sections_pipes_stalls_and_conflicts(script) -> None:
    kernel = "flashjax_mosaic_forward_mosaic_gpu_kernel"
    stalled = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    piped = "sm__pipe_{}_cycles_active.avg.pct_of_peak_sustained_active"
    cmd = "Command line profiler metrics"
    rows = [
        _line(0, kernel, "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "61.5"),
        _line(0, kernel, "GPU Speed Of Light Throughput", "Memory Throughput", "%", "20.25"),
        _line(0, kernel, "Launch Statistics", "Registers Per Thread", "register/thread", "168"),
        _line(0, kernel, "Occupancy", "Achieved Occupancy", "%", "18.7"),
        _line(0, kernel, cmd, "gpu__time_duration.sum", "usecond", "425.5"),
        _line(0, kernel, cmd, piped.format("tensor_op_gmma"), "%", "55.1"),
        _line(0, kernel, cmd, piped.format("xu"), "%", "71.0"),
        _line(0, kernel, cmd, piped.format("fma"), "%", "33.3"),
        _line(0, kernel, cmd, stalled.format("barrier"), "", "3.5"),
        _line(0, kernel, cmd, stalled.format("long_scoreboard"), "", "0.2"),
        _line(0, kernel, cmd, stalled.format("math_pipe_throttle"), "", "1.25"),
        _line(0, kernel, cmd, script.CONFLICTS[0], "", "1,024"),
    ]
    text = "==PROF== Connected\n" + NCU_COLUMNS + "\n" + "\n".join(rows) + "\n"
    (parsed,) = ncu.parse_csv(text)
    line = script.summary(parsed)
    assert "425.5 us" in line and "SM 62%" in line and "mem 20%" in line
    assert "regs 168" in line and "occupancy 18.7%" in line
    assert "pipes: xu 71, tensor_op_gmma 55.1, fma 33.3" in line  # busiest first
    assert "stalls: barrier 3.5, math_pipe_throttle 1.25, long_scoreboard 0.2" in line
    assert "bank conflicts ld/st: 1.02e+03/?" in line


def test_command_has_the_sections_and_metric_patterns(script) -> None:
    cmd = ncu.command("/opt/ncu", ["python3", "x.py"], script.METRICS, sections=script.SECTIONS)
    assert cmd[:3] == ["/opt/ncu", "--section", "SpeedOfLight"]
    assert cmd.count("--section") == len(script.SECTIONS)
    metrics = cmd[cmd.index("--metrics") + 1].split(",")
    assert script.PIPES in metrics and script.STALLS in metrics
    assert cmd[-2:] == ["python3", "x.py"] and "--profile-from-start" in cmd


def test_metric_runs_replay_only_the_attention_kernels(script, tmp_path) -> None:
    """The metric run names ATTENTION_KERNELS (a backward program's fusions replayed for every
    metric pass outran the timeout, session 26); the fake ncu prints the arguments it got."""
    fake = tmp_path / "ncu"
    fake.write_text('#!/bin/bash\necho "$@"\n')
    fake.chmod(0o755)
    script.profile(tmp_path, "bwd-d128-causal-4k", "jax_cudnn", str(fake))
    args = (tmp_path / "bwd-d128-causal-4k-jax_cudnn.csv").read_text()
    assert f"--kernel-name regex:{script.ATTENTION_KERNELS}" in args


def test_arguments(script, tmp_path) -> None:
    with pytest.raises(SystemExit):
        script.main([str(tmp_path), "--cases", "fwd-d64-causal-1k,nope"])
    with pytest.raises(SystemExit):
        script.main([])  # OUT is required
    assert set(script.CASES) >= {"fwd-d64-causal-1k", "bwd-d128-causal-16k"}


def _fake_ncu(tmp_path: Path, csv_text: str) -> str:
    """An executable standing in for ncu: with a `regex:` metric (after the first, as METRICS
    has them) it fails as an ncu without that metric does; otherwise it prints `csv_text` (it
    never runs the worker)."""
    (tmp_path / "sample.csv").write_text(csv_text)
    fake = tmp_path / "ncu"
    fake.write_text(
        "#!/bin/bash\n"
        'if [[ "$*" == *,regex:* ]]; then\n'
        '  echo "==ERROR== Failed to find metric regex:x"; exit 1\n'
        "fi\n"
        f'cat "{tmp_path / "sample.csv"}"\n'
    )
    fake.chmod(0o755)
    return str(fake)


def test_driver_falls_back_to_sections_and_writes_the_summary(script, tmp_path) -> None:
    kernel = "cudnn_fmha_fwd"
    rows = [
        _line(0, kernel, "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "80"),
        _line(
            0, kernel, "Command line profiler metrics", "gpu__time_duration.sum", "nsecond", "1,250"
        ),
    ]
    fake = _fake_ncu(tmp_path, NCU_COLUMNS + "\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = [str(out), "--cases", "fwd-d64-causal-1k", "--backends", "jax_cudnn", "--ncu", fake]
    assert script.main(args) == 0
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == "fwd-d64-causal-1k jax_cudnn"
    assert summary[1].startswith("  cudnn_fmha_fwd | 1.2 us | SM 80% | mem nan%")
    assert (out / "fwd-d64-causal-1k-jax_cudnn.csv").read_text().startswith('"ID"')


def test_driver_reports_a_failed_run(script, tmp_path) -> None:
    fake = tmp_path / "ncu"
    fake.write_text(
        "#!/bin/bash\necho 'ValueError: head_dim: expected 64' >&2\n"
        'echo "==ERROR== The application returned an error code (2)."\nexit 2\n'
    )
    fake.chmod(0o755)
    lines = script.profile(tmp_path, "fwd-d64-full-1k", "flashjax_mosaic", str(fake))
    assert lines == [
        "fwd-d64-full-1k flashjax_mosaic: ncu exited 2: "
        "==ERROR== The application returned an error code (2). | "
        "ValueError: head_dim: expected 64"
    ]
    err = tmp_path / "fwd-d64-full-1k-flashjax_mosaic.err"
    assert err.read_text() == "ValueError: head_dim: expected 64\n"  # the program's stderr


def test_summary_reads_ncus_own_csv(script) -> None:
    """Lines as ncu 2025 writes them on the H200 (results/2026-11-30-h200-s10/ncu): five more
    columns for its rules after the value, which a metric line without a rule leaves off (its
    line ends after the value), times in "ns", numbers with thousands separators, and the
    tensor pipe under several names with one value."""
    header = NCU_COLUMNS_2025
    kernel = "flashjax_mosaic_forward_mosaic_gpu_kernel"

    def line(metric: str, unit: str, value: str) -> str:
        return (
            f'"0","497","python3.12","127.0.0.1","{kernel}","1","14","(384, 1, 1)",'
            f'"(8, 16, 32)","0","9.0","Command line profiler metrics","{metric}","{unit}",'
            f'"{value}",'
        )

    piped = "sm__pipe_{}_cycles_active.avg.pct_of_peak_sustained_active"
    rows = [
        line("gpu__time_duration.sum", "ns", "280,224"),
        line(piped.format("shared"), "%", "30.38"),
        line(piped.format("tensor"), "%", "30.38"),
        line(piped.format("tensor_op_hmma"), "%", "30.38"),
        line(piped.format("alu"), "%", "30.09"),
        line(script.CONFLICTS[1], "", "65,749"),
    ]
    text = "==PROF== Connected to process 497\n" + header + "\n" + "\n".join(rows) + "\n"
    (parsed,) = ncu.parse_csv(text)
    line_ = script.summary(parsed)
    assert "280.2 us" in line_
    assert "pipes: tensor 30.4, alu 30.1 |" in line_  # one name for the tensor pipe
    assert "bank conflicts ld/st: ?/6.57e+04" in line_


NCU_COLUMNS_2025 = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
    '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value",'
    '"Rule Name","Rule Type","Rule Description","Estimated Speedup Type","Estimated Speedup"'
)


def test_sass_page_command_and_driver(script, tmp_path) -> None:
    """`--sass`: a second run per case asks ncu for its source page (SASS with the
    SourceCounters section's stall samples) of the attention kernels only, and keeps it."""
    cmd = ncu.command("/opt/ncu", ["python3", "x.py"], sections=("SourceCounters",), sass=True)
    assert cmd[cmd.index("--page") + 1] == "source"
    assert cmd[cmd.index("--print-source") + 1] == "sass"
    assert "--page" not in ncu.command("/opt/ncu", ["python3", "x.py"])
    row = _line(0, "flashjax_mosaic_forward", "Occupancy", "Achieved Occupancy", "%", "18")
    fake = _fake_ncu(tmp_path, NCU_COLUMNS + "\n" + row + "\n")
    out = tmp_path / "out"
    args = [str(out), "--cases", "fwd-d64-full-1k", "--backends", "flashjax_mosaic"]
    assert script.main([*args, "--ncu", fake, "--sass"]) == 0
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[-1] == (
        "fwd-d64-full-1k flashjax_mosaic sass: 2 lines in fwd-d64-full-1k-flashjax_mosaic-sass.csv"
    )
    assert (out / "fwd-d64-full-1k-flashjax_mosaic-sass.csv").read_text().startswith('"ID"')


SASS_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sass_stalls.py"


def test_sass_stalls_reads_the_source_page(tmp_path) -> None:
    """benchmarks/sass_stalls.py: the instruction lines of ncu's source page (not its preamble
    or the kernel-name line), opcodes without predicates or modifiers, and the hottest
    instruction shown with the ones before it."""
    spec = importlib.util.spec_from_file_location("benchmarks_sass_stalls", SASS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    header = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"'
    body = [
        '"0x10","      UTMALDG.5D [UR8], [UR16]","1","32"',
        '"0x20","      SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR9], R7","2","32"',
        '"0x30","      @!P1  BRA 0x10","90","64"',
        '"0x40","      HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24","7","256"',
    ]
    text = "\n".join(["==PROF== Connected", header, '"Kernel Name","k",', header, *body])
    path = tmp_path / "case-sass.csv"
    path.write_text(text)
    rows = module.instructions(path)
    assert [r["Address"] for r in rows] == ["0x10", "0x20", "0x30", "0x40"]
    assert [module.opcode(r["Source"]) for r in rows] == ["UTMALDG", "SYNCS", "BRA", "HGMMA"]
    out = module.report(path, top=1, context=2)
    assert "HGMMA 256, BRA 64" in out and "#2: 90.0% of samples" in out
    assert "TRYWAIT" in out and "UTMALDG" in out and "gdesc" not in out.split("#2")[1]
    assert "shared wavefronts" not in out  # a page without the columns


def test_sass_stalls_shared_wavefronts(tmp_path) -> None:
    """benchmarks/sass_stalls.py: shared-memory wavefronts and their excess summed by opcode
    (ncu's thousands separators read), the instruction with the most excess named."""
    spec = importlib.util.spec_from_file_location("benchmarks_sass_stalls", SASS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    header = (
        '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
        '"L1 Wavefronts Shared","L1 Wavefronts Shared Excessive"'
    )
    body = [
        '"0x10","      STS.64 [R13+0x8400], R152","1","32","2,048","1,024"',
        '"0x20","      STS.64 [R13+0x8c00], R154","1","32","2,048","0"',
        '"0x30","      STSM.16.M88.4 [R14], R16","1","32","512",""',
        '"0x40","      HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24","7","256","0","0"',
    ]
    path = tmp_path / "case-sass.csv"
    path.write_text("\n".join([header, *body]))
    out = module.report(path, top=1, context=0)
    assert "STS 4,096 (1,024), STSM 512 (0)" in out
    assert "[R13+0x8400], R152" in out.split("shared wavefronts")[1].split("--")[0]
    assert "[R13+0x8c00]" not in out  # no excess: not listed


def test_a_candidates_options(script, monkeypatch, tmp_path) -> None:
    """`--options`: the worker runs the case's head-dim row with exactly those options
    and no rules (here on CPU, where the Mosaic backend then declines the case), and the run's
    name and files carry the options; other backends run as configured."""
    from pallas_kernels import configs

    monkeypatch.setitem(configs.MOSAIC_FORWARD, 64, configs.MOSAIC_FORWARD[64])
    assert script.worker("flashjax_mosaic", "fwd-d64-full-1k", "persistent,prefetch_q") == 2
    row = configs.MOSAIC_FORWARD[64]
    assert row.options == ("persistent", "prefetch_q") and row.rules == ()
    monkeypatch.setitem(configs.MOSAIC_BACKWARD, 128, configs.MOSAIC_BACKWARD[128])
    forward = configs.MOSAIC_FORWARD[128]
    options = "fused_dq,split_dq,registers=240:24"
    assert script.worker("flashjax_mosaic", "bwd-d128-causal-4k", options) == 2
    row = configs.MOSAIC_BACKWARD[128]  # a fwd_bwd case pins the backward's row
    assert row.options == ("fused_dq", "split_dq") and row.rules == ()
    assert row.registers == (240, 24)
    with pytest.raises(ValueError, match="registers=240:24: only a backward row"):
        script.worker("flashjax_mosaic", "fwd-d64-full-1k", "registers=240:24")
    assert configs.MOSAIC_FORWARD[128] is forward
    assert script._target("flashjax_mosaic", "fwd-d64-full-1k", "")[-2:] == [
        "--options",
        "",
    ]
    assert script._run_names("c", "b", "persistent,prefetch_q") == (
        "c b persistent+prefetch_q",
        "c-b-persistent+prefetch_q",
    )
    assert script._run_names("c", "b", "") == ("c b none", "c-b-none")
    assert script._run_names("c", "b", None) == ("c b", "c-b")
    fake = _fake_ncu(tmp_path, NCU_COLUMNS + "\n")
    out = tmp_path / "out"
    args = [str(out), "--cases", "fwd-d64-full-1k", "--backends", "flashjax_mosaic,jax_cudnn"]
    args += ["--options", "persistent", "--options", "", "--ncu", fake]
    assert script.main(args) == 0
    summary = (out / "summary.txt").read_text().splitlines()
    runs = ["flashjax_mosaic persistent", "flashjax_mosaic none", "jax_cudnn"]
    assert summary == [f"fwd-d64-full-1k {run}" for run in runs]
    assert (out / "fwd-d64-full-1k-flashjax_mosaic-persistent.csv").exists()
