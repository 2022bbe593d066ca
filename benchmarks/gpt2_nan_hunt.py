"""Find where (and why) a GPT-2 training run's loss stops being finite.

    PYTHONPATH=. python3 benchmarks/gpt2_nan_hunt.py --out OUT/nan [--backend flashjax]

Trains `small` (seq 1024, batch 8, the benchmark's validation-run schedule) with `--backend`,
snapshotting the state every `--every` steps. At the first non-finite loss or gradient norm it
replays from the last snapshot one step at a time and, on each step's parameters and batch,
evaluates the loss and gradient with every backend (flashjax, xla, cudnn): a step where flashjax is
non-finite and xla is finite points at the kernel; a step where all are non-finite, or a loss /
gradient-norm spike before it, points at the training recipe. Then trains `--compare` (another
backend) from the same initialization for as many steps, to see whether it diverges too.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from examples.gpt2 import data
from examples.gpt2.attention import AttentionFn
from examples.gpt2.bench import DEFAULT_CACHE
from examples.gpt2.model import get_config
from examples.gpt2.train import TrainConfig, Trainer


def _finite(x: float) -> bool:
    return math.isfinite(x)


def run(args: argparse.Namespace) -> dict:
    corpus = data.load_corpus(DEFAULT_CACHE, seed=0)
    model = get_config(args.config)
    cfg = TrainConfig(
        seq_len=args.seq,
        batch_size=8,
        steps=args.schedule_steps,
        lr=args.lr,
        warmup_steps=200,
        seed=0,
    )
    names = dict.fromkeys([args.backend, *args.check.split(","), args.compare or args.backend])
    trainers = {b: Trainer(model, cfg, AttentionFn(b)) for b in names}
    sampler = data.BatchSampler(corpus.train, args.seq, 8, 0)
    grad_fns = {
        b: jax.jit(jax.value_and_grad(lambda p, batch, t=t: t._loss(p, batch)))
        for b, t in trainers.items()
    }

    def grad_stats(backend: str, params, batch) -> dict:
        mb = jax.tree.map(lambda x: x[0], trainers[backend].device_batch(batch))
        loss, grads = grad_fns[backend](params, mb)
        norms = {
            jax.tree_util.keystr(k): float(jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))))
            for k, g in jax.tree_util.tree_leaves_with_path(grads)
        }
        bad = sorted(k for k, v in norms.items() if not _finite(v))
        total = math.sqrt(sum(v * v for v in norms.values())) if not bad else float("nan")
        return {"loss": float(loss), "grad_norm": total, "nonfinite_leaves": bad[:12]}

    def train(backend: str, steps: int, log: list) -> tuple[int | None, object, int]:
        trainer = trainers[backend]
        state = trainer.init_state(cfg)
        snap, snap_step = jax.tree.map(jnp.copy, state), 0
        for i in range(steps):
            if i % args.every == 0:
                snap, snap_step = jax.tree.map(jnp.copy, state), i
            state, m = trainer.step(state, sampler.batch(i))
            loss, gn = float(m["loss"]), float(m["grad_norm"])
            log.append((i, loss, gn))
            if i % 100 == 0:
                print(f"[{backend}] step {i} loss {loss:.4f} grad_norm {gn:.3f}", flush=True)
            if not (_finite(loss) and _finite(gn)):
                print(f"[{backend}] step {i}: loss {loss} grad_norm {gn}", flush=True)
                return i, snap, snap_step
        return None, None, steps

    out: dict = {"lr": args.lr, "schedule_steps": args.schedule_steps}
    t0 = time.time()
    log: list = []
    bad_step, snap, snap_step = train(args.backend, args.max_steps, log)
    out["train"] = {"backend": args.backend, "first_nonfinite_step": bad_step, "log": log}
    print(f"training: {time.time() - t0:.0f} s, first non-finite step {bad_step}", flush=True)
    if bad_step is not None:
        replay = []
        state = snap
        trainer = trainers[args.backend]
        for i in range(snap_step, bad_step + 1):
            batch = sampler.batch(i)
            row = {"step": i}
            for b in args.check.split(","):
                row[b] = grad_stats(b, state.params, batch)
            replay.append(row)
            print(json.dumps(row), flush=True)
            if not _finite(row[args.backend]["grad_norm"]):
                break
            state, _ = trainer.step(state, batch)
        out["replay"] = replay
    if args.compare and time.time() - t0 < args.compare_after_s:
        steps = (bad_step or args.max_steps) + 50
        clog: list = []
        cbad, _, _ = train(args.compare, steps, clog)
        out["compare"] = {"backend": args.compare, "first_nonfinite_step": cbad, "log": clog}
        print(f"{args.compare}: first non-finite step {cbad} of {steps}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default="small")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--backend", default="flashjax")
    p.add_argument("--check", default="flashjax,xla,cudnn", help="backends evaluated in replay")
    p.add_argument("--compare", default="cudnn")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--schedule-steps", type=int, default=4359)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--compare-after-s", type=float, default=300)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "nan_hunt.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
