"""A/B timing of two flashjax checkouts through the public op only ("no regression from the
restructure", "before/after block skipping").

One checkout per process, selected by PYTHONPATH; the script imports nothing from flashjax but
`flashjax.dot_product_attention` (the arguments every version since d7eec2a takes), so an old
checkout runs it unchanged:

  PYTHONPATH=.baseline python3 benchmarks/ab.py --label old --out DIR --commit d7eec2a
  PYTHONPATH=. python3 benchmarks/ab.py --label new --out DIR
  python3 benchmarks/ab.py --compare DIR/ab-old.json DIR/ab-new.json      # -> DIR/ab-compare.md

Its timing (`batch_seconds`, `calls_per_batch`) and its commit (`checkout_commit`) therefore
repeat flashjax/bench/timing.py and machine.py on purpose: those belong to the checkout under
test, which may lack them or differ (d7eec2a's machine.py has no `git_commit`), and both sides of
an A/B must be timed by the same code, this file's.

Cases (bf16, `implementation="triton"`):
  dense    seq 1k, 4k, 16k x head dims 64, 128, 256 x causal / not; B*T = 16k, N*H = 2048
  padding  B=8, T=S=4k, N=16, H=128, non-causal and causal; key_value_seq_lengths uniform in
           [S/4, S] (seeded)
  packed   B=4, T=S=8k, N=16, H=128, causal; segment ids of 8 and of 16 documents per row
           (sorted ids, random document lengths, seeded)

Each case compiles `fwd` (the op, jitted) and `fwd+bwd` (`jax.grad` of a loss of its output,
jitted), ahead of any timing and in a pool of threads; then the two are timed interleaved: per
repetition one batch of each, a batch being back-to-back calls ending in `block_until_ready`,
sized to about `--batch-ms`. Reported: the median per call, and bwd = fwd+bwd - fwd. The GPU is
kept busy for a second before the first timing (clocks ramp up from idle).

`--compare` writes a markdown table of new/old time ratios per case and mode, flagging those more
than 3% slower (REGRESSION) and more than 3% faster (faster).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

THRESHOLD = 0.03  # a ratio beyond 1 +- 3% is flagged
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed call: shapes, masking, and the seeded extras (lengths, documents)."""

    group: str  # "dense", "padding", "packed"
    batch: int
    seq: int
    heads: int
    head_dim: int
    causal: bool
    padded: bool = False  # key_value_seq_lengths uniform in [S/4, S]
    documents: int = 0  # segment ids with this many documents per row (0: none)

    @property
    def name(self) -> str:
        parts = [
            self.group,
            f"B{self.batch}",
            f"T{self.seq}",
            f"N{self.heads}",
            f"H{self.head_dim}",
        ]
        parts.append("causal" if self.causal else "full")
        if self.documents:
            parts.append(f"docs{self.documents}")
        return "-".join(parts)


def dense_cases(seqs: Sequence[int], head_dims: Sequence[int], tokens: int, hidden: int) -> list:
    """The standard sweep: `batch = tokens // seq`, `heads = hidden // head_dim`."""
    return [
        Case("dense", max(1, tokens // s), s, max(1, hidden // h), h, causal)
        for s in seqs
        for h in head_dims
        for causal in (False, True)
    ]


def full_cases() -> list[Case]:
    """(a) + (b) + (c) of the brief, at the sizes an H200 runs in about 3 minutes."""
    cases = dense_cases((1024, 4096, 16384), (64, 128, 256), 16384, 2048)
    cases += [Case("padding", 8, 4096, 16, 128, causal, padded=True) for causal in (False, True)]
    cases += [Case("packed", 4, 8192, 16, 128, True, documents=d) for d in (8, 16)]
    return cases


def quick_cases() -> list[Case]:
    """A tiny set of every kind (CPU tests)."""
    cases = dense_cases((128,), (32,), 256, 64)
    cases += [Case("padding", 2, 128, 2, 32, causal, padded=True) for causal in (False, True)]
    cases += [Case("packed", 2, 256, 2, 32, True, documents=4)]
    return cases


# --------------------------------------------------------------------------------------------------
# Inputs and programs
# --------------------------------------------------------------------------------------------------


def kv_lengths(case: Case, seed: int) -> Any:
    """`(B,)` int32 lengths drawn uniformly in [S/4, S]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(case.seq // 4, case.seq + 1, size=case.batch).astype(np.int32)


def segment_ids(case: Case, seed: int) -> Any:
    """`(B, T)` int32 sorted document ids: per row `documents - 1` distinct random cut points."""
    import numpy as np

    rng = np.random.default_rng(seed)
    positions = np.arange(case.seq)
    rows = []
    for _ in range(case.batch):
        cuts = np.sort(rng.choice(np.arange(1, case.seq), case.documents - 1, replace=False))
        rows.append(np.searchsorted(cuts, positions, side="right"))
    return np.stack(rows).astype(np.int32)


def inputs(case: Case, seed: int) -> dict[str, Any]:
    """q, k, v and the output cotangent `do` (bf16, standard normal), plus the case's extras."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    arrays = [jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16) for k in keys]
    found = dict(zip(("q", "k", "v", "do"), arrays, strict=True))
    if case.padded:
        found["key_value_seq_lengths"] = jnp.asarray(kv_lengths(case, seed))
    if case.documents:
        ids = jnp.asarray(segment_ids(case, seed))
        found["q_segment_ids"] = found["kv_segment_ids"] = ids
    return jax.block_until_ready(found)


def programs(case: Case, implementation: str) -> dict[str, Callable]:
    """`fwd(args)` and `fwd+bwd(args)` (jax.grad of sum(out * do) in float32) of the public op."""
    import jax
    import jax.numpy as jnp

    import flashjax

    def attention(q, k, v, extras):
        return flashjax.dot_product_attention(
            q, k, v, is_causal=case.causal, implementation=implementation, **extras
        )

    def fwd(args):
        extras = {n: x for n, x in args.items() if n not in ("q", "k", "v", "do")}
        return attention(args["q"], args["k"], args["v"], extras)

    def fwd_bwd(args):
        extras = {n: x for n, x in args.items() if n not in ("q", "k", "v", "do")}

        def loss(q, k, v):
            out = attention(q, k, v, extras)
            return jnp.sum(out.astype(jnp.float32) * args["do"].astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(args["q"], args["k"], args["v"])

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def compile_case(case: Case, args: dict, implementation: str) -> dict[str, Any]:
    """Both programs, compiled (`jit(...).lower(args).compile()`)."""
    import jax

    return {k: jax.jit(f).lower(args).compile() for k, f in programs(case, implementation).items()}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def batch_seconds(run: Callable[[], Any], n: int) -> float:
    """Wall seconds per call of `n` back-to-back calls, waiting for the last result."""
    import jax

    out = None
    start = time.perf_counter()
    for _ in range(n):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n


def calls_per_batch(run: Callable[[], Any], batch_s: float, max_inner: int = 100) -> int:
    """Calls that fill about `batch_s`, from one warm-up and one timed call."""
    batch_seconds(run, 1)
    one = max(batch_seconds(run, 1), 1e-6)
    return max(1, min(max_inner, math.ceil(batch_s / one)))


def time_interleaved(runs: dict[str, Callable[[], Any]], reps: int, batch_s: float) -> dict:
    """Median seconds per call of each program, timed in turns (one batch each per repetition)."""
    inner = {name: calls_per_batch(run, batch_s) for name, run in runs.items()}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            samples[name].append(batch_seconds(run, inner[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def warm_up_device(seconds: float = 1.0) -> None:
    """Keep the device busy for `seconds` (a GPU's clocks ramp up from idle)."""
    import jax
    import jax.numpy as jnp

    if jax.devices()[0].platform != "gpu":
        return
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    matmul = jax.jit(jnp.dot)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        jax.block_until_ready(matmul(a, a))


def describe_error(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def measure(case: Case, args: dict, compiled: dict, reps: int, batch_s: float) -> dict:
    """One case's row: fwd, fwd+bwd and bwd (their difference) in ms."""
    runs = {name: (lambda c=c: c(args)) for name, c in compiled.items()}
    seconds = time_interleaved(runs, reps, batch_s)
    fwd, both = seconds["fwd"] * 1e3, seconds["fwd+bwd"] * 1e3
    return {"fwd": fwd, "fwd+bwd": both, "bwd": both - fwd}


# --------------------------------------------------------------------------------------------------
# A run
# --------------------------------------------------------------------------------------------------


def checkout_commit(explicit: str | None) -> str:
    """`explicit`, else the short HEAD of the git tree flashjax is imported from ("-dirty" with
    uncommitted changes), else "unknown"."""
    if explicit:
        return explicit
    import flashjax

    root = Path(flashjax.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        command = ["git", "-C", str(root), *args]
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def describe(label: str, commit: str | None, implementation: str) -> dict[str, Any]:
    import jax

    import flashjax

    device = jax.devices()[0]
    return {
        "label": label,
        "device": str(device.device_kind),
        "platform": device.platform,
        "jax_version": jax.__version__,
        "checkout": str(Path(flashjax.__file__).resolve().parents[1]),
        "commit": checkout_commit(commit),
        "implementation": implementation,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def compile_all(
    cases: Sequence[Case], implementation: str, seed: int, workers: int
) -> tuple[dict, dict]:
    """Inputs and compiled programs of every case (compiled in `workers` threads); a case that
    fails to build or compile maps to its error instead."""
    made: dict[str, Any] = {}
    compiled: dict[str, Any] = {}
    for case in cases:
        try:
            made[case.name] = inputs(case, seed)
        except Exception as e:
            compiled[case.name] = describe_error(e)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {
            case.name: pool.submit(compile_case, case, made[case.name], implementation)
            for case in cases
            if case.name in made
        }
        for name, future in futures.items():
            error = future.exception()
            compiled[name] = describe_error(error) if error is not None else future.result()
    return made, compiled


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compile every case, then time them; returns the JSON record."""
    import jax

    implementation = args.implementation
    if implementation is None:
        implementation = "triton" if jax.devices()[0].platform == "gpu" else "xla_chunked"
    cases = quick_cases() if args.quick else full_cases()
    record = describe(args.label, args.commit, implementation)
    started = time.perf_counter()
    workers = args.compile_workers or min(8, os.cpu_count() or 1)
    made, compiled = compile_all(cases, implementation, args.seed, workers)
    record["compile_s"] = round(time.perf_counter() - started, 1)
    warm_up_device()
    rows = []
    for case in cases:
        row = {"name": case.name, **dataclasses.asdict(case), "status": "ok", "error": ""}
        programs_ = compiled[case.name]
        try:
            if isinstance(programs_, str):
                raise RuntimeError(programs_)
            row["ms"] = measure(case, made[case.name], programs_, args.reps, args.batch_ms / 1e3)
        except Exception as e:
            row |= {"status": "error", "error": describe_error(e), "ms": None}
        rows.append(row)
        print(progress(row), flush=True)
    record |= {"reps": args.reps, "seconds": round(time.perf_counter() - started, 1)}
    return record | {"cases": rows}


def progress(row: dict) -> str:
    if row["ms"] is None:
        return f"{row['name']:<36} {row['status'].upper()} {row['error']}"
    ms = row["ms"]
    return f"{row['name']:<36} " + "  ".join(f"{m} {ms[m]:.3f} ms" for m in MODES)


# --------------------------------------------------------------------------------------------------
# Comparing two runs
# --------------------------------------------------------------------------------------------------


def flag(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    if ratio > 1 + THRESHOLD:
        return "REGRESSION"
    if ratio < 1 - THRESHOLD:
        return "faster"
    return ""


def _ratio(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old <= 0 or new <= 0:
        return None
    return new / old


def compare(old: dict, new: dict) -> tuple[str, int]:
    """A markdown table of new/old ratios per case and mode; and the number of regressions."""
    lines = [
        f"# A/B: {new['label']} ({new['commit']}) over {old['label']} ({old['commit']})",
        "",
        f"Device: {new['device']} (old run: {old['device']}); jax {new['jax_version']}; "
        f"implementation {new['implementation']}. Times are medians per call in ms; ratio = "
        f"new / old (< 1: new is faster); flagged beyond {THRESHOLD:.0%}.",
        "",
        "| case | mode | old ms | new ms | ratio | |",
        "|---|---|---:|---:|---:|---|",
    ]
    old_rows = {r["name"]: r for r in old["cases"]}
    regressions = 0
    ratios: list[float] = []
    for row in new["cases"]:
        before = old_rows.get(row["name"])
        for mode in MODES:
            o = None if before is None or before["ms"] is None else before["ms"][mode]
            n = None if row["ms"] is None else row["ms"][mode]
            ratio = _ratio(n, o)
            mark = flag(ratio)
            regressions += mark == "REGRESSION"
            if ratio is not None:
                ratios.append(ratio)
            cells = [row["name"], mode, _ms(o), _ms(n), "-" if ratio is None else f"{ratio:.3f}"]
            lines.append("| " + " | ".join([*cells, mark]) + " |")
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines += ["", f"Geometric mean ratio {geo:.3f} over {len(ratios)} timings; "]
        lines[-1] += f"{regressions} regression(s) beyond {THRESHOLD:.0%}."
    return "\n".join(lines) + "\n", regressions


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 benchmarks/ab.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--label", help="name of this checkout's run (ab-<label>.json)")
    p.add_argument("--out", type=Path, help="folder for ab-<label>.json (and ab-compare.md)")
    p.add_argument("--commit", help="the checkout's commit, where it has no .git")
    p.add_argument(
        "--implementation",
        help='the op\'s implementation (default "triton" on a GPU, "xla_chunked" elsewhere)',
    )
    p.add_argument("--quick", action="store_true", help="a tiny case set (CPU tests)")
    p.add_argument("--reps", type=int, default=5, help="timed batches per program (default 5)")
    p.add_argument("--batch-ms", type=float, default=20.0, help="length of a batch (default 20)")
    p.add_argument("--compile-workers", type=int, help="compile threads (default min(8, cores))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("OLD", "NEW"),
        help="compare two ab-<label>.json files instead of timing",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.compare:
        old, new = (json.loads(path.read_text()) for path in args.compare)
        text, regressions = compare(old, new)
        out = args.out or args.compare[1].parent
        out.mkdir(parents=True, exist_ok=True)
        (out / "ab-compare.md").write_text(text)
        print(text + f"\nwrote {out / 'ab-compare.md'}")
        return 0
    if not args.label or not args.out:
        p.error("--label and --out are required (or --compare OLD NEW)")
    record = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ab-{args.label}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path} ({record['seconds']:.0f} s, compiling {record['compile_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
