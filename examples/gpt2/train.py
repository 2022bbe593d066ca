"""Train the GPT-2 on the standard library's sources: `python -m examples.gpt2.train`.

Defaults pick the machine: on CPU the `tiny` model for a few steps at seq 128, on a GPU `small`
(124M) at seq 1024. `--attention flashjax|xla|cudnn` chooses the attention backend.
`--context-parallel N` shards every row's sequence over N devices (ring attention,
`flashjax.ring_attention`, in the zigzag layout by default; parameters replicated).

The pieces, usable on their own (the benchmark and the tests do):
  - `TrainConfig`, `learning_rate` (linear warm-up, cosine decay to `min_lr_ratio * lr`),
    `make_optimizer` (global-norm clipping + AdamW, no weight decay on biases / LayerNorms).
  - `Trainer`: the jitted training step (gradient accumulation over micro-batches with
    `lax.scan`, float32 master weights, bfloat16 compute), the eval loss, checkpoints.
  - `save_checkpoint` / `restore_checkpoint`: orbax when it is installed, else `.npz`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from examples.gpt2 import data
from examples.gpt2.attention import BACKENDS, AttentionFn, ContextParallel
from examples.gpt2.model import CONFIGS, GPT, GPTConfig, get_config, tied_logits

try:  # Optional: orbax writes checkpoints where it is installed; `.npz` files otherwise.
    import orbax.checkpoint as ocp
except ImportError:  # pragma: no cover - depends on the machine
    ocp = None

DEFAULT_CACHE = Path(os.environ.get("GPT2_DATA_CACHE", Path.home() / ".cache" / "flashjax-gpt2"))
# Above this many bytes of float32 logits per micro-batch, the loss is computed in chunks of
# `_LOSS_CHUNK` tokens with the logits recomputed in the backward pass (see `cross_entropy`).
_AUTO_CHUNK_BYTES = 8 * 2**30
_LOSS_CHUNK = 8192
# The command line evaluates the validation loss every this many percent of the run by default.
EVAL_PERCENT = 20


# --------------------------------------------------------------------------------------------------
# Configuration, schedule, optimizer
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization settings.

    Attributes:
      seq_len: tokens per row.
      batch_size: rows per optimizer step (all micro-batches together).
      grad_accum: micro-batches per step; `batch_size` must be a multiple of it.
      steps: optimizer steps of the whole run (the schedule's length).
      lr: peak learning rate; `min_lr_ratio * lr` at the end of the cosine.
      warmup_steps: linear warm-up from 0.
      weight_decay, beta1, beta2, eps: AdamW's (decay only on matrices and embeddings).
      clip_norm: global gradient-norm clipping.
      loss_chunk_tokens: compute the loss in chunks of this many tokens (0: never; None: only
        when one micro-batch's float32 logits would exceed 8 GiB).
      seed: parameter initialization and data order.
    """

    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 20
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    loss_chunk_tokens: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                f"({self.grad_accum})"
            )

    @property
    def micro_batch(self) -> int:
        """Rows per micro-batch."""
        return self.batch_size // self.grad_accum


def schedule_hparams(config: TrainConfig) -> dict[str, jax.Array]:
    """The learning-rate schedule's knobs as float32 scalars. They live in the `TrainState`, not in
    the compiled step, so runs of different lengths or peaks share one compilation."""
    return {
        "lr": jnp.float32(config.lr),
        "warmup_steps": jnp.float32(config.warmup_steps),
        "total_steps": jnp.float32(max(config.steps, 1)),
        "min_lr_ratio": jnp.float32(config.min_lr_ratio),
    }


def learning_rate(step: jax.Array, hparams: dict[str, jax.Array]) -> jax.Array:
    """Linear warm-up to `lr` (step `s` < warmup gets `lr * (s + 1) / warmup`), then cosine decay
    to `min_lr_ratio * lr` at `total_steps` (and flat after)."""
    step = jnp.asarray(step, jnp.float32)
    peak, warmup = hparams["lr"], hparams["warmup_steps"]
    floor = peak * hparams["min_lr_ratio"]
    progress = jnp.clip((step - warmup) / jnp.maximum(hparams["total_steps"] - warmup, 1.0), 0, 1)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, peak * (step + 1.0) / jnp.maximum(warmup, 1.0), cosine)


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, Adam's scaling, decoupled weight decay on ndim >= 2 parameters only
    (matrices, embeddings): AdamW less the learning rate, which the step applies (`learning_rate`),
    so that the schedule is data rather than code."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.scale_by_adam(b1=config.beta1, b2=config.beta2, eps=config.eps),
        optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
    )


def loss_chunk_for(config: TrainConfig, model: GPTConfig) -> int:
    """Tokens per loss chunk for this run (0: the whole micro-batch at once)."""
    if config.loss_chunk_tokens is not None:
        return config.loss_chunk_tokens
    tokens = config.micro_batch * config.seq_len
    return _LOSS_CHUNK if tokens * model.vocab_size * 4 > _AUTO_CHUNK_BYTES else 0


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def cross_entropy(
    hidden: jax.Array, embedding: jax.Array, targets: jax.Array, dtype: Any, chunk: int = 0
) -> jax.Array:
    """Mean next-token cross-entropy (float32) of the tied LM head.

    Args:
      hidden: `Float[Array, "B T D"]` final hidden states.
      embedding: `Float[Array, "V D"]` the token embedding (the LM head's weight).
      targets: `Int[Array, "B T"]`.
      dtype: compute dtype of the LM head's matmul.
      chunk: 0 to form all `(B, T, V)` logits at once; else the tokens are processed in chunks of
        `chunk` under `jax.checkpoint`, so only one chunk's logits exist at a time (forward and
        backward), at the cost of recomputing the LM head's forward.
    """
    if not chunk:
        logits = tied_logits(hidden, embedding, dtype)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    d = hidden.shape[-1]
    flat_h, flat_t = hidden.reshape(-1, d), targets.reshape(-1)
    total = flat_t.shape[0]
    n = -(-total // chunk)
    pad = n * chunk - total
    flat_h = jnp.pad(flat_h, ((0, pad), (0, 0))).reshape(n, chunk, d)
    flat_t = jnp.pad(flat_t, (0, pad)).reshape(n, chunk)
    weights = (jnp.arange(n * chunk) < total).astype(jnp.float32).reshape(n, chunk)

    @jax.checkpoint
    def body(acc: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        h, t, w = xs
        losses = optax.softmax_cross_entropy_with_integer_labels(
            tied_logits(h, embedding, dtype), t
        )
        return acc + jnp.sum(losses * w), None

    loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (flat_h, flat_t, weights))
    return loss_sum / total


# --------------------------------------------------------------------------------------------------
# Train state, step, evaluation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint holds: the step count, float32 parameters, optimizer state and the
    schedule's knobs (`schedule_hparams`)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    hparams: dict[str, jax.Array]


jax.tree_util.register_dataclass(
    TrainState, data_fields=["step", "params", "opt_state", "hparams"], meta_fields=[]
)


def batch_arrays(batch: data.Batch) -> dict[str, np.ndarray]:
    """The arrays of a batch, as the jitted functions take them."""
    return {
        "inputs": batch.inputs,
        "targets": batch.targets,
        "segment_ids": batch.segment_ids,
        "positions": batch.positions,
    }


class Trainer:
    """The model's graph, the optimizer and the compiled functions for one (model, training,
    attention) setting.

    Compiled steps are cached per batch shape; `compile_stats` holds each one's compile time and
    XLA's memory plan (`memory_analysis()`), which the benchmark reports.
    """

    def __init__(
        self,
        model_config: GPTConfig,
        train_config: TrainConfig,
        attention: AttentionFn,
        *,
        use_segments: bool = True,
    ) -> None:
        self.model_config = model_config
        self.train_config = train_config
        self.attention = attention
        self.context = attention.context
        self.use_segments = use_segments
        self.optimizer = make_optimizer(train_config)
        self.loss_chunk = loss_chunk_for(train_config, model_config)
        abstract = nnx.eval_shape(lambda: GPT(model_config, attention, rngs=nnx.Rngs(0)))
        self.graphdef, _ = nnx.split(abstract, nnx.Param)
        self._train_jit = jax.jit(self._train_step, donate_argnums=0)
        self._eval_jit = jax.jit(self._loss)
        self._compiled: dict[Any, Any] = {}
        self.compile_stats: dict[str, dict[str, float]] = {}

    # -- pure functions ---------------------------------------------------------------------------

    def _loss(self, params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        model = nnx.merge(self.graphdef, params)
        segment_ids = batch["segment_ids"] if self.use_segments else None
        positions = batch["positions"] if self.use_segments else self._row_positions(batch)
        hidden = model(batch["inputs"], segment_ids, positions)
        return cross_entropy(
            hidden,
            model.wte.embedding[...],
            batch["targets"],
            self.model_config.dtype,
            self.loss_chunk,
        )

    def _row_positions(self, batch: dict[str, jax.Array]) -> jax.Array | None:
        """Positions 0..T-1 of unsegmented rows in the row order the model sees (None: the
        model's own default, when rows are in order)."""
        if self.context is None or self.context.layout == "contiguous":
            return None
        tokens = batch["inputs"]
        order = self.context.order(np.arange(tokens.shape[-1], dtype=np.int32))
        return jnp.broadcast_to(jnp.asarray(order), tokens.shape)

    def _train_step(
        self, state: TrainState, batch: dict[str, jax.Array]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on `batch` arrays of shape `(grad_accum, micro_batch, T)`."""
        grad_fn = jax.value_and_grad(self._loss)
        accum = batch["inputs"].shape[0]
        if accum == 1:
            loss, grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch))
        else:

            def micro(
                carry: tuple[jax.Array, Any], mb: dict[str, jax.Array]
            ) -> tuple[tuple[jax.Array, Any], None]:
                loss_sum, grad_sum = carry
                loss, grads = grad_fn(state.params, mb)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), batch)
            loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        lr = learning_rate(state.step, state.hparams)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr}
        return TrainState(state.step + 1, params, opt_state, state.hparams), metrics

    # -- host API ---------------------------------------------------------------------------------

    def init_state(self, schedule: TrainConfig | None = None) -> TrainState:
        """Fresh parameters and optimizer state on device, from `schedule.seed`, with the learning
        rate schedule of `schedule` (both default to the trainer's `train_config`). Only the
        seed and the schedule are read from `schedule`: the compiled step is shared."""
        schedule = self.train_config if schedule is None else schedule

        shardings = None if self.context is None else self.context.replicated()

        @functools.partial(jax.jit, out_shardings=shardings)
        def init() -> TrainState:
            model = GPT(self.model_config, self.attention, rngs=nnx.Rngs(schedule.seed))
            params = nnx.state(model, nnx.Param)
            return TrainState(
                jnp.zeros((), jnp.int32),
                params,
                self.optimizer.init(params),
                schedule_hparams(schedule),
            )

        return init()

    def device_batch(self, batch: data.Batch) -> dict[str, jax.Array]:
        """A batch of `batch_size` rows as device arrays of shape `(grad_accum, micro, T)`."""
        accum = self.train_config.grad_accum
        return self.put(batch_arrays(batch.reshape(accum, batch.inputs.shape[0] // accum)))

    def put(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host token arrays `(..., T)` on device; with context parallelism in the layout's row
        order, the sequence sharded over the context axis."""
        if self.context is None:
            return jax.device_put(arrays)
        return {
            name: jax.device_put(self.context.order(x), self.context.sharding(x.ndim))
            for name, x in arrays.items()
        }

    def compiled_step(self, state: TrainState, batch: dict[str, jax.Array]) -> Any:
        """The compiled training step for this batch shape (compiled on first use)."""
        key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if key not in self._compiled:
            start = time.perf_counter()
            compiled = self._train_jit.lower(state, batch).compile()
            stats = {"compile_s": time.perf_counter() - start}
            stats.update(memory_plan(compiled))
            self._compiled[key] = compiled
            self.compile_stats["x".join(str(d) for d in batch["inputs"].shape)] = stats
        return self._compiled[key]

    def step(
        self, state: TrainState, batch: data.Batch | dict[str, jax.Array]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step. `state` is donated: use the returned one."""
        if isinstance(batch, data.Batch):
            batch = self.device_batch(batch)
        return self.compiled_step(state, batch)(state, batch)

    def evaluate(self, state: TrainState, batches: Sequence[data.Batch]) -> float:
        """Mean loss over `batches` (each of any batch size)."""
        if not batches:
            return float("nan")
        losses = [self._eval_jit(state.params, self.put(batch_arrays(b))) for b in batches]
        return float(np.mean([float(x) for x in losses]))


def memory_plan(compiled: Any) -> dict[str, float]:
    """XLA's memory plan of a compiled function, in bytes: arguments, outputs, temporaries, and
    their sum less the outputs aliased to donated arguments (the step's peak footprint)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if analysis is None:
        return {}
    fields = {
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "temp_bytes": "temp_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
    }
    plan = {k: float(getattr(analysis, v, 0) or 0) for k, v in fields.items()}
    plan["plan_peak_bytes"] = (
        plan["argument_bytes"] + plan["output_bytes"] + plan["temp_bytes"] - plan["alias_bytes"]
    )
    return plan


def device_memory() -> dict[str, float]:
    """Device memory in use and its peak so far (bytes), or the host's peak RSS on backends
    without memory stats (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {
            "bytes_in_use": float(stats.get("bytes_in_use", 0)),
            "peak_bytes_in_use": float(stats["peak_bytes_in_use"]),
            "bytes_limit": float(stats.get("bytes_limit", 0)),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"host_peak_rss_bytes": float(rss)}


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(
    root: str | Path, state: TrainState, meta: dict[str, Any] | None = None, fmt: str = "auto"
) -> Path:
    """Write `state` to `root/step_XXXXXXXX/` and return that folder.

    The state's leaves (in `jax.tree.leaves` order) are written with orbax (`fmt="orbax"`, the
    default where orbax is installed) or to `state.npz`; `meta.json`, written last, records the
    format, the leaf count and `meta` (configs), and marks the checkpoint complete.
    """
    if fmt == "auto":
        fmt = "orbax" if ocp is not None else "npz"
    step = int(state.step)
    folder = _step_dir(Path(root), step)
    folder.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
    named = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
    if fmt == "orbax":
        if ocp is None:
            raise RuntimeError("orbax is not installed; use fmt='npz'")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((folder / "orbax").absolute(), named, force=True)
        checkpointer.wait_until_finished()
    elif fmt == "npz":
        np.savez(folder / "state.npz", **named)
    else:
        raise ValueError(f"fmt must be 'auto', 'orbax' or 'npz', got {fmt!r}")
    info = {"format": fmt, "step": step, "num_leaves": len(leaves), **(meta or {})}
    (folder / "meta.json").write_text(json.dumps(info, indent=1, default=str))
    return folder


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    root = Path(root)
    if not root.exists():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / "meta.json").exists())
    return done[-1] if done else None


def restore_checkpoint(folder: str | Path, template: TrainState) -> TrainState:
    """The state saved in `folder`, with the structure (and shardings) of `template`."""
    folder = Path(folder)
    info = json.loads((folder / "meta.json").read_text())
    leaves, treedef = jax.tree.flatten(template)
    if info["num_leaves"] != len(leaves):
        raise ValueError(
            f"checkpoint has {info['num_leaves']} arrays, the state expects {len(leaves)}"
        )
    names = [f"leaf_{i:05d}" for i in range(len(leaves))]
    if info["format"] == "orbax":
        if ocp is None:
            raise RuntimeError("this checkpoint was written by orbax, which is not installed")
        target = {n: np.zeros(x.shape, x.dtype) for n, x in zip(names, leaves, strict=True)}
        loaded = ocp.StandardCheckpointer().restore((folder / "orbax").absolute(), target)
    else:
        with np.load(folder / "state.npz") as npz:
            loaded = {n: npz[n] for n in names}
    for name, ref in zip(names, leaves, strict=True):
        if loaded[name].shape != ref.shape:
            raise ValueError(f"{name}: checkpoint shape {loaded[name].shape} != {ref.shape}")
    return jax.tree.unflatten(
        treedef,
        [
            jax.device_put(np.asarray(loaded[n], ref.dtype), getattr(ref, "sharding", None))
            for n, ref in zip(names, leaves, strict=True)
        ],
    )


# --------------------------------------------------------------------------------------------------
# Progress display
# --------------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}GiB"


def speed_text(tokens_per_s: float) -> str:
    """Throughput for display; `-- tok/s` while it is unknown (NaN: before the first timed
    interval, the first one holding the compilation)."""
    return f"{tokens_per_s:,.0f} tok/s" if math.isfinite(tokens_per_s) else "-- tok/s"


def memory_text() -> str:
    """Peak device memory (or host RSS on CPU) for the progress bar."""
    mem = device_memory()
    if "peak_bytes_in_use" in mem:
        return f"mem {_gib(mem['peak_bytes_in_use'])}"
    return f"rss {_gib(mem['host_peak_rss_bytes'])}"


class Progress:
    """A progress bar (tqdm if installed, else a line every `every` steps) showing loss, tokens/s
    and memory."""

    def __init__(self, total: int, initial: int = 0, every: int = 10) -> None:
        self.total, self.every = total, max(1, every)
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stdout)

    def update(self, step: int, text: str) -> None:
        """Report that `step` (1-based) is done."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.refresh()
        elif step % self.every == 0 or step == self.total:
            print(f"step {step:>6d}/{self.total} | {text}", flush=True)

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """What a training run measured (`tokens_per_s`: NaN if no interval was timed)."""

    train_losses: list[tuple[int, float]]
    val_losses: list[tuple[int, float]]
    tokens_per_s: float
    final_state: TrainState


def train(
    trainer: Trainer,
    sampler: data.BatchSampler,
    val_batches: Sequence[data.Batch] = (),
    *,
    state: TrainState | None = None,
    stop_at: int | None = None,
    deadline: float | None = None,
    eval_every: int = 0,
    log_every: int = 10,
    ckpt_dir: str | Path | None = None,
    ckpt_every: int = 0,
    ckpt_meta: dict[str, Any] | None = None,
    progress: bool = True,
    on_log: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Run `trainer` from `state` (default: fresh) to step `stop_at` (default: the config's
    `steps`, where the schedule ends), or until the wall clock passes `deadline` (`time.time()`).

    Losses are read back every `log_every` steps (every step's loss is kept); the validation loss
    every `eval_every` steps and at the end; checkpoints every `ckpt_every` steps and at the end
    (if `ckpt_dir`).
    """
    cfg = trainer.train_config
    state = trainer.init_state() if state is None else state
    start_step = int(state.step)
    end = cfg.steps if stop_at is None else stop_at
    bar = Progress(end, start_step, log_every) if progress else None
    tokens_per_step = cfg.batch_size * cfg.seq_len
    train_losses: list[tuple[int, float]] = []
    val_losses: list[tuple[int, float]] = []
    pending: list[tuple[int, jax.Array]] = []
    timed_tokens, timed_s, mark = 0, 0.0, None
    for step in range(start_step, end):
        state, metrics = trainer.step(state, sampler.batch(step))
        pending.append((step + 1, metrics["loss"]))
        done = step + 1
        late = deadline is not None and time.time() > deadline
        if late:
            end = done
        if done % log_every == 0 or done == end:
            losses = [(s, float(x)) for s, x in pending]  # Waits for the device.
            pending.clear()
            train_losses.extend(losses)
            now = time.perf_counter()
            if mark is not None:  # The first interval holds the compilation: not timed.
                timed_s += now - mark[0]
                timed_tokens += (done - mark[1]) * tokens_per_step
            mark = (now, done)
            speed = timed_tokens / timed_s if timed_s else math.nan
            if on_log is not None:
                on_log(done, losses[-1][1])
            if bar is not None:
                bar.update(
                    done, f"loss {losses[-1][1]:.4f} | {speed_text(speed)} | {memory_text()}"
                )
        if val_batches and ((eval_every and done % eval_every == 0) or done == end):
            val_losses.append((done, trainer.evaluate(state, val_batches)))
            if bar is not None:
                bar.write(f"step {done}: val loss {val_losses[-1][1]:.4f}")
            mark = (time.perf_counter(), done) if mark is not None else None
        if ckpt_dir and ((ckpt_every and done % ckpt_every == 0) or done == end):
            save_checkpoint(ckpt_dir, state, ckpt_meta)
            mark = (time.perf_counter(), done) if mark is not None else None
        if late:
            break
    if bar is not None:
        bar.close()
    speed = timed_tokens / timed_s if timed_s else math.nan
    return RunResult(train_losses, val_losses, speed, state)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.gpt2.train",
        description="Train GPT-2 (Flax NNX + optax) on the Python standard library's sources.",
    )
    p.add_argument("--config", choices=sorted(CONFIGS), help="default: tiny on CPU, small on GPU")
    p.add_argument("--attention", choices=BACKENDS, default="flashjax")
    p.add_argument(
        "--flash-impl",
        choices=("triton", "xla_chunked", "xla"),
        help="flashjax implementation (default: the fastest for the device)",
    )
    p.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="N",
        help="shard each row's sequence over N devices (ring attention; flashjax only)",
    )
    p.add_argument(
        "--cp-layout",
        choices=("zigzag", "contiguous"),
        default="zigzag",
        help="row layout over the --context-parallel devices (zigzag balances causal work)",
    )
    p.add_argument("--no-segments", action="store_true", help="let documents attend across")
    p.add_argument(
        "--docs-per-row",
        type=int,
        metavar="N",
        help="cut the documents into pieces of seq-len // N tokens, so each row holds N of them",
    )
    p.add_argument("--seq-len", type=int, help="default: 128 on CPU, 1024 on GPU")
    p.add_argument("--batch-size", type=int, help="rows per step; default 8 (CPU), 16 (GPU)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, help="default: 30 on CPU, 2000 on GPU")
    p.add_argument("--lr", type=float, help="peak learning rate; default 1e-3 tiny, 6e-4 else")
    p.add_argument("--warmup", type=int, help="warm-up steps; default 5%% of steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")
    p.add_argument("--vocab-size", type=int, help="override the config's vocab rows (>= 257)")
    p.add_argument("--eval-every", type=int, help=f"default: every {EVAL_PERCENT}%% of the run")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-dir", type=Path, help="save checkpoints here (and resume from here)")
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--max-corpus-mb", type=float, help="read at most this much of the corpus")
    return p


def _context(devices: int, layout: str) -> ContextParallel | None:
    """The `--context-parallel` mesh: the first `devices` devices on one "context" axis."""
    if devices == 1:
        return None
    if not 1 < devices <= jax.device_count():
        raise SystemExit(
            f"--context-parallel must be in 1..{jax.device_count()} (the devices here)"
        )
    return ContextParallel(Mesh(np.array(jax.devices()[:devices]), ("context",)), layout=layout)


def main(argv: Sequence[str] | None = None) -> RunResult:
    """Parse the command line, train, print a summary."""
    args = _parser().parse_args(argv)
    on_gpu = jax.devices()[0].platform == "gpu"
    name = args.config or ("small" if on_gpu else "tiny")
    seq_len = args.seq_len or (1024 if on_gpu else 128)
    steps = args.steps or (2000 if on_gpu else 30)
    model_config = get_config(
        name,
        max_seq_len=max(CONFIGS[name].max_seq_len, seq_len),
        dtype=args.dtype,
        remat=args.remat or None,
        vocab_size=args.vocab_size,
    )
    if model_config.vocab_size < data.ByteTokenizer.vocab_size:
        raise SystemExit(f"--vocab-size must be >= {data.ByteTokenizer.vocab_size}")
    train_config = TrainConfig(
        seq_len=seq_len,
        batch_size=args.batch_size or (16 if on_gpu else 8),
        grad_accum=args.grad_accum,
        steps=steps,
        lr=args.lr or (1e-3 if name == "tiny" else 6e-4),
        warmup_steps=args.warmup if args.warmup is not None else max(1, steps // 20),
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        seed=args.seed,
    )
    attention = AttentionFn(
        args.attention, args.flash_impl, context=_context(args.context_parallel, args.cp_layout)
    )
    max_bytes = None if args.max_corpus_mb is None else int(args.max_corpus_mb * 2**20)
    corpus = data.load_corpus(args.data_cache, max_bytes=max_bytes, seed=args.seed)
    train_stream, val_stream, rows_text = corpus.train, corpus.val, ""
    if args.docs_per_row is not None:
        try:
            doc_len = data.doc_len_for(seq_len, args.docs_per_row)
        except ValueError as e:
            raise SystemExit(f"--docs-per-row: {e}") from None
        train_stream = data.cut_documents(corpus.train, doc_len)
        val_stream = data.cut_documents(corpus.val, doc_len)
        rows_text = f" | {args.docs_per_row} documents of {doc_len} tokens per row"
    sampler = data.BatchSampler(train_stream, seq_len, train_config.batch_size, args.seed)
    val = data.eval_batches(val_stream, seq_len, train_config.micro_batch, args.eval_batches)
    if not val:
        print("note: the validation split is too small for one batch; no validation loss")
    trainer = Trainer(model_config, train_config, attention, use_segments=not args.no_segments)
    cp_text = ""
    if attention.context is not None:
        cp_text = f" | context parallel {attention.context.size} ({attention.context.layout})"
    print(
        f"GPT-2 {name} ({model_config.num_params() / 1e6:.1f}M params, {model_config.dtype}) | "
        f"attention {args.attention}{cp_text} | {jax.devices()[0].device_kind} | seq {seq_len} "
        f"x batch {train_config.batch_size} (accum {train_config.grad_accum}){rows_text} | corpus "
        f"{corpus.meta['bytes'] / 2**20:.1f} MiB, {len(train_stream):,} train / "
        f"{len(val_stream):,} val tokens",
        flush=True,
    )
    state = None
    if args.resume and args.ckpt_dir is not None:
        found = latest_checkpoint(args.ckpt_dir)
        if found is not None:
            state = restore_checkpoint(found, jax.eval_shape(trainer.init_state))
            # The command line's schedule wins (the same one continues the same run; a larger
            # --steps extends it).
            state = dataclasses.replace(state, hparams=schedule_hparams(train_config))
            print(f"resumed from {found} (step {int(state.step)})", flush=True)
    meta = {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(train_config)}
    result = train(
        trainer,
        sampler,
        val,
        state=state,
        eval_every=args.eval_every or max(1, steps * EVAL_PERCENT // 100),
        log_every=args.log_every,
        ckpt_dir=args.ckpt_dir,
        ckpt_every=args.ckpt_every,
        ckpt_meta=meta,
    )
    first = result.train_losses[0][1] if result.train_losses else math.nan
    last = result.train_losses[-1][1] if result.train_losses else math.nan
    vals = result.val_losses
    val_text = f"{vals[0][1]:.4f} -> {vals[-1][1]:.4f}" if vals else "n/a"
    print(
        f"done: train loss {first:.4f} -> {last:.4f} | val loss {val_text} | "
        f"{speed_text(result.tokens_per_s)} | {memory_text()}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
