"""What ran the sweep: device, versions, commit, date, and the machine's own matmul ceiling."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform as _platform
import re
import subprocess
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from flashjax.bench import timing

REPO_ROOT = Path(__file__).resolve().parents[2]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(repo: Path = REPO_ROOT) -> str:
    """`HEAD`'s short hash, with "-dirty" if the work tree has changes; "unknown" outside git.
    `FLASHJAX_COMMIT` in the environment wins: a copy of the work tree (the device machine's)
    may carry a stale .git, or none."""
    if os.environ.get("FLASHJAX_COMMIT"):
        return os.environ["FLASHJAX_COMMIT"]

    def git(*args: str) -> str:
        command = ["git", "-C", str(repo), *args]
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def device_name() -> str:
    """The default device's kind, e.g. "NVIDIA H100 80GB HBM3" (or "cpu")."""
    return str(jax.devices()[0].device_kind)


def slug(text: str) -> str:
    """A file-name-safe lowercase form: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def describe(commit: str | None = None) -> dict[str, Any]:
    """Device, software versions, git commit (`commit` if given) and date of this run."""
    device = jax.devices()[0]
    info: dict[str, Any] = {
        "device": device_name(),
        "platform": device.platform,
        "device_count": jax.device_count(),
        "compute_capability": getattr(device, "compute_capability", None),
        "jax_version": jax.__version__,
        "jaxlib_version": _version("jaxlib"),
        "python": _platform.python_version(),
        "git_commit": commit or git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    for dist in ("jax-cuda13-plugin", "jax-cuda12-plugin", "tokamax", "torch"):
        if (v := _version(dist)) is not None:
            info[dist.replace("-", "_") + "_version"] = v
    return info


def matmul_ceiling(policy: timing.TimingPolicy | None = None) -> dict[str, Any]:
    """TFLOP/s of one square matmul with `jnp.dot`, from its best timed batch (a ceiling).

    On a GPU: bf16 8192^3 (the protocol's ceiling). Elsewhere: float32 1024^3, a rough host figure.
    """
    on_gpu = jax.devices()[0].platform == "gpu"
    n, dtype = (8192, jnp.bfloat16) if on_gpu else (1024, jnp.float32)
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(jnp.dot).lower(a, b).compile()
    if on_gpu:  # some work first: clocks ramp up from idle
        timing.measure_jax(lambda: matmul(a, b), 100)
    t = timing.median_time(lambda: matmul(a, b), timing.measure_jax, policy)
    best = min(t.samples)
    return {
        "tflops": 2.0 * n**3 / best / 1e12,
        "ms": best * 1e3,
        "median_tflops": 2.0 * n**3 / t.seconds / 1e12,
        "what": f"{jnp.dtype(dtype).name} {n}x{n}x{n} jnp.dot, best timed batch",
    }


CEILING_RULE = (
    "the higher of the start and end measurements counts: a lower one ran before the clocks "
    "ramped up or while they were throttled, and a ceiling is the best the machine does"
)


def provisional_ceiling(start: dict[str, Any]) -> dict[str, Any]:
    """The ceiling measured at the start of a run, marked provisional (partial results use it
    until `final_ceiling` picks the one that counts)."""
    return start | {"measured": "start", "provisional": True, "start_tflops": start["tflops"]}


def final_ceiling(start: dict[str, Any], end: dict[str, Any]) -> dict[str, Any]:
    """The ceiling that counts: the higher of the start and end measurements (`CEILING_RULE`),
    saying which it was and what both read."""
    chosen, measured = (end, "end") if end["tflops"] > start["tflops"] else (start, "start")
    return chosen | {
        "measured": measured,
        "provisional": False,
        "start_tflops": start["tflops"],
        "end_tflops": end["tflops"],
        "rule": CEILING_RULE,
    }


def describe_ceiling(ceiling: dict[str, Any]) -> str:
    """One sentence on a ceiling: its value, what was timed, and when it was measured, for the
    start-of-run line and the summary alike."""
    text = f"{ceiling['tflops']:.4g} TFLOP/s ({ceiling.get('what', '?')})"
    if ceiling.get("provisional", False):
        return text + ", measured at the start: provisional, re-measured at the end of the run"
    if "end_tflops" not in ceiling:
        return text
    return (
        f"{text}, measured at the {ceiling['measured']} of the run "
        f"(start {ceiling['start_tflops']:.4g}, end {ceiling['end_tflops']:.4g} TFLOP/s; "
        f"{CEILING_RULE})"
    )
