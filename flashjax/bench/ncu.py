"""Nsight Compute (`ncu`): find it, build its command line, parse its CSV, delimit profiled calls.

`python -m flashjax bench --io` measures the DRAM bytes a kernel moves by running a worker
process under

    ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum \\
        --clock-control none --csv --print-units base --profile-from-start off \\
        [--kernel-name regex:...] python -m flashjax.bench.hbm SPEC RESULT

The worker profiles only inside `profiler_range()` (`cuProfilerStart` / `cuProfilerStop`, so
that input generation, compilation and XLA's GEMM autotuning are never profiled) and brackets
each measured call with two tiny named Pallas kernels, `BEGIN_MARKER` and `END_MARKER`, so that
the kernels ncu lists (in launch order) can be attributed to the call that launched them:
`split_calls` cuts the list at the markers.

ncu's defaults that matter: `--cache-control all` flushes the caches before every profiled kernel
(each kernel starts from a cold L2, so bytes one kernel leaves in L2 for the next are counted
again), and `--replay-mode kernel` restores the memory a kernel writes before replaying it.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

DRAM_READ = "dram__bytes_read.sum"
DRAM_WRITE = "dram__bytes_write.sum"
# Bytes requested from L2 by the SMs (reads and writes): what the analytic IO model counts when
# re-read tiles are served by L2 rather than DRAM.
L2_BYTES = "lts__t_bytes.sum"
METRICS: tuple[str, ...] = (DRAM_READ, DRAM_WRITE, L2_BYTES)
BEGIN_MARKER = "fjio_begin"
END_MARKER = "fjio_end"
# Where ncu is looked for after $PATH (globs; CUDA images put it in one of these).
CANDIDATES = (
    "/usr/local/cuda/bin/ncu",
    "/usr/local/cuda-*/bin/ncu",
    "/opt/nvidia/nsight-compute/*/ncu",
    "/usr/local/cuda*/nsight-compute*/ncu",
)
# Units ncu may print, to base units (bytes: decimal prefixes, `--print-units base` asks for
# plain "byte"; times: seconds); others (%, counts, ratios) are taken as they are.
UNIT_SCALE: dict[str, float] = {
    "byte": 1.0,
    "kbyte": 1e3,
    "mbyte": 1e6,
    "gbyte": 1e9,
    "tbyte": 1e12,
    "b": 1.0,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "kib": 2.0**10,
    "mib": 2.0**20,
    "gib": 2.0**30,
    # Times, in seconds.
    "nsecond": 1e-9,
    "usecond": 1e-6,
    "msecond": 1e-3,
    "second": 1.0,
    "ns": 1e-9,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One profiled kernel launch: ncu's launch id, the kernel's name, its metrics (bytes)."""

    id: int
    name: str
    metrics: dict[str, float]

    @property
    def dram_bytes(self) -> float | None:
        """DRAM bytes read plus written, None if either metric is missing."""
        if DRAM_READ not in self.metrics or DRAM_WRITE not in self.metrics:
            return None
        return self.metrics[DRAM_READ] + self.metrics[DRAM_WRITE]


def find_ncu(explicit: str | None = None) -> str | None:
    """The ncu executable: `explicit` if given (and runnable), else `ncu` on $PATH, else the
    first of `CANDIDATES` (the newest version where a glob finds several); None if none."""
    if explicit:
        return explicit if shutil.which(explicit) else None
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in CANDIDATES:
        runnable = [p for p in sorted(glob.glob(pattern)) if os.access(p, os.X_OK)]
        if runnable:
            return runnable[-1]
    return None


def command(
    ncu: str,
    target: Sequence[str],
    metrics: Sequence[str] = METRICS,
    kernel_regex: str | None = None,
    sections: Sequence[str] = (),
    sass: bool = False,
) -> list[str]:
    """The ncu command line that profiles `target` (argv) inside its profiler ranges only, with
    `metrics` (names, or ncu's `regex:` patterns) and whole report `sections`; `sass`: ncu's
    source page instead of the details page, one line per SASS instruction with its metrics
    (the SourceCounters section's stall samples, which say where a kernel waits)."""
    cmd = [ncu]
    for section in sections:
        cmd += ["--section", section]
    cmd += [
        "--metrics",
        ",".join(metrics),
        "--clock-control",
        "none",
        "--csv",
        "--print-units",
        "base",
        "--profile-from-start",
        "off",
        "--target-processes",
        "all",
    ]
    if kernel_regex:
        cmd += ["--kernel-name", f"regex:{kernel_regex}"]
    if sass:
        cmd += ["--page", "source", "--print-source", "sass"]
    return cmd + list(target)


def _number(text: str, unit: str) -> float | None:
    """A metric value in base units (bytes, seconds): thousands separators dropped, scaled by
    its unit."""
    text = text.strip().replace(",", "")
    if not text or text.lower() in ("n/a", "nan"):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value * UNIT_SCALE.get(unit.strip().lower(), 1.0)


def parse_csv(text: str) -> list[Kernel]:
    """Kernels from `ncu --csv` output, in launch order.

    Reads both of ncu's layouts: the default "details" page (one line per kernel and metric:
    "ID", ..., "Kernel Name", ..., "Metric Name", "Metric Unit", "Metric Value") and the "raw"
    page (one line per kernel, one column per metric, a line of units under the header). Lines
    before the header (`==PROF==` messages, the profiled program's own output) are skipped.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(line for line in lines[start:] if line.startswith('"')))
    header, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    if "Kernel Name" not in col:
        return []
    kernels: dict[int, Kernel] = {}
    if "Metric Name" in col:
        for r in body:
            # A metric's line stops after its value when no rule applies to it.
            if len(r) <= col["Metric Value"] or not r[0].strip().isdigit():
                continue
            kid = int(r[0])
            kernel = kernels.setdefault(kid, Kernel(kid, r[col["Kernel Name"]], {}))
            unit = r[col["Metric Unit"]] if "Metric Unit" in col else ""
            value = _number(r[col["Metric Value"]], unit)
            if value is not None:
                kernel.metrics[r[col["Metric Name"]]] = value
    else:
        units = [""] * len(header)
        metric_cols = [i for i, name in enumerate(header) if "__" in name]
        for r in body:
            if len(r) != len(header):
                continue
            if not r[0].strip():  # the units line under the header
                units = r
                continue
            if not r[0].strip().isdigit():
                continue
            kid = int(r[0])
            metrics = {}
            for i in metric_cols:
                if (value := _number(r[i], units[i])) is not None:
                    metrics[header[i]] = value
            kernels[kid] = Kernel(kid, r[col["Kernel Name"]], metrics)
    return [kernels[k] for k in sorted(kernels)]


def split_calls(
    kernels: Sequence[Kernel], begin: str = BEGIN_MARKER, end: str = END_MARKER
) -> list[list[Kernel]]:
    """The kernels between each `begin` marker and the next `end` marker (markers excluded), one
    list per bracketed call in launch order; kernels outside a bracket are dropped."""
    calls: list[list[Kernel]] = []
    current: list[Kernel] | None = None
    for k in kernels:
        if begin in k.name:
            current = []
        elif end in k.name:
            if current is not None:
                calls.append(current)
            current = None
        elif current is not None:
            current.append(k)
    return calls


def total(kernels: Sequence[Kernel], metric: str) -> float | None:
    """The sum of `metric` over `kernels` (None if any kernel lacks it or there are none)."""
    values = [k.metrics.get(metric) for k in kernels]
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


def unknown_metric(output: str) -> bool:
    """Whether ncu's output says a requested metric does not exist on this GPU or version."""
    lowered = output.lower()
    return "failed to find metric" in lowered or "unknown metric" in lowered


# The last line of a Python traceback: `ValueError: ...`, `jax.errors.JaxRuntimeError: ...`.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*?:")


def failure_reason(output: str, returncode: int) -> str:
    """A one-line reason from a failed ncu run: its first ==ERROR== line, else the last line;
    where the profiled program failed, its last exception line (`SomeError: ...`) after it
    (session 25: ncu's own line only said "The application returned an error code (1)")."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "==ERROR==" in line or "ERR_" in line]
    text = errors[0] if errors else (lines[-1] if lines else "")
    raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if raised and raised[-1] != text:
        text = f"{text} | {raised[-1]}"
    return f"ncu exited {returncode}: {text}"[:400]


AFTER_KILL_S = 20


def run(
    cmd: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
) -> tuple[int | None, str, str]:
    """Run `cmd` in its own process group; `(returncode, stdout, stderr)`, returncode None on
    timeout (the whole group, ncu and the program it profiles, is then killed)."""
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        # A run started right after a kill found no CUDA device (session 26: "no supported
        # devices found"): give the driver time to tear the killed process's context down.
        time.sleep(AFTER_KILL_S)
        return None, out, err
    return proc.returncode, out, err


# --------------------------------------------------------------------------------------------------
# Inside the profiled process
# --------------------------------------------------------------------------------------------------


class _Driver:
    """`cuProfilerStart` / `cuProfilerStop` of the CUDA driver, with device 0's primary context
    (the one XLA uses) made current on this thread: the calls act on the current context."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        ctx = ctypes.c_void_p()
        self._check("cuCtxGetCurrent", ctypes.byref(ctx))
        if not ctx.value:
            device = ctypes.c_int()
            self._check("cuInit", 0)
            self._check("cuDeviceGet", ctypes.byref(device), 0)
            self._check("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), device)
            self._check("cuCtxSetCurrent", ctx)

    def _check(self, name: str, *args: object) -> None:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            raise RuntimeError(f"{name} returned CUDA error {code}")

    def start(self) -> None:
        self._check("cuProfilerStart")

    def stop(self) -> None:
        self._check("cuProfilerStop")


_DRIVER: _Driver | None = None


@contextlib.contextmanager
def profiler_range() -> Iterator[None]:
    """Profile what runs inside (under `ncu --profile-from-start off`); harmless without ncu.

    The caller must have waited for earlier work (`block_until_ready`) before entering and for
    the profiled work before leaving.
    """
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = _Driver()
    _DRIVER.start()
    try:
        yield
    finally:
        _DRIVER.stop()
