"""`python -m flashjax bench --io`: FlashAttention's IO complexity (Theorem 2, Fig. 2), measured.

For one forward shape (`B, T = S, N, H`; bf16, non-causal by default) and each sequence length,
this module reports, for standard attention and for flashjax's forward kernel at each tile size:

  model_bytes  the HBM bytes an analytic model of the algorithm predicts (below);
  ncu_bytes    the DRAM bytes Nsight Compute measures (`dram__bytes_read.sum` +
               `dram__bytes_write.sum`; and `lts__t_bytes.sum`, the bytes the SMs moved through
               L2), see `flashjax.bench.ncu`;
  ms           the forward's runtime: median of timed batches (`flashjax.bench.timing`), measured
               outside ncu.

Standard attention is `jax.nn.dot_product_attention(implementation="xla")`, modelled as the naive
algorithm (Algorithm 0 of the FlashAttention paper) in the dtypes XLA uses: per (batch, head), with
`e` the input dtype's item size,

  read Q, K (e*(T + S)*H)      -> write the float32 scores S = QK^T (4*T*S)
  read S (4*T*S)               -> softmax in float32, write P in the input dtype (e*T*S)
  read P, V (e*T*S + e*S*H)    -> write O (e*T*H)

so `2e(T + S)H + (8 + 2e)TS` bytes: Theta(N*d + N^2). Assumptions: the scale multiplies in the
GEMM's epilogue or the softmax's fusion (no extra pass), the softmax reads S once (XLA's fused
softmax; an unfused one reads it two or three times), and nothing stays in L2 between kernels
(ncu flushes caches before each profiled kernel, so measurement and model agree on this).

flashjax's forward (`pallas_kernels/triton/forward.py`) runs one program per (query block,
batch, head). A program loads its `block_q x H` query tile once, streams every key block that
`common.block_range` says it can see (K and V tiles, `block_k x H` each), and writes its output
tile and its float32 logsumexp once. `flash_forward_bytes` counts exactly that, with the same
`block_range` call the kernel makes and the kernel's padding (T, S up to multiples of the tiles,
H up to a power of two):

  e*Tp*Hp (Q) + 2*e*Hp*block_k*sum_i visited_i (K, V) + e*Tp*Hp (O) + 4*Tp (logsumexp)

Non-causal, every one of the `Tp / block_q` programs visits all `Sp / block_k` key blocks, so the
K, V term is `2*e*Sp*Hp*Tp/block_q`: every pass over K and V serves `block_q` queries. With on-chip
memory M the tile holds `block_q = Theta(M / d)` queries, hence `Theta(N^2 d^2 / M)` bytes for K, V
plus Theta(N*d) for Q and O: Theorem 2 of the paper. (FlashAttention-1 loops over key blocks
outside and query blocks inside, so there the pass count is `S / B_c`; this kernel's outer loop is
the grid over query blocks, so here it is `T / block_q`. `block_k` changes how finely K, V are
streamed, not how often: the model does not depend on it.) Causal attention visits about half of
the key blocks.

What the GPU measures differs from the model where its L2 (50 MB on an H100) serves re-reads: the
programs of one (batch, head) are launched together (query blocks are the grid's fastest axis), so
most K, V re-reads can hit L2 and DRAM may see little more than one pass over K and V.
`lts__t_bytes.sum` counts (about) the bytes the SMs asked L2 for, hits or misses: the traffic the
paper's two-level model (SRAM and HBM, no cache between) counts. Which of the two follows the model
is what the measurement shows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from flashjax import masks
from flashjax.bench import backends, cases, machine, report, sweep
from flashjax.bench import ncu as ncu_mod
from flashjax.bench.backends import JaxBackend
from pallas_kernels import common, configs
from pallas_kernels.triton import api

Row = dict[str, Any]
Log = Callable[[str], None]
STEM = "io"
FIELDS = (
    *report.META_FIELDS,
    "dtype",
    "batch",
    "seq_q",
    "seq_k",
    "heads",
    "head_dim",
    "causal",
    "impl",
    "block",
    "block_q",
    "block_k",
    "num_warps",
    "num_stages",
    "tile_bytes",
    "model_bytes",
    "model_read_bytes",
    "model_write_bytes",
    "ncu_status",
    "ncu_bytes",
    "ncu_read_bytes",
    "ncu_write_bytes",
    "ncu_l2_bytes",
    "ncu_kernels",
    "ms",
    "status",
    "rel_err",
    "temp_bytes",
    "error",
)
FLASH_KERNEL = "flashjax_fwd"  # the forward kernel's name (its pallas_call's `name=`)
VARY = ("both", "q", "k")
DEFAULT_NCU_TIMEOUT_S = 240.0


# --------------------------------------------------------------------------------------------------
# The analytic model
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes an algorithm moves between HBM and the chip, by term (all batch elements and heads)."""

    reads: dict[str, int]
    writes: dict[str, int]

    @property
    def read(self) -> int:
        return sum(self.reads.values())

    @property
    def write(self) -> int:
        return sum(self.writes.values())

    @property
    def total(self) -> int:
        return self.read + self.write


def standard_forward_bytes(
    batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, itemsize: int
) -> Traffic:
    """HBM bytes of the naive algorithm as `jax.nn.dot_product_attention(implementation="xla")`
    runs it: float32 scores written and read once, probabilities in the input dtype written and
    read once (see the module docstring for the assumptions)."""
    bn, e = batch * heads, itemsize
    return Traffic(
        reads={
            "q": bn * seq_q * head_dim * e,
            "k": bn * seq_k * head_dim * e,
            "scores": bn * seq_q * seq_k * 4,
            "probs": bn * seq_q * seq_k * e,
            "v": bn * seq_k * head_dim * e,
        },
        writes={
            "scores": bn * seq_q * seq_k * 4,
            "probs": bn * seq_q * seq_k * e,
            "out": bn * seq_q * head_dim * e,
        },
    )


def visited_key_blocks(
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    causal: bool = False,
    window: tuple[int, int] | None = None,
) -> np.ndarray:
    """Key blocks each query-block program of the forward kernel visits, `(Tp / block_q,)`.

    The kernel's own rule, `pallas_kernels.common.block_range`, on the padded lengths.
    """

    tp = -(-seq_q // block_q) * block_q
    sp = -(-seq_k // block_k) * block_k
    starts = np.arange(tp // block_q, dtype=np.int32) * block_q
    lo, _, _, hi = common.block_range(
        starts, block_q, block_k, sp, seq_k, masks.window_of(causal, window)
    )
    return np.broadcast_to(np.asarray(hi) - np.asarray(lo), starts.shape).astype(np.int64)


def flash_forward_bytes(
    batch: int,
    heads: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    itemsize: int,
    block_q: int,
    block_k: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
) -> Traffic:
    """HBM bytes of flashjax's forward kernel with tiles `block_q x block_k` (no caching between
    programs): Q read and O, logsumexp written once, K and V read once per visited key block."""

    hp = configs.head_dim_bucket(head_dim)
    tp = -(-seq_q // block_q) * block_q
    visits = int(visited_key_blocks(seq_q, seq_k, block_q, block_k, causal, window).sum())
    bn, e = batch * heads, itemsize
    kv_tile = block_k * hp * e
    return Traffic(
        reads={"q": bn * tp * hp * e, "k": bn * visits * kv_tile, "v": bn * visits * kv_tile},
        writes={"out": bn * tp * hp * e, "lse": bn * tp * 4},
    )


def tile_bytes(block_q: int, block_k: int, head_dim: int, itemsize: int) -> int:
    """On-chip bytes of one program's operand tiles (Q, K, V; one pipeline stage): the `M` that
    Theorem 2 divides by."""

    return (block_q + 2 * block_k) * configs.head_dim_bucket(head_dim) * itemsize


# --------------------------------------------------------------------------------------------------
# What runs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IOConfig:
    """One `--io` run: the shape, the tile sizes swept, and how ncu is used."""

    seqlens: tuple[int, ...]
    blocks: tuple[int, ...]
    batch: int = 1
    heads: int = 16
    head_dim: int = 64
    causal: bool = False
    dtype: str = "bfloat16"
    vary: str = "both"
    ncu: str | None = None
    ncu_status: str = "no ncu"
    ncu_timeout_s: float = DEFAULT_NCU_TIMEOUT_S
    seed: int = 0


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


def flashjax_tiles(config: Any) -> Callable:
    """A bench `AttentionFn` running flashjax's forward kernel with the `KernelConfig` `config`
    (used for all three kernels, so the padding is the forward's own)."""

    def attention(q: Any, k: Any, v: Any, case: Any) -> Any:

        statics = common.AttentionStatics(
            scale=float(case.head_dim**-0.5),
            window=masks.window_of(case.causal, case.window),
            kv_len=case.seq,
        )
        whole = configs.AttentionConfig(config, config, config)
        out, _ = api.forward(q, k, v, None, None, None, None, statics, config=whole)
        return out

    return attention


def standard_attention() -> Callable:
    """The baseline's `AttentionFn`: `jax.nn.dot_product_attention(implementation="xla")`."""

    return backends.dpa_call("jax.nn", "xla")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One measured call: an implementation at one sequence length (and tile)."""

    id: int
    impl: str  # "standard" or "flashjax"
    seq: int
    block: int | None = None
    block_q: int | None = None
    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def attention(self) -> Callable:
        if self.impl == "standard":
            return standard_attention()

        return flashjax_tiles(
            configs.KernelConfig(self.block_q, self.block_k, self.num_warps, self.num_stages)
        )


def _case(cfg: IOConfig, seq: int) -> Any:

    return cases.Case(cfg.batch, seq, cfg.heads, cfg.head_dim, cfg.causal, cfg.dtype)


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
        traffic, tiles = standard_forward_bytes(*shape), None
    else:
        traffic = flash_forward_bytes(*shape, entry.block_q, entry.block_k, causal=cfg.causal)
        tiles = tile_bytes(entry.block_q, entry.block_k, cfg.head_dim, e)
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
        case = _case(cfg, seq)
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
            log(progress(row))
        del inputs


def progress(row: Row) -> str:
    """One stdout line per measured call."""
    tiles = "" if row["impl"] == "standard" else f" {row['block_q']}x{row['block_k']}"
    text = f"T={report.seq_label(row['seq_q']):<5} {row['impl']}{tiles:<9} "
    text += f"model {row['model_bytes'] / 1e9:.4g} GB"
    if row["ms"] is not None:
        text += f", {row['ms']:.4g} ms"
    if row["rel_err"] is not None:
        text += f", err {row['rel_err']:.1e}"
    if row["status"] not in ("ok", "unchecked"):
        text += f", {row['status'].upper()} {row['error']}"
    return text


# --------------------------------------------------------------------------------------------------
# Nsight Compute
# --------------------------------------------------------------------------------------------------


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
            target = [sys.executable, "-m", "flashjax.bench.hbm", str(spec), str(result)]
            metrics = ncu_mod.METRICS
            log(f"ncu: {len(group)} {impl} calls ({cfg.ncu})")
            while True:
                cmd = ncu_mod.command(cfg.ncu, target, metrics, regex)
                code, out, err = ncu_mod.run(cmd, cfg.ncu_timeout_s, _worker_env())
                if (
                    code not in (0, None)
                    and ncu_mod.unknown_metric(out + err)
                    and (ncu_mod.L2_BYTES in metrics)
                ):
                    log(f"ncu: {ncu_mod.L2_BYTES} unknown here; measuring DRAM bytes only")
                    metrics = (ncu_mod.DRAM_READ, ncu_mod.DRAM_WRITE)
                    continue
                break
            (out_dir / f"{STEM}-ncu-{impl}.csv").write_text(out)
            (out_dir / f"{STEM}-ncu-{impl}.log").write_text(err)
            worker = json.loads(result.read_text()) if result.exists() else {}
        status = attribute(group, rows, out, worker, impl == "flashjax")
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
    cfg = IOConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    result: dict[str, Any] = {"profiled": [], "errors": {}}
    try:
        begin, end = _marker(ncu_mod.BEGIN_MARKER), _marker(ncu_mod.END_MARKER)
    except Exception as e:
        result["fatal"] = "markers: " + sweep.describe_error(e)[1]
        result_path.write_text(json.dumps(result))
        return 1
    for raw in spec["entries"]:
        entry = Entry(**raw)
        try:
            case = _case(cfg, entry.seq)
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


# --------------------------------------------------------------------------------------------------
# The run, the table, the plot
# --------------------------------------------------------------------------------------------------


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
        profile(cfg, entries, rows, out_dir, log, on_progress)
    return rows


def format_table(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """HBM bytes (model, ncu DRAM, ncu L2) and runtime per sequence length and tile."""
    statuses = sorted({r["ncu_status"] for r in rows})
    unit, name = report.byte_unit(max((r["model_bytes"] for r in rows), default=0))

    def amount(x: float | None) -> str | None:
        return None if x is None else f"{x / unit:.4g}"

    lines = [
        f"HBM traffic of one forward on {meta.get('device')}: {meta.get('dtype')}, "
        f"B={meta.get('batch')} N={meta.get('heads')} H={meta.get('head_dim')}, "
        f"{'causal' if meta.get('causal') else 'non-causal'}; "
        f"1 {name} = 10^{round(math.log10(unit))} bytes.",
        "model: analytic bytes (flashjax/bench/hbm.py); dram, L2: Nsight Compute "
        f"(ncu: {', '.join(statuses)}); ms: median forward time.",
    ]
    if meta.get("platform") == "cpu":
        lines.append(report.CPU_NOTE + ".")
    table = []
    for r in rows:
        tiles = "-" if r["impl"] == "standard" else f"{r['block_q']}x{r['block_k']}"
        ms = None if r["ms"] is None else f"{r['ms']:.4g}"
        status = r["status"] if r["status"] not in ("ok", "unchecked") else ""
        table.append(
            [
                report.seq_label(r["seq_q"]),
                r["impl"],
                tiles,
                amount(r["model_bytes"]),
                amount(r["ncu_bytes"]),
                amount(r["ncu_l2_bytes"]),
                ms,
                status.upper(),
            ]
        )
    header = ["seq", "impl", "tile", f"model_{name}", f"dram_{name}", f"L2_{name}", "ms", ""]
    return "\n".join(lines + [""] + report.text_table(header, table))


def plot(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> Path | None:
    """Two panels against the swept block size: HBM traffic (GB, model solid, ncu DRAM dashed,
    ncu L2 dotted) and runtime (ms); one color per sequence length, standard attention as
    horizontal lines (it has no tiles)."""
    plt = report.pyplot()
    if plt is None or not rows:
        return None
    seqs = sorted({r["seq_q"] for r in rows})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(seqs)}
    largest = max((r.get(k) or 0 for r in rows for k in ("model_bytes", "ncu_bytes")), default=0)
    unit, name = report.byte_unit(largest)
    vary = meta.get("vary", "both")
    axis = {"both": "block_q", "q": "block_q", "k": "block_k"}[vary]
    fig, (traffic, runtime) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    xs_all = sorted({r[axis] for r in rows if r["impl"] == "flashjax"})
    for seq in seqs:
        color, label = colors[seq], f"T={report.seq_label(seq)}"
        flash = sorted(
            (r for r in rows if r["seq_q"] == seq and r["impl"] == "flashjax"),
            key=lambda r: r[axis],
        )
        std = next((r for r in rows if r["seq_q"] == seq and r["impl"] == "standard"), None)
        for ax, key, style, marker in (
            (traffic, "model_bytes", "-", "o"),
            (traffic, "ncu_bytes", "--", "x"),
            (traffic, "ncu_l2_bytes", ":", "^"),
            (runtime, "ms", "-", "o"),
        ):
            scale = 1.0 if key == "ms" else 1.0 / unit
            points = [(r[axis], r[key] * scale) for r in flash if r.get(key)]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    ls=style,
                    marker=marker,
                    ms=4,
                    color=color,
                    label=label if (key in ("model_bytes", "ms")) else None,
                )
            if std is not None and std.get(key):
                ax.axhline(std[key] * scale, ls=style, color=color, lw=1.2, alpha=0.7)
    for ax, ylabel in ((traffic, f"HBM traffic ({name})"), (runtime, "forward time (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if xs_all:
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel(
            {"both": "block size (block_q = block_k)", "q": "block_q", "k": "block_k"}[vary]
        )
        ax.set_ylabel(ylabel)
    traffic.set_title(
        "flashjax (lines with markers) vs standard attention (flat lines)", fontsize=9
    )
    runtime.set_title("runtime, median of timed batches", fontsize=9)
    from matplotlib.lines import Line2D

    styles = [
        Line2D([], [], color="gray", ls="-", marker="o", label="model"),
        Line2D([], [], color="gray", ls="--", marker="x", label="ncu DRAM read+write"),
        Line2D([], [], color="gray", ls=":", marker="^", label="ncu L2 (lts__t_bytes)"),
    ]
    first = traffic.legend(handles=styles, loc="lower left", fontsize=8)
    traffic.add_artist(first)
    traffic.legend(loc="upper right", fontsize=8)
    runtime.legend(loc="best", fontsize=8)
    title = report.shape_title("FlashAttention IO (Theorem 2 / Fig. 2)", meta)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out_dir: Path, meta: dict[str, Any], rows: Sequence[Row], with_plot: bool) -> dict:
    """`io.json`, `io.csv` and (with matplotlib) `io.png` in `out_dir`."""
    return report.write_results(
        out_dir, STEM, meta, report.with_meta(rows, meta), FIELDS, plot if with_plot else None
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flashjax.bench.hbm SPEC RESULT`: the worker ncu profiles."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(
            "usage: python -m flashjax.bench.hbm SPEC.json RESULT.json (run by --io)",
            file=sys.stderr,
        )
        return 2
    return worker(Path(args[0]), Path(args[1]))


if __name__ == "__main__":
    sys.exit(main())
