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


def test_arguments(script, tmp_path) -> None:
    with pytest.raises(SystemExit):
        script.main([str(tmp_path), "--cases", "fwd-d64-causal-1k,nope"])
    with pytest.raises(SystemExit):
        script.main([])  # OUT is required
    assert set(script.CASES) >= {"fwd-d64-causal-1k", "bwd-d128-causal-16k"}
