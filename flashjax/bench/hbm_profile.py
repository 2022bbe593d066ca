"""Nsight Compute's side of `--io`: profile each call's DRAM (and L2) bytes in a worker process.

This module owns the profiling: the worker process ncu runs (`python -m flashjax.bench.hbm_profile
SPEC RESULT`), the markers that bracket each profiled call, and attributing ncu's CSV back to the
rows. What an entry runs is `hbm_entries`, the runner `hbm`, ncu's command line and CSV `ncu`,
the model `hbm_model`.

`profile` starts one worker per implementation under ncu; the worker runs each entry once for
warm-up, then once inside a profiler range between two tiny marker kernels, and records which
entries it profiled, in order. `attribute` splits ncu's kernel list at the markers and sums the
bytes of each bracketed call onto its row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flashjax.bench import cases, machine, sweep
from flashjax.bench import ncu as ncu_mod
from flashjax.bench.hbm_entries import Entry, IOConfig, case_of
from flashjax.bench.hbm_report import STEM

Row = dict[str, Any]
Log = Callable[[str], None]
FLASH_KERNEL = "flashjax_fwd"  # the forward kernel's name (its pallas_call's `name=`)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(machine.REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["LC_ALL"] = "C"  # "1234.5", never "1234,5"
    return env


def worker_spec(cfg: IOConfig, entries: Sequence[Entry]) -> str:
    """The JSON that tells the worker what to run."""
    return json.dumps(
        {"config": dataclasses.asdict(cfg), "entries": [dataclasses.asdict(e) for e in entries]}
    )


def _run_ncu(cfg: IOConfig, target: list[str], regex: str | None, log: Log) -> tuple:
    """Run ncu on `target`; without the L2 metric where this ncu does not know it."""
    metrics = ncu_mod.METRICS
    while True:
        cmd = ncu_mod.command(cfg.ncu, target, metrics, regex)
        code, out, err = ncu_mod.run(cmd, cfg.ncu_timeout_s, _worker_env())
        failed = code not in (0, None)
        if failed and ncu_mod.unknown_metric(out + err) and ncu_mod.L2_BYTES in metrics:
            log(f"ncu: {ncu_mod.L2_BYTES} unknown here; measuring DRAM bytes only")
            metrics = (ncu_mod.DRAM_READ, ncu_mod.DRAM_WRITE)
            continue
        return code, out, err


def profile(
    cfg: IOConfig,
    entries: Sequence[Entry],
    rows: list[Row],
    out_dir: Path,
    log: Log,
    on_progress: Callable[[list[Row]], None] | None = None,
) -> None:
    """Measure every entry's DRAM bytes under ncu, one worker process per implementation, and
    fill the rows' `ncu_*` fields (`ncu_status` says what happened). ncu's raw output is kept in
    `out_dir` as `io-ncu-<impl>.csv` (stdout) and `io-ncu-<impl>.log` (stderr)."""
    assert cfg.ncu is not None
    for impl in ("standard", "flashjax"):
        group = [e for e in entries if e.impl == impl and rows[e.id]["status"] != "oom"]
        if not group:
            continue
        regex = f"{FLASH_KERNEL}|fjio_" if impl == "flashjax" else None
        with tempfile.TemporaryDirectory(prefix="flashjax-io-") as tmp:
            spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec.write_text(worker_spec(cfg, group))
            target = [sys.executable, "-m", "flashjax.bench.hbm_profile", str(spec), str(result)]
            log(f"ncu: {len(group)} {impl} calls ({cfg.ncu})")
            code, out, err = _run_ncu(cfg, target, regex, log)
            (out_dir / f"{STEM}-ncu-{impl}.csv").write_text(out)
            (out_dir / f"{STEM}-ncu-{impl}.log").write_text(err)
            worker_result = json.loads(result.read_text()) if result.exists() else {}
        status = attribute(group, rows, out, worker_result, impl == "flashjax")
        if code is None:
            status = f"ncu timed out after {cfg.ncu_timeout_s:.0f} s"
        elif code != 0 and status != "ok":
            status = ncu_mod.failure_reason(out + err, code)
        for e in group:
            if rows[e.id]["ncu_bytes"] is None and rows[e.id]["ncu_status"] == cfg.ncu_status:
                rows[e.id]["ncu_status"] = status
        log(f"ncu: {impl}: {status}")
        if on_progress is not None:
            on_progress(rows)


def attribute(
    group: Sequence[Entry], rows: list[Row], csv_text: str, worker: dict, flash_only: bool
) -> str:
    """Fill the rows of `group` from ncu's CSV and the worker's record of which calls it
    profiled (in order); returns the group's status ("ok" or what went wrong)."""
    profiled = worker.get("profiled", [])
    for key, message in worker.get("errors", {}).items():
        rows[int(key)]["ncu_status"] = f"worker: {message}"
    calls = ncu_mod.split_calls(ncu_mod.parse_csv(csv_text))
    if not profiled:
        return "no call profiled" + (f" ({worker['fatal']})" if worker.get("fatal") else "")
    if len(calls) != len(profiled):
        return f"{len(calls)} bracketed calls in ncu's output for {len(profiled)} profiled"
    for entry_id, kernels in zip(profiled, calls, strict=True):
        if flash_only:
            kernels = [k for k in kernels if FLASH_KERNEL in k.name]
        row = rows[entry_id]
        row["ncu_kernels"] = len(kernels)
        row["ncu_read_bytes"] = ncu_mod.total(kernels, ncu_mod.DRAM_READ)
        row["ncu_write_bytes"] = ncu_mod.total(kernels, ncu_mod.DRAM_WRITE)
        row["ncu_l2_bytes"] = ncu_mod.total(kernels, ncu_mod.L2_BYTES)
        if row["ncu_read_bytes"] is not None and row["ncu_write_bytes"] is not None:
            row["ncu_bytes"] = row["ncu_read_bytes"] + row["ncu_write_bytes"]
            row["ncu_status"] = "ok"
        else:
            row["ncu_status"] = "no kernel matched" if not kernels else "metrics missing"
    return "ok"


# --------------------------------------------------------------------------------------------------
# The worker (the process ncu profiles)
# --------------------------------------------------------------------------------------------------


def _marker(name: str) -> Callable:
    """A tiny compiled Pallas kernel named `name`: brackets a profiled call in ncu's list."""

    def kernel(x_ref: Any, o_ref: Any) -> None:
        o_ref[...] = x_ref[...] + 1.0

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
        name=name,
        interpret=jax.devices()[0].platform != "gpu",  # only for tests: ncu needs a GPU
    )
    x = jnp.zeros((16,), jnp.float32)
    compiled = jax.jit(call).lower(x).compile()
    jax.block_until_ready(compiled(x))
    return lambda: compiled(x)


def _bind(attention: Callable, case: Any) -> Callable:
    """`attention(q, k, v, case)` as a function of `(q, k, v)`."""

    def fwd(q: Any, k: Any, v: Any) -> Any:
        return attention(q, k, v, case)

    return fwd


def worker(spec_path: Path, result_path: Path) -> int:
    """Inside ncu: run each entry once for warm-up, then once inside a profiler range between
    the begin and end markers. Writes `{"profiled": [ids in order], "errors": {id: message}}`."""
    spec = json.loads(spec_path.read_text())
    raw = spec["config"]
    cfg = IOConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    result: dict[str, Any] = {"profiled": [], "errors": {}}
    try:
        begin, end = _marker(ncu_mod.BEGIN_MARKER), _marker(ncu_mod.END_MARKER)
    except Exception as e:
        result["fatal"] = "markers: " + sweep.describe_error(e)[1]
        result_path.write_text(json.dumps(result))
        return 1
    for raw_entry in spec["entries"]:
        entry = Entry(**raw_entry)
        try:
            case = case_of(cfg, entry.seq)
            q, k, v, _ = cases.make_inputs(case, cfg.seed)
            compiled = jax.jit(_bind(entry.attention(), case)).lower(q, k, v).compile()
            jax.block_until_ready(compiled(q, k, v))
            with ncu_mod.profiler_range():
                begin()
                out = compiled(q, k, v)
                jax.block_until_ready((out, end()))
            result["profiled"].append(entry.id)
            del q, k, v, out, compiled
        except Exception as e:
            result["errors"][str(entry.id)] = sweep.describe_error(e)[1]
            print(f"entry {entry.id}: {result['errors'][str(entry.id)]}", file=sys.stderr)
    result_path.write_text(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flashjax.bench.hbm_profile SPEC RESULT`: the worker ncu profiles."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(
            "usage: python -m flashjax.bench.hbm_profile SPEC.json RESULT.json (run by --io)",
            file=sys.stderr,
        )
        return 2
    return worker(Path(args[0]), Path(args[1]))


if __name__ == "__main__":
    sys.exit(main())
