"""`python -m flashjax bench --io`: FlashAttention's IO complexity (Theorem 2, Fig. 2), measured.

For one forward shape (`B, T = S, N, H`; bf16, non-causal by default) and each sequence length,
`--io` reports, for standard attention and for flashjax's forward kernel at each tile size:

  model_bytes  the HBM bytes an analytic model of the algorithm predicts (`hbm_model`);
  ncu_bytes    the DRAM bytes Nsight Compute measures (`dram__bytes_read.sum` +
               `dram__bytes_write.sum`; and `lts__t_bytes.sum`, the bytes the SMs moved through
               L2), see `hbm_profile` and `ncu`;
  ms           the forward's runtime: median of timed batches (`flashjax.bench.timing`), measured
               outside ncu.

This module is the runner: which entries run (standard attention and the kernel at each fitted
tile), the timing, and the order of the steps (`run`). The config and what an entry runs are
`hbm_entries`, the model `hbm_model`, profiling `hbm_profile`, the table, plot and files
`hbm_report`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from flashjax.bench import cases, hbm_model, hbm_profile, hbm_report, sweep
from flashjax.bench.backends import JaxBackend
from flashjax.bench.hbm_entries import Entry, IOConfig, case_of
from pallas_kernels import configs
from pallas_kernels.triton import api

Row = dict[str, Any]
Log = Callable[[str], None]
VARY = ("both", "q", "k")


def kernel_config(block: int, vary: str, head_dim: int, target: str | None = None) -> Any:
    """The forward's `KernelConfig` for a swept `block`: `block_q = block_k = block` ("both"), or
    only `block_q` ("q") or `block_k` ("k") with the other from `configs.py`. 4 warps up to 64x64
    tiles, 8 above; pipeline stages from `configs.py` (`api.plan` cuts them to fit)."""
    if vary not in VARY:
        raise ValueError(f"vary must be one of {VARY}, got {vary!r}")
    base = configs.get_config(head_dim, target or configs.gpu_target()).fwd
    bq = block if vary in ("both", "q") else base.block_q
    bk = block if vary in ("both", "k") else base.block_k
    warps = 4 if bq * bk <= 64 * 64 else 8
    return configs.KernelConfig(bq, bk, warps, base.num_stages)


def fitted(config: Any, seq: int, head_dim: int, itemsize: int) -> Any:
    """The `KernelConfig` the forward really runs with (`api.plan`: tiles shrunk to the sequence,
    stages cut to fit shared memory)."""
    whole = configs.AttentionConfig(config, config, config)
    return api.plan(seq, seq, head_dim, itemsize=itemsize, config=whole).config.fwd


def plan_entries(cfg: IOConfig) -> list[Entry]:
    """Per sequence length: standard attention, then flashjax at each distinct fitted tile."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    entries: list[Entry] = []
    for seq in cfg.seqlens:
        entries.append(Entry(len(entries), "standard", seq))
        seen = set()
        for block in cfg.blocks:
            c = fitted(kernel_config(block, cfg.vary, cfg.head_dim), seq, cfg.head_dim, itemsize)
            if (c.block_q, c.block_k) in seen:
                continue
            seen.add((c.block_q, c.block_k))
            entries.append(
                Entry(
                    len(entries),
                    "flashjax",
                    seq,
                    block,
                    c.block_q,
                    c.block_k,
                    c.num_warps,
                    c.num_stages,
                )
            )
    return entries


def model_row(cfg: IOConfig, entry: Entry) -> Row:
    """A row with the shape, the tiles and the analytic model's bytes (nothing measured yet)."""
    e = jnp.dtype(cfg.dtype).itemsize
    shape = (cfg.batch, cfg.heads, entry.seq, entry.seq, cfg.head_dim, e)
    if entry.impl == "standard":
        traffic, tiles = hbm_model.standard_forward_bytes(*shape), None
    else:
        traffic = hbm_model.flash_forward_bytes(
            *shape, entry.block_q, entry.block_k, causal=cfg.causal
        )
        tiles = hbm_model.tile_bytes(entry.block_q, entry.block_k, cfg.head_dim, e)
    return {
        "dtype": cfg.dtype,
        "batch": cfg.batch,
        "seq_q": entry.seq,
        "seq_k": entry.seq,
        "heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "causal": cfg.causal,
        "impl": entry.impl,
        "block": entry.block,
        "block_q": entry.block_q,
        "block_k": entry.block_k,
        "num_warps": entry.num_warps,
        "num_stages": entry.num_stages,
        "tile_bytes": tiles,
        "model_bytes": traffic.total,
        "model_read_bytes": traffic.read,
        "model_write_bytes": traffic.write,
        "model_terms": {"read": traffic.reads, "write": traffic.writes},
        "ncu_status": cfg.ncu_status,
        "ncu_bytes": None,
        "ncu_read_bytes": None,
        "ncu_write_bytes": None,
        "ncu_l2_bytes": None,
        "ncu_kernels": None,
        "ms": None,
        "status": "not run",
        "rel_err": None,
        "temp_bytes": None,
        "error": "",
    }


def time_entries(
    cfg: IOConfig, entries: Sequence[Entry], rows: list[Row], policy: Any, log: Log
) -> None:
    """Compile, check (flashjax against standard attention's output at the same length) and
    time every entry's forward, filling `ms`, `status`, `rel_err`, `temp_bytes`, `error`."""
    tol = sweep.TOLERANCES.get(cfg.dtype, sweep.TOLERANCES["float32"])[0]
    for seq in cfg.seqlens:
        case = case_of(cfg, seq)
        inputs = cases.make_inputs(case, cfg.seed)
        baseline = None
        for entry in (e for e in entries if e.seq == seq):
            row = rows[entry.id]
            runner = JaxBackend(entry.impl, entry.attention()).runner(case, inputs)
            try:
                row["temp_bytes"] = runner.prepare("fwd")
                (out,) = runner.outputs("fwd", case.batch, case.heads)
                if entry.impl == "standard":
                    baseline, row["status"] = out, "ok"
                elif baseline is None:
                    row["status"] = "unchecked"
                else:
                    row["rel_err"] = sweep.rel_l2(out, baseline)
                    row["status"] = "ok" if row["rel_err"] <= tol else "check_failed"
                if row["status"] != "check_failed":
                    row["ms"] = runner.time("fwd", policy).seconds * 1e3
            except Exception as e:
                row["status"], row["error"] = sweep.describe_error(e)
            finally:
                runner.close()
            log(hbm_report.progress(row))
        del inputs


def run(
    cfg: IOConfig,
    policy: Any,
    out_dir: Path,
    log: Log = print,
    *,
    measure: bool = True,
    on_progress: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Every row of an `--io` run: the model, then (with `measure`) runtimes, then ncu's bytes
    where `cfg.ncu` is set. `on_progress(rows)` runs after the timing and after each ncu run
    (the CLI saves partial results there)."""
    entries = plan_entries(cfg)
    rows = [model_row(cfg, e) for e in entries]
    if measure:
        time_entries(cfg, entries, rows, policy, log)
    if on_progress is not None:
        on_progress(rows)
    if cfg.ncu is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        hbm_profile.profile(cfg, entries, rows, out_dir, log, on_progress)
    return rows
