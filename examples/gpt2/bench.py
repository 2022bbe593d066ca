"""GPT-2 end to end with each attention backend: speed, memory, longest sequence, loss parity.

    PYTHONPATH=. python3 -m examples.gpt2.bench --out OUT/gpt2            # GPU, ~8.5 minutes
    PYTHONPATH=. python -m examples.gpt2.bench --out /tmp/gpt2 --quick    # CPU smoke run

One command measures, for the backends flashjax (Pallas Triton kernels), xla (jax.nn's standard
attention) and cudnn (jax.nn with implementation="cudnn"), with the same batch, seed and data:

1. Throughput and memory: tokens/s (median of 10 steps after 3 warm-up) and XLA's memory plan of
   the training step (arguments + outputs + temporaries - donated aliases), for `small` at seq 1024
   and 4096 and `medium` at 1024, batch 8, documents packed with segment ids. Last, if time is
   left, `small` at 1024 without segment masking (causal only).
2. Longest sequence of `small` at batch 8: seq doubling 1k -> 32k per backend until one does not
   fit (out-of-memory is caught and recorded), with the throughput at each fitting length.
3. Loss parity: 200 steps of `small` (seq 1024, batch 8) from the same initialization and data with
   flashjax and with xla in bfloat16, and with xla in float32 as the bf16-noise reference. The
   tolerance is twice the largest gap between the bf16 and the float32 xla runs (the bf16 noise of
   this very run), and the measured largest flashjax - xla gap is checked against it.
4. A longer flashjax run (the time left) showing the validation loss falling.

`--backends none,...` adds the timing floor (`attention.NO_ATTENTION`: each attention replaced by
its value; throughput only): its speed over a backend's is the most any attention could gain.

On request only (`--only packed`, or `packed` among other kinds; never in the default run):
throughput of `small` at seq 4096, batch 8, with the documents cut so that each row holds 8 and 16
of them (`data.cut_documents`; `--packed-docs` sets the counts). Its records are throughput records
with `docs_per_row` set; the summary table lists them as `small (N docs/row)`. Budgeted to end
within 3 minutes (estimated from the default run's compile and step times; not yet run on a GPU):

    PYTHONPATH=. python -m examples.gpt2.bench --out OUT/gpt2-packed --only packed --budget-s 170 \
        --grace-s 10

Each backend runs in its own subprocess (one device user at a time; a crash or an out-of-memory
cannot take the others down; its peak-memory counter starts fresh), with a deadline. Every
measurement is appended to a JSON-lines file as soon as it is made, so a killed worker loses
nothing it finished. The parent process never touches the accelerator: it prepares the data,
starts the workers (their specs, stderr and the raw records go to `--out`/raw), then writes at
most five files into `--out`: `<date>-<device>-gpt2.json`
(every number), `-gpt2-throughput.png`, `-gpt2-loss-parity.png`, `-gpt2-val-loss.png` and
`-gpt2-summary.md` (tables for the README), and prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from examples.gpt2 import data
from examples.gpt2.attention import NO_ATTENTION, TIMED_BACKENDS, parse_backends

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "flashjax-gpt2-data"
GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure. `Plan()` is the GPU run; `QUICK` a CPU smoke run of the same code."""

    config: str = "small"
    batch: int = 8
    throughput: tuple[tuple[str, int], ...] = (("small", 1024), ("medium", 1024), ("small", 4096))
    ladder: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    warmup_steps: int = 3
    timed_steps: int = 10
    ladder_warmup: int = 2
    ladder_timed: int = 3
    parity_seq: int = 1024
    parity_steps: int = 200
    lr: float = 6e-4
    val_seq: int = 1024
    val_eval_batches: int = 16
    val_max_s: float = 300.0
    min_task_s: float = 25.0
    packed_seq: int = 4096
    packed_docs: tuple[int, ...] = (8, 16)


QUICK = Plan(
    config="tiny",
    batch=4,
    throughput=(("tiny", 64), ("tiny", 128)),
    ladder=(64, 128, 256, 512),
    warmup_steps=1,
    timed_steps=3,
    ladder_warmup=1,
    ladder_timed=2,
    parity_seq=64,
    parity_steps=20,
    lr=1e-3,
    val_seq=64,
    val_eval_batches=4,
    val_max_s=15.0,
    min_task_s=3.0,
    packed_seq=128,
    packed_docs=(4, 8),
)


def _plan_from_dict(d: dict[str, Any]) -> Plan:
    fields = {f.name for f in dataclasses.fields(Plan)}
    d = {k: v for k, v in d.items() if k in fields}
    d["throughput"] = tuple(tuple(x) for x in d["throughput"])
    d["ladder"] = tuple(d["ladder"])
    d["packed_docs"] = tuple(d["packed_docs"])
    return Plan(**d)


def _is_oom(message: str) -> bool:
    text = message.lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


def _short(message: str, limit: int = 400) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Worker (one backend, one process, the only one using the device)
# --------------------------------------------------------------------------------------------------


class Worker:
    """Runs one backend's tasks in order until its deadline, appending each record to a file."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import jax

        self.jax = jax
        self.spec = spec
        self.plan = _plan_from_dict(spec["plan"])
        self.backend: str = spec["backend"]
        self.flash_impl: str | None = spec.get("flash_impl")
        self.deadline: float = spec["deadline"]
        self.seed: int = spec.get("seed", 0)
        self.results_path = Path(spec["results"])
        self.corpus = data.load_corpus(Path(spec["data_cache"]), seed=self.seed)
        self.trainers: dict[tuple[Any, ...], Any] = {}
        self.measured: dict[tuple[str, int], dict[str, Any]] = {}

    # -- plumbing ---------------------------------------------------------------------------------

    def remaining(self) -> float:
        """Seconds to the deadline."""
        return self.deadline - time.time()

    def emit(self, record: dict[str, Any]) -> None:
        """Append `record` (tagged with the backend) to the results file, durably."""
        record = {"backend": self.backend, **record}
        with self.results_path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        status = record.get("status", "")
        keys = ("kind", "config", "seq", "docs_per_row", "dtype", "segments", "device_kind")
        text = " ".join(f"{k}={record[k]}" for k in keys if k in record)
        extra = ""
        if "plan_peak_bytes" in record:
            extra = (
                f" {record['tokens_per_s']:,.0f} tok/s, plan "
                f"{record.get('plan_peak_bytes', 0) / GIB:.2f} GiB"
            )
        if record.get("error"):
            extra += f" ({_short(record['error'], 160)})"
        print(f"[{self.backend}] {text} {status}{extra}", flush=True)

    def trainer(self, config: str, seq: int, dtype: str = "bfloat16", segments: bool = True) -> Any:
        """A cached `Trainer` for `small`/`medium`/... at `seq`, batch `plan.batch`."""
        from examples.gpt2.attention import AttentionFn
        from examples.gpt2.model import CONFIGS, get_config
        from examples.gpt2.train import TrainConfig, Trainer

        key = (config, seq, dtype, segments)
        if key not in self.trainers:
            model = get_config(
                config, max_seq_len=max(CONFIGS[config].max_seq_len, seq), dtype=dtype
            )
            train_config = TrainConfig(seq_len=seq, batch_size=self.plan.batch, seed=self.seed)
            attention = AttentionFn(
                self.backend, self.flash_impl if self.backend == "flashjax" else None
            )
            self.trainers[key] = Trainer(model, train_config, attention, use_segments=segments)
        return self.trainers[key]

    def schedule(self, seq: int, steps: int, warmup: int) -> Any:
        """The TrainConfig whose seed and schedule `init_state` reads."""
        from examples.gpt2.train import TrainConfig

        return TrainConfig(
            seq_len=seq,
            batch_size=self.plan.batch,
            steps=steps,
            lr=self.plan.lr,
            warmup_steps=warmup,
            seed=self.seed,
        )

    def sampler(self, seq: int, docs_per_row: int | None = None) -> data.BatchSampler:
        """Training batches (the same for every backend: same corpus, seed, order); with
        `docs_per_row`, of documents cut to `seq // docs_per_row` tokens."""
        stream = self.corpus.train
        if docs_per_row is not None:
            stream = data.cut_documents(stream, data.doc_len_for(seq, docs_per_row))
        return data.BatchSampler(stream, seq, self.plan.batch, self.seed)

    # -- measurements -----------------------------------------------------------------------------

    def _speed(
        self,
        kind: str,
        config: str,
        seq: int,
        warmup: int,
        timed: int,
        segments: bool = True,
        docs_per_row: int | None = None,
    ) -> dict[str, Any]:
        from examples.gpt2.train import device_memory

        jax = self.jax
        record: dict[str, Any] = {
            "kind": kind,
            "config": config,
            "seq": seq,
            "batch": self.plan.batch,
            "dtype": "bfloat16",
            "segments": segments,
        }
        if docs_per_row is not None:
            record["docs_per_row"] = docs_per_row
        trainer = None
        try:
            trainer = self.trainer(config, seq, segments=segments)
            state = trainer.init_state(self.schedule(seq, 1000, 10))
            sampler = self.sampler(seq, docs_per_row)
            host = [sampler.batch(i) for i in range(warmup + timed)]
            batches = [trainer.device_batch(b) for b in host]
            # Documents (segments) per row of the batches measured.
            counts = [1 + np.count_nonzero(np.diff(b.segment_ids, axis=-1), axis=-1) for b in host]
            docs = np.concatenate(counts)
            record.update(
                docs_per_row_mean=float(docs.mean()),
                docs_per_row_min=int(docs.min()),
                docs_per_row_max=int(docs.max()),
            )
            step = trainer.compiled_step(state, batches[0])
            stats = next(iter(trainer.compile_stats.values()))
            times = []
            for i, batch in enumerate(batches):
                start = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready((state, metrics))
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            loss = float(metrics["loss"])
            median = statistics.median(times)
            tokens = self.plan.batch * seq
            flops = trainer.model_config.flops_per_token(seq) * tokens
            record.update(
                status="ok" if math.isfinite(loss) else "nonfinite",
                step_ms_median=median * 1e3,
                step_ms_min=min(times) * 1e3,
                step_ms_all=[t * 1e3 for t in times],
                tokens_per_s=tokens / median,
                model_tflops_per_s=flops / median / 1e12,
                loss_last=loss,
                loss_chunk_tokens=trainer.loss_chunk,
                params=trainer.model_config.num_params(),
                **stats,
                **device_memory(),
            )
            del state, batches, metrics
        except Exception as e:  # noqa: BLE001 - every failure is a result here
            message = f"{type(e).__name__}: {e}"
            record.update(status="oom" if _is_oom(message) else "error", error=_short(message))
            if record["status"] == "error":
                record["traceback"] = _short(traceback.format_exc(), 1500)
            self.trainers.pop((config, seq, "bfloat16", segments), None)
        finally:
            if kind == "ladder":
                self.trainers.pop((config, seq, "bfloat16", segments), None)
            del trainer
            gc.collect()
        if segments and docs_per_row is None:
            self.measured[(config, seq)] = record
        return record

    def throughput(self, task: dict[str, Any]) -> None:
        """Tokens/s and memory of one (config, seq), batch `plan.batch`."""
        segments = task.get("segments", True)
        self.emit(
            self._speed(
                "throughput",
                task["config"],
                task["seq"],
                self.plan.warmup_steps,
                self.plan.timed_steps,
                segments,
            )
        )

    def packed(self, task: dict[str, Any]) -> None:
        """Tokens/s and memory of `plan.config` at `plan.packed_seq`, batch `plan.batch`, with each
        row holding N documents, for each N of `task["docs_per_row"]`. One task: the step compiled
        for the first N serves the others (same shapes), so they need only half the usual margin
        before the deadline."""
        config, seq = self.plan.config, self.plan.packed_seq
        for i, n in enumerate(task["docs_per_row"]):
            if i and self.remaining() < self.plan.min_task_s / 2:
                record = {"kind": "throughput", "config": config, "seq": seq, "docs_per_row": n}
                self.emit({**record, "status": "skipped"})
                continue
            warmup, timed = self.plan.warmup_steps, self.plan.timed_steps
            self.emit(self._speed("throughput", config, seq, warmup, timed, docs_per_row=n))

    def parity(self, task: dict[str, Any]) -> None:
        """`plan.parity_steps` training steps of `plan.config` from the shared initialization; the
        loss of every step."""
        dtype = task.get("dtype", "bfloat16")
        seq, steps = self.plan.parity_seq, self.plan.parity_steps
        record: dict[str, Any] = {"kind": "parity", "config": self.plan.config, "seq": seq}
        record.update(batch=self.plan.batch, dtype=dtype, steps=steps)
        try:
            trainer = self.trainer(self.plan.config, seq, dtype)
            state = trainer.init_state(self.schedule(seq, steps, max(1, steps // 10)))
            sampler = self.sampler(seq)
            losses, start = [], time.perf_counter()
            for i in range(steps):
                state, metrics = trainer.step(state, sampler.batch(i))
                losses.append(metrics["loss"])
                if i % 20 == 19 and self.remaining() < 5:
                    record["truncated"] = True
                    break
            record["losses"] = [float(x) for x in losses]
            record["seconds"] = time.perf_counter() - start
            finite = all(math.isfinite(x) for x in record["losses"])
            record["status"] = "ok" if finite and not record.get("truncated") else "partial"
            del state
        except Exception as e:  # noqa: BLE001
            message = f"{type(e).__name__}: {e}"
            record.update(status="oom" if _is_oom(message) else "error", error=_short(message))
        gc.collect()
        self.emit(record)

    def ladder(self, task: dict[str, Any]) -> None:
        """Double the sequence length of `plan.config` at batch `plan.batch` until a length does
        not fit; lengths already measured (throughput) are reused, lengths below a fitting one are
        implied."""
        config = self.plan.config
        for seq in self.plan.ladder:
            known = self.measured.get((config, seq))
            if known is not None:
                if known["status"] != "ok":
                    break
                continue
            fits_longer = any(
                s > seq and r["status"] == "ok"
                for (c, s), r in self.measured.items()
                if c == config
            )
            if fits_longer:
                continue
            if self.remaining() < self.plan.min_task_s:
                self.emit({"kind": "ladder", "config": config, "seq": seq, "status": "skipped"})
                break
            record = self._speed(
                "ladder", config, seq, self.plan.ladder_warmup, self.plan.ladder_timed
            )
            self.emit(record)
            if record["status"] != "ok":
                break

    def val_run(self, task: dict[str, Any]) -> None:
        """Train `plan.config` for the time left (at most `plan.val_max_s`), evaluating the
        validation loss 20 times."""
        from examples.gpt2.train import train

        seq = self.plan.val_seq
        budget = min(self.plan.val_max_s, self.remaining() - 5.0)
        record: dict[str, Any] = {"kind": "val_run", "config": self.plan.config, "seq": seq}
        record.update(batch=self.plan.batch, budget_s=budget)
        measured = self.measured.get((self.plan.config, seq))
        if measured is None and budget >= self.plan.min_task_s:  # e.g. `--only val_run`
            measured = self._speed("throughput", self.plan.config, seq, 2, 3)
            budget = min(self.plan.val_max_s, self.remaining() - 5.0)
        if budget < self.plan.min_task_s or measured is None or measured["status"] != "ok":
            record["status"] = "skipped"
            self.emit(record)
            return
        step_s = measured["step_ms_median"] / 1e3
        evals = 20
        val = data.eval_batches(self.corpus.val, seq, self.plan.batch, self.plan.val_eval_batches)
        eval_s = len(val) * step_s / 2 + 0.3  # A forward is ~1/3 of a step; plus transfers.
        # 15 s: the eval function's compilation and the host work around the steps.
        steps = max(20, int((0.9 * budget - 15.0 - evals * eval_s) / (step_s * 1.05)))
        record.update(steps=steps, eval_batches=len(val))
        try:
            trainer = self.trainer(self.plan.config, seq)
            schedule = self.schedule(seq, steps, min(200, max(1, steps // 20)))
            start = time.perf_counter()
            result = train(
                trainer,
                self.sampler(seq),
                val,
                state=trainer.init_state(schedule),
                stop_at=steps,
                deadline=time.time() + budget,
                eval_every=max(1, steps // evals),
                log_every=max(1, steps // 10),
                progress=False,
                on_log=lambda s, loss: print(f"[{self.backend}] val run step {s} loss {loss:.4f}"),
            )
            done = result.train_losses[-1][0] if result.train_losses else 0
            record.update(
                status="ok" if done == steps else "partial",
                steps_done=done,
                seconds=time.perf_counter() - start,
                tokens_per_step=self.plan.batch * seq,
                tokens_per_s=result.tokens_per_s,
                train_losses=_bin_curve(result.train_losses, 400),
                val_losses=result.val_losses,
            )
        except Exception as e:  # noqa: BLE001
            message = f"{type(e).__name__}: {e}"
            record.update(status="oom" if _is_oom(message) else "error", error=_short(message))
        gc.collect()
        self.emit(record)

    def hello(self) -> None:
        """Record the device and the software versions."""
        import flax
        import jaxlib
        import optax

        from examples.gpt2.train import device_memory, ocp

        device = self.jax.devices()[0]
        self.emit(
            {
                "kind": "hello",
                "platform": device.platform,
                "device_kind": device.device_kind,
                "jax": self.jax.__version__,
                "jaxlib": jaxlib.__version__,
                "flax": flax.__version__,
                "optax": optax.__version__,
                "orbax": ocp is not None,
                "python": platform.python_version(),
                "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                **device_memory(),
            }
        )

    def run(self) -> None:
        """Every task in order; a task that would start too close to the deadline is skipped."""
        try:
            self.hello()
        except Exception as e:  # noqa: BLE001 - versions are nice to have
            self.emit({"kind": "hello", "status": "error", "error": _short(str(e))})
        for task in self.spec["tasks"]:
            if self.remaining() < self.plan.min_task_s and task["kind"] != "val_run":
                self.emit({**task, "status": "skipped"})
                continue
            getattr(self, task["kind"])(task)


def _bin_curve(points: Sequence[tuple[int, float]], bins: int) -> list[tuple[float, float]]:
    """At most `bins` (mean step, mean loss) points of a per-step curve."""
    if len(points) <= bins:
        return [(float(s), float(v)) for s, v in points]
    arr = np.asarray(points, np.float64)
    return [(float(c[:, 0].mean()), float(c[:, 1].mean())) for c in np.array_split(arr, bins)]


# --------------------------------------------------------------------------------------------------
# Parent: plan, run the workers, analyze, write
# --------------------------------------------------------------------------------------------------


def _worker_plans(
    plan: Plan, backends: Sequence[str], packed: bool = False
) -> list[tuple[str, list[dict], float]]:
    """(backend, tasks, share of the budget) in running order, each backend's tasks by priority;
    the last worker (flashjax) gets whatever time is left and spends the rest of it on the
    validation run. With `packed`, every backend ends with the packed-documents task."""
    speed = [{"kind": "throughput", "config": c, "seq": s} for c, s in plan.throughput]
    no_seg = {"kind": "throughput", "config": plan.config, "seq": plan.parity_seq}
    no_seg["segments"] = False
    tasks = {
        "xla": speed
        + [{"kind": "parity"}, {"kind": "parity", "dtype": "float32"}, {"kind": "ladder"}, no_seg],
        "cudnn": [*speed, {"kind": "ladder"}, no_seg],
        "flashjax": [*speed, {"kind": "parity"}, {"kind": "ladder"}, no_seg, {"kind": "val_run"}],
        NO_ATTENTION: [*speed, no_seg],
    }
    shares = {NO_ATTENTION: 0.15, "xla": 0.32, "cudnn": 0.22, "flashjax": 1.0}
    order = [b for b in (NO_ATTENTION, "xla", "cudnn", "flashjax") if b in backends]
    extra = [{"kind": "packed", "docs_per_row": list(plan.packed_docs)}] if packed else []
    return [(b, tasks[b] + extra, shares[b]) for b in order]


def _run_worker(
    backend: str,
    tasks: list[dict],
    deadline: float,
    args: argparse.Namespace,
    plan: Plan,
    results: Path,
    logs: Path,
) -> dict[str, Any]:
    spec = {
        "backend": backend,
        "tasks": tasks,
        "deadline": deadline,
        "plan": dataclasses.asdict(plan),
        "results": str(results),
        "data_cache": str(args.data_cache),
        "seed": args.seed,
        "flash_impl": args.flash_impl,
    }
    spec_path = logs / f"{backend}.spec.json"
    spec_path.write_text(json.dumps(spec))
    stderr_path = logs / f"{backend}.stderr"
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # No allocator dumps on out-of-memory.
    if args.autotune_cache:
        # Shared by the workers: XLA's autotuning results (the same matmuls for every backend) are
        # reused instead of measured again. Executables are not cached: each worker compiles its
        # own, so compile times and XLA's memory plans are always fresh.
        flag = f"--xla_gpu_per_fusion_autotune_cache_dir={args.autotune_cache}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["PYTHONUNBUFFERED"] = "1"
    start = time.time()
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.gpt2.bench", "--worker", str(spec_path)],
            stderr=err,
            env=env,
            start_new_session=True,
        )
        killed = False
        try:
            rc = proc.wait(timeout=max(1.0, deadline + args.grace_s - time.time()))
        except subprocess.TimeoutExpired:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    info = {"backend": backend, "returncode": rc, "seconds": time.time() - start, "killed": killed}
    if rc != 0:
        tail = stderr_path.read_text(errors="replace").splitlines()[-25:]
        info["stderr_tail"] = tail
        print(f"[{backend}] worker exited with {rc}{' (killed at deadline)' if killed else ''}:")
        print("\n".join("    " + line for line in tail[-10:]), flush=True)
    return info


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _ladder_rungs(speed: list[dict[str, Any]], backend: str, plan: Plan) -> list[dict[str, Any]]:
    """`backend`'s speed records of `plan.config` with segments at the ladder's lengths, by seq."""
    return sorted(
        (
            r
            for r in speed
            if r["backend"] == backend
            and r.get("config") == plan.config
            and r.get("segments", True)
            and "docs_per_row" not in r
            and r["seq"] in plan.ladder
        ),
        key=lambda r: r["seq"],
    )


def analyze(records: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Group the raw records: throughput table, longest sequence per backend, parity verdict,
    validation run."""
    hello = {r["backend"]: r for r in records if r["kind"] == "hello"}
    speed = [r for r in records if r["kind"] in ("throughput", "ladder")]
    ladder: dict[str, Any] = {}
    for backend in sorted({r["backend"] for r in speed}):
        rungs = _ladder_rungs(speed, backend, plan)
        ok = [r for r in rungs if r["status"] == "ok"]
        failed = [r for r in rungs if r["status"] in ("oom", "error")]
        best = max(ok, key=lambda r: r["seq"]) if ok else None
        first_fail = min(failed, key=lambda r: r["seq"]) if failed else None
        ladder[backend] = {
            "max_seq": best["seq"] if best else None,
            "tokens_per_s_at_max": best["tokens_per_s"] if best else None,
            "plan_peak_gib_at_max": best.get("plan_peak_bytes", 0) / GIB if best else None,
            "first_failure": (
                {"seq": first_fail["seq"], "status": first_fail["status"]} if first_fail else None
            ),
            "tried": [(r["seq"], r["status"]) for r in rungs],
        }
    parity = _parity(records)
    val = next(
        (r for r in records if r["kind"] == "val_run" and r["status"] in ("ok", "partial")), None
    )
    return {"hello": hello, "speed": speed, "ladder": ladder, "parity": parity, "val_run": val}


def _parity(records: list[dict[str, Any]]) -> dict[str, Any]:
    curves = {
        f"{r['backend']}-{r['dtype']}": r["losses"]
        for r in records
        if r["kind"] == "parity" and r.get("losses")
    }
    flash, xla, ref = (curves.get(k) for k in ("flashjax-bfloat16", "xla-bfloat16", "xla-float32"))
    out: dict[str, Any] = {"curves": curves}
    if not flash or not xla:
        out["verdict"] = "not measured"
        return out
    n = min(len(flash), len(xla))
    gap = np.abs(np.asarray(flash[:n]) - np.asarray(xla[:n]))
    out.update(steps=n, max_gap=float(gap.max()), step_of_max_gap=int(gap.argmax()) + 1)
    out["first_step_gap"] = float(gap[0])
    out["mean_gap_last_20"] = float(
        abs(np.mean(np.asarray(flash[:n])[-20:]) - np.mean(np.asarray(xla[:n])[-20:]))
    )
    if ref:
        m = min(n, len(ref))
        noise = np.abs(np.asarray(xla[:m]) - np.asarray(ref[:m]))
        out["bf16_noise_max"] = float(noise.max())
        out["tolerance"] = 2.0 * float(noise.max())
        out["tolerance_rule"] = "2 x max_step |xla bf16 - xla float32| over the same steps"
    else:
        out["tolerance"] = 0.05
        out["tolerance_rule"] = "fallback 0.05 nats (the float32 reference run is missing)"
    out["verdict"] = "agree" if out["max_gap"] <= out["tolerance"] else "differ"
    return out


def _device_name(hello: dict[str, Any]) -> str:
    kinds = [h.get("device_kind", "") for h in hello.values()]
    kind = next((k for k in kinds if k), "unknown")
    lowered = kind.lower()
    for name in ("h200", "h100", "a100", "l40s", "l4", "b200", "gh200"):
        if name in lowered:
            return name
    if lowered == "cpu" or not kinds:
        return "cpu"
    return "".join(c for c in lowered if c.isalnum())[:16] or "device"


def _fmt_tokens(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def summary_markdown(result: dict[str, Any], plan: Plan) -> str:
    """The README section: tables of throughput / memory / longest sequence, parity, val run."""
    a = result["analysis"]
    lines = [
        f"### GPT-2 training end to end ({result['meta']['device_kind']}, "
        f"{result['meta']['date']})",
        "",
        f"Batch {plan.batch}, bf16 compute with fp32 master weights, AdamW, documents packed with "
        "segment ids (flashjax: `q_segment_ids`/`kv_segment_ids`; xla and cudnn: the equivalent "
        "`(B, 1, T, T)` boolean mask, the only form jax.nn takes), `is_causal=True`. "
        "Throughput: median of "
        f"{plan.timed_steps} steps after {plan.warmup_steps} warm-up; memory: XLA's plan for the "
        "training step (arguments + outputs + temporaries - donated).",
        "",
        "| model | seq | backend | tokens/s | model TFLOP/s | step ms | memory GiB | status |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    rows = sorted(
        (r for r in a["speed"] if r["kind"] == "throughput"),
        key=lambda r: (
            not r.get("segments", True),
            r.get("docs_per_row", 0),
            r["config"],
            r["seq"],
            r["backend"],
        ),
    )
    for r in rows:
        seg = "" if r.get("segments", True) else " (no segments)"
        if "docs_per_row" in r:
            seg = f" ({r['docs_per_row']} docs/row)"
        head = f"| {r['config']}{seg} | {r['seq']} | {r['backend']} |"
        if r["status"] == "ok":
            lines.append(
                f"{head} {_fmt_tokens(r['tokens_per_s'])} | {r['model_tflops_per_s']:.1f} | "
                f"{r['step_ms_median']:.1f} | {r.get('plan_peak_bytes', 0) / GIB:.1f} | ok |"
            )
        else:
            lines.append(f"{head} - | - | - | - | {r['status']} |")
    measured = [r for r in rows if "docs_per_row_mean" in r and r.get("segments", True)]
    cut = {r["docs_per_row"]: r["docs_per_row_mean"] for r in measured if "docs_per_row" in r}
    if cut:
        whole = {r["seq"]: r["docs_per_row_mean"] for r in measured if "docs_per_row" not in r}
        text = ", ".join(f"{n}: {m:.1f}" for n, m in sorted(cut.items()))
        if plan.packed_seq in whole:
            text += f"; whole documents at seq {plan.packed_seq}: {whole[plan.packed_seq]:.1f}"
        lines += [
            "",
            "`(N docs/row)`: the documents cut into pieces of seq / N tokens, each opened by a BOS "
            f"with positions restarting, so that every row holds N of them (documents per row of "
            f"the measured batches, mean: {text}).",
        ]
    lines += [
        "",
        f"Longest sequence of `{plan.config}` at batch {plan.batch} (doubling "
        f"{plan.ladder[0]} -> {plan.ladder[-1]}):",
        "",
        "| backend | longest seq | tokens/s there | memory GiB there | first failure |",
        "|---|---:|---:|---:|---|",
    ]
    for backend, info in a["ladder"].items():
        fail = info["first_failure"]
        fail_text = f"{fail['seq']} ({fail['status']})" if fail else "none"
        mem = info["plan_peak_gib_at_max"]
        lines.append(
            f"| {backend} | {info['max_seq'] or '-'} | {_fmt_tokens(info['tokens_per_s_at_max'])} "
            f"| {'-' if mem is None else f'{mem:.1f}'} | {fail_text} |"
        )
    p = a["parity"]
    lines += ["", "Loss parity:", ""]
    if "max_gap" in p:
        lines.append(
            f"{p['steps']} steps of `{plan.config}` (seq {plan.parity_seq}, batch {plan.batch}) "
            f"from one initialization and data: max |flashjax - xla| = {p['max_gap']:.4f} nats "
            f"(step {p['step_of_max_gap']}; step 1: {p['first_step_gap']:.2e}; mean of the last 20 "
            f"steps differs by {p['mean_gap_last_20']:.4f}); tolerance {p['tolerance']:.4f} = "
            f"{p['tolerance_rule']}"
            + (f" (bf16 noise {p['bf16_noise_max']:.4f})" if "bf16_noise_max" in p else "")
            + f": **{p['verdict']}**."
        )
    else:
        lines.append("not measured.")
    v = a["val_run"]
    lines += ["", "Validation run:", ""]
    if v:
        vals = v["val_losses"]
        tokens = v["steps_done"] * v["tokens_per_step"]
        lines.append(
            f"flashjax, `{plan.config}`, {v['steps_done']} steps ({tokens / 1e6:.1f}M tokens, "
            f"{v['seconds']:.0f} s, {_fmt_tokens(v['tokens_per_s'])} tokens/s): validation loss "
            f"{vals[0][1]:.3f} (step {vals[0][0]}) -> {vals[-1][1]:.3f} (step {vals[-1][0]}) "
            "nats per byte."
        )
    else:
        lines.append("not run.")
    return "\n".join(lines) + "\n"


def make_plots(result: dict[str, Any], plan: Plan, out: Path, prefix: str) -> list[str]:
    """Throughput / memory / ladder figure, parity curves, validation curve. Returns the names of
    the files written; a plot that fails is skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    a = result["analysis"]
    written = []
    colors = {"flashjax": "tab:blue", "xla": "tab:orange", "cudnn": "tab:green"}
    backends = [
        b for b in ("flashjax", "xla", "cudnn") if any(r["backend"] == b for r in a["speed"])
    ]

    try:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        groups = [(c, s) for c, s in plan.throughput]
        width = 0.8 / max(1, len(backends))
        labeled: set[tuple[int, str]] = set()
        for j, backend in enumerate(backends):
            recs = {
                (r["config"], r["seq"]): r
                for r in a["speed"]
                if r["backend"] == backend
                and r["kind"] == "throughput"
                and r.get("segments", True)
                and "docs_per_row" not in r
            }
            for metric, ax in (("tokens_per_s", axes[0]), ("plan_peak_bytes", axes[1])):
                for i, g in enumerate(groups):
                    r = recs.get(g)
                    x = i + (j - (len(backends) - 1) / 2) * width
                    if r is not None and r["status"] == "ok":
                        value = r[metric] / (1e3 if metric == "tokens_per_s" else GIB)
                        first = (id(ax), backend) not in labeled
                        labeled.add((id(ax), backend))
                        ax.bar(
                            x, value, width, color=colors[backend], label=backend if first else None
                        )
                    else:
                        status = r["status"] if r else "n/a"
                        ax.text(
                            x, 0, status.upper(), rotation=90, ha="center", va="bottom", fontsize=8
                        )
        for ax, title in (
            (axes[0], "throughput (k tokens/s)"),
            (axes[1], "step memory (GiB, XLA plan)"),
        ):
            ax.set_xticks(range(len(groups)), [f"{c}\nseq {s}" for c, s in groups])
            ax.set_title(title)
            ax.legend()
        ax = axes[2]
        for backend in backends:
            rungs = _ladder_rungs(a["speed"], backend, plan)
            ok = [r for r in rungs if r["status"] == "ok"]
            ax.plot(
                [r["seq"] for r in ok],
                [r.get("plan_peak_bytes", 0) / GIB for r in ok],
                "o-",
                color=colors[backend],
                label=backend,
            )
            for r in rungs:
                if r["status"] in ("oom", "error"):
                    ax.plot([r["seq"]], [0], "x", color=colors[backend], markersize=10)
        limit = max((h.get("bytes_limit", 0) for h in a["hello"].values()), default=0)
        if limit:
            ax.axhline(limit / GIB, color="gray", linestyle="--", label="device limit")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"sequence length ({plan.config}, batch {plan.batch}); x = did not fit")
        ax.set_title("step memory vs sequence length (GiB)")
        ax.legend()
        fig.suptitle(f"GPT-2 training, {result['meta']['device_kind']}")
        fig.tight_layout()
        name = f"{prefix}-throughput.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    except Exception as e:  # noqa: BLE001 - a plot must not lose the numbers
        print(f"throughput plot failed: {e}")

    p = a["parity"]
    if p.get("curves"):
        try:
            fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
            for key, losses in p["curves"].items():
                axes[0].plot(range(1, len(losses) + 1), losses, label=key, linewidth=1)
            axes[0].set_xlabel("step")
            axes[0].set_ylabel("training loss")
            axes[0].set_title(f"{plan.config}, seq {plan.parity_seq}, batch {plan.batch}")
            axes[0].legend()
            curves = p["curves"]
            for (a_key, b_key), label in (
                (("flashjax-bfloat16", "xla-bfloat16"), "|flashjax - xla| (bf16)"),
                (("xla-bfloat16", "xla-float32"), "|xla bf16 - xla fp32| (bf16 noise)"),
            ):
                if a_key in curves and b_key in curves:
                    n = min(len(curves[a_key]), len(curves[b_key]))
                    diff = np.abs(np.asarray(curves[a_key][:n]) - np.asarray(curves[b_key][:n]))
                    axes[1].plot(range(1, n + 1), diff, label=label, linewidth=1)
            if "tolerance" in p:
                axes[1].axhline(p["tolerance"], color="red", linestyle="--", label="tolerance")
            axes[1].set_xlabel("step")
            axes[1].set_ylabel("loss gap (nats)")
            axes[1].set_title(f"max gap {p.get('max_gap', float('nan')):.4f}: {p['verdict']}")
            axes[1].legend()
            fig.tight_layout()
            name = f"{prefix}-loss-parity.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
        except Exception as e:  # noqa: BLE001
            print(f"parity plot failed: {e}")

    v = a["val_run"]
    if v:
        try:
            fig, ax = plt.subplots(figsize=(7.5, 4.5))
            per = v["tokens_per_step"] / 1e6
            train_curve = np.asarray(v["train_losses"])
            val_curve = np.asarray(v["val_losses"])
            ax.plot(train_curve[:, 0] * per, train_curve[:, 1], label="train", linewidth=1)
            ax.plot(val_curve[:, 0] * per, val_curve[:, 1], "o-", label="validation")
            ax.set_xlabel("tokens (millions)")
            ax.set_ylabel("loss (nats per byte)")
            ax.set_title(
                f"GPT-2 {plan.config} with flashjax, seq {plan.val_seq}, batch {plan.batch}"
            )
            ax.legend()
            fig.tight_layout()
            name = f"{prefix}-val-loss.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
        except Exception as e:  # noqa: BLE001
            print(f"validation plot failed: {e}")
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.gpt2.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", type=Path, help="folder for the result files (at most 5)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget; default 500 (150 quick)")
    p.add_argument("--quick", action="store_true", help="tiny model, short run (CPU smoke test)")
    p.add_argument(
        "--backends",
        type=parse_backends,
        default=("flashjax", "xla", "cudnn"),
        help=f"comma list of {', '.join(TIMED_BACKENDS)}; {NO_ATTENTION!r}: the model without "
        "attention (throughput only), the time of everything else: the most any attention gains",
    )
    p.add_argument(
        "--only",
        help="comma-separated task kinds to run: throughput,parity,ladder,val_run,packed (packed: "
        "documents cut to seq / N tokens; run only when named here)",
    )
    p.add_argument(
        "--packed-docs", help="documents per row for `packed`, comma-separated (default 8,16)"
    )
    p.add_argument(
        "--throughput",
        help="CONFIG:SEQ list of the throughput task (default small:1024,medium:1024,small:4096)",
    )
    p.add_argument("--flash-impl", help="flashjax implementation (default: fastest)")
    p.add_argument("--data-cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--autotune-cache",
        default=str(Path(tempfile.gettempdir()) / "flashjax-gpt2-autotune"),
        help="XLA GPU autotuning cache folder shared by the workers ('' to disable)",
    )
    p.add_argument(
        "--grace-s", type=float, default=20.0, help="kill a worker this long after its deadline"
    )
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return p


def _config_seqs(text: str) -> tuple[tuple[str, int], ...]:
    """ "small:1024,medium:1024" -> (("small", 1024), ("medium", 1024))."""
    from examples.gpt2 import model  # flax and jax, without starting a backend

    pairs = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        config, _, seq = item.partition(":")
        if config not in model.CONFIGS or not seq.isdigit():
            raise SystemExit(
                f"--throughput: expected CONFIG:SEQ with CONFIG in "
                f"{sorted(model.CONFIGS)}, got {item!r}"
            )
        pairs.append((config, int(seq)))
    return tuple(pairs)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark (or, with --worker, one backend's share of it)."""
    args = _parser().parse_args(argv)
    if args.worker is not None:
        Worker(json.loads(args.worker.read_text())).run()
        return None
    if args.out is None:
        raise SystemExit("--out is required")
    t0 = time.time()
    plan = QUICK if args.quick else Plan()
    if args.packed_docs:
        plan = dataclasses.replace(
            plan, packed_docs=tuple(int(n) for n in args.packed_docs.split(",") if n.strip())
        )
    if args.throughput:
        plan = dataclasses.replace(plan, throughput=_config_seqs(args.throughput))
    try:
        for n in plan.packed_docs:
            data.doc_len_for(plan.packed_seq, n)
    except ValueError as e:
        raise SystemExit(f"--packed-docs: {e}") from None
    budget = args.budget_s or (150.0 if args.quick else 500.0)
    end = t0 + budget - 15.0  # Time to analyze and plot.
    backends = list(args.backends)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = data.load_corpus(args.data_cache, seed=args.seed)
    print(
        f"corpus: {corpus.meta['bytes'] / 2**20:.1f} MiB from {corpus.meta['root']} "
        f"({corpus.meta['train_documents']} train / {corpus.meta['val_documents']} val "
        f"documents), ready in {time.time() - t0:.1f} s; budget {budget:.0f} s",
        flush=True,
    )
    workdir = args.out / "raw"  # Kept: the records survive even if this process is killed.
    workdir.mkdir(exist_ok=True)
    results = workdir / "records.jsonl"
    workers = []
    only = {k.strip() for k in args.only.split(",") if k.strip()} if args.only else None
    packed = only is not None and "packed" in only
    plans = [
        (backend, [t for t in tasks if only is None or t["kind"] in only], share)
        for backend, tasks, share in _worker_plans(plan, backends, packed)
    ]
    plans = [p for p in plans if p[1]]
    for i, (backend, tasks, share) in enumerate(plans):
        now = time.time()
        if only is not None:  # the same tasks for every backend: an equal share of what is left
            share = 1.0 / (len(plans) - i)
            deadline = now + share * (end - now)
        else:
            deadline = end if share >= 1.0 else min(end, now + share * budget)
        workers.append(_run_worker(backend, tasks, deadline, args, plan, results, workdir))
    records = _records(results)
    analysis = analyze(records, plan)
    device = _device_name(analysis["hello"])
    date = datetime.date.today().isoformat()
    first_hello = next(iter(analysis["hello"].values()), {})
    result = {
        "meta": {
            "date": date,
            "device": device,
            "device_kind": first_hello.get("device_kind", "unknown"),
            "software": {
                k: first_hello.get(k) for k in ("jax", "jaxlib", "flax", "optax", "python")
            },
            "corpus": corpus.meta,
            "plan": dataclasses.asdict(plan),
            "budget_s": budget,
            "elapsed_s": time.time() - t0,
            "command": " ".join(sys.argv),
        },
        "workers": workers,
        "analysis": analysis,
        "records": records,
    }
    prefix = f"{date}-{device}-gpt2"
    written = make_plots(result, plan, args.out, prefix)
    summary = summary_markdown(result, plan)
    (args.out / f"{prefix}-summary.md").write_text(summary)
    result["meta"]["elapsed_s"] = time.time() - t0
    (args.out / f"{prefix}.json").write_text(json.dumps(result, indent=1, default=float))
    written += [f"{prefix}-summary.md", f"{prefix}.json"]
    print("\n" + summary)
    print(f"wrote {', '.join(written)} to {args.out} in {time.time() - t0:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
